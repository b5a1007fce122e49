"""The engine loop's decisions, one at a time: a :class:`Job` over a real store, fed worker
reports by hand, with a fake worker pool and a fake clock (no network, no processes).

The same decisions run end to end in ``tests/integration/test_engine.py``; here each is
reached directly, including the ones only a scripted server could provoke there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xxhash

from fastpull.engine.job import Job, contained
from fastpull.engine.records import BlobRun, EngineConfig, Stage
from fastpull.engine.resume import Validator, judge_etag, written
from fastpull.engine.routing import Route
from fastpull.engine.verify import Verifier
from fastpull.engine.worker import (
    Answered,
    Cancel,
    Cancelled,
    Command,
    Done,
    Failed,
    Fetch,
    RangeIgnored,
    Report,
)
from fastpull.errors import (
    ConnectionFailed,
    FastpullError,
    Interrupted,
    NotFound,
    ServerError,
    StoreError,
)
from fastpull.registry.responses import RetryPolicy
from fastpull.registry.transport import Response, TLSConfig
from fastpull.store.diskqueue import DiskQueue
from fastpull.store.journal import Extent
from fastpull.store.layout import Store
from fastpull.types import Descriptor, Digest

MIB = 1 << 20
DIGEST = Digest.parse("sha256:" + "cd" * 32)
URL = f"https://r.example/v2/x/blobs/{DIGEST}"


@dataclass
class FakePool:
    """One worker that records what it is told and never answers."""

    load: list[int] = field(default_factory=lambda: [0])
    told: list[Command] = field(default_factory=list)

    def has_room(self, total: int) -> bool:
        return self.load[0] < total

    def assign(self, fetch: Fetch) -> int:
        self.load[0] += 1
        self.told.append(fetch)
        return 0

    def send(self, worker: int, command: Command) -> None:
        self.told.append(command)

    def released(self, worker: int) -> None:
        self.load[0] -= 1

    def receive(self, timeout: float) -> list[Report]:
        return []

    def fetches(self) -> list[Fetch]:
        return [c for c in self.told if isinstance(c, Fetch)]


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A registry that serves the blob at URL and never needs a login."""

    def blob_url(self, digest: Digest) -> str:
        return URL

    def authorization(self) -> dict[str, str]:
        return {"Authorization": "Bearer t"}

    def reauthorize(self, response: Response) -> dict[str, str]:
        raise AssertionError("no login expected")


@dataclass
class Setup:
    job: Job
    pool: FakePool
    clock: FakeClock
    failures: list[tuple[Digest, FastpullError]]

    @property
    def blob(self) -> BlobRun:
        return self.job.blobs[0]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """A job over one 4 MiB blob (two 2 MiB chunks over two connections), whose first
    answer already came (so both chunks go at once), retrying up to 20 times; backoff
    without jitter: attempt n waits n seconds."""
    monkeypatch.setattr(
        RetryPolicy,
        "delay",
        lambda self, attempt, retry_after=None: (
            float(attempt) if retry_after is None else retry_after
        ),
    )
    store = Store.open(tmp_path / "store")
    clock = FakeClock()
    config = EngineConfig(
        tls_for=lambda _url: TLSConfig(),
        connections=2,
        retry=RetryPolicy(attempts=20),
        clock=clock,
    )
    failures: list[tuple[Digest, FastpullError]] = []
    with contextlib.ExitStack() as stack:
        disk = DiskQueue()
        stack.callback(disk.close)
        blob_stack = stack.enter_context(contextlib.ExitStack())
        ingest = blob_stack.enter_context(store.ingest(DIGEST, 4 * MIB))
        ingest.preallocate()
        verifier = Verifier(DIGEST, ingest.fd, release=lambda *_: None)
        descriptor = Descriptor("application/octet-stream", DIGEST, 4 * MIB)
        blob = BlobRun(descriptor, ingest, blob_stack, verifier, Source())
        blob.route = Route(URL).data_from(URL)
        pool = FakePool()
        job = Job(config, [blob], pool, disk, lambda d, e: failures.append((d, e)))  # type: ignore[arg-type]
        yield Setup(job, pool, clock, failures)


def _reset(fetch: Fetch) -> Failed:
    return Failed(fetch.chunk_id, fetch.start, ConnectionFailed("connection reset"))


