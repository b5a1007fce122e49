"""Chunk bookkeeping: planning, completion in any order, failures, endgame splits."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpull.engine.scheduler import MIB, Chunk, Outcome, Policy, Scheduler
from fastpull.registry.responses import RetryPolicy


def _drain(s: Scheduler, now: float = 0.0) -> list[Chunk]:
    chunks = []
    while (c := s.next_chunk(now)) is not None:
        chunks.append(c)
    return chunks


def test_small_blobs_are_one_request_and_big_ones_are_cut() -> None:
    s = Scheduler([1 * MIB, 1024 * MIB, 0], Policy(connections=16))
    chunks = _drain(s)
    # Largest blob first, in offset order; every chunk between min and max size.
    assert chunks[0].blob == 1 and chunks[0].start == 0
    big = [c for c in chunks if c.blob == 1]
    assert [c.start for c in big] == sorted(c.start for c in big)
    assert sum(c.length for c in big) == 1024 * MIB
    assert all(2 * MIB <= c.length <= 64 * MIB for c in big)
    assert len(big) >= 16  # enough to keep every connection busy
    small = [c for c in chunks if c.blob == 0]
    assert [(c.start, c.end) for c in small] == [(0, 1 * MIB)]
    assert [(c.start, c.end) for c in chunks if c.blob == 2] == [(0, 0)]


def test_chunks_are_cut_as_handed_out_to_the_length_asked() -> None:
    s = Scheduler([100 * MIB, 3 * MIB], Policy(connections=4))
    first = s.next_chunk(0.0, length=lambda _blob: 40 * MIB)
    assert first is not None and (first.blob, first.start, first.end) == (0, 0, 40 * MIB)
    # The rest stays queued as one range: a later, different length applies to it.
    second = s.next_chunk(0.0, length=lambda _blob: 10 * MIB)
    assert second is not None and (second.start, second.end) == (40 * MIB, 50 * MIB)
    # No runt: a remainder under half a chunk goes with the chunk before it.
    third = s.next_chunk(0.0, length=lambda _blob: 34 * MIB)
    assert third is not None and (third.start, third.end) == (50 * MIB, 100 * MIB)
    small = s.next_chunk(0.0, length=lambda _blob: 1 * MIB)
    assert small is not None and (small.blob, small.start, small.end) == (1, 0, 1 * MIB)
    assert len({first.id, second.id, third.id, small.id}) == 4


def test_a_single_stream_blob_is_never_cut() -> None:
    s = Scheduler([32 * MIB], Policy(connections=4, min_chunk=4 * MIB, max_chunk=4 * MIB))
    running = s.next_chunk(0.0)
    assert running is not None
    s.single_stream(0)
    s.forget(running.id)
    s.restart_single(0)
    whole = s.next_chunk(0.0, length=lambda _blob: 2 * MIB)
    assert whole is not None and (whole.start, whole.end) == (0, 32 * MIB)


def test_chunk_length_follows_the_rate_of_one_transfer() -> None:
    policy = Policy(connections=64, min_chunk=2 * MIB, max_chunk=64 * MIB, chunk_seconds=1.0)
    s = Scheduler([2048 * MIB], policy)
    # Unmeasured: cut for the whole job and the most transfers it may grow to.
    assert s.chunk_length(None) == s.chunk_size == 2048 * MIB // (64 * 4)
    assert s.chunk_length(10 * MIB) == 10 * MIB  # a CDN edge: a second's worth
    assert s.chunk_length(500 * MIB) == 64 * MIB  # loopback: the largest chunk
    assert s.chunk_length(100_000) == 2 * MIB  # a trickle: the smallest
    # Transfers waiting for work share what is queued: none is left to split another's chunk.
    assert s.chunk_length(40 * MIB, free=64) == 2048 * MIB // 64
    assert s.chunk_length(8 * MIB, free=4096) == 2 * MIB


def test_the_queue_share_is_never_less_than_a_quarter_second_of_transfer() -> None:
    s = Scheduler([24 * MIB], Policy(connections=64, request_seconds=0.25))
    # A loaded loopback link: 20 MiB/s per transfer, with 13 transfers waiting. An even
    # share (under 2 MiB) would cost a request each for a few milliseconds of transfer.
    assert s.chunk_length(20 * MIB, free=13) == 5 * MIB
    # Behind an 8 MiB/s-per-connection proxy, with the tail shared by 60 transfers, a
    # quarter second is the shortest chunk anyway: every transfer still gets work.
    assert s.chunk_length(8 * MIB, free=60) == 2 * MIB


SMALL = [20 * MIB, 8 * MIB, 4 * MIB, 1 * MIB, 256 * 1024, 1500]


def _first_requests(s: Scheduler) -> list[Chunk]:
    """Each blob's first chunk, handed out at 0 (the rest waits for its first answer)."""
    firsts = []
    while (c := s.next_chunk(0.0, lambda b: not s.active_chunks(b))) is not None:
        firsts.append(c)
    return firsts


