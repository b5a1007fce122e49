"""One run of the engine over a set of claimed blobs: the loop that hands chunks to the
workers, reads their reports, and keeps one blob's failure from stopping the others.

The decisions are made elsewhere, each in its own module: which bytes next (``scheduler``),
what an HTTP answer means for a blob (``routing``), what goes into the resume journal and
whether resumed bytes still hold (``resume``), when a blob is verified and published
(``commit``), how many transfers the link rewards (``connections``). This module applies
them to the records (``records``) and talks to the workers (``pool``).

Per chunk, until its blob is committed or its attempts run out:
- 3xx: the first request of a blob follows redirects (other chunks wait), then every
  chunk goes to the final URL; the registry's ``Authorization`` goes only to its origin;
- 401 from the registry: re-authenticate and retry; 401/403 from a redirect target (a
  signed URL that expired): resolve again from the registry;
- 408/429/5xx, resets, stalls, short bodies: back off by the range's own attempts
  (Retry-After wins) and resume from the bytes already written;
- a 200 to a Range request: the server ignores Range; the blob falls back to one stream;
- the digest does not match: fetch the blob again, then fail with DigestMismatch.

On any stop (Ctrl-C, an error) the transfers in flight are cancelled and what they wrote is
journaled, so the next run resumes it.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future
from concurrent.futures import wait as wait_for
from urllib.parse import urlsplit

from fastpull import cancel, events
from fastpull.engine import commit
from fastpull.engine.commit import Verdict
from fastpull.engine.connections import HostConnections
from fastpull.engine.pool import WorkerPool
from fastpull.engine.records import BlobRun, BlobStats, EngineConfig, InFlight, Stage
from fastpull.engine.resume import Validator, judge_etag, written
from fastpull.engine.routing import Backoff, Reauthorize, Refuse, Resend, judge
from fastpull.engine.scheduler import Chunk, Outcome, Policy, Scheduler
from fastpull.engine.worker import (
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
)
from fastpull.errors import (
    ConnectionFailed,
    FastpullError,
    Interrupted,
    ProtocolError,
    StoreError,
)
from fastpull.registry.responses import origin
from fastpull.registry.transport import Response, tls_per_origin
from fastpull.store.diskqueue import DiskQueue
from fastpull.types import Digest

# On a stop, how long to wait for the transfers in flight to report what they wrote.
DRAIN_SECONDS = 0.5
# Journals are synced this often (off the loop). A process killed at any moment loses no
# record either way, the page cache outlives it; only a power cut can lose the newest,
# which costs a refetch of their ranges, never a wrong byte.
SYNC_INTERVAL = 0.5
# How often a blob's progress is told to listeners (the bars), at most.
EVENT_INTERVAL = 0.1
# How often the loop looks for finished commits while nothing else can wake it.
_COMMIT_POLL = 0.005

# Told of a blob that cannot be had (and of why), while the engine goes on with the others.
FailureListener = Callable[[Digest, FastpullError], None]


def contained(error: FastpullError, *, listening: bool, finished: bool) -> bool:
    """Whether ``error`` fails only its blob (the caller listens for failures, the blob is
    still going), rather than the whole run: the store and Ctrl-C concern every blob."""
    return listening and not finished and not isinstance(error, (StoreError, Interrupted))


class Job:
    """One run of the engine over a set of claimed blobs."""

    def __init__(
        self,
        config: EngineConfig,
        blobs: list[BlobRun],
        pool: WorkerPool,
        disk: DiskQueue,
        on_failure: FailureListener | None = None,
        publisher: Executor | None = None,
        hasher: Executor | None = None,
    ) -> None:
        self.config = config
        self.emit = config.emit
        self.clock = config.clock
        self.disk = disk
        # Where verified blobs are published (fsync, rename): ``publisher`` runs several at
        # once, so their fsyncs overlap instead of queueing behind each other on the disk
        # thread; without one they take their turn there.
        self._publish: Callable[[Callable[[], None]], Future[None]] = (
            publisher.submit if publisher is not None else disk.run
        )
        # Where several blobs' hashing steps run at once; without one, in turn on the loop.
        self._hasher = hasher
        self._sync_at = self.clock() + SYNC_INTERVAL
        self.on_failure = on_failure
        self.blobs = blobs
        self.pool = pool
        # Each blob's registry host: transfers are counted, and their number judged, per host.
        self.hosts = [urlsplit(b.source.blob_url(b.digest)).netloc.lower() for b in blobs]
        self.connections = HostConnections(
            config.connections,
            config.ceiling_for or (lambda _host: config.max_connections),
            pinned=config.pinned,
            idle_clock=config.idle_clock,
        )
        # Until the link's rate is known, chunks are cut for the most transfers the run may
        # grow to, so that a grown count finds work queued rather than waiting for the
        # endgame to split running chunks.
        policy = Policy(
            connections=max((self.connections[h].ceiling for h in self.hosts), default=1),
            max_attempts=config.retry.attempts,
            retry=config.retry,
        )
        resumed = [[(e.start, e.end) for e in b.ingest.resumed] for b in blobs]
        self.sched = Scheduler([b.size for b in blobs], policy, resumed)
        # Per host: bytes received since the controllers last heard of them, open transfers.
        self._received: Counter[str] = Counter()
        self._open: Counter[str] = Counter()
        # Per host, its blobs not finished yet: the hosts whose counts add up to the run's.
        self._unfinished: Counter[str] = Counter(self.hosts)
        self.flights: dict[int, InFlight] = {}
        self.results: list[BlobStats] = []
        # Per blob, the hashed prefix last told in a BlobHashed event.
        self._told: dict[int, int] = {}
        # The loop looks at the blobs that may have moved, not at every blob each turn (a
        # batch has hundreds): those a report or a step concerned since the last look, those
        # whose hash is still behind what is written, those being published. The first look
        # is at every blob: one resumed whole gets no report, and is only to be hashed.
        self._touched: set[int] = set(range(len(blobs)))
        self._behind: set[int] = set()
        self._committing: set[int] = set()
        # Looked up once per origin and run, not once per chunk.
        self._tls_for = tls_per_origin(config.tls_for)

    def run(self) -> list[BlobStats]:
        """Loop until every blob is stored or given up; the stats of those stored."""
        try:
            while self._running():
                cancel.check()
                for report in self._reports(self._wait(self.clock())):
                    index = None if isinstance(report, Progress) else self._blob_of(report)
                    self._guarded(index, self._handle, report)
                # Refill freed connections before hashing, which may take milliseconds.
                self._dispatch(self.clock())
                # After the refill: a transfer that just ended is not a free connection.
                self.connections.observe(self.clock(), self._received, self._open)
                self._received.clear()
                self._hash()
                self._settle()
                self._sync_journals()
                self.disk.check()
        except BaseException:
            self._drain()
            raise
        return self.results

    def _running(self) -> bool:
        """Whether some blob is neither stored nor given up."""
        return any(self._unfinished.values())

    def _settle(self) -> None:
        """Collect the commits that ended, and verify the blobs that moved this turn."""
        for index in sorted(self._committing):
            blob = self.blobs[index]
            assert blob.commit is not None
            if blob.commit.done():
                self._guarded(index, self._committed, index, blob)
        touched, self._touched = sorted(self._touched), set()
        for index in touched:
            blob = self.blobs[index]
            if blob.writing:
                self._guarded(index, self._verify, index, blob)

    def _reports(self, timeout: float) -> list[Report]:
        """What the workers report within ``timeout`` seconds. With no transfer in flight
        there is nothing to hear from them: the wait ends as soon as a commit does (or the
        backoff that ``timeout`` is), instead of polling for it."""
        if self.flights or timeout <= 0:
            return self.pool.receive(timeout)
        commits = [c for i in self._committing if (c := self.blobs[i].commit) is not None]
        if commits:
            wait_for(commits, timeout, return_when=FIRST_COMPLETED)
        else:
            cancel.pause(timeout)
        return []

    def _blob_of(self, report: Accepted | Finished | Shrunk) -> int | None:
        flight = self.flights.get(report.chunk_id)
        return flight.blob if flight is not None else None

    # -- failure isolation ---------------------------------------------------------------

    def _guarded(self, index: int | None, action: Callable[..., object], *args: object) -> None:
        """Run ``action``; an error of one blob fails only that blob when the caller asked
        to be told of failures instead."""
        try:
            action(*args)
        except FastpullError as exc:
            listening = self.on_failure is not None
            if index is None or not contained(
                exc, listening=listening, finished=self.blobs[index].finished
            ):
                raise
            self._give_up(index, exc)

    def _give_up(self, index: int, error: FastpullError) -> None:
        """Stop working on one blob: its transfers are cancelled, its ingest is left (with
        whatever was journaled), and the listener hears why."""
        blob = self.blobs[index]
        blob.stage = Stage.FAILED
        self._unfinished[self.hosts[index]] -= 1
        for chunk in self.sched.drop(index):
            self._tell(chunk.id, Cancel(chunk.id))
        blob.exit.close()
        assert self.on_failure is not None
        self.on_failure(blob.digest, error)

    def _drain(self) -> None:
        """Stop every transfer and journal what each wrote, for the next run to resume."""
        waiting = {c.id for c in self.sched.active_chunks()}
        # Whatever went wrong may have broken a worker too; the journal is best effort here.
        with contextlib.suppress(Exception):
            for chunk_id in waiting:
                self._tell(chunk_id, Cancel(chunk_id))
            deadline = self.clock() + DRAIN_SECONDS
            while waiting and self.clock() < deadline:
                for report in self.pool.receive(0.05):
                    if isinstance(report, Finished) and report.chunk_id in waiting:
                        waiting.discard(report.chunk_id)
                        self._journal(report)

    # -- pacing --------------------------------------------------------------------------

    def _sync_journals(self) -> None:
        now = self.clock()
        if now < self._sync_at:
            return
        self._sync_at = now + SYNC_INTERVAL
        for blob in self.blobs:
            if blob.writing:
                sync = blob.ingest.journal_sync()
                if sync is not None:
                    self.disk.later(sync)

    def _wait(self, now: float) -> float:
        if self._hashing_behind():
            return 0.0  # hash on at once; reports that came meanwhile are read anyway
        if self._committing:
            return _COMMIT_POLL
        ready = self.sched.next_ready_time()
        if ready is None or not self._room():
            return 0.05
        return min(0.05, max(0.0, ready - now))

    def _hashing_behind(self) -> bool:
        """Whether some blob has written bytes its verifier has not hashed yet."""
        return bool(self._hash_targets())

    # -- handing out work ----------------------------------------------------------------

    def _eligible(self, index: int) -> bool:
        # Until a blob's first request has answered with data, it runs alone: redirects
        # are followed once per blob, not once per chunk.
        blob = self.blobs[index]
        if blob.stage is not Stage.FETCHING:
            return False
        host = self.hosts[index]
        if self._open[host] >= self.connections[host].limit:
            return False
        return blob.route.resolved or not self.sched.active_chunks(index)

    def _limit(self) -> int:
        return self.connections.total(h for h, left in self._unfinished.items() if left)

    def _room(self) -> bool:
        return self.pool.has_room(self._limit())

    def _chunk_length(self, index: int) -> int:
        rate = self.connections[self.hosts[index]].per_transfer
        free = self._limit() - sum(self._open.values())
        return self.sched.chunk_length(rate, free, self.clock())

    def _dispatch(self, now: float) -> None:
        while self._room():
            chunk = self.sched.next_chunk(now, self._eligible, self._chunk_length)
            if chunk is None:
                break
            self._send(chunk, now)
        if not self.sched.has_pending and self._room():
            split = self.sched.split_candidate(now)
            if split is not None:
                self._tell(split[0], Shrink(*split))

    def _send(self, chunk: Chunk, now: float) -> None:
        blob = self.blobs[chunk.blob]
        if not blob.route.url:
            blob.route = blob.route.resolve(blob.source.blob_url(blob.digest))
        if blob.started is None:
            blob.started = now
            self.emit(events.LayerEvent(blob.digest, events.DOWNLOADING, 0, blob.size))
        url = blob.route.url
        headers = blob.source.authorization() if blob.route.with_auth else {}
        fetch = Fetch(
            chunk.id,
            url,
            tuple(headers.items()),
            str(blob.ingest.path),
            chunk.start,
            chunk.end,
            blob.size,
            self._tls_for(url),
            stall_seconds=self.config.stall_seconds,
        )
        blob.chunks += 1
        blob.connections = max(blob.connections, len(self.sched.active_chunks(chunk.blob)))
        worker = self.pool.assign(fetch)
        self._open[self.hosts[chunk.blob]] += 1
        self.flights[chunk.id] = InFlight(chunk.id, chunk.blob, worker, url, chunk.start, now)

    def _tell(self, chunk_id: int, command: Command) -> None:
        """Send ``command`` to the worker running chunk ``chunk_id``, if it still runs."""
        flight = self.flights.get(chunk_id)
        if flight is not None:
            self.pool.send(flight.worker, command)

    # -- what workers report -------------------------------------------------------------

    def _handle(self, report: Report) -> None:
        if not isinstance(report, Progress):
            index = self._blob_of(report)
            if index is not None:
                self._touched.add(index)
        match report:
            case Accepted():
                self._accepted(report)
            case Progress(positions):
                for chunk_id, position in positions:
                    self._moved(chunk_id, position)
            case Shrunk(chunk_id, end):
                self.sched.shrunk(chunk_id, end)
            case _:
                self._moved(report.chunk_id, report.position)
                self._finished(report)

    def _accepted(self, report: Accepted) -> None:
        """Judge resumed bytes by the ETag of the blob's first answer in this run."""
        index = self._blob_of(report)
        if index is None or self.blobs[index].stage is Stage.FAILED:
            return
        blob = self.blobs[index]
        verdict = judge_etag(blob.ingest.etag, report.etag, blob.etag_checked)
        if verdict is Validator.NONE:
            return
        if verdict is Validator.CHANGED:
            # Only the resumed ranges must come again: what this request writes is current.
            blob.ingest.restart()
            blob.verifier.restart()
            blob.resumed = 0
            self.sched.refetch_done(index)
        if verdict is not Validator.SAME:
            blob.ingest.record_etag(report.etag)
        blob.etag_checked = True

    def _journal(self, report: Finished) -> None:
        """Record the bytes a finished transfer wrote, as its worker checksummed them."""
        chunk = self.sched.active_chunk(report.chunk_id)
        extent = written(report, chunk.start) if chunk is not None else None
        if chunk is not None and extent is not None:
            self.blobs[chunk.blob].ingest.record(extent)

    def _moved(self, chunk_id: int, position: int) -> None:
        flight = self.flights.get(chunk_id)
        if flight is None or self.blobs[flight.blob].stage is Stage.FAILED:
            return
        blob = self.blobs[flight.blob]
        delta = position - flight.position
        if delta > 0:
            self._touched.add(flight.blob)
            flight.position = position
            blob.downloaded += delta
            self._received[self.hosts[flight.blob]] += delta
            blob.route = blob.route.data_from(flight.url)
            self.sched.progress(chunk_id, position)
            now = self.clock()
            if now - blob.reported >= EVENT_INTERVAL:
                blob.reported = now
                received = self.sched.received(flight.blob)
                self.emit(events.LayerEvent(blob.digest, events.DOWNLOADING, received, blob.size))

    def _finished(self, report: Finished) -> None:
        chunk_id = report.chunk_id
        flight = self.flights.pop(chunk_id)
        self.pool.released(flight.worker)
        self._open[self.hosts[flight.blob]] -= 1
        index = flight.blob
        blob = self.blobs[index]
        if blob.stage is Stage.FAILED:
            return  # cancelled by _give_up; the blob's ingest is closed already
        self._journal(report)
        if flight.stopping:
            # Whatever its transfer reported, it has stopped writing: that is the ack the
            # single-stream restart waits for (a Cancel sent after it ended gets no answer).
            self.sched.forget(chunk_id)
            if not self._stopping(index):
                self._restart_single(index)
            return
        match report:
            case Done():
                done = self.sched.complete(chunk_id)
                blob.route = blob.route.data_from(flight.url)
                took = self.clock() - flight.sent_at
                self.connections[self.hosts[index]].transferred(done.length, took)
            case Cancelled():
                self.sched.forget(chunk_id)
            case RangeIgnored():
                self._range_ignored(index, chunk_id)
            case Answered():
                self._answered(index, flight, report)
            case Failed(error=error):
                if not error.retryable:
                    raise error
                if isinstance(error, ConnectionFailed) and error.refused:
                    self.connections[self.hosts[index]].pushed_back(self.clock())
                self._retry(index, chunk_id, report.position, None, error)
            case _:
                raise TypeError(f"not a worker outcome: {report!r}")

    def _stopping(self, index: int) -> bool:
        return any(f.stopping for f in self.flights.values() if f.blob == index)

    def _restart_single(self, index: int) -> None:
        self.blobs[index].stage = Stage.FETCHING
        self.blobs[index].verifier.restart()
        self.sched.restart_single(index)

    def _range_ignored(self, index: int, chunk_id: int) -> None:
        """The server answered a Range request with the whole blob: one stream it is."""
        self.sched.forget(chunk_id)
        if self.sched.is_single_stream(index):
            return
        for other in self.sched.single_stream(index):
            self.flights[other.id].stopping = True
            self._tell(other.id, Cancel(other.id))
        if self._stopping(index):
            self.blobs[index].stage = Stage.SWITCHING
        else:
            self._restart_single(index)

    def _answered(self, index: int, flight: InFlight, report: Answered) -> None:
        """An HTTP answer that is not data, judged by the URL the request went to."""
        blob = self.blobs[index]
        registry = origin(blob.source.blob_url(blob.digest))
        response = Response(report.status, report.headers, report.body, flight.url)
        blob.route, step = judge(
            blob.route, blob.digest, blob.size, registry, response, report.position
        )
        match step:
            case Resend():
                self.sched.retry_now(flight.chunk_id)
            case Reauthorize(challenge):
                blob.source.reauthorize(challenge)
                self.sched.retry_now(flight.chunk_id)
            case Backoff(wait, error):
                if report.status in (429, 503):
                    self.connections[self.hosts[index]].pushed_back(self.clock())
                self._retry(index, flight.chunk_id, report.position, wait, error)
            case Refuse(error, discard):
                if discard:
                    blob.ingest.discard()
                raise error

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
        now = self.clock()
        delay = self.sched.retries(chunk_id, position, now).delay(wait)
        outcome = self.sched.fail(chunk_id, position, now + delay, now)
        if outcome is Outcome.EXHAUSTED:
            raise error or ProtocolError(f"blob {blob.digest}: giving up after retries")
        if outcome is Outcome.RESTARTED:
            blob.verifier.restart()
        self.emit(events.LayerEvent(blob.digest, events.RETRYING, position, blob.size))

    # -- verification and commit ---------------------------------------------------------

    def _hash(self) -> None:
        """Hash one step further into every blob whose written prefix is ahead of its hash.

        Several blobs are hashed at once on the hashing threads (the hash releases the GIL):
        on a fast link the download outruns hashing, whose prefixes wait on chunks still in
        flight, and what is left when the last bytes land would otherwise be hashed on one
        core, blob after blob, while the others sit idle.
        """
        targets = self._hash_targets()
        if self._hasher is None or len(targets) < 2:
            for index, target in targets.items():
                self._guarded(index, self.blobs[index].verifier.advance, target)
        else:
            steps = {
                index: self._hasher.submit(self.blobs[index].verifier.advance, target)
                for index, target in targets.items()
            }
            for index, step in steps.items():
                self._guarded(index, step.result)
        # A step hashes at most verify.STEP bytes: a large blob may still be behind.
        self._touched.update(targets)
        self._behind = {
            index
            for index, target in targets.items()
            if self.blobs[index].writing and self.blobs[index].verifier.position < target
        }

    def _hash_targets(self) -> dict[int, int]:
        """Per blob with written bytes its verifier has not hashed yet: how far it may hash.

        Only a report about a blob moves what of it is written (``Scheduler.hashable``),
        so the blobs looked at are those touched since the last look and those left behind
        by the last hashing step."""
        targets = {}
        for index in sorted(self._behind | self._touched):
            blob = self.blobs[index]
            if blob.writing:
                hashable = self.sched.hashable(index)
                if blob.verifier.position < hashable:
                    targets[index] = hashable
        return targets

    def _verify(self, index: int, blob: BlobRun) -> None:
        self._tell_hashed(index, blob)  # a restart since the last call, before new bytes
        if not commit.hashed(blob, self.sched.complete_blob(index)):
            self._tell_hashed(index, blob)
            return
        self.emit(events.LayerEvent(blob.digest, events.VERIFYING, blob.size, blob.size))
        if commit.judge(blob) is Verdict.REFETCH:
            self.sched.replan(index, blob.digest_attempts)
            self._tell_hashed(index, blob)
            return
        self._tell_hashed(index, blob, verified=True)
        # The fsync and rename run on another thread: the loop keeps feeding the workers.
        blob.stage = Stage.COMMITTING
        self._committing.add(index)
        blob.commit = self._publish(
            functools.partial(commit.publish, blob, blob.verifier.hexdigest())
        )

    def _tell_hashed(self, index: int, blob: BlobRun, *, verified: bool = False) -> None:
        """Emit BlobHashed when the final prefix of a blob's ingest moved (back to 0 after a
        restart); its last byte counts only once the digest matched, so a reader of the
        prefix (an upload streaming it) cannot finish a blob with the wrong content."""
        position = blob.verifier.position
        hashed = position if verified else max(0, min(position, blob.size - 1))
        if hashed != self._told.get(index, 0):
            self._told[index] = hashed
            self.emit(events.BlobHashed(blob.digest, str(blob.ingest.path), hashed, blob.size))

    def _committed(self, index: int, blob: BlobRun) -> None:
        """A commit ended: the blob is in the store, or its error is raised here."""
        assert blob.commit is not None
        self._committing.discard(index)
        blob.commit.result()
        blob.stage = Stage.DONE
        self._unfinished[self.hosts[index]] -= 1
        self.emit(events.LayerEvent(blob.digest, events.DOWNLOAD_COMPLETE, blob.size, blob.size))
        self.results.append(blob.stats(self.clock()))
