"""``fastpull load``: an image archive into the store, every digest checked first.

Reads what ``fastpull save``, ``docker save`` (old and new), ``podman save`` and ``skopeo copy
… docker-archive:`` or ``oci-archive:`` write, plain or compressed with gzip, bzip2 or xz,
from a file or a pipe, in one pass:

1. Every regular member is hashed while it is copied to a temp file under ``ingest/`` (a
   blob the store already has is only hashed). A member named ``blobs/<alg>/<hex>`` must hash
   to that name. Nothing else of the store changes in this step.
2. The images are found as containerd finds them: through ``index.json`` when ``oci-layout``
   says 1.0.0, each entry's whole closure present at the sizes its descriptors state; else
   through docker's ``manifest.json``. Such an item has no manifest, only a config and
   layer files (often uncompressed), so one is built: an OCI manifest over the config and
   the layer files as they are, after each layer's uncompressed content matched its
   ``rootfs.diff_ids`` entry, as ``docker load`` checks. That manifest's digest is fastpull's,
   not the registry's (which the archive does not hold).
3. Only then are the blobs moved into ``blobs/`` and the names written to index.json.

A refusal (:class:`~fastpull.errors.ArchiveError`) is one line and leaves the store as it
was: the temp files are deleted. Links are resolved inside the archive only, for the paths
manifest.json names (``docker save`` before 25 links repeated layers); nothing is ever
extracted by name, so no member can write outside the store.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import re
import secrets
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson

from fastpull import cancel
from fastpull.archive import documents
from fastpull.archive.documents import DockerEntry, entry_name, parse_manifest_json
from fastpull.archive.tarstream import DIRECTORY, FILE, TarReader, link_target, safe_name
from fastpull.errors import ArchiveError, ManifestError
from fastpull.hashing import new_hasher
from fastpull.reference import Reference
from fastpull.registry.manifest import (
    INDEX_TYPES,
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    OCI_CONFIG,
    OCI_MANIFEST,
    ImageIndex,
    ImageManifest,
    digest_of,
    parse_config,
    parse_document,
)
from fastpull.store.inventory import walk
from fastpull.store.layout import (
    CONTAINERD_NAME_ANNOTATION,
    REPO_DIGEST_ANNOTATION,
    SOURCE_MANIFEST_ANNOTATION,
    Store,
)
from fastpull.types import Descriptor, Digest, InvalidDigest, Platform

_CHUNK = 1 << 20
_BLOB_NAME = re.compile(r"blobs/([a-z0-9]+)/([a-f0-9]+)")
_MAX_LINK_HOPS = 8
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"


@dataclass
class _Member:
    """A regular member after it was read: its digest, size and first bytes, and where its
    data is now (a temp file, or the store when it already had the blob)."""

    digest: Digest
    size: int
    head: bytes
    path: Path | None


@dataclass
class _Contents:
    files: dict[str, _Member] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, bytes] = field(default_factory=dict)
    by_digest: dict[Digest, _Member] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedImage:
    """An image found in the archive: what index.json will name, under which names."""

    descriptor: Descriptor
    names: tuple[Reference, ...]
    annotations: dict[str, str]
    blobs: tuple[tuple[Digest, int], ...]
    built: tuple[tuple[Digest, bytes], ...] = ()


@dataclass(frozen=True)
class LoadResult:
    """What ``load`` stored: the names, and why images without one were not named."""

    names: tuple[Reference, ...]
    unnamed: tuple[str, ...]


def open_archive(raw: BinaryIO) -> BinaryIO:
    """``raw`` as a tar stream, decompressed when it starts like gzip, bzip2 or xz."""
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type]
    head = buffered.peek(6)[:6]
    if head.startswith(_GZIP):
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if head.startswith(b"BZh"):
        return bz2.BZ2File(buffered)  # type: ignore[return-value]
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(buffered)  # type: ignore[return-value]
    if head.startswith(_ZSTD):
        raise ArchiveError("the archive is zstd-compressed: decompress it first (zstd -d)")
    return buffered


class _Spool:
    """Temp files of one load under ``ingest/``, deleted on exit unless adopted into
    ``blobs/``. Their names look like an ingest's, so ``gc`` removes what a killed load
    left; it cannot meanwhile, since a load holds the store as a pull does."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._stem = f"load-{secrets.token_hex(8)}"
        self._count = 0
        self.paths: list[Path] = []

    def new(self) -> Path:
        self._count += 1
        path = self.store.root / "ingest" / f"{self._stem}.{self._count}.tmp"
        self.paths.append(path)
        return path

    def close(self) -> None:
        for path in self.paths:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _read(stream: BinaryIO, store: Store, spool: _Spool) -> _Contents:
    contents = _Contents()
    reader = TarReader(stream, _CHUNK)
    try:
        for member in reader.members():
            cancel.check()
            name = member.name
            contents.files.pop(name, None)
            contents.links.pop(name, None)
            contents.metadata.pop(name, None)
            if member.kind == DIRECTORY:
                continue
            if member.kind != FILE:
                contents.links[name] = link_target(name, member.link, member.kind)
            elif name in documents.METADATA:
                if member.size > documents.MAX_METADATA_SIZE:
                    raise ArchiveError(
                        f"archive member {name} is {member.size} bytes, more than the "
                        f"{documents.MAX_METADATA_SIZE} allowed"
                    )
                contents.metadata[name] = b"".join(reader.data())
            else:
                contents.files[name] = _spool_member(reader, name, member.size, spool, contents)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise store.error_for(exc, "write a temp file") from exc
        raise ArchiveError(f"the archive's compression is broken: {exc}") from None
    return contents


