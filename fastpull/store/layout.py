"""The local store: a standard OCI image layout that skopeo, umoci, podman and containerd can read.

This module holds :class:`Store`: setting a layout up, its blobs, and ``index.json``. The
rest of the store is beside it: :mod:`~fastpull.store.ingest` (downloading one blob),
:mod:`~fastpull.store.locks` (the flock rules), :mod:`~fastpull.store.gc` (listing and
deleting what is on disk), :mod:`~fastpull.store.files` (durable writes, OSError mapping).

On disk (image-spec ``image-layout.md``)::

    <root>/oci-layout          {"imageLayoutVersion":"1.0.0"}
    <root>/index.json          one entry per image, named by org.opencontainers.image.ref.name
    <root>/index.json.lock     flock'ed while a fastpull process rewrites index.json
    <root>/gc.lock             flock'ed shared by pulls, exclusively by gc / rmi / verify --repair
    <root>/blobs/<alg>/<hex>   verified content, and nothing else
    <root>/ingest/             fastpull's partial downloads and temp files (other tools ignore it)
    <root>/placements.jsonl    where pushes and copies placed blobs (see store.placements)

What holds whatever happens, ``kill -9`` and power loss included:

- A file enters ``blobs/`` only by ``rename`` from ``ingest/``, after its digest and size
  matched and its data was fsynced. A name in ``blobs/`` is never a partial file.
- Before ``index.json`` names an image, every ``blobs/<alg>/`` directory is fsynced, so the
  renames that published its blobs (by this process or another) are durable before anything
  durable refers to them. One directory fsync per rewrite of index.json (which names one
  image, or a batch's images at once) instead of one per blob: a rename that a power cut
  takes back leaves a blob nothing names yet, fetched again when needed.
- ``index.json`` is only ever replaced by renaming a complete, fsynced temp file over it, so a
  reader always sees the old or the new version, never a torn one. Writers hold an exclusive
  flock on ``index.json.lock`` across read-modify-write, so two fastpull processes never drop
  each other's entries (skopeo#1018). Other tools do not take that lock; against a concurrent
  ``skopeo copy`` into the same layout we are only as safe as skopeo is.
- An image entry is added only once its manifest blob is in ``blobs/``.

A stop leaves ``ingest/*.data`` with its ``.journal`` for the next ingest of that digest to
resume (see :class:`~fastpull.store.ingest.Ingest`). A crash can also leave debris that is
harmless and that a later ``gc`` may delete: ``ingest/*.lock``, ``ingest/*.tmp``,
``ingest/*.journal.tmp`` and ``.index.json.*.tmp`` in the root. A ``gc`` must delete an
``ingest/*.lock`` only while holding its flock (see :func:`~fastpull.store.locks.lock_file`).

A pull commits blobs before index.json names them, so a blob can be unreferenced only for
the moment. Pulls therefore hold ``gc.lock`` shared for their whole duration
(:meth:`Store.shared_use`), and whatever deletes blobs holds it exclusively
(:meth:`Store.exclusive_use`): nothing is judged unreferenced while a pull may still name it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

from fastpull.errors import DigestMismatch, ManifestError, StoreError
from fastpull.hashing import new_hasher
from fastpull.store.files import atomic_write, fsync_dir, os_errors, store_error, write_new_file
from fastpull.store.ingest import Ingest, IngestPaths
from fastpull.store.locks import is_locked, lock_file, lock_file_within
from fastpull.types import Descriptor, Digest, Platform

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
# What fastpull adds to each index.json entry besides the reference name.
REPO_DIGEST_ANNOTATION = "io.fastpull.repo-digest"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
# Set when a Docker-format manifest was stored converted to OCI: the digest the registry
# served for it (kept in blobs/ too, so the original stays verifiable).
SOURCE_MANIFEST_ANNOTATION = "io.fastpull.source-manifest"
# On the entry of one platform of a multi-platform image: the name of the whole image's entry.
PLATFORM_OF_ANNOTATION = "io.fastpull.platform-of"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
LAYOUT_VERSION = "1.0.0"

_OCI_LAYOUT = orjson.dumps({"imageLayoutVersion": LAYOUT_VERSION}) + b"\n"
_EMPTY_INDEX = (
    orjson.dumps({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}) + b"\n"
)
_NO_ANNOTATIONS: Mapping[str, str] = MappingProxyType({})
# What an interrupted or concurrent Store.open may have left in a fresh store before it wrote
# oci-layout (which it writes last). Anything else means the directory is not ours.
_INIT_TEMP = re.compile(r"\.(?:oci-layout|index\.json)\.[0-9a-f]+\.tmp")


def resolve_store_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the store lives: ``explicit``, else ``$FASTPULL_STORE``, else the XDG data dir.

    The XDG default is ``$XDG_DATA_HOME/fastpull/store``, falling back to
    ``~/.local/share/fastpull/store`` when the variable is unset, empty or relative (the XDG
    spec says to ignore relative values). The result is absolute, with ``~`` expanded, so
    that worker processes and error messages do not depend on the working directory.
    """
    chosen = os.fspath(explicit) if explicit is not None else ""
    if not chosen:
        chosen = os.environ.get("FASTPULL_STORE", "")
    if not chosen:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        if not os.path.isabs(xdg):
            try:
                xdg = str(Path.home() / ".local" / "share")
            except RuntimeError:
                raise StoreError(
                    "cannot find a home directory for the default store: "
                    "set FASTPULL_STORE or pass the store path explicitly"
                ) from None
        chosen = os.path.join(xdg, "fastpull", "store")
    return Path(os.path.abspath(os.path.expanduser(chosen)))


