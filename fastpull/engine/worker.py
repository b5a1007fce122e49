"""A download worker: one libcurl multi handle driving several ranged transfers, each
writing with ``pwrite`` straight into its blob's ingest file (through a
:class:`~fastpull.engine.sink.ChunkWriter`, in C where the extension is built).

Workers get plain data (URL, headers, path, byte range) and answer with plain data, so
they can run in another process (a fresh interpreter, see :func:`command_line`: libcurl,
OpenSSL and threads do not survive ``fork``) or inline in the parent for small jobs. The
loop follows pycurl's ``retriever-multi`` shape: add handles, ``perform``, ``info_read``,
``select``.

Invariants the engine relies on:
- bytes are written only from a 206 whose ``Content-Range`` is exactly the range asked
  for, or from a 200 to a request without ``Range``;
- a transfer never writes at or past its chunk's end, even if the server sends more;
- after ``Shrunk`` or ``Cancelled`` is sent for a chunk, nothing more is written for it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pycurl

from fastpull.engine.sink import ChunkWriter, new_chunk_writer
from fastpull.errors import ConnectionFailed, FastpullError, ProtocolError, StoreError
from fastpull.registry.transport import TLSConfig, configure_easy, curl_error, parse_header_line
from fastpull.types import Marker

if TYPE_CHECKING:
    # Only a worker process needs it (its command line imports it): a pull small enough to
    # run inline never loads multiprocessing.
    from multiprocessing.connection import Connection

# A large receive buffer (512 KiB → 4 MiB: 2.2 → 1.7 CPU s/GB,
# `python -m benchmarks.bench_pull --images big --tools fastpull`). The write callback still
# gets at most 16 KiB a call (libcurl 8's CURL_MAX_WRITE_SIZE, whatever this is): about 65,700
# calls per GiB, which is why the callback is C where the extension is built (engine/sink.py).
_BUFFER_SIZE = 4 * 1024 * 1024
_ERROR_BODY_CAP = 64 * 1024
# How often transfers' progress is reported: the connection controller measures rates from
# these reports, so they must come often enough for a quarter-second window to be exact
# (see engine/connections.py).
PROGRESS_INTERVAL = 0.025


# -- commands (parent → worker) ------------------------------------------------------------

# Commands and reports are NamedTuples, not frozen dataclasses: every pull imports this
# module and a frozen dataclass costs 0.7-1 ms to create (its methods are compiled from
# source), while a NamedTuple costs 0.1-0.2 ms; they also pickle smaller on the worker pipe.


class Fetch(NamedTuple):
    """Fetch bytes ``[start, end)`` of a ``total``-byte blob into the file at ``path``."""

    chunk_id: int
    url: str
    headers: tuple[tuple[str, str], ...]
    path: str
    start: int
    end: int
    total: int
    tls: TLSConfig
    stall_seconds: int = 30
    stall_floor: int = 1024

    @property
    def ranged(self) -> bool:
        """Whole-blob requests go without ``Range``, like every other client's."""
        return not (self.start == 0 and self.end == self.total)


class Shrink(NamedTuple):
    """Stop chunk ``chunk_id`` at ``end`` (or as soon after as already written)."""

    chunk_id: int
    end: int


class Cancel(NamedTuple):
    """Stop chunk ``chunk_id`` now."""

    chunk_id: int


class Shutdown(Marker):
    """Abort everything and exit."""


Command = Fetch | Shrink | Cancel | Shutdown


# -- reports (worker → parent) -------------------------------------------------------------


class Progress(NamedTuple):
    """Chunks written up to these positions."""

    positions: tuple[tuple[int, int], ...]


class Accepted(NamedTuple):
    """Chunk ``chunk_id``'s response carries its bytes; ``etag`` is its ETag ('' if none).

    Sent before any progress of that transfer, so the parent can judge resumed bytes
    against the server's validator before more requests for the blob go out.
    """

    chunk_id: int
    etag: str


# A transfer ended: one of the five types below. ``position`` is how far the chunk is
# written; where bytes may have been written, ``checksum`` is the xxh3-128 of those from the
# chunk's start up to ``position`` (for the resume journal; '' when nothing was written).


