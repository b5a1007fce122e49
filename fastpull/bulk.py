"""Many images as one run (``fastpull pull -f FILE``).

1. Expand: ``all_tags`` entries list their repository's tags (filtered by ``tags``).
2. Resolve every image's manifests, a few at a time (:data:`RESOLVE_CONCURRENCY` threads,
   each with its own connections and tokens: a libcurl handle is not shared by threads).
3. Download the union of the missing blobs in ONE engine run, each blob from a repository
   that has it, so a layer shared by fifty images is fetched once and every connection
   stays busy until the end (the engine starts the largest blobs first).
   A blob that another process is downloading into the same store right now (its ingest
   lock is held) is left out of that run: images that do not need it are stored first,
   then the run waits on the lock, and finds the blob in the store instead of fetching it.
4. Store each image whose blobs are all present (manifests, index, index.json entry).

Failures stay with their image: a tag that does not exist, a denied repository, a blob
that never matches its digest fail that image only, unless ``fail_fast``. The engine gives
up on a bad blob alone (``Downloader.fetch``'s ``on_failure``) and goes on with the others;
the images that need it fail. Only Ctrl-C / SIGTERM and the store itself stop everything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastpull import cancel, events
from fastpull.batchfile import BatchEntry
from fastpull.engine.download import BlobSource, BlobStats, Downloader
from fastpull.errors import FastpullError, Interrupted, UsageError
from fastpull.puller import ImagePlan, Puller, PullResult, RepositoryBlobs
from fastpull.reference import Reference
from fastpull.registry.credentials import CredentialStore
from fastpull.registry.settings import Settings
from fastpull.store.layout import Store, resolve_store_path
from fastpull.types import Descriptor, Digest, PlatformSelection

RESOLVE_CONCURRENCY = 8
# Told each image's plan (with the batch entry's origin) before the blobs download.
Resolved = Callable[[str, ImagePlan], None]
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
        return {
            "images": [o.to_json() for o in self.outcomes],
            "summary": {
                "images": len(self.outcomes),
                "failed": len(self.failed),
                "bytes_downloaded": self.bytes_downloaded,
                "seconds": round(self.seconds, 3),
            },
        }


@dataclass(frozen=True)
class _Item:
    """One image to pull: an entry, or one tag of an ``all_tags`` entry."""

    ref: Reference
    origin: str
    platforms: PlatformSelection | None
    default_tag: bool = False


def _isolated(exc: BaseException) -> bool:
    """Errors that fail one image; anything else (Ctrl-C, bugs) stops the batch."""
    return isinstance(exc, FastpullError) and not isinstance(exc, Interrupted)


def _failed(item: _Item, exc: FastpullError, seconds: float = 0.0) -> ImageOutcome:
    return ImageOutcome(
        str(item.ref),
        item.origin,
        events.FAILED,
        seconds=seconds,
        error=str(exc),
        exit_code=int(exc.exit_code),
    )


def _skipped(item: _Item) -> ImageOutcome:
    return ImageOutcome(
        str(item.ref), item.origin, events.SKIPPED, error="not pulled: an earlier image failed"
    )


def pull_batch(
    entries: Sequence[BatchEntry],
    *,
    settings: Settings,
    platforms: PlatformSelection | None = None,
    fail_fast: bool = False,
    credentials: CredentialStore | None = None,
    on_event: events.Listener = events.ignore,
    on_resolved: Resolved | None = None,
) -> BatchResult:
    """Pull every entry; entries with their own ``store`` run as a batch of their own.

    ``platforms`` applies to entries that do not name theirs. ``on_resolved(origin,
    plan)`` is told each image's plan before its blobs download (``copy -f`` starts
    uploads from it). Never raises for one image's failure (see the module docstring);
    raises Interrupted on Ctrl-C.
    """
    started = time.monotonic()
    stores: dict[Path, list[int]] = {}
    for position, entry in enumerate(entries):
        path = resolve_store_path(entry.store or settings.store)
        stores.setdefault(path, []).append(position)
    slots: list[list[ImageOutcome]] = [[] for _ in entries]
    downloaded = 0
    stop = False
    for path, positions in stores.items():
        group = [entries[p] for p in positions]
        if stop:
            outcomes = [[_skipped(_item(e))] for e in group]
        else:
            run = _Run(path, settings, platforms, fail_fast, credentials, on_event, on_resolved)
            outcomes = run.pull(group)
            downloaded += run.bytes_downloaded
            stop = fail_fast and any(not o.ok for found in outcomes for o in found)
        for position, found in zip(positions, outcomes, strict=True):
            slots[position] = found
    outcomes_flat = tuple(o for found in slots for o in found)
    result = BatchResult(outcomes_flat, time.monotonic() - started, downloaded)
    on_event(
        events.BatchFinished(
            len(result.outcomes), len(result.failed), result.bytes_downloaded, result.seconds
        )
    )
    return result


def _item(entry: BatchEntry) -> _Item:
    return _Item(entry.reference, entry.origin, entry.platforms, entry.default_tag)


class _Run:
    """One store's share of a batch."""

    def __init__(
        self,
        store_path: Path,
        settings: Settings,
        platforms: PlatformSelection | None,
        fail_fast: bool,
        credentials: CredentialStore | None,
        emit: events.Listener,
        on_resolved: Resolved | None = None,
    ) -> None:
        self.store_path = store_path
        self.settings = settings
        self.platforms = platforms
        self.fail_fast = fail_fast
        self.credentials = credentials
        self.emit = emit
        self.on_resolved = on_resolved
        self.stopped = False
        self.bytes_downloaded = 0
        self._local = threading.local()
        self._pullers: list[Puller] = []
        self._lock = threading.Lock()

    def pull(self, entries: Sequence[BatchEntry]) -> list[list[ImageOutcome]]:
        """Outcomes per entry (several for ``all_tags``)."""
        try:
            store = Store.open(self.store_path)
        except FastpullError as exc:
            return [[self._report(_failed(_item(e), exc))] for e in entries]
        try:
            return self._pull(store, entries)
        finally:
            for puller in self._pullers:
                puller.close()

    def _pull(self, store: Store, entries: Sequence[BatchEntry]) -> list[list[ImageOutcome]]:
        self.store = store
        main = self._new_puller()
        expanded = self._concurrently(self._expand, entries)
        items: list[_Item] = []
        owner: list[int] = []
        early: dict[int, ImageOutcome] = {}
        for position, (entry, found) in enumerate(zip(entries, expanded, strict=True)):
            if isinstance(found, list):
                items += found
                owner += [position] * len(found)
            else:
                early[position] = (
                    self._report(_failed(_item(entry), found))
                    if found is not None
                    else self._report(_skipped(_item(entry)))
                )
        outcomes: list[ImageOutcome | None] = [None] * len(items)
        plans: dict[int, ImagePlan] = {}
        if not self.stopped:
            for slot, plan in enumerate(self._concurrently(self._resolve, items)):
                if isinstance(plan, ImagePlan):
                    plans[slot] = plan
                    if self.on_resolved is not None:
                        self.on_resolved(items[slot].origin, plan)
                elif plan is not None:
                    outcomes[slot] = self._report(_failed(items[slot], plan))
        if self.stopped:
            plans.clear()
        self._download_and_store(main, items, plans, outcomes)
        per_entry: list[list[ImageOutcome]] = [[] for _ in entries]
        for position, outcome in early.items():
            per_entry[position].append(outcome)
        for slot, outcome in enumerate(outcomes):
            per_entry[owner[slot]].append(outcome or self._report(_skipped(items[slot])))
        return per_entry

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

    def _expand(self, entry: BatchEntry) -> list[_Item]:
        item = _item(entry)
        if not entry.all_tags:
            return [item]
        tags = [t for t in self._thread_puller().tags(entry.reference) if entry.wants_tag(t)]
        if not tags:
            which = " matching the 'tags' pattern" if entry.tags is not None else ""
            raise UsageError(f"repository {entry.reference.familiar_name} has no tags{which}")
        return [_Item(entry.reference.with_tag(t), entry.origin, entry.platforms) for t in tags]

    def _resolve(self, item: _Item) -> ImagePlan:
        return self._thread_puller().resolve(
            item.ref, default_tag=item.default_tag, platforms=item.platforms
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

    def _download_and_store(
        self,
        main: Puller,
        items: list[_Item],
        plans: dict[int, ImagePlan],
        outcomes: list[ImageOutcome | None],
    ) -> None:
        if not plans:
            return
        needed: dict[Digest, Descriptor] = {}
        sources: dict[Digest, BlobSource] = {}
        for plan in plans.values():
            source = RepositoryBlobs(main.client(plan.ref.registry), plan.ref.repository)
            for blob in plan.blobs:
                needed.setdefault(blob.digest, blob)
                sources.setdefault(blob.digest, source)
        missing = [d for d in needed.values() if not self.store.has_blob(d.digest, d.size)]
        self.emit(events.BatchPlanned(len(plans), len(missing), sum(d.size for d in missing)))
        busy = {d.digest for d in missing if self.store.ingest_busy(d.digest)}
        stats: dict[Digest, BlobStats] = {}
        failures: dict[int, FastpullError] = {}
        engine = main.downloader(self.emit)
        credited: set[Digest] = set()
        for round_blobs in (
            [d for d in missing if d.digest not in busy],
            [d for d in missing if d.digest in busy],
        ):
            waiting = {s: p for s, p in plans.items() if outcomes[s] is None and s not in failures}
            self._fetch(engine, round_blobs, sources, waiting, stats, failures)
            for slot, plan in waiting.items():
                if slot in failures:
                    outcomes[slot] = self._report(_failed(items[slot], failures[slot]))
                elif self.stopped:
                    continue
                elif all(self.store.has_blob(b.digest, b.size) for b in plan.blobs):
                    outcomes[slot] = self._commit(main, items[slot], plan, stats, credited)

    def _fetch(
        self,
        engine: Downloader,
        blobs: list[Descriptor],
        sources: dict[Digest, BlobSource],
        plans: dict[int, ImagePlan],
        stats: dict[Digest, BlobStats],
        failures: dict[int, FastpullError],
    ) -> None:
        """Fetch ``blobs`` in one engine run; a blob that cannot be had fails the images
        that need it, and only those (all of them with ``--fail-fast``)."""
        if not blobs or self.stopped:
            return
        lost: dict[Digest, FastpullError] = {}

        def give_up(digest: Digest, error: FastpullError) -> None:
            lost[digest] = error
            if self.fail_fast:
                raise error

        try:
            self._record(engine.fetch(blobs, sources, on_failure=give_up), stats)
        except FastpullError as exc:
            if not lost or not _isolated(exc):
                raise
            self.stopped = True
        for slot, plan in plans.items():
            error = next((lost[b.digest] for b in plan.blobs if b.digest in lost), None)
            if error is not None:
                failures[slot] = error

    def _record(self, fetched: Iterable[BlobStats], stats: dict[Digest, BlobStats]) -> None:
        for s in fetched:
            self.bytes_downloaded += s.downloaded
            if s.digest not in stats or not s.already_present:
                stats[s.digest] = s

    def _commit(
        self,
        main: Puller,
        item: _Item,
        plan: ImagePlan,
        stats: dict[Digest, BlobStats],
        credited: set[Digest],
    ) -> ImageOutcome:
        try:
            result = main.commit(plan, [stats[b.digest] for b in plan.blobs if b.digest in stats])
        except Exception as exc:
            if not _isolated(exc):
                raise
            assert isinstance(exc, FastpullError)
            self.stopped = self.fail_fast
            return self._report(_failed(item, exc, time.monotonic() - plan.started))
        new = 0
        for blob in plan.blobs:
            fresh = blob.digest in stats and not stats[blob.digest].already_present
            if fresh and blob.digest not in credited:
                credited.add(blob.digest)
                new += blob.size
        outcome = ImageOutcome(
            str(item.ref),
            item.origin,
            events.UP_TO_DATE if result.up_to_date else events.DOWNLOADED,
            new_bytes=new,
            reused_bytes=sum(b.size for b in plan.blobs) - new,
            seconds=result.seconds,
            digest=str(result.digest),
            result=result,
        )
        return self._report(outcome)

    def _report(self, outcome: ImageOutcome) -> ImageOutcome:
        self.emit(outcome.event())
        return outcome


__all__ = ["BatchResult", "ImageOutcome", "pull_batch"]
