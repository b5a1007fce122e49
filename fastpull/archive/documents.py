"""The JSON files of an image archive, built and parsed. No I/O.

What ``fastpull save`` writes is the layout ``docker save`` writes since Docker 25, so every
consumer finds what it reads (field notes, "Image archives"):

- ``oci-layout`` and ``index.json``, read by containerd (``ctr images import``, docker's
  containerd store), podman when index.json has one entry, and skopeo ``oci-archive:``. Each
  entry names one image by ``io.containerd.image.name`` (the full normalized reference: ctr
  uses it verbatim) and ``org.opencontainers.image.ref.name`` (the same full reference, as
  in fastpull's store, so ``oci-archive:F:docker.io/library/debian:latest`` is never
  ambiguous). No ``platform`` on the entries: ctr drops entries for other platforms.
- ``manifest.json``, read by ``docker load`` (graphdriver store), podman when index.json has
  several entries, and skopeo ``docker-archive:``: one item per image config, its
  ``RepoTags`` fully qualified (podman would otherwise prefix ``localhost/``) and its
  ``Layers`` in ``rootfs.diff_ids`` order, pointing at the same ``blobs/sha256/<hex>`` files.
- ``repositories`` for docker's legacy loader: familiar name → tag → top layer's DiffID.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from fastpull.errors import ArchiveError, InvalidReference, ManifestError
from fastpull.reference import Reference
from fastpull.registry.manifest import OCI_INDEX
from fastpull.types import Descriptor, Digest

OCI_LAYOUT = "oci-layout"
INDEX_JSON = "index.json"
MANIFEST_JSON = "manifest.json"
REPOSITORIES = "repositories"
METADATA = frozenset({OCI_LAYOUT, INDEX_JSON, MANIFEST_JSON, REPOSITORIES})
# The largest index.json / manifest.json / repositories held in memory on load.
MAX_METADATA_SIZE = 8 << 20
# manifest.json items; one per image.
MAX_ITEMS = 4096

LAYOUT_VERSION = "1.0.0"
CONTAINERD_NAME = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"


def blob_name(digest: Digest) -> str:
    """Where a blob lives in the archive: ``blobs/sha256/<hex>``."""
    return f"blobs/{digest.algorithm}/{digest.hex}"


def repo_tag(ref: Reference) -> str | None:
    """The fully qualified ``name:tag`` of a tagged reference; None for one that names a
    digest (docker leaves those out of RepoTags)."""
    if ref.tag is None or ref.digest is not None:
        return None
    return f"{ref.name}:{ref.tag}"


@dataclass(frozen=True)
class IndexEntry:
    """One image named in index.json: the manifest (or index) it is, and its annotations."""

    descriptor: Descriptor
    name: Reference
    extra: Mapping[str, str]


@dataclass(frozen=True)
class DockerItem:
    """One item of manifest.json: a config, its layers in DiffID order, and its names."""

    config: Digest
    layers: tuple[Digest, ...]
    tags: tuple[Reference, ...]
    top_diff_id: Digest | None


def oci_layout() -> bytes:
    """The ``oci-layout`` file."""
    return orjson.dumps({"imageLayoutVersion": LAYOUT_VERSION})


def index_json(entries: Sequence[IndexEntry]) -> bytes:
    """``index.json``: one entry per name, in the order given, without ``platform``."""
    manifests = []
    for entry in entries:
        d = entry.descriptor
        name = str(entry.name)
        annotations = {**entry.extra, CONTAINERD_NAME: name, REF_NAME: name}
        manifests.append(
            {
                "mediaType": d.media_type,
                "digest": str(d.digest),
                "size": d.size,
                "annotations": dict(sorted(annotations.items())),
            }
        )
    return orjson.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})


def manifest_json(items: Sequence[DockerItem]) -> bytes:
    """docker's ``manifest.json`` (with docker's trailing newline)."""
    out = []
    for item in items:
        tags = [t for t in (repo_tag(ref) for ref in item.tags) if t is not None]
        out.append(
            {
                "Config": blob_name(item.config),
                "RepoTags": tags,
                "Layers": [blob_name(layer) for layer in item.layers],
            }
        )
    return orjson.dumps(out) + b"\n"


def repositories(items: Sequence[DockerItem]) -> bytes | None:
    """docker's legacy ``repositories`` file, or None when no image has a tag and a layer."""
    repos: dict[str, dict[str, str]] = {}
    for item in items:
        if item.top_diff_id is None:
            continue
        for ref in item.tags:
            if repo_tag(ref) is not None and ref.tag is not None:
                repos.setdefault(ref.familiar_name, {})[ref.tag] = item.top_diff_id.hex
    if not repos:
        return None
    ordered = {name: dict(sorted(tags.items())) for name, tags in sorted(repos.items())}
    return orjson.dumps(ordered) + b"\n"