class Done(NamedTuple):
    """The chunk is written, up to its (possibly shrunk) end."""

    chunk_id: int
    position: int
    checksum: str


class Cancelled(NamedTuple):
    """Stopped on the parent's ``Cancel`` (or at shutdown)."""

    chunk_id: int
    position: int
    checksum: str = ""


class Failed(NamedTuple):
    """Network failure, short body, bad ``Content-Range``, a write error: ``error`` says
    which."""

    chunk_id: int
    position: int
    error: FastpullError
    checksum: str = ""


class Answered(NamedTuple):
    """An HTTP answer that is not data (redirect, 401, 429, 5xx...); nothing written.
    ``body`` is at most 64 KiB of it."""

    chunk_id: int
    position: int
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


class RangeIgnored(NamedTuple):
    """A 200 to a Range request: the server sends the whole blob; nothing written."""

    chunk_id: int
    position: int


Finished = Done | Cancelled | Failed | Answered | RangeIgnored


class Shrunk(NamedTuple):
    """Chunk ``chunk_id`` now ends at ``end`` (never below what is already written)."""

    chunk_id: int
    end: int


Report = Accepted | Progress | Done | Cancelled | Failed | Answered | RangeIgnored | Shrunk


@dataclass
class _Transfer:
    fetch: Fetch
    fd: int
    easy: pycurl.Curl
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    accepted: bool | None = None  # decided when the headers are complete
    body: bytearray = field(default_factory=bytearray)
    failure: FastpullError | None = None
    cancelled: bool = False
    reported: int = -1
    # libcurl's write callback: the body goes to the file once the headers accept it.
    writer: ChunkWriter = field(init=False)

    def __post_init__(self) -> None:
        self.writer = new_chunk_writer(self.fd, self.fetch.start, self.fetch.end, self.not_data)

    @property
    def position(self) -> int:
        return self.writer.position

    @property
    def limit(self) -> int:
        return self.writer.limit

    def header(self, name: str) -> str:
        return next((v for k, v in reversed(self.headers) if k == name), "")

    def not_data(self, data: bytes) -> int | None:
        """A body that is not the chunk's bytes: keep the start of an error answer."""
        if self.failure is not None:
            return 0
        if self.status == 200 and self.fetch.ranged:
            return 0  # Range ignored: these are the wrong bytes, write none of them
        if len(self.body) < _ERROR_BODY_CAP:
            self.body += data[: _ERROR_BODY_CAP - len(self.body)]
        return None

    def cancel(self) -> None:
        """Write nothing more for this transfer."""
        self.cancelled = True
        self.writer.stop()

    def write_failure(self) -> StoreError | None:
        """Why writing stopped, if a write failed."""
        if not self.writer.error:
            return None
        return StoreError(f"cannot write to the store: {os.strerror(self.writer.error)}")


