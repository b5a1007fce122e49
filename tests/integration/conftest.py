"""Helpers for end-to-end tests: run the CLI in-process, read the store, name repositories."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import xxhash

from fastpull.cli.commands import main
from tests.support.faultproxy import FaultProxy
from tests.support.faultserver import FaultServer
from tests.support.tools import require_tool

_counter = itertools.count()


@dataclass
class CliResult:
    """Exit code and captured output of one ``fastpull`` invocation."""

    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], docker_config: Any) -> Any:
    """Run ``fastpull ARGS...`` in this process with an isolated store and docker config."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


# An in-process pull that hangs is stopped as Ctrl-C would stop it, so the test fails instead.
PULL_DEADLINE = 20.0


@pytest.fixture
def pull(cli: Any) -> Callable[..., CliResult]:
    """Run ``fastpull pull ARGS...`` in-process, interrupted after PULL_DEADLINE seconds."""

    def run(*args: str) -> CliResult:
        watchdog = threading.Timer(PULL_DEADLINE, os.kill, (os.getpid(), signal.SIGINT))
        watchdog.start()
        try:
            return cli("pull", *args)
        finally:
            watchdog.cancel()

    return run


Start = Callable[..., FaultServer]


@pytest.fixture
def servers() -> Iterator[Start]:
    """Start FaultServers (keyword options as for FaultServer); all stop after the test."""
    started: list[FaultServer] = []

    def start(**options: Any) -> FaultServer:
        server = FaultServer(**options).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


Proxy = Callable[..., FaultProxy]


@pytest.fixture
def proxies() -> Iterator[Proxy]:
    """Start FaultProxies: ``proxy(upstream, **options)``; ``upstream`` is a URL or a server
    with ``url`` and ``ca_path`` (a RegistryServer, another proxy). All stop after the test."""
    started: list[FaultProxy] = []

    def start(upstream: Any, **options: Any) -> FaultProxy:
        if not isinstance(upstream, str):
            options.setdefault("upstream_ca", upstream.ca_path)
            upstream = upstream.url
        proxy = FaultProxy(upstream, **options).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in reversed(started):
        proxy.stop()


@pytest.fixture
def repo() -> str:
    """A repository name no other test uses (registries are shared per session)."""
    return f"test/r{next(_counter)}"


def index_entries(store: Path) -> list[dict[str, Any]]:
    """The manifests listed by the store's index.json."""
    return json.loads((store / "index.json").read_text())["manifests"]


def entry_for(store: Path, reference: str) -> dict[str, Any]:
    """The index.json entry whose ref.name annotation is ``reference``."""
    matches = [
        e
        for e in index_entries(store)
        if e.get("annotations", {}).get("org.opencontainers.image.ref.name") == reference
    ]
    assert len(matches) == 1, f"{reference} has {len(matches)} entries"
    return matches[0]


def blob(store: Path, digest: str) -> Path:
    """Path of a blob in the store."""
    algorithm, hex_digest = digest.split(":", 1)
    return store / "blobs" / algorithm / hex_digest


def blob_gets(requests: list[Any]) -> list[str]:
    """Digests of the blob GETs among logged registry requests (URL-decoded)."""
    out = []
    for r in requests:
        if r.method == "GET" and "/blobs/" in r.path:
            out.append(r.path.rsplit("/", 1)[1].replace("%3A", ":").split("?")[0])
    return out


def assert_store_consistent(store: Path, *, killed: bool = False) -> None:
    """Only verified content in blobs/, no stray file at the top of the store, and partial
    data in ingest/ only where a journal vouches for each of its ranges (checked here with
    xxhash directly).

    After ``kill -9`` (``killed``) a download may have died before journaling anything, or
    in the middle of a journal line: only the complete lines must be true then.
    """
    expected = {"oci-layout", "index.json", "index.json.lock", "gc.lock", "blobs", "ingest"}
    expected |= {"placements.jsonl"}  # where pushes and copies placed blobs
    # A writer of index.json killed before its rename leaves its temp file.
    debris = re.compile(r"\.index\.json\.[0-9a-f]+\.tmp" if killed else "$^")
    assert {p.name for p in store.iterdir() if not debris.fullmatch(p.name)} <= expected
    for path in (store / "blobs").rglob("*"):
        if path.is_file():
            assert file_digest(path) == f"{path.parent.name}:{path.name}", path
    for data in (store / "ingest").glob("*.data"):
        journal = data.with_suffix(".journal")
        if killed and not journal.exists():
            continue
        raw = journal.read_bytes()
        lines = raw.split(b"\n")[:-1] if killed else raw.splitlines()
        header = json.loads(lines[0]) if lines else {}
        if killed and not lines:
            continue
        assert header["digest"] == data.stem.replace("-", ":", 1)
        ranges = [e for e in map(json.loads, lines[1:]) if "start" in e]
        assert ranges or killed, f"{data.name} is kept although no range of it is finished"
        content = data.read_bytes()
        for extent in ranges:
            piece = content[extent["start"] : extent["end"]]
            assert xxhash.xxh3_128_hexdigest(piece) == extent["xxh3"], extent


def file_digest(path: Path) -> str:
    """The sha256 digest of a file, read in pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while data := fh.read(4 << 20):
            digest.update(data)
    return f"sha256:{digest.hexdigest()}"


def env_store() -> Path:
    """The store a test pulls into by default (``$FASTPULL_STORE``)."""
    return Path(os.environ["FASTPULL_STORE"])


def one_line(err: str) -> str:
    """The one line of an error message, which must be no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def start_fastpull(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m fastpull ARGS...`` in its own process group, as a shell job."""
    return subprocess.Popen(
        [sys.executable, "-m", "fastpull", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def process_tree(pid: int) -> set[int]:
    """The PIDs of every descendant of ``pid``, from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def console_script() -> str:
    """The installed ``fastpull`` command; its absence fails under ``CI=true``."""
    return require_tool("fastpull")
