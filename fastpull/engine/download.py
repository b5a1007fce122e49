"""The download engine: every missing blob of a pull, in Range chunks, across worker
processes, verified as the bytes land.

Callers hand :meth:`Downloader.fetch` descriptors and a :class:`BlobSource` and get the
blobs committed to the store. Inside, the parent process plans (``scheduler``), resolves
URLs and credentials, hashes (``verify``) and reports progress; workers (``worker``) only
move bytes from sockets into the ingest files. What can block on the disk (writeback advice,
journal syncs, the fsync and rename that publish a blob) runs on a background thread
(``diskqueue``), so the loop that feeds the workers never waits for the device.

Per chunk, until its blob is committed or its attempts run out:
- 3xx: the first request of a blob follows redirects (other chunks wait), then every
  chunk goes to the final URL; the registry's ``Authorization`` goes only to its origin;
- 401 from the registry: re-authenticate and retry; 401/403 from a redirect target (a
  signed URL that expired): resolve again from the registry;
- 408/429/5xx, resets, stalls, short bodies: back off (Retry-After wins) and resume from
  the bytes already written;
- a 200 to a Range request: the server ignores Range; the blob falls back to one stream;
- the digest does not match: fetch the blob again, then fail with DigestMismatch.

Every finished range goes into the ingest's resume journal with the checksum its worker
computed; on any stop (Ctrl-C, an error) the transfers in flight are cancelled and what
they wrote is journaled too, so the next run of any pull needing the blob fetches only
what is missing (``store.Ingest.resumed``). A server whose ETag for the blob changed
since then gets every resumed range fetched again.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Protocol

from fastpull import cancel, events
from fastpull.engine.scheduler import Chunk, Outcome, Policy, Scheduler
from fastpull.engine.verify import Verifier
from fastpull.engine.worker import (
    PROGRESS_INTERVAL,
    Accepted,
    Answered,
    Cancel,
    Cancelled,
    Command,
    Done,
    Failed,
    Fetch,
    Finished,
    Progress,
    RangeIgnored,
    Report,
    Shrink,
    Shrunk,
    Shutdown,
    WorkerLoop,
    command_line,
)
from fastpull.errors import (
    DigestMismatch,
    FastpullError,
    Interrupted,
    ProtocolError,
    StoreError,
    Unauthorized,
)
from fastpull.registry.responses import (
    Fail,
    Reauthenticate,
    Redirect,
    Reresolve,
    RetryAfter,
    RetryPolicy,
    classify,
    origin,
)
from fastpull.registry.transport import Response, TLSConfig, http_error
from fastpull.store.diskqueue import DiskQueue
from fastpull.store.journal import Extent
from fastpull.store.layout import Ingest, Store
from fastpull.types import Descriptor, Digest

# Below this many bytes in total, starting worker processes costs more than it saves.
INLINE_BELOW = 64 << 20
DEFAULT_CONNECTIONS = 16
_MAX_REAUTH = 3
_MAX_DIGEST_ATTEMPTS = 2
# On a stop, how long to wait for the transfers in flight to report what they wrote.
DRAIN_SECONDS = 0.5
# Journals are synced this often (off the loop). A process killed at any moment loses no
# record either way, the page cache outlives it; only a power cut can lose the newest,
# which costs a refetch of their ranges, never a wrong byte.
SYNC_INTERVAL = 0.5
# How often the loop looks for finished commits while nothing else can wake it.
_COMMIT_POLL = 0.005


# Told of a blob that cannot be had (and of why), while the engine goes on with the others.
FailureListener = Callable[[Digest, FastpullError], None]


class BlobSource(Protocol):
    """Where blobs come from and how to be allowed to read them (a registry repository)."""

    def blob_url(self, digest: Digest) -> str:
        """The registry URL of a blob."""
        ...

    def authorization(self) -> dict[str, str]:
        """Headers that authorize a blob GET on the registry's origin."""
        ...

    def reauthorize(self, response: Response) -> dict[str, str]:
        """Answer a 401 (token expired, first challenge) with fresh headers."""
        ...


