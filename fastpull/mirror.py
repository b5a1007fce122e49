"""Registry to registry through the store (``fastpull copy``, ``fastpull copy -f``).

One image (:meth:`Copier.copy`): its manifests are read, the blobs the store lacks are
downloaded by the engine, and each blob is handed to the uploads as soon as the engine
reports it verified and committed (or at once when the store already has it), so uploads
run while the rest is still downloading. The image is then stored as a pull stores it, and
its manifests are pushed once all its blobs are at the destination.

A batch (:func:`copy_batch`) is a batch pull (``bulk.pull_batch``: one engine run for the
union of the blobs, failures kept to their image) followed by the pushes of every stored
image at once, sharing one upload pool and what it learns about which repository holds
which blob. Its uploads start when the whole batch is downloaded: overlapping them with
the download would need the batch's plan from inside the engine run.

Blobs go through the store, so an interrupted copy resumes, and a second copy to another
registry downloads nothing. With ``keep=False`` the images a run added to the store are
removed afterwards, with every blob no other image uses (``rmi``), so the store holds at
most one run's images (one image, or one batch) at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from fastpull import cancel, events
from fastpull.batchfile import BatchEntry
from fastpull.bulk import ImageOutcome, pull_batch
from fastpull.errors import FastpullError, Interrupted, UsageError
from fastpull.puller import Puller, RepositoryBlobs
from fastpull.pusher import Pusher, PushResult, plan_push
from fastpull.reference import Reference
from fastpull.registry.credentials import CredentialStore
from fastpull.registry.settings import Settings
from fastpull.registry.upload import EXISTS, MOUNTED, PUSHED, BlobResult
from fastpull.store.layout import REF_NAME_ANNOTATION, Store, resolve_store_path
from fastpull.store.maintenance import remove_images
from fastpull.types import Digest, PlatformSelection

# Images pushed at once in a batch (their blobs share the pusher's upload threads).
IMAGE_CONCURRENCY = 8


def destination(source: Reference, to: str) -> Reference:
    """``--to REGISTRY[/PREFIX]``: the source's repository path under it, with the same
    tag or digest (``docker.io/library/debian:12`` to ``localhost:5000/mirror`` is
    ``localhost:5000/mirror/library/debian:12``)."""
    prefix = to.strip().rstrip("/")
    target = Reference.parse(f"{prefix}/{source.repository}")
    if target.registry != prefix.split("/", 1)[0]:
        raise UsageError(f"--to {to}: expected REGISTRY[/PREFIX], such as localhost:5000/mirror")
    return replace(target, tag=source.tag, digest=source.digest)


def entry_destination(entry: BatchEntry, source: Reference, to: str | None) -> Reference:
    """Where one image of a batch goes: the entry's ``to`` (a repository, or with a tag for
    one image), else ``--to``."""
    if entry.to:
        target = Reference.parse(entry.to)
        if _names_tag(entry.to) and not entry.all_tags:
            return target
        return replace(target, tag=source.tag, digest=source.digest)
    if to is None:
        raise UsageError(f"{entry.origin}: no destination: give --to or a 'to' for the entry")
    return destination(source, to)


def _names_tag(text: str) -> bool:
    last = text.rsplit("/", 1)[-1]
    return ":" in last or "@" in last


@dataclass(frozen=True)
class CopyOutcome:
    """One image of a copy: where it went, and how (a row of the summary and --report)."""

    source: str
    destination: str
    origin: str
    status: str
    seconds: float = 0.0
    digest: str | None = None
    bytes_downloaded: int = 0
    blobs: tuple[BlobResult, ...] = ()
    error: str | None = None
    exit_code: int = 0

    @property
    def ok(self) -> bool:
        return self.status == events.COPIED

    @property
    def bytes_uploaded(self) -> int:
        return sum(b.bytes_sent for b in self.blobs)

    def count(self, outcome: str) -> int:
        """How many blobs reached the destination that way (``upload.PUSHED``, ...)."""
        return sum(1 for b in self.blobs if b.outcome == outcome)

    def event(self) -> events.ImageDone:
        """The summary row: NEW is bytes uploaded, REUSED the blobs skipped or mounted."""
        reused = sum(b.size for b in self.blobs if b.outcome != PUSHED)
        return events.ImageDone(
            self.source,
            self.status,
            self.bytes_uploaded,
            reused,
            self.seconds,
            self.error or "",
        )

    def to_json(self) -> dict[str, Any]:
        """The ``--report`` record."""
        return {
            "image": self.source,
            "destination": self.destination,
            "source": self.origin,
            "status": self.status,
            "digest": self.digest,
            "bytes_downloaded": self.bytes_downloaded,
            "bytes_uploaded": self.bytes_uploaded,
            "blobs_pushed": self.count(PUSHED),
            "blobs_mounted": self.count(MOUNTED),
            "blobs_existing": self.count(EXISTS),
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True)
class CopyBatchResult:
    """Every image's outcome, in batch order."""

    outcomes: tuple[CopyOutcome, ...]
    seconds: float

    @property
    def failed(self) -> list[CopyOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def exit_code(self) -> int:
        """0 when every image was copied; else the failures' common exit code, or 1."""
        codes = {o.exit_code for o in self.failed if o.exit_code}
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
                "bytes_downloaded": sum(o.bytes_downloaded for o in self.outcomes),
                "bytes_uploaded": sum(o.bytes_uploaded for o in self.outcomes),
                "blobs_mounted": sum(o.count(MOUNTED) for o in self.outcomes),
                "seconds": round(self.seconds, 3),
            },
        }