def _the_rest(s: Scheduler, now: float, free: int, finished: float | None = None) -> list[Chunk]:
    """Everything queued, handed out at ``now`` to ``free`` waiting transfers, when the
    transfers finished so far got ``finished`` bytes a second each (None: none has)."""
    chunks: list[Chunk] = []

    def length(_blob: int) -> int:
        return s.chunk_length(finished, max(1, free - len(chunks)), now)

    while (c := s.next_chunk(now, length=length)) is not None:
        chunks.append(c)
    return chunks


def test_the_running_transfers_tell_the_rate_before_any_has_finished() -> None:
    s = Scheduler([8 * MIB, 8 * MIB], Policy(connections=4))
    a, _ = _first_requests(s)
    assert s.running_rate(1.0) is None  # nothing received yet: the plan's length
    assert s.chunk_length(None, 1, now=1.0) == s.chunk_size
    s.progress(a.id, a.start + 2 * MIB)
    # 2 MiB over two transfers waiting 1 s each since their requests.
    assert s.running_rate(1.0) == MIB


def test_the_running_transfers_never_shorten_the_plans_chunks() -> None:
    # Their rate counts the round trip: a high-latency link looks slow at first.
    s = Scheduler([2048 * MIB], Policy(connections=64))
    (first,) = _first_requests(s)
    s.progress(first.id, first.start + MIB)
    assert s.running_rate(1.0) == MIB
    assert s.chunk_length(None, 16, now=1.0) == s.chunk_size == 8 * MIB
    assert s.chunk_length(MIB, 16) == 2 * MIB  # a finished transfer's rate does


@pytest.mark.parametrize("config", [None, 1500 / 0.005], ids=["nothing", "the-config"])
def test_a_small_image_on_a_fast_link_takes_about_one_request_per_blob(
    config: float | None,
) -> None:
    # The ceiling of 64 transfers wants 2 MiB chunks (33 MiB / 256 is less). 20 ms after
    # the first requests, loopback has brought each up to 2 MiB: some 60 MiB/s per
    # transfer, 15 MiB in a quarter second, so the rest of each blob is one request. The
    # config blob may have finished: its 1500 bytes in a 5 ms round trip say nothing.
    s = Scheduler(SMALL, Policy(connections=64))
    firsts = _first_requests(s)
    for chunk in firsts:
        s.progress(chunk.id, chunk.start + 2 * MIB)
    rest = _the_rest(s, 0.02, 16 - len(firsts), finished=config)
    per_blob = [sum(c.blob == b for c in firsts + rest) for b in range(len(SMALL))]
    assert per_blob == [2, 2, 2, 1, 1, 1]


def test_a_small_image_on_a_slow_link_is_spread_over_many_transfers() -> None:
    # Behind 8 MiB/s per connection, 20 ms have brought each first request 160 KiB: the
    # rest goes in the plan's 2 MiB chunks, a quarter second each, and every transfer
    # waiting gets one.
    s = Scheduler(SMALL, Policy(connections=64))
    firsts = _first_requests(s)
    for chunk in firsts:
        s.progress(chunk.id, chunk.start + 160 * 1024)
    waiting = 16 - len(firsts)
    rest = _the_rest(s, 0.02, waiting)
    assert {c.length for c in rest} == {2 * MIB}
    assert len(rest) == (18 + 6 + 2) // 2 > waiting


