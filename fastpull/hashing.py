"""Digest computation: one place that picks the hashing backend.

SHA-256 and SHA-512 come from one of two backends with identical results:

``native``
    The C extension :mod:`fastpull._native` (OpenSSL libcrypto). Its
    :func:`hash_fd_range` reads the file with ``pread`` and hashes it without holding
    the GIL, which is what lets the download engine verify data as it lands.
``python``
    :mod:`hashlib`, with a Python ``os.pread`` loop for :func:`hash_fd_range`.

BLAKE3 always comes from the ``blake3`` package, whatever the backend.

Environment variables, read once at import:

``FASTPULL_NATIVE=0``
    Make ``python`` the default backend even when the extension is available, to
    compare the two. ``backend="native"`` can still be asked for explicitly.
``FASTPULL_REQUIRE_NATIVE=1``
    Importing this module fails if the extension cannot be imported, instead of
    silently falling back (CI sets it).
"""

from __future__ import annotations

import os
from typing import Protocol

# Bytes read per pread() call by the Python fallback (the extension uses the same size).
_READ_SIZE = 1 << 20
# hash_file() hashes in slices of this size so that Ctrl-C is noticed between them.
_FILE_SLICE = 1 << 28
# Largest off_t: offset + length must stay below it.
_MAX_OFFSET = (1 << 63) - 1

try:
    from fastpull import _native
except ImportError as exc:
    if os.environ.get("FASTPULL_REQUIRE_NATIVE") == "1":
        raise ImportError(
            "fastpull was built without its native extension; FASTPULL_REQUIRE_NATIVE=1 "
            "requires it: run `python setup.py build_ext --inplace` or reinstall"
        ) from exc
    _native = None

AVAILABLE_BACKENDS: tuple[str, ...] = ("python",) if _native is None else ("native", "python")
"""Backends that :func:`new_hasher` accepts in this process."""

BACKEND: str = (
    "native" if _native is not None and os.environ.get("FASTPULL_NATIVE") != "0" else "python"
)
"""Default backend for SHA-256 / SHA-512: ``"native"`` or ``"python"``."""

BACKEND_DETAIL: str = _native.BACKEND_INFO if BACKEND == "native" else "hashlib"
"""What the default backend runs on, for ``--version`` output and bug reports."""

ALGORITHMS: tuple[str, ...] = ("sha256", "sha512", "blake3")
"""Algorithms :func:`new_hasher` knows."""


class Hasher(Protocol):
    """What every hasher returned by :func:`new_hasher` provides (hashlib's interface)."""

    @property
    def name(self) -> str:
        """Algorithm name, e.g. ``"sha256"``."""
        ...

    @property
    def digest_size(self) -> int:
        """Length of :meth:`digest` in bytes."""
        ...

    def update(self, data: bytes | bytearray | memoryview, /) -> object:
        """Hash more bytes. The return value means nothing (blake3 returns itself)."""
        ...

    def digest(self) -> bytes:
        """Digest of everything hashed so far; the hasher can keep being updated."""
        ...

    def hexdigest(self) -> str:
        """:meth:`digest` as lowercase hex."""
        ...

    def copy(self) -> Hasher:
        """An independent hasher in the same state."""
        ...


def new_hasher(algorithm: str, backend: str | None = None) -> Hasher:
    """Return a fresh hasher for ``algorithm`` (``"sha256"``, ``"sha512"`` or ``"blake3"``).

    ``backend`` picks the SHA-2 implementation: ``"native"``, ``"python"``, or ``None`` for
    :data:`BACKEND`. It is ignored for BLAKE3. Raises :class:`ValueError` for an unknown
    algorithm or a backend not in :data:`AVAILABLE_BACKENDS`.
    """
    if backend is None:
        backend = BACKEND
    elif backend not in AVAILABLE_BACKENDS:
        raise ValueError(
            f"hashing backend {backend!r} is not available (have: {', '.join(AVAILABLE_BACKENDS)})"
        )
    # hashlib and blake3 are imported when asked for: with the extension, a pull of SHA-256
    # blobs (all of them, in practice) uses neither.
    if algorithm == "blake3":
        import blake3

        return blake3.blake3()
    if algorithm not in ("sha256", "sha512"):
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    if backend == "native":
        assert _native is not None  # AVAILABLE_BACKENDS guarantees it
        return _native.SHA256() if algorithm == "sha256" else _native.SHA512()
    import hashlib

    return hashlib.new(algorithm)


def hash_fd_range(
    hasher: Hasher, fd: int, offset: int, length: int, *, mapped: bool = False
) -> int:
    """Feed bytes ``[offset, offset + length)`` of the open file ``fd`` into ``hasher``.

    Reads with ``pread``, so the file position of ``fd`` is left alone. Stops early at end
    of file and returns the number of bytes hashed; a count below ``length`` means the
    file is shorter than the range. Native hashers are fed by the extension without the
    GIL; any other hasher by a Python loop with the same semantics.

    ``mapped=True`` lets a native hasher read the bytes through ``mmap`` instead, hashing
    them where they lie in the page cache rather than copying them out (SHA-256 of a cached
    1 GiB file in 16 MiB steps: 0.78 against 0.86 CPU s/GB). Only for a file the caller owns:
    one that shrinks while it is mapped kills the process with SIGBUS, and an I/O error does
    the same instead of raising. Results are the same either way.

    Raises :class:`ValueError` for a negative ``offset`` or ``length`` (or a range past
    the largest file offset) and :class:`OSError` when reading fails.
    """
    if _native is not None and isinstance(hasher, (_native.SHA256, _native.SHA512)):
        return _native.hash_fd_range(hasher, fd, offset, length, mapped)
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    if offset > _MAX_OFFSET - length:
        raise ValueError("offset + length is beyond the largest file offset")
    hashed = 0
    while hashed < length:
        chunk = os.pread(fd, min(length - hashed, _READ_SIZE), offset + hashed)
        if not chunk:
            break
        hasher.update(chunk)
        hashed += len(chunk)
    return hashed


def hash_file(path: str | os.PathLike[str], algorithm: str, backend: str | None = None) -> str:
    """Return the hex digest of the whole file at ``path`` (read up to end of file)."""
    hasher = new_hasher(algorithm, backend)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while True:
            hashed = hash_fd_range(hasher, fd, offset, _FILE_SLICE)
            offset += hashed
            if hashed < _FILE_SLICE:
                break
    finally:
        os.close(fd)
    return hasher.hexdigest()
