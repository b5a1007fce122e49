"""Where a transfer's body goes: written into its chunk's byte range with ``pwrite``, and
checksummed (xxh3-128, for the resume journal) as it lands.

A :class:`ChunkWriter` is libcurl's write callback for one transfer. It comes from one of two
backends with identical results, picked like the hashing backend
(:data:`fastpull.hashing.BACKEND`, ``FASTPULL_NATIVE=0``):

``native``
    ``fastpull._native.ChunkWriter``: the ``pwrite`` loop and the checksum in C, with the GIL
    released, so a received buffer costs no Python objects beyond the one pycurl hands over.
``python``
    :class:`PythonChunkWriter`: ``os.pwrite`` and the ``xxhash`` package.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Protocol

from fastpull import hashing
from fastpull.store.journal import new_checksum

# libcurl's write callback answers None to take the whole buffer, 0 to abort the transfer.
Answer = int | None
Other = Callable[[bytes], Answer]


class ChunkWriter(Protocol):
    """One transfer's write callback, writing at ``position`` and never at or past ``limit``.

    While :attr:`writing` is false, a buffer is handed to the ``other`` callable given at
    creation and its answer is returned (an error body to keep, or the wrong bytes to refuse).
    While it is true, the buffer's bytes up to ``limit`` are written at ``position``, which
    advances, and added to the checksum; the answer is 0 (abort) when any byte of the buffer
    was not written: it lies past ``limit`` (another chunk's), or a write failed (``error``
    says why, and the writer stops). After :meth:`stop` every call answers 0 and writes
    nothing.
    """

    writing: bool

    @property
    def position(self) -> int:
        """Every byte from the start up to here is written."""
        ...

    @property
    def limit(self) -> int:
        """Nothing is written at or past it."""
        ...

    @limit.setter
    def limit(self, value: int) -> None:
        """Move the limit; :class:`ValueError` below :attr:`position`."""
        ...

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called or a write failed."""
        ...

    @property
    def error(self) -> int:
        """The ``errno`` of the write that failed, 0 if none did."""
        ...

    def __call__(self, data: bytes, /) -> Answer:
        """Take one buffer libcurl received."""
        ...

    def stop(self) -> None:
        """Write nothing more."""
        ...

    def hexdigest(self) -> str:
        """The xxh3-128 of every byte written so far, as the resume journal records it."""
        ...


class PythonChunkWriter:
    """The ``python`` backend of :class:`ChunkWriter`."""

    def __init__(self, fd: int, position: int, limit: int, other: Other) -> None:
        if fd < 0 or not 0 <= position <= limit:
            raise ValueError("need fd >= 0 and 0 <= position <= limit")
        self._fd = fd
        self._position = position
        self._limit = limit
        self._other = other
        self._stopped = False
        self._error = 0
        self._checksum = new_checksum()
        self.writing = False

    @property
    def position(self) -> int:
        return self._position

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        if value < self._position:
            raise ValueError("limit must not be below what is already written")
        self._limit = value

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def error(self) -> int:
        return self._error

    def __call__(self, data: bytes, /) -> Answer:
        if self._stopped:
            return 0
        if not self.writing:
            return self._other(data)
        view = memoryview(data)[: self._limit - self._position]
        taken = 0
        while view:
            try:
                written = os.pwrite(self._fd, view, self._position)
            except OSError as exc:
                return self._fail(exc.errno or errno.EIO)
            if written == 0:
                return self._fail(errno.EIO)  # a regular file never takes nothing: no spinning
            self._checksum.update(view[:written])
            self._position += written
            taken += written
            view = view[written:]
        # Bytes past the (possibly lowered) limit belong to another chunk: stop here.
        return None if taken == len(data) else 0

    def _fail(self, code: int) -> int:
        self._error = code
        self._stopped = True
        return 0

    def stop(self) -> None:
        self._stopped = True

    def hexdigest(self) -> str:
        return self._checksum.hexdigest()


def new_chunk_writer(
    fd: int, position: int, limit: int, other: Other, backend: str | None = None
) -> ChunkWriter:
    """A :class:`ChunkWriter` for bytes ``[position, limit)`` of the open file ``fd`` (which
    stays the caller's to close), answering with ``other`` until told it is ``writing``.

    ``backend`` is ``"native"``, ``"python"``, or ``None`` for :data:`hashing.BACKEND`;
    :class:`ValueError` for one not in :data:`hashing.AVAILABLE_BACKENDS`.
    """
    if backend is None:
        backend = hashing.BACKEND
    elif backend not in hashing.AVAILABLE_BACKENDS:
        raise ValueError(
            f"backend {backend!r} is not available (have: {', '.join(hashing.AVAILABLE_BACKENDS)})"
        )
    if backend == "native":
        from fastpull import _native

        return _native.ChunkWriter(fd, position, limit, other)
    return PythonChunkWriter(fd, position, limit, other)
