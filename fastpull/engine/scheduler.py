"""Which bytes to fetch next: blobs cut into HTTP Range chunks, retries, endgame splits.

Pure bookkeeping, no I/O, so every rule here is tested on its own
(``tests/unit/test_scheduler.py``). The engine asks for work, reports what happened, and
asks how far each blob is contiguous from byte 0 (what may be hashed).

Rules:
- The queue holds byte ranges, cut into chunks only as they are handed out, so each chunk's
  length can follow what the link has shown by then (:meth:`Scheduler.chunk_length`). A
  request is not free: it costs a round trip, and registry and client CPU (a ranged GET
  through the registry's middleware, a worker round trip), which on a shared machine comes
  out of the pull. A chunk pays for its request when it keeps a transfer busy for a good
  while; a second chunk of a blob pays only if a second transfer finishes the blob sooner.
  - A chunk is what one transfer carries in ``chunk_seconds``, but no more than an even
    share of the queue among the transfers waiting for work, so idle transfers are not
    left to split a long chunk a moment after it was cut (the endgame, below). The share
    is never less than what one transfer carries in ``request_seconds``, a quarter second,
    which keeps a request's fixed cost to a few percent: 2 MiB at 8 MiB/s per connection,
    where the tail is still shared by many transfers; several times that on loopback,
    where more transfers would only share the same CPU (a 33 MB image of five layers took
    18 requests there, now 9; up to 17 when the machine is busy and each transfer gets
    little).
  - The rate per transfer is that of the transfers finished so far (measured by the
    caller). The transfers running show a rate too (:meth:`Scheduler.running_rate`), and
    a chunk is never shorter than what one of them carries in ``request_seconds``. That
    is what a small image has to go by: its blobs are all under way, and the rest of each
    is cut as soon as its first answer is in, when at most a config blob has finished (a
    round trip's rate, whatever the link). It is trusted no further than that: it comes
    from the first moments, with few transfers under way, and counts the round trips.
  - The plan, for each blob's first request (before any transfer has received a byte) and
    until one has finished: chunks follow the whole job
    (``total / (connections * 4)``), so one 1 GiB layer alone keeps every connection busy,
    and so do many small layers. Longer first chunks would save a small image a request
    per layer on loopback, but cost it a third of a second behind an 8 MiB/s
    per-connection link (0.47 s → 0.79 s with 8 MiB ones: the endgame splits only chunks
    due in more than ``split_after``).
  - Lengths stay between ``min_chunk`` and ``max_chunk``, and a range under 1.5 chunks
    long is one request.
- Chunks are handed out largest blob first and, within a blob, in offset order, so each
  blob's hash frontier advances while it downloads.
- A failed chunk keeps what it wrote: the written part counts as done and only the rest
  goes back in the queue, after a backoff. Each byte range carries its own retry history
  (``responses.Retries``): only attempts that made no progress count against its attempts,
  with ceilings on all attempts and on the time without progress.
- Endgame: when a connection is idle and nothing is queued, the active chunk that would
  take longest to finish at its own rate is split at the middle of its remainder (aria2's
  rule, by time rather than bytes), so a slow connection never holds the tail; a chunk due
  within ``split_after`` seconds is left alone, as a split would cost more than it saves.
  The split takes effect only once the worker has acknowledged the new end, so two
  transfers never write the same bytes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from fastpull.registry.responses import Retries, RetryPolicy

MIB = 1 << 20


class Chunk(NamedTuple):
    """One request's worth of a blob: bytes ``[start, end)``."""

    id: int
    blob: int
    start: int
    end: int
    attempt: int = 1  # counting only attempts that made no progress
    retries: Retries | None = None  # the range's failed attempts so far (None: none)

    @property
    def length(self) -> int:
        return self.end - self.start


class Outcome(enum.Enum):
    """What became of a failed chunk."""

    REQUEUED = "requeued"  # the unwritten rest waits for a retry
    RESTARTED = "restarted"  # single-stream blob: everything from byte 0 again
    EXHAUSTED = "exhausted"  # out of attempts