def _expected_digest(name: str) -> Digest | None:
    match = _BLOB_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return Digest(match[1], match[2])
    except InvalidDigest:
        return None


def _spool_member(
    reader: TarReader, name: str, size: int, spool: _Spool, contents: _Contents
) -> _Member:
    store = spool.store
    expected = _expected_digest(name)
    hasher = new_hasher(expected.algorithm if expected else "sha256")
    known = expected is not None and (
        expected in contents.by_digest or store.has_blob(expected, size)
    )
    path = None if known else spool.new()
    head = b""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644) if path else -1
    try:
        for piece in reader.data():
            hasher.update(piece)
            if len(head) < 8:
                head += piece[: 8 - len(head)]
            if fd >= 0:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
    finally:
        if fd >= 0:
            os.close(fd)
    digest = Digest(expected.algorithm if expected else "sha256", hasher.hexdigest())
    if expected is not None and digest != expected:
        raise ArchiveError(f"archive member {name} does not match its digest: it is {digest}")
    earlier = contents.by_digest.get(digest)
    if path is not None and (earlier is not None or store.has_blob(digest, size)):
        path.unlink()
        path = None
    member = earlier if earlier is not None else _Member(digest, size, head, path)
    contents.by_digest.setdefault(digest, member)
    return member


class _Archive:
    """The members read, looked up by digest or (for manifest.json) by path."""

    def __init__(self, store: Store, contents: _Contents) -> None:
        self.store = store
        self.contents = contents

    def data_path(self, member: _Member) -> Path:
        return member.path if member.path is not None else self.store.blob_path(member.digest)

    def read_small(self, member: _Member, limit: int, what: str) -> bytes:
        if member.size > limit:
            raise ArchiveError(f"{what} is {member.size} bytes, more than the {limit} allowed")
        try:
            return self.data_path(member).read_bytes()
        except OSError as exc:
            raise self.store.error_for(exc, f"read {what}") from exc

    def by_path(self, path: str, where: str) -> _Member:
        name = safe_name(path, f"path in {where}")
        for _ in range(_MAX_LINK_HOPS):
            if name in self.contents.files:
                return self.contents.files[name]
            if name not in self.contents.links:
                break
            name = self.contents.links[name]
        raise ArchiveError(f"{where} names {path[:200]!r}, which is not a file in the archive")

    def has(self, digest: Digest, size: int | None) -> bool:
        member = self.contents.by_digest.get(digest)
        if member is not None:
            return size is None or member.size == size
        return self.store.has_blob(digest, size)

    def read_document(self, digest: Digest, size: int | None) -> bytes | None:
        member = self.contents.by_digest.get(digest)
        if member is None:
            found = self.store.blob_size(digest)
            if found is None:
                return None
            member = _Member(digest, found, b"", None)
        if size is not None and member.size != size:
            return None
        return self.read_small(member, MAX_MANIFEST_SIZE, f"manifest {digest}")


