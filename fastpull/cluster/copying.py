"""``copy -f FILE --to REGISTRY[/PREFIX] --cluster ADDRESS``: a batch copy over a Dask
cluster, with no filesystem shared between the nodes.

The client (this module), on the machine that runs the command:

1. reads the batch, lists the tags of ``all_tags`` entries and resolves every source
   image's manifests, a few at a time, through a throwaway store (the user's store is not
   used: nothing of the copy rests on the client);
2. asks every destination repository, once per blob it needs, whether it has it
   (``HEAD``), and mounts into it what another repository of the same registry holds;
3. hands every blob a destination repository still lacks to the workers as relay tasks
   (``relay``: each digest in exactly one task, tasks balanced by bytes, largest first),
   with the repositories that lack it; a worker fetches it once, uploads it once per
   destination registry and mounts it into that registry's other repositories;
4. pushes each image's manifests as soon as all its blobs are at its destination: byte for
   byte as the source served them, platform manifests (by digest) before their index, the
   top one under the tag, each checked against the destination's ``Docker-Content-Digest``.

One image's failure (missing at the source, denied at the destination, a blob that never
verifies) fails that image only, unless ``fail_fast``. Ctrl-C stops the tasks (the job's
Dask ``Event``) and raises Interrupted; manifests are pushed only for complete images, so a
destination never names an image with missing blobs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from fastpull import cancel, events
from fastpull.batchfile import BatchEntry
from fastpull.bulk import selected_tags
from fastpull.cluster.client import TASK_BYTES, Cluster, new_job
from fastpull.cluster.plan import BlobRef, Task, split
from fastpull.cluster.relay import (
    RelayBlob,
    RelayResult,
    RelaySpec,
    Target,
    placement,
    run_relay,
)
from fastpull.errors import ClusterError, FastpullError, Interrupted, UsageError
from fastpull.mirror import CopyBatchResult, CopyOutcome, check_entries, entry_destination
from fastpull.puller import ImagePlan, Puller
from fastpull.pusher import Pusher
from fastpull.reference import Reference
from fastpull.registry.credentials import CredentialStore
from fastpull.registry.manifest import digest_of
from fastpull.registry.settings import Settings
from fastpull.registry.upload import EXISTS, MOUNTED, BlobResult
from fastpull.store.layout import Store
from fastpull.types import Descriptor, Digest, PlatformSelection

# Threads of the client's own registry work: resolving, HEADs, mounts, manifest pushes.
CLIENT_THREADS = 8
# A repository's HEADs or mounts one thread does in a row (with one token).
REPOSITORY_RUN = 32
# The most bytes one relay task fetches (one larger blob is a task alone): what a worker's
# scratch holds at most per task it runs at once.
SCRATCH_BYTES = int(os.environ.get("FASTPULL_CLUSTER_SCRATCH_BYTES", 8 * 1024**3))
_POLL_SECONDS = 0.2
_T = TypeVar("_T")
_U = TypeVar("_U")
# A blob at one repository of one destination registry.
_Place = tuple[str, str, Digest]


@dataclass(frozen=True)
class ClusterCopyResult(CopyBatchResult):
    """A batch copy's outcomes, and which worker moved each blob that was fetched."""

    moved_by: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``--report`` document of a local ``copy -f``, plus ``blobs``: each fetched
        blob's digest and the Dask worker that fetched and uploaded it."""
        document = super().to_json()
        document["blobs"] = [
            {"digest": digest, "worker": worker} for digest, worker in sorted(self.moved_by.items())
        ]
        return document


@dataclass
class _Image:
    """One image of the batch, from its entry to its outcome."""

    entry: BatchEntry
    ref: Reference
    default_tag: bool = False
    dest: Reference | None = None
    plan: ImagePlan | None = None
    outcome: CopyOutcome | None = None
    # Blobs not yet known to be at the destination.
    waiting: set[Digest] = field(default_factory=set)

    def failed(self, exc: FastpullError, status: str = events.FAILED) -> CopyOutcome:
        started = self.plan.started if self.plan is not None else time.monotonic()
        return CopyOutcome(
            str(self.ref),
            str(self.dest or ""),
            self.entry.origin,
            status,
            time.monotonic() - started,
            error=str(exc),
            exit_code=int(exc.exit_code) if status == events.FAILED else 0,
        )


class _Stop(Exception):
    """A failure with ``fail_fast``: the rest of the batch is skipped."""


