"""What runs on a Dask worker: one task's blobs through fastpull's own engine.

A task brings plain data: the store's path (the same on every node), the settings, the
blobs with the registry and repository each comes from, and, per registry, only the
credentials that registry needs. Credentials travel inside :class:`~fastpull.types.Credentials`,
whose ``repr`` hides every secret, because Dask logs a failed task's arguments; and a task
never raises for a blob's failure (it returns it as data), which keeps it out of that log.

The engine's worker processes are started with ``subprocess`` (Dask's worker processes are
daemons and may not use ``multiprocessing``); they exit when their parent's socket closes,
so a killed Dask worker leaves no orphans. A blob half-written when a worker died resumes
from its journal on the shared store when Dask runs the task again elsewhere.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fastpull import cancel, events
from fastpull.cluster.plan import BlobRef
from fastpull.engine.download import BlobSource, BlobStats
from fastpull.errors import FastpullError, Interrupted
from fastpull.puller import Puller, RepositoryBlobs
from fastpull.registry.settings import Settings
from fastpull.store.layout import Store
from fastpull.types import Credentials, Digest

# How often a running task looks for the client's stop request, and forwards progress.
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class TaskSpec:
    """Everything a worker needs for one task; pickled by Dask."""

    job: str
    number: int
    store: str
    settings: Settings
    blobs: tuple[BlobRef, ...]
    credentials: tuple[tuple[str, Credentials], ...] = ()

    def get(self, registry: str) -> Credentials:
        """The credentials this task carries for ``registry`` (a ``CredentialSource``)."""
        return dict(self.credentials).get(registry, Credentials())


@dataclass(frozen=True)
class TaskResult:
    """What one task did: blobs stored, blobs that could not be had, and where it ran."""

    number: int
    worker: str
    stats: tuple[BlobStats, ...] = ()
    failures: tuple[tuple[Digest, FastpullError], ...] = ()
    interrupted: bool = False
    seconds: float = 0.0


def progress_topic(job: str) -> str:
    """The Dask event topic a job's progress travels on."""
    return f"fastpull-progress-{job}"


def stop_event(job: str) -> str:
    """The name of the Dask ``Event`` the client sets to stop a job's running tasks."""
    return f"fastpull-stop-{job}"


def run_task(spec: TaskSpec) -> TaskResult:
    """Fetch ``spec``'s blobs into the shared store (runs on a Dask worker)."""
    started = time.monotonic()
    failures: list[tuple[Digest, FastpullError]] = []
    with running(spec.job) as (name, forward):
        try:
            stats = _fetch(spec, forward, lambda d, e: failures.append((d, e)))
        except Interrupted:
            return TaskResult(spec.number, name, interrupted=True)
    return TaskResult(
        spec.number, name, tuple(stats), tuple(failures), seconds=time.monotonic() - started
    )


@contextlib.contextmanager
def running(job: str) -> Iterator[tuple[str, Forwarder]]:
    """Around one task of ``job`` on a Dask worker: the worker's name, and a listener that
    forwards layer events (and notes) to the client; meanwhile a thread watches the job's
    stop ``Event`` and turns it into a cancel request (what the engine and uploads obey)."""
    from distributed import Event, get_client, get_worker

    worker = get_worker()
    name = str(worker.name)
    forward = Forwarder(lambda msg: worker.log_event(progress_topic(job), msg), name)
    # Bound to the worker's client explicitly: the watcher thread has no Dask context.
    stop = Event(stop_event(job), client=get_client())
    watching = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(stop, watching), name="fastpull-stop-watch", daemon=True
    )
    watcher.start()
    try:
        yield name, forward
    finally:
        watching.set()
        watcher.join()
        cancel.clear()


def _watch(stop: object, done: threading.Event) -> None:
    while not done.wait(POLL_SECONDS):
        # A scheduler that does not answer for a moment is asked again at the next poll.
        with contextlib.suppress(Exception):
            if stop.is_set():  # type: ignore[attr-defined]
                cancel.request()
                return


def _fetch(
    spec: TaskSpec,
    forward: Callable[[events.Event], None],
    on_failure: Callable[[Digest, FastpullError], None],
) -> list[BlobStats]:
    store = Store.open(spec.store, create=False)
    with Puller(store, settings=spec.settings, credentials=spec) as puller:
        sources: dict[Digest, BlobSource] = {
            b.descriptor.digest: RepositoryBlobs(puller.client(b.registry), b.repository)
            for b in spec.blobs
        }
        engine = puller.downloader(forward)
        fetched = engine.fetch([b.descriptor for b in spec.blobs], sources, on_failure=on_failure)
        return list(fetched.blobs)


@dataclass
class Forwarder:
    """Layer events to the client, state changes at once and byte counts (downloading,
    pushing) at most every :data:`POLL_SECONDS` per blob."""

    send: Callable[[dict[str, object]], None]
    worker: str
    _last: dict[str, float] = field(default_factory=dict)

    def note(self, fields: dict[str, object]) -> None:
        """Tell the client something other than a layer event, at once (``fields`` must
        be msgpack data)."""
        self.send({"note": True, **fields, "worker": self.worker})

    def __call__(self, event: events.Event) -> None:
        if not isinstance(event, events.LayerEvent):
            return
        digest = str(event.digest)
        now = time.monotonic()
        counting = event.state in (events.DOWNLOADING, events.PUSHING)
        if counting and now - self._last.get(digest, 0.0) < POLL_SECONDS:
            return
        self._last[digest] = now
        self.send(
            {
                "digest": digest,
                "state": event.state,
                "current": event.current,
                "total": event.total,
                "worker": self.worker,
                "host": socket.gethostname(),
            }
        )


__all__ = [
    "Forwarder",
    "TaskResult",
    "TaskSpec",
    "progress_topic",
    "run_task",
    "running",
    "stop_event",
]
