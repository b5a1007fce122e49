"""Push images from the store to registries (``fastpull push``; the upload half of ``copy``).

1. What to push for a store entry (:func:`plan_push`): the manifests as the registry served
   them, so digests do not change (the Docker original of a manifest the store keeps
   converted to OCI; the original index when every platform it lists is in the store,
   else the store's own index of the platforms it holds), children before their index.
2. Every config and layer is uploaded by a pool of threads (``jobs`` uploads at once, across
   all images of a run): an upload is I/O, and libcurl releases the GIL while it waits.
3. Per destination registry, :class:`BlobHolders` remembers which repository holds which
   blob: seen there by ``HEAD``, uploaded or mounted in this run, or guessed from the
   store's images named on that registry and from where earlier runs placed blobs
   (:mod:`~fastpull.store.placements`). A blob another repository holds is mounted, not
   uploaded (at once, without a ``HEAD``, when this run saw it there; the mounts of one
   blob into many repositories run side by side), and two images needing one blob never
   upload it twice at once: the second is put aside until the first ends, then mounts it
   (put aside, it holds no upload thread).
4. Manifests go after all their blobs: platform manifests by digest, then the top one by
   tag (or by digest when there is no tag).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from fastpull import cancel, events
from fastpull.errors import FastpullError, ManifestError, NoSuchImage, StoreDamaged, UsageError
from fastpull.reference import Reference
from fastpull.registry.client import RegistryClient
from fastpull.registry.credentials import CredentialStore
from fastpull.registry.manifest import (
    MAX_MANIFEST_SIZE,
    ImageIndex,
    ImageManifest,
    parse_document,
)
from fastpull.registry.settings import Settings
from fastpull.registry.transport import Transport
from fastpull.registry.upload import (
    EXISTS,
    MOUNTED,
    BlobFile,
    BlobResult,
    GrowingBlob,
    PushAuth,
    Uploader,
)
from fastpull.store.layout import (
    CONTAINERD_NAME_ANNOTATION,
    REF_NAME_ANNOTATION,
    SOURCE_MANIFEST_ANNOTATION,
    Store,
)
from fastpull.store.placements import Placement, Placements
from fastpull.types import Descriptor, Digest

DEFAULT_JOBS = 8
# Progress events for one blob at most this often (seconds).
_PROGRESS_INTERVAL = 0.1
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ManifestUpload:
    """A manifest or index to push as it is: its bytes, media type and digest, and the
    blobs (config first, then layers) that must be in the repository before it."""

    raw: bytes
    media_type: str
    digest: Digest
    blobs: tuple[Descriptor, ...] = ()
    layers: frozenset[Digest] = frozenset()


@dataclass(frozen=True)
class PushPlan:
    """Everything one image needs at the destination; ``manifests`` ends with the top one."""

    manifests: tuple[ManifestUpload, ...]

    @property
    def top(self) -> ManifestUpload:
        return self.manifests[-1]

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Configs and layers of every manifest, each digest once, in manifest order."""
        unique: dict[Digest, Descriptor] = {}
        for manifest in self.manifests:
            for blob in manifest.blobs:
                unique.setdefault(blob.digest, blob)
        return tuple(unique.values())

    @property
    def layer_digests(self) -> frozenset[Digest]:
        """The layers (not configs): what docker-style output shows."""
        return frozenset(d for m in self.manifests for d in m.layers)


def named_images(store: Store) -> list[tuple[Reference, Descriptor]]:
    """The store's images whose names are image references, with their entries."""
    found = []
    for image in store.images():
        try:
            found.append((Reference.parse(image.annotations.get(REF_NAME_ANNOTATION, "")), image))
        except FastpullError:
            continue
    return found


def plan_push(store: Store, entry: Descriptor, what: str) -> PushPlan:
    """What to push for the store entry ``entry``; StoreDamaged if a part is missing."""
    source = entry.annotations.get(SOURCE_MANIFEST_ANNOTATION)
    if source:
        # The registry's own document, when the store holds it and all it names.
        with contextlib.suppress(FastpullError):
            return _plan(store, Digest.parse(source), None, what)
    return _plan(store, entry.digest, entry.media_type, what)


def _plan(store: Store, digest: Digest, media_type: str | None, what: str) -> PushPlan:
    doc = _load(store, digest, media_type, what)
    if not isinstance(doc, ImageIndex):
        return PushPlan((_manifest_upload(store, doc.raw, doc.media_type, digest, what),))
    children = []
    for entry in doc.manifests:
        where = f"{what} ({entry.platform})" if entry.platform else what
        child = _load(store, entry.digest, entry.media_type, where)
        if isinstance(child, ImageIndex):
            raise ManifestError(f"{where}: nested indexes are not pushed")
        children.append(_manifest_upload(store, child.raw, child.media_type, entry.digest, where))
    return PushPlan((*children, ManifestUpload(doc.raw, doc.media_type, digest)))


