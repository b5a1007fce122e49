"""The command lines the benchmark compares, and how to tell that each one did its job.

- ``fastpull``: the whole image into a fresh OCI layout, every blob verified.
- ``skopeo``: the peer; ``skopeo copy docker://… oci:…``, whole image, verified, layers stored
  as they came (like fastpull).
- ``curl``: the largest blob over one connection, the single-stream line-rate reference.
- ``aria2c``: the same blob in 16 segments over 16 connections, the segmented-download
  reference.
- ``floor``: ``curl -o FILE`` of the largest blob, then ``openssl dgst -sha256 FILE``: the
  least CPU any tool can spend to download, store and verify those bytes. Every row's CPU s/GB
  is compared with it. (coreutils' ``sha256sum`` does not use the CPU's SHA instructions here:
  5.3 CPU s/GB against OpenSSL's 0.8.)
- ``pyfloor``: ``benchmarks/pyfloor.py``, the least work a CPython puller does for the whole
  image (one pycurl connection per blob, all at once, each hashed as it lands and fsynced as
  it ends; no command line, store or checks beyond the digests), run by the same interpreter
  as fastpull: on a small image, what is left of fastpull's wall time above it is fastpull's
  own fixed cost, not Python's. (On a big image one connection per blob is no floor.)
- ``disk``: no network; ``dd`` writes as many bytes as the image has to a file, then fsyncs
  it: what storing the image durably costs on this disk at the moment. fastpull fsyncs every
  blob before it is published (it starts the write-out as it hashes, so it can come in a little
  above this row); curl and aria2c do not sync.

``curl`` and ``aria2c`` neither fetch the manifest and the other blobs nor check the digest of
what they wrote, so they have less to do than the image pullers.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import Blob

TOOLS = ("fastpull", "curl", "aria2c", "skopeo", "floor", "pyfloor", "disk")
# pyfloor only when asked for: it is about the small image's fixed costs, and behind a
# per-connection cap it would take minutes on the big image's largest layer.
DEFAULT_TOOLS = tuple(t for t in TOOLS if t != "pyfloor")

# The program each tool runs, and where it comes from, for the error message when it is missing.
_BINARIES = {"disk": "dd", "floor": "openssl"}
_PACKAGES = {
    "curl": "curl",
    "aria2c": "aria2",
    "skopeo": "skopeo",
    "disk": "coreutils",
    "floor": "openssl",
}


@dataclass(frozen=True)
class Target:
    """One image as the tools see it: where to pull it from and what it consists of."""

    host: str
    repository: str
    tag: str
    blobs: tuple[Blob, ...]
    largest: Blob
    # Set when the registry serves HTTPS: the CA every tool is told to trust (none skips
    # verification, so TLS costs what it costs a real pull).
    ca_path: Path | None = None

    @property
    def scheme(self) -> str:
        return "http" if self.ca_path is None else "https"

    @property
    def reference(self) -> str:
        return f"{self.host}/{self.repository}:{self.tag}"

    @property
    def largest_path(self) -> str:
        return f"/v2/{self.repository}/blobs/{self.largest.digest}"

    @property
    def largest_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.largest_path}"


@dataclass(frozen=True)
class Invocation:
    """A command line, how many payload bytes it moves, and the files it must leave behind."""

    argv: tuple[str, ...]
    payload_bytes: int
    expected_files: tuple[tuple[Path, int], ...]
    stats_path: Path | None = None

    def missing_output(self) -> str | None:
        """Describe the first expected file that is absent or has the wrong size, if any."""
        for path, size in self.expected_files:
            if not path.exists():
                return f"{path} was not written"
            if path.stat().st_size != size:
                return f"{path} has {path.stat().st_size} bytes, expected {size}"
        return None


def missing_tools(tools: Sequence[str]) -> list[str]:
    """Human-readable notes for requested tools that are not installed."""
    notes = []
    for tool in tools:
        if tool in ("fastpull", "pyfloor"):
            continue  # this interpreter runs them (fastpull from the editable install)
        if shutil.which(_BINARIES.get(tool, tool)) is None:
            notes.append(f"{tool} (apt-get install {_PACKAGES[tool]})")
    return notes


def fastpull_supports_stats(env: Mapping[str, str]) -> bool:
    """Whether this fastpull has ``pull --stats FILE`` (older checkouts do not)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "fastpull", "pull", "--help"],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=60,
        check=False,
    ).stdout
    return "--stats" in help_text


