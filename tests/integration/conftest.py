"""Helpers for end-to-end tests: run the CLI in-process, read the store, name repositories."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastpull.cli import main
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
