"""Looking after the store: ``rmi`` (remove images), ``gc`` (delete what nothing needs), ``df``.

Blobs are deleted only under :meth:`Store.exclusive_use`, which waits for running pulls (they
hold the store shared from start to finish), so a blob a pull has just committed and is about
to name in index.json is never taken for garbage. Deleting also needs every image's closure
(see :mod:`fastpull.store.inventory`): when an entry cannot be walked, gc refuses and rmi keeps the
blobs, rather than delete what a damaged image may still need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from fastpull.errors import InvalidReference, ManifestError, StoreDamaged
from fastpull.reference import Reference
from fastpull.registry.manifest import MAX_MANIFEST_SIZE
from fastpull.store.gc import delete_blob, ingests, remove_ingest, stored_blobs
from fastpull.store.inventory import (
    CONFIG,
    LAYER,
    Closure,
    DiskUsage,
    disk_usage,
    display_name,
    names_image,
    unreferenced,
    walk,
)
from fastpull.store.layout import (
    PLATFORM_OF_ANNOTATION,
    REF_NAME_ANNOTATION,
    REPO_DIGEST_ANNOTATION,
    SOURCE_MANIFEST_ANNOTATION,
    Store,
)
from fastpull.types import Descriptor, Digest, Platform

DEFAULT_TIMEOUT = 60.0
"""Seconds gc and rmi wait for running pulls before giving up."""

Notify = Callable[[], None]


@dataclass(frozen=True)
class StoredImage:
    """One index.json entry as maintenance sees it, usable or not.

    ``descriptor`` is None and ``error`` says why when fastpull cannot use the entry (written
    by another tool with a digest algorithm fastpull does not verify, say). ``platform_of``
    is the name of the multi-platform image this entry is one platform of, if it is one.
    """

    position: int
    name: str | None
    descriptor: Descriptor | None
    repo_digest: Digest | None = None
    source_manifest: Digest | None = None
    error: str | None = None
    platform_of: str | None = None

    @property
    def label(self) -> str:
        """How messages name it: the short reference, else its place in index.json."""
        return display_name(self.name) if self.name else f"index.json entry #{self.position}"

    @property
    def digests(self) -> frozenset[Digest]:
        """The digests ``rmi NAME@DIGEST`` may name it by: its manifest and repo digests."""
        found = {self.descriptor.digest} if self.descriptor else set()
        return frozenset(found | ({self.repo_digest} if self.repo_digest else set()))


def load_images(store: Store) -> list[StoredImage]:
    """Every index.json entry, in file order."""
    images = []
    for position, raw in enumerate(store.index_entries(), start=1):
        annotations = raw.get("annotations")
        annotations = annotations if isinstance(annotations, dict) else {}
        name = _text(annotations.get(REF_NAME_ANNOTATION))
        platform_of = _text(annotations.get(PLATFORM_OF_ANNOTATION))
        try:
            descriptor = Descriptor.from_json(raw, f"index.json entry #{position}")
            repo_digest = _annotated_digest(descriptor, REPO_DIGEST_ANNOTATION)
            source = _annotated_digest(descriptor, SOURCE_MANIFEST_ANNOTATION)
        except ManifestError as exc:
            images.append(
                StoredImage(position, name, None, error=str(exc), platform_of=platform_of)
            )
            continue
        images.append(
            StoredImage(position, name, descriptor, repo_digest, source, platform_of=platform_of)
        )
    return images


def whole_images(images: Sequence[StoredImage]) -> list[StoredImage]:
    """``images`` without the entries naming one platform of another image among them: those
    blobs are that image's too, so counting or checking them again would tell nothing new."""
    names = {image.name for image in images if image.name}
    return [image for image in images if image.platform_of not in names]


def platforms_of(images: Sequence[StoredImage], image: StoredImage) -> list[Platform]:
    """The platforms that have names of their own as platforms of ``image``."""
    return [
        other.descriptor.platform
        for other in images
        if other.platform_of is not None
        and other.platform_of == image.name
        and other.descriptor is not None
        and other.descriptor.platform is not None
    ]


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _annotated_digest(descriptor: Descriptor, key: str) -> Digest | None:
    text = descriptor.annotations.get(key)
    if text is None:
        return None
    try:
        return Digest.parse(text)
    except ManifestError as exc:
        raise ManifestError(f"annotation {key}: {exc}") from None


