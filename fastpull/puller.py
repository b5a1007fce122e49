"""One pull, start to finish: reference → manifest → missing blobs → store → index.json.

Shared by the Python API (:func:`fastpull.pull`) and the CLI, so both behave the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import auth, cancel, events
from .credentials import CredentialStore
from .download import BlobStats, Downloader
from .errors import FastpullError, ManifestError, PlatformNotFound
from .manifest import (
    MAX_CONFIG_SIZE,
    ImageIndex,
    ImageManifest,
    parse_config,
    parse_document,
    platform_matches,
    select_platform,
    to_oci,
)
from .reference import Reference
from .registry import RegistryClient
from .settings import Settings
from .store import (
    CONTAINERD_NAME_ANNOTATION,
    REPO_DIGEST_ANNOTATION,
    SOURCE_MANIFEST_ANNOTATION,
    Store,
    resolve_store_path,
)
from .transport import Response, Transport
from .types import Descriptor, Digest, Platform

# An index may point at another index; deeper nesting than this is refused.
MAX_INDEX_DEPTH = 3


@dataclass(frozen=True)
class PullResult:
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


class Puller:
    """Pulls images into one store; reuses connections, tokens and clients across pulls."""

    def __init__(
        self,
        store: Store,
        *,
        settings: Settings | None = None,
        platform: Platform | None = None,
        credentials: CredentialStore | None = None,
        on_event: events.Listener = events.ignore,
    ) -> None:
        self.store = store
        self.settings = settings or Settings()
        self.platform = platform or Platform.host()
        # Like docker: a single-platform image is refused only when --platform was given.
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
        self, ref: Reference, *, default_tag: bool = False, name: str | None = None
    ) -> PullResult:
        """Pull one image for the configured platform into the store.

        ``name`` is the image's name in index.json (default: the reference itself);
        ``verify --repair`` pulls by digest an image that is named by its tag.
        """
        name = name or str(ref)
        started = time.monotonic()
        client = self.client(ref.registry)
        what = ref.familiar
        selector: str | Digest = ref.digest or ref.tag or "latest"
        self._emit(events.PullStarted(str(ref), str(selector), ref.repository, default_tag))
        fetched = client.get_manifest(ref.repository, selector, what)
        repo_digest = fetched.digest
        doc = parse_document(fetched.raw, fetched.content_type, fetched.digest, what)
        seen = {fetched.digest}
        while isinstance(doc, ImageIndex):
            entry = select_platform(doc, self.platform, what)
            if entry.digest in seen or len(seen) > MAX_INDEX_DEPTH:
                raise ManifestError(f"{what}: index refers to itself or nests too deep")
            seen.add(entry.digest)
            doc = self._child_manifest(client, ref, entry)
        manifest = doc
        previous = self.store.find_image(name)
        stats, workers = self._fetch_blobs(client, ref, manifest)
        config_raw = self.store.read_blob(manifest.config.digest, max_size=MAX_CONFIG_SIZE)
        config = parse_config(config_raw, what, layer_count=len(manifest.layers))
        if (
            self._platform_requested
            and config.platform is not None
            and not platform_matches(self.platform, config.platform)
        ):
            raise PlatformNotFound(
                f"image with reference {what} was found but does not match the specified "
                f"platform: wanted {self.platform}, actual: {config.platform}"
            )
        stored = to_oci(manifest)
        annotations = {
            REPO_DIGEST_ANNOTATION: str(repo_digest),
            CONTAINERD_NAME_ANNOTATION: name,
        }
        self.store.write_blob(manifest.digest, manifest.raw)
        if stored is not manifest:
            self.store.write_blob(stored.digest, stored.raw)
            annotations[SOURCE_MANIFEST_ANNOTATION] = str(manifest.digest)
        platform = config.platform or self.platform
        descriptor = Descriptor(
            stored.media_type, stored.digest, len(stored.raw), platform=platform
        )
        self.store.add_image(descriptor, name, annotations)
        downloaded = sum(s.downloaded for s in stats)
        fresh = [s for s in stats if not s.already_present and s.digest != manifest.config.digest]
        for s in fresh:
            self._emit(events.LayerEvent(s.digest, events.PULL_COMPLETE, s.size, s.size))
        up_to_date = not fresh and previous is not None and previous.digest == manifest.digest
        self._emit(events.PullFinished(str(ref), ref.familiar, repo_digest, up_to_date))
        return PullResult(
            reference=str(ref),
            familiar=ref.familiar,
            digest=repo_digest,
            manifest_digest=stored.digest,
            config_digest=manifest.config.digest,
            platform=platform,
            layers=manifest.layers,
            blobs=tuple(stats),
            bytes_downloaded=downloaded,
            bytes_total=manifest.size,
            seconds=time.monotonic() - started,
            up_to_date=up_to_date,
            workers=workers,
            connections=self.settings.connections,
        )

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

    def _fetch_blobs(
        self, client: RegistryClient, ref: Reference, manifest: ImageManifest
    ) -> tuple[list[BlobStats], int]:
        layer_ids = {layer.digest for layer in manifest.layers}
        missing: list[Descriptor] = []
        present: list[BlobStats] = []
        for blob in (manifest.config, *manifest.layers):
            if blob.digest in {b.digest for b in missing} | {p.digest for p in present}:
                continue
            if self.store.has_blob(blob.digest, blob.size):
                present.append(BlobStats(blob.digest, blob.size, 0, 0.0, 0, 0, True))
                if blob.digest in layer_ids:
                    self._emit(events.LayerEvent(blob.digest, events.ALREADY_EXISTS))
            else:
                missing.append(blob)
                if blob.digest in layer_ids:
                    self._emit(events.LayerEvent(blob.digest, events.PULLING, 0, blob.size))

        def layer_events_only(event: events.Event) -> None:
            if not isinstance(event, events.LayerEvent) or event.digest in layer_ids:
                self._emit(event)

        downloader = Downloader(
            self.store,
            tls_for=self.settings.tls_for,
            connections=self.settings.connections,
            workers=self.settings.workers,
            stall_seconds=self.settings.stall_timeout,
            on_event=layer_events_only,
        )
        fetched = downloader.fetch(missing, RepositoryBlobs(client, ref.repository))
        return present + fetched, downloader.workers_used


def pull(
    reference: str | Reference,
    *,
    store: str | None = None,
    platform: str | Platform | None = None,
    insecure_registries: Iterable[str] = (),
    ca_cert: str | None = None,
    connections: int | None = None,
    workers: int | None = None,
    stall_timeout: int | None = None,
    on_event: events.Listener = events.ignore,
) -> PullResult:
    """Pull one image into an OCI layout store and return what was pulled.

    ``store`` defaults to ``$FASTPULL_STORE`` or ``~/.local/share/fastpull/store``;
    ``platform`` to this machine's. Raises a :class:`~fastpull.errors.FastpullError`
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
    target = Platform.parse(platform) if isinstance(platform, str) else platform
    the_store = Store.open(resolve_store_path(settings.store))
    with (
        cancel.handled(),
        Puller(the_store, settings=settings, platform=target, on_event=on_event) as puller,
    ):
        return puller.pull(ref)


__all__ = ["FastpullError", "PullResult", "Puller", "RepositoryBlobs", "pull"]
