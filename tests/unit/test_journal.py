"""The resume journal: its file format, torn writes, and re-checking ranges against data."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import orjson
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpull.store.journal import Extent, Journal, checksum_range, parse
from fastpull.types import Digest

DIGEST = Digest.parse("sha256:" + "ab" * 32)
SIZE = 1000


def _extent(start: int, end: int, data: bytes | None = None) -> Extent:
    piece = data[start:end] if data is not None else bytes(end - start)
    return Extent(start, end, xxhash.xxh3_128_hexdigest(piece))


def _header(digest: Digest = DIGEST, size: int = SIZE) -> bytes:
    return orjson.dumps({"journal": 1, "digest": str(digest), "size": size}) + b"\n"


def _line(record: object) -> bytes:
    return orjson.dumps(record) + b"\n"


def _new_journal(path: Path) -> Journal:
    """A journal at ``path`` for a data file of zeros beside it (nothing to resume)."""
    data = path.with_suffix(".data")
    data.write_bytes(bytes(SIZE))
    fd = os.open(data, os.O_RDONLY)
    try:
        return Journal.resume(path, DIGEST, SIZE, fd)
    finally:
        os.close(fd)


def test_parse_reads_the_etag_and_ranges_in_order() -> None:
    a, b = _extent(500, 700), _extent(0, 100)
    data = (
        _header()
        + _line({"etag": '"v1"'})
        + _line({"start": a.start, "end": a.end, "xxh3": a.xxh3})
        + _line({"start": b.start, "end": b.end, "xxh3": b.xxh3})
    )
    state = parse(data, DIGEST, SIZE)
    assert state is not None
    assert state.etag == '"v1"'
    assert state.extents == (b, a)
    assert state.covered == 300


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"not json\n",
        _header(size=SIZE + 1),
        _header(Digest.parse("sha256:" + "cd" * 32)),
        orjson.dumps({"journal": 2, "digest": str(DIGEST), "size": SIZE}) + b"\n",
    ],
    ids=["empty", "garbage", "other-size", "other-digest", "other-version"],
)
def test_a_journal_of_anything_else_resumes_nothing(header: bytes) -> None:
    extent = _extent(0, 10)
    data = header + _line({"start": 0, "end": 10, "xxh3": extent.xxh3})
    assert parse(data, DIGEST, SIZE) is None


@pytest.mark.parametrize(
    "record",
    [
        {"start": -1, "end": 10},
        {"start": 10, "end": 10},
        {"start": 900, "end": SIZE + 1},
        {"start": 50, "end": 150},  # overlaps [0, 100)
    ],
    ids=["negative", "empty", "past-the-end", "overlapping"],
)
def test_impossible_ranges_are_dropped(record: dict[str, int]) -> None:
    good = _extent(0, 100)
    data = (
        _header()
        + _line({"start": 0, "end": 100, "xxh3": good.xxh3})
        + _line({**record, "xxh3": good.xxh3})
    )
    state = parse(data, DIGEST, SIZE)
    assert state is not None and state.extents == (good,)


@pytest.mark.parametrize(
    "line",
    [
        b'{"start": 0, "end": 10, "xxh3": "short"}\n',
        b'{"start": "0", "end": 10, "xxh3": "' + b"0" * 32 + b'"}\n',
        b'{"start": 0, "end": 10, "xxh3": "' + b"0" * 32 + b'", "more": 1}\n',
        b"[1, 2]\n",
        b"{torn",
    ],
    ids=["bad-checksum", "string-offset", "unknown-key", "not-an-object", "torn"],
)
def test_reading_stops_at_the_first_bad_record(line: bytes) -> None:
    first, later = _extent(0, 10), _extent(20, 30)
    data = (
        _header()
        + _line({"start": 0, "end": 10, "xxh3": first.xxh3})
        + line
        + _line({"start": 20, "end": 30, "xxh3": later.xxh3})
    )
    state = parse(data, DIGEST, SIZE)
    assert state is not None and state.extents == (first,)


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(0, SIZE), min_size=2, max_size=12, unique=True),
    torn_at=st.integers(0, 2000),
)
def test_a_write_torn_anywhere_keeps_exactly_the_whole_records_before_it(
    cuts: list[int], torn_at: int
) -> None:
    bounds = sorted(cuts)
    extents = [_extent(a, b) for a, b in itertools.pairwise(bounds)]
    lines = [_line({"start": e.start, "end": e.end, "xxh3": e.xxh3}) for e in extents]
    data = _header() + b"".join(lines)
    torn = data[: len(_header()) + min(torn_at, len(data) - len(_header()))]
    state = parse(torn, DIGEST, SIZE)
    assert state is not None
    whole = 0
    length = len(_header())
    for line in lines:
        length += len(line)
        if length > len(torn):
            break
        whole += 1
    assert state.extents == tuple(extents[:whole])


def test_resume_keeps_the_ranges_whose_bytes_still_match(tmp_path: Path) -> None:
    content = os.urandom(SIZE)
    data_path = tmp_path / "blob.data"
    data_path.write_bytes(content)
    path = tmp_path / "blob.journal"
    intact, damaged = _extent(0, 400, content), _extent(400, 800, content)
    path.write_bytes(
        _header()
        + _line({"etag": "e"})
        + _line({"start": 0, "end": 400, "xxh3": intact.xxh3})
        + _line({"start": 400, "end": 800, "xxh3": damaged.xxh3})
    )
    with data_path.open("r+b") as fh:
        fh.seek(500)
        fh.write(b"\x00" if content[500] else b"\x01")

    fd = os.open(data_path, os.O_RDONLY)
    try:
        journal = Journal.resume(path, DIGEST, SIZE, fd)
    finally:
        os.close(fd)
    assert journal.extents == [intact]
    assert journal.etag == "e"
    # The file was rewritten with what survived, and takes appends after it.
    journal.record(_extent(800, 1000, content))
    journal.close()
    state = parse(path.read_bytes(), DIGEST, SIZE)
    assert state is not None
    assert state.extents == (intact, _extent(800, 1000, content))


def test_reset_forgets_the_etag_and_every_range(tmp_path: Path) -> None:
    path = tmp_path / "blob.journal"
    journal = _new_journal(path)
    journal.record_etag("v1")
    journal.record(_extent(0, 10))
    journal.reset()
    journal.close()
    assert path.read_bytes() == _header()


def test_checksum_range_of_a_file_shorter_than_the_range(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert checksum_range(fd, 2, 8) == xxhash.xxh3_128_hexdigest(b"234567")
        assert checksum_range(fd, 5, 20) == ""
    finally:
        os.close(fd)


def test_a_detached_sync_covers_what_was_written_and_outlives_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blob.journal"
    journal = _new_journal(path)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda f: (synced.append(os.fstat(f).st_ino), real(f)))

    assert journal.detach_sync() is None  # nothing appended since the file was written
    journal.record(_extent(0, 10))
    sync = journal.detach_sync()
    assert sync is not None
    assert journal.detach_sync() is None  # already handed out
    journal.close()  # nothing new to sync: no fdatasync here
    assert synced == []

    sync()  # runs on its own descriptor, after the journal's is closed
    assert synced == [path.stat().st_ino]


def test_closing_for_deletion_skips_the_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = _new_journal(tmp_path / "kept.journal")
    dropped = _new_journal(tmp_path / "dropped.journal")
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda f: synced.append(os.fstat(f).st_ino))
    for journal in (kept, dropped):
        journal.record(_extent(0, 10))
    dropped.close(sync=False)
    kept.close()
    assert synced == [(tmp_path / "kept.journal").stat().st_ino]
