"""The engine's background disk thread: order, private descriptors, errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fastpull.errors import StoreError
from fastpull.store.diskqueue import DiskQueue


def test_work_runs_in_the_order_it_was_queued(tmp_path: Path) -> None:
    done: list[str] = []
    gate = threading.Event()
    queue = DiskQueue()
    first = queue.run(lambda: (gate.wait(5), done.append("run"))[1])
    queue.later(lambda: done.append("later"))
    last = queue.run(lambda: done.append("last"))
    assert not first.done()  # held by the gate, and so is everything after it
    gate.set()
    last.result(timeout=5)
    assert done == ["run", "later", "last"]
    queue.close()


def test_release_works_on_its_own_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "data"
    path.write_bytes(bytes(8192))
    advised: list[tuple[int, int, int, int]] = []

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.fstat(fd).st_ino, offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    gate = threading.Event()
    queue = DiskQueue()
    queue.run(lambda: gate.wait(5))
    fd = os.open(path, os.O_RDONLY)
    queue.release(fd, 4096, 4096)
    os.close(fd)  # the caller's descriptor is gone before the queued work runs
    gate.set()
    queue.close()
    assert advised == [(path.stat().st_ino, 4096, 4096, os.POSIX_FADV_DONTNEED)]


def test_an_error_of_later_work_is_raised_once_by_check() -> None:
    queue = DiskQueue()

    def fail() -> None:
        raise StoreError("cannot sync journal in store /s: Input/output error")

    queue.later(fail)
    queue.run(lambda: None).result(timeout=5)  # everything before it has finished
    with pytest.raises(StoreError, match="Input/output error"):
        queue.check()
    queue.check()
    queue.close()


def test_close_waits_for_queued_work() -> None:
    done: list[int] = []
    queue = DiskQueue()
    for i in range(20):
        queue.later(lambda i=i: done.append(i))
    queue.close()
    assert done == list(range(20))
