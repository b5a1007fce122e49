"""Downloading one blob into ``ingest/``: the files of an ingest, its lock, and its commit.

Every ingest of a digest uses the files ``<root>/ingest/<alg>-<hex>.*`` (see
:class:`IngestPaths`): ``.lock`` (flock'ed while a process downloads the digest, deleted
on exit), ``.data`` (the bytes, at their offsets) and ``.journal`` (which ranges of
``.data`` are finished, see :mod:`fastpull.store.journal`); small blobs written from memory
pass through ``.<token>.tmp`` files. Other tools reading the layout ignore ``ingest/``.

A blob enters ``blobs/`` only through :meth:`Ingest.commit`, after its digest and size
matched and its data was fsynced, by the store's rename (:meth:`BlobStore.publish`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from fastpull.errors import DigestMismatch
from fastpull.store.diskqueue import release_pages
from fastpull.store.files import os_errors, store_error
from fastpull.store.journal import Extent, Journal
from fastpull.store.locks import delete_and_unlock, lock_file
from fastpull.types import Digest

# <alg>-<hex>: the name of one digest's ingest, and <name>.<anything>: one of its files.
_NAME = re.compile(r"[a-z0-9]+-[0-9a-f]+")
_FILE_NAME = re.compile(rf"({_NAME.pattern})\.(.+)")
# Ingest lock files this process holds.
_HELD: set[Path] = set()


@dataclass(frozen=True)
class IngestPaths:
    """Where the files of one digest's ingest are: ``<directory>/<name>.*``."""

    directory: Path
    name: str

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"not an ingest name: {self.name!r}")

    @classmethod
    def of(cls, root: Path, digest: Digest) -> IngestPaths:
        """The ingest files of ``digest`` in the store at ``root``."""
        return cls(root / "ingest", f"{digest.algorithm}-{digest.hex}")

    @classmethod
    def named(cls, root: Path, name: str) -> IngestPaths:
        """The ingest files called ``name`` (``<alg>-<hex>``); ValueError for other names."""
        return cls(root / "ingest", name)

    @property
    def data(self) -> Path:
        """The downloaded bytes, at their offsets in the blob."""
        return self.directory / f"{self.name}.data"

    @property
    def journal(self) -> Path:
        """Which ranges of :attr:`data` are finished."""
        return self.directory / f"{self.name}.journal"

    @property
    def lock(self) -> Path:
        """flock'ed exclusively by the process downloading the digest."""
        return self.directory / f"{self.name}.lock"

    def new_temp(self) -> Path:
        """A fresh name for a temp file of this digest that no other writer uses."""
        return self.directory / f"{self.name}.{os.urandom(8).hex()}.tmp"

    def owns(self, filename: str) -> bool:
        """Whether ``filename`` (in :attr:`directory`) is one of this ingest's files."""
        return filename.startswith(f"{self.name}.")


def ingest_name(filename: str) -> str | None:
    """The ingest (``<alg>-<hex>``) a file in ``ingest/`` belongs to; None if none."""
    match = _FILE_NAME.fullmatch(filename)
    return match[1] if match else None


class BlobStore(Protocol):
    """What an ingest needs of its store (:class:`fastpull.store.layout.Store` has it)."""

    root: Path

    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        """Whether the blob is stored (with that size, if given)."""

    def publish(self, source: Path, digest: Digest) -> None:
        """Rename a verified, fsynced file into ``blobs/`` (durable before an image names it)."""