@dataclass
class _Active:
    chunk: Chunk
    position: int
    since: float = 0.0  # when it was handed out
    shrinking: bool = False


@dataclass
class _Blob:
    size: int
    done: dict[int, int] = field(default_factory=dict)  # start → end of finished ranges
    prefix: int = 0  # bytes contiguous from 0 that are done
    single_stream: bool = False
    restarts: int = 0


class Policy(NamedTuple):
    """Chunking knobs; the defaults suit loopback and CDN-capped links alike."""

    connections: int = 16
    min_chunk: int = 2 * MIB
    max_chunk: int = 64 * MIB
    min_split: int = 2 * MIB
    # A chunk is split only if, at the rate it is getting, it would take longer than this
    # to finish: a split costs a request, and the bytes the server sent past the cut.
    split_after: float = 1.0
    # How long one chunk should take at the rate a transfer gets, once that rate is known,
    # and how long at least when the queue is shared among idle transfers.
    chunk_seconds: float = 1.0
    request_seconds: float = 0.25
    max_attempts: int = 6
    # The other bounds on a range's retries (progress, total, time); ``max_attempts`` wins.
    retry: RetryPolicy = RetryPolicy()


class Scheduler:
    """Chunk bookkeeping for a set of blobs of known sizes (identified by index)."""

    def __init__(
        self,
        sizes: list[int],
        policy: Policy | None = None,
        done: list[list[tuple[int, int]]] | None = None,
    ) -> None:
        """``done[i]`` lists ranges of blob ``i`` already written (resumed): they are not
        fetched again."""
        self.policy = policy or Policy()
        self._retry = self.policy.retry._replace(attempts=self.policy.max_attempts)
        self._blobs = [_Blob(size) for size in sizes]
        self._next_id = 0
        self._pending: list[tuple[float, Chunk]] = []
        self._active: dict[int, _Active] = {}
        # The same active chunks per blob, by start offset: the engine asks for one blob's
        # chunks, and for the one at its hashed edge, on every turn of its loop.
        self._active_at: list[dict[int, _Active]] = [{} for _ in sizes]
        for index, ranges in enumerate(done or []):
            for start, end in ranges:
                self._mark_done(index, max(0, start), min(sizes[index], end))
        missing = sum(size - self.received(i) for i, size in enumerate(sizes))
        target = missing // max(1, self.policy.connections * 4)
        self.chunk_size = max(self.policy.min_chunk, min(self.policy.max_chunk, target))
        for index in sorted(range(len(sizes)), key=lambda i: sizes[i], reverse=True):
            self._plan(index)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _new(
        self, blob: int, start: int, end: int, attempt: int, retries: Retries | None = None
    ) -> Chunk:
        return Chunk(self._new_id(), blob, start, end, attempt, retries)

    def chunk_length(
        self, per_transfer: float | None, free: int = 1, now: float | None = None
    ) -> int:
        """How long the next chunk should be when one transfer gets ``per_transfer`` bytes a
        second (None: none has finished yet, the plan's length) and ``free`` transfers are
        waiting for work: what one carries in ``chunk_seconds``, but no more than an even
        share of the queue, so idle transfers are not left to split a long chunk a moment
        after it was cut; and the share no less than what one carries in
        ``request_seconds``, so a request is worth its round trip.

        Never less than what one of the transfers running at ``now`` carries in
        ``request_seconds`` (:meth:`running_rate`).
        """
        if per_transfer is None:
            length = self.chunk_size
        else:
            queued = sum(chunk.length for _, chunk in self._pending)
            share = max(queued // max(1, free), int(per_transfer * self.policy.request_seconds))
            wanted = min(int(per_transfer * self.policy.chunk_seconds), share)
            length = max(self.policy.min_chunk, min(self.policy.max_chunk, wanted))
        running = None if now is None else self.running_rate(now)
        if running is None:
            return length
        return max(length, min(self.policy.max_chunk, int(running * self.policy.request_seconds)))

    def running_rate(self, now: float) -> float | None:
        """Bytes a second one transfer gets, over the transfers running at ``now``, each
        from its request on (None before any has received a byte).

        What a small image has to go by: its blobs' first chunks are all handed out at
        once, and the rest of each blob as soon as its first answer is in, when at most a
        config blob has finished, whose few bytes took a round trip whatever the link.
        Every host's transfers count: a batch from two registries at once is rare, and the
        rate only lengthens chunks that the endgame can split.
        """
        running = self._active.values()
        got = sum(a.position - a.chunk.start for a in running)
        waited = sum(now - a.since for a in running)
        return got / waited if got > 0 and waited > 0 else None

    def _gaps(self, blob: int) -> list[tuple[int, int]]:
        """The byte ranges of a blob that are neither done, nor being fetched, nor queued."""
        info = self._blobs[blob]
        taken = sorted(
            [(0, info.prefix), *info.done.items()]
            + [(a.chunk.start, a.chunk.end) for a in self._active_at[blob].values()]
            + [(c.start, c.end) for _, c in self._pending if c.blob == blob]
        )
        gaps: list[tuple[int, int]] = []
        position = 0
        for start, end in taken:
            if start > position:
                gaps.append((position, start))
            position = max(position, end)
        if position < info.size:
            gaps.append((position, info.size))
        return gaps

    def _plan(self, blob: int, attempt: int = 1) -> None:
        """Queue what a blob still misses, one range per gap (cut as handed out); a
        single-stream blob as one request from byte 0."""
        info = self._blobs[blob]
        if info.single_stream:
            self._pending.append((0.0, self._new(blob, 0, info.size, attempt)))
            return
        for gap_start, gap_end in self._gaps(blob):
            self._pending.append((0.0, self._new(blob, gap_start, gap_end, attempt)))
        if info.size == 0 and not self.active_chunks(blob) and not self._queued(blob):
            self._pending.append((0.0, self._new(blob, 0, 0, attempt)))

    # -- handing out work ----------------------------------------------------------------

    def next_chunk(
        self,
        now: float,
        eligible: Callable[[int], bool] = lambda _blob: True,
        length: Callable[[int], int] | None = None,
    ) -> Chunk | None:
        """The next chunk to start (it becomes active), or None if nothing is ready.

        ``eligible(blob)`` can hold back a blob's chunks (while its URL is being resolved).
        ``length(blob)`` is how long a chunk of that blob should be (default
        :attr:`chunk_size`); the rest of its queued range stays queued.
        """
        for i, (ready_at, queued) in enumerate(self._pending):
            if ready_at <= now and eligible(queued.blob):
                chunk = queued
                # A retry resumes the very range that failed, with that range's history.
                if queued.retries is None and not self._blobs[queued.blob].single_stream:
                    size = max(1, self.chunk_size if length is None else length(queued.blob))
                    stop = queued.start + size
                    if queued.end - stop >= max(1, size // 2):  # no runt chunk at the tail
                        chunk = queued._replace(id=self._new_id(), end=stop)
                        self._pending[i] = (ready_at, queued._replace(start=stop))
                if chunk is queued:
                    del self._pending[i]
                active = _Active(chunk, chunk.start, now)
                self._active[chunk.id] = active
                self._active_at[chunk.blob][chunk.start] = active
                return chunk
        return None

    def _deactivate(self, chunk_id: int) -> _Active:
        active = self._active.pop(chunk_id)
        del self._active_at[active.chunk.blob][active.chunk.start]
        return active

    def next_ready_time(self) -> float | None:
        """When the earliest waiting chunk becomes ready (None if the queue is empty)."""
        return min((t for t, _ in self._pending), default=None)

    @property
    def has_pending(self) -> bool:
        """Whether any chunk is queued (ready or waiting for its backoff)."""
        return bool(self._pending)

    def active_chunk(self, chunk_id: int) -> Chunk | None:
        """The chunk being fetched under ``chunk_id`` (None once it is no longer active)."""
        active = self._active.get(chunk_id)
        return active.chunk if active is not None else None

    def active_chunks(self, blob: int | None = None) -> list[Chunk]:
        """Chunks being fetched (of one blob, or all)."""
        actives = self._active.values() if blob is None else self._active_at[blob].values()
        return [a.chunk for a in actives]

    # -- what workers report -------------------------------------------------------------

    def progress(self, chunk_id: int, position: int) -> None:
        """A worker has written its chunk up to ``position``."""
        active = self._active.get(chunk_id)
        if active is not None:
            active.position = max(active.position, min(position, active.chunk.end))

    def complete(self, chunk_id: int) -> Chunk:
        """The whole chunk is written."""
        active = self._deactivate(chunk_id)
        self._mark_done(active.chunk.blob, active.chunk.start, active.chunk.end)
        return active.chunk

    def retries(self, chunk_id: int, position: int, now: float) -> Retries:
        """The retry history of active chunk ``chunk_id``'s range if its transfer failed
        at ``position`` at time ``now`` (what its backoff is based on)."""
        chunk = self._active[chunk_id].chunk
        # A single-stream blob restarts from byte 0: what it wrote is no progress.
        kept = 0 if self._blobs[chunk.blob].single_stream else position - chunk.start
        history = chunk.retries or self._retry.begin()
        return history.failed(max(0, min(kept, chunk.length)), now)

    def fail(
        self, chunk_id: int, position: int, ready_at: float, now: float | None = None
    ) -> Outcome:
        """The transfer stopped at ``position`` (at ``now``, by default ``ready_at``): keep
        what was written, requeue the rest to start at ``ready_at``."""
        retries = self.retries(chunk_id, position, ready_at if now is None else now)
        active = self._deactivate(chunk_id)
        chunk = active.chunk
        info = self._blobs[chunk.blob]
        if retries.exhausted:
            return Outcome.EXHAUSTED
        if info.single_stream:
            # Without Range support nothing can resume: start the blob over.
            info.done.clear()
            info.prefix = 0
            info.restarts += 1
            again = self._new(chunk.blob, 0, info.size, retries.attempt, retries)
            self._pending.insert(0, (ready_at, again))
            return Outcome.RESTARTED
        position = max(chunk.start, min(position, chunk.end))
        self._mark_done(chunk.blob, chunk.start, position)
        if position < chunk.end:
            retry = self._new(chunk.blob, position, chunk.end, retries.attempt, retries)
            self._pending.insert(0, (ready_at, retry))
        return Outcome.REQUEUED

    def retry_now(self, chunk_id: int) -> None:
        """Requeue an active chunk at once with the same attempt (redirect, re-login)."""
        active = self._deactivate(chunk_id)
        chunk = active.chunk
        if active.position > chunk.start and not self._blobs[chunk.blob].single_stream:
            self._mark_done(chunk.blob, chunk.start, active.position)
            chunk = self._new(chunk.blob, active.position, chunk.end, chunk.attempt, chunk.retries)
        self._pending.insert(0, (0.0, chunk))

    # -- endgame -------------------------------------------------------------------------

    def split_candidate(self, now: float) -> tuple[int, int] | None:
        """(chunk id, proposed new end) of the active chunk most worth splitting at ``now``,
        if any: the one that would take longest to finish at its own rate so far, if that
        is more than ``split_after`` seconds (one that has received nothing yet counts as
        endless once it has waited that long)."""
        best: _Active | None = None
        longest = self.policy.split_after
        for active in self._active.values():
            left = active.chunk.end - active.position
            if active.shrinking or left < 2 * self.policy.min_split:
                continue
            if self._blobs[active.chunk.blob].single_stream:
                continue
            got = active.position - active.chunk.start
            waited = now - active.since
            if got > 0:
                seconds = left * waited / got
            else:
                seconds = math.inf if waited >= self.policy.split_after else 0.0
            if seconds > longest:
                best, longest = active, seconds
        if best is None:
            return None
        best.shrinking = True
        return best.chunk.id, best.position + (best.chunk.end - best.position) // 2

    def shrunk(self, chunk_id: int, new_end: int) -> Chunk | None:
        """The worker agreed to stop at ``new_end``; queue the cut-off tail as a new chunk."""
        active = self._active.get(chunk_id)
        if active is None:
            return None  # it finished before the request arrived: nothing was cut
        active.shrinking = False
        old = active.chunk
        new_end = max(old.start, min(new_end, old.end))
        if new_end >= old.end:
            return None
        active.chunk = old._replace(end=new_end)
        tail = self._new(old.blob, new_end, old.end, old.attempt, old.retries)
        self._pending.insert(0, (0.0, tail))
        return tail

    # -- server ignored Range ------------------------------------------------------------

    def single_stream(self, blob: int) -> list[Chunk]:
        """Switch a blob to one plain GET from byte 0, dropping queued chunks and progress.

        Returns the blob's other active chunks: the caller cancels them and calls
        :meth:`forget` for each once its worker has stopped writing.
        """
        info = self._blobs[blob]
        info.single_stream = True
        info.done.clear()
        info.prefix = 0
        self._pending = [(t, c) for t, c in self._pending if c.blob != blob]
        return self.active_chunks(blob)

    def is_single_stream(self, blob: int) -> bool:
        """Whether the blob is fetched with one plain GET because Range was ignored."""
        return self._blobs[blob].single_stream

    def forget(self, chunk_id: int) -> None:
        """Drop an active chunk whose bytes no longer count (cancelled)."""
        if chunk_id in self._active:
            self._deactivate(chunk_id)

    def restart_single(self, blob: int) -> None:
        """Queue the plain GET of a blob switched to single stream (its others stopped)."""
        self._pending.insert(0, (0.0, self._new(blob, 0, self._blobs[blob].size, 1)))

    def replan(self, blob: int, attempt: int) -> None:
        """Fetch a whole blob again (its bytes did not hash to the digest)."""
        self._blobs[blob].done.clear()
        self._blobs[blob].prefix = 0
        self._pending = [(t, c) for t, c in self._pending if c.blob != blob]
        self._plan(blob, attempt)

    def drop(self, blob: int) -> list[Chunk]:
        """Give a blob up: its queued chunks go, and its active ones are returned (the
        caller stops them) and forgotten."""
        self._pending = [(t, c) for t, c in self._pending if c.blob != blob]
        active = self.active_chunks(blob)
        for chunk in active:
            self._deactivate(chunk.id)
        return active

    def refetch_done(self, blob: int) -> None:
        """Drop the blob's done ranges (resumed bytes that turned out stale) and queue them
        again, leaving running transfers alone: what they write is current."""
        self._blobs[blob].done.clear()
        self._blobs[blob].prefix = 0
        self._plan(blob)

    # -- how far each blob is ------------------------------------------------------------

    def _mark_done(self, blob: int, start: int, end: int) -> None:
        info = self._blobs[blob]
        if end <= start:
            return
        info.done[start] = max(end, info.done.get(start, end))
        while info.prefix in info.done:
            info.prefix = info.done.pop(info.prefix)

    def prefix(self, blob: int) -> int:
        """Bytes of the blob done contiguously from offset 0."""
        return self._blobs[blob].prefix

    def hashable(self, blob: int) -> int:
        """Bytes from offset 0 that are written and will never be written again.

        That is the done prefix, extended by the transfer running right at its edge: a
        failed transfer resumes where it stopped, so what it wrote stays. Not so for a
        single-stream blob, which restarts from 0 on failure.
        """
        info = self._blobs[blob]
        if info.single_stream:
            return info.prefix
        edge = self._active_at[blob].get(info.prefix)
        return edge.position if edge is not None else info.prefix

    def _queued(self, blob: int) -> bool:
        return any(c.blob == blob for _, c in self._pending)

    def complete_blob(self, blob: int) -> bool:
        """Every byte of the blob is written and no transfer of it is running or queued."""
        info = self._blobs[blob]
        return info.prefix >= info.size and not self._active_at[blob] and not self._queued(blob)

    def received(self, blob: int) -> int:
        """Bytes written so far, done or in flight (for progress display)."""
        info = self._blobs[blob]
        done = info.prefix + sum(end - start for start, end in info.done.items())
        flying = sum(a.position - a.chunk.start for a in self._active_at[blob].values())
        return min(info.size, done + flying)
