"""The client's side of a cluster batch: connect, check the nodes, submit, gather.

:class:`ClusterFetcher` has the engine's ``fetch(blobs, sources, on_failure=)`` shape, so a
batch (``bulk``) runs unchanged over a cluster: it resolves manifests and computes the
missing blobs once, the cluster fetches them (each blob in exactly one task), and the batch
writes manifests and ``index.json`` here once an image's blobs are all in place.

Before anything is submitted, every node (the scheduler too: it unpickles each task) must
import the same fastpull, compared by version and by a digest of its source; a node
without fastpull would otherwise hang the job (Dask's workers die on a task they cannot
unpickle, and the task waits forever). Ctrl-C sets a Dask ``Event`` the tasks poll (a
cancelled Dask task keeps running otherwise), then cancels the futures.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastpull import __version__, cancel, events
from fastpull.cluster.plan import MIN_TASK_BYTES, BlobRef, Task, split
from fastpull.cluster.tasks import TaskResult, TaskSpec, progress_topic, run_task, stop_event
from fastpull.engine.download import BlobSource, BlobStats, Fetched
from fastpull.errors import ClusterError, FastpullError, Interrupted, UsageError
from fastpull.puller import RepositoryBlobs
from fastpull.registry.settings import Settings
from fastpull.types import Credentials, Descriptor, Digest

ENV_ADDRESS = "FASTPULL_CLUSTER"
# How long to try reaching the scheduler (Dask retries refused connections until then).
CONNECT_TIMEOUT = float(os.environ.get("FASTPULL_CLUSTER_TIMEOUT", "10"))
# Smallest task worth a Dask round trip and an engine start (``plan.MIN_TASK_BYTES``).
TASK_BYTES = int(os.environ.get("FASTPULL_CLUSTER_TASK_BYTES", MIN_TASK_BYTES))
# Dask notices a hung worker (alive, silent) only after its worker-ttl, 5 minutes by default
# and up to twice that: a run that hears nothing of its tasks for this long gives them up.
STALL_SECONDS = float(os.environ.get("FASTPULL_CLUSTER_STALL", "600"))
_WAIT_SECONDS = 0.2
# After Ctrl-C: how long running tasks get to notice the stop and journal what they wrote.
_STOP_GRACE_SECONDS = 10.0
_SCHEMES = ("tcp://", "tls://")


def check_address(address: str) -> str:
    """``address`` if it names a Dask scheduler fastpull can reach, else a usage error."""
    if not address.startswith(_SCHEMES) or len(address) <= len("tcp://"):
        raise UsageError(f"cluster address {address!r} must be tcp://HOST:PORT or tls://HOST:PORT")
    return address


@functools.cache
def identity() -> str:
    """This fastpull: its version and a digest of its Python source."""
    package = Path(importlib.import_module("fastpull").__file__ or "").parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return f"{__version__}+{digest.hexdigest()[:12]}"


def _import_identity() -> str:
    # Runs on every node: the worker side must import, or the task could never run there.
    importlib.import_module("fastpull.cluster.tasks")
    importlib.import_module("fastpull.cluster.relay")
    return identity()


class Cluster:
    """A connection to a Dask scheduler whose every node runs this fastpull."""

    def __init__(self, address: str, *, timeout: float = CONNECT_TIMEOUT) -> None:
        check_address(address)
        try:
            from distributed import Client
        except ImportError:
            raise UsageError("--cluster needs Dask: pip install 'fastpull[cluster]'") from None
        self.address = address
        try:
            self.client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        try:
            self._check_nodes()
        except BaseException:
            self.close()
            raise

    def _check_nodes(self) -> None:
        mine = identity()
        found: dict[str, str] = {}
        with _remote_errors(self.address):
            found["scheduler"] = str(
                self.client.run_on_scheduler(_guarded, _import_identity)  # type: ignore[arg-type]
            )
            names = {
                address: str(info.get("name", address))
                for address, info in self.client.scheduler_info()["workers"].items()
            }
            for address, reply in self.client.run(_guarded, _import_identity).items():
                found[f"worker {names.get(address, address)} at {address}"] = str(reply)
        if len(found) == 1:
            raise ClusterError(f"the Dask cluster at {self.address} has no workers")
        wrong = sorted(f"{node} ({reply})" for node, reply in found.items() if reply != mine)
        if wrong:
            raise ClusterError(
                f"cluster nodes do not run this fastpull {mine}: {', '.join(wrong)}; "
                "install the same version everywhere and restart the scheduler and workers"
            )

    @property
    def workers(self) -> int:
        """Workers connected now."""
        return len(self.client.scheduler_info()["workers"])

    def fetcher(
        self,
        store: Path,
        settings: Settings,
        on_event: events.Listener = events.ignore,
    ) -> ClusterFetcher:
        """An engine stand-in that fetches into ``store`` on the cluster's workers."""
        return ClusterFetcher(self, store, settings, on_event)

    def run(
        self,
        job: str,
        function: Callable[[Any], Any],
        specs: Sequence[tuple[Task, Any]],
        on_event: events.Listener,
        on_done: Callable[[Task, Any], None],
        on_lost: Callable[[Task, ClusterError], None],
        on_note: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Run ``function(spec)`` for every task on the workers, largest task first.

        Progress the tasks send is emitted as layer events on this thread, and their notes
        (``tasks.Forwarder.note``) go to ``on_note``, on this thread too. Each result
        goes to ``on_done``; a task that raised, whose workers kept dying
        (``KilledWorker``), or that nothing was heard of for :data:`STALL_SECONDS`, goes
        to ``on_lost``. Anything those raise, or Ctrl-C, stops the job: the running tasks
        are told through the job's ``Event`` (they stop at their next poll) and the
        queued ones are cancelled."""
        from distributed import Event

        progress: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        client = self.client
        with _remote_errors(self.address):
            client.subscribe_topic(progress_topic(job), lambda event: progress.put(event[1]))
            futures = {
                client.submit(
                    function,
                    spec,
                    key=f"fastpull-{job}-{task.number}",
                    pure=False,
                    priority=len(specs) - task.number,
                ): task
                for task, spec in specs
            }
            pending = set(futures)
            heard = time.monotonic()
            try:
                while pending:
                    done = _settled(pending, _WAIT_SECONDS)
                    pending -= done
                    if _forward(progress, on_event, on_note) or done:
                        heard = time.monotonic()
                    cancel.check()
                    for future in done:
                        _settle(future, futures[future], on_done, on_lost)
                    if pending and time.monotonic() - heard > STALL_SECONDS:
                        stalled = sorted((futures[f] for f in pending), key=lambda t: t.number)
                        Event(stop_event(job), client=client).set()
                        client.cancel(list(pending), reason="stalled")
                        pending.clear()
                        for task in stalled:
                            on_lost(task, _stalled(task))
            except BaseException:
                # Ctrl-C, or a failure that stops the batch (--fail-fast): the running tasks
                # stop (a pull's journal what they wrote, a copy's drop their scratch); the
                # queued ones never start.
                Event(stop_event(job), client=client).set()
                _settled(pending, _STOP_GRACE_SECONDS, every=True)
                client.cancel(list(pending), reason="stopped")
                raise
            finally:
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(progress_topic(job))
            _forward(progress, on_event, on_note)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _guarded(function: Callable[[], str]) -> str:
    """Run ``function`` on a node, turning any failure into the text of the mismatch."""
    try:
        return function()
    except Exception as exc:
        return f"cannot import fastpull: {type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _remote_errors(address: str) -> Iterator[None]:
    try:
        yield
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"lost the Dask scheduler at {address}: {exc}") from None


class ClusterFetcher:
    """``Downloader.fetch`` over a cluster (see the module docstring)."""

    def __init__(
        self, cluster: Cluster, store: Path, settings: Settings, on_event: events.Listener
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.settings = settings
        self.emit = on_event

    def fetch(
        self,
        blobs: Sequence[Descriptor],
        source: BlobSource | Mapping[Digest, BlobSource],
        *,
        on_failure: Callable[[Digest, FastpullError], None] | None = None,
    ) -> Fetched:
        """Fetch every blob on the cluster; as ``Downloader.fetch``."""
        refs, credentials = _blob_refs(blobs, source)
        if not refs:
            return Fetched(())
        tasks = split(refs, max(1, self.cluster.workers), min_task_bytes=TASK_BYTES)
        job = new_job()
        stats: list[BlobStats] = []

        def fail(digest: Digest, error: FastpullError) -> None:
            if on_failure is None:
                raise error
            on_failure(digest, error)

        def done(task: Task, result: TaskResult) -> None:
            if result.interrupted:
                raise Interrupted("interrupted on the cluster")
            stats.extend(s._replace(worker=result.worker) for s in result.stats)
            for digest, error in result.failures:
                fail(digest, error)

        def lost(task: Task, error: ClusterError) -> None:
            for blob in task.blobs:
                fail(blob.descriptor.digest, error)

        specs = [
            (
                task,
                TaskSpec(job, task.number, str(self.store), self.settings, task.blobs, credentials),
            )
            for task in tasks
        ]
        self.cluster.run(job, run_task, specs, self.emit, done, lost)
        return Fetched(tuple(stats))


def new_job() -> str:
    """A name for one run's tasks, unique across the cluster (Dask keys and events are
    global)."""
    return uuid.uuid4().hex[:12]


def _settle(
    future: Any,
    task: Task,
    on_done: Callable[[Task, Any], None],
    on_lost: Callable[[Task, ClusterError], None],
) -> None:
    try:
        result = future.result()
    except Exception as exc:
        # Raised by the task itself (a bug, a store a worker cannot open) or by Dask
        # (KilledWorker: every worker that tried it died).
        on_lost(task, ClusterError(f"task {task.number} failed on the cluster: {_describe(exc)}"))
    else:
        on_done(task, result)


def _stalled(task: Task) -> ClusterError:
    """The error of a task nothing was heard of for :data:`STALL_SECONDS`; should its
    worker wake up, the job's stop event ends it."""
    return ClusterError(
        f"no word from the cluster about task {task.number} for {STALL_SECONDS:g} s "
        "(a worker may hang); its blobs were given up"
    )


