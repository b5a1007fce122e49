"""The chunk writers of ``fastpull.engine.sink``: the C one (``fastpull._native.ChunkWriter``)
against the Python one and against a model of what both must do, on random buffers,
positions, limits, shrinks and stops chosen by hypothesis."""

from __future__ import annotations

import errno
import gc
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpull import hashing
from fastpull.engine.sink import ChunkWriter, PythonChunkWriter, new_chunk_writer

SENTINEL = 0x5A
needs_native = pytest.mark.skipif(
    "native" not in hashing.AVAILABLE_BACKENDS,
    reason="fastpull._native is not built (python setup.py build_ext --inplace)",
)
BACKENDS = [pytest.param("native", marks=needs_native), "python"]


@dataclass
class Other:
    """The ``other`` callable: records what it was handed, answers as told."""

    answer: int | None = None
    seen: list[bytes] = field(default_factory=list)

    def __call__(self, data: bytes) -> int | None:
        self.seen.append(bytes(data))
        return self.answer


# What a test does to a writer, in order: hand it a buffer, switch writing, move the limit
# (to a point between its position and the file's end, as a fraction), or stop it.
Step = tuple[str, object]
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.binary(max_size=3000)),
        st.tuples(st.just("writing"), st.booleans()),
        st.tuples(st.just("limit"), st.floats(0, 1)),
        st.tuples(st.just("stop"), st.none()),
    ),
    max_size=25,
)


@dataclass
class Run:
    """What one writer answered and left behind."""

    answers: list[object]
    seen: list[bytes]
    contents: bytes
    position: int
    limit: int
    stopped: bool
    error: int
    checksum: str


def play(backend: str, total: int, start: int, limit: int, steps: list[Step]) -> Run:
    other = Other()
    answers: list[object] = []
    with tempfile.TemporaryFile() as file:
        file.write(bytes([SENTINEL]) * total)
        file.flush()
        writer = new_chunk_writer(file.fileno(), start, limit, other, backend)
        for kind, value in steps:
            if kind == "data":
                assert isinstance(value, bytes)
                answers.append(writer(value))
            elif kind == "writing":
                writer.writing = bool(value)
            elif kind == "limit":
                assert isinstance(value, float)
                writer.limit = writer.position + int((total - writer.position) * value)
            else:
                writer.stop()
        file.seek(0)
        contents = file.read()
    return Run(
        answers,
        other.seen,
        contents,
        writer.position,
        writer.limit,
        writer.stopped,
        writer.error,
        writer.hexdigest(),
    )


def model(total: int, start: int, limit: int, steps: list[Step]) -> tuple[list[object], bytes]:
    """The answers and the bytes written, by the ChunkWriter contract, for a file that
    takes every write."""
    answers: list[object] = []
    written = b""
    writing = stopped = False
    for kind, value in steps:
        position = start + len(written)
        if kind == "data":
            assert isinstance(value, bytes)
            if stopped:
                answers.append(0)
            elif not writing:
                answers.append(None)  # Other's answer
            else:
                taken = value[: limit - position]
                written += taken
                answers.append(None if len(taken) == len(value) else 0)
        elif kind == "writing":
            writing = bool(value)
        elif kind == "limit":
            assert isinstance(value, float)
            limit = position + int((total - position) * value)
        else:
            stopped = True
    return answers, written


@st.composite
def spans(draw: st.DrawFn) -> tuple[int, int, int]:
    """(total, start, limit): a file of ``total`` bytes, a chunk from ``start`` to ``limit``."""
    total = draw(st.integers(1, 6000))
    start = draw(st.integers(0, total))
    limit = draw(st.integers(start, total))
    return total, start, limit


