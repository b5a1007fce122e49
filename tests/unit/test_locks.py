"""Tests for fastpull.store.locks: flock taken by polling, with the inode rule for lock files
that their holders delete.

flock locks belong to an open file description, so two ``os.open`` of one path in one process
contend like two processes would; that lets these tests hold a lock without a child process.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastpull.errors import Interrupted
from fastpull.store import locks
from fastpull.store.locks import delete_and_unlock, is_locked, lock_file, lock_file_within


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_free_lock_is_taken_at_once_and_released_by_closing(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    fd = lock_file_within(path, 0)
    assert fd is not None
    assert path.exists()
    assert lock_file_within(path, 0) is None
    os.close(fd)
    again = lock_file_within(path, 0)
    assert again is not None
    os.close(again)


def test_a_held_lock_times_out_with_none(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = lock_file(path)
    before = _open_fds()
    try:
        assert lock_file_within(path, 0) is None
        assert lock_file_within(path, 0.2) is None
        assert lock_file_within(path, 0.2, shared=True) is None
        # Giving up closes what it opened.
        assert _open_fds() == before
    finally:
        os.close(holder)


def test_shared_locks_coexist_and_keep_an_exclusive_one_out(tmp_path: Path) -> None:
    path = tmp_path / "gc.lock"
    first = lock_file(path, shared=True)
    second = lock_file_within(path, 0, shared=True)
    assert second is not None
    assert lock_file_within(path, 0) is None
    os.close(first)
    assert lock_file_within(path, 0) is None
    os.close(second)
    alone = lock_file_within(path, 0)
    assert alone is not None
    os.close(alone)


def test_is_locked_sees_an_exclusive_holder_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    assert not is_locked(path)
    assert not path.exists()
    fd = lock_file(path)
    assert is_locked(path)
    os.close(fd)
    assert not is_locked(path)
    # The probe took and dropped its lock: an exclusive lock is still free.
    again = lock_file_within(path, 0)
    assert again is not None
    os.close(again)


def test_a_lock_file_deleted_by_its_holder_gives_a_newcomer_a_fresh_one(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = lock_file(path)
    delete_and_unlock(holder, path)
    assert not path.exists()
    with pytest.raises(OSError):
        os.fstat(holder)  # closed
    newcomer = lock_file_within(path, 0)
    assert newcomer is not None
    assert os.path.samestat(os.fstat(newcomer), os.stat(path))
    os.close(newcomer)


def test_delete_and_unlock_releases_even_when_the_file_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = lock_file(path)
    path.unlink()
    delete_and_unlock(holder, path)
    with pytest.raises(OSError):
        os.fstat(holder)


def test_a_waiter_whose_file_was_replaced_starts_over_on_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The waiter polls the old file; meanwhile a newcomer holds a new file under the same name
    # and the old holder lets go. The waiter then holds a lock on a nameless file, which must
    # not count: it has to wait for the newcomer instead.
    path = tmp_path / "x.lock"
    holder = lock_file(path)
    old = os.fstat(holder)
    polling = threading.Event()
    monkeypatch.setattr(locks, "cancel", SimpleNamespace(check=polling.set))
    result: list[int | None] = []
    waiter = threading.Thread(target=lambda: result.append(lock_file_within(path, 2.0)))
    waiter.start()
    try:
        assert polling.wait(10)  # the waiter has opened the old file and found it locked
        replacement = tmp_path / "replacement"
        replacement.touch()
        os.replace(replacement, path)
        newcomer = lock_file_within(path, 0)
        assert newcomer is not None
        os.close(holder)
    finally:
        waiter.join(10)
    assert result == [None]
    os.close(newcomer)
    after = lock_file(path)
    assert os.path.samestat(os.fstat(after), os.stat(path))
    assert not os.path.samestat(os.fstat(after), old)
    os.close(after)


def test_a_stop_request_ends_the_wait_and_closes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.lock"
    holder = lock_file(path)

    def stop() -> None:
        raise Interrupted("interrupted")

    monkeypatch.setattr(locks, "cancel", SimpleNamespace(check=stop))
    before = _open_fds()
    try:
        with pytest.raises(Interrupted):
            lock_file(path)
        assert _open_fds() == before
    finally:
        os.close(holder)
