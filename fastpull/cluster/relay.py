"""What runs on a Dask worker in a registry-to-registry batch: fetch, upload, forget.

A relay task brings plain data: the blobs, where each comes from (a repository of a source
registry) and the repositories of the destination registries that lack it, the settings,
and, per registry, only that registry's credentials (as :class:`~fastpull.cluster.tasks.TaskSpec`
does; their ``repr`` hides every secret, and failures come back as data, never raised, so
nothing of them reaches Dask's log of a failed task's arguments).

There is no shared filesystem. The task's blobs are fetched by fastpull's own engine into
a scratch store of its own, a temporary directory inside the Dask worker's local directory
(``FASTPULL_CLUSTER_SCRATCH`` names another base). Each blob is handed to the uploads as
soon as the engine has verified and committed it: through a :class:`~fastpull.pusher.Pusher`,
which skips what a repository has (``HEAD``), uploads a blob once per destination registry
and mounts it into the other repositories of that registry. Once a blob is at every
destination that needs it, its local copy is deleted. So a worker's disk holds at most the
bytes of the tasks it runs at once (its ``--nthreads``): a relay task is at most
``FASTPULL_CLUSTER_SCRATCH_BYTES`` (8 GiB), or one larger blob alone. The uploads of the
first blobs overlap the download of the rest, and each blob that reaches a repository is
told to the client at once (a note on the job's progress topic), so that the client pushes
an image's manifests as soon as its blobs are in place, not when the task ends.

The scratch directory is removed when the task ends, however it ends. A task whose worker
is killed leaves its directory behind in the worker's local directory, which Dask marks as
the dead worker's (by a lock file the dead process no longer holds): the next worker that
starts on that node with the same local directory (the nanny's replacement, or any other)
deletes it. Dask runs the task again elsewhere. Each blob a task places is also logged on
the task's own event topic at the scheduler (:func:`placed_topic`), so the rerun skips the
blobs the dead worker had placed at every target: what the death costs is the blobs that
were still on their way, whose bytes were on the dead machine's disk. Their uploads start
again from ``POST``: the session's Location lived in the dead worker's memory, and
distribution accepts only the latest one (and drops a session whose request broke off).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpull import cancel, events
from fastpull.cluster.plan import BlobRef
from fastpull.cluster.tasks import Forwarder, running
from fastpull.engine.download import BlobSource, BlobStats
from fastpull.errors import ClusterError, FastpullError, Interrupted
from fastpull.puller import Puller, RepositoryBlobs
from fastpull.pusher import Pusher
from fastpull.reference import Reference
from fastpull.registry.settings import Settings
from fastpull.registry.upload import BlobResult
from fastpull.store.layout import Store
from fastpull.types import Credentials, Descriptor, Digest

SCRATCH_ENV = "FASTPULL_CLUSTER_SCRATCH"
SCRATCH_PREFIX = "fastpull-relay-"
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Target:
    """A repository of a destination registry that must hold a blob."""

    registry: str
    repository: str

    @property
    def reference(self) -> Reference:
        """The repository as a reference (what the pusher addresses)."""
        return Reference.parse(f"{self.registry}/{self.repository}")


@dataclass(frozen=True)
class RelayBlob:
    """A blob, where to fetch it, and every repository it must reach."""

    source: BlobRef
    targets: tuple[Target, ...]

    @property
    def descriptor(self) -> Descriptor:
        return self.source.descriptor

    @property
    def size(self) -> int:
        return self.source.size


@dataclass(frozen=True)
class RelaySpec:
    """Everything a worker needs for one relay task; pickled by Dask."""

    job: str
    number: int
    settings: Settings
    blobs: tuple[RelayBlob, ...]
    credentials: tuple[tuple[str, Credentials], ...] = ()
    jobs: int | None = None
    chunk_size: int | None = None

    def get(self, registry: str) -> Credentials:
        """The credentials this task carries for ``registry`` (a ``CredentialSource``)."""
        return dict(self.credentials).get(registry, Credentials())


@dataclass(frozen=True)
class RelayResult:
    """What one relay task did: the blobs fetched, how each reached each target, the
    blobs (and targets; None for all of them) that could not be served, and where."""

    number: int
    worker: str
    stats: tuple[BlobStats, ...] = ()
    delivered: tuple[tuple[Target, BlobResult], ...] = ()
    failures: tuple[tuple[Digest, Target | None, FastpullError], ...] = ()
    interrupted: bool = False
    seconds: float = 0.0


def placed_topic(job: str, number: int) -> str:
    """The Dask event topic where task ``number`` of ``job`` logs each blob it placed: what
    a rerun of the task (its worker died) need not fetch again. Per task, so that the
    scheduler's bounded log of a topic holds one task's placements, not a whole job's."""
    return f"fastpull-placed-{job}-{number}"


