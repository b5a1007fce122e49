"""Properties of the worker's Range handling, fed straight through the callbacks libcurl
calls (``WorkerLoop._on_header`` and the transfer's ``writer``), with hypothesis choosing the
server's answer.

What the engine relies on (``fastpull/worker.py``'s invariants): bytes are written only from
a 206 whose ``Content-Range`` names exactly the range asked for (or a 200 to a request
without ``Range``), at their offset, never at or past the chunk's (possibly shrunk) end.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpull.engine.worker import Fetch, WorkerLoop, _Transfer
from fastpull.errors import ProtocolError
from fastpull.registry.transport import TLSConfig

SENTINEL = 0xA5


@pytest.fixture(scope="module")
def loop() -> Iterator[WorkerLoop]:
    worker = WorkerLoop()
    yield worker
    worker.close()


@st.composite
def requests(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(start, end, total, limit): bytes [start, end) of a total-byte blob, shrunk to limit."""
    total = draw(st.integers(1, 5000))
    start = draw(st.integers(0, total - 1))
    end = draw(st.integers(start + 1, total))
    limit = draw(st.integers(start, end))
    return start, end, total, limit


# Header text as libcurl hands it over (bytes read as latin-1), one line.
_HEADER_TEXT = st.text(st.characters(max_codepoint=255, exclude_characters="\r\n"))


def content_ranges(start: int, end: int, total: int) -> st.SearchStrategy[str | None]:
    """What a server may put in Content-Range: right, nearly right, or anything."""
    numbers = st.integers(0, 2 * total)
    exact = f"bytes {start}-{end - 1}/"
    return st.one_of(
        st.just(exact + str(total)),
        st.just(exact + "*"),
        st.builds(lambda t: exact + str(t), numbers),
        st.builds(lambda a, b: f"bytes {a}-{b}/{total}", numbers, numbers),
        st.builds(lambda s: exact + s, _HEADER_TEXT.filter(lambda s: len(s) <= 12)),
        _HEADER_TEXT.filter(lambda s: len(s) <= 30),
        st.none(),
    )


def _accepted_by_the_rules(status: int, ranged: bool, header: str | None, fetch: Fetch) -> bool:
    if status == 200:
        return not ranged
    if status != 206 or header is None:
        return False
    header = header.strip()  # surrounding whitespace is not part of a header's value
    prefix = f"bytes {fetch.start}-{fetch.end - 1}/"
    return header.startswith(prefix) and header.rpartition("/")[2] in ("*", str(fetch.total))


# (status, asked start, end, total, Content-Range, accepted): written out by hand, so the
# rules above are checked against something they did not copy.
ACCEPTANCE = [
    (200, 0, 1000, 1000, None, True),  # no Range asked: the whole blob
    (200, 100, 200, 1000, None, False),  # Range ignored: the wrong bytes
    (206, 100, 200, 1000, "bytes 100-199/1000", True),
    (206, 100, 200, 1000, "bytes 100-199/*", True),  # size unknown to the server
    (206, 100, 200, 1000, "  bytes 100-199/1000 ", True),  # spaces are not the value
    (206, 0, 1000, 1000, "bytes 0-999/1000", True),
    (206, 100, 200, 1000, None, False),
    (206, 100, 200, 1000, "bytes 100-199/999", False),
    (206, 100, 200, 1000, "bytes 100-199/1000x", False),
    (206, 100, 200, 1000, "bytes 100-200/1000", False),
    (206, 100, 200, 1000, "bytes 100-1999/1000", False),
    (206, 100, 200, 1000, "bytes 0-199/1000", False),
    (206, 100, 200, 1000, "bytes 101-199/1000", False),
    (206, 100, 200, 1000, "bytes=100-199/1000", False),
    (416, 100, 200, 1000, "bytes */1000", False),
    (500, 100, 200, 1000, None, False),
]


@pytest.mark.parametrize(("status", "start", "end", "total", "header", "accepted"), ACCEPTANCE)
def test_acceptance_follows_the_table(
    loop: WorkerLoop,
    status: int,
    start: int,
    end: int,
    total: int,
    header: str | None,
    accepted: bool,
) -> None:
    fetch = Fetch(1, "http://registry.invalid/blob", (), "", start, end, total, TLSConfig())
    assert _accepted_by_the_rules(status, fetch.ranged, header, fetch) == accepted
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        transfer = _Transfer(fetch, fd, None)  # type: ignore[arg-type]
        loop._on_header(transfer, f"HTTP/1.1 {status} X\r\n".encode())
        if header is not None:
            loop._on_header(transfer, f"Content-Range: {header}\r\n".encode())
        loop._on_header(transfer, b"\r\n")
    finally:
        os.close(fd)
    assert bool(transfer.accepted) == accepted
    assert transfer.writer.writing == accepted


@settings(max_examples=1000, deadline=None)
@given(data=st.data(), span=requests(), status=st.sampled_from([200, 206, 416, 500]))
def test_bytes_land_only_where_and_when_the_answer_says(
    loop: WorkerLoop, data: st.DataObject, span: tuple[int, int, int, int], status: int
) -> None:
    start, end, total, limit = span
    header = data.draw(content_ranges(start, end, total), label="Content-Range")
    body = data.draw(st.binary(max_size=2 * (end - start) + 8), label="body")
    pieces = data.draw(st.integers(1, 4), label="pieces")
    fetch = Fetch(1, "http://registry.invalid/blob", (), "", start, end, total, TLSConfig())
    with tempfile.TemporaryFile() as file:
        file.write(bytes([SENTINEL]) * total)
        file.flush()
        transfer = _Transfer(fetch, file.fileno(), None)  # type: ignore[arg-type]
        transfer.writer.limit = limit  # a Shrink
        loop._on_header(transfer, f"HTTP/1.1 {status} X\r\n".encode())
        if header is not None:
            loop._on_header(transfer, f"Content-Range: {header}\r\n".encode("latin-1"))
        loop._on_header(transfer, b"\r\n")
        step = max(1, len(body) // pieces)
        for offset in range(0, len(body), step):
            if transfer.writer(body[offset : offset + step]) == 0:
                break  # libcurl aborts the transfer here
        file.seek(0)
        stored = file.read()

    expected = _accepted_by_the_rules(status, fetch.ranged, header, fetch)
    assert bool(transfer.accepted) == expected
    written = transfer.position - start
    assert 0 <= written <= limit - start
    assert stored[:start] == bytes([SENTINEL]) * start
    assert stored[start + written :] == bytes([SENTINEL]) * (total - start - written)
    if expected:
        assert stored[start : start + written] == body[:written]
        assert written == min(len(body), limit - start)
    else:
        assert written == 0
    if status == 206 and not expected:
        assert isinstance(transfer.failure, ProtocolError)
        assert "Content-Range" in str(transfer.failure)


def test_open_ended_and_multipart_answers_are_refused(loop: WorkerLoop) -> None:
    fetch = Fetch(1, "http://registry.invalid/blob", (), "", 100, 200, 1000, TLSConfig())
    for header in ("bytes 100-999/1000", "bytes 100-199,300-399/1000", "items 100-199/1000"):
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            transfer = _Transfer(fetch, fd, None)  # type: ignore[arg-type]
            loop._on_header(transfer, b"HTTP/1.1 206 Partial Content\r\n")
            loop._on_header(transfer, f"Content-Range: {header}\r\n".encode())
            loop._on_header(transfer, b"\r\n")
            assert transfer.writer(b"x" * 100) == 0
        finally:
            os.close(fd)
        assert transfer.accepted is False
        assert transfer.position == 100