def platform_name(name: str, platform: Platform) -> str:
    """The name one platform of the multi-platform image ``name`` is also stored under.

    Its tag gets ``-<os>-<arch>[-<variant>]`` appended (``docker.io/library/app:1.0`` →
    ``docker.io/library/app:1.0-linux-arm64``); a name by digest loses the digest, which is
    the index's, and gets that suffix as its tag. umoci (``--image DIR:NAME``) cannot pick a
    platform from an index ("tag is ambiguous") but unpacks such a name. The result keeps to
    the OCI ``ref.name`` grammar that skopeo and umoci check, and is a docker reference too
    unless the tag grows past 128 characters: characters a registry may have put in a
    platform field that either forbids become ``_``.
    """
    base = name.split("@", 1)[0]
    parts = (platform.os, platform.architecture, platform.variant)
    suffix = "-".join(_name_part(part) for part in parts if part)
    has_tag = ":" in base.rsplit("/", 1)[-1]
    return f"{base}-{suffix}" if has_tag else f"{base}:{suffix}"


def _name_part(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def _annotation(entry: Mapping[str, Any], key: str) -> object:
    annotations = entry.get("annotations")
    return annotations.get(key) if isinstance(annotations, dict) else None


def _ref_name(entry: Mapping[str, Any]) -> object:
    return _annotation(entry, REF_NAME_ANNOTATION)


def _named(entry: Mapping[str, Any], ref_name: str) -> bool:
    """Whether ``entry`` is named ``ref_name`` or is one of the platforms of that image."""
    return ref_name in (_ref_name(entry), _annotation(entry, PLATFORM_OF_ANNOTATION))


class ImageName(NamedTuple):
    """An image to name in index.json (see :meth:`Store.add_image`): its manifest (or
    index), the name, the entry's annotations and, for an index, the platforms pulled."""

    descriptor: Descriptor
    ref_name: str
    annotations: Mapping[str, str]
    platforms: tuple[Descriptor, ...] = ()


class Store:
    """An OCI image layout on local disk. Create with :meth:`Store.open`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # ── opening ─────────────────────────────────────────────────────────────────────────

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, create: bool = True) -> Store:
        """Open the layout at ``root``, creating it first if missing (or an empty directory).

        Refuses anything that is not an OCI image layout (never writes into a directory that
        holds other things) and a layout this process cannot write to. Safe to call from
        several processes at once on a store that does not exist yet.
        """
        root = Path(root)
        with os_errors(root, "create the layout"):
            if not os.path.lexists(root / "oci-layout"):
                cls._initialize(root, create)
        store = cls(root)
        with os_errors(root, "read the layout"):
            store._check_oci_layout()
            store._read_index()
        with os_errors(root, "prepare the layout"):
            for sub in ("blobs", "ingest"):
                # Layouts written by other tools have no ingest/.
                (root / sub).mkdir(exist_ok=True)
            for path in (root, root / "blobs", root / "ingest"):
                if not os.access(path, os.W_OK):
                    raise StoreError(f"store {root} is not writable ({path})", store=str(root))
        return store

    @classmethod
    def _initialize(cls, root: Path, create: bool) -> None:
        """Make a new layout in ``root``; every step tolerates a concurrent twin."""
        if not os.path.lexists(root):
            if not create:
                raise StoreError(f"store {root} does not exist", store=str(root))
            # Not fsynced: if a crash loses the new directory, the next open makes it again.
            root.mkdir(parents=True, exist_ok=True)
        if not root.is_dir():
            raise StoreError(f"store path {root} is not a directory", store=str(root))
        if not all(cls._is_init_debris(root, name) for name in os.listdir(root)):
            # fastpull writes other content only after oci-layout exists, so if a concurrent
            # open has just finished, the directory is a layout after all.
            if os.path.lexists(root / "oci-layout"):
                return
            raise StoreError(
                f"{root} is not an OCI image layout: it has no oci-layout file and is not empty",
                store=str(root),
            )
        if not create:
            raise StoreError(
                f"{root} is not an OCI image layout: it has no oci-layout file", store=str(root)
            )
        (root / "blobs").mkdir(exist_ok=True)
        (root / "ingest").mkdir(exist_ok=True)
        atomic_write(root, "index.json", _EMPTY_INDEX, replace=False)
        # Last, because its presence is what makes the directory a layout.
        atomic_write(root, "oci-layout", _OCI_LAYOUT, replace=False)

    @staticmethod
    def _is_init_debris(root: Path, name: str) -> bool:
        """Whether ``name`` in ``root`` is something that ``_initialize`` itself writes."""
        path = root / name
        if name in ("blobs", "ingest"):
            return path.is_dir() and not os.listdir(path)
        if name == "index.json":
            return path.read_bytes() == _EMPTY_INDEX
        return _INIT_TEMP.fullmatch(name) is not None

    def _not_a_layout(self, why: str) -> StoreError:
        return StoreError(f"{self.root} is not an OCI image layout: {why}", store=str(self.root))

    def _check_oci_layout(self) -> None:
        try:
            layout = orjson.loads((self.root / "oci-layout").read_bytes())
        except orjson.JSONDecodeError as exc:
            raise self._not_a_layout(f"oci-layout is not valid JSON ({exc})") from None
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != LAYOUT_VERSION:
            version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
            raise self._not_a_layout(
                f"oci-layout has imageLayoutVersion {version!r}, expected {LAYOUT_VERSION!r}"
            )

    def error_for(self, exc: OSError, action: str = "write a blob") -> StoreError:
        """The StoreError to raise for ``exc``, met doing ``action`` on this store's files."""
        return store_error(exc, self.root, action)

    # ── blobs ───────────────────────────────────────────────────────────────────────────

    def blob_path(self, digest: Digest) -> Path:
        """``<root>/blobs/<alg>/<hex>``; safe because a Digest is validated on creation."""
        return self.root / "blobs" / digest.algorithm / digest.hex

    def blob_size(self, digest: Digest) -> int | None:
        """Size of the stored blob, or None if it is not in the store."""
        try:
            st = os.stat(self.blob_path(digest))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise store_error(exc, self.root, f"look up blob {digest}") from exc
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        """Whether the blob is stored (and, if ``size`` is given, has that size)."""
        found = self.blob_size(digest)
        return found is not None and (size is None or found == size)

    def read_blob(self, digest: Digest, *, max_size: int) -> bytes:
        """The whole blob; StoreError if it is missing or larger than ``max_size`` bytes.

        Not re-hashed: everything in ``blobs/`` was verified before it got there.
        """
        try:
            with open(self.blob_path(digest), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_size:
                    raise StoreError(
                        f"blob {digest} in store {self.root} is {size} bytes, "
                        f"more than the {max_size} allowed",
                        store=str(self.root),
                    )
                return f.read()
        except FileNotFoundError:
            raise StoreError(
                f"blob {digest} is not in store {self.root}", store=str(self.root)
            ) from None
        except OSError as exc:
            raise store_error(exc, self.root, f"read blob {digest}") from exc

    def write_blob(self, digest: Digest, data: bytes) -> bool:
        """Store a small blob held in memory (manifest, config) after checking its digest.

        Raises DigestMismatch, storing nothing, if ``data`` does not hash to ``digest``.
        Returns False if the blob was already present, True if it was written now.
        """
        hasher = new_hasher(digest.algorithm)
        hasher.update(data)
        actual = hasher.hexdigest()
        if actual != digest.hex:
            raise DigestMismatch(
                f"content does not match its digest: expected {digest}, "
                f"got {digest.algorithm}:{actual}",
                expected=str(digest),
                actual=f"{digest.algorithm}:{actual}",
            )
        if self.has_blob(digest, len(data)):
            return False
        temp = IngestPaths.of(self.root, digest).new_temp()
        with os_errors(self.root, f"write blob {digest}"):
            try:
                write_new_file(temp, data)
                self.publish(temp, digest)
            finally:
                temp.unlink(missing_ok=True)
        return True

    def adopt_blob(self, path: Path, digest: Digest) -> None:
        """Move ``path``, a file under ``ingest/`` whose content the caller has just hashed
        to ``digest``, into ``blobs/`` (fsynced first). ``load`` commits archive members so."""
        with os_errors(self.root, f"commit blob {digest}"):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.publish(path, digest)

    def publish(self, source: Path, digest: Digest) -> None:
        """Rename a verified, fsynced file into ``blobs/``. The rename is made durable by
        :meth:`add_image`, before it names anything."""
        target = self.blob_path(digest)
        try:
            target.parent.mkdir()
        except FileExistsError:
            pass
        else:
            fsync_dir(target.parent.parent)
        # Replacing is right: a blob already there is identical, or corrupt if its size
        # differed (has_blob said it was missing). Until the directory is synced a power cut
        # may take the rename back: the file is then in ingest/ again, debris that the next
        # ingest of this digest truncates, and no index.json entry names the blob yet.
        os.replace(source, target)

    def _blob_directories(self) -> list[Path]:
        """``blobs/<alg>/``: syncing them makes every rename into them durable, whichever
        process made it."""
        blobs = self.root / "blobs"
        with os_errors(self.root, "list blobs"):
            return [blobs / name for name in sorted(os.listdir(blobs)) if (blobs / name).is_dir()]

    def ingest(self, digest: Digest, size: int) -> Ingest:
        """A context manager for downloading one blob of ``size`` bytes into ``ingest/``.

        Entering it waits for an exclusive lock on the blob, so one process at a time
        downloads a given digest. If the blob is in the store once the lock is held,
        ``present`` is True and there is nothing to download::

            with store.ingest(digest, size) as ing:
                if not ing.present:
                    ing.preallocate()
                    ...  # os.pwrite(ing.fd, chunk, offset), hashing the bytes
                    ing.commit(hasher.hexdigest())

        Leaving without ``commit`` keeps the journaled part of the data for the next
        ingest of this digest to resume from (see :class:`Ingest`).
        """
        return Ingest(self, digest, size)

    def ingest_busy(self, digest: Digest) -> bool:
        """Whether some process is downloading ``digest`` into this store right now.

        A snapshot that may change at once; it lets a batch fetch other blobs first rather
        than wait in :meth:`ingest` for this one (which stays the only safe way to write it).
        """
        with os_errors(self.root, f"look up ingest of {digest}"):
            return is_locked(IngestPaths.of(self.root, digest).lock)

    # ── index.json ──────────────────────────────────────────────────────────────────────

    def images(self) -> list[Descriptor]:
        """The images in index.json, in file order, with their annotations.

        Entries this version cannot parse (written by another tool, e.g. with a digest
        algorithm fastpull does not verify) are left out here, and left alone on disk.
        """
        found = []
        for i, entry in enumerate(self._read_index()["manifests"]):
            with contextlib.suppress(ManifestError):
                found.append(Descriptor.from_json(entry, f"index.json manifests[{i}]"))
        return found

    def find_image(self, ref_name: str) -> Descriptor | None:
        """The image whose ``org.opencontainers.image.ref.name`` is ``ref_name``, if any.

        If other tools left several, the last one wins, as it was written most recently.
        """
        for entry in reversed(self._read_index()["manifests"]):
            if _ref_name(entry) == ref_name:
                with contextlib.suppress(ManifestError):
                    return Descriptor.from_json(entry, f"index.json entry {ref_name!r}")
        return None

    def add_image(
        self,
        descriptor: Descriptor,
        ref_name: str,
        annotations: Mapping[str, str] = _NO_ANNOTATIONS,
        platforms: Sequence[Descriptor] = (),
    ) -> None:
        """Name the manifest ``descriptor`` ``ref_name`` in index.json, replacing that name.

        The manifest blob must already be in the store. ``ref_name`` should be the full
        normalized reference (``docker.io/library/debian:latest``); skopeo and umoci address
        it as ``oci:<root>:<ref_name>`` and ``<root>:<ref_name>``, but they reject names
        outside the OCI ref.name grammar (e.g. with ``__``), which fastpull still stores.

        When ``descriptor`` is an index, ``platforms`` are the manifests of it that were
        pulled: each also gets an entry of its own, named by :func:`platform_name`, so tools
        that want one manifest can address it. The platform entries ``ref_name`` had before
        go, in the same rewrite of index.json.
        """
        self.add_images([ImageName(descriptor, ref_name, annotations, tuple(platforms))])

    def add_images(self, images: Sequence[ImageName]) -> None:
        """Name several images in ONE rewrite of index.json, as :meth:`add_image` names one
        (later names replace earlier ones): one sync of the blob directories and one of
        index.json for all of them, rather than one each.

        All or nothing: a StoreError when some image's manifest is not in the store (no
        image is named then), or when index.json cannot be written.
        """
        if not images:
            return
        entries = [(image.ref_name, self._entries(image)) for image in images]
        with self._index_lock():
            index = self._read_index()
            manifests = index["manifests"]
            for ref_name, named in entries:
                manifests = [
                    e
                    for e in manifests
                    if not _named(e, ref_name) and not any(_ref_name(e) == n for n in named)
                ]
                manifests += named.values()
            index["manifests"] = manifests
            # The images' blobs were published without syncing their directory (see
            # publish); one sync here, before index.json names them, covers all of them.
            self._write_index(index, durable_first=self._blob_directories())

    def _entries(self, image: ImageName) -> dict[str, dict[str, Any]]:
        """``image``'s index.json entries by name (the image's, then its platforms'), checked
        to name manifests the store holds."""
        named = {image.ref_name: image.descriptor}
        for manifest in image.platforms:
            if manifest.platform is not None:
                named.setdefault(platform_name(image.ref_name, manifest.platform), manifest)
        for name, manifest in named.items():
            if not self.has_blob(manifest.digest, manifest.size):
                raise StoreError(
                    f"cannot name {name} in store {self.root}: its manifest "
                    f"{manifest.digest} ({manifest.size} bytes) is not in the store",
                    store=str(self.root),
                )
        annotations = image.annotations
        entries = {
            image.ref_name: _entry(
                image.descriptor, {**annotations, REF_NAME_ANNOTATION: image.ref_name}
            )
        }
        for name, manifest in list(named.items())[1:]:
            entries[name] = _entry(
                manifest, _platform_annotations(annotations, image.ref_name, name)
            )
        return entries

    def remove_image(self, ref_name: str) -> Descriptor | None:
        """Drop every index.json entry named ``ref_name``, and the entries of its platforms;
        return the last one named ``ref_name``, if parseable.

        Blobs stay: other images may share them, and deleting unreferenced blobs is gc's job.
        """
        with self._index_lock():
            index = self._read_index()
            kept = [e for e in index["manifests"] if not _named(e, ref_name)]
            removed = [e for e in index["manifests"] if _ref_name(e) == ref_name]
            if len(kept) == len(index["manifests"]):
                return None
            index["manifests"] = kept
            self._write_index(index)
        if not removed:
            return None
        try:
            return Descriptor.from_json(removed[-1], f"index.json entry {ref_name!r}")
        except ManifestError:
            return None

    def index_entries(self) -> list[dict[str, Any]]:
        """index.json's entries as written, including any that :meth:`images` leaves out."""
        return list(self._read_index()["manifests"])

    def index_debris(self, *, remove: bool) -> list[tuple[str, int]]:
        """Temp files of ``index.json`` writers that were killed: (name, bytes) of each,
        deleted with ``remove``. A live writer holds the index lock while its temp file
        exists, so under that lock every such file is debris."""
        found = []
        with self._index_lock(), os_errors(self.root, "remove temp files"):
            for name in sorted(os.listdir(self.root)):
                if name.startswith(".index.json.") and _INIT_TEMP.fullmatch(name):
                    path = self.root / name
                    size = os.lstat(path).st_size
                    if remove:
                        path.unlink()
                    found.append((name, size))
        return found

    # ── who may use the store: pulls share it, deleting blobs takes it alone ────────────

    @contextlib.contextmanager
    def shared_use(self) -> Iterator[None]:
        """Held by a pull from start to finish; waits while gc or rmi hold the store."""
        with os_errors(self.root, "lock gc.lock"):
            fd = lock_file(self.root / "gc.lock", shared=True)
        try:
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def exclusive_use(
        self, timeout: float, on_wait: Callable[[], None] = lambda: None
    ) -> Iterator[None]:
        """Held while deleting blobs: no pull runs meanwhile (they hold :meth:`shared_use`).

        If the store is in use, calls ``on_wait`` once and waits up to ``timeout`` seconds,
        then raises StoreError. A process must not hold both at once: flock would make it
        wait for itself.
        """
        path = self.root / "gc.lock"
        with os_errors(self.root, "lock gc.lock"):
            fd = lock_file_within(path, 0)
        if fd is None:
            on_wait()
            with os_errors(self.root, "lock gc.lock"):
                fd = lock_file_within(path, timeout)
        if fd is None:
            raise StoreError(
                f"store {self.root} is still in use by another fastpull process "
                f"(a pull or verify) after {timeout:g} s; try again when it has finished",
                store=str(self.root),
            )
        try:
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        with os_errors(self.root, "lock index.json"):
            fd = lock_file(self.root / "index.json.lock")
        try:
            yield
        finally:
            os.close(fd)

    def _read_index(self) -> dict[str, Any]:
        """index.json as parsed JSON, checked just enough to be edited safely."""
        try:
            raw = (self.root / "index.json").read_bytes()
        except FileNotFoundError:
            raise self._not_a_layout("index.json is missing") from None
        except OSError as exc:
            raise store_error(exc, self.root, "read index.json") from exc
        try:
            index = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise self._not_a_layout(f"index.json is not valid JSON ({exc})") from None
        if not isinstance(index, dict):
            raise self._not_a_layout("index.json is not a JSON object")
        manifests = index.get("manifests")
        if not isinstance(manifests, list) or not all(isinstance(e, dict) for e in manifests):
            raise self._not_a_layout("index.json has no 'manifests' list of objects")
        return index

    def _write_index(self, index: dict[str, Any], durable_first: Sequence[Path] = ()) -> None:
        with os_errors(self.root, "update index.json"):
            body = orjson.dumps(index) + b"\n"
            atomic_write(self.root, "index.json", body, replace=True, durable_first=durable_first)


def _entry(descriptor: Descriptor, annotations: Mapping[str, str]) -> dict[str, Any]:
    entry = descriptor.to_json()
    entry["annotations"] = {**descriptor.annotations, **annotations}
    return entry


def _platform_annotations(annotations: Mapping[str, str], image: str, name: str) -> dict[str, str]:
    """A platform entry's annotations: the image's, but its own names and no source
    manifest (that annotation names the original of the index, not of this manifest)."""
    own = {k: v for k, v in annotations.items() if k != SOURCE_MANIFEST_ANNOTATION}
    if CONTAINERD_NAME_ANNOTATION in own:
        own[CONTAINERD_NAME_ANNOTATION] = name
    return {**own, PLATFORM_OF_ANNOTATION: image, REF_NAME_ANNOTATION: name}


__all__ = [
    "INDEX_MEDIA_TYPE",
    "LAYOUT_VERSION",
    "PLATFORM_OF_ANNOTATION",
    "REF_NAME_ANNOTATION",
    "ImageName",
    "Store",
    "platform_name",
    "resolve_store_path",
]
