"""The least work a CPython puller does for one image: a yardstick for fastpull's fixed costs.

    python benchmarks/pyfloor.py URL OUT_DIR [CA_FILE]

``URL`` is the manifest's (``http://HOST/v2/REPO/manifests/TAG``). The manifest is fetched,
then every blob at once over one pycurl multi handle, each hashed (SHA-256) and written as its
bytes land, its write-out started every few MiB and its file fsynced as its transfer ends
(fastpull publishes a blob only once it is on disk, and skopeo does not sync at all). Blobs go
to ``OUT_DIR/blobs/sha256/HEX``; a digest that does not match is exit 1.

No command line, store, locks, journals, retries, auth, redirects or validation beyond the
digests: this is what the interpreter, pycurl and the disk cost, so that the benchmark can
tell fastpull's own fixed costs from those of the language it is written in. One connection
per blob is no floor for a big blob, which fastpull fetches in parallel ranges.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import pycurl

_ACCEPT = (
    "Accept: application/vnd.oci.image.manifest.v1+json,"
    "application/vnd.docker.distribution.manifest.v2+json"
)
# Start writing a blob's bytes out every this many: its fsync then has little left to do.
_WRITE_OUT = 4 << 20


class _Blob:
    def __init__(self, path: Path, digest: str) -> None:
        self.file = path.open("wb", buffering=0)
        self.digest = digest
        self.hash = hashlib.sha256()
        self.written = 0
        self.flushed = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)
        self.written += len(data)
        pending = self.written - self.flushed
        if pending >= _WRITE_OUT:
            os.posix_fadvise(self.file.fileno(), self.flushed, pending, os.POSIX_FADV_DONTNEED)
            self.flushed = self.written

    def finish(self, failures: list[str]) -> None:
        os.fsync(self.file.fileno())
        self.file.close()
        if "sha256:" + self.hash.hexdigest() != self.digest:
            failures.append(self.digest)


def _easy(url: str, ca_file: str | None) -> pycurl.Curl:
    easy = pycurl.Curl()
    easy.setopt(pycurl.URL, url)
    if ca_file:
        easy.setopt(pycurl.CAINFO, ca_file)
    return easy


def main(url: str, out: Path, ca_file: str | None = None) -> int:
    easy = _easy(url, ca_file)
    body = bytearray()
    easy.setopt(pycurl.HTTPHEADER, [_ACCEPT])
    easy.setopt(pycurl.WRITEFUNCTION, body.extend)
    easy.perform()
    easy.close()
    manifest = json.loads(body)
    base = url.rsplit("/manifests/", 1)[0]
    folder = out / "blobs" / "sha256"
    folder.mkdir(parents=True, exist_ok=True)
    multi = pycurl.CurlMulti()
    blobs: dict[pycurl.Curl, _Blob] = {}
    for descriptor in [manifest["config"], *manifest["layers"]]:
        digest = descriptor["digest"]
        blob = _Blob(folder / digest.split(":", 1)[1], digest)
        easy = _easy(f"{base}/blobs/{digest}", ca_file)
        easy.setopt(pycurl.WRITEFUNCTION, blob.write)
        multi.add_handle(easy)
        blobs[easy] = blob
    failures: list[str] = []
    syncs = []
    left = len(blobs)
    while left:
        multi.perform()
        while True:
            queued, ended, failed = multi.info_read()
            for easy, _errno, message in failed:
                failures.append(f"{blobs[easy].digest}: {message}")
                left -= 1
            for easy in ended:
                sync = threading.Thread(target=blobs[easy].finish, args=(failures,))
                sync.start()
                syncs.append(sync)
                left -= 1
            if not queued:
                break
        if left:
            multi.select(1.0)
    for sync in syncs:
        sync.join()
    for failure in failures:
        print(f"pyfloor: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))