def _load(
    store: Store, digest: Digest, media_type: str | None, what: str
) -> ImageIndex | ImageManifest:
    raw = store.read_blob(digest, max_size=MAX_MANIFEST_SIZE)
    return parse_document(raw, media_type, digest, what)


def _manifest_upload(
    store: Store, raw: bytes, media_type: str, digest: Digest, what: str
) -> ManifestUpload:
    doc = parse_document(raw, media_type, digest, what)
    assert not isinstance(doc, ImageIndex)
    blobs = (doc.config, *doc.layers)
    for blob in blobs:
        if not store.has_blob(blob.digest, blob.size):
            raise StoreDamaged(
                f"{what}: blob {blob.digest} is not in store {store.root}; "
                "'fastpull verify --repair' pulls it again",
                store=str(store.root),
            )
    layers = frozenset(layer.digest for layer in doc.layers)
    return ManifestUpload(raw, doc.media_type, digest, blobs, layers)


@dataclass(frozen=True)
class _BlobJob:
    """One blob to place in one repository of a registry (see :meth:`Pusher.upload_blob`)."""

    registry: str
    repository: str
    blob: Descriptor
    layer: bool
    growing: GrowingBlob | None


@dataclass(frozen=True)
class PushResult:
    """What one push did: the destination, the top manifest's digest and size, and how
    each blob got there."""

    reference: str
    digest: Digest
    size: int
    blobs: tuple[BlobResult, ...]
    seconds: float

    @property
    def bytes_sent(self) -> int:
        return sum(b.bytes_sent for b in self.blobs)

    @property
    def mounted(self) -> int:
        return sum(1 for b in self.blobs if b.outcome == MOUNTED)