class Copier:
    """Copies single images through one store, downloads and uploads overlapping."""

    def __init__(
        self,
        store: Store,
        *,
        settings: Settings,
        platforms: PlatformSelection | None = None,
        credentials: CredentialStore | None = None,
        jobs: int | None = None,
        chunk_size: int | None = None,
        on_event: events.Listener = events.ignore,
    ) -> None:
        self.store = store
        self.pusher = Pusher(
            store,
            settings=settings,
            credentials=credentials,
            jobs=jobs,
            chunk_size=chunk_size,
            on_event=on_event,
        )
        try:
            # Engine events reach the listener through the pusher, one at a time.
            self.puller = Puller(
                store,
                settings=settings,
                platform=platforms,
                credentials=credentials,
                on_event=self.pusher.emit,
            )
        except BaseException:
            self.pusher.close()
            raise

    def close(self) -> None:
        """Stop uploads and downloads, close connections."""
        try:
            self.pusher.close()
        finally:
            self.puller.close()

    def __enter__(self) -> Copier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def copy(self, source: Reference, dest: Reference, *, default_tag: bool = False) -> PushResult:
        """Copy one image; each blob's upload starts once the store has it."""
        started = time.monotonic()
        puller, pusher = self.puller, self.pusher
        pusher.auth(dest.registry)
        puller.client(source.registry)
        selector = source.digest or source.tag or "latest"
        emit = pusher.emit
        emit(events.PullStarted(str(source), str(selector), source.repository, default_tag))
        plan = puller.resolve(source, default_tag=default_tag)
        emit(events.PushStarted(dest.name))
        wanted = {b.digest: b for b in plan.blobs}
        layers = plan.layer_digests
        uploads: dict[Digest, Future[BlobResult]] = {}

        def start(digest: Digest) -> None:
            if digest in wanted and digest not in uploads:
                uploads[digest] = pusher.upload_blob(dest, wanted[digest], digest in layers)

        def listen(event: events.Event) -> None:
            if isinstance(event, events.LayerEvent):
                if event.digest in layers:
                    emit(event)
                if event.state in (events.DOWNLOAD_COMPLETE, events.ALREADY_EXISTS):
                    start(event.digest)

        missing = []
        for blob in plan.blobs:
            if self.store.has_blob(blob.digest, blob.size):
                start(blob.digest)
            else:
                missing.append(blob)
        try:
            source_blobs = RepositoryBlobs(puller.client(source.registry), source.repository)
            stats = puller.downloader(listen).fetch(missing, source_blobs)
            puller.commit(plan, stats)
        except BaseException:
            for future in uploads.values():
                future.cancel()
            raise
        entry = self.store.find_image(str(source))
        if entry is None:
            raise FastpullError(f"{source.familiar} vanished from the store while copying")
        push_plan = plan_push(self.store, entry, source.familiar)
        for blob in push_plan.blobs:
            if blob.digest not in uploads:
                uploads[blob.digest] = pusher.upload_blob(
                    dest, blob, blob.digest in push_plan.layer_digests
                )
        mine = {b.digest: uploads[b.digest] for b in push_plan.blobs}
        result = pusher.finish(dest, push_plan, mine, started)
        return replace(result, seconds=time.monotonic() - started)