def diff_ids(config: bytes, what: str) -> tuple[Digest, ...]:
    """An image config's ``rootfs.diff_ids``; ArchiveError if they are missing or malformed."""
    doc = _json(config, what)
    rootfs = doc.get("rootfs") if isinstance(doc, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or len(ids) > 4096:
        raise ArchiveError(f"{what}: the image config has no rootfs.diff_ids list")
    try:
        return tuple(Digest.parse(text) for text in ids)
    except ManifestError as exc:
        raise ArchiveError(f"{what}: rootfs.diff_ids: {exc}") from None


def _json(raw: bytes, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ArchiveError(f"{what} is not valid JSON") from None


@dataclass(frozen=True)
class DockerEntry:
    """An item of an archive's manifest.json as written: member paths and names."""

    config: str
    layers: tuple[str, ...]
    tags: tuple[Reference, ...]


def parse_manifest_json(raw: bytes) -> list[DockerEntry]:
    """The items of a docker-archive ``manifest.json``; ArchiveError for anything malformed
    (RepoTags are parsed as ``docker load`` parses them: normalized, tag required)."""
    doc = _json(raw, MANIFEST_JSON)
    if not isinstance(doc, list) or len(doc) > MAX_ITEMS:
        raise ArchiveError(f"{MANIFEST_JSON} is not a list of at most {MAX_ITEMS} images")
    entries = []
    for i, item in enumerate(doc):
        where = f"{MANIFEST_JSON} item {i}"
        if not isinstance(item, dict):
            raise ArchiveError(f"{where} is not an object")
        config = item.get("Config")
        layers = item.get("Layers")
        tags = item.get("RepoTags") or []
        if not isinstance(config, str):
            raise ArchiveError(f"{where} has no Config path")
        if not isinstance(layers, list) or not all(isinstance(p, str) for p in layers):
            raise ArchiveError(f"{where} has no Layers list of paths")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ArchiveError(f"{where}: RepoTags is not a list of names")
        try:
            refs = tuple(Reference.parse(t) for t in tags)
        except InvalidReference as exc:
            raise ArchiveError(f"{where}: RepoTags: {exc}") from None
        entries.append(DockerEntry(config, tuple(layers), refs))
    return entries


def layout_version(raw: bytes) -> str | None:
    """``imageLayoutVersion`` of an ``oci-layout`` file, or None if it has none."""
    doc = _json(raw, OCI_LAYOUT)
    version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
    return version if isinstance(version, str) else None


def entry_name(annotations: Mapping[str, str]) -> Reference | None:
    """The image an index.json entry names: ``io.containerd.image.name``, else a
    ``ref.name`` that is a whole reference (a bare tag such as ``latest`` names no
    repository: ctr and podman invent one, fastpull does not)."""
    for key in (CONTAINERD_NAME, REF_NAME):
        text = annotations.get(key, "")
        if key == REF_NAME and not any(c in text for c in "/:@"):
            continue
        try:
            return Reference.parse(text)
        except InvalidReference:
            continue
    return None


__all__ = [
    "CONTAINERD_NAME",
    "INDEX_JSON",
    "MANIFEST_JSON",
    "MAX_METADATA_SIZE",
    "METADATA",
    "OCI_LAYOUT",
    "REF_NAME",
    "REPOSITORIES",
    "DockerEntry",
    "DockerItem",
    "IndexEntry",
    "blob_name",
    "diff_ids",
    "entry_name",
    "index_json",
    "layout_version",
    "manifest_json",
    "oci_layout",
    "parse_manifest_json",
    "repo_tag",
]