@dataclass(frozen=True)
class BlobStats:
    """What it took to get one blob (for ``--stats`` and the Python API)."""

    digest: Digest
    size: int
    downloaded: int
    seconds: float
    attempts: int
    connections: int = 1
    already_present: bool = False
    chunks: int = 0
    retries: int = 0
    resumed: int = 0


def default_workers(total_bytes: int) -> int:
    """Worker processes for a job: none (inline) for small jobs, else one per two cores
    (the parent hashes on another), at most 4.

    One per two cores because on 2 cores one worker used less CPU than two for the same
    throughput (``python -m benchmarks.bench_pull --images big --tools fastpull``, both
    scenarios)."""
    if total_bytes < INLINE_BELOW:
        return 0
    return max(1, min(4, (os.cpu_count() or 1) // 2))


@dataclass
class _Blob:
    descriptor: Descriptor
    ingest: Ingest
    exit: contextlib.ExitStack
    verifier: Verifier
    url: str = ""
    with_auth: bool = True
    resolved: bool = False
    hops: int = 0
    reauths: int = 0
    digest_attempts: int = 1
    cancelling: set[int] = field(default_factory=set)
    started: float | None = None
    downloaded: int = 0
    chunks: int = 0
    retries: int = 0
    connections: int = 0
    reported: float = 0.0
    done: bool = False
    failed: bool = False
    resumed: int = 0
    etag_checked: bool = False
    commit: Future[None] | None = None  # verified; being published on the disk thread

    @property
    def digest(self) -> Digest:
        return self.descriptor.digest

    @property
    def size(self) -> int:
        return self.descriptor.size


class _Pool:
    """Worker processes, or, for ``count == 0``, one worker loop run inline.

    Workers are fresh interpreters (``worker.command_line``) talking over a socket
    pair: libcurl, OpenSSL and threads do not survive ``fork``, and multiprocessing's
    ``spawn`` would re-run the caller's main script, which a library must not require
    to be guarded by ``if __name__ == "__main__"``.
    """

    def __init__(self, count: int) -> None:
        self._inline = WorkerLoop() if count == 0 else None
        self._conns: list[Connection] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(count):
                mine, theirs = socket.socketpair()
                with theirs:
                    proc = subprocess.Popen(
                        command_line(theirs.fileno()),
                        pass_fds=[theirs.fileno()],
                        stdin=subprocess.DEVNULL,
                        # Out of the terminal's process group: Ctrl-C is the parent's to
                        # handle; workers stop when told, or when the parent's socket closes.
                        start_new_session=True,
                    )
                self._procs.append(proc)
                self._conns.append(Connection(mine.detach()))
        except BaseException:
            self.close()
            raise
        self.size = max(1, count)
        self.load = [0] * self.size
        self.owner: dict[int, int] = {}

    def has_room(self, total: int, per_worker: int) -> bool:
        """Whether fewer than ``total`` transfers run, and some worker has fewer than
        ``per_worker``."""
        return sum(self.load) < total and min(self.load) < per_worker

    def send(self, worker: int, command: Command) -> None:
        if self._inline is not None:
            self._inline.submit(command)
        else:
            self._conns[worker].send(command)

    def assign(self, fetch: Fetch) -> None:
        worker = min(range(self.size), key=self.load.__getitem__)
        self.load[worker] += 1
        self.owner[fetch.chunk_id] = worker
        self.send(worker, fetch)

    def tell(self, chunk_id: int, command: Command) -> None:
        worker = self.owner.get(chunk_id)
        if worker is not None:
            self.send(worker, command)

    def released(self, chunk_id: int) -> None:
        worker = self.owner.pop(chunk_id, None)
        if worker is not None:
            self.load[worker] -= 1

    def receive(self, timeout: float) -> list[Report]:
        if self._inline is not None:
            if not self._inline.busy:
                time.sleep(timeout)  # waiting out a backoff: nothing to drive
            return self._inline.poll(timeout)
        reports: list[Report] = []
        for conn in wait(self._conns, timeout):
            assert isinstance(conn, Connection)
            try:
                reports.extend(conn.recv())
            except (EOFError, OSError):
                raise FastpullError("a download worker process exited unexpectedly") from None
        return reports

    def close(self) -> None:
        if self._inline is not None:
            self._inline.close()
            return
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(Shutdown())
        deadline = time.monotonic() + 1.0
        for proc in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns:
            conn.close()


class Downloader:
    """Fetch blobs into a store over ``connections`` transfers in ``workers`` processes."""

    def __init__(
        self,
        store: Store,
        *,
        tls_for: Callable[[str], TLSConfig],
        connections: int = DEFAULT_CONNECTIONS,
        workers: int | None = None,
        retry: RetryPolicy | None = None,
        stall_seconds: int = 30,
        on_event: events.Listener = events.ignore,
    ) -> None:
        self.store = store
        self._tls_for = tls_for
        self.connections = max(1, connections)
        self.workers = workers
        self.retry = retry or RetryPolicy(attempts=6)
        self.stall_seconds = stall_seconds
        self.emit = on_event
        self.workers_used = 0

    def fetch(
        self,
        blobs: Sequence[Descriptor],
        source: BlobSource | Mapping[Digest, BlobSource],
        *,
        on_failure: FailureListener | None = None,
    ) -> list[BlobStats]:
        """Download, verify and commit every blob; raise the first unrecoverable error.

        ``source`` serves every blob, or maps each digest to its own source (a batch
        spans repositories and registries). With ``on_failure``, a blob that cannot be had
        (refused, not found, wrong content after retries...) is reported there and the
        others go on; only what stops every blob (Ctrl-C, the store) is raised. Stats are
        returned for the blobs that were stored.
        """
        unique = sorted({d.digest: d for d in blobs}.values(), key=lambda d: str(d.digest))
        results: list[BlobStats] = []
        if not unique:
            return results
        total = sum(d.size for d in unique)
        count = self.workers if self.workers is not None else default_workers(total)
        with contextlib.ExitStack() as stack:
            disk = DiskQueue()
            # Each worker is a fresh interpreter that takes a tenth of a second to start: it
            # boots while the blobs are claimed (their locks, files and journals).
            pool = _Pool(count)
            try:
                # Locks are taken in digest order, so two processes never wait on each other.
                todo = [
                    b for d in unique if (b := self._claim(d, results, stack, disk)) is not None
                ]
            except BaseException:
                pool.close()
                raise
            # Registered after the blobs, so they close first (in reverse order): no worker
            # writes and nothing queued uses an ingest once the blobs' stacks close them.
            stack.callback(disk.close)
            stack.callback(pool.close)
            if not todo:
                return results
            self.workers_used = count
            job = _Job(self, todo, source, pool, disk, on_failure)
            results.extend(job.run())
        return results

    def _claim(
        self,
        descriptor: Descriptor,
        results: list[BlobStats],
        stack: contextlib.ExitStack,
        disk: DiskQueue,
    ) -> _Blob | None:
        """Lock the blob's ingest; None when another process already stored it."""
        blob_stack = contextlib.ExitStack()
        try:
            ingest = blob_stack.enter_context(self.store.ingest(descriptor.digest, descriptor.size))
            if ingest.present:
                blob_stack.close()
                self.emit(events.LayerEvent(descriptor.digest, events.ALREADY_EXISTS))
                results.append(BlobStats(descriptor.digest, descriptor.size, 0, 0.0, 0, 0, True))
                return None
            ingest.preallocate()
        except BaseException:
            blob_stack.close()
            raise
        stack.push(blob_stack)
        resumed = sum(extent.length for extent in ingest.resumed)
        verifier = Verifier(descriptor.digest, ingest.fd, release=disk.release)
        return _Blob(descriptor, ingest, blob_stack, verifier, resumed=resumed)


class _Job:
    """One run of the engine over a set of claimed blobs."""

    def __init__(
        self,
        owner: Downloader,
        blobs: list[_Blob],
        source: BlobSource | Mapping[Digest, BlobSource],
        pool: _Pool,
        disk: DiskQueue,
        on_failure: FailureListener | None = None,
    ) -> None:
        self.o = owner
        self.disk = disk
        self._sync_at = time.monotonic() + SYNC_INTERVAL
        self.on_failure = on_failure
        self.blobs = blobs
        self.sources = [source[b.digest] if isinstance(source, Mapping) else source for b in blobs]
        self.pool = pool
        policy = Policy(
            connections=owner.connections, max_attempts=owner.retry.attempts, retry=owner.retry
        )
        resumed = [[(e.start, e.end) for e in b.ingest.resumed] for b in blobs]
        self.sched = Scheduler([b.size for b in blobs], policy, resumed)
        self.per_worker = math.ceil(owner.connections / pool.size)
        self.positions: dict[int, int] = {}
        self.chunk_blob: dict[int, int] = {}
        # Where each request went: answers are judged by their own URL, not the blob's
        # current one, which may have moved on (a re-resolved redirect) meanwhile.
        self.chunk_url: dict[int, str] = {}
        self.results: list[BlobStats] = []

    def run(self) -> list[BlobStats]:
        try:
            while not all(b.done for b in self.blobs):
                cancel.check()
                for report in self.pool.receive(self._wait(time.monotonic())):
                    index = (
                        None
                        if isinstance(report, Progress)
                        else self.chunk_blob.get(report.chunk_id)
                    )
                    self._guarded(index, self._handle, report)
                # Refill freed connections before hashing, which may take milliseconds.
                self._dispatch(time.monotonic())
                for index, blob in enumerate(self.blobs):
                    if blob.done:
                        continue
                    if blob.commit is None:
                        self._guarded(index, self._verify, index, blob)
                    elif blob.commit.done():
                        self._guarded(index, self._committed, blob)
                self._sync_journals()
                self.disk.check()
        except BaseException:
            self._drain()
            raise
        return self.results

    def _guarded(self, index: int | None, action: Callable[..., None], *args: object) -> None:
        """Run ``action``; an error of one blob fails only that blob when the caller asked
        to be told of failures instead."""
        try:
            action(*args)
        except FastpullError as exc:
            if (
                index is None
                or self.on_failure is None
                or isinstance(exc, (StoreError, Interrupted))
                or self.blobs[index].done
            ):
                raise
            self._give_up(index, exc)

    def _give_up(self, index: int, error: FastpullError) -> None:
        """Stop working on one blob: its transfers are cancelled, its ingest is left (with
        whatever was journaled), and the listener hears why."""
        blob = self.blobs[index]
        blob.done = blob.failed = True
        for chunk in self.sched.drop(index):
            self.pool.tell(chunk.id, Cancel(chunk.id))
        blob.exit.close()
        assert self.on_failure is not None
        self.on_failure(blob.digest, error)

    def _drain(self) -> None:
        """Stop every transfer and journal what each wrote, for the next run to resume."""
        waiting = {c.id for c in self.sched.active_chunks()}
        # Whatever went wrong may have broken a worker too; the journal is best effort here.
        with contextlib.suppress(Exception):
            for chunk_id in waiting:
                self.pool.tell(chunk_id, Cancel(chunk_id))
            deadline = time.monotonic() + DRAIN_SECONDS
            while waiting and time.monotonic() < deadline:
                for report in self.pool.receive(0.05):
                    if isinstance(report, Finished) and report.chunk_id in waiting:
                        waiting.discard(report.chunk_id)
                        self._journal(report)

    def _sync_journals(self) -> None:
        now = time.monotonic()
        if now < self._sync_at:
            return
        self._sync_at = now + SYNC_INTERVAL
        for blob in self.blobs:
            if not blob.done and blob.commit is None:
                sync = blob.ingest.journal_sync()
                if sync is not None:
                    self.disk.later(sync)

    def _wait(self, now: float) -> float:
        if self._hashing_behind():
            return 0.0  # hash on at once; reports that came meanwhile are read anyway
        if any(b.commit is not None and not b.done for b in self.blobs):
            return _COMMIT_POLL
        ready = self.sched.next_ready_time()
        if ready is None or not self._room():
            return 0.05
        return min(0.05, max(0.0, ready - now))

    def _hashing_behind(self) -> bool:
        """Whether some blob has written bytes its verifier has not hashed yet."""
        return any(
            not b.done and b.commit is None and b.verifier.position < self.sched.hashable(i)
            for i, b in enumerate(self.blobs)
        )

    # -- handing out work ----------------------------------------------------------------

    def _eligible(self, index: int) -> bool:
        # Until a blob's first request has answered with data, it runs alone: redirects
        # are followed once per blob, not once per chunk.
        blob = self.blobs[index]
        if blob.done or blob.cancelling:
            return False
        return blob.resolved or not self.sched.active_chunks(index)

    def _room(self) -> bool:
        return self.pool.has_room(self.o.connections, self.per_worker)

    def _dispatch(self, now: float) -> None:
        while self._room():
            chunk = self.sched.next_chunk(now, self._eligible)
            if chunk is None:
                break
            self._send(chunk, now)
        if not self.sched.has_pending and self._room():
            split = self.sched.split_candidate()
            if split is not None:
                self.pool.tell(split[0], Shrink(*split))

    def _send(self, chunk: Chunk, now: float) -> None:
        blob = self.blobs[chunk.blob]
        if not blob.url:
            url = self.sources[chunk.blob].blob_url(blob.digest)
            blob.url, blob.with_auth, blob.resolved = url, True, False
        if blob.started is None:
            blob.started = now
            self.o.emit(events.LayerEvent(blob.digest, events.DOWNLOADING, 0, blob.size))
        headers = self.sources[chunk.blob].authorization() if blob.with_auth else {}
        fetch = Fetch(
            chunk.id,
            blob.url,
            tuple(headers.items()),
            str(blob.ingest.path),
            chunk.start,
            chunk.end,
            blob.size,
            self.o._tls_for(blob.url),
            stall_seconds=self.o.stall_seconds,
        )
        blob.chunks += 1
        blob.connections = max(blob.connections, len(self.sched.active_chunks(chunk.blob)))
        self.positions[chunk.id] = chunk.start
        self.chunk_blob[chunk.id] = chunk.blob
        self.chunk_url[chunk.id] = blob.url
        self.pool.assign(fetch)

    # -- what workers report -------------------------------------------------------------

    def _handle(self, report: Report) -> None:
        if isinstance(report, Accepted):
            self._accepted(report)
        elif isinstance(report, Progress):
            for chunk_id, position in report.positions:
                self._moved(chunk_id, position)
        elif isinstance(report, Shrunk):
            self.sched.shrunk(report.chunk_id, report.end)
        else:
            self._moved(report.chunk_id, report.position)
            self.pool.released(report.chunk_id)
            self._finished(report)

    def _accepted(self, report: Accepted) -> None:
        """Judge resumed bytes by the ETag of the blob's first answer in this run."""
        index = self.chunk_blob.get(report.chunk_id)
        if index is None or not report.etag or self.blobs[index].failed:
            return
        blob = self.blobs[index]
        known = blob.ingest.etag
        if known is None:
            blob.ingest.record_etag(report.etag)
        elif report.etag != known and not blob.etag_checked:
            # The server's bytes changed since the journaled ranges were written. This is
            # the blob's only request so far (the first runs alone), and what it writes is
            # current: only the resumed ranges must come again.
            blob.ingest.restart()
            blob.ingest.record_etag(report.etag)
            blob.verifier.restart()
            blob.resumed = 0
            self.sched.refetch_done(index)
        blob.etag_checked = True

    def _journal(self, report: Finished) -> None:
        """Record the bytes a finished transfer wrote, as its worker checksummed them."""
        match report:
            case Done(checksum=checksum) | Cancelled(checksum=checksum) | Failed(checksum=checksum):
                pass
            case _:
                return  # nothing was written
        chunk = self.sched.active_chunk(report.chunk_id)
        if chunk is None or not checksum or report.position <= chunk.start:
            return
        self.blobs[chunk.blob].ingest.record(Extent(chunk.start, report.position, checksum))

    def _moved(self, chunk_id: int, position: int) -> None:
        index = self.chunk_blob.get(chunk_id)
        if index is None or self.blobs[index].failed:
            return
        blob = self.blobs[index]
        delta = position - self.positions.get(chunk_id, position)
        if delta > 0:
            self.positions[chunk_id] = position
            blob.downloaded += delta
            if self.chunk_url.get(chunk_id) == blob.url:
                blob.resolved, blob.hops = True, 0
            self.sched.progress(chunk_id, position)
            now = time.monotonic()
            if now - blob.reported >= PROGRESS_INTERVAL:
                blob.reported = now
                received = self.sched.received(index)
                self.o.emit(events.LayerEvent(blob.digest, events.DOWNLOADING, received, blob.size))

    def _finished(self, report: Finished) -> None:
        chunk_id = report.chunk_id
        if self.blobs[self.chunk_blob[chunk_id]].failed:
            # Cancelled by _give_up; the blob's ingest is closed already.
            self.chunk_blob.pop(chunk_id)
            return
        self._journal(report)
        index = self.chunk_blob.pop(chunk_id)
        self.positions.pop(chunk_id, None)
        blob = self.blobs[index]
        url = self.chunk_url.pop(chunk_id, blob.url)
        if chunk_id in blob.cancelling:
            # Whatever its transfer reported, it has stopped writing: that is the ack the
            # single-stream restart waits for (a Cancel sent after it ended gets no answer).
            blob.cancelling.discard(chunk_id)
            self.sched.forget(chunk_id)
            if not blob.cancelling:
                blob.verifier.restart()
                self.sched.restart_single(index)
        else:
            match report:
                case Done():
                    self.sched.complete(chunk_id)
                    if url == blob.url:
                        blob.resolved, blob.hops = True, 0
                case Cancelled():
                    self.sched.forget(chunk_id)
                case RangeIgnored():
                    self._range_ignored(index, chunk_id)
                case Answered():
                    self._status(index, chunk_id, url, report)
                case Failed(error=error):
                    if not error.retryable:
                        raise error
                    self._retry(index, chunk_id, report.position, None, error)
                case _:
                    raise TypeError(f"not a worker outcome: {report!r}")

    def _range_ignored(self, index: int, chunk_id: int) -> None:
        """The server answered a Range request with the whole blob: one stream it is."""
        blob = self.blobs[index]
        self.sched.forget(chunk_id)
        if self.sched.is_single_stream(index):
            return
        for other in self.sched.single_stream(index):
            blob.cancelling.add(other.id)
            self.pool.tell(other.id, Cancel(other.id))
        if not blob.cancelling:
            blob.verifier.restart()
            self.sched.restart_single(index)

    def _status(self, index: int, chunk_id: int, url: str, report: Answered) -> None:
        """An HTTP answer that is not data, judged by the URL the request went to."""
        blob = self.blobs[index]
        source = self.sources[index]
        registry = origin(source.blob_url(blob.digest))
        response = Response(report.status, report.headers, report.body, url)
        current = url == blob.url  # else another request already moved the blob on
        action = classify(
            report.status, dict(report.headers), url, registry, hops=blob.hops if current else 0
        )
        match action:
            case Redirect(target, keep_auth):
                if current:
                    blob.hops += 1
                    blob.url = target
                    blob.with_auth = blob.with_auth and keep_auth
                self.sched.retry_now(chunk_id)
            case Reauthenticate():
                blob.reauths += 1
                if blob.reauths > _MAX_REAUTH:
                    raise Unauthorized(f"unauthorized: blob {blob.digest} refused after login")
                source.reauthorize(response)
                self.sched.retry_now(chunk_id)
            case Reresolve():
                # Ask the registry again (once, however many requests to the old URL come
                # back refused).
                if current:
                    blob.url, blob.with_auth, blob.resolved, blob.hops = "", True, False, 0
                self._retry(index, chunk_id, report.position, 0.0, None)
            case RetryAfter(seconds):
                error = http_error(response, _what(blob))
                self._retry(index, chunk_id, report.position, seconds, error)
            case Fail() if report.status == 416:
                # Nothing at an offset below the declared size: the descriptor lies about
                # the blob, and no retry changes that.
                blob.ingest.discard()
                raise DigestMismatch(
                    f"blob {blob.digest} is shorter than the {blob.size} bytes its descriptor "
                    f"declares: the server has nothing at byte {report.position} "
                    f"(HTTP 416)",
                    expected=str(blob.digest),
                )
            case Fail():
                raise http_error(response, _what(blob))

    def _retry(
        self,
        index: int,
        chunk_id: int,
        position: int,
        wait: float | None,
        error: FastpullError | None,
    ) -> None:
        """Requeue a failed chunk after the backoff its own range's history calls for
        (``wait`` is the server's Retry-After; 0 to ask again at once)."""
        blob = self.blobs[index]
        blob.retries += 1
        now = time.monotonic()
        delay = self.sched.retries(chunk_id, position, now).delay(wait)
        outcome = self.sched.fail(chunk_id, position, now + delay, now)
        if outcome is Outcome.EXHAUSTED:
            raise error or ProtocolError(f"blob {blob.digest}: giving up after retries")
        if outcome is Outcome.RESTARTED:
            blob.verifier.restart()
        self.o.emit(events.LayerEvent(blob.digest, events.RETRYING, position, blob.size))

    # -- verification and commit ---------------------------------------------------------

    def _verify(self, index: int, blob: _Blob) -> None:
        blob.verifier.advance(self.sched.hashable(index))
        if blob.verifier.position < blob.size or not self.sched.complete_blob(index):
            return
        self.o.emit(events.LayerEvent(blob.digest, events.VERIFYING, blob.size, blob.size))
        if not blob.verifier.matches():
            if blob.digest_attempts >= _MAX_DIGEST_ATTEMPTS:
                blob.ingest.discard()  # the next run must not resume these bytes
                raise DigestMismatch(
                    f"blob {blob.digest}: downloaded content has digest "
                    f"{blob.digest.algorithm}:{blob.verifier.hexdigest()}; refused after "
                    f"{blob.digest_attempts} attempts"
                )
            blob.digest_attempts += 1
            blob.ingest.restart()
            blob.verifier.restart()
            blob.url, blob.resolved = "", False
            self.sched.replan(index, blob.digest_attempts)
            return
        # The fsync and rename go to the disk thread: the loop keeps feeding the workers.
        blob.commit = self.disk.run(functools.partial(_publish, blob, blob.verifier.hexdigest()))

    def _committed(self, blob: _Blob) -> None:
        """A commit ended: the blob is in the store, or its error is raised here."""
        assert blob.commit is not None
        blob.commit.result()
        blob.done = True
        self.o.emit(events.LayerEvent(blob.digest, events.DOWNLOAD_COMPLETE, blob.size, blob.size))
        started = blob.started if blob.started is not None else time.monotonic()
        self.results.append(
            BlobStats(
                blob.digest,
                blob.size,
                blob.downloaded,
                time.monotonic() - started,
                blob.digest_attempts,
                max(1, blob.connections),
                chunks=blob.chunks,
                retries=blob.retries,
                resumed=blob.resumed,
            )
        )


def _publish(blob: _Blob, hexdigest: str) -> None:
    """Commit a verified blob and release its ingest (on the disk thread)."""
    try:
        blob.ingest.commit(hexdigest)
    finally:
        blob.exit.close()


def _what(blob: _Blob) -> str:
    return f"blob {blob.digest}"
