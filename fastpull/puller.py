"""One pull, start to finish: reference → manifest → missing blobs → store → index.json.

Shared by the Python API (:func:`fastpull.pull`) and the CLI, so both behave the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from fastpull import cancel, events
from fastpull.engine.download import BlobStats, Downloader, Fetched
from fastpull.errors import FastpullError, ManifestError, PlatformNotFound
from fastpull.reference import Reference
from fastpull.registry import auth
from fastpull.registry.client import RegistryClient
from fastpull.registry.credentials import CredentialSource, CredentialStore
from fastpull.registry.manifest import (
    MAX_CONFIG_SIZE,
    OCI_INDEX,
    ImageIndex,
    ImageManifest,
    digest_of,
    parse_config,
    parse_document,
    platform_matches,
    select_platform,
    select_platforms,
    to_oci,
)
from fastpull.registry.settings import Settings
from fastpull.registry.transport import Response, Transport
from fastpull.store.layout import (
    CONTAINERD_NAME_ANNOTATION,
    REPO_DIGEST_ANNOTATION,
    SOURCE_MANIFEST_ANNOTATION,
    ImageName,
    Store,
    resolve_store_path,
)
from fastpull.types import Descriptor, Digest, Platform, PlatformSelection

# An index may point at another index; deeper nesting than this is refused.
MAX_INDEX_DEPTH = 3


class PullResult(NamedTuple):
    """What one pull did. ``digest`` is the repo digest docker prints (the index's, for
    multi-platform images); ``manifest_digest`` is the platform manifest as stored (an
    OCI conversion for Docker-format images, see ``manifest.to_oci``)."""

    reference: str
    familiar: str
    digest: Digest
    manifest_digest: Digest
    config_digest: Digest
    platform: Platform | None
    layers: tuple[Descriptor, ...]
    blobs: tuple[BlobStats, ...]
    bytes_downloaded: int
    bytes_total: int
    seconds: float
    up_to_date: bool
    workers: int = 0
    connections: int = 0
    platforms: tuple[Platform, ...] = ()

    def stats(self) -> dict[str, object]:
        """Per-blob numbers for ``--stats`` and benchmark harnesses (JSON-ready)."""
        return {
            "reference": self.reference,
            "digest": str(self.digest),
            "seconds": round(self.seconds, 6),
            "bytes": self.bytes_downloaded,
            "workers": self.workers,
            "connections": self.connections,
            "blobs": [
                {
                    "digest": str(b.digest),
                    "size": b.size,
                    "downloaded": b.downloaded,
                    "seconds": round(b.seconds, 6),
                    "connections": b.connections,
                    "chunks": b.chunks,
                    "retries": b.retries,
                    "resumed": b.resumed,
                    "already_present": b.already_present,
                }
                for b in self.blobs
            ],
        }


@dataclass
class RepositoryBlobs:
    """A repository's blobs as the downloader sees them (``download.BlobSource``)."""

    client: RegistryClient
    repository: str
    scope: str = field(init=False)

    def __post_init__(self) -> None:
        self.scope = auth.repository_scope(self.repository)

    def blob_url(self, digest: Digest) -> str:
        return self.client.repository_url(self.repository, "blobs", str(digest))

    def authorization(self) -> dict[str, str]:
        return self.client.authorization(self.scope)

    def reauthorize(self, response: Response) -> dict[str, str]:
        return self.client.authenticate(response, self.scope)


class PlannedManifest(NamedTuple):
    """One platform's manifest, and the index entry that named it (None when the
    reference named the manifest itself)."""

    manifest: ImageManifest
    entry: Descriptor | None = None