class WorkerLoop:
    """The transfers of one worker and the libcurl multi handle driving them."""

    def __init__(self) -> None:
        self._multi = pycurl.CurlMulti()
        # One TCP connection per transfer, even over HTTP/2: CDNs cap each connection, so
        # multiplexing every chunk onto one would cap the whole pull.
        self._multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_NOTHING)
        self._transfers: dict[int, _Transfer] = {}
        self._by_handle: dict[pycurl.Curl, _Transfer] = {}
        self._out: list[Report] = []
        self._last_progress = 0.0

    @property
    def busy(self) -> bool:
        """Whether any transfer is running."""
        return bool(self._transfers)

    @property
    def quiet(self) -> bool:
        """Whether no transfer is running and nothing is waiting to be reported (a
        command may have ended a transfer since the last :meth:`poll`)."""
        return not (self._transfers or self._out)

    def submit(self, command: Command) -> None:
        """Act on a command from the parent."""
        if isinstance(command, Fetch):
            self._start(command)
        elif isinstance(command, Shrink):
            transfer = self._transfers.get(command.chunk_id)
            if transfer is not None:
                transfer.writer.limit = max(transfer.position, min(command.end, transfer.limit))
                self._out.append(Shrunk(command.chunk_id, transfer.limit))
        elif isinstance(command, Cancel):
            transfer = self._transfers.get(command.chunk_id)
            if transfer is not None:
                transfer.cancel()
                self._finish(transfer, None)
        elif isinstance(command, Shutdown):
            self.close()

    def _start(self, fetch: Fetch) -> None:
        try:
            fd = os.open(fetch.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            error = StoreError(f"cannot open ingest file {fetch.path}: {exc.strerror}")
            self._out.append(Failed(fetch.chunk_id, fetch.start, error))
            return
        easy = pycurl.Curl()
        headers = dict(fetch.headers)
        headers["Accept-Encoding"] = "identity"
        if fetch.ranged:
            headers["Range"] = f"bytes={fetch.start}-{fetch.end - 1}"
        configure_easy(
            easy, fetch.url, headers=headers, tls=fetch.tls, stall_seconds=fetch.stall_seconds
        )
        easy.setopt(pycurl.LOW_SPEED_LIMIT, fetch.stall_floor)
        easy.setopt(pycurl.BUFFERSIZE, _BUFFER_SIZE)
        transfer = _Transfer(fetch, fd, easy)
        easy.setopt(pycurl.HEADERFUNCTION, lambda line: self._on_header(transfer, line))
        easy.setopt(pycurl.WRITEFUNCTION, transfer.writer)
        self._transfers[fetch.chunk_id] = transfer
        self._by_handle[easy] = transfer
        self._multi.add_handle(easy)

    def _on_header(self, t: _Transfer, line: bytes) -> None:
        status = parse_header_line(line, t.headers)
        if status is not None:
            t.status = status
            t.accepted = None
            t.writer.writing = False
        elif line in (b"\r\n", b"\n") and t.status is not None and t.status >= 200:
            t.accepted = self._accept(t)
            t.writer.writing = t.accepted
            if t.accepted:
                self._out.append(Accepted(t.fetch.chunk_id, t.header("etag")))

    def _accept(self, t: _Transfer) -> bool:
        """Whether this response's body is the chunk's bytes."""
        fetch = t.fetch
        if t.status == 200:
            return not fetch.ranged
        if t.status != 206:
            return False
        expected = f"bytes {fetch.start}-{fetch.end - 1}/"
        got = t.header("content-range")
        size = got.rpartition("/")[2]
        if not got.startswith(expected) or size not in ("*", str(fetch.total)):
            t.failure = ProtocolError(
                f"server answered Range bytes={fetch.start}-{fetch.end - 1} with "
                f"Content-Range {got[:80]!r}"
            )
            return False
        return True

    def poll(self, timeout: float, wake: int | None = None) -> list[Report]:
        """Drive transfers for up to ``timeout`` seconds; return what happened. Waiting
        ends early when the file descriptor ``wake`` (the parent's commands) is readable."""
        if self._transfers:
            status, _ = self._multi.perform()
            while status == pycurl.E_CALL_MULTI_PERFORM:
                status, _ = self._multi.perform()
            while True:
                queued, ok, failed = self._multi.info_read()
                for easy in ok:
                    self._finish(self._by_handle[easy], None)
                for easy, code, message in failed:
                    self._finish(self._by_handle[easy], (code, message))
                if not queued:
                    break
        if not self._out:
            self._wait(timeout, wake)
        now = time.monotonic()
        if self._transfers and now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            positions = tuple(
                (cid, t.position) for cid, t in self._transfers.items() if t.position != t.reported
            )
            for cid, _pos in positions:
                self._transfers[cid].reported = self._transfers[cid].position
            if positions:
                self._out.append(Progress(positions))
        out, self._out = self._out, []
        return out

    def _wait(self, timeout: float, wake: int | None) -> None:
        """Sleep until a transfer's socket, or ``wake``, is ready, or libcurl has a timer
        due. The parent's next chunk must not wait out the timeout: a connection idles
        until it comes."""
        poller = select.poll()
        if wake is not None:
            poller.register(wake, select.POLLIN)
        if self._transfers:
            reads, writes, errors = self._multi.fdset()
            for fd in {*reads, *writes, *errors}:
                poller.register(
                    fd,
                    (select.POLLIN if fd in reads else 0)
                    | (select.POLLOUT if fd in writes else 0)
                    | select.POLLPRI,
                )
            due = self._multi.timeout()
            if due >= 0:
                timeout = min(timeout, due / 1000)
        elif wake is None:
            return
        poller.poll(max(0, int(timeout * 1000)))

    def _finish(self, t: _Transfer, curl_failure: tuple[int, str] | None) -> None:
        fetch = t.fetch
        self._multi.remove_handle(t.easy)
        t.easy.close()
        del self._by_handle[t.easy]
        del self._transfers[fetch.chunk_id]
        os.close(t.fd)
        if t.position != t.reported:
            self._out.append(Progress(((fetch.chunk_id, t.position),)))
        self._out.append(_outcome(t, curl_failure))

    def close(self) -> None:
        """Abort every transfer and release libcurl."""
        for transfer in list(self._transfers.values()):
            transfer.cancel()
            self._finish(transfer, None)
        self._out.clear()
        self._multi.close()


def _outcome(t: _Transfer, curl_failure: tuple[int, str] | None) -> Finished:
    """How a transfer that was just taken off the multi handle ended."""
    fetch = t.fetch
    checksum = t.writer.hexdigest() if t.position > fetch.start else ""
    if t.cancelled:
        return Cancelled(fetch.chunk_id, t.position, checksum)
    if t.position >= t.limit and t.accepted:
        return Done(fetch.chunk_id, t.position, checksum)
    failure = t.failure or t.write_failure()
    if failure is not None:
        return Failed(fetch.chunk_id, t.position, failure, checksum)
    if t.status == 200 and fetch.ranged:
        return RangeIgnored(fetch.chunk_id, t.position)
    if t.status is not None and not t.accepted:
        return Answered(fetch.chunk_id, t.position, t.status, tuple(t.headers), bytes(t.body))
    if curl_failure is not None:
        error = curl_error(curl_failure[0], curl_failure[1], fetch.url)
    else:
        error = _short_body(fetch, t.position)
    return Failed(fetch.chunk_id, t.position, error, checksum)


def _short_body(fetch: Fetch, position: int) -> FastpullError:
    return ConnectionFailed(
        f"connection closed after {position - fetch.start} of {fetch.end - fetch.start} bytes"
    )


def worker_main(conn: Connection) -> None:
    """Entry point of a worker process: obey commands, report results, until told to stop."""
    # Ctrl-C reaches the whole process group; the parent decides, then tells us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = WorkerLoop()
    try:
        conn.send([])  # ready: the parent hands new transfers here from now on
        while True:
            while conn.poll(0):
                command = conn.recv()
                if isinstance(command, Shutdown):
                    return
                loop.submit(command)
            reports = loop.poll(PROGRESS_INTERVAL if loop.busy else 0.5, wake=conn.fileno())
            if reports:
                conn.send(reports)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent is gone or stopping: nothing left to report to
    finally:
        with contextlib.suppress(Exception):
            loop.close()


def command_line(fd: int) -> list[str]:
    """How the engine starts a worker: a fresh, isolated interpreter serving socket ``fd``.

    ``-I`` keeps the current directory, ``PYTHON*`` variables and the user's site directory
    off the worker's ``sys.path``, so a ``pycurl.py`` (or a ``fastpull/`` folder) in the
    directory a user pulls from is never executed. The directories this process loaded
    fastpull and the worker's dependencies from are handed over explicitly instead, which
    keeps venv, ``pip --user`` and editable installs working.
    """
    code = (
        "import sys; sys.path[:0] = sys.argv[2:]; "
        "from multiprocessing.connection import Connection; "
        "from fastpull.engine.worker import worker_main; "
        "worker_main(Connection(int(sys.argv[1])))"
    )
    return [sys.executable, "-I", "-c", code, str(fd), *import_roots()]


# What a worker imports beyond the standard library and fastpull itself.
_WORKER_IMPORTS = ("fastpull", "pycurl", "xxhash", "orjson", "blake3")


def import_roots() -> list[str]:
    """The ``sys.path`` entries this process found fastpull and the worker's dependencies
    in, fastpull's first, each once."""
    roots: list[str] = []
    for name in _WORKER_IMPORTS:
        module = importlib.import_module(name)
        origin = Path(module.__file__ or "").resolve()
        # A package's entry is the directory holding the package; a module's, its own.
        root = str(origin.parents[1] if hasattr(module, "__path__") else origin.parent)
        if root not in roots:
            roots.append(root)
    return roots