def test_a_chunks_first_failure_waits_the_first_attempt_delay(setup: Setup) -> None:
    job, pool, clock = setup.job, setup.pool, setup.clock
    job._dispatch(clock.now)
    first, second = pool.fetches()
    for attempt in range(1, 9):  # one chunk fails again and again...
        job._handle(_reset(first))
        assert job.sched.next_ready_time() == clock.now + attempt
        clock.now += attempt
        job._dispatch(clock.now)
        first = pool.fetches()[-1]
    assert setup.blob.retries == 8
    job._handle(_reset(second))  # ...the other's first failure waits as a first one does
    assert job.sched.next_ready_time() == clock.now + 1.0


def test_a_failure_that_made_progress_resumes_at_once(setup: Setup) -> None:
    job, pool, clock = setup.job, setup.pool, setup.clock
    job._dispatch(clock.now)
    first, _ = pool.fetches()
    error = ConnectionFailed("closed early")
    job._handle(Failed(first.chunk_id, first.start + MIB, error, checksum="00" * 16))
    assert job.sched.next_ready_time() == clock.now
    job._dispatch(clock.now)
    resumed = pool.fetches()[-1]
    assert (resumed.start, resumed.end) == (first.start + MIB, first.end)
    # What it wrote is journaled, with its worker's checksum, for the next run to resume.
    assert setup.blob.ingest.resumed == (Extent(first.start, first.start + MIB, "00" * 16),)


def test_a_refused_connection_is_push_back_and_a_reset_is_not(setup: Setup) -> None:
    job, pool, clock = setup.job, setup.pool, setup.clock
    controller = job.connections["r.example"]
    controller.limit = 8
    job._dispatch(clock.now)
    first, second = pool.fetches()

    job._handle(_reset(first))
    assert controller.limit == 8
    refused = ConnectionFailed("cannot reach registry r.example: refused", refused=True)
    job._handle(Failed(second.chunk_id, second.start, refused))
    assert controller.limit == 4
    # Like a 503, it is retried all the same.
    assert job.sched.next_ready_time() is not None


def test_range_ignored_waits_for_the_other_transfers_then_streams_once(setup: Setup) -> None:
    job, pool, clock = setup.job, setup.pool, setup.clock
    job._dispatch(clock.now)
    first, second = pool.fetches()
    job._handle(RangeIgnored(first.chunk_id, first.start))
    assert pool.told[-1] == Cancel(second.chunk_id)
    assert setup.blob.stage is Stage.SWITCHING
    job._dispatch(clock.now)
    assert pool.fetches()[-1] == second  # nothing new while the other still writes
    job._handle(Cancelled(second.chunk_id, second.start + 10))
    assert setup.blob.stage is Stage.FETCHING
    job._dispatch(clock.now)
    whole = pool.fetches()[-1]
    assert (whole.start, whole.end, whole.ranged) == (0, 4 * MIB, False)


def test_an_answer_that_fails_the_blob_stops_only_that_blob(setup: Setup) -> None:
    job, pool, clock = setup.job, setup.pool, setup.clock
    job._dispatch(clock.now)
    first, second = pool.fetches()
    answer = Answered(first.chunk_id, first.start, 404)
    job._guarded(0, job._handle, answer)
    assert setup.blob.stage is Stage.FAILED
    assert pool.told[-1] == Cancel(second.chunk_id)
    ((digest, error),) = setup.failures
    assert digest == DIGEST and isinstance(error, NotFound)
    job._handle(Done(second.chunk_id, second.end, "00" * 16))  # late: ignored
    assert pool.load == [0]


def test_a_redirect_moves_the_blob_and_resends_the_chunk(setup: Setup) -> None:
    job, pool, clock = setup.job, setup.pool, setup.clock
    setup.blob.route = Route()  # not resolved: the first request runs alone
    job._dispatch(clock.now)
    (first,) = pool.fetches()
    assert first.url == URL and dict(first.headers) == {"Authorization": "Bearer t"}
    cdn = "https://cdn.example/blob?sig=1"
    job._handle(Answered(first.chunk_id, first.start, 307, (("location", cdn),)))
    job._dispatch(clock.now)
    (again,) = pool.fetches()[1:]
    assert (again.url, again.headers, again.start) == (cdn, (), first.start)
    assert setup.blob.retries == 0


# -- the pure parts ------------------------------------------------------------------------

# (error, the caller listens for failures, the blob is finished already, fails only the blob)
CONTAINED = [
    (ServerError("503"), True, False, True),
    (NotFound("gone"), True, False, True),
    (ServerError("503"), False, False, False),  # nobody to tell: the run stops
    (ServerError("503"), True, True, False),  # a finished blob cannot fail again
    (StoreError("disk full"), True, False, False),  # the store concerns every blob
    (Interrupted("Ctrl-C"), True, False, False),
]