def disk_reader(store: Store) -> Callable[[Digest, int | None], bytes | None]:
    """A closure reader over whatever is in ``blobs/`` (gc, rmi, df: nothing is re-hashed)."""

    def read(digest: Digest, size: int | None) -> bytes | None:
        found = store.blob_size(digest)
        if found is None or (size is not None and found != size):
            return None
        return read_manifest(store, digest, found)

    return read


def read_manifest(store: Store, digest: Digest, size: int) -> bytes:
    """A stored manifest's bytes; ManifestError if it is too large to be one."""
    if size > MAX_MANIFEST_SIZE:
        raise ManifestError(f"{digest} is {size} bytes, more than a manifest may be")
    return store.read_blob(digest, max_size=MAX_MANIFEST_SIZE)


def closure_of(store: Store, image: StoredImage) -> Closure | None:
    """The image's closure over what is on disk; None for an entry fastpull cannot use."""
    if image.descriptor is None:
        return None
    return walk(image.descriptor, disk_reader(store), image.source_manifest)


def why_unwalkable(image: StoredImage, closure: Closure | None) -> str | None:
    """Why the blobs ``image`` needs cannot all be known, or None if they can."""
    if closure is None:
        return f"its index.json entry cannot be used: {image.error}"
    if not closure.gaps:
        return None
    gap = closure.gaps[0]
    if gap.reason is not None:
        return f"its {gap.need.role} {gap.need.digest} cannot be used: {gap.reason}"
    return f"its {gap.need.role} {gap.need.digest} is missing or damaged"


# ── rmi ────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Removal:
    """What ``rmi`` did, in docker's words: ``Untagged:`` names, ``Deleted:`` blobs."""

    untagged: tuple[str, ...]
    deleted: tuple[Digest, ...]
    freed: int
    missing: tuple[str, ...]
    kept_because: str | None = None


def remove_images(
    store: Store,
    refs: Sequence[Reference],
    *,
    prune: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    on_wait: Notify = lambda: None,
) -> Removal:
    """Remove the images ``refs`` name, then (with ``prune``) the blobs no other image needs.

    References that name no image are returned in ``missing``; the others are still removed.
    """
    if not prune:
        return _remove(store, refs, prune=False)
    with store.exclusive_use(timeout, on_wait):
        return _remove(store, refs, prune=True)


def _remove(store: Store, refs: Sequence[Reference], *, prune: bool) -> Removal:
    images = load_images(store)
    chosen: list[StoredImage] = []
    missing: list[str] = []
    for ref in refs:
        matched = [
            image
            for image in images
            if image.name is not None and names_image(ref, image.name, image.digests)
        ]
        if not matched:
            missing.append(ref.familiar)
        chosen.extend(image for image in matched if image not in chosen)
    # The names of an image's platforms go with it.
    named = {image.name for image in chosen}
    chosen.extend(i for i in images if i.platform_of in named and i not in chosen)
    # Closures first: a removed image's manifest says which blobs it used.
    removed_closures = [closure_of(store, image) for image in chosen]
    names = list(dict.fromkeys(image.name for image in chosen if image.name))
    for name in names:
        store.remove_image(name)
    remaining = [image for image in images if image.name not in names]
    untagged = [display_name(name) for name in names]
    untagged += _digest_references(chosen, remaining)
    if not prune or not chosen:
        return Removal(tuple(untagged), (), 0, tuple(missing))
    remaining_closures = []
    for image in remaining:
        closure = closure_of(store, image)
        reason = why_unwalkable(image, closure)
        if reason is not None:
            kept = f"cannot tell which blobs {image.label} uses: {reason}"
            return Removal(tuple(untagged), (), 0, tuple(missing), kept_because=kept)
        assert closure is not None
        remaining_closures.append(closure)
    candidates = list(_deletion_order(c for c in removed_closures if c is not None))
    deleted, freed = [], 0
    for digest in unreferenced(candidates, remaining_closures):
        size = delete_blob(store, digest)
        if size is not None:
            deleted.append(digest)
            freed += size
    return Removal(tuple(untagged), tuple(deleted), freed, tuple(missing))


def _digest_references(chosen: list[StoredImage], remaining: list[StoredImage]) -> list[str]:
    """docker also untags ``repo@digest`` once no tag of the repository keeps that digest."""
    out = []
    for image in chosen:
        ref = _reference(image.name)
        if ref is None or ref.digest is not None or image.repo_digest is None:
            continue
        still_named = any(
            other.repo_digest == image.repo_digest
            and (other_ref := _reference(other.name)) is not None
            and other_ref.name == ref.name
            for other in remaining
        )
        line = f"{ref.familiar_name}@{image.repo_digest}"
        if not still_named and line not in out:
            out.append(line)
    return out