def _from_index(archive: _Archive, raw: bytes) -> tuple[list[LoadedImage], list[str]]:
    try:
        index = parse_document(raw, None, digest_of(raw), documents.INDEX_JSON)
    except ManifestError as exc:
        raise ArchiveError(str(exc)) from None
    if not isinstance(index, ImageIndex):
        raise ArchiveError("index.json is not an image index")
    tags_by_config = _docker_names(archive)
    images, unnamed = [], []
    for i, entry in enumerate(index.manifests):
        where = f"index.json entry {i}"
        top = Descriptor(entry.media_type, entry.digest, entry.size)
        source = _annotated(entry, SOURCE_MANIFEST_ANNOTATION)
        if source is not None and not archive.has(source, None):
            source = None
        closure = walk(top, archive.read_document, source)
        if closure.gaps:
            gap = closure.gaps[0]
            why = gap.reason or "is missing from the archive or has another size"
            raise ArchiveError(f"{where}: {gap.need.role} {gap.need.digest} {why}")
        for need in closure.needs:
            if not archive.has(need.digest, need.size):
                raise ArchiveError(
                    f"{where}: {need.role} {need.digest} is missing from the archive "
                    f"or is not {need.size} bytes"
                )
        platform, config = None, None
        if entry.media_type not in INDEX_TYPES:
            manifest = parse_document(
                archive.read_document(entry.digest, entry.size) or b"", None, entry.digest, where
            )
            if isinstance(manifest, ImageManifest):
                config = manifest.config.digest
                platform = _platform(archive, manifest.config.digest, where)
        name = entry_name(entry.annotations)
        names = (name,) if name is not None else tags_by_config.get(config, ()) if config else ()
        if not names:
            unnamed.append(f"{where} ({entry.digest}) has no image name")
            continue
        annotations = {}
        repo_digest = _annotated(entry, REPO_DIGEST_ANNOTATION)
        if repo_digest is not None:
            annotations[REPO_DIGEST_ANNOTATION] = str(repo_digest)
        if source is not None:
            annotations[SOURCE_MANIFEST_ANNOTATION] = str(source)
        blobs = tuple(
            (n.digest, archive.contents.by_digest[n.digest].size)
            for n in closure.needs
            if n.digest in archive.contents.by_digest
        )
        descriptor = Descriptor(entry.media_type, entry.digest, entry.size, platform)
        images.append(LoadedImage(descriptor, tuple(names), annotations, blobs))
    return images, unnamed


def _annotated(entry: Descriptor, key: str) -> Digest | None:
    text = entry.annotations.get(key)
    if text is None:
        return None
    try:
        return Digest.parse(text)
    except InvalidDigest:
        return None


def _platform(archive: _Archive, config: Digest, where: str) -> Platform | None:
    member = archive.contents.by_digest.get(config)
    raw = (
        archive.read_small(member, MAX_CONFIG_SIZE, f"{where}: config")
        if member is not None
        else archive.store.read_blob(config, max_size=MAX_CONFIG_SIZE)
    )
    try:
        return parse_config(raw, where).platform
    except ManifestError as exc:
        raise ArchiveError(str(exc)) from None


def _docker_names(archive: _Archive) -> dict[Digest, tuple[Reference, ...]]:
    """RepoTags by config digest, for index.json entries that carry no name (Docker 25
    with an untagged ref.name); manifest.json is only a hint here, so a broken one is
    ignored as containerd ignores it."""
    raw = archive.contents.metadata.get(documents.MANIFEST_JSON)
    if raw is None:
        return {}
    found: dict[Digest, tuple[Reference, ...]] = {}
    with contextlib.suppress(ArchiveError):
        for item in parse_manifest_json(raw):
            found[archive.by_path(item.config, documents.MANIFEST_JSON).digest] = item.tags
    return found


def _from_manifest_json(archive: _Archive, raw: bytes) -> tuple[list[LoadedImage], list[str]]:
    images, unnamed = [], []
    for i, item in enumerate(parse_manifest_json(raw)):
        where = f"manifest.json item {i}"
        image = _build_image(archive, item, where)
        if not item.tags:
            unnamed.append(f"{where} (config {image.blobs[0][0]}) has no RepoTags")
            continue
        images.append(image)
    return images, unnamed


def _build_image(archive: _Archive, item: DockerEntry, where: str) -> LoadedImage:
    """An OCI manifest over a manifest.json item's config and layer files, each layer's
    content checked against the config's DiffIDs."""
    config = archive.by_path(item.config, where)
    config_raw = archive.read_small(config, MAX_CONFIG_SIZE, f"{where}: config")
    ids = documents.diff_ids(config_raw, where)
    if len(ids) != len(item.layers):
        raise ArchiveError(
            f"{where} lists {len(item.layers)} layers, its config {len(ids)} DiffIDs"
        )
    layers = []
    for path, diff_id in zip(item.layers, ids, strict=True):
        layer = archive.by_path(path, where)
        media_type = _check_layer(archive, layer, diff_id, f"{where}: layer {path[:200]}")
        layers.append(Descriptor(media_type, layer.digest, layer.size))
    try:
        platform = parse_config(config_raw, where).platform
    except ManifestError as exc:
        raise ArchiveError(str(exc)) from None
    config_descriptor = Descriptor(OCI_CONFIG, config.digest, config.size)
    manifest = orjson.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_descriptor.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
    )
    digest = digest_of(manifest)
    blobs = ((config.digest, config.size), *((d.digest, d.size) for d in layers))
    return LoadedImage(
        Descriptor(OCI_MANIFEST, digest, len(manifest), platform),
        item.tags,
        {},
        tuple(blobs),
        ((digest, manifest),),
    )