@pytest.mark.parametrize(("error", "listening", "finished", "only_the_blob"), CONTAINED)
def test_which_errors_fail_only_their_blob(
    error: FastpullError, listening: bool, finished: bool, only_the_blob: bool
) -> None:
    assert contained(error, listening=listening, finished=finished) is only_the_blob


# (ETag journaled with the ingest, the answer's, the blob's first answer judged already)
ETAGS = [
    (None, "", False, Validator.NONE),
    ('"a"', "", False, Validator.NONE),
    (None, '"a"', False, Validator.RECORD),
    (None, '"a"', True, Validator.RECORD),
    ('"a"', '"a"', False, Validator.SAME),
    ('"a"', '"b"', False, Validator.CHANGED),
    ('"a"', '"b"', True, Validator.SAME),  # later answers write current bytes either way
]


@pytest.mark.parametrize(("known", "etag", "checked", "verdict"), ETAGS)
def test_resumed_bytes_are_judged_by_the_first_etag(
    known: str | None, etag: str, checked: bool, verdict: Validator
) -> None:
    assert judge_etag(known, etag, checked) is verdict


def test_what_a_finished_transfer_adds_to_the_journal() -> None:
    error = ConnectionFailed("reset")
    assert written(Done(1, 300, "ab"), 100) == Extent(100, 300, "ab")
    assert written(Failed(1, 150, error, "cd"), 100) == Extent(100, 150, "cd")
    assert written(Cancelled(1, 120, "ef"), 100) == Extent(100, 120, "ef")
    assert written(Failed(1, 100, error), 100) is None  # nothing written
    assert written(Cancelled(1, 120, ""), 100) is None  # no checksum: cannot be trusted
    assert written(Answered(1, 100, 503), 100) is None
    assert written(RangeIgnored(1, 100), 100) is None


class RecordingVerifier(Verifier):
    """A verifier that notes which thread hashed each step."""

    def __init__(self, digest: Digest, fd: int) -> None:
        super().__init__(digest, fd, release=lambda *_: None)
        self.threads: list[str] = []

    def advance(self, to: int) -> int:
        self.threads.append(threading.current_thread().name)
        return super().advance(to)


def _job_over(
    store: Store,
    stack: contextlib.ExitStack,
    contents: list[bytes],
    hasher: ThreadPoolExecutor | None = None,
    tls_for: Callable[[str], TLSConfig] = lambda _url: TLSConfig(),
) -> tuple[Job, FakePool, list[RecordingVerifier]]:
    """A job over one blob per content, each blob's first answer already in (chunks go at
    once), on eight connections."""
    disk = DiskQueue()
    stack.callback(disk.close)
    blobs, verifiers = [], []
    for content in contents:
        digest = Digest.parse("sha256:" + hashlib.sha256(content).hexdigest())
        blob_stack = stack.enter_context(contextlib.ExitStack())
        ingest = blob_stack.enter_context(store.ingest(digest, len(content)))
        ingest.preallocate()
        verifier = RecordingVerifier(digest, ingest.fd)
        descriptor = Descriptor("application/octet-stream", digest, len(content))
        blob = BlobRun(descriptor, ingest, blob_stack, verifier, Source())
        blob.route = Route(URL).data_from(URL)
        blobs.append(blob)
        verifiers.append(verifier)
    pool = FakePool()
    config = EngineConfig(tls_for=tls_for, connections=8)
    job = Job(config, blobs, pool, disk, None, None, hasher)  # type: ignore[arg-type]
    return job, pool, verifiers


def _land(job: Job, pool: FakePool, contents: list[bytes], which: set[int]) -> None:
    """The bytes of the blobs ``which`` land: their transfers write them and end."""
    for fetch in pool.fetches():
        index = job.flights[fetch.chunk_id].blob
        if index in which:
            os.pwrite(
                job.blobs[index].ingest.fd, contents[index][fetch.start : fetch.end], fetch.start
            )
            job._handle(Done(fetch.chunk_id, fetch.end, "00" * 16))