def _reference(name: str | None) -> Reference | None:
    if name is None:
        return None
    try:
        return Reference.parse(name)
    except InvalidReference:
        return None


def _deletion_order(closures: Iterator[Closure]) -> Iterator[Digest]:
    """Configs (docker's image IDs) first, then layers, then manifests."""
    needs = [need for closure in closures for need in closure.needs]
    seen: set[Digest] = set()
    for roles in ({CONFIG}, {LAYER}, None):
        for need in needs:
            if (roles is None or need.role in roles) and need.digest not in seen:
                seen.add(need.digest)
                yield need.digest


# ── gc ─────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Collected:
    """One thing ``gc`` deleted (or would delete): a blob or a stale download."""

    kind: str  # "blob", "download" or "temp"
    name: str  # the digest, the ingest name <alg>-<hex>, or the temp file's name
    size: int


@dataclass(frozen=True)
class GarbageReport:
    """What ``gc`` did; ``in_progress`` are downloads it left alone."""

    removed: tuple[Collected, ...]
    in_progress: tuple[str, ...]
    dry_run: bool

    @property
    def freed(self) -> int:
        """Bytes reclaimed (or that would be)."""
        return sum(item.size for item in self.removed)


def collect_garbage(
    store: Store,
    *,
    dry_run: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    on_wait: Notify = lambda: None,
) -> GarbageReport:
    """Delete blobs no image needs and downloads no process is working on.

    Raises StoreDamaged, deleting nothing, when an image's blobs cannot all be known. A dry
    run takes no lock: it reports what gc would do now, pulls running or not.
    """
    if dry_run:
        return _collect(store, dry_run=True)
    with store.exclusive_use(timeout, on_wait):
        return _collect(store, dry_run=False)


def _collect(store: Store, *, dry_run: bool) -> GarbageReport:
    closures = []
    for image in load_images(store):
        closure = closure_of(store, image)
        reason = why_unwalkable(image, closure)
        if reason is not None:
            raise StoreDamaged(
                f"cannot tell which blobs {image.label} uses: {reason}; nothing was deleted. "
                f"Run 'fastpull verify --repair', or remove the image with 'fastpull rmi'",
                store=str(store.root),
            )
        assert closure is not None
        closures.append(closure)
    removed: list[Collected] = []
    blobs, _ = stored_blobs(store)
    sizes = {blob.digest: blob for blob in blobs}
    for digest in unreferenced(sizes, closures):
        blob = sizes[digest]
        freed = blob.size if dry_run else delete_blob(store, digest, blob.stat)
        if freed is not None:
            removed.append(Collected("blob", str(digest), freed))
    in_progress = []
    for ingest in ingests(store):
        freed = None if ingest.live else ingest.size
        if freed is not None and not dry_run:
            freed = remove_ingest(store, ingest.name)
        if freed is None:
            in_progress.append(ingest.name)
        else:
            removed.append(Collected("download", ingest.name, freed))
    for name, size in store.index_debris(remove=not dry_run):
        removed.append(Collected("temp", name, size))
    return GarbageReport(tuple(removed), tuple(in_progress), dry_run)


# ── df ─────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Usage:
    """``df``: the numbers, and the images whose blobs could not all be counted."""

    usage: DiskUsage
    warnings: tuple[str, ...] = field(default=())


def usage(store: Store) -> Usage:
    """Add up the store as it is now (no lock: a pull may be changing it meanwhile)."""
    images = whole_images(load_images(store))
    needed = []
    warnings = []
    for image in images:
        closure = closure_of(store, image)
        reason = why_unwalkable(image, closure)
        if reason is not None:
            warnings.append(f"cannot tell which blobs {image.label} uses: {reason}")
        needed.append(closure.digests if closure is not None else frozenset())
    blobs, _ = stored_blobs(store)
    stored = {blob.digest: blob.size for blob in blobs}
    downloads = [(ingest.size, ingest.live) for ingest in ingests(store)]
    return Usage(disk_usage(stored, needed, downloads), tuple(warnings))


__all__ = [
    "DEFAULT_TIMEOUT",
    "Collected",
    "GarbageReport",
    "Removal",
    "StoredImage",
    "Usage",
    "closure_of",
    "collect_garbage",
    "disk_reader",
    "load_images",
    "platforms_of",
    "read_manifest",
    "remove_images",
    "usage",
    "whole_images",
    "why_unwalkable",
]
