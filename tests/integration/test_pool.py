"""The worker pool against the real registry: transfers start inline while the worker
processes boot, and go to the workers once one is ready."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from fastpull.engine.pool import WorkerPool
from fastpull.engine.worker import Done, Fetch, Report
from fastpull.registry.transport import TLSConfig
from tests.support.images import Layer, MiB, make_image, make_layer


@pytest.fixture
def served(registry: Any, repo: str) -> tuple[str, Layer]:
    """A 3 MiB layer in the registry: (its blob URL, the layer)."""
    layer = make_layer(3 * MiB, compression="none", seed=91)
    registry.pusher.push_image(repo, "1", make_image([layer]))
    return f"{registry.url}/v2/{repo}/blobs/{layer.digest}", layer


def _fetch(chunk_id: int, url: str, path: Path, size: int) -> Fetch:
    path.write_bytes(b"")
    with path.open("r+b") as out:
        out.truncate(size)
    return Fetch(chunk_id, url, (), str(path), 0, size, size, TLSConfig())


def _until_done(pool: WorkerPool, chunk_id: int) -> list[Report]:
    reports: list[Report] = []
    deadline = time.monotonic() + 30
    while not any(isinstance(r, Done) and r.chunk_id == chunk_id for r in reports):
        assert time.monotonic() < deadline, reports
        reports += pool.receive(0.05)
    return reports


def test_transfers_run_inline_until_a_worker_is_ready_then_go_to_the_workers(
    served: tuple[str, Layer], tmp_path: Path
) -> None:
    url, layer = served
    with contextlib.closing(WorkerPool(1)) as pool:
        # Fresh off the constructor: the worker is still starting.
        assert pool.starting
        first = pool.assign(_fetch(1, url, tmp_path / "first", layer.size))
        assert first == pool.inline
        _until_done(pool, 1)
        pool.released(first)
        deadline = time.monotonic() + 30
        while pool.starting:
            assert time.monotonic() < deadline
            pool.receive(0.05)

        second = pool.assign(_fetch(2, url, tmp_path / "second", layer.size))
        assert second == 0
        _until_done(pool, 2)

    assert (tmp_path / "first").read_bytes() == layer.data
    assert (tmp_path / "second").read_bytes() == layer.data


def test_without_workers_every_transfer_runs_inline(
    served: tuple[str, Layer], tmp_path: Path
) -> None:
    url, layer = served
    with contextlib.closing(WorkerPool(0)) as pool:
        assert not pool.starting
        slot = pool.assign(_fetch(1, url, tmp_path / "blob", layer.size))
        assert slot == pool.inline == 0
        _until_done(pool, 1)

    assert (tmp_path / "blob").read_bytes() == layer.data