@pytest.mark.parametrize("behind", [1, 2, 3])
def test_blobs_behind_their_download_are_hashed_at_once_on_the_hashing_threads(
    tmp_path: Path, behind: int
) -> None:
    store = Store.open(tmp_path / "store")
    contents = [bytes([n]) * (3 * MIB) for n in range(3)]
    with contextlib.ExitStack() as stack:
        hasher = ThreadPoolExecutor(2, thread_name_prefix="test-hash")
        stack.callback(hasher.shutdown)
        job, pool, verifiers = _job_over(store, stack, contents, hasher)
        job._dispatch(0.0)
        # The first ``behind`` blobs' bytes land; the others' are still on their way.
        _land(job, pool, contents, set(range(behind)))

        job._hash()

    hashed = [v for v in verifiers if v.threads]
    assert len(hashed) == behind
    expected = "test-hash" if behind > 1 else threading.current_thread().name
    assert all(v.threads[0].startswith(expected) for v in hashed)
    assert all(v.position == 3 * MIB for v in hashed)


def test_a_turn_looks_only_at_the_blobs_that_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(tmp_path / "store")
    contents = [bytes([n]) * MIB for n in range(6)]
    with contextlib.ExitStack() as stack:
        job, pool, _ = _job_over(store, stack, contents)
        asked: list[int] = []
        hashable = job.sched.hashable
        monkeypatch.setattr(
            job.sched, "hashable", lambda blob: asked.append(blob) or hashable(blob)
        )
        job._dispatch(0.0)
        job._hash()  # the first turn looks at every blob (see the test after the next)
        job._settle()
        asked.clear()
        _land(job, pool, contents, {4})

        job._hash()
        job._settle()
        assert set(asked) == {4}
        assert [b.stage for b in job.blobs].count(Stage.COMMITTING) == 1
        assert job.blobs[4].stage is Stage.COMMITTING

        asked.clear()  # a turn in which nothing was reported looks at no blob
        job._hash()
        job._settle()
        assert asked == []


def test_a_blob_hashed_in_several_steps_is_verified_without_another_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fastpull.engine.verify.STEP", MIB)
    store = Store.open(tmp_path / "store")
    contents = [bytes([7]) * (3 * MIB), bytes([8]) * MIB]
    with contextlib.ExitStack() as stack:
        job, pool, verifiers = _job_over(store, stack, contents)
        job._dispatch(0.0)
        _land(job, pool, contents, {0})
        turns = 0
        while job.blobs[0].stage is Stage.FETCHING and turns < 10:
            turns += 1
            job._hash()
            job._settle()

        assert job.blobs[0].stage is Stage.COMMITTING
        assert verifiers[0].position == 3 * MIB
        assert len(verifiers[0].threads) == turns == 3  # one step of a MiB per turn
        assert job.blobs[1].stage is Stage.FETCHING


def test_tls_settings_are_looked_up_once_per_origin(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    looked_up: list[str] = []

    def tls_for(url: str) -> TLSConfig:
        looked_up.append(url)
        return TLSConfig(ca_file=f"/ca/{url.split('/')[2]}.pem")

    contents = [bytes([n]) * MIB for n in range(4)]
    with contextlib.ExitStack() as stack:
        job, pool, _ = _job_over(store, stack, contents, tls_for=tls_for)
        job.blobs[3].route = Route("https://cdn.example/blob").data_from("https://cdn.example/blob")
        job._dispatch(0.0)

    fetches = pool.fetches()
    assert len(fetches) == 4
    assert sorted(looked_up) == sorted([URL, "https://cdn.example/blob"])
    by_url = {f.url: f.tls.ca_file for f in fetches}
    assert by_url == {URL: "/ca/r.example.pem", "https://cdn.example/blob": "/ca/cdn.example.pem"}


def test_a_blob_resumed_whole_is_verified_without_any_report(tmp_path: Path) -> None:
    # Its journal vouches for every byte (a run killed before the commit): nothing is
    # fetched, so no report will ever name it.
    store = Store.open(tmp_path / "store")
    contents = [bytes([9]) * MIB, bytes([10]) * MIB]
    digest = Digest.parse("sha256:" + hashlib.sha256(contents[0]).hexdigest())
    with store.ingest(digest, MIB) as ingest:
        ingest.preallocate()
        os.pwrite(ingest.fd, contents[0], 0)
        ingest.record(Extent(0, MIB, xxhash.xxh3_128_hexdigest(contents[0])))
    with contextlib.ExitStack() as stack:
        job, pool, verifiers = _job_over(store, stack, contents)
        assert [e.end for e in job.blobs[0].ingest.resumed] == [MIB]
        job._dispatch(0.0)
        assert {job.flights[f.chunk_id].blob for f in pool.fetches()} == {1}

        job._hash()
        job._settle()

        assert job.blobs[0].stage is Stage.COMMITTING
        assert verifiers[0].position == MIB
        assert job.blobs[1].stage is Stage.FETCHING
