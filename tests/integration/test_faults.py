"""Faults that need a scripted registry rather than the real one behind a fault proxy: a
same-origin storage redirect, a manifest flood, what fastpull asks for, signals mid-download,
foreign ``urls`` (distribution 2.8 refuses to store them). Injected with
:class:`tests.support.faultserver.FaultServer`; faults between fastpull and the real registry
(resets, stalls, 5xx, 429, redirects, lying headers) are in ``test_hostile.py``.

Scripted "forever" faults use a large finite count, so a client that failed to give up would
end up succeeding (and the test fail) instead of hanging the suite.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fastpull.registry.manifest import MAX_MANIFEST_SIZE
from tests.integration.conftest import Start, assert_store_consistent, blob, env_store, one_line
from tests.support.faultserver import Flood, Redirect, Respond, Serve
from tests.support.images import (
    OCI_MANIFEST,
    Blob,
    Image,
    make_image,
    make_index,
    make_layer,
    sha256_digest,
)

REPO = "faults/app"
USER, PASSWORD = "alice", "fault-secret"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SCHEMA2_AND_OCI = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}


def _image(seed: int, size: int = 50_000) -> Image:
    return make_image([make_layer(size, seed=seed)])


# -- redirects ---------------------------------------------------------------------------------


def test_same_origin_redirect_keeps_the_credentials(
    servers: Start, pull: Any, docker_config: Any
) -> None:
    # The server demands Basic auth on every path, so the pull only works if it is kept.
    registry = servers(basic_auth=(USER, PASSWORD))
    image = _image(seed=2)
    layer = image.layers[0]
    registry.add_image(REPO, "1", image)
    storage_path = f"/storage/{layer.digest.split(':')[1]}"
    registry.add_content(storage_path, layer.data)
    registry.script(
        registry.blob_path(REPO, layer.digest),
        Redirect(f"{registry.url}{storage_path}", times=None),
    )
    docker_config.add_auth(registry.host, username=USER, password=PASSWORD)

    result = pull(f"{registry.host}/{REPO}:1")

    assert result.code == 0, result.err
    hops = registry.requests_for(storage_path)
    assert [(r.status, r.header("Authorization")) for r in hops] == [(200, BASIC)]
    assert blob(env_store(), layer.digest).read_bytes() == layer.data


# -- manifests that must not be used -----------------------------------------------------------


def test_oversized_manifest_is_refused_without_reading_it_all(servers: Start, pull: Any) -> None:
    registry = servers()
    route = registry.manifest_path(REPO, "1")
    registry.script(route, Flood(headers={"Content-Type": OCI_MANIFEST}, size=256 << 20))

    result = pull(f"{registry.host}/{REPO}:1")

    assert result.code != 0
    assert f"larger than {MAX_MANIFEST_SIZE} bytes" in one_line(result.err)
    registry.wait_idle()
    (flood,) = registry.requests_for(route)
    # What the client read plus what the socket buffers held when it hung up: far below 256 MiB.
    assert flood.body_sent < 64 << 20


# -- what fastpull asks for --------------------------------------------------------------------


def test_requests_ask_for_identity_blobs_and_schema2_or_oci_manifests(
    servers: Start, pull: Any
) -> None:
    registry = servers()
    amd = make_image([make_layer(3000, seed=10)])
    arm = make_image([make_layer(3000, seed=11)], architecture="arm64")
    registry.add_image(REPO, "multi", make_index([amd, arm]))

    result = pull("--platform", "linux/amd64", f"{registry.host}/{REPO}:multi")

    assert result.code == 0, result.err
    manifests = [r for r in registry.requests if "/manifests/" in r.path]
    blobs = [r for r in registry.requests if "/blobs/" in r.path]
    # The index by tag, then the platform manifest by digest; the config and one layer.
    assert len(manifests) == 2
    assert len(blobs) == 2
    for request in manifests:
        accept = request.header("Accept") or ""
        offered = {part.split(";")[0].strip() for part in accept.split(",")}
        assert offered == SCHEMA2_AND_OCI, accept
        assert "distribution.manifest.v1" not in accept
    for request in blobs:
        assert request.header("Accept-Encoding") == "identity"


# -- broken and slow connections ---------------------------------------------------------------


def _read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


# The body trickles (1 KiB every 0.2 s) or stalls after 64 KiB (a silent server).
_SLOW = {"trickle": Serve(chunk=1024, interval=0.2, times=None), "stall": Serve(stall_after=65536)}


# "0": the transfer runs in the fastpull process; "1": in a download worker process.
@pytest.mark.parametrize("workers", ["0", "1"])
@pytest.mark.parametrize("slow", sorted(_SLOW))
@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_signal_mid_download_stops_at_once_and_keeps_only_journaled_bytes(
    servers: Start, tmp_path: Path, signum: int, code: int, word: str, slow: str, workers: str
) -> None:
    registry = servers()
    image = _image(seed=13, size=1_000_000)
    layer = image.layers[0]
    registry.add_image(REPO, "1", image)
    registry.script(registry.blob_path(REPO, layer.digest), _SLOW[slow])
    store = tmp_path / "store"
    env = {**os.environ, "FASTPULL_STORE": str(store), "DOCKER_CONFIG": str(tmp_path / "docker")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastpull",
            "pull",
            "--workers",
            workers,
            f"{registry.host}/{REPO}:1",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
        downloading = f"{layer.digest.split(':')[1][:12]}: Downloading"
        deadline = time.monotonic() + 30
        while lines.get(timeout=max(0.0, deadline - time.monotonic())) != downloading:
            pass
        time.sleep(0.5)  # some KiB in: a partial download is on disk
        assert list((store / "ingest").glob("*.data")) != []

        sent = time.monotonic()
        proc.send_signal(signum)
        returncode = proc.wait(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()

    assert returncode == code, err
    assert elapsed < 2.0
    assert re.fullmatch(rf"Error: {word}\b.*", one_line(err)), err
    assert "Traceback" not in err
    assert not blob(store, layer.digest).exists()
    assert json.loads((store / "index.json").read_text())["manifests"] == []
    assert_store_consistent(store)


# -- foreign layers ----------------------------------------------------------------------------


@pytest.mark.parametrize("registry_has_it", [True, False])
def test_foreign_layer_urls_are_never_fetched(
    servers: Start, pull: Any, docker_config: Any, registry_has_it: bool
) -> None:
    # A FaultServer, not the real registry: distribution 2.8 validates manifests by default
    # with an empty URL allow-list, so it refuses to store any descriptor with `urls`.
    registry = servers(basic_auth=(USER, PASSWORD))
    foreign = servers()
    layer = make_layer(20_000, seed=14)
    foreign_path = f"/layers/{layer.digest}"
    foreign.add_content(foreign_path, layer.data)
    image = make_image([layer])
    document = json.loads(image.manifest_bytes)
    document["layers"][0]["urls"] = [f"{foreign.url}{foreign_path}"]
    raw = json.dumps(document, separators=(",", ":")).encode()
    manifest = Blob(digest=sha256_digest(raw), size=len(raw), media_type=OCI_MANIFEST, content=raw)
    registry.add_image(REPO, "1", dataclasses.replace(image, manifest=manifest))
    blob_path = registry.blob_path(REPO, layer.digest)
    if not registry_has_it:
        registry.script(blob_path, Respond(404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}'))
    docker_config.add_auth(registry.host, username=USER, password=PASSWORD)

    result = pull(f"{registry.host}/{REPO}:1")

    assert foreign.requests == []
    asked = registry.requests_for(blob_path)
    assert [r.header("Authorization") for r in asked] == [BASIC]
    if registry_has_it:
        assert result.code == 0, result.err
        assert blob(env_store(), layer.digest).read_bytes() == layer.data
    else:
        assert result.code == 4
        assert "not found" in one_line(result.err)
        assert not blob(env_store(), layer.digest).exists()