class BlobHolders:
    """Which repositories of one registry hold which blob, as far as this run knows, and
    which blobs are being placed right now (with what is to run once each placement ends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[Digest, list[str]] = {}
        self._guessed: dict[Digest, list[str]] = {}
        self._placing: dict[Digest, list[Callable[[], object]]] = {}
        # Asked ahead of the upload (HEAD): which blobs, and which repositories lack them.
        self._asked: set[Digest] = set()
        self._lacking: set[tuple[Digest, str]] = set()
        # Questions in flight: set once answered (or given up).
        self._asking: dict[Digest, threading.Event] = {}

    def add(self, digest: Digest, repository: str) -> None:
        """``repository`` holds the blob (the registry said so)."""
        with self._lock:
            holders = self._known.setdefault(digest, [])
            if repository not in holders:
                holders.append(repository)

    def guess(self, digest: Digest, repository: str) -> None:
        """``repository`` may hold the blob: worth a mount, which falls back to an upload."""
        with self._lock:
            guesses = self._guessed.setdefault(digest, [])
            if repository not in guesses:
                guesses.append(repository)

    def ask_first(self, digest: Digest) -> bool:
        """Whether the registry is worth asking about the blob ahead of its upload: the
        first time, and only if no repository is known or guessed to hold it (the mount
        asks, then)."""
        with self._lock:
            if digest in self._asked or self._known.get(digest) or self._guessed.get(digest):
                return False
            self._asked.add(digest)
            return True

    def lacks(self, digest: Digest, repository: str) -> None:
        """``repository`` does not hold the blob (the registry said so, ahead of its upload)."""
        with self._lock:
            self._lacking.add((digest, repository))

    def begun(self, digest: Digest) -> bool:
        """Whether a placement of the blob is under way or done."""
        with self._lock:
            return self._begun(digest)

    def _begun(self, digest: Digest) -> bool:
        return digest in self._placing or bool(self._known.get(digest))

    def start_asking(self, digest: Digest) -> bool:
        """Whether the question asked ahead (:meth:`ask_first`) may go now: not once a
        placement of the blob has begun (it asks itself). Call :meth:`answered` after."""
        with self._lock:
            if self._begun(digest):
                return False
            self._asking[digest] = threading.Event()
            return True

    def answered(self, digest: Digest) -> None:
        """The question :meth:`start_asking` let go has its answer (or none)."""
        with self._lock:
            asking = self._asking.pop(digest, None)
        if asking is not None:
            asking.set()

    def await_answer(self, digest: Digest) -> None:
        """Wait for the question about the blob in flight, if one is: its answer spares the
        placement its own ``HEAD``."""
        with self._lock:
            asking = self._asking.get(digest)
        if asking is not None:
            asking.wait()

    def lacking(self, digest: Digest, repository: str) -> bool:
        with self._lock:
            return (digest, repository) in self._lacking

    def holds(self, digest: Digest, repository: str) -> bool:
        with self._lock:
            return repository in self._known.get(digest, ())

    def held_elsewhere(self, digest: Digest, repository: str) -> bool:
        """Whether another repository is known (not guessed) to hold the blob."""
        with self._lock:
            return any(r != repository for r in self._known.get(digest, ()))

    def sources(self, digest: Digest, repository: str) -> list[str]:
        """Repositories to mount from, known ones first."""
        with self._lock:
            found = [*self._known.get(digest, ()), *self._guessed.get(digest, ())]
        return [r for r in dict.fromkeys(found) if r != repository]

    def begin(self, digest: Digest, later: Callable[[], object]) -> bool | None:
        """Before a blob goes to a repository: False when some repository is known to
        hold it (a mount or nothing will do, at once, alongside others); True when no
        placement of it is under way, and this one is it (call :meth:`end` after); None
        when one is under way: ``later`` is called once it ends, instead of waiting."""
        with self._lock:
            if self._known.get(digest):
                return False
            followers = self._placing.get(digest)
            if followers is not None:
                followers.append(later)
                return None
            self._placing[digest] = []
            return True

    def end(self, digest: Digest) -> None:
        """The placement :meth:`begin` allowed is over: run what waited for it."""
        with self._lock:
            followers = self._placing.pop(digest, [])
        for follower in followers:
            follower()


class Pusher:
    """Pushes images from one store; connections, tokens and blob holders are kept across
    the pushes of one run. Uploads run on ``jobs`` threads; call :meth:`close` at the end."""

    def __init__(
        self,
        store: Store,
        *,
        settings: Settings | None = None,
        credentials: CredentialStore | None = None,
        jobs: int | None = None,
        chunk_size: int | None = None,
        on_event: events.Listener = events.ignore,
    ) -> None:
        self.store = store
        self.settings = settings or Settings()
        self.chunk_size = chunk_size
        self._credentials = credentials or CredentialStore()
        self._emit_lock = threading.Lock()
        self._on_event = on_event
        self._lock = threading.Lock()
        self._auth: dict[str, PushAuth] = {}
        self._holders: dict[str, BlobHolders] = {}
        self._placements = Placements(store.root)
        self._uploaders: list[Uploader] = []
        self._local = threading.local()
        self.jobs = jobs or DEFAULT_JOBS
        self._pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="fastpull-push")
        # Questions asked ahead of uploads (look_ahead) have threads of their own: an upload
        # whose blob has landed never waits behind them.
        self._asking = ThreadPoolExecutor(max(1, self.jobs // 2), thread_name_prefix="fastpull-ask")
        self._unfinished: set[Future[BlobResult]] = set()
        # Until close(): blobs being uploaded are not deleted by gc or rmi meanwhile.
        self._store_use = contextlib.ExitStack()
        try:
            self._store_use.enter_context(store.shared_use())
        except BaseException:
            self._pool.shutdown()
            self._asking.shutdown()
            raise

    def close(self) -> None:
        """Stop the upload threads, close connections, let gc and rmi at the store."""
        self._asking.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            unfinished = list(self._unfinished)
        for future in unfinished:  # queued, or waiting for another upload of their blob
            future.cancel()
        for uploader in self._uploaders:
            uploader.close()
        for push_auth in self._auth.values():
            push_auth.client.transport.close()
        self._store_use.close()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def emit(self, event: events.Event) -> None:
        """Report an event (from any thread; the listener sees one at a time)."""
        with self._emit_lock:
            self._on_event(event)

    def _new_transport(self) -> Transport:
        return Transport(tls_for=self.settings.tls_for, stall_seconds=self.settings.stall_timeout)

    # -- destinations --------------------------------------------------------------------

    def auth(self, registry: str) -> PushAuth:
        """The shared credentials of a destination registry (checked on first use)."""
        with self._lock:
            if registry not in self._auth:
                # Its own connection: each registry's handshakes run under their own lock.
                client = RegistryClient(
                    registry,
                    settings=self.settings,
                    credentials=self._credentials.get(registry),
                    transport=self._new_transport(),
                )
                self._auth[registry] = PushAuth(client)
                self._holders[registry] = self._seed(registry)
            return self._auth[registry]

    def _seed(self, registry: str) -> BlobHolders:
        """Holders guessed from the store: its images named on ``registry`` came from
        there, so their repositories probably hold their blobs; and where earlier runs
        placed blobs on ``registry``."""
        holders = BlobHolders()
        for ref, image in named_images(self.store):
            if ref.registry != registry:
                continue
            with contextlib.suppress(FastpullError):
                for blob in plan_push(self.store, image, str(ref)).blobs:
                    holders.guess(blob.digest, ref.repository)
        for placed in self._placements.at(registry):
            holders.guess(placed.digest, placed.repository)
        return holders

    def uploader(self, registry: str) -> Uploader:
        """This thread's uploader for ``registry``."""
        mine: dict[str, Uploader] | None = getattr(self._local, "uploaders", None)
        if mine is None:
            mine = self._local.uploaders = {}
        if registry not in mine:
            uploader = Uploader(
                self.auth(registry), self._new_transport(), chunk_size=self.chunk_size
            )
            with self._lock:
                self._uploaders.append(uploader)
            mine[registry] = uploader
        return mine[registry]

    # -- pushing -------------------------------------------------------------------------

    def push(self, name: Reference, dest: Reference | None = None) -> PushResult:
        """Push the store's image ``name`` to ``dest`` (default: its own name); the store
        then names the image ``dest`` too, as ``docker tag`` would."""
        started = time.monotonic()
        entry = self.store.find_image(str(name))
        if entry is None:
            raise NoSuchImage(f"An image does not exist locally with the tag: {name.familiar}")
        target = dest or name
        self.auth(target.registry)  # credentials and settings fail before any output
        plan = plan_push(self.store, entry, name.familiar)
        self.emit(events.PushStarted(target.name))
        uploads = self.upload_blobs(target, plan.blobs, plan.layer_digests)
        result = self.finish(target, plan, uploads, started)
        if target != name and target.digest is None:
            # docker tag + docker push: the store names the image DEST too, and a later
            # push of an image sharing its blobs mounts them from there.
            annotations = {**entry.annotations, CONTAINERD_NAME_ANNOTATION: str(target)}
            self.store.add_image(entry, str(target), annotations)
        return result

    def upload_blobs(
        self, dest: Reference, blobs: Iterable[Descriptor], layers: frozenset[Digest]
    ) -> dict[Digest, Future[BlobResult]]:
        """Start uploading ``blobs`` to ``dest``'s repository; layers are reported."""
        return {b.digest: self.upload_blob(dest, b, b.digest in layers) for b in blobs}

    def look_ahead(self, dest: Reference, blobs: Iterable[Descriptor]) -> None:
        """``dest`` will need ``blobs`` once they are stored: ask the registry now (a
        ``HEAD``, on threads of its own) whether the first repository to need each one
        holds it, so that its upload skips the question later, when the upload threads are
        busiest. Blobs some repository of the registry is known or guessed to hold are
        left to the mounts, and a blob whose upload began first is not asked about."""
        self.auth(dest.registry)
        holders = self._holders[dest.registry]
        for blob in blobs:
            if holders.ask_first(blob.digest):
                self._asking.submit(self._ask, dest.registry, dest.repository, blob.digest)

    def _ask(self, registry: str, repository: str, digest: Digest) -> None:
        holders = self._holders[registry]
        if not holders.start_asking(digest):
            return  # too late: the upload has asked itself
        try:
            with contextlib.suppress(FastpullError):  # then the upload asks again
                if self.uploader(registry).exists(repository, digest):
                    holders.add(digest, repository)
                else:
                    holders.lacks(digest, repository)
        finally:
            holders.answered(digest)

    def upload_blob(
        self,
        dest: Reference,
        blob: Descriptor,
        layer: bool,
        growing: GrowingBlob | None = None,
    ) -> Future[BlobResult]:
        """Start uploading one blob (from the store) to ``dest``'s repository; with
        ``growing``, from its download as the bytes become final, before it is stored."""
        self.auth(dest.registry)
        future: Future[BlobResult] = Future()
        with self._lock:
            self._unfinished.add(future)
            queued = len(self._unfinished) > self.jobs
        future.add_done_callback(self._finished)
        if layer:
            self.emit(events.LayerEvent(blob.digest, events.PREPARING))
            if queued:  # as docker says of a layer waiting for an upload slot
                self.emit(events.LayerEvent(blob.digest, events.WAITING))
        self._submit(future, _BlobJob(dest.registry, dest.repository, blob, layer, growing))
        return future

    def _finished(self, future: Future[BlobResult]) -> None:
        with self._lock:
            self._unfinished.discard(future)

    def _submit(self, future: Future[BlobResult], job: _BlobJob) -> None:
        try:
            self._pool.submit(self._run, future, job)
        except RuntimeError:  # the pool is shut down: the run is over
            future.cancel()

    def _run(self, future: Future[BlobResult], job: _BlobJob) -> None:
        """One blob on an upload thread. While another repository's upload of the same
        blob is under way, the job steps aside and comes back once that ends (to mount
        it from there), so waiting never holds a thread that other blobs could use."""
        digest = job.blob.digest
        holders = self._holders[job.registry]
        placing = holders.begin(digest, lambda: self._submit(future, job))
        if placing is None:
            if job.layer:
                self.emit(events.LayerEvent(digest, events.WAITING))
            return
        try:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._push_blob(job))
                except BaseException as exc:  # the caller's future carries it, as a pool's does
                    future.set_exception(exc)
        finally:
            if placing:
                holders.end(digest)

    def _push_blob(self, job: _BlobJob) -> BlobResult:
        registry, repository, blob = job.registry, job.repository, job.blob
        holders = self._holders[registry]
        digest = blob.digest
        holders.await_answer(digest)
        if holders.holds(digest, repository):
            result = BlobResult(digest, blob.size, EXISTS)
        else:
            progress = _Progress(self, blob) if job.layer else None
            result = self.uploader(registry).upload(
                repository,
                BlobFile(blob, self.store.blob_path(digest), job.growing),
                mount_from=holders.sources(digest, repository),
                progress=progress,
                probe=not (
                    holders.held_elsewhere(digest, repository)
                    or holders.lacking(digest, repository)
                ),
            )
        holders.add(digest, repository)
        self._placements.record(Placement(registry, repository, digest))
        if job.layer:
            self.emit(events.LayerEvent(digest, _layer_state(result), blob.size, blob.size))
        return result

    def finish(
        self,
        dest: Reference,
        plan: PushPlan,
        uploads: Mapping[Digest, Future[BlobResult]],
        started: float,
    ) -> PushResult:
        """Wait for an image's blobs, then push its manifests; the top one goes under
        ``dest``'s tag, or by digest."""
        top = plan.top
        if dest.digest is not None and dest.digest != top.digest:
            raise UsageError(
                f"{dest.familiar}: the image's digest is {top.digest}; push it by tag instead"
            )
        results = gather(uploads.values())
        uploader = self.uploader(dest.registry)
        for manifest in plan.manifests[:-1]:
            uploader.put_manifest(
                dest.repository, str(manifest.digest), manifest.raw, manifest.media_type
            )
        reference = str(top.digest) if dest.digest is not None or not dest.tag else dest.tag
        uploader.put_manifest(dest.repository, reference, top.raw, top.media_type)
        self.emit(events.PushFinished(str(dest), reference, top.digest, len(top.raw)))
        return PushResult(
            str(dest), top.digest, len(top.raw), tuple(results), time.monotonic() - started
        )