def copy_batch_on_cluster(
    entries: Sequence[BatchEntry],
    *,
    to: str | None,
    cluster: Cluster,
    settings: Settings,
    platforms: PlatformSelection | None = None,
    credentials: CredentialStore | None = None,
    jobs: int | None = None,
    chunk_size: int | None = None,
    fail_fast: bool = False,
    on_event: events.Listener = events.ignore,
) -> ClusterCopyResult:
    """Copy every entry to its destination through the cluster's workers (see the module
    docstring). ``jobs`` and ``chunk_size`` are each task's upload threads and PATCH
    size. Raises Interrupted on Ctrl-C."""
    started = time.monotonic()
    check_entries(entries, to)
    lock = threading.Lock()

    def emit(event: events.Event) -> None:
        with lock:
            on_event(event)

    with tempfile.TemporaryDirectory(prefix="fastpull-cluster-copy-") as scratch:
        run = _ClusterCopy(
            cluster,
            Store.open(scratch),
            settings,
            platforms,
            credentials or CredentialStore(),
            emit,
            fail_fast,
            jobs,
            chunk_size,
        )
        try:
            images = run.copy(entries, to)
        finally:
            run.close()
    outcomes = tuple(image.outcome for image in images if image.outcome is not None)
    result = ClusterCopyResult(outcomes, time.monotonic() - started, run.moved_by)
    emit(result.finished())
    return result


