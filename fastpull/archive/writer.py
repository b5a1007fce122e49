"""``fastpull save``: images of the store as one tar archive, streamed from the blob files.

The archive's layout is :mod:`fastpull.archive.documents`'; this module decides what goes in
and writes it. Blobs go in byte for byte as stored (compressed layers stay compressed, so
every manifest digest holds), each once however many images share it, straight from
``blobs/`` with ``sendfile``: memory use does not grow with the image. Members are sorted
by name and carry fixed metadata (:func:`~fastpull.archive.tarstream.member_header`), so
the same images always give the same bytes.

Platforms: a store entry that is one manifest is saved as it is (``--platform`` only checks
that it matches). An entry that is an index (pulled with several platforms) gives the one
platform asked for, by default this machine's; with ``all`` the index itself goes in, and
the docker part (manifest.json) names this machine's platform, or the first one if it was
not pulled, since a manifest.json item holds one platform.

The store is held as pulls hold it (:meth:`Store.shared_use`), so ``gc`` and ``rmi`` cannot
delete a blob while it is being written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastpull.archive import documents
from fastpull.archive.documents import DockerItem, IndexEntry
from fastpull.archive.tarstream import END_OF_ARCHIVE, member_header, padding
from fastpull.errors import (
    FastpullError,
    InvalidReference,
    NoSuchImage,
    OutputFailed,
    PlatformNotFound,
    StoreDamaged,
    UsageError,
)
from fastpull.reference import Reference
from fastpull.registry.manifest import (
    MANIFEST_TYPES,
    MAX_CONFIG_SIZE,
    ImageIndex,
    ImageManifest,
    parse_config,
    parse_document,
    platform_matches,
    select_platform,
)
from fastpull.store.inventory import names_image, walk
from fastpull.store.layout import REPO_DIGEST_ANNOTATION, SOURCE_MANIFEST_ANNOTATION, Store
from fastpull.store.maintenance import StoredImage, disk_reader, load_images, read_manifest
from fastpull.types import Descriptor, Digest, Platform, PlatformSelection

_COPY_CHUNK = 8 << 20
# Write errors that are about the destination, not the store.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE})


@dataclass(frozen=True)
class SaveRequest:
    """One NAME argument: ``every_tag`` when it named a repository only (``debian``), which
    saves every image of that repository in the store, as ``docker save`` does."""

    ref: Reference
    every_tag: bool = False


@dataclass(frozen=True)
class ArchivePlan:
    """What the archive holds: blobs from the store and generated JSON files."""

    blobs: tuple[tuple[Digest, int], ...]
    files: tuple[tuple[str, bytes], ...]

    def members(self) -> list[tuple[str, Digest | bytes, int]]:
        """(name, blob digest or file content, size) of every member, sorted by name."""
        found: list[tuple[str, Digest | bytes, int]] = [
            (documents.blob_name(d), d, size) for d, size in self.blobs
        ]
        found += [(name, data, len(data)) for name, data in self.files]
        return sorted(found, key=lambda m: m[0])


def select_images(store: Store, requests: Sequence[SaveRequest]) -> list[StoredImage]:
    """The store entries the requests name, each once, in request order; NoSuchImage (with
    docker's words) for a request that names none."""
    named = []
    for image in load_images(store):
        try:
            named.append((image, Reference.parse(image.name or "")))
        except InvalidReference:
            continue  # another tool's naming
    chosen: dict[int, StoredImage] = {}
    for request in requests:
        ref = request.ref
        if request.every_tag:
            found = [i for i, r in named if r.name == ref.name]
        elif ref.digest is not None:
            found = [i for i, r in named if names_image(ref, str(r), i.digests)]
        else:
            found = [i for i, r in named if str(r) == str(ref)]
        if not found:
            raise NoSuchImage(f"reference does not exist: {ref.familiar}")
        for image in found:
            chosen.setdefault(image.position, image)
    return list(chosen.values())


@dataclass(frozen=True)
class _Chosen:
    top: Descriptor
    source: Digest | None
    manifest: ImageManifest


def _damaged(image: StoredImage, why: str) -> StoreDamaged:
    return StoreDamaged(
        f"image {image.label} in the store is damaged ({why}); run 'fastpull verify'"
    )


def _document(store: Store, image: StoredImage, d: Descriptor) -> ImageIndex | ImageManifest:
    try:
        raw = read_manifest(store, d.digest, d.size)
        return parse_document(raw, d.media_type, d.digest, image.label)
    except FastpullError as exc:
        raise _damaged(image, str(exc)) from None


def _choose(store: Store, image: StoredImage, want: Platform | None, every: bool) -> _Chosen:
    """What of ``image`` goes in: the entry itself, or one platform of its index."""
    if image.descriptor is None:
        raise _damaged(image, image.error or "its index.json entry cannot be used")
    entry = image.descriptor
    top = Descriptor(entry.media_type, entry.digest, entry.size)
    doc = _document(store, image, top)
    if isinstance(doc, ImageManifest):
        have = entry.platform
        if want is not None and have is not None and not platform_matches(want, have):
            raise PlatformNotFound(
                f"image {image.label} was pulled for {have}, not {want}; "
                f"pull it with --platform {want}"
            )
        return _Chosen(top, image.source_manifest, doc)
    children = [c for c in doc.manifests if c.media_type in MANIFEST_TYPES]
    pulled = ", ".join(str(c.platform) for c in children if c.platform is not None)
    target = want or Platform.host()
    try:
        child = select_platform(doc, target, image.label)
    except PlatformNotFound:
        if not every:
            raise PlatformNotFound(
                f"platform {target} of image {image.label} was not pulled (pulled: {pulled}); "
                f"pull it with --platform {target}, or save another with --platform"
            ) from None
        if not children:
            raise _damaged(image, "its index lists no image manifest") from None
        child = children[0]
    manifest = _document(store, image, child)
    if not isinstance(manifest, ImageManifest):
        raise _damaged(image, f"{child.digest} is not an image manifest")
    if every:
        return _Chosen(top, image.source_manifest, manifest)
    return _Chosen(Descriptor(child.media_type, child.digest, child.size), None, manifest)


def _closure(store: Store, image: StoredImage, chosen: _Chosen) -> list[tuple[Digest, int]]:
    """Every blob of what was chosen, each present at its size; StoreDamaged otherwise."""
    closure = walk(chosen.top, disk_reader(store), chosen.source)
    if closure.gaps:
        gap = closure.gaps[0]
        raise _damaged(image, gap.reason or f"its {gap.need.role} {gap.need.digest} is missing")
    found = []
    for need in closure.needs:
        size = store.blob_size(need.digest)
        if size is None or (need.size is not None and size != need.size):
            raise _damaged(image, f"its {need.role} {need.digest} is missing or of the wrong size")
        found.append((need.digest, size))
    return found


def _docker_item(
    store: Store, image: StoredImage, manifest: ImageManifest, tags: list[Reference]
) -> DockerItem:
    raw = store.read_blob(manifest.config.digest, max_size=MAX_CONFIG_SIZE)
    try:
        parse_config(raw, image.label, layer_count=len(manifest.layers))
        ids = documents.diff_ids(raw, f"image {image.label}")
    except FastpullError as exc:
        raise _damaged(image, str(exc)) from None
    layers = tuple(layer.digest for layer in manifest.layers)
    return DockerItem(manifest.config.digest, layers, tuple(tags), ids[-1] if ids else None)


def plan_archive(
    store: Store,
    images: Sequence[StoredImage],
    platforms: PlatformSelection | None = None,
    *,
    oci_only: bool = False,
) -> ArchivePlan:
    """Decide the archive's members for ``images`` (from :func:`select_images`).

    ``platforms``: None for this machine's, one platform, or ``all``; ``oci_only`` leaves
    docker's manifest.json and repositories out (``--format oci``).
    """
    if platforms is not None and not platforms.every and len(platforms.platforms) != 1:
        raise UsageError("save takes one platform, or all")
    every = platforms is not None and platforms.every
    want = platforms.platforms[0] if platforms is not None and not every else None
    blobs: dict[Digest, int] = {}
    entries: list[IndexEntry] = []
    items: dict[Digest, tuple[StoredImage, ImageManifest, list[Reference]]] = {}
    # Sorted by name, so the same images give the same bytes whatever the argument order.
    for image in sorted(images, key=lambda i: i.name or ""):
        name = Reference.parse(image.name or "")
        chosen = _choose(store, image, want, every)
        for digest, size in _closure(store, image, chosen):
            blobs.setdefault(digest, size)
        extra = {}
        if image.repo_digest is not None:
            extra[REPO_DIGEST_ANNOTATION] = str(image.repo_digest)
        if chosen.source is not None:
            extra[SOURCE_MANIFEST_ANNOTATION] = str(chosen.source)
        entries.append(IndexEntry(chosen.top, name, extra))
        config = chosen.manifest.config.digest
        items.setdefault(config, (image, chosen.manifest, []))[2].append(name)
    files = [
        (documents.OCI_LAYOUT, documents.oci_layout()),
        (documents.INDEX_JSON, documents.index_json(entries)),
    ]
    if not oci_only:
        docker = [_docker_item(store, *item) for item in items.values()]
        files.append((documents.MANIFEST_JSON, documents.manifest_json(docker)))
        repositories = documents.repositories(docker)
        if repositories is not None:
            files.append((documents.REPOSITORIES, repositories))
    return ArchivePlan(tuple(sorted(blobs.items())), tuple(files))


def write_archive(store: Store, plan: ArchivePlan, fd: int) -> None:
    """Write the archive to ``fd``. A blob that changed size since it was planned raises
    StoreDamaged (the archive written so far is then incomplete)."""
    for name, content, size in plan.members():
        _write_all(fd, member_header(name, size))
        if isinstance(content, Digest):
            _copy_blob(store, content, size, fd)
        else:
            _write_all(fd, content)
        _write_all(fd, padding(size))
    _write_all(fd, END_OF_ARCHIVE)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise OutputFailed(exc.strerror or str(exc), errno=exc.errno) from exc


def _copy_blob(store: Store, digest: Digest, size: int, out: int) -> None:
    try:
        src = os.open(store.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise store.error_for(exc, f"read blob {digest}") from exc
    try:
        if os.fstat(src).st_size != size:
            raise StoreDamaged(
                f"blob {digest} in store {store.root} changed size while being saved; "
                "run 'fastpull verify'"
            )
        offset = 0
        use_sendfile = True
        while offset < size:
            count = min(_COPY_CHUNK, size - offset)
            try:
                if use_sendfile:
                    try:
                        sent = os.sendfile(out, src, offset, count)
                    except OSError as exc:
                        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                            raise
                        use_sendfile = False
                        continue
                else:
                    chunk = os.pread(src, count, offset)
                    _write_all(out, chunk)
                    sent = len(chunk)
            except OSError as exc:
                if exc.errno in _OUTPUT_ERRNOS:
                    raise OutputFailed(exc.strerror or str(exc), errno=exc.errno) from exc
                raise store.error_for(exc, f"read blob {digest}") from exc
            if sent == 0:
                raise StoreDamaged(f"blob {digest} in store {store.root} ended early while saved")
            offset += sent
    finally:
        os.close(src)


@contextlib.contextmanager
def _destination(path: Path) -> Iterator[int]:
    """An fd for the archive at ``path``: a temp file renamed over it when complete, and
    removed on failure; a FIFO or device (``/dev/stdout``) is written in place."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cannot write {path}: it is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)
        return
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    try:
        try:
            yield fd
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def save(
    store: Store,
    requests: Sequence[SaveRequest],
    *,
    output: Path | None = None,
    fd: int | None = None,
    platforms: PlatformSelection | None = None,
    oci_only: bool = False,
) -> ArchivePlan:
    """Write the archive of ``requests`` to the file ``output``, or to ``fd``; return what
    went in. Nothing is written unless every image is found and complete."""
    with store.shared_use():
        plan = plan_archive(store, select_images(store, requests), platforms, oci_only=oci_only)
        try:
            if output is not None:
                with _destination(output) as out:
                    write_archive(store, plan, out)
            elif fd is not None:
                write_archive(store, plan, fd)
            else:
                raise ValueError("save needs an output path or a file descriptor")
        except OutputFailed as exc:
            where = str(output) if output is not None else "standard output"
            # A regular file was written as a temp file, which _destination removed.
            in_place = output is None or (output.exists() and not output.is_file())
            removed = "" if in_place else "; the partial archive was removed"
            raise OutputFailed(
                f"cannot write the archive to {where}: {exc}{removed}", errno=exc.errno
            ) from exc
    return plan


__all__ = [
    "ArchivePlan",
    "SaveRequest",
    "plan_archive",
    "save",
    "select_images",
    "write_archive",
]