def test_prefix_advances_only_over_contiguous_done_ranges() -> None:
    s = Scheduler([10 * MIB], Policy(connections=4, min_chunk=2 * MIB))
    a, b, c, *_ = _drain(s)
    s.complete(b.id)
    assert s.prefix(0) == 0
    s.progress(a.id, a.start + 1000)
    assert s.hashable(0) == 1000  # the transfer at the edge counts: it never rewrites
    s.complete(a.id)
    assert s.prefix(0) == b.end
    s.complete(c.id)
    assert s.prefix(0) == c.end


def test_failure_keeps_written_bytes_and_requeues_the_rest() -> None:
    s = Scheduler([8 * MIB], Policy(connections=1, min_chunk=4 * MIB, max_attempts=3))
    first = s.next_chunk(0.0)
    assert first is not None
    assert s.fail(first.id, first.start + 100, ready_at=5.0) is Outcome.REQUEUED
    assert s.prefix(0) == 100
    early = s.next_chunk(1.0)  # the backoff holds the retry back; the other chunk may go
    assert early is not None and early.start != 100
    retry = next(c for c in _drain(s, 10.0) if c.start == 100)
    assert (retry.end, retry.attempt) == (first.end, 2)
    assert s.fail(retry.id, retry.start, 0.0) is Outcome.REQUEUED
    third = next(c for c in _drain(s, 10.0) if c.start == 100)
    assert s.fail(third.id, third.start, 0.0) is Outcome.EXHAUSTED


def test_each_range_retries_on_its_own_history() -> None:
    # Many failures of one range of a blob leave the other ranges' first failure at the
    # first-attempt backoff: nothing blob-wide feeds the delay.
    s = Scheduler([8 * MIB], Policy(connections=1, min_chunk=4 * MIB, max_attempts=50))
    first, second = _drain(s)
    for _ in range(10):
        assert s.fail(first.id, first.start, 0.0) is Outcome.REQUEUED
        first = next(c for c in _drain(s) if c.start == first.start)
    assert first.attempt == 11
    retries = s.retries(second.id, second.start, 0.0)
    assert (retries.attempt, retries.fruitless) == (2, 1)


def test_attempts_that_make_progress_do_not_count() -> None:
    policy = Policy(connections=1, min_chunk=64 * MIB, max_chunk=64 * MIB, max_attempts=2)
    s = Scheduler([64 * MIB], policy)
    (chunk,) = _drain(s)
    for _ in range(63):  # every answer cut after 1 MiB
        assert s.fail(chunk.id, chunk.start + MIB, 0.0) is Outcome.REQUEUED
        (chunk,) = _drain(s)
        assert chunk.attempt == 1
    assert (chunk.start, chunk.end) == (63 * MIB, 64 * MIB)
    assert s.fail(chunk.id, chunk.start, 0.0) is Outcome.REQUEUED  # no progress: counts
    (chunk,) = _drain(s)
    assert s.fail(chunk.id, chunk.start + 10, 0.0) is Outcome.EXHAUSTED  # 10 bytes: none


def test_a_range_without_progress_for_too_long_gives_up() -> None:
    retry = RetryPolicy(max_idle=60.0)
    s = Scheduler([4 * MIB], Policy(connections=1, min_chunk=4 * MIB, max_attempts=50, retry=retry))
    (chunk,) = _drain(s)
    assert s.fail(chunk.id, chunk.start, ready_at=101.0, now=100.0) is Outcome.REQUEUED
    (chunk,) = _drain(s, 200.0)
    assert s.fail(chunk.id, chunk.start, ready_at=170.0, now=161.0) is Outcome.EXHAUSTED


