"""The resume journal of an ingest: which byte ranges of the data file are finished.

One file per ingest (``ingest/<alg>-<hex>.journal``), JSON lines appended as chunks finish
and synced soon after (by whoever runs the ingest, see :meth:`Journal.detach_sync`)::

    {"journal":1,"digest":"sha256:...","size":1073741824}
    {"etag":"\\"sha256:...\\""}
    {"start":0,"end":67108864,"xxh3":"<xxh3-128 hex>"}

The first line names the blob; an ``etag`` line records the validator the server sent
with the bytes; every other line is a finished range with the xxh3-128 checksum of its
bytes, computed by the worker as it wrote them. A process killed mid-append leaves at
most a torn last line, which reading stops at. On resume every range is checked against
the data file again (xxh3 is fast enough to re-read gigabytes in seconds), ranges that
fail are dropped, and the journal is rewritten with what survived. Nothing here is
trusted for correctness: the blob's SHA-256 still covers every byte before it becomes
visible in ``blobs/``; the journal only decides what need not be fetched again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import orjson
import xxhash

from fastpull.types import Digest

VERSION = 1
# A journal holds a few lines per chunk; anything bigger is not one of ours.
MAX_JOURNAL_SIZE = 16 << 20
_READ_STEP = 4 << 20


class Extent(NamedTuple):
    """Bytes ``[start, end)`` of the data file, finished, with their xxh3-128 checksum."""

    start: int
    end: int
    xxh3: str

    @property
    def length(self) -> int:
        return self.end - self.start


class JournalState(NamedTuple):
    """What a journal file says: the server's validator and the finished ranges."""

    etag: str | None
    extents: tuple[Extent, ...]

    @property
    def covered(self) -> int:
        """Bytes the finished ranges cover."""
        return sum(e.length for e in self.extents)


def new_checksum() -> xxhash.xxh3_128:
    """The running checksum a writer keeps over the bytes of one extent, in order."""
    return xxhash.xxh3_128()


def _header(digest: Digest, size: int) -> bytes:
    return orjson.dumps({"journal": VERSION, "digest": str(digest), "size": size}) + b"\n"


def _extent_line(extent: Extent) -> bytes:
    return orjson.dumps({"start": extent.start, "end": extent.end, "xxh3": extent.xxh3}) + b"\n"


def _etag_line(etag: str) -> bytes:
    return orjson.dumps({"etag": etag}) + b"\n"


def _is_checksum(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    )


def parse(data: bytes, digest: Digest, size: int) -> JournalState | None:
    """Read a journal's bytes; None unless it is a journal of exactly this blob.

    Reading stops at the first line that is not a complete, valid record (a torn write
    from a killed process). Ranges outside the blob or overlapping an earlier range are
    dropped: they cannot come from a correct writer.
    """
    lines = data.split(b"\n")
    try:
        header = orjson.loads(lines[0])
    except orjson.JSONDecodeError:
        return None
    if header != {"journal": VERSION, "digest": str(digest), "size": size}:
        return None
    etag: str | None = None
    extents: list[Extent] = []
    # The last element is what follows the final newline: empty, or a torn record.
    for line in lines[1:-1]:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            break
        if not isinstance(record, dict):
            break
        if set(record) == {"etag"} and isinstance(record["etag"], str):
            etag = record["etag"]
            continue
        start, end, checksum = record.get("start"), record.get("end"), record.get("xxh3")
        if (
            set(record) != {"start", "end", "xxh3"}
            or type(start) is not int
            or type(end) is not int
            or not _is_checksum(checksum)
        ):
            break
        if 0 <= start < end <= size:
            extents.append(Extent(start, end, str(checksum)))
    return JournalState(etag, _disjoint(extents))


def _disjoint(extents: Iterable[Extent]) -> tuple[Extent, ...]:
    kept: list[Extent] = []
    for extent in sorted(extents):
        if not kept or extent.start >= kept[-1].end:
            kept.append(extent)
    return tuple(kept)


