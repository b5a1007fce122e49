"""File operations every part of the store shares: the one place where an OSError becomes a
StoreError, and writes that survive a crash (fsynced data, temp file then rename, fsynced
directory)."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from fastpull.errors import StoreError


def store_error(exc: OSError, root: Path, action: str, need: int | None = None) -> StoreError:
    """The StoreError the user can act on for ``exc``, met doing ``action`` in store ``root``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        extra = f" (need {need} bytes)" if need is not None else ""
        message = f"{what} in store {root}{extra}"
    else:
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"cannot {action} in store {root}: {exc.strerror or exc}{where}"
    return StoreError(message, store=str(root), errno=exc.errno)


@contextlib.contextmanager
def os_errors(root: Path, action: str) -> Iterator[None]:
    """Raise any OSError from the body as :func:`store_error` of ``action``."""
    try:
        yield
    except OSError as exc:
        raise store_error(exc, root, action) from exc


def fsync_dir(path: Path) -> None:
    """Make the names created or removed in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist) holding ``data``, fsynced; 0644 less the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


@contextlib.contextmanager
def syncing_meanwhile(directories: Sequence[Path]) -> Iterator[None]:
    """fsync ``directories`` on another thread while the body runs; their entries are
    durable when it ends (or the first error of those syncs is raised)."""
    if not directories:
        yield
        return
    errors: list[OSError] = []

    def sync() -> None:
        try:
            for directory in directories:
                fsync_dir(directory)
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=sync, name="fastpull-fsync")
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if errors:
        raise errors[0]


def atomic_write(
    directory: Path,
    name: str,
    data: bytes,
    *,
    replace: bool,
    durable_first: Sequence[Path] = (),
) -> None:
    """Give ``directory/name`` the content ``data`` all at once, durably; the entries of
    the directories ``durable_first`` are made durable before it changes.

    The temp file is ``.<name>.<16 hex>.tmp`` in ``directory``. With ``replace`` false an
    existing file wins: the new one is hard-linked into place, which fails instead of
    overwriting, so racing initialisers cannot clobber each other. ``durable_first`` is
    synced alongside the temp file, so the two waits for the disk overlap.
    """
    temp = directory / f".{name}.{os.urandom(8).hex()}.tmp"
    try:
        with syncing_meanwhile(durable_first):
            write_new_file(temp, data)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    try:
        if replace:
            os.replace(temp, directory / name)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(temp, directory / name)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(directory)


__all__ = [
    "atomic_write",
    "fsync_dir",
    "os_errors",
    "store_error",
    "syncing_meanwhile",
    "write_new_file",
]
