"""Helpers for end-to-end tests: run the CLI in-process, read the store, name repositories."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastpull.cli import main
from tests.support.faultproxy import FaultProxy
from tests.support.faultserver import FaultServer

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


def assert_store_sound(store: Path) -> None:
    """Only verified content in blobs/ (each file hashes to its name), nothing left half
    downloaded in ingest/, and no stray file at the top of the store."""
    for path in (store / "blobs").rglob("*"):
        if path.is_file():
            digest = hashlib.new(path.parent.name)
            with path.open("rb") as fh:
                while data := fh.read(1 << 22):
                    digest.update(data)
            assert digest.hexdigest() == path.name, path
    assert list((store / "ingest").glob("*.data")) == []
    expected = {"oci-layout", "index.json", "index.json.lock", "blobs", "ingest"}
    assert {p.name for p in store.iterdir()} <= expected