@dataclass(frozen=True)
class ImagePlan:
    """An image resolved to what it needs, nothing stored yet: the manifests to pull (one
    per platform, each with the index entry that named it) and the index to store with
    them when several platforms were asked for."""

    ref: Reference
    repo_digest: Digest
    manifests: tuple[PlannedManifest, ...]
    index: ImageIndex | None
    platforms: PlatformSelection
    # Like docker: a single-platform image is refused only when a platform was asked for.
    platform_requested: bool = False
    default_tag: bool = False
    started: float = field(default_factory=time.monotonic, compare=False)

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Configs and layers of every manifest, each digest once, in manifest order."""
        unique: dict[Digest, Descriptor] = {}
        for planned in self.manifests:
            for blob in (planned.manifest.config, *planned.manifest.layers):
                unique.setdefault(blob.digest, blob)
        return tuple(unique.values())

    @property
    def layer_digests(self) -> frozenset[Digest]:
        """The layers (not configs): what docker-style output shows."""
        return frozenset(layer.digest for layer in self.layers)

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        """Every manifest's layers, in order (a layer two platforms share appears twice)."""
        return tuple(layer for p in self.manifests for layer in p.manifest.layers)


class StagedImage(NamedTuple):
    """An image whose blobs and manifests are in the store, to be named in index.json
    (``name``); ``previous`` is what that name meant before."""

    plan: ImagePlan
    name: ImageName
    previous: Descriptor | None
    platforms: tuple[Platform, ...]

    def result(self, stats: Iterable[BlobStats], *, workers: int, connections: int) -> PullResult:
        """What pulling it did, once it is named."""
        plan, descriptor = self.plan, self.name.descriptor
        wanted = {b.digest for b in plan.blobs}
        mine = [s for s in stats if s.digest in wanted]
        fresh = [s for s in mine if not s.already_present]
        previous = self.previous
        up_to_date = not fresh and previous is not None and previous.digest == descriptor.digest
        return PullResult(
            reference=str(plan.ref),
            familiar=plan.ref.familiar,
            digest=plan.repo_digest,
            manifest_digest=descriptor.digest,
            config_digest=plan.manifests[0].manifest.config.digest,
            platform=descriptor.platform,
            layers=plan.layers,
            blobs=tuple(mine),
            bytes_downloaded=sum(s.downloaded for s in mine),
            bytes_total=sum(b.size for b in plan.blobs),
            seconds=time.monotonic() - plan.started,
            up_to_date=up_to_date,
            workers=workers,
            connections=connections,
            platforms=self.platforms,
        )