def test_endgame_split_waits_for_the_acknowledged_end() -> None:
    s = Scheduler([64 * MIB], Policy(connections=1, min_chunk=64 * MIB, max_chunk=64 * MIB))
    only = s.next_chunk(0.0)
    assert only is not None and only.length == 64 * MIB
    s.progress(only.id, 16 * MIB)
    split = s.split_candidate(1.0)  # 16 MiB a second: 3 s to go
    assert split == (only.id, 40 * MIB)
    assert s.split_candidate(1.0) is None  # not twice while the worker has not answered
    assert not s.has_pending  # nothing queued until the worker acknowledges
    # The worker had already written past the proposed end.
    tail = s.shrunk(only.id, 41 * MIB)
    assert tail is not None and (tail.start, tail.end) == (41 * MIB, 64 * MIB)
    s.complete(only.id)
    assert s.prefix(0) == 41 * MIB
    got = s.next_chunk(0.0)
    assert got == tail
    s.complete(tail.id)
    assert s.complete_blob(0)


def test_split_of_a_chunk_that_finished_meanwhile_creates_nothing() -> None:
    s = Scheduler([64 * MIB], Policy(connections=1, min_chunk=64 * MIB, max_chunk=64 * MIB))
    only = s.next_chunk(0.0)
    assert only is not None
    assert s.split_candidate(1.0) is not None  # a second without a byte
    s.complete(only.id)
    assert s.shrunk(only.id, 10 * MIB) is None
    assert s.complete_blob(0)


def test_a_chunk_about_to_finish_is_not_split() -> None:
    s = Scheduler([64 * MIB], Policy(connections=1, min_chunk=64 * MIB, max_chunk=64 * MIB))
    only = s.next_chunk(0.0)
    assert only is not None
    assert s.split_candidate(0.1) is None  # nothing received, but only just asked for
    s.progress(only.id, 60 * MIB)
    assert s.split_candidate(1.0) is None  # 4 MiB left at 60 MiB/s: done in 0.07 s


def test_the_chunk_with_most_time_left_is_split_not_the_one_with_most_bytes() -> None:
    policy = Policy(connections=2, min_chunk=32 * MIB, max_chunk=32 * MIB)
    s = Scheduler([64 * MIB], policy)
    fast, slow = s.next_chunk(0.0), s.next_chunk(0.0)
    assert fast is not None and slow is not None
    s.progress(fast.id, fast.start + 4 * MIB)  # 28 MiB left at 4 MiB/s: 7 s
    s.progress(slow.id, slow.start + 20 * MIB // 10)  # 30 MiB left at 2 MiB/s: 15 s
    assert s.split_candidate(1.0) == (slow.id, slow.start + 2 * MIB + 15 * MIB)


def test_single_stream_fallback_restarts_from_zero() -> None:
    s = Scheduler([32 * MIB], Policy(connections=4, min_chunk=4 * MIB, max_chunk=4 * MIB))
    a, b = s.next_chunk(0.0), s.next_chunk(0.0)
    assert a is not None and b is not None
    s.complete(a.id)
    others = s.single_stream(0)
    assert [c.id for c in others] == [b.id]
    assert s.prefix(0) == 0 and not s.has_pending
    s.forget(b.id)
    s.restart_single(0)
    whole = s.next_chunk(0.0)
    assert whole is not None and (whole.start, whole.end) == (0, 32 * MIB)
    s.progress(whole.id, 10 * MIB)
    assert s.hashable(0) == 0  # a plain GET restarts from 0 on failure: nothing is final
    assert s.fail(whole.id, 10 * MIB, 0.0) is Outcome.RESTARTED
    again = s.next_chunk(0.0)
    assert again is not None and (again.start, again.end) == (0, 32 * MIB)


def test_replan_fetches_everything_again() -> None:
    s = Scheduler([16 * MIB], Policy(connections=2, min_chunk=4 * MIB, max_chunk=4 * MIB))
    for c in _drain(s):
        s.complete(c.id)
    assert s.complete_blob(0)
    s.replan(0, attempt=2)
    assert not s.complete_blob(0) and s.prefix(0) == 0
    again = _drain(s)
    assert sum(c.length for c in again) == 16 * MIB
    assert {c.attempt for c in again} == {2}


def _random_ranges(rng: random.Random, size: int) -> list[tuple[int, int]]:
    """Disjoint ranges of ``[0, size)``, as a journal could list them (maybe none)."""
    cuts = sorted({0, size, *(rng.randint(0, size) for _ in range(rng.randint(0, 6)))})
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a and rng.random() < 0.5]


