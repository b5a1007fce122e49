"""Registry to registry through the store (``fastpull copy``, ``fastpull copy -f``).

One image (:meth:`Copier.copy`): its manifests are read, the blobs the store lacks are
downloaded by the engine, and each blob is handed to the uploads as soon as the engine
reports it verified and committed (or at once when the store already has it), so uploads
run while the rest is still downloading. The destination is asked about each blob
(``HEAD``) as soon as the plan is known, while the engine starts, so an upload is only a
``POST`` and a ``PUT`` once its blob lands. A large blob does not wait for its download to
end: its upload streams what the engine has hashed so far (``events.BlobHashed``), so a
copy takes about as long as the slower of the download and the upload, not their sum.
The image is then stored as a pull stores it, and its manifests are pushed once all its
blobs are at the destination.

A batch (:func:`copy_batch`) is a batch pull (``bulk.pull_batch``: one engine run for the
union of the blobs, failures kept to their image) whose blobs are uploaded the same way, to
every destination that needs them, as the engine commits them; then the manifests of every
stored image are pushed, several images at once, over one pool of upload threads that
shares what it learns about which repository holds which blob.

Blobs go through the store, so an interrupted copy resumes, and a second copy to another
registry downloads nothing. With ``keep=False`` the images a run added to the store are
removed afterwards, with every blob no other image uses (``rmi``), so the store holds at
most one run's images (one image, or one batch) at a time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastpull import cancel, events
from fastpull.batchfile import BatchEntry, check_all_tags, command_line_entry
from fastpull.bulk import ImageOutcome, pull_batch
from fastpull.errors import FastpullError, Interrupted, NoSuchImage, UsageError
from fastpull.puller import ImagePlan, Puller, RepositoryBlobs
from fastpull.pusher import Pusher, PushResult, named_images, plan_push
from fastpull.reference import Reference
from fastpull.registry.credentials import CredentialStore
from fastpull.registry.settings import Settings
from fastpull.registry.upload import EXISTS, MOUNTED, PUSHED, BlobResult, GrowingBlob
from fastpull.store.layout import Store, resolve_store_path
from fastpull.store.maintenance import remove_images
from fastpull.types import Descriptor, Digest, PlatformSelection

# Images pushed at once in a batch (their blobs share the pusher's upload threads).
IMAGE_CONCURRENCY = 8
# Blobs this large upload while they download; smaller ones once stored, where streaming
# would save little and hold an upload thread while waiting.
STREAM_MIN = 32 << 20


def destination(source: Reference, to: str) -> Reference:
    """``--to REGISTRY[/PREFIX]``: the source's repository path under it, with the same
    tag or digest (``docker.io/library/debian:12`` to ``localhost:5000/mirror`` is
    ``localhost:5000/mirror/library/debian:12``)."""
    target = Reference.parse(f"{checked_prefix(to)}/{source.repository}")
    return replace(target, tag=source.tag, digest=source.digest)


def checked_prefix(to: str) -> str:
    """``REGISTRY[/PREFIX]`` without a trailing slash; UsageError if it names no registry."""
    prefix = to.strip().rstrip("/")
    probe = Reference.parse(f"{prefix}/probe") if prefix else None
    if probe is None or probe.registry != prefix.split("/", 1)[0]:
        raise UsageError(f"--to {to}: expected REGISTRY[/PREFIX], such as localhost:5000/mirror")
    return prefix


def check_entries(entries: Sequence[BatchEntry], to: str | None) -> None:
    """UsageError unless every entry of a batch copy has a destination (its own ``to``, or
    the batch's ``to``, which must name a registry) and no store of its own."""
    for entry in entries:
        if not entry.to and to is None:
            raise UsageError(f"{entry.origin}: no destination: give --to or a 'to' for the entry")
        if entry.store is not None:
            raise UsageError(f"{entry.origin}: 'store' is not used by copy (see --store)")
    if to is not None:
        checked_prefix(to)


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


def all_tags_entry(source: str, dest: str) -> BatchEntry:
    """``copy --all-tags SOURCE DEST``: every tag of the repository SOURCE, each to the
    same tag in the repository DEST, as one batch entry; UsageError if either names a tag."""
    entry = command_line_entry(source, all_tags=True)
    target = Reference.parse(dest)
    check_all_tags(dest, target)
    return entry._replace(to=target.name)


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

    def finished(self) -> events.BatchFinished:
        """The event that ends the batch."""
        return events.BatchFinished(
            len(self.outcomes),
            len(self.failed),
            sum(o.bytes_downloaded for o in self.outcomes),
            self.seconds,
        )

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


class StreamedUploads:
    """Blob uploads started as soon as the store has each blob: for every blob not stored
    yet, the destinations waiting for it. A large blob (``STREAM_MIN`` bytes or more)
    starts uploading to its first destination while it downloads, reading what the engine
    has hashed (``events.BlobHashed``), a few such streams at a time. Safe to use from
    several threads."""

    def __init__(self, pusher: Pusher) -> None:
        self.pusher = pusher
        self._lock = threading.Lock()
        self._waiting: dict[Digest, list[tuple[Reference, Descriptor, bool]]] = {}
        self._started: dict[tuple[str, Digest], Future[BlobResult]] = {}
        self._growing: dict[Digest, GrowingBlob] = {}
        # Streams hold an upload thread while they wait for the download: half at most.
        self._streams = 0
        self._stream_limit = max(1, pusher.jobs // 2)

    def want(self, dest: Reference, blobs: Iterable[Descriptor], layers: frozenset[Digest]) -> None:
        """``dest`` needs ``blobs``: upload those the store has now, the others once it does
        (the destination is asked about those now, while they download)."""
        later = []
        for blob in blobs:
            if self.pusher.store.has_blob(blob.digest, blob.size):
                self._start(dest, blob, blob.digest in layers)
            else:
                later.append(blob)
                with self._lock:
                    self._waiting.setdefault(blob.digest, []).append(
                        (dest, blob, blob.digest in layers)
                    )
        self.pusher.look_ahead(dest, later)

    def stored(self, digest: Digest) -> None:
        """The store has ``digest`` now: start its uploads."""
        with self._lock:
            waiting = self._waiting.pop(digest, [])
            growing = self._growing.pop(digest, None)
        if growing is not None:
            growing.stored()
        for dest, blob, layer in waiting:
            self._start(dest, blob, layer)

    def hashed(self, event: events.BlobHashed) -> None:
        """The engine hashed more of a blob: feed its stream, or begin one to the first
        destination waiting for it (the others mount it from there once it is stored)."""
        begin = None
        with self._lock:
            growing = self._growing.get(event.digest)
            if growing is None:
                waiting = self._waiting.get(event.digest)
                if (
                    not waiting
                    or event.size < STREAM_MIN
                    or event.hashed == 0
                    or self._streams >= self._stream_limit
                ):
                    return
                growing = GrowingBlob(
                    Path(event.path), event.size, self.pusher.store.blob_path(event.digest)
                )
                self._growing[event.digest] = growing
                self._streams += 1
                begin = waiting.pop(0)
            growing.grew(Path(event.path), event.hashed)
        if begin is not None:
            dest, blob, layer = begin
            self._start(dest, blob, layer, growing).add_done_callback(self._stream_ended)

    def _stream_ended(self, _future: Future[BlobResult]) -> None:
        with self._lock:
            self._streams -= 1

    def listener(self, emit: events.Listener) -> events.Listener:
        """An engine listener: events go to ``emit``; a committed blob starts its uploads,
        and a large blob's hashed prefix streams (BlobHashed is not passed on)."""

        def listen(event: events.Event) -> None:
            if isinstance(event, events.BlobHashed):
                self.hashed(event)
                return
            emit(event)
            if isinstance(event, events.LayerEvent) and event.state in _STORED:
                self.stored(event.digest)

        return listen

    def futures(
        self, dest: Reference, blobs: Iterable[Descriptor], layers: frozenset[Digest]
    ) -> dict[Digest, Future[BlobResult]]:
        """The uploads of ``blobs`` to ``dest``, starting those not started yet."""
        return {b.digest: self._start(dest, b, b.digest in layers) for b in blobs}

    def settle(self) -> None:
        """The downloads are over: streams of blobs that were not stored end with an error
        (their images fail with the download's own error)."""
        with self._lock:
            unfinished, self._growing = self._growing, {}
        for digest, growing in unfinished.items():
            growing.fail(FastpullError(f"blob {digest} was not downloaded, so not uploaded"))

    def cancel(self) -> None:
        """Drop the uploads that have not begun, and end the streams."""
        self.settle()
        with self._lock:
            started = list(self._started.values())
        for future in started:
            future.cancel()

    def _start(
        self, dest: Reference, blob: Descriptor, layer: bool, growing: GrowingBlob | None = None
    ) -> Future[BlobResult]:
        key = (dest.name, blob.digest)
        with self._lock:
            future = self._started.get(key)
            if future is None:
                future = self._started[key] = self.pusher.upload_blob(dest, blob, layer, growing)
            return future


_STORED = (events.DOWNLOAD_COMPLETE, events.ALREADY_EXISTS)


def push_stored(
    pusher: Pusher, uploads: StreamedUploads, source: Reference, dest: Reference, started: float
) -> PushResult:
    """Push the store's image ``source`` to ``dest``, reusing uploads already started.

    Unlike ``fastpull push DEST``, the store does not name the image ``dest``: a copy
    leaves the store as a pull would."""
    entry = pusher.store.find_image(str(source))
    if entry is None:
        raise NoSuchImage(f"{source.familiar} is not in the store any more")
    plan = plan_push(pusher.store, entry, source.familiar)
    return pusher.finish(dest, plan, uploads.futures(dest, plan.blobs, plan.layer_digests), started)


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

    def copy(self, source: Reference, dest: Reference, *, default_tag: bool = False) -> CopyOutcome:
        """Copy one image; each blob's upload starts once the store has it."""
        started = time.monotonic()
        puller, pusher = self.puller, self.pusher
        # An unreachable or misconfigured destination fails before anything downloads.
        _ = pusher.auth(dest.registry).base_url
        client = puller.client(source.registry)
        selector = source.digest or source.tag or "latest"
        pusher.emit(events.PullStarted(str(source), str(selector), source.repository, default_tag))
        plan = puller.resolve(source, default_tag=default_tag)
        pusher.emit(events.PushStarted(dest.name))
        layers = plan.layer_digests
        uploads = StreamedUploads(pusher)
        uploads.want(dest, plan.blobs, layers)
        missing = [b for b in plan.blobs if not self.store.has_blob(b.digest, b.size)]

        def layer_events(event: events.Event) -> None:
            if not isinstance(event, events.LayerEvent) or event.digest in layers:
                pusher.emit(event)

        try:
            engine = puller.downloader(uploads.listener(layer_events))
            fetched = engine.fetch(missing, RepositoryBlobs(client, source.repository))
            uploads.settle()
            puller.commit(plan, fetched.blobs, workers=fetched.workers)
        except BaseException:
            uploads.cancel()
            raise
        result = push_stored(pusher, uploads, source, dest, started)
        return CopyOutcome(
            str(source),
            str(dest),
            "command line",
            events.COPIED,
            time.monotonic() - started,
            str(result.digest),
            sum(s.downloaded for s in fetched.blobs),
            result.blobs,
        )


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
    check_entries(entries, to)
    store = Store.open(resolve_store_path(settings.store))
    before = {str(ref) for ref, _ in named_images(store)}
    with Pusher(
        store,
        settings=settings,
        credentials=credentials,
        jobs=jobs,
        chunk_size=chunk_size,
        on_event=on_event,
    ) as pusher:
        uploads = StreamedUploads(pusher)

        def resolved(origin: str, plan: ImagePlan) -> None:
            with contextlib.suppress(FastpullError):  # reported once the pull is done
                dest = entry_destination(by_origin[origin], plan.ref, to)
                uploads.want(dest, plan.blobs, plan.layer_digests)

        def pull_events(event: events.Event) -> None:
            # The pull's own per-image lines would read as if the copy were done.
            if not isinstance(event, events.ImageDone | events.BatchFinished):
                pusher.emit(event)

        try:
            pulled = pull_batch(
                entries,
                settings=settings,
                platforms=platforms,
                fail_fast=fail_fast,
                credentials=credentials,
                on_event=uploads.listener(pull_events),
                on_resolved=resolved,
            )
            uploads.settle()
        except BaseException:
            uploads.cancel()
            raise
        outcomes = _push_all(pusher, uploads, pulled.outcomes, by_origin, to, fail_fast)
    if not keep:
        added = [Reference.parse(o.source) for o in outcomes if o.source not in before]
        if added:
            remove_images(store, added, prune=True)
    result = CopyBatchResult(tuple(outcomes), time.monotonic() - started)
    on_event(result.finished())
    return result


def _push_all(
    pusher: Pusher,
    uploads: StreamedUploads,
    pulled: Sequence[ImageOutcome],
    by_origin: dict[str, BatchEntry],
    to: str | None,
    fail_fast: bool,
) -> list[CopyOutcome]:
    """Push every pulled image at once; each outcome is reported as it is known, and
    returned in batch order."""
    stop = False

    def push(image: ImageOutcome) -> CopyOutcome:
        source = Reference.parse(image.reference)
        try:
            dest = entry_destination(by_origin[image.origin], source, to)
        except FastpullError as exc:
            return _failed(image, exc)
        if not image.ok or stop:
            status = image.status if not image.ok else events.SKIPPED
            return CopyOutcome(
                image.reference,
                str(dest),
                image.origin,
                status,
                image.seconds,
                error=image.error,
                exit_code=image.exit_code,
            )
        pusher.emit(events.PushStarted(dest.name))
        try:
            result = push_stored(pusher, uploads, source, dest, time.monotonic())
        except FastpullError as exc:
            if isinstance(exc, Interrupted):
                raise
            return _failed(image, exc, str(dest))
        return CopyOutcome(
            image.reference,
            str(dest),
            image.origin,
            events.COPIED,
            image.seconds + result.seconds,
            str(result.digest),
            image.new_bytes,
            result.blobs,
        )

    outcomes: list[CopyOutcome] = []
    with ThreadPoolExecutor(max(1, min(IMAGE_CONCURRENCY, len(pulled)))) as pool:
        futures = [pool.submit(push, image) for image in pulled]
        try:
            for future in futures:
                while not future.done():
                    cancel.check()
                    time.sleep(0.05)
                outcome = future.result()
                outcomes.append(outcome)
                pusher.emit(outcome.event())
                stop = stop or (fail_fast and not outcome.ok)
        finally:
            for future in futures:
                future.cancel()
    return outcomes


def _failed(image: ImageOutcome, exc: FastpullError, dest: str = "") -> CopyOutcome:
    return CopyOutcome(
        image.reference,
        dest,
        image.origin,
        events.FAILED,
        image.seconds,
        error=str(exc),
        exit_code=int(exc.exit_code),
    )


__all__ = [
    "Copier",
    "CopyBatchResult",
    "CopyOutcome",
    "StreamedUploads",
    "all_tags_entry",
    "check_entries",
    "checked_prefix",
    "copy_batch",
    "destination",
    "entry_destination",
    "push_stored",
]
