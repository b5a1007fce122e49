"""Manifests, indexes and image configs: parse, check, and pick a platform. No I/O.

What is checked before anything is used (field-notes, "Security pitfalls"):
- the size (4 MiB at most, as containerd and c/image);
- the raw bytes against the digest asked for and the server's ``Docker-Content-Digest``
  (hashing the bytes received, never a re-serialization);
- the ``Content-Type`` against the document's own ``mediaType``;
- that a document is either an index or a manifest, never both (CVE-2021-41190);
- every descriptor (digest syntax, size range, media type) via ``Descriptor.from_json``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

import orjson

from fastpull.errors import ManifestError, PlatformNotFound, UnsupportedManifest
from fastpull.hashing import new_hasher
from fastpull.types import Descriptor, Digest, Platform, PlatformSelection

MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 8 << 20
MAX_LAYERS = 4096

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# Sent on every manifest request; schema 1 is deliberately absent.
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

# Content-Types a registry may send that say nothing about the document.
_GENERIC_TYPES = frozenset({"", "application/json", "application/octet-stream", "text/plain"})


class ImageIndex(NamedTuple):
    """An OCI image index or Docker manifest list."""

    media_type: str
    digest: Digest
    manifests: tuple[Descriptor, ...]
    raw: bytes


class ImageManifest(NamedTuple):
    """An image manifest: one config and its layers, for one platform."""

    media_type: str
    digest: Digest
    config: Descriptor
    layers: tuple[Descriptor, ...]
    raw: bytes

    @property
    def size(self) -> int:
        """Bytes of config and layers (what ``images`` reports as SIZE)."""
        return self.config.size + sum(layer.size for layer in self.layers)


class ImageConfig(NamedTuple):
    """The few config fields fastpull shows."""

    created: datetime | None
    platform: Platform | None


def digest_of(raw: bytes, algorithm: str = "sha256") -> Digest:
    """Digest of bytes with the given algorithm."""
    hasher = new_hasher(algorithm)
    hasher.update(raw)
    return Digest(algorithm, hasher.hexdigest())


def check_digest(raw: bytes, expected: Digest, what: str) -> None:
    """Raise ManifestError unless ``raw`` hashes to ``expected``."""
    actual = digest_of(raw, expected.algorithm)
    if actual != expected:
        raise ManifestError(f"{what}: content has digest {actual}, expected {expected}; refused")


def _content_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def parse_document(
    raw: bytes, content_type: str | None, digest: Digest, where: str
) -> ImageIndex | ImageManifest:
    """Validate and parse a manifest or index whose bytes already matched ``digest``."""
    if len(raw) > MAX_MANIFEST_SIZE:
        raise ManifestError(f"{where}: manifest is larger than {MAX_MANIFEST_SIZE} bytes")
    header_type = _content_type(content_type)
    if header_type in SCHEMA1_TYPES:
        raise _schema1(where)
    doc = _json_object(raw, where, "manifest")
    version = doc.get("schemaVersion")
    if version == 1:
        raise _schema1(where)
    if version != 2 or isinstance(version, bool):
        raise UnsupportedManifest(f"{where}: unsupported schemaVersion {version!r}")
    media_type = doc.get("mediaType")
    if media_type is not None and not isinstance(media_type, str):
        raise ManifestError(f"{where}: mediaType is not a string")
    if media_type and header_type not in _GENERIC_TYPES and media_type != header_type:
        raise ManifestError(
            f"{where}: Content-Type {header_type!r} does not match the document's "
            f"mediaType {media_type!r}; refused"
        )
    media_type = media_type or header_type
    has_manifests = "manifests" in doc
    has_image_parts = "layers" in doc or "config" in doc
    if has_manifests and has_image_parts:
        raise ManifestError(
            f"{where}: document has both 'manifests' and 'layers'/'config' (ambiguous); refused"
        )
    if media_type in INDEX_TYPES or (media_type in _GENERIC_TYPES and has_manifests):
        return _parse_index(doc, media_type or OCI_INDEX, digest, raw, where)
    if media_type in MANIFEST_TYPES or (media_type in _GENERIC_TYPES and has_image_parts):
        return _parse_manifest(doc, media_type or OCI_MANIFEST, digest, raw, where)
    raise UnsupportedManifest(f"{where}: unsupported manifest media type {media_type[:100]!r}")


def _json_object(raw: bytes, where: str, kind: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ManifestError(f"{where}: {kind} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: {kind} is not a JSON object")
    return doc


def _schema1(where: str) -> UnsupportedManifest:
    return UnsupportedManifest(
        f"{where}: Docker image manifest schema 1 is not supported (deprecated since 2019); "
        "push the image again with a current client"
    )


def _parse_index(
    doc: dict[str, Any], media_type: str, digest: Digest, raw: bytes, where: str
) -> ImageIndex:
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError(f"{where}: 'manifests' is not a list")
    if len(entries) > MAX_LAYERS:
        raise ManifestError(f"{where}: index lists {len(entries)} manifests; refused")
    manifests = tuple(
        Descriptor.from_json(entry, f"{where}: manifests[{i}]") for i, entry in enumerate(entries)
    )
    return ImageIndex(media_type, digest, manifests, raw)


def _parse_manifest(
    doc: dict[str, Any], media_type: str, digest: Digest, raw: bytes, where: str
) -> ImageManifest:
    config = Descriptor.from_json(doc.get("config"), f"{where}: config")
    if config.media_type not in CONFIG_TYPES:
        raise UnsupportedManifest(
            f"{where}: not a container image (config media type {config.media_type!r})"
        )
    entries = doc.get("layers")
    if not isinstance(entries, list):
        raise ManifestError(f"{where}: 'layers' is not a list")
    if len(entries) > MAX_LAYERS:
        raise ManifestError(f"{where}: manifest lists {len(entries)} layers; refused")
    layers = tuple(
        Descriptor.from_json(entry, f"{where}: layers[{i}]") for i, entry in enumerate(entries)
    )
    return ImageManifest(media_type, digest, config, layers, raw)


# Docker schema 2 media types and their OCI equivalents (what `skopeo copy` to oci: does).
_DOCKER_TO_OCI = {
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_CONFIG: OCI_CONFIG,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": (
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ),
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    ),
}


def to_oci(manifest: ImageManifest) -> ImageManifest:
    """An OCI image manifest for a Docker schema 2 one; OCI manifests come back unchanged.

    skopeo and umoci read only OCI media types from an image layout, so Docker-format
    images are stored converted, as `skopeo copy` converts them. Config and layer bytes
    (and so their digests, and the image ID) stay the same; only the manifest changes.
    """
    if manifest.media_type != DOCKER_MANIFEST:
        return manifest

    def convert(d: Descriptor) -> dict[str, Any]:
        doc = d.to_json()
        doc["mediaType"] = _DOCKER_TO_OCI.get(d.media_type, d.media_type)
        return doc

    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": convert(manifest.config),
        "layers": [convert(layer) for layer in manifest.layers],
    }
    raw = orjson.dumps(document)
    digest = digest_of(raw, manifest.digest.algorithm)
    return _parse_manifest(orjson.loads(raw), OCI_MANIFEST, digest, raw, "converted manifest")


def _arm_fallbacks(want: Platform) -> list[Platform]:
    # containerd's default matcher: an arm/v7 host also runs v6 and v5 images.
    order = ["v8", "v7", "v6", "v5"]
    if want.architecture != "arm" or want.variant not in order:
        return [want]
    return [Platform(want.os, "arm", v) for v in order[order.index(want.variant) :]]


def platform_matches(want: Platform, have: Platform) -> bool:
    """Whether an image built for ``have`` is what a request for ``want`` should get."""
    return have in _arm_fallbacks(want)


def select_platform(index: ImageIndex, want: Platform, where: str) -> Descriptor:
    """The index entry for ``want``, as docker chooses it; PlatformNotFound otherwise."""
    candidates = [d for d in index.manifests if d.platform is not None]
    for option in _arm_fallbacks(want):
        for entry in candidates:
            if entry.platform == option:
                return entry
    available = sorted({str(d.platform) for d in candidates if d.platform.os != "unknown"})
    listed = f" (available: {', '.join(available)})" if available else ""
    raise PlatformNotFound(
        f"no matching manifest for {want} in the manifest list entries of {where}{listed}"
    )


def select_platforms(index: ImageIndex, want: PlatformSelection, where: str) -> list[Descriptor]:
    """The index entries for every wanted platform (each as :func:`select_platform` picks
    it), or for ``all``: every entry with a real platform (not ``unknown``, which marks
    attestations). PlatformNotFound when a wanted platform, or any platform, is missing."""
    if want.every:
        chosen = [
            d for d in index.manifests if d.platform is not None and d.platform.os != "unknown"
        ]
        if not chosen:
            raise PlatformNotFound(f"no platform manifests in the manifest list of {where}")
    else:
        chosen = [select_platform(index, platform, where) for platform in want.platforms]
    return list({d.digest: d for d in chosen}.values())


def parse_config(raw: bytes, what: str, layer_count: int | None = None) -> ImageConfig:
    """Check an image config and read ``created`` and the platform from it.

    With ``layer_count``, the config's ``rootfs.diff_ids`` must list as many layers as
    the manifest, as docker checks.
    """
    doc = _json_object(raw, what, "image config")
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if layer_count is not None and isinstance(diff_ids, list) and len(diff_ids) != layer_count:
        raise ManifestError(
            f"{what}: config lists {len(diff_ids)} layers, the manifest {layer_count}; refused"
        )
    created = None
    value = doc.get("created")
    if isinstance(value, str):
        try:
            created = datetime.fromisoformat(_trim_fraction(value.replace("Z", "+00:00")))
        except ValueError:
            created = None
    platform = None
    if isinstance(doc.get("os"), str) and isinstance(doc.get("architecture"), str):
        variant = doc.get("variant") if isinstance(doc.get("variant"), str) else ""
        platform = Platform.normalized(doc["os"], doc["architecture"], variant)
    return ImageConfig(created, platform)


def _trim_fraction(text: str) -> str:
    # Go writes nanoseconds; Python 3.10's fromisoformat takes at most microseconds.
    head, dot, rest = text.partition(".")
    if not dot:
        return text
    digits = len(rest) - len(rest.lstrip("0123456789"))
    return f"{head}.{rest[: min(digits, 6)].ljust(6, '0')}{rest[digits:]}"
