"""The store's advisory file locks (``flock``), taken one way everywhere.

Three kinds of lock file live in a store: ``index.json.lock`` and ``gc.lock`` in the root,
which are never deleted, and ``ingest/<alg>-<hex>.lock``, which its holder deletes while
still holding it, so that ``ingest/`` does not fill with one lock file per blob ever pulled.
That deletion is what the inode rule of :func:`lock_file` makes safe.

Locks are taken by polling a non-blocking ``flock`` rather than by a blocking one: a blocking
``flock`` is restarted after a signal handler returns, so Ctrl-C would never be noticed while
another process holds the lock. Between polls :func:`fastpull.cancel.check` raises if the user
asked to stop.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from fastpull import cancel

POLL_SECONDS = 0.05
"""How long a waiter sleeps between two tries of a lock another process holds."""


def _flock_until(fd: int, operation: int, deadline: float | None) -> bool:
    """The polling loop: True once ``operation`` is granted, False at ``deadline``."""
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            cancel.check()
            time.sleep(POLL_SECONDS)


def lock_file(path: Path, *, shared: bool = False) -> int:
    """Open ``path`` (creating it) and lock it, waiting as long as it takes; the descriptor.

    Closing the descriptor releases the lock. Because holders of ingest locks delete the
    file before releasing it, a waiter may wake up holding a lock on a file that no longer
    has a name, while a newcomer has created and locked a fresh file under the same name;
    so after locking, this checks that ``path`` still names the inode it locked, and starts
    over if not. That keeps exactly one exclusive holder per name.
    """
    fd = _lock(path, shared, None)
    assert fd is not None  # without a deadline _lock returns only once it holds the lock
    return fd


def lock_file_within(path: Path, timeout: float, *, shared: bool = False) -> int | None:
    """:func:`lock_file`, giving up after ``timeout`` seconds (0: one try) with None.

    The time counts from the call, across restarts after the inode check.
    """
    return _lock(path, shared, time.monotonic() + timeout)


def _lock(path: Path, shared: bool, deadline: float | None) -> int | None:
    operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            locked = _flock_until(fd, operation, deadline)
            if locked and _still_named(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if not locked:
            return None


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file ``fd`` has open (see :func:`lock_file`)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(current, os.fstat(fd))


def delete_and_unlock(fd: int, path: Path) -> None:
    """Delete the lock file ``path`` while still holding it through ``fd``, then release it.

    Safe for waiters thanks to :func:`lock_file`'s inode rule. The lock is released even if
    the deletion fails.
    """
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def is_locked(path: Path) -> bool:
    """Whether some process holds ``path`` exclusively right now; never creates the file.

    A snapshot that may change at once. The probe takes a shared lock for an instant, so a
    process waiting for the exclusive lock at that moment only retries its poll later.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


__all__ = ["POLL_SECONDS", "delete_and_unlock", "is_locked", "lock_file", "lock_file_within"]