def invocation(
    tool: str,
    target: Target,
    out_dir: Path,
    *,
    fastpull_args: Sequence[str] = (),
    fastpull_stats: bool = False,
) -> Invocation:
    """The command line that makes ``tool`` fetch ``target`` into ``out_dir`` (empty, owned by
    this run)."""
    image_bytes = sum(blob.size for blob in target.blobs)
    if tool == "fastpull":
        store = out_dir / "store"
        stats = out_dir / "stats.json" if fastpull_stats else None
        argv = [sys.executable, "-m", "fastpull", "pull", "--store", str(store)]
        if target.ca_path is not None:
            argv += ["--ca-cert", str(target.ca_path)]
        if stats is not None:
            argv += ["--stats", str(stats)]
        argv += [*fastpull_args, target.reference]
        return Invocation(tuple(argv), image_bytes, _layout_blobs(store, target), stats)
    if tool == "skopeo":
        layout = out_dir / "layout"
        source_tls = (
            ["--src-tls-verify=false"]
            if target.ca_path is None
            else [f"--src-cert-dir={target.ca_path.parent}"]
        )
        argv = [
            "skopeo",
            "copy",
            *source_tls,
            # Without this skopeo gzips uncompressed layers on their way into an OCI layout,
            # which would make it compress 2 GB of random data that fastpull stores as is.
            "--dest-oci-accept-uncompressed-layers",
            f"docker://{target.reference}",
            f"oci:{layout}:{target.tag}",
        ]
        return Invocation(tuple(argv), image_bytes, _layout_blobs(layout, target))
    if tool == "pyfloor":
        layout = out_dir / "layout"
        url = f"{target.scheme}://{target.host}/v2/{target.repository}/manifests/{target.tag}"
        argv = [sys.executable, str(Path(__file__).with_name("pyfloor.py")), url, str(layout)]
        if target.ca_path is not None:
            argv.append(str(target.ca_path))
        return Invocation(tuple(argv), image_bytes, _layout_blobs(layout, target))
    blob_file = out_dir / "blob"
    if tool == "disk":
        argv = ["dd", "if=/dev/zero", f"of={blob_file}", "bs=4M", f"count={image_bytes}"]
        argv += ["iflag=count_bytes", "conv=fsync", "status=none"]
        return Invocation(tuple(argv), image_bytes, ((blob_file, image_bytes),))
    expected = ((blob_file, target.largest.size),)
    curl = ["curl", "-sS", "-L", *_curl_tls(target), "-o", str(blob_file), target.largest_url]
    if tool == "curl":
        return Invocation(tuple(curl), target.largest.size, expected)
    if tool == "floor":
        digest = f"openssl dgst -sha256 {shlex.quote(str(blob_file))} >/dev/null"
        script = f"{shlex.join(curl)} && {digest}"
        return Invocation(("sh", "-c", script), target.largest.size, expected)
    if tool == "aria2c":
        argv = [
            "aria2c",
            "-x16",
            "-s16",
            "-k1M",
            "--allow-overwrite=true",
            "--file-allocation=none",
            "--quiet=true",
            "--summary-interval=0",
            *(
                []
                if target.ca_path is None
                else [f"--ca-certificate={target.ca_path}", "--check-certificate=true"]
            ),
            "-d",
            str(out_dir),
            "-o",
            blob_file.name,
            target.largest_url,
        ]
        return Invocation(tuple(argv), target.largest.size, expected)
    raise ValueError(f"unknown tool {tool!r}")


def _curl_tls(target: Target) -> list[str]:
    return [] if target.ca_path is None else ["--cacert", str(target.ca_path)]


def _layout_blobs(layout: Path, target: Target) -> tuple[tuple[Path, int], ...]:
    return tuple(
        (layout / "blobs" / blob.digest.replace(":", "/", 1), blob.size) for blob in target.blobs
    )


def tool_env(scratch: Path) -> dict[str, str]:
    """The environment every tool runs with.

    Proxy variables are dropped (curl, aria2c, libcurl and skopeo all honour them, and the
    traffic must stay on loopback), and fastpull's own config file is pointed at a path that
    does not exist, so a developer's settings do not change the numbers: tunables are passed
    explicitly with ``--fastpull-args``.

    fastpull runs from byte code compiled once here, into ``scratch`` (the checkout under test
    is not written to), as it does when installed with pip: with ``PYTHONDONTWRITEBYTECODE``
    set and no ``__pycache__`` in a checkout, every run would compile its modules from source
    again: about 330 million instructions (60-90 ms) per pull here, which no installed copy pays.
    """
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["FASTPULL_CONFIG"] = str(scratch / "no-fastpull-config.json")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    subprocess.run(
        [sys.executable, "-c", _BYTE_COMPILE],
        env=env,
        capture_output=True,
        timeout=300,
        check=True,
    )
    return env


# Byte-compiles the fastpull package that the environment's interpreter imports.
_BYTE_COMPILE = (
    "import compileall, os, fastpull; "
    "compileall.compile_dir(os.path.dirname(fastpull.__file__), quiet=1)"
)


def tool_version(tool: str, env: Mapping[str, str]) -> str:
    """The first line a tool prints about its version, or why there is none."""
    argv = {
        "fastpull": [sys.executable, "-m", "fastpull", "version"],
        "curl": ["curl", "--version"],
        "aria2c": ["aria2c", "--version"],
        "skopeo": ["skopeo", "--version"],
        "disk": ["dd", "--version"],
        "floor": ["openssl", "version"],
        "pyfloor": [sys.executable, "--version"],
        "nginx": ["/usr/sbin/nginx", "-v"],
        "docker-registry": ["docker-registry", "--version"],
    }[tool]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=dict(env), timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    # nginx -v writes to stderr.
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else f"unavailable (exit status {done.returncode})"