class Ingest:
    """One blob being downloaded into ``ingest/``; made by :meth:`Store.ingest`.

    Entering takes the digest's ingest lock, waiting while another process holds it. After
    entering, ``present`` tells whether the blob was already stored; otherwise
    :attr:`resumed` lists the ranges an earlier, interrupted download left that still match
    their checksums, and the caller fetches only the rest. An ingest left without
    :meth:`commit` keeps its data and journal for the next run, unless :meth:`discard` threw
    them away.

    One process must not enter two ingests of the same digest at once: flock would make it
    wait for itself forever, so that raises RuntimeError instead.
    """

    def __init__(self, store: BlobStore, digest: Digest, size: int) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.paths = IngestPaths.of(store.root, digest)
        self.path = self.paths.data
        self.journal_path = self.paths.journal
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._journal: Journal | None = None
        self.present = False
        self.committed = False

    def __enter__(self) -> Ingest:
        lock = self.paths.lock
        if lock in _HELD:
            raise RuntimeError(f"this process is already ingesting {self.digest}")
        with os_errors(self.store.root, f"lock {lock.name}"):
            self._lock_fd = lock_file(lock)
        _HELD.add(lock)
        try:
            if self.store.has_blob(self.digest, self.size):
                self.present = True
                self.discard()  # what a run killed after its commit left behind
            else:
                self._open()
        except BaseException:
            self._close()
            self._release_lock()
            raise
        return self

    def _open(self) -> None:
        with os_errors(self.store.root, f"open {self.path.name}"):
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._journal = Journal.resume(self.journal_path, self.digest, self.size, self._fd)
            if not self._journal.extents:
                os.ftruncate(self._fd, 0)  # stale bytes nobody vouches for

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._journal is not None and not self._journal.extents:
            self.discard()  # nothing finished: nothing worth keeping
        self._close()
        self._release_lock()

    @property
    def fd(self) -> int:
        """The data file, open read-write, for ``os.pwrite`` at any offset."""
        if self._fd is None:
            raise RuntimeError(f"ingest of {self.digest} is not open for writing")
        return self._fd

    @property
    def resumed(self) -> tuple[Extent, ...]:
        """Finished ranges found in the journal (checked against the data) at entry."""
        return tuple(self._journal.extents) if self._journal is not None else ()

    @property
    def etag(self) -> str | None:
        """The server's validator for the journaled bytes, if one was recorded."""
        return self._journal.etag if self._journal is not None else None

    def preallocate(self) -> None:
        """Reserve ``size`` bytes now, so a full disk fails here and not mid-download."""
        if self.size == 0:
            return
        try:
            try:
                os.posix_fallocate(self.fd, 0, self.size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                # The file system cannot reserve space; a sparse file of the right size will do.
                os.ftruncate(self.fd, self.size)
        except OSError as exc:
            raise store_error(exc, self.store.root, "preallocate", need=self.size) from exc

    def record(self, extent: Extent) -> None:
        """Journal a finished range of the data file (durable after :meth:`journal_sync`)."""
        with os_errors(self.store.root, f"write {self.journal_path.name}"):
            self._open_journal().record(extent)

    def journal_sync(self) -> Callable[[], None] | None:
        """A call, safe on any thread, that makes the journal records written so far
        durable (raising StoreError); None if there is nothing to sync."""
        sync = self._journal.detach_sync() if self._journal is not None else None
        if sync is None:
            return None
        root, action = self.store.root, f"sync {self.journal_path.name}"

        def durable() -> None:
            with os_errors(root, action):
                sync()

        return durable

    def record_etag(self, etag: str) -> None:
        """Journal the validator the server sent with the blob's bytes."""
        with os_errors(self.store.root, f"write {self.journal_path.name}"):
            self._open_journal().record_etag(etag)

    def restart(self) -> None:
        """Forget every journaled range: the blob is being fetched again from byte 0."""
        with os_errors(self.store.root, f"write {self.journal_path.name}"):
            self._open_journal().reset()

    def _open_journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError(f"ingest of {self.digest} is not open for writing")
        return self._journal

    def commit(self, actual_hex: str) -> None:
        """Move the data into ``blobs/``, given the hex digest the caller computed over it.

        Raises DigestMismatch, deleting the data, if ``actual_hex`` is not the expected
        digest or the file is not exactly ``size`` bytes long.
        """
        fd = self.fd
        if actual_hex != self.digest.hex:
            self.discard()
            raise DigestMismatch(
                f"downloaded blob does not match its digest: expected {self.digest}, "
                f"got {self.digest.algorithm}:{actual_hex[:128]}",
                expected=str(self.digest),
                actual=f"{self.digest.algorithm}:{actual_hex[:128]}",
            )
        root = self.store.root
        with os_errors(root, f"commit blob {self.digest}"):
            written = os.fstat(fd).st_size
        if written != self.size:
            self.discard()
            raise DigestMismatch(
                f"downloaded blob {self.digest} is {written} bytes, expected {self.size}",
                expected=str(self.digest),
                expected_size=self.size,
                actual_size=written,
            )
        with os_errors(root, f"commit blob {self.digest}"):
            os.fsync(fd)
            # Clean now: free the pages for whatever is written next.
            release_pages(fd, 0, self.size)
            self.store.publish(self.path, self.digest)
        self.committed = True
        self.discard()  # only the journal and the descriptor are left to drop

    def discard(self) -> None:
        """Close and delete the data and its journal (nothing of them is worth keeping)."""
        self._close(keep=False)
        self._journal = None
        # Best effort: this runs while an exception may be propagating, and leftovers
        # are harmless (a journal without its data resumes nothing).
        for path in (self.journal_path, self.path):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _close(self, *, keep: bool = True) -> None:
        """Close the files, with the journal synced if they are ``keep`` for the next run."""
        if self._journal is not None:
            # A failed sync loses at most the newest records: their ranges come again.
            with contextlib.suppress(OSError):
                self._journal.close(sync=keep)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        _HELD.discard(self.paths.lock)
        # A lock file left behind is harmless, and an exception may be propagating.
        with contextlib.suppress(OSError):
            delete_and_unlock(fd, self.paths.lock)


__all__ = ["BlobStore", "Ingest", "IngestPaths", "ingest_name"]