class Puller:
    """Pulls images into one store; reuses connections, tokens and clients across pulls."""

    def __init__(
        self,
        store: Store,
        *,
        settings: Settings | None = None,
        platform: Platform | PlatformSelection | None = None,
        credentials: CredentialSource | None = None,
        on_event: events.Listener = events.ignore,
    ) -> None:
        self.store = store
        self.settings = settings or Settings()
        if isinstance(platform, Platform):
            platform = PlatformSelection((platform,))
        self.platforms = platform or PlatformSelection((Platform.host(),))
        self._platform_requested = platform is not None
        self._credentials = credentials or CredentialStore()
        self._emit = on_event
        # Until close(): a blob committed here is named in index.json before gc or rmi,
        # which take the store exclusively, can judge it unreferenced.
        self._transport = Transport(
            tls_for=self.settings.tls_for, stall_seconds=self.settings.stall_timeout
        )
        self._store_use = contextlib.ExitStack()
        try:
            self._store_use.enter_context(store.shared_use())
        except BaseException:
            self._transport.close()
            raise
        self._clients: dict[str, RegistryClient] = {}

    def close(self) -> None:
        """Close connections and let gc and rmi at the store."""
        self._transport.close()
        self._store_use.close()

    def __enter__(self) -> Puller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(self, registry: str) -> RegistryClient:
        """The (cached) client for a registry, with its stored credentials."""
        if registry not in self._clients:
            self._clients[registry] = RegistryClient(
                registry,
                settings=self.settings,
                credentials=self._credentials.get(registry),
                transport=self._transport,
            )
        return self._clients[registry]

    def tags(self, ref: Reference) -> list[str]:
        """All tags of the reference's repository."""
        return self.client(ref.registry).list_tags(ref.repository)

    def pull(
        self,
        ref: Reference,
        *,
        default_tag: bool = False,
        name: str | None = None,
        platforms: PlatformSelection | None = None,
    ) -> PullResult:
        """Pull one image for ``platforms`` (default: the configured ones) into the store.

        ``name`` is the image's name in index.json (default: the reference itself);
        ``verify --repair`` pulls by digest an image that is named by its tag.
        """
        selector = ref.digest or ref.tag or "latest"
        self.client(ref.registry)  # credentials and settings fail before any output
        self._emit(events.PullStarted(str(ref), str(selector), ref.repository, default_tag))
        plan = self.resolve(ref, default_tag=default_tag, platforms=platforms)
        fetched = self.fetch_blobs(plan)
        result = self.commit(plan, fetched.blobs, workers=fetched.workers, name=name)
        fresh = [
            s for s in fetched.blobs if not s.already_present and s.digest in plan.layer_digests
        ]
        for s in fresh:
            self._emit(events.LayerEvent(s.digest, events.PULL_COMPLETE, s.size, s.size))
        self._emit(events.PullFinished(str(ref), ref.familiar, result.digest, result.up_to_date))
        return result

    def resolve(
        self,
        ref: Reference,
        *,
        default_tag: bool = False,
        platforms: PlatformSelection | None = None,
    ) -> ImagePlan:
        """Read the image's manifests (and index) and pick the platforms; stores nothing."""
        started = time.monotonic()
        want = platforms or self.platforms
        requested = platforms is not None or self._platform_requested
        client = self.client(ref.registry)
        what = ref.familiar
        selector: str | Digest = ref.digest or ref.tag or "latest"
        fetched = client.get_manifest(ref.repository, selector, what)
        doc = parse_document(fetched.raw, fetched.content_type, fetched.digest, what)
        if isinstance(doc, ImageIndex) and want.multiple:
            manifests = []
            for entry in select_platforms(doc, want, what):
                child = self._child_manifest(client, ref, entry)
                if isinstance(child, ImageIndex):
                    raise ManifestError(f"{what}: nested indexes hold several platforms; refused")
                manifests.append(PlannedManifest(child, entry))
            return ImagePlan(
                ref,
                fetched.digest,
                tuple(manifests),
                index=doc,
                platforms=want,
                platform_requested=requested,
                default_tag=default_tag,
                started=started,
            )
        seen = {fetched.digest}
        entry = None
        platform = want.platforms[0] if want.platforms else Platform.host()
        while isinstance(doc, ImageIndex):
            entry = select_platform(doc, platform, what)
            if entry.digest in seen or len(seen) > MAX_INDEX_DEPTH:
                raise ManifestError(f"{what}: index refers to itself or nests too deep")
            seen.add(entry.digest)
            doc = self._child_manifest(client, ref, entry)
        return ImagePlan(
            ref,
            fetched.digest,
            (PlannedManifest(doc, entry),),
            index=None,
            platforms=want,
            platform_requested=requested,
            default_tag=default_tag,
            started=started,
        )

    def commit(
        self,
        plan: ImagePlan,
        stats: Iterable[BlobStats],
        *,
        workers: int = 0,
        name: str | None = None,
    ) -> PullResult:
        """Store the manifests (and index) of a plan whose blobs are all in the store, and
        name the image in index.json (``name``, by default the reference)."""
        staged = self.stage(plan, name=name)
        self.store.add_images([staged.name])
        return staged.result(stats, workers=workers, connections=self.connections)

    @property
    def connections(self) -> int:
        """The transfers a pull may use at most (for its result)."""
        return self.settings.connections or self.settings.max_connections

    def stage(self, plan: ImagePlan, *, name: str | None = None) -> StagedImage:
        """Store the manifests (and index) of a plan whose blobs are all in the store; the
        image is named once its :attr:`StagedImage.name` is added to index.json (a batch
        names several images in one rewrite: ``Store.add_images``)."""
        name = name or str(plan.ref)
        previous = self.store.find_image(name)
        stored = [self._store_manifest(plan, planned) for planned in plan.manifests]
        annotations = {
            REPO_DIGEST_ANNOTATION: str(plan.repo_digest),
            CONTAINERD_NAME_ANNOTATION: name,
        }
        # With an index, each platform also gets a name of its own (see Store.add_image).
        platforms = [d for d, _ in stored] if plan.index is not None else []
        if plan.index is None:
            descriptor, source = stored[0]
            if source is not None:
                annotations[SOURCE_MANIFEST_ANNOTATION] = str(source)
        else:
            descriptor, source = self._store_index(plan.index, platforms)
            if source is not None:
                annotations[SOURCE_MANIFEST_ANNOTATION] = str(source)
        return StagedImage(
            plan,
            ImageName(descriptor, name, annotations, tuple(platforms)),
            previous,
            tuple(d.platform for d, _ in stored if d.platform is not None),
        )

    def _store_manifest(
        self, plan: ImagePlan, planned: PlannedManifest
    ) -> tuple[Descriptor, Digest | None]:
        """Check one manifest's config, write the manifest (as OCI); return its descriptor
        and, when it was converted, the digest the registry served."""
        manifest, entry = planned.manifest, planned.entry
        what = plan.ref.familiar
        config_raw = self.store.read_blob(manifest.config.digest, max_size=MAX_CONFIG_SIZE)
        config = parse_config(config_raw, what, layer_count=len(manifest.layers))
        want = plan.platforms
        if (
            plan.index is None
            and plan.platform_requested
            and config.platform is not None
            and not want.every
            and not any(platform_matches(p, config.platform) for p in want.platforms)
        ):
            raise PlatformNotFound(
                f"image with reference {what} was found but does not match the specified "
                f"platform: wanted {want}, actual: {config.platform}"
            )
        stored = self._write_manifest(manifest)
        source = manifest.digest if stored is not manifest else None
        platform = config.platform or (entry.platform if entry else None)
        if platform is None and len(want.platforms) == 1:
            platform = want.platforms[0]
        return Descriptor(stored.media_type, stored.digest, len(stored.raw), platform), source

    def _write_manifest(self, manifest: ImageManifest) -> ImageManifest:
        """Store a manifest as served and, for Docker's format, its OCI conversion (which
        it returns; the manifest itself otherwise). Already stored: nothing is written."""
        stored = to_oci(manifest)
        self.store.write_blob(manifest.digest, manifest.raw)
        if stored is not manifest:
            self.store.write_blob(stored.digest, stored.raw)
        return stored

    def _store_index(
        self, index: ImageIndex, stored: list[Descriptor]
    ) -> tuple[Descriptor, Digest | None]:
        """Store the index naming the pulled platforms: the registry's own bytes when it is
        an OCI index of exactly those manifests, else a new OCI index of them (the
        original kept beside it, as a converted manifest is)."""
        self.store.write_blob(index.digest, index.raw)
        original = [(d.digest, d.size) for d in index.manifests]
        if index.media_type == OCI_INDEX and original == [(d.digest, d.size) for d in stored]:
            return Descriptor(OCI_INDEX, index.digest, len(index.raw)), None
        raw = orjson.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [d.to_json() for d in stored],
            }
        )
        digest = digest_of(raw, index.digest.algorithm)
        self.store.write_blob(digest, raw)
        return Descriptor(OCI_INDEX, digest, len(raw)), index.digest

    def _child_manifest(
        self, client: RegistryClient, ref: Reference, entry: Descriptor
    ) -> ImageIndex | ImageManifest:
        """The manifest an index entry points at, from the store when we have it."""
        what = f"{ref.familiar} ({entry.platform})"
        if self.store.has_blob(entry.digest, entry.size):
            raw = self.store.read_blob(entry.digest, max_size=entry.size)
            return parse_document(raw, entry.media_type, entry.digest, what)
        fetched = client.get_manifest(ref.repository, entry.digest, what)
        if len(fetched.raw) != entry.size:
            raise ManifestError(
                f"{what}: manifest is {len(fetched.raw)} bytes, the index says {entry.size}"
            )
        content_type = fetched.content_type or entry.media_type
        return parse_document(fetched.raw, content_type, entry.digest, what)

    def fetch_blobs(self, plan: ImagePlan) -> Fetched:
        """Download the plan's missing configs and layers; return every blob's numbers
        (those already stored first) and the number of worker processes used."""
        layer_ids = plan.layer_digests
        missing: list[Descriptor] = []
        present: list[BlobStats] = []
        for blob in plan.blobs:
            if self.store.has_blob(blob.digest, blob.size):
                present.append(BlobStats.already_stored(blob.digest, blob.size))
                if blob.digest in layer_ids:
                    self._emit(events.LayerEvent(blob.digest, events.ALREADY_EXISTS))
            else:
                missing.append(blob)
                if blob.digest in layer_ids:
                    self._emit(events.LayerEvent(blob.digest, events.PULLING, 0, blob.size))

        def layer_events_only(event: events.Event) -> None:
            if not isinstance(event, events.LayerEvent) or event.digest in layer_ids:
                self._emit(event)

        downloader = self.downloader(layer_events_only)
        source = RepositoryBlobs(self.client(plan.ref.registry), plan.ref.repository)
        with ThreadPoolExecutor(1, thread_name_prefix="fastpull-manifests") as beside:
            # The manifests are written (and fsynced) while the layers download rather than
            # after them, where their fsync would delay the end of the pull. Should the pull
            # fail, they stay unnamed in blobs/, as any blob does until index.json names it.
            manifests = [beside.submit(self._write_manifest, p.manifest) for p in plan.manifests]
            fetched = downloader.fetch(missing, source)
        for written in manifests:
            written.result()
        return Fetched((*present, *fetched.blobs), fetched.workers)

    def downloader(self, on_event: events.Listener) -> Downloader:
        """An engine for this store with the configured connections and workers."""
        return Downloader(
            self.store,
            tls_for=self.settings.tls_for,
            connections=self.settings.connections,
            max_connections=self.settings.max_connections,
            ceiling_for=self.settings.ceiling_for,
            workers=self.settings.workers,
            stall_seconds=self.settings.stall_timeout,
            on_event=on_event,
        )


