"""The archive tar reader and writer: round trips, and nothing but ArchiveError on garbage."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpull.archive.tarstream import (
    END_OF_ARCHIVE,
    FILE,
    MAX_RECORD,
    TarReader,
    link_target,
    member_header,
    padding,
    safe_name,
)
from fastpull.errors import ArchiveError

_component = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=40)
_names = (
    st.lists(_component, min_size=1, max_size=6)
    .map("/".join)
    .filter(lambda n: all(p not in (".", "..") for p in n.split("/")))
)


def _archive(members: list[tuple[str, bytes]]) -> bytes:
    out = b""
    for name, data in members:
        out += member_header(name, len(data)) + data + padding(len(data))
    return out + END_OF_ARCHIVE


def _read_all(data: bytes, chunk: int = 7) -> list[tuple[str, str, bytes]]:
    reader = TarReader(io.BytesIO(data), chunk)
    return [(m.name, m.kind, b"".join(reader.data())) for m in reader.members()]


@given(st.dictionaries(_names, st.binary(max_size=2000), max_size=6))
def test_what_is_written_reads_back(members: dict[str, bytes]) -> None:
    items = sorted(members.items())
    assert _read_all(_archive(items)) == [(n, FILE, d) for n, d in items]


@given(st.dictionaries(_names, st.binary(max_size=600), max_size=4))
def test_python_tarfile_archives_read_the_same(members: dict[str, bytes]) -> None:
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
            for name, data in sorted(members.items()):
                if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        expected = [
            (n, FILE, d)
            for n, d in sorted(members.items())
            if fmt != tarfile.USTAR_FORMAT or len(n) <= 100
        ]
        assert _read_all(out.getvalue()) == expected


def test_headers_are_deterministic_and_carry_no_owner() -> None:
    header = member_header("blobs/sha256/" + "a" * 64, 12345)
    assert header == member_header("blobs/sha256/" + "a" * 64, 12345)
    info = tarfile.TarInfo.frombuf(header[:512], "utf-8", "strict")
    assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (
        0,
        0,
        0,
        "",
        "",
        0o644,
    )
    # Sizes past ustar's 8 GiB go into a PAX record that Go and Python read.
    big = member_header("big", 9 << 30)
    assert len(big) > 512
    reader = TarReader(io.BytesIO(big))
    assert next(reader.members()).size == 9 << 30


@settings(max_examples=300)
@given(
    st.dictionaries(_names, st.binary(max_size=700), min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(0, 10_000),
)
def test_damaged_archives_raise_only_archive_error(
    members: dict[str, bytes], flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_archive(sorted(members.items())))
    for position, value in flips:
        if position < len(data):
            data[position] = value
    damaged = bytes(data[: max(cut, 1)] if cut < len(data) else data)
    try:
        for name, _, _ in _read_all(damaged):
            assert not name.startswith("/") and ".." not in name.split("/")
    except ArchiveError:
        pass


@given(st.text(max_size=60))
def test_safe_names_stay_inside(name: str) -> None:
    try:
        safe = safe_name(name)
    except ArchiveError:
        return
    parts = safe.split("/")
    assert not safe.startswith("/") and ".." not in parts and "" not in parts and "." not in parts


@pytest.mark.parametrize(
    ("member", "link", "kind", "expected"),
    [
        ("a/b/layer.tar", "../c/layer.tar", "symlink", "a/c/layer.tar"),
        ("a/layer.tar", "b/layer.tar", "hardlink", "b/layer.tar"),
        ("a/layer.tar", "../../etc/passwd", "symlink", None),
        ("a/layer.tar", "/etc/passwd", "symlink", None),
        ("layer.tar", "../x", "hardlink", None),
    ],
)
def test_link_targets_resolve_inside_the_archive_or_are_refused(
    member: str, link: str, kind: str, expected: str | None
) -> None:
    if expected is None:
        with pytest.raises(ArchiveError):
            link_target(member, link, kind)
    else:
        assert link_target(member, link, kind) == expected


def test_oversize_extended_headers_are_refused_before_reading_them() -> None:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = MAX_RECORD + 1
    stream = io.BytesIO(info.tobuf(tarfile.USTAR_FORMAT))
    with pytest.raises(ArchiveError, match="extended header"):
        list(TarReader(stream).members())
