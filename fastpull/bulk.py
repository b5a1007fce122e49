"""Many images as one run (``fastpull pull -f FILE``), and the images a command line names.

Every image to pull comes as a :class:`~fastpull.batchfile.BatchEntry`. :func:`pull_each`
pulls them one after the other as ``docker pull`` (and ``-a``) does; :func:`pull_batch`
pulls them as one run:

1. Expand: ``all_tags`` entries list their repository's tags (filtered by ``tags``).
2. Resolve every image's manifests, a few at a time (:data:`RESOLVE_CONCURRENCY` threads,
   each with its own connections and tokens: a libcurl handle is not shared by threads).
3. Download the union of the missing blobs in ONE engine run, each blob from a repository
   that has it, so a layer shared by fifty images is fetched once and every connection
   stays busy until the end (the engine starts the largest blobs first).
   A blob that another process is downloading into the same store right now (its ingest
   lock is held) is left out of that run: images that do not need it are stored first,
   then the run waits on the lock, and finds the blob in the store instead of fetching it.
4. Store each image whose blobs are all present (manifests, index), and name them all in
   one rewrite of index.json.

In a batch, failures stay with their image: a tag that does not exist, a denied
repository, a blob that never matches its digest fail that image only, unless
``fail_fast``. The engine gives up on a bad blob alone (``Downloader.fetch``'s
``on_failure``) and goes on with the others; the images that need it fail. Only Ctrl-C /
SIGTERM and the store itself stop everything.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastpull import cancel, events
from fastpull.batchfile import BatchEntry
from fastpull.engine.download import BlobSource, BlobStats, Downloader
from fastpull.errors import FastpullError, Interrupted, UsageError
from fastpull.puller import ImagePlan, Puller, PullResult, RepositoryBlobs, StagedImage
from fastpull.reference import Reference
from fastpull.registry.credentials import CredentialStore
from fastpull.registry.settings import Settings
from fastpull.store.layout import Store, resolve_store_path
from fastpull.types import Descriptor, Digest, PlatformSelection

if TYPE_CHECKING:
    from fastpull.cluster.client import Cluster, ClusterFetcher

# Told of each image's plan before its blobs download (``copy -f`` starts uploads from it).
Resolved = Callable[[str, ImagePlan], None]

RESOLVE_CONCURRENCY = 8
_POLL_SECONDS = 0.2
_T = TypeVar("_T")
_U = TypeVar("_U")


@dataclass(frozen=True)
class ImageOutcome:
    """What happened to one image of a batch (a row of the summary and of ``--report``).

    ``new_bytes`` counts blobs downloaded by this run for the image; a blob several images
    need counts as new for the first image stored and as reused for the others, so the
    column adds up to what the run downloaded.
    """

    reference: str
    origin: str
    status: str
    new_bytes: int = 0
    reused_bytes: int = 0
    seconds: float = 0.0
    digest: str | None = None
    error: str | None = None
    exit_code: int = 0
    result: PullResult | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.status in (events.DOWNLOADED, events.UP_TO_DATE)

    def event(self) -> events.ImageDone:
        """The outcome as the event renderers show (and the summary table lists)."""
        return events.ImageDone(
            self.reference,
            self.status,
            self.new_bytes,
            self.reused_bytes,
            self.seconds,
            self.error or "",
        )

    def to_json(self) -> dict[str, Any]:
        """The ``--report`` record."""
        return {
            "image": self.reference,
            "source": self.origin,
            "status": self.status,
            "new_bytes": self.new_bytes,
            "reused_bytes": self.reused_bytes,
            "seconds": round(self.seconds, 3),
            "digest": self.digest,
            "error": self.error,
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True)
class BatchResult:
    """Every image's outcome, in batch-file order (``all_tags`` entries expanded in place)."""

    outcomes: tuple[ImageOutcome, ...]
    seconds: float
    bytes_downloaded: int
    # With a cluster: the Dask worker that moved each downloaded blob.
    moved_by: Mapping[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[ImageOutcome]:
        """Images that failed or were skipped."""
        return [o for o in self.outcomes if not o.ok]

    @property
    def exit_code(self) -> int:
        """0 when every image is stored; else the failures' common exit code, or 1."""
        codes = {o.exit_code for o in self.failed if o.status == events.FAILED}
        if not self.failed:
            return 0
        return codes.pop() if len(codes) == 1 else 1

    def to_json(self) -> dict[str, Any]:
        """The ``--report`` document."""
        document: dict[str, Any] = {
            "images": [o.to_json() for o in self.outcomes],
            "summary": {
                "images": len(self.outcomes),
                "failed": len(self.failed),
                "bytes_downloaded": self.bytes_downloaded,
                "seconds": round(self.seconds, 3),
            },
        }
        if self.moved_by:
            document["blobs"] = [
                {"digest": digest, "worker": worker}
                for digest, worker in sorted(self.moved_by.items())
            ]
        return document


@dataclass
class _Image:
    """One image of a run, from its batch entry to its outcome: the entry's position in the
    run, what to pull, then its plan once resolved, then what became of it."""

    entry: int
    ref: Reference
    origin: str
    platforms: PlatformSelection | None
    default_tag: bool = False
    plan: ImagePlan | None = None
    outcome: ImageOutcome | None = None

    @classmethod
    def of(cls, entry: BatchEntry, position: int = 0, tag: str | None = None) -> _Image:
        """The entry's image, or (``tag``) one of the tags an ``all_tags`` entry selects."""
        if tag is None:
            return cls(position, entry.reference, entry.origin, entry.platforms, entry.default_tag)
        return cls(position, entry.reference.with_tag(tag), entry.origin, entry.platforms)

    @property
    def waiting(self) -> bool:
        """Resolved, and neither stored nor failed yet."""
        return self.plan is not None and self.outcome is None

    def failed(self, exc: FastpullError, seconds: float = 0.0) -> ImageOutcome:
        return ImageOutcome(
            str(self.ref),
            self.origin,
            events.FAILED,
            seconds=seconds,
            error=str(exc),
            exit_code=int(exc.exit_code),
        )

    def skipped(self) -> ImageOutcome:
        return ImageOutcome(
            str(self.ref),
            self.origin,
            events.SKIPPED,
            error="not pulled: an earlier image failed",
        )


def selected_tags(entry: BatchEntry, all_tags: Sequence[str]) -> list[str]:
    """The tags of an ``all_tags`` entry's repository that it selects, in the registry's
    order; a UsageError when there are none."""
    tags = [t for t in all_tags if entry.wants_tag(t)]
    if not tags:
        which = " matching the 'tags' pattern" if entry.tags is not None else ""
        raise UsageError(f"repository {entry.reference.familiar_name} has no tags{which}")
    return tags


def _tags_of(entry: BatchEntry, puller: Puller) -> list[str | None]:
    """The tags an ``all_tags`` entry selects; ``[None]`` (the entry's own image) for any
    other entry."""
    if not entry.all_tags:
        return [None]
    return list(selected_tags(entry, puller.tags(entry.reference)))


def _isolated(exc: BaseException) -> bool:
    """Errors that fail one image; anything else (Ctrl-C, bugs) stops the batch."""
    return isinstance(exc, FastpullError) and not isinstance(exc, Interrupted)


def pull_batch(
    entries: Sequence[BatchEntry],
    *,
    settings: Settings,
    platforms: PlatformSelection | None = None,
    fail_fast: bool = False,
    credentials: CredentialStore | None = None,
    on_event: events.Listener = events.ignore,
    cluster: Cluster | None = None,
    on_resolved: Resolved | None = None,
) -> BatchResult:
    """Pull every entry; entries with their own ``store`` run as a batch of their own.

    ``platforms`` applies to entries that do not name theirs. Never raises for one
    image's failure (see the module docstring); raises Interrupted on Ctrl-C. With a
    ``cluster``, its workers fetch the blobs into the same store path. ``on_resolved(origin,
    plan)`` is told each image's plan before its blobs download.
    """
    started = time.monotonic()
    stores: dict[Path, list[int]] = {}
    for position, entry in enumerate(entries):
        path = resolve_store_path(entry.store or settings.store)
        stores.setdefault(path, []).append(position)
    slots: list[list[ImageOutcome]] = [[] for _ in entries]
    fetched: list[BlobStats] = []
    stop = False
    for path, positions in stores.items():
        group = [entries[p] for p in positions]
        if stop:
            outcomes = [[_Image.of(e).skipped()] for e in group]
        else:
            try:
                store = Store.open(path)
            except FastpullError as exc:
                outcomes = [[_report(on_event, _Image.of(e).failed(exc))] for e in group]
            else:
                run = _Run(
                    store,
                    settings,
                    platforms,
                    fail_fast,
                    credentials,
                    on_event,
                    cluster,
                    on_resolved,
                )
                outcomes, stats = run.pull(group)
                fetched += stats
            stop = fail_fast and any(not o.ok for found in outcomes for o in found)
        for position, found in zip(positions, outcomes, strict=True):
            slots[position] = found
    outcomes_flat = tuple(o for found in slots for o in found)
    result = BatchResult(
        outcomes_flat,
        time.monotonic() - started,
        sum(s.downloaded for s in fetched),
        {str(s.digest): s.worker for s in fetched if s.worker},
    )
    on_event(
        events.BatchFinished(
            len(result.outcomes), len(result.failed), result.bytes_downloaded, result.seconds
        )
    )
    return result


def pull_each(
    entries: Sequence[BatchEntry],
    *,
    settings: Settings,
    platforms: PlatformSelection | None = None,
    credentials: CredentialStore | None = None,
    on_event: events.Listener = events.ignore,
) -> list[PullResult]:
    """Pull the entries' images one after the other, as ``docker pull`` (and ``-a``) do:
    each image with its own events from ``Pulling from`` to ``Status:``, and the first
    failure raised as it is. Every entry is expanded (its tags listed) before the first
    image is pulled."""
    with contextlib.ExitStack() as stack:
        pullers: dict[Path, Puller] = {}

        def puller_for(entry: BatchEntry) -> Puller:
            path = resolve_store_path(entry.store or settings.store)
            if path not in pullers:
                puller = Puller(
                    Store.open(path),
                    settings=settings,
                    platform=platforms,
                    credentials=credentials,
                    on_event=on_event,
                )
                pullers[path] = stack.enter_context(puller)
            return pullers[path]

        todo = [
            (puller, _Image.of(entry, position, tag))
            for position, entry in enumerate(entries)
            for puller in (puller_for(entry),)
            for tag in _tags_of(entry, puller)
        ]
        return [
            puller.pull(image.ref, default_tag=image.default_tag, platforms=image.platforms)
            for puller, image in todo
        ]


def _report(emit: events.Listener, outcome: ImageOutcome) -> ImageOutcome:
    emit(outcome.event())
    return outcome


class _Run:
    """One store's share of a batch."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        platforms: PlatformSelection | None,
        fail_fast: bool,
        credentials: CredentialStore | None,
        emit: events.Listener,
        cluster: Cluster | None = None,
        on_resolved: Resolved | None = None,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.on_resolved = on_resolved
        self.settings = settings
        self.platforms = platforms
        self.fail_fast = fail_fast
        self.credentials = credentials
        self.emit = emit
        # Set by the first isolated failure with fail_fast: no further work starts.
        self.stopped = False
        # Blobs whose bytes count as new for an image already stored (see ImageOutcome).
        self._credited: set[Digest] = set()
        self._local = threading.local()
        self._pullers: list[Puller] = []
        self._lock = threading.Lock()

    def pull(
        self, entries: Sequence[BatchEntry]
    ) -> tuple[list[list[ImageOutcome]], list[BlobStats]]:
        """Outcomes per entry (several for ``all_tags``), and the numbers of every blob the
        run fetched."""
        try:
            main = self._new_puller()
            images = self._expand(entries)
            self._resolve(images)
            fetched = self._download_and_store(main, images)
        finally:
            for puller in self._pullers:
                puller.close()
        per_entry: list[list[ImageOutcome]] = [[] for _ in entries]
        for image in images:
            per_entry[image.entry].append(image.outcome or self._report(image.skipped()))
        return per_entry, fetched

    # -- 1 and 2: expand and resolve, concurrently ---------------------------------------

    def _new_puller(self) -> Puller:
        puller = Puller(
            self.store,
            settings=self.settings,
            platform=self.platforms,
            credentials=self.credentials,
        )
        with self._lock:
            self._pullers.append(puller)
        return puller

    def _thread_puller(self) -> Puller:
        puller: Puller | None = getattr(self._local, "puller", None)
        if puller is None:
            puller = self._local.puller = self._new_puller()
        return puller

    def _expand(self, entries: Sequence[BatchEntry]) -> list[_Image]:
        """Every entry's images, in entry order; an entry whose tags cannot be listed is one
        failed (or, after a fail-fast stop, skipped) image."""
        images: list[_Image] = []
        for position, (entry, found) in enumerate(
            zip(entries, self._concurrently(self._tags_of, entries), strict=True)
        ):
            if isinstance(found, list):
                images += [_Image.of(entry, position, tag) for tag in found]
            else:
                image = _Image.of(entry, position)
                image.outcome = self._report(
                    image.failed(found) if found is not None else image.skipped()
                )
                images.append(image)
        return images

    def _tags_of(self, entry: BatchEntry) -> list[str | None]:
        return _tags_of(entry, self._thread_puller())

    def _resolve(self, images: list[_Image]) -> None:
        todo = [image for image in images if image.outcome is None]
        for image, plan in zip(todo, self._concurrently(self._plan, todo), strict=True):
            if isinstance(plan, ImagePlan):
                image.plan = plan
            elif plan is not None:
                image.outcome = self._report(image.failed(plan))
        if self.stopped:
            for image in images:
                image.plan = None
        if self.on_resolved is not None:
            for image in images:
                if image.plan is not None:
                    self.on_resolved(image.origin, image.plan)

    def _plan(self, image: _Image) -> ImagePlan:
        return self._thread_puller().resolve(
            image.ref, default_tag=image.default_tag, platforms=image.platforms
        )

    def _concurrently(
        self, work: Callable[[_T], _U], inputs: Sequence[_T]
    ) -> list[_U | FastpullError | None]:
        """``work`` over ``inputs`` in threads; an isolated error takes the place of its
        result, and None the place of work not done because of fail-fast."""
        results: list[_U | FastpullError | None] = [None] * len(inputs)
        if not inputs or self.stopped:
            return results
        workers = min(RESOLVE_CONCURRENCY, len(inputs))
        with ThreadPoolExecutor(workers, thread_name_prefix="fastpull-resolve") as pool:
            index: dict[Future[_U], int] = {pool.submit(work, x): i for i, x in enumerate(inputs)}
            pending = set(index)
            try:
                while pending and not self.stopped:
                    done, pending = wait(pending, _POLL_SECONDS, FIRST_COMPLETED)
                    cancel.check()
                    for future in done:
                        exc = future.exception()
                        if exc is None:
                            results[index[future]] = future.result()
                        elif _isolated(exc):
                            assert isinstance(exc, FastpullError)
                            results[index[future]] = exc
                            self.stopped = self.fail_fast
                        else:
                            raise exc
            finally:
                for future in pending:
                    future.cancel()
        return results

    # -- 3 and 4: one engine run, then store each image ----------------------------------

    def _download_and_store(self, main: Puller, images: list[_Image]) -> list[BlobStats]:
        """Fetch what the resolved images miss, store each image as soon as it has all its
        blobs, and return the numbers of the blobs fetched."""
        planned = [image.plan for image in images if image.plan is not None]
        if not planned:
            return []
        needed: dict[Digest, Descriptor] = {}
        sources: dict[Digest, BlobSource] = {}
        for plan in planned:
            source = RepositoryBlobs(main.client(plan.ref.registry), plan.ref.repository)
            for blob in plan.blobs:
                needed.setdefault(blob.digest, blob)
                sources.setdefault(blob.digest, source)
        missing = [d for d in needed.values() if not self.store.has_blob(d.digest, d.size)]
        self.emit(events.BatchPlanned(len(planned), len(missing), sum(d.size for d in missing)))
        busy = {d.digest for d in missing if self.store.ingest_busy(d.digest)}
        stats: dict[Digest, BlobStats] = {}
        engine = (
            main.downloader(self.emit)
            if self.cluster is None
            else self.cluster.fetcher(self.store.root, self.settings, self.emit)
        )
        for round_blobs in (
            [d for d in missing if d.digest not in busy],
            [d for d in missing if d.digest in busy],
        ):
            waiting = [image for image in images if image.waiting]
            fetched, lost = self._fetch(engine, round_blobs, sources)
            for s in fetched:
                if s.digest not in stats or not s.already_present:
                    stats[s.digest] = s
            ready = []
            for image in waiting:
                assert image.plan is not None
                error = next((lost[b.digest] for b in image.plan.blobs if b.digest in lost), None)
                if error is not None:
                    image.outcome = self._report(image.failed(error))
                elif all(self.store.has_blob(b.digest, b.size) for b in image.plan.blobs):
                    ready.append(image)
            self._store(main, ready, stats)
        return list(stats.values())

    def _fetch(
        self,
        engine: Downloader | ClusterFetcher,
        blobs: list[Descriptor],
        sources: dict[Digest, BlobSource],
    ) -> tuple[tuple[BlobStats, ...], dict[Digest, FastpullError]]:
        """Fetch ``blobs`` in one engine run: the numbers of the blobs stored, and the error
        of each blob that could not be had (it fails the images that need it, and only
        those; all of them with ``--fail-fast``)."""
        lost: dict[Digest, FastpullError] = {}
        if not blobs or self.stopped:
            return (), lost

        def give_up(digest: Digest, error: FastpullError) -> None:
            lost[digest] = error
            if self.fail_fast:
                raise error

        try:
            return engine.fetch(blobs, sources, on_failure=give_up).blobs, lost
        except FastpullError as exc:
            if not lost or not _isolated(exc):
                raise
            self.stopped = True
            return (), lost

    def _store(self, main: Puller, images: list[_Image], stats: dict[Digest, BlobStats]) -> None:
        """Store images whose blobs are all in: each one's manifests, then every name in ONE
        rewrite of index.json (one sync of the disk for the batch, not one per image).

        Each image still gets its own verdict: one whose manifests cannot be stored fails
        alone, and should the rewrite fail, each image is named again on its own.
        """
        planned = [(image, image.plan) for image in images if image.plan is not None]
        staged = self._each(planned, main.stage)
        try:
            self.store.add_images([one.name for _, one in staged])
            named = staged
        except Exception as exc:
            if not _isolated(exc):
                raise
            named = self._each(staged, self._name_alone)
        for image, one in named:
            image.outcome = self._stored(main, image, one, stats)

    def _each(
        self, items: list[tuple[_Image, _T]], work: Callable[[_T], _U]
    ) -> list[tuple[_Image, _U]]:
        """``work`` on each image's item, in turn, until a fail-fast stop; an image whose
        work fails with an error of its own fails alone (:meth:`_failed`)."""
        done: list[tuple[_Image, _U]] = []
        for image, item in items:
            if self.stopped:
                break
            try:
                done.append((image, work(item)))
            except Exception as exc:
                self._failed(image, exc)
        return done

    def _name_alone(self, staged: StagedImage) -> StagedImage:
        self.store.add_images([staged.name])
        return staged

    def _failed(self, image: _Image, exc: Exception) -> None:
        """``image`` failed with ``exc``: its outcome if the error is the image's alone,
        else raised."""
        if not _isolated(exc):
            raise exc
        assert isinstance(exc, FastpullError) and image.plan is not None
        self.stopped = self.fail_fast
        image.outcome = self._report(image.failed(exc, time.monotonic() - image.plan.started))

    def _stored(
        self, main: Puller, image: _Image, staged: StagedImage, stats: dict[Digest, BlobStats]
    ) -> ImageOutcome:
        """The outcome of an image just named, reported."""
        plan = staged.plan
        fetched = [stats[b.digest] for b in plan.blobs if b.digest in stats]
        result = staged.result(fetched, workers=0, connections=main.connections)
        new = 0
        for blob in plan.blobs:
            fresh = blob.digest in stats and not stats[blob.digest].already_present
            if fresh and blob.digest not in self._credited:
                self._credited.add(blob.digest)
                new += blob.size
        outcome = ImageOutcome(
            str(image.ref),
            image.origin,
            events.UP_TO_DATE if result.up_to_date else events.DOWNLOADED,
            new_bytes=new,
            reused_bytes=sum(b.size for b in plan.blobs) - new,
            seconds=result.seconds,
            digest=str(result.digest),
            result=result,
        )
        return self._report(outcome)

    def _report(self, outcome: ImageOutcome) -> ImageOutcome:
        return _report(self.emit, outcome)


__all__ = ["BatchResult", "ImageOutcome", "pull_batch", "pull_each", "selected_tags"]
