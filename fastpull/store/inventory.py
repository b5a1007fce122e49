"""Which blobs each image in the store needs, and what the store adds up to. No I/O.

An image is an ``index.json`` entry. Its closure is every blob reachable from it: the entry's
manifest (or image index, then each child manifest, to any depth up to :data:`MAX_DEPTH`),
each manifest's config and layers, and for Docker-format images stored converted to OCI the
registry's original manifest as well (``io.fastpull.source-manifest``). Manifests are read
through a caller-supplied :data:`Reader`, so the walk itself touches no files: ``verify`` hands
it only blobs whose content it has just checked, ``gc`` whatever is on disk.

A walk that cannot read or parse a manifest cannot know that manifest's children; it records a
:class:`Gap` instead of guessing, and callers that delete blobs refuse to act on such a store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from fastpull.errors import InvalidReference, ManifestError
from fastpull.reference import Reference
from fastpull.registry.manifest import INDEX_TYPES, MANIFEST_TYPES, ImageIndex, parse_document
from fastpull.types import Descriptor, Digest

# An index inside an index inside an index is already unusual; past this, refuse.
MAX_DEPTH = 4

Reader = Callable[[Digest, int | None], bytes | None]
"""``read(digest, size)``: a manifest's bytes, or None if they are not there to be trusted
(missing, another size than ``size`` when that is known, failed verification); it may raise
ManifestError to say why the blob cannot be a manifest."""

# Roles of the blobs in a closure; the first three are documents the walk opens.
INDEX = "index"
MANIFEST = "manifest"
SOURCE_MANIFEST = "source manifest"
CONFIG = "config"
LAYER = "layer"
BLOB = "blob"
_DOCUMENTS = frozenset({INDEX, MANIFEST, SOURCE_MANIFEST})


@dataclass(frozen=True)
class Need:
    """One blob an image needs: its digest, its size when a descriptor states it, its role."""

    digest: Digest
    size: int | None
    role: str
    media_type: str | None = None


@dataclass(frozen=True)
class Gap:
    """A document of the closure that could not be opened, so its children are unknown.

    ``reason`` is None when the reader had nothing to give (the blob is missing, of the
    wrong size or corrupt: the caller knows which), else why the document is unusable.
    """

    need: Need
    reason: str | None


@dataclass(frozen=True)
class Closure:
    """Everything one image needs, as far as the walk could see."""

    needs: tuple[Need, ...]
    gaps: tuple[Gap, ...]

    @property
    def complete(self) -> bool:
        """Whether every document was read, so ``needs`` is the whole closure."""
        return not self.gaps

    @property
    def digests(self) -> frozenset[Digest]:
        """The digests of ``needs``."""
        return frozenset(need.digest for need in self.needs)


def _role(media_type: str | None) -> str:
    if media_type in INDEX_TYPES:
        return INDEX
    if media_type in MANIFEST_TYPES:
        return MANIFEST
    return BLOB


def walk(entry: Descriptor, read: Reader, source_manifest: Digest | None = None) -> Closure:
    """The closure of the image whose index.json entry is ``entry``.

    ``source_manifest`` is the digest in the entry's ``io.fastpull.source-manifest``
    annotation, if any. Each blob appears once in ``needs``, in the order first met: the
    manifest, then its config and layers (depth first through indexes), then the source
    manifest and what only it lists.
    """
    needs: dict[Digest, Need] = {}
    gaps: list[Gap] = []

    def visit(need: Need, depth: int) -> None:
        if need.digest in needs:
            return
        needs[need.digest] = need
        if need.role not in _DOCUMENTS:
            return
        if depth > MAX_DEPTH:
            gaps.append(Gap(need, f"indexes nest more than {MAX_DEPTH} deep"))
            return
        try:
            raw = read(need.digest, need.size)
            if raw is None:
                gaps.append(Gap(need, None))
                return
            doc = parse_document(raw, need.media_type, need.digest, f"{need.role} {need.digest}")
        except ManifestError as exc:
            gaps.append(Gap(need, str(exc)))
            return
        if isinstance(doc, ImageIndex):
            for child in doc.manifests:
                role = _role(child.media_type)
                visit(Need(child.digest, child.size, role, child.media_type), depth + 1)
            return
        visit(Need(doc.config.digest, doc.config.size, CONFIG, doc.config.media_type), depth)
        for layer in doc.layers:
            visit(Need(layer.digest, layer.size, LAYER, layer.media_type), depth)

    # An entry must be a manifest or an index; anything else is opened as one and found out.
    role = INDEX if entry.media_type in INDEX_TYPES else MANIFEST
    visit(Need(entry.digest, entry.size, role, entry.media_type), 0)
    if source_manifest is not None:
        visit(Need(source_manifest, None, SOURCE_MANIFEST), 0)
    return Closure(tuple(needs.values()), tuple(gaps))


def display_name(name: str) -> str:
    """How to show an image name: docker's short form (``debian:latest``) when it is a
    reference, else as written (other tools name entries as they like)."""
    try:
        return Reference.parse(name).familiar
    except InvalidReference:
        return name


def names_image(ref: Reference, name: str, digests: Collection[Digest]) -> bool:
    """Whether ``rmi REF`` means the image named ``name`` whose manifest and repo digests
    are ``digests``.

    As for docker: a tag names exactly that tag. A digest (``repo@sha256:…``) names every
    image of that repository pulled by or resolved to that digest, the repo digest
    ``images --digests`` shows included; with ``repo:tag@sha256:…`` the tag must match too.
    """
    if name == str(ref):
        return True
    if ref.digest is None:
        return False
    try:
        named = Reference.parse(name)
    except InvalidReference:
        return False
    if named.name != ref.name or (ref.tag is not None and named.tag != ref.tag):
        return False
    return ref.digest == named.digest or ref.digest in digests


def unreferenced(stored: Iterable[Digest], closures: Iterable[Closure]) -> list[Digest]:
    """The stored digests that no closure needs, in the order given."""
    needed: set[Digest] = set()
    for closure in closures:
        needed |= closure.digests
    return [digest for digest in stored if digest not in needed]


@dataclass(frozen=True)
class DiskUsage:
    """``fastpull df``: what the store holds and what ``gc`` would give back. Bytes are
    what is on disk: a blob needed by several images counts once, a missing one not at all.
    """

    images: int
    blobs: int
    blob_bytes: int
    used_blobs: int
    used_bytes: int
    shared_blobs: int
    shared_bytes: int
    ingests: int
    ingest_bytes: int
    stale_ingests: int
    stale_ingest_bytes: int

    @property
    def unreferenced_blobs(self) -> int:
        """Blobs no image needs."""
        return self.blobs - self.used_blobs

    @property
    def unreferenced_bytes(self) -> int:
        """Bytes of the blobs no image needs."""
        return self.blob_bytes - self.used_bytes

    @property
    def total_bytes(self) -> int:
        """Everything: blobs and downloads under ``ingest/``."""
        return self.blob_bytes + self.ingest_bytes

    @property
    def reclaimable_bytes(self) -> int:
        """What ``gc`` frees: unreferenced blobs and stale downloads."""
        return self.unreferenced_bytes + self.stale_ingest_bytes


def disk_usage(
    stored: Mapping[Digest, int],
    images: Sequence[Collection[Digest]],
    ingests: Sequence[tuple[int, bool]],
) -> DiskUsage:
    """Add up ``stored`` (digest → bytes on disk), the blobs each image needs (one
    collection per image), and the downloads under ``ingest/`` as (bytes, live) pairs."""
    users: Counter[Digest] = Counter()
    for needed in images:
        users.update(set(needed))
    used = [digest for digest in stored if users[digest] >= 1]
    shared = [digest for digest in used if users[digest] > 1]
    stale = [size for size, live in ingests if not live]
    return DiskUsage(
        images=len(images),
        blobs=len(stored),
        blob_bytes=sum(stored.values()),
        used_blobs=len(used),
        used_bytes=sum(stored[digest] for digest in used),
        shared_blobs=len(shared),
        shared_bytes=sum(stored[digest] for digest in shared),
        ingests=len(ingests),
        ingest_bytes=sum(size for size, _ in ingests),
        stale_ingests=len(stale),
        stale_ingest_bytes=sum(stale),
    )


__all__ = [
    "MAX_DEPTH",
    "Closure",
    "DiskUsage",
    "Gap",
    "Need",
    "Reader",
    "disk_usage",
    "display_name",
    "names_image",
    "unreferenced",
    "walk",
]