def test_resumed_ranges_are_not_fetched_again() -> None:
    s = Scheduler(
        [40 * MIB],
        Policy(connections=2, min_chunk=4 * MIB, max_chunk=4 * MIB),
        [[(0, 10 * MIB), (20 * MIB, 21 * MIB)]],
    )
    assert s.prefix(0) == 10 * MIB
    assert s.received(0) == 11 * MIB
    chunks = _drain(s)
    assert (chunks[0].start, chunks[-1].end) == (10 * MIB, 40 * MIB)
    assert sum(c.length for c in chunks) == 29 * MIB
    assert all(c.end <= 20 * MIB or c.start >= 21 * MIB for c in chunks)


def test_a_blob_resumed_whole_needs_no_request() -> None:
    s = Scheduler([5 * MIB], Policy(connections=2), [[(0, 5 * MIB)]])
    assert _drain(s) == []
    assert s.complete_blob(0)


def test_refetch_done_queues_the_resumed_ranges_around_running_transfers() -> None:
    s = Scheduler(
        [16 * MIB], Policy(connections=1, min_chunk=4 * MIB, max_chunk=4 * MIB), [[(0, 8 * MIB)]]
    )
    running = s.next_chunk(0.0)
    assert running is not None and (running.start, running.end) == (8 * MIB, 12 * MIB)
    s.refetch_done(0)
    assert s.prefix(0) == 0
    again = _drain(s)
    spans = sorted((c.start, c.end) for c in again)
    assert spans == [(0, 4 * MIB), (4 * MIB, 8 * MIB), (12 * MIB, 16 * MIB)]


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, 4000), min_size=1, max_size=4), seed=st.integers(0, 2**32))
def test_random_schedules_cover_every_byte_exactly_once(sizes: list[int], seed: int) -> None:
    """Whatever was resumed, and whatever order chunks complete, fail, get split in, every
    byte ends up done exactly once."""
    rng = random.Random(seed)
    policy = Policy(connections=3, min_chunk=100, max_chunk=400, min_split=50, max_attempts=50)
    resumed = [_random_ranges(rng, size) for size in sizes]
    s = Scheduler(sizes, policy, resumed)
    written: list[list[tuple[int, int]]] = [list(ranges) for ranges in resumed]
    active: dict[int, Chunk] = {}
    position: dict[int, int] = {}
    pending_split: dict[int, int] = {}
    now = 0.0
    for _ in range(10_000):
        if all(s.complete_blob(i) for i in range(len(sizes))):
            break

        def length(_blob: int) -> int:
            return rng.randint(1, 500)

        now += 1.0
        while len(active) < 3 and (c := s.next_chunk(now, length=length)) is not None:
            active[c.id] = c
            position[c.id] = c.start
        if not active:
            continue
        cid = rng.choice(sorted(active))
        chunk = active[cid]
        action = rng.random()
        if action < 0.4:  # some bytes arrive (never past the chunk's current end)
            step = rng.randint(0, max(0, chunk.end - position[cid]))
            written[chunk.blob].append((position[cid], position[cid] + step))
            position[cid] += step
            s.progress(cid, position[cid])
        elif action < 0.6 and position[cid] == chunk.end:
            s.complete(cid)
            del active[cid]
        elif action < 0.7:
            assert s.fail(cid, position[cid], 0.0) is not Outcome.EXHAUSTED
            del active[cid]
        elif action < 0.85 and cid not in pending_split:
            split = s.split_candidate(now + rng.random())
            if split is not None:
                pending_split[split[0]] = split[1]
        elif pending_split:
            sid, end = pending_split.popitem()
            if sid in active:
                agreed = max(position[sid], end)
                s.shrunk(sid, agreed)
                c = active[sid]
                active[sid] = Chunk(c.id, c.blob, c.start, min(c.end, agreed), c.attempt)
    for i, size in enumerate(sizes):
        assert s.complete_blob(i), f"blob {i} unfinished"
        assert s.prefix(i) == size
        spans = sorted(x for x in written[i] if x[1] > x[0])
        covered = 0
        for start, end in spans:
            assert start >= covered, f"bytes {start}-{covered} written twice"
            covered = end
        assert covered == size