def pull(
    reference: str | Reference,
    *,
    store: str | None = None,
    platform: str | Platform | PlatformSelection | None = None,
    insecure_registries: Iterable[str] = (),
    ca_cert: str | None = None,
    connections: int | None = None,
    workers: int | None = None,
    stall_timeout: int | None = None,
    on_event: events.Listener = events.ignore,
) -> PullResult:
    """Pull one image into an OCI layout store and return what was pulled.

    ``store`` defaults to ``$FASTPULL_STORE`` or ``~/.local/share/fastpull/store``;
    ``platform`` to this machine's (``"linux/amd64,linux/arm64"`` or ``"all"`` store the
    index too). Raises a :class:`~fastpull.errors.FastpullError`
    subclass on failure; the store is left consistent either way.
    """
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    settings = Settings.load(
        insecure_registries=tuple(insecure_registries),
        ca_cert=ca_cert,
        store=store,
        connections=connections,
        workers=workers,
        stall_timeout=stall_timeout,
    )
    target = PlatformSelection.parse(platform) if isinstance(platform, str) else platform
    the_store = Store.open(resolve_store_path(settings.store))
    with (
        cancel.handled(),
        Puller(the_store, settings=settings, platform=target, on_event=on_event) as puller,
    ):
        return puller.pull(ref)


__all__ = [
    "FastpullError",
    "ImagePlan",
    "PlannedManifest",
    "PullResult",
    "Puller",
    "RepositoryBlobs",
    "StagedImage",
    "pull",
]