def gather(futures: Iterable[Future[BlobResult]]) -> list[BlobResult]:
    """Every result, waiting in slices so Ctrl-C is seen; the first error is raised (and
    uploads not yet started are cancelled)."""
    pending = set(futures)
    order = list(pending)
    try:
        while pending:
            done, pending = wait(pending, _POLL_SECONDS, FIRST_EXCEPTION)
            cancel.check()
            for future in done:
                error = future.exception()
                if error is not None:
                    raise error
    finally:
        for future in pending:
            future.cancel()
    return [f.result() for f in order]


def _layer_state(result: BlobResult) -> str:
    if result.outcome == EXISTS:
        return events.LAYER_EXISTS
    if result.outcome == MOUNTED:
        return f"{events.MOUNTED_FROM} {result.mounted_from}"
    return events.PUSHED


class _Progress:
    """A blob's upload progress as ``Pushing`` events, at most every 0.1 s."""

    def __init__(self, pusher: Pusher, blob: Descriptor) -> None:
        self._pusher = pusher
        self._blob = blob
        self._sent = 0
        self._last = 0.0

    def __call__(self, count: int) -> None:
        self._sent = min(self._sent + count, self._blob.size)
        now = time.monotonic()
        if now - self._last >= _PROGRESS_INTERVAL or self._sent == self._blob.size:
            self._last = now
            event = events.LayerEvent(
                self._blob.digest, events.PUSHING, self._sent, self._blob.size
            )
            self._pusher.emit(event)


__all__ = [
    "BlobHolders",
    "ManifestUpload",
    "PushPlan",
    "PushResult",
    "Pusher",
    "gather",
    "named_images",
    "plan_push",
]