def _check_layer(archive: _Archive, layer: _Member, diff_id: Digest, what: str) -> str:
    """The layer's media type, once its uncompressed content matched ``diff_id``."""
    if layer.head.startswith(_ZSTD):
        raise ArchiveError(f"{what} is zstd-compressed, which load cannot check against its DiffID")
    if layer.head.startswith(_GZIP):
        actual = _gunzipped_digest(archive.data_path(layer), diff_id.algorithm, what)
        media_type = OCI_LAYER_GZIP
    else:
        actual, media_type = layer.digest, OCI_LAYER
    if actual != diff_id:
        raise ArchiveError(f"{what} does not match its DiffID {diff_id} (it is {actual})")
    return media_type


def _gunzipped_digest(path: Path, algorithm: str, what: str) -> Digest:
    """The digest of the decompressed content of a gzip file (several members allowed),
    decompressed a bounded piece at a time: a small layer can expand enormously."""
    hasher = new_hasher(algorithm)
    inflater = zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as f:
            for piece in iter(lambda: f.read(_CHUNK), b""):
                cancel.check()
                while piece:
                    if inflater.eof:
                        inflater = zlib.decompressobj(wbits=31)  # a concatenated member
                    hasher.update(inflater.decompress(piece, _CHUNK))
                    piece = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
            while not inflater.eof and (out := inflater.decompress(b"", _CHUNK)):
                hasher.update(out)
    except zlib.error as exc:
        raise ArchiveError(f"{what} is not valid gzip: {exc}") from None
    if not inflater.eof:
        raise ArchiveError(f"{what} is truncated gzip")
    return Digest(algorithm, hasher.hexdigest())


def _images(archive: _Archive) -> tuple[list[LoadedImage], list[str]]:
    metadata = archive.contents.metadata
    layout = metadata.get(documents.OCI_LAYOUT)
    if (
        layout is not None
        and documents.INDEX_JSON in metadata
        and documents.layout_version(layout) == documents.LAYOUT_VERSION
    ):
        return _from_index(archive, metadata[documents.INDEX_JSON])
    if documents.MANIFEST_JSON in metadata:
        return _from_manifest_json(archive, metadata[documents.MANIFEST_JSON])
    raise ArchiveError(
        "not an image archive: it has neither index.json (with oci-layout 1.0.0) nor manifest.json"
    )


def _commit(store: Store, archive: _Archive, images: list[LoadedImage]) -> list[Reference]:
    for image in images:
        for digest, _ in image.blobs:
            member = archive.contents.by_digest[digest]
            if member.path is not None and not store.has_blob(digest, member.size):
                store.adopt_blob(member.path, digest)
                member.path = None
        for digest, raw in image.built:
            store.write_blob(digest, raw)
    named = []
    for image in images:
        platforms = _stored_platforms(store, image.descriptor)
        for name in image.names:
            annotations = {**image.annotations, CONTAINERD_NAME_ANNOTATION: str(name)}
            store.add_image(image.descriptor, str(name), annotations, platforms)
            named.append(name)
    return named


def _stored_platforms(store: Store, descriptor: Descriptor) -> list[Descriptor]:
    """For an index: its platform manifests that are in the store, each named on its own
    as a pull names them (``Store.add_image``); for a manifest: none."""
    if descriptor.media_type not in INDEX_TYPES:
        return []
    raw = store.read_blob(descriptor.digest, max_size=MAX_MANIFEST_SIZE)
    index = parse_document(raw, descriptor.media_type, descriptor.digest, str(descriptor.digest))
    assert isinstance(index, ImageIndex)
    return [m for m in index.manifests if store.has_blob(m.digest, m.size)]


def load(store: Store, stream: BinaryIO) -> LoadResult:
    """Read the archive from ``stream`` into ``store``; see the module docstring."""
    spool = _Spool(store)
    with store.shared_use():
        try:
            contents = _read(open_archive(stream), store, spool)
            archive = _Archive(store, contents)
            images, unnamed = _images(archive)
            if not images and not unnamed:
                raise ArchiveError("the archive holds no image")
            names = _commit(store, archive, images)
        finally:
            spool.close()
    return LoadResult(tuple(names), tuple(unnamed))


__all__ = ["LoadResult", "LoadedImage", "load", "open_archive"]