class _ClusterCopy:
    """One batch copy's state on the client."""

    def __init__(
        self,
        cluster: Cluster,
        store: Store,
        settings: Settings,
        platforms: PlatformSelection | None,
        credentials: CredentialStore,
        emit: events.Listener,
        fail_fast: bool,
        jobs: int | None,
        chunk_size: int | None,
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.settings = settings
        self.platforms = platforms
        self.credentials = credentials
        self.emit = emit
        self.fail_fast = fail_fast
        self.jobs = jobs
        self.chunk_size = chunk_size
        self.moved_by: dict[str, str] = {}
        self.stopped = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._closing: list[Callable[[], None]] = []
        # What each place holds: how the blob got there, or why it never will.
        self._placed: dict[_Place, BlobResult | FastpullError] = {}
        self._waiting: dict[_Place, list[_Image]] = {}
        self._pushes: list[Future[None]] = []
        # Images complete before the plan is told (BatchPlanned): pushed right after it.
        self._ready: list[_Image] | None = []
        self._pool = ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="fastpull-copy")
        self._downloaded: dict[Digest, int] = {}
        # The destinations' clients, shared tokens and per-thread uploaders: the client
        # checks, mounts and pushes manifests; the blobs themselves go from the tasks.
        self._pusher = Pusher(store, settings=settings, credentials=credentials)
        self._closing.append(self._pusher.close)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for close in self._closing:
            with contextlib.suppress(Exception):
                close()

    # -- 1: expand and resolve ------------------------------------------------------------

    def copy(self, entries: Sequence[BatchEntry], to: str | None) -> list[_Image]:
        images = self._expand(entries)
        for image in images:
            if image.outcome is None:
                try:
                    image.dest = entry_destination(image.entry, image.ref, to)
                except FastpullError as exc:
                    self._finish(image, image.failed(exc))
        todo = [image for image in images if image.outcome is None]
        for image, plan in zip(todo, self._each(self._resolve, todo), strict=True):
            if isinstance(plan, ImagePlan):
                image.plan = plan
            else:
                self._finish(image, image.failed(plan))
        if not self.stopped:
            with contextlib.suppress(_Stop):
                self._deliver([image for image in images if image.outcome is None])
        for image in images:
            if image.outcome is None:
                skipped = UsageError("not copied: an earlier image failed")
                self._finish(image, image.failed(skipped, events.SKIPPED))
        return images

    def _expand(self, entries: Sequence[BatchEntry]) -> list[_Image]:
        images: list[_Image] = []
        for entry, tags in zip(entries, self._each(self._tags_of, entries), strict=True):
            if isinstance(tags, FastpullError):
                image = _Image(entry, entry.reference)
                self._finish(image, image.failed(tags))
                images.append(image)
            elif tags is None:
                images.append(_Image(entry, entry.reference, entry.default_tag))
            else:
                images += [_Image(entry, entry.reference.with_tag(t)) for t in tags]
        return images

    def _tags_of(self, entry: BatchEntry) -> list[str] | None:
        if not entry.all_tags:
            return None
        return selected_tags(entry, self._puller().tags(entry.reference))

    def _resolve(self, image: _Image) -> ImagePlan:
        return self._puller().resolve(
            image.ref,
            default_tag=image.default_tag,
            platforms=image.entry.platforms or self.platforms,
        )

    def _puller(self) -> Puller:
        puller: Puller | None = getattr(self._local, "puller", None)
        if puller is None:
            puller = self._local.puller = Puller(
                self.store, settings=self.settings, credentials=self.credentials
            )
            with self._lock:
                self._closing.append(puller.close)
        return puller

    # -- 2: what the destinations hold ----------------------------------------------------

    def _deliver(self, images: list[_Image]) -> None:
        places: dict[_Place, Descriptor] = {}
        for image in images:
            assert image.plan is not None and image.dest is not None
            for blob in image.plan.blobs:
                place = (image.dest.registry, image.dest.repository, blob.digest)
                places.setdefault(place, blob)
                self._waiting.setdefault(place, []).append(image)
                image.waiting.add(blob.digest)
        reachable = self._reach({registry for registry, _, _ in places})
        found = self._by_repository(lambda p: self._has(p, reachable), list(places))
        holders: dict[tuple[str, Digest], list[str]] = {}
        for (registry, repository, digest), has in found.items():
            if has is True:
                holders.setdefault((registry, digest), []).append(repository)
        for image in images:
            # A copy within one registry mounts from the source repository itself.
            assert image.plan is not None and image.dest is not None
            if image.dest.registry == image.ref.registry:
                for blob in image.plan.blobs:
                    key = (image.ref.registry, blob.digest)
                    holders.setdefault(key, []).append(image.ref.repository)
        lacking: list[_Place] = []
        for place, has in found.items():
            if isinstance(has, FastpullError):
                self._place(place, has)
            elif has:
                self._place(place, BlobResult(place[2], places[place].size, EXISTS))
            else:
                lacking.append(place)
        sources = {
            place: next((r for r in holders.get((place[0], place[2]), ()) if r != place[1]), None)
            for place in lacking
        }
        mountable = [place for place, source in sources.items() if source is not None]
        mounted = self._by_repository(
            lambda p: self._mount(p, places[p], sources[p] or ""), mountable
        )
        for place, result in mounted.items():
            if isinstance(result, BlobResult):
                self._place(place, result)
        relay = self._relay_blobs(images, [p for p in lacking if p not in self._placed])
        # Images that failed before this are not counted here (their lines came first).
        unfinished = sum(1 for image in images if image.outcome is None)
        self.emit(
            events.BatchPlanned(unfinished, len(relay), sum(blob.size for blob in relay.values()))
        )
        ready, self._ready = self._ready, None
        for image in ready or ():
            self._pushes.append(self._pool.submit(self._push, image))
        if relay and not self.stopped:
            self._run(relay)
        self._wait_for_pushes()

    def _reach(self, registries: set[str]) -> dict[str, FastpullError]:
        """Ping every destination registry once: those that cannot be used, and why."""
        pinged = self._each(lambda r: self._pusher.auth(r).base_url, sorted(registries))
        return {
            registry: answer
            for registry, answer in zip(sorted(registries), pinged, strict=True)
            if isinstance(answer, FastpullError)
        }

    def _has(self, place: _Place, unreachable: Mapping[str, FastpullError]) -> bool:
        registry, repository, digest = place
        if registry in unreachable:
            raise unreachable[registry]
        return self._pusher.uploader(registry).exists(repository, digest)

    def _mount(self, place: _Place, blob: Descriptor, source: str) -> BlobResult | None:
        """Mount a blob from ``source``, another repository of the registry that holds it;
        None when the registry would rather have it uploaded (then a task does)."""
        registry, repository, digest = place
        uploader = self._pusher.uploader(registry)
        location = uploader.start_upload(repository, digest, source)
        if location is None:
            return BlobResult(digest, blob.size, MOUNTED, mounted_from=source)
        # The registry opened an upload instead: close it, a task uploads the blob.
        uploader.cancel_session(location, repository)
        return None

    # -- 3: the relay tasks ---------------------------------------------------------------

    def _relay_blobs(self, images: list[_Image], lacking: list[_Place]) -> dict[Digest, RelayBlob]:
        """Every blob some repository lacks, fetched from the first image that names it."""
        targets: dict[Digest, list[Target]] = {}
        for registry, repository, digest in lacking:
            targets.setdefault(digest, []).append(Target(registry, repository))
        sources: dict[Digest, BlobRef] = {}
        for image in images:
            assert image.plan is not None
            for blob in image.plan.blobs:
                if blob.digest in targets and blob.digest not in sources:
                    sources[blob.digest] = BlobRef(blob, image.ref.registry, image.ref.repository)
        return {d: RelayBlob(sources[d], tuple(t)) for d, t in targets.items()}

    def _run(self, relay: dict[Digest, RelayBlob]) -> None:
        tasks = split(
            [b.source for b in relay.values()],
            max(1, self.cluster.workers),
            min_task_bytes=min(TASK_BYTES, SCRATCH_BYTES),
            max_task_bytes=SCRATCH_BYTES,
        )
        registries = {b.source.registry for b in relay.values()}
        registries |= {t.registry for b in relay.values() for t in b.targets}
        credentials = tuple((r, self.credentials.get(r)) for r in sorted(registries))
        job = new_job()
        specs = [
            (
                task,
                RelaySpec(
                    job,
                    task.number,
                    self.settings,
                    tuple(relay[b.descriptor.digest] for b in task.blobs),
                    credentials,
                    self.jobs,
                    self.chunk_size,
                ),
            )
            for task in tasks
        ]

        def done(task: Task, result: RelayResult) -> None:
            if result.interrupted:
                raise Interrupted("interrupted on the cluster")
            for stat in result.stats:
                if not stat.already_present:
                    self.moved_by[str(stat.digest)] = result.worker
                    self._downloaded[stat.digest] = stat.downloaded
            for target, delivered in result.delivered:
                self._place((target.registry, target.repository, delivered.digest), delivered)
            for digest, target, error in result.failures:
                for where in (target,) if target is not None else relay[digest].targets:
                    self._place((where.registry, where.repository, digest), error)
            # Uploads a stopping task dropped: their images fail rather than wait.
            lost(task, ClusterError(f"task {task.number} did not report every blob"))

        def lost(task: Task, error: ClusterError) -> None:
            for blob in task.blobs:
                for where in relay[blob.descriptor.digest].targets:
                    place = (where.registry, where.repository, blob.descriptor.digest)
                    if place not in self._placed:
                        self._place(place, error)
            if self.stopped:
                raise _Stop

        def note(message: dict[str, Any]) -> None:
            target, result = placement(message)
            # The worker that placed it, also when its task's result never comes (it died,
            # and the rerun skips what it had placed).
            self.moved_by.setdefault(str(result.digest), str(message.get("worker", "")))
            self._place((target.registry, target.repository, result.digest), result)

        self.cluster.run(job, run_relay, specs, self.emit, done, lost, note)

    # -- 4: manifests, once an image's blobs are all in place -------------------------------

    def _place(self, place: _Place, result: BlobResult | FastpullError) -> None:
        """``place`` holds its blob now (or never will): images that were waiting for it
        and need nothing else are finished. The first word about a place counts (a task
        reports each upload as it ends, then again in its result)."""
        if place in self._placed:
            return
        self._placed[place] = result
        for image in self._waiting.get(place, ()):
            if image.outcome is not None:
                continue
            if isinstance(result, FastpullError):
                self._finish(image, image.failed(result))
                continue
            image.waiting.discard(place[2])
            if image.waiting or self.stopped:
                continue
            if self._ready is not None:
                self._ready.append(image)  # pushed once the batch's plan is told
            else:
                self._pushes.append(self._pool.submit(self._push, image))

    def _push(self, image: _Image) -> None:
        assert image.plan is not None and image.dest is not None
        plan, dest = image.plan, image.dest
        try:
            manifests = manifests_to_push(plan)
            top_raw, top_type, top_digest = manifests[-1]
            if dest.digest is not None and dest.digest != top_digest:
                raise UsageError(
                    f"{dest.familiar}: the image's digest is {top_digest}; copy it by tag instead"
                )
            self.emit(events.PushStarted(dest.name))
            uploader = self._pusher.uploader(dest.registry)
            for raw, media_type, digest in manifests[:-1]:
                uploader.put_manifest(dest.repository, str(digest), raw, media_type)
            reference = str(top_digest) if dest.digest is not None or not dest.tag else dest.tag
            uploader.put_manifest(dest.repository, reference, top_raw, top_type)
        except FastpullError as exc:
            if isinstance(exc, Interrupted):
                raise
            self._finish(image, image.failed(exc))
            return
        self.emit(events.PushFinished(str(dest), reference, top_digest, len(top_raw)))
        self._finish(
            image,
            CopyOutcome(
                str(image.ref),
                str(dest),
                image.entry.origin,
                events.COPIED,
                time.monotonic() - plan.started,
                str(top_digest),
                self._credit(plan),
                self._results(image),
            ),
        )

    def _credit(self, plan: ImagePlan) -> int:
        """Bytes fetched for this image that no image finished before it counted."""
        with self._lock:
            return sum(self._downloaded.pop(b.digest, 0) for b in plan.blobs)

    def _results(self, image: _Image) -> tuple[BlobResult, ...]:
        """How each blob reached the image's repository; a blob another image of the same
        repository was credited with counts as already there."""
        assert image.plan is not None and image.dest is not None
        results = []
        with self._lock:
            for blob in image.plan.blobs:
                place = (image.dest.registry, image.dest.repository, blob.digest)
                result = self._placed[place]
                assert isinstance(result, BlobResult)
                credited = self._waiting[place][0] is not image
                results.append(BlobResult(blob.digest, blob.size, EXISTS) if credited else result)
        return tuple(results)

    def _finish(self, image: _Image, outcome: CopyOutcome) -> None:
        with self._lock:
            if image.outcome is not None:
                return
            image.outcome = outcome
        self.emit(outcome.event())
        if not outcome.ok and outcome.status == events.FAILED and self.fail_fast:
            self.stopped = True

    def _wait_for_pushes(self) -> None:
        while True:
            pending = [f for f in self._pushes if not f.done()]
            if not pending:
                break
            wait(pending, _POLL_SECONDS, FIRST_COMPLETED)
            cancel.check()
        for future in self._pushes:
            future.result()
        if self.stopped:
            raise _Stop

    # -- helpers --------------------------------------------------------------------------

    def _by_repository(
        self, work: Callable[[_Place], _U], places: Sequence[_Place]
    ) -> dict[_Place, _U | FastpullError]:
        """``work`` for every place, a repository's places together on one thread (in runs
        of at most :data:`REPOSITORY_RUN`): a token registry is then asked for each
        repository's scope once per run, not once per blob and thread."""
        repositories: dict[tuple[str, str], list[_Place]] = {}
        for place in places:
            repositories.setdefault(place[:2], []).append(place)
        runs = [
            group[start : start + REPOSITORY_RUN]
            for group in repositories.values()
            for start in range(0, len(group), REPOSITORY_RUN)
        ]
        answers = self._each(lambda run: [_isolated(work, place) for place in run], runs)
        found: dict[_Place, _U | FastpullError] = {}
        for run, answer in zip(runs, answers, strict=True):
            assert not isinstance(answer, FastpullError)  # each place's error is in its list
            found.update(zip(run, answer, strict=True))
        return found

    def _each(self, work: Callable[[_T], _U], inputs: Sequence[_T]) -> list[_U | FastpullError]:
        """``work`` over ``inputs`` on the client's threads; an error that concerns one
        image takes the place of its result. Ctrl-C is seen between results."""
        futures = [self._pool.submit(_isolated, work, x) for x in inputs]
        try:
            while not all(f.done() for f in futures):
                wait(futures, _POLL_SECONDS, FIRST_COMPLETED)
                cancel.check()
        finally:
            for future in futures:
                future.cancel()
        return [future.result() for future in futures]


def _isolated(work: Callable[[_T], _U], item: _T) -> _U | FastpullError:
    """``work(item)``, or the error that concerns that item alone."""
    try:
        return work(item)
    except FastpullError as exc:
        if isinstance(exc, Interrupted):
            raise
        return exc


def manifests_to_push(plan: ImagePlan) -> list[tuple[bytes, str, Digest]]:
    """What to push for an image, in order, top last: as the source served them. An index
    of which only some platforms were copied is re-made with just those, in its own
    media type."""
    children = [(p.manifest.raw, p.manifest.media_type, p.manifest.digest) for p in plan.manifests]
    index = plan.index
    if index is None:
        return children
    chosen = [p.entry for p in plan.manifests if p.entry is not None]
    if [d.digest for d in chosen] == [d.digest for d in index.manifests]:
        return [*children, (index.raw, index.media_type, index.digest)]
    raw = orjson.dumps(
        {
            "schemaVersion": 2,
            "mediaType": index.media_type,
            "manifests": [d.to_json() for d in chosen],
        }
    )
    return [*children, (raw, index.media_type, digest_of(raw, index.digest.algorithm))]


__all__ = ["ClusterCopyResult", "copy_batch_on_cluster", "manifests_to_push"]