@needs_native
@settings(max_examples=400, deadline=None)
@given(span=spans(), steps=STEPS)
def test_the_c_writer_does_exactly_what_the_python_one_does(
    span: tuple[int, int, int], steps: list[Step]
) -> None:
    native = play("native", *span, steps)
    python = play("python", *span, steps)
    assert native == python


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=200, deadline=None)
@given(span=spans(), steps=STEPS)
def test_bytes_land_at_their_offset_never_past_the_limit_with_their_checksum(
    backend: str, span: tuple[int, int, int], steps: list[Step]
) -> None:
    total, start, limit = span
    run = play(backend, total, start, limit, steps)
    answers, written = model(total, start, limit, steps)
    assert run.answers == answers
    assert run.position == start + len(written)
    assert run.contents == (
        bytes([SENTINEL]) * start + written + bytes([SENTINEL]) * (total - start - len(written))
    )
    # What the resume journal checks old extents with, so it must match byte for byte.
    assert run.checksum == xxhash.xxh3_128(written).hexdigest()
    assert run.error == 0
    assert run.seen == [s[1] for s in _not_written(steps)]


def _not_written(steps: list[Step]) -> Iterator[Step]:
    """The buffers handed over while not writing and not stopped: ``other``'s."""
    writing = stopped = False
    for step in steps:
        kind, value = step
        if kind == "data" and not writing and not stopped:
            yield step
        elif kind == "writing":
            writing = bool(value)
        elif kind == "stop":
            stopped = True


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_write_stops_the_writer_with_its_errno(backend: str) -> None:
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        writer = new_chunk_writer(fd, 10, 100, Other(), backend)
        writer.writing = True
        assert writer(b"abc") == 0
        assert (writer.error, writer.stopped, writer.position) == (errno.ENOSPC, True, 10)
        assert writer(b"abc") == 0
        assert writer.hexdigest() == xxhash.xxh3_128().hexdigest()
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_not_open_for_writing_is_an_error_not_a_crash(backend: str) -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        writer = new_chunk_writer(fd, 0, 10, Other(), backend)
        writer.writing = True
        assert writer(b"x") == 0
        assert writer.error == errno.EBADF
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_limit_never_goes_below_what_is_written(backend: str) -> None:
    with tempfile.TemporaryFile() as file:
        writer = new_chunk_writer(file.fileno(), 5, 20, Other(), backend)
        writer.writing = True
        assert writer(b"0123456789") is None
        with pytest.raises(ValueError):
            writer.limit = 14
        writer.limit = 15
        assert writer(b"x") == 0
        assert (writer.position, writer.limit) == (15, 15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("fd", "position", "limit"), [(-1, 0, 1), (0, -1, 1), (0, 5, 4)])
def test_impossible_ranges_are_refused(backend: str, fd: int, position: int, limit: int) -> None:
    with pytest.raises(ValueError):
        new_chunk_writer(fd, position, limit, Other(), backend)


@needs_native
def test_the_c_writer_lets_the_collector_see_its_callback() -> None:
    """A transfer holds its writer and the writer the transfer's callback: a cycle only the
    garbage collector can free, which it can only if the writer shows what it holds."""
    other = Other()
    with tempfile.TemporaryFile() as file:
        writer = new_chunk_writer(file.fileno(), 0, 1, other, "native")
        assert other in gc.get_referents(writer)


def test_the_default_backend_is_hashings() -> None:
    with tempfile.TemporaryFile() as file:
        writer = new_chunk_writer(file.fileno(), 0, 1, Other())
    assert isinstance(writer, PythonChunkWriter) == (hashing.BACKEND == "python")


def test_an_unavailable_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="not available"):
        new_chunk_writer(0, 0, 1, Other(), "rust")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_writer_hands_bodies_to_other_until_told_to_write(backend: str) -> None:
    other = Other(answer=None)
    with tempfile.TemporaryFile() as file:
        writer: ChunkWriter = new_chunk_writer(file.fileno(), 0, 10, other, backend)
        assert not writer.writing
        assert writer(b"error page") is None
        assert (other.seen, writer.position, os.fstat(file.fileno()).st_size) == (
            [b"error page"],
            0,
            0,
        )