def _forward(
    progress: queue.SimpleQueue[dict[str, Any]],
    emit: events.Listener,
    on_note: Callable[[dict[str, Any]], None] | None,
) -> int:
    """Emit the progress the tasks sent, hand on their notes; how many messages there were."""
    forwarded = 0
    while True:
        try:
            message = progress.get_nowait()
        except queue.Empty:
            return forwarded
        forwarded += 1
        if message.get("note"):
            if on_note is not None:
                on_note(message)
            continue
        emit(
            events.LayerEvent(
                Digest.parse(str(message["digest"])),
                str(message["state"]),
                int(message["current"]),
                int(message["total"]),
            )
        )


def _settled(futures: set[Any], timeout: float, *, every: bool = False) -> set[Any]:
    """The futures that are done within ``timeout`` seconds: as soon as one is (or, with
    ``every``, all are)."""
    deadline = time.monotonic() + timeout
    while True:
        done = {f for f in futures if f.done()}
        finished = len(done) == len(futures) if every else bool(done)
        if finished or time.monotonic() >= deadline:
            return done
        time.sleep(0.05)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _blob_refs(
    blobs: Sequence[Descriptor], source: BlobSource | Mapping[Digest, BlobSource]
) -> tuple[list[BlobRef], tuple[tuple[str, Credentials], ...]]:
    """Where each blob comes from, as plain data, and the credentials of each registry."""
    refs: list[BlobRef] = []
    credentials: dict[str, Credentials] = {}
    for blob in blobs:
        where = source[blob.digest] if isinstance(source, Mapping) else source
        if not isinstance(where, RepositoryBlobs):
            raise TypeError(f"a cluster fetches only from registries, not {where!r}")
        registry = where.client.registry
        refs.append(BlobRef(blob, registry, where.repository))
        credentials.setdefault(registry, where.client.credentials)
    return refs, tuple(sorted(credentials.items()))


__all__ = [
    "ENV_ADDRESS",
    "Cluster",
    "ClusterFetcher",
    "check_address",
    "identity",
    "new_job",
]