def placed_before(spec: RelaySpec) -> set[Digest]:
    """The blobs of ``spec`` that an earlier run of this task placed at every target."""
    from distributed import get_client

    reached: dict[Digest, set[Target]] = {}
    for _when, message in get_client().get_events(placed_topic(spec.job, spec.number)):
        if isinstance(message, dict):
            target, result = placement(message)
            reached.setdefault(result.digest, set()).add(target)
    return {
        b.descriptor.digest
        for b in spec.blobs
        if set(b.targets) <= reached.get(b.descriptor.digest, set())
    }


def scratch_base() -> Path:
    """Where relay tasks on this worker keep their scratch stores."""
    from distributed import get_worker

    configured = os.environ.get(SCRATCH_ENV)
    return Path(configured or get_worker().local_directory)


def run_relay(spec: RelaySpec) -> RelayResult:
    """Fetch ``spec``'s blobs into a scratch store and upload them (runs on a Dask worker)."""
    started = time.monotonic()
    with running(spec.job) as (name, forward):
        base = scratch_base()
        base.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{spec.job}-", dir=base))
        relay = _Relay(spec, forward)
        try:
            relay.run(Store.open(scratch), skip=placed_before(spec))
        except Interrupted:
            return RelayResult(spec.number, name, interrupted=True)
        except FastpullError as exc:
            # Whatever stopped the task fails the blobs it had not done: data, never raised.
            done = {d for d, _, _ in relay.failures} | {r.digest for _, r in relay.delivered}
            relay.failures += [
                (b.descriptor.digest, None, exc)
                for b in spec.blobs
                if b.descriptor.digest not in done
            ]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return RelayResult(
        spec.number,
        name,
        tuple(relay.stats),
        tuple(relay.delivered),
        tuple(relay.failures),
        seconds=time.monotonic() - started,
    )