def copy_batch(
    entries: Sequence[BatchEntry],
    *,
    to: str | None,
    settings: Settings,
    platforms: PlatformSelection | None = None,
    credentials: CredentialStore | None = None,
    jobs: int | None = None,
    chunk_size: int | None = None,
    keep: bool = True,
    fail_fast: bool = False,
    on_event: events.Listener = events.ignore,
) -> CopyBatchResult:
    """Copy every entry to its destination; one image's failure fails only that image
    (unless ``fail_fast``). Raises Interrupted on Ctrl-C."""
    started = time.monotonic()
    by_origin = {e.origin: e for e in entries}
    for entry in entries:
        if not entry.to and to is None:
            raise UsageError(f"{entry.origin}: no destination: give --to or a 'to' for the entry")
        if entry.store is not None:
            raise UsageError(f"{entry.origin}: 'store' is not used by copy (see --store)")
    store_path = resolve_store_path(settings.store)
    store = Store.open(store_path)
    before = {str(ref) for ref in _stored_names(store)}

    def pull_events(event: events.Event) -> None:
        # The pull's own per-image lines would read as if the copy were done.
        if not isinstance(event, events.ImageDone | events.BatchFinished):
            on_event(event)

    pulled = pull_batch(
        entries,
        settings=settings,
        platforms=platforms,
        fail_fast=fail_fast,
        credentials=credentials,
        on_event=pull_events,
    )
    outcomes: list[CopyOutcome | None] = [None] * len(pulled.outcomes)
    work: list[tuple[int, ImageOutcome, Reference, Reference]] = []
    for slot, pull_outcome in enumerate(pulled.outcomes):
        source = Reference.parse(pull_outcome.reference)
        entry = by_origin[pull_outcome.origin]
        try:
            dest = entry_destination(entry, source, to)
        except FastpullError as exc:
            outcomes[slot] = _failed(pull_outcome, str(source), exc)
            continue
        if not pull_outcome.ok:
            failed = CopyOutcome(
                str(source),
                str(dest),
                pull_outcome.origin,
                pull_outcome.status,
                pull_outcome.seconds,
                error=pull_outcome.error,
                exit_code=pull_outcome.exit_code,
            )
            outcomes[slot] = failed
            on_event(failed.event())
        else:
            work.append((slot, pull_outcome, source, dest))
    with Pusher(
        store,
        settings=settings,
        credentials=credentials,
        jobs=jobs,
        chunk_size=chunk_size,
        on_event=on_event,
    ) as pusher:
        _push_all(pusher, work, outcomes, fail_fast)
    done = tuple(o for o in outcomes if o is not None)
    if not keep:
        added = [Reference.parse(o.source) for o in done if o.source not in before]
        _drop(store, added)
    result = CopyBatchResult(done, time.monotonic() - started)
    on_event(
        events.BatchFinished(
            len(done), len(result.failed), sum(o.bytes_downloaded for o in done), result.seconds
        )
    )
    return result


def _push_all(
    pusher: Pusher,
    work: list[tuple[int, ImageOutcome, Reference, Reference]],
    outcomes: list[CopyOutcome | None],
    fail_fast: bool,
) -> None:
    """Push every pulled image at once; record each one's outcome as it ends."""
    if not work:
        return
    stop = False

    def push(item: tuple[int, ImageOutcome, Reference, Reference]) -> CopyOutcome:
        _, pulled, source, dest = item
        if stop:
            return CopyOutcome(str(source), str(dest), pulled.origin, events.SKIPPED)
        try:
            result = pusher.push(source, dest)
        except FastpullError as exc:
            if isinstance(exc, Interrupted):
                raise
            return _failed(pulled, str(source), exc, str(dest))
        return CopyOutcome(
            str(source),
            str(dest),
            pulled.origin,
            events.COPIED,
            pulled.seconds + result.seconds,
            str(result.digest),
            pulled.new_bytes,
            result.blobs,
        )

    with ThreadPoolExecutor(min(IMAGE_CONCURRENCY, len(work))) as pool:
        futures = {pool.submit(push, item): item[0] for item in work}
        for future, slot in futures.items():
            while not future.done():
                cancel.check()
                time.sleep(0.05)
            outcome = future.result()
            outcomes[slot] = outcome
            pusher.emit(outcome.event())
            if fail_fast and not outcome.ok:
                stop = True


def _failed(pulled: ImageOutcome, source: str, exc: FastpullError, dest: str = "") -> CopyOutcome:
    return CopyOutcome(
        source,
        dest,
        pulled.origin,
        events.FAILED,
        pulled.seconds,
        error=str(exc),
        exit_code=int(exc.exit_code),
    )


def _stored_names(store: Store) -> list[Reference]:
    names = []
    for image in store.images():
        try:
            names.append(Reference.parse(image.annotations.get(REF_NAME_ANNOTATION, "")))
        except FastpullError:
            continue
    return names


def _drop(store: Store, refs: list[Reference]) -> None:
    """``--no-keep``: remove the images a run added, with the blobs no other image uses."""
    if refs:
        remove_images(store, refs, prune=True)


__all__ = [
    "Copier",
    "CopyBatchResult",
    "CopyOutcome",
    "copy_batch",
    "destination",
    "entry_destination",
]
