"""Disk work the download engine must not wait for, done in order on one background thread.

Under write load one ``fsync``, one ``fdatasync``, even the ``posix_fadvise`` that starts
writing a range out, can block for most of a second: the file system waits for the device
queue, which the kernel's writeback throttling keeps short. Measured on a 2 GB pull, a
journal sync in the engine's loop once took 1.03 s and a blob's fsync 0.39 s. While the loop
is blocked no connection whose chunk ended gets its next one, so the engine hands such calls
here instead:

- :meth:`DiskQueue.release`: hashed bytes are final; start writing them out, and drop
  from the page cache what is written already;
- :meth:`DiskQueue.later`: work whose errors only need raising eventually, such as making a
  resume journal's latest records durable;
- :meth:`DiskQueue.run`: work whose outcome the caller waits for, such as the fsync and
  rename that publish a blob.

Queued work must not use a file descriptor the caller may close meanwhile: ``release``
duplicates its own, and the store's sync jobs carry theirs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_FADVISE = getattr(os, "POSIX_FADV_DONTNEED", None)


def release_pages(fd: int, offset: int, length: int) -> None:
    """Advise the kernel that bytes ``[offset, offset + length)`` of ``fd`` are final.

    POSIX_FADV_DONTNEED drops the range's clean pages and starts writing its dirty ones
    out (those stay cached until released again, see ``verify.RELEASE_AGAIN_AFTER``). So the
    fsync before a blob is published finds little left to write (it used to flush up to a
    gigabyte at the very end), and a pull of many gigabytes does not push everything else
    out of the page cache. Only advice: a file system that does not take it changes nothing.
    """
    if _FADVISE is not None:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, _FADVISE)


class DiskQueue:
    """One background thread running disk calls in the order they were queued."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastpull-disk")
        self._later: list[Future[None]] = []

    def release(self, fd: int, offset: int, length: int) -> None:
        """:func:`release_pages`, off the caller's thread."""
        self._pool.submit(_closing, os.dup(fd), release_pages, offset, length)

    def later(self, work: Callable[[], None]) -> None:
        """Run ``work`` after everything queued before it; :meth:`check` raises its error."""
        self._later.append(self._pool.submit(work))

    def run(self, work: Callable[[], T]) -> Future[T]:
        """Run ``work`` after everything queued before it."""
        return self._pool.submit(work)

    def check(self) -> None:
        """Raise the error of finished :meth:`later` work, if any failed."""
        finished = [f for f in self._later if f.done()]
        self._later = [f for f in self._later if not f.done()]
        for future in finished:
            error = future.exception()
            if error is not None:
                raise error

    def close(self) -> None:
        """Wait for everything queued; never raises (it runs while errors unwind)."""
        self._pool.shutdown(wait=True)


def _closing(fd: int, call: Callable[..., None], *args: int) -> None:
    try:
        call(fd, *args)
    finally:
        os.close(fd)