class _Relay:
    """One task's blobs: fetched by the engine, each uploaded to its targets as soon as it
    is committed, and deleted once every target has it."""

    def __init__(self, spec: RelaySpec, forward: Forwarder) -> None:
        from distributed import get_worker

        self.spec = spec
        self.forward = forward
        self._worker = get_worker()
        self.blobs = {b.descriptor.digest: b for b in spec.blobs}
        self.stats: list[BlobStats] = []
        self.delivered: list[tuple[Target, BlobResult]] = []
        self.failures: list[tuple[Digest, Target | None, FastpullError]] = []
        self._lock = threading.Lock()
        self._left: dict[Digest, int] = {}
        self._uploads: list[Future[BlobResult]] = []
        self._pusher: Pusher | None = None
        self._store: Store | None = None

    def run(self, store: Store, skip: set[Digest]) -> None:
        """Fetch and upload every blob of the task but those in ``skip`` (placed already)."""
        spec = self.spec
        self._store = store
        self.blobs = {d: b for d, b in self.blobs.items() if d not in skip}
        with (
            Puller(store, settings=spec.settings, credentials=spec) as puller,
            Pusher(
                store,
                settings=spec.settings,
                credentials=spec,  # type: ignore[arg-type]  # a CredentialSource
                jobs=spec.jobs,
                chunk_size=spec.chunk_size,
                on_event=self.forward,
            ) as pusher,
        ):
            self._pusher = pusher
            for registry in sorted({t.registry for b in self.blobs.values() for t in b.targets}):
                # Reached (and its credentials checked) here, not in the engine's thread.
                _ = pusher.auth(registry).base_url
            sources: dict[Digest, BlobSource] = {
                digest: RepositoryBlobs(puller.client(b.source.registry), b.source.repository)
                for digest, b in self.blobs.items()
            }
            engine = puller.downloader(self._listen)
            fetched = engine.fetch(
                [b.descriptor for b in self.blobs.values()], sources, on_failure=self._lost
            )
            self.stats = list(fetched.blobs)
            for stat in fetched.blobs:  # any the engine stored without saying so
                self._upload(stat.digest)
            self._wait()

    def _listen(self, event: events.Event) -> None:
        self.forward(event)
        if isinstance(event, events.LayerEvent) and event.state in _STORED:
            self._upload(event.digest)

    def _lost(self, digest: Digest, error: FastpullError) -> None:
        with self._lock:
            self.failures.append((digest, None, error))

    def _upload(self, digest: Digest) -> None:
        """Start the uploads of a blob the scratch store has now (once)."""
        blob = self.blobs.get(digest)
        assert self._pusher is not None
        with self._lock:
            if blob is None or digest in self._left:
                return
            self._left[digest] = len(blob.targets)
        for target in blob.targets:
            future = self._pusher.upload_blob(target.reference, blob.descriptor, True)
            future.add_done_callback(lambda f, t=target, b=blob: self._uploaded(t, b, f))
            with self._lock:
                self._uploads.append(future)

    def _uploaded(self, target: Target, blob: RelayBlob, future: Future[BlobResult]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        digest = blob.descriptor.digest
        if error is None:
            # At once, so the client can push an image's manifests while this task goes on;
            # and on the task's own topic, for a rerun of it to skip.
            note = placed(target, future.result())
            self.forward.note(note)
            self._worker.log_event(placed_topic(self.spec.job, self.spec.number), note)
        with self._lock:
            if error is None:
                self.delivered.append((target, future.result()))
            else:
                if not isinstance(error, FastpullError):
                    error = ClusterError(f"upload of {digest.short} failed: {error!r}")
                self.failures.append((digest, target, error))
            self._left[digest] -= 1
            done = self._left[digest] == 0
        if done and self._store is not None:
            # Every target has it (or will never get it): the local copy goes.
            Path(self._store.blob_path(digest)).unlink(missing_ok=True)

    def _wait(self) -> None:
        while True:
            with self._lock:
                pending = [f for f in self._uploads if not f.done()]
            if not pending:
                return
            wait(pending, _POLL_SECONDS, FIRST_COMPLETED)
            cancel.check()


_STORED = (events.DOWNLOAD_COMPLETE, events.ALREADY_EXISTS)


def placed(target: Target, result: BlobResult) -> dict[str, object]:
    """A blob that reached ``target``, as a note to the client (:func:`placement`)."""
    return {
        "registry": target.registry,
        "repository": target.repository,
        "digest": str(result.digest),
        "size": result.size,
        "outcome": result.outcome,
        "bytes_sent": result.bytes_sent,
        "mounted_from": result.mounted_from,
        "attempts": result.attempts,
    }


def placement(note: Mapping[str, Any]) -> tuple[Target, BlobResult]:
    """The target and result of a :func:`placed` note."""
    mounted_from = note.get("mounted_from")
    return Target(str(note["registry"]), str(note["repository"])), BlobResult(
        Digest.parse(str(note["digest"])),
        int(note["size"]),
        str(note["outcome"]),
        int(note["bytes_sent"]),
        str(mounted_from) if mounted_from is not None else None,
        int(note["attempts"]),
    )


__all__ = [
    "SCRATCH_ENV",
    "RelayBlob",
    "RelayResult",
    "RelaySpec",
    "Target",
    "placed",
    "placed_before",
    "placed_topic",
    "placement",
    "run_relay",
    "scratch_base",
]