def checksum_range(fd: int, start: int, end: int) -> str:
    """The xxh3-128 of bytes ``[start, end)`` of a file ('' if the file is shorter)."""
    hasher = new_checksum()
    position = start
    while position < end:
        data = os.pread(fd, min(_READ_STEP, end - position), position)
        if not data:
            return ""
        hasher.update(data)
        position += len(data)
    return hasher.hexdigest()


class Journal:
    """The open journal of one ingest; each record is written before :meth:`record`
    returns, and synced by a job from :meth:`detach_sync` or on :meth:`close`.

    File errors surface as OSError: the store, which owns ingests, turns them into
    errors that name the store.
    """

    def __init__(self, path: Path, digest: Digest, size: int, state: JournalState) -> None:
        self.path = path
        self.digest = digest
        self.size = size
        self.etag = state.etag
        self.extents: list[Extent] = list(state.extents)
        self._fd: int | None = None
        self._dirty = False
        # A journal with no records vouches for nothing: if a power cut loses it, the next
        # run resumes nothing, which is all it would have resumed anyway. So a new ingest's
        # journal is not fsynced (one sync less per blob before its first byte); records
        # appended later are synced as always (detach_sync, close).
        self._rewrite(durable=bool(self.extents) or self.etag is not None)

    @classmethod
    def resume(cls, path: Path, digest: Digest, size: int, data_fd: int) -> Journal:
        """Open the journal at ``path`` for the ingest whose data file is ``data_fd``.

        Ranges whose bytes no longer match their checksum are dropped; a missing,
        foreign or unreadable journal means nothing is resumed.
        """
        state = JournalState(None, ())
        with contextlib.suppress(FileNotFoundError):
            with path.open("rb") as fh:
                data = fh.read(MAX_JOURNAL_SIZE + 1)
            if len(data) <= MAX_JOURNAL_SIZE:
                state = parse(data, digest, size) or state
        intact = tuple(
            e for e in state.extents if checksum_range(data_fd, e.start, e.end) == e.xxh3
        )
        return cls(path, digest, size, JournalState(state.etag, intact))

    @property
    def state(self) -> JournalState:
        """What the journal holds now."""
        return JournalState(self.etag, tuple(self.extents))

    def record(self, extent: Extent) -> None:
        """Add a finished range."""
        self.extents.append(extent)
        self._append(_extent_line(extent))

    def record_etag(self, etag: str) -> None:
        """Remember the server's validator for the blob's bytes."""
        self.etag = etag
        self._append(_etag_line(etag))

    def reset(self) -> None:
        """Forget every range (the blob is fetched again from scratch)."""
        self.etag = None
        self.extents.clear()
        self._rewrite()

    def detach_sync(self) -> Callable[[], None] | None:
        """A call that makes every record written so far durable, or None if there is
        nothing to sync. It holds its own file descriptor, so any thread may run it,
        also after this journal is closed."""
        if self._fd is None or not self._dirty:
            return None
        self._dirty = False
        return _sync_then_close(os.dup(self._fd))

    def close(self, *, sync: bool = True) -> None:
        """Close the file, synced first unless the caller is about to delete it."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if self._dirty and sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)

    def _rewrite(self, *, durable: bool = True) -> None:
        """Replace the file atomically with the header and the current records (fsynced
        before the rename when ``durable``)."""
        self.close()
        body = _header(self.digest, self.size)
        if self.etag is not None:
            body += _etag_line(self.etag)
        body += b"".join(_extent_line(e) for e in self.extents)
        temp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, body)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def _append(self, line: bytes) -> None:
        if self._fd is None:
            raise RuntimeError(f"journal of {self.digest} is closed")
        _write_all(self._fd, line)
        self._dirty = True


def _sync_then_close(fd: int) -> Callable[[], None]:
    def sync() -> None:
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    return sync


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


__all__ = ["Extent", "Journal", "JournalState", "checksum_range", "new_checksum", "parse"]
