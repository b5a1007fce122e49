"""The local store: a standard OCI image layout that skopeo, umoci, podman and containerd can read.

On disk (image-spec ``image-layout.md``)::

    <root>/oci-layout          {"imageLayoutVersion":"1.0.0"}
    <root>/index.json          one entry per image, named by org.opencontainers.image.ref.name
    <root>/index.json.lock     flock'ed while a fastpull process rewrites index.json
    <root>/gc.lock             flock'ed shared by pulls, exclusively by gc / rmi / verify --repair
    <root>/blobs/<alg>/<hex>   verified content, and nothing else
    <root>/ingest/             fastpull's partial downloads and temp files (other tools ignore it)

What holds whatever happens, ``kill -9`` and power loss included:

- A file enters ``blobs/`` only by ``rename`` from ``ingest/``, after its digest and size
  matched and its data was fsynced. A name in ``blobs/`` is never a partial file.
- ``index.json`` is only ever replaced by renaming a complete, fsynced temp file over it, so a
  reader always sees the old or the new version, never a torn one. Writers hold an exclusive
  flock on ``index.json.lock`` across read-modify-write, so two fastpull processes never drop
  each other's entries (skopeo#1018). Other tools do not take that lock; against a concurrent
  ``skopeo copy`` into the same layout we are only as safe as skopeo is.
- An image entry is added only once its manifest blob is in ``blobs/``.

A stop leaves ``ingest/*.data`` with its ``.journal`` for the next ingest of that digest to
resume (see :class:`Ingest`). A crash can also leave debris that is harmless and that a later
``gc`` may delete: ``ingest/*.lock``, ``ingest/*.tmp``, ``ingest/*.journal.tmp`` and
``.index.json.*.tmp`` in the root. A ``gc`` must delete an ``ingest/*.lock`` only while holding
its flock (see ``_lock``).

A pull commits blobs before index.json names them, so a blob can be unreferenced only for
the moment. Pulls therefore hold ``gc.lock`` shared for their whole duration
(:meth:`Store.shared_use`), and whatever deletes blobs holds it exclusively
(:meth:`Store.exclusive_use`): nothing is judged unreferenced while a pull may still name it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import orjson

from fastpull import cancel
from fastpull.errors import DigestMismatch, ManifestError, StoreError
from fastpull.hashing import new_hasher
from fastpull.store.diskqueue import release_pages
from fastpull.store.journal import Extent, Journal
from fastpull.types import SUPPORTED_ALGORITHMS, Descriptor, Digest, InvalidDigest

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
# What fastpull adds to each index.json entry besides the reference name.
REPO_DIGEST_ANNOTATION = "io.fastpull.repo-digest"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
# Set when a Docker-format manifest was stored converted to OCI: the digest the registry
# served for it (kept in blobs/ too, so the original stays verifiable).
SOURCE_MANIFEST_ANNOTATION = "io.fastpull.source-manifest"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
LAYOUT_VERSION = "1.0.0"

_OCI_LAYOUT = orjson.dumps({"imageLayoutVersion": LAYOUT_VERSION}) + b"\n"
_EMPTY_INDEX = (
    orjson.dumps({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}) + b"\n"
)
_NO_ANNOTATIONS: Mapping[str, str] = MappingProxyType({})
# Ingest lock files this process holds.
_HELD_INGESTS: set[Path] = set()
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


def _store_error(exc: OSError, root: Path, action: str, need: int | None = None) -> StoreError:
    """The one place where an OSError becomes a StoreError the user can act on."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        extra = f" (need {need} bytes)" if need is not None else ""
        message = f"{what} in store {root}{extra}"
    else:
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"cannot {action} in store {root}: {exc.strerror or exc}{where}"
    return StoreError(message, store=str(root), errno=exc.errno)


@contextlib.contextmanager
def _os_errors(root: Path, action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _store_error(exc, root, action) from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist) holding ``data``, fsynced; 0644 less the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _atomic_write(directory: Path, name: str, data: bytes, *, replace: bool) -> None:
    """Give ``directory/name`` the content ``data`` all at once, durably.

    With ``replace`` false an existing file wins: the new one is hard-linked into place,
    which fails instead of overwriting, so racing initialisers cannot clobber each other.
    """
    temp = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    _write_new_file(temp, data)
    try:
        if replace:
            os.replace(temp, directory / name)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(temp, directory / name)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(directory)


_LOCK_POLL_SECONDS = 0.05


def _wait_for_flock(fd: int) -> None:
    """Take an exclusive flock, polling so that Ctrl-C is noticed while another process
    holds it (a blocking flock is restarted after the signal handler, and never returns)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            cancel.check()
            time.sleep(_LOCK_POLL_SECONDS)


def _lock(path: Path) -> int:
    """Open ``path`` and take an exclusive flock on it, waiting as long as it takes.

    Holders delete lock files while still holding the lock. A waiter may therefore wake up
    holding a lock on a file that no longer has a name, while a newcomer has created and
    locked a fresh file under the same name; so after locking we check that the path still
    names the inode we locked, and start over if not. This keeps exactly one holder per name.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _wait_for_flock(fd)
            if _still_named(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file ``fd`` has open (see :func:`_lock`)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(current, os.fstat(fd))


def _try_lock(path: Path) -> int | None:
    """:func:`_lock` without waiting: None if another holder has ``path`` locked now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _still_named(fd, path):
            return fd
        os.close(fd)


def _flock_until(fd: int, operation: int, deadline: float | None) -> bool:
    """Take a flock, polling (for Ctrl-C, see ``_wait_for_flock``) until ``deadline``."""
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            cancel.check()
            time.sleep(_LOCK_POLL_SECONDS)


@dataclass(frozen=True)
class StoredBlob:
    """A file in ``blobs/`` named like a blob; ``stat`` identifies the file that was seen."""

    digest: Digest
    size: int
    stat: os.stat_result


@dataclass(frozen=True)
class IngestFiles:
    """The files under ``ingest/`` of one digest (``<alg>-<hex>.*``).

    ``live`` is whether a process holds the digest's ingest lock: a download in progress.
    """

    name: str
    paths: tuple[Path, ...]
    size: int
    live: bool


# <alg>-<hex>.<anything>: the files of one ingest (data, lock, journal, temp files).
_INGEST_STEM = re.compile(r"[a-z0-9]+-[0-9a-f]+")
_INGEST_NAME = re.compile(rf"({_INGEST_STEM.pattern})\.(.+)")


def _ref_name(entry: Mapping[str, Any]) -> object:
    annotations = entry.get("annotations")
    return annotations.get(REF_NAME_ANNOTATION) if isinstance(annotations, dict) else None


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
        with _os_errors(root, "create the layout"):
            if not os.path.lexists(root / "oci-layout"):
                cls._initialize(root, create)
        store = cls(root)
        with _os_errors(root, "read the layout"):
            store._check_oci_layout()
            store._read_index()
        with _os_errors(root, "prepare the layout"):
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
        _atomic_write(root, "index.json", _EMPTY_INDEX, replace=False)
        # Last, because its presence is what makes the directory a layout.
        _atomic_write(root, "oci-layout", _OCI_LAYOUT, replace=False)

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
        return _store_error(exc, self.root, action)

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
            raise _store_error(exc, self.root, f"look up blob {digest}") from exc
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
            raise _store_error(exc, self.root, f"read blob {digest}") from exc

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
        temp = self.root / "ingest" / f"{digest.algorithm}-{digest.hex}.{secrets.token_hex(8)}.tmp"
        with _os_errors(self.root, f"write blob {digest}"):
            try:
                _write_new_file(temp, data)
                self._publish(temp, digest)
            finally:
                temp.unlink(missing_ok=True)
        return True

    def adopt_blob(self, path: Path, digest: Digest) -> None:
        """Move ``path``, a file under ``ingest/`` whose content the caller has just hashed
        to ``digest``, into ``blobs/`` (fsynced first). ``load`` commits archive members so."""
        with _os_errors(self.root, f"commit blob {digest}"):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(path, digest)

    def _publish(self, source: Path, digest: Digest) -> None:
        """Rename a verified, fsynced file into ``blobs/`` and make the rename durable."""
        target = self.blob_path(digest)
        try:
            target.parent.mkdir()
        except FileExistsError:
            pass
        else:
            _fsync_dir(target.parent.parent)
        # Replacing is right: a blob already there is identical, or corrupt if its size
        # differed (has_blob said it was missing).
        os.replace(source, target)
        # Only the new name must survive a crash; if the old name in ingest/ comes back it is
        # debris that the next ingest of this digest truncates.
        _fsync_dir(target.parent)

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
        with _os_errors(self.root, f"look up ingest of {digest}"):
            return self._ingest_is_live(Ingest(self, digest, 0)._lock_path)

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
    ) -> None:
        """Name the manifest ``descriptor`` ``ref_name`` in index.json, replacing that name.

        The manifest blob must already be in the store. ``ref_name`` should be the full
        normalized reference (``docker.io/library/debian:latest``); skopeo and umoci address
        it as ``oci:<root>:<ref_name>`` and ``<root>:<ref_name>``, but they reject names
        outside the OCI ref.name grammar (e.g. with ``__``), which fastpull still stores.
        """
        if not self.has_blob(descriptor.digest, descriptor.size):
            raise StoreError(
                f"cannot name {ref_name} in store {self.root}: its manifest "
                f"{descriptor.digest} ({descriptor.size} bytes) is not in the store",
                store=str(self.root),
            )
        entry = descriptor.to_json()
        entry["annotations"] = {
            **descriptor.annotations,
            **annotations,
            REF_NAME_ANNOTATION: ref_name,
        }
        with self._index_lock():
            index = self._read_index()
            manifests = [e for e in index["manifests"] if _ref_name(e) != ref_name]
            index["manifests"] = [*manifests, entry]
            self._write_index(index)

    def remove_image(self, ref_name: str) -> Descriptor | None:
        """Drop every index.json entry named ``ref_name``; return the last one, if parseable.

        Blobs stay: other images may share them, and deleting unreferenced blobs is gc's job.
        """
        with self._index_lock():
            index = self._read_index()
            kept = [e for e in index["manifests"] if _ref_name(e) != ref_name]
            removed = [e for e in index["manifests"] if _ref_name(e) == ref_name]
            if not removed:
                return None
            index["manifests"] = kept
            self._write_index(index)
        try:
            return Descriptor.from_json(removed[-1], f"index.json entry {ref_name!r}")
        except ManifestError:
            return None

    # ── maintenance: what gc, rmi, verify and df need ───────────────────────────────────

    def index_entries(self) -> list[dict[str, Any]]:
        """index.json's entries as written, including any that :meth:`images` leaves out."""
        return list(self._read_index()["manifests"])

    def stored_blobs(self) -> tuple[list[StoredBlob], list[Path]]:
        """Every blob file under ``blobs/``, and the paths there that are not blobs.

        The second list holds what fastpull does not know how to check: directories of
        other digest algorithms, names that are not a digest, anything but a regular file.
        """
        blobs: list[StoredBlob] = []
        strays: list[Path] = []
        with _os_errors(self.root, "list blobs"):
            for top in sorted(os.scandir(self.root / "blobs"), key=lambda e: e.name):
                if top.name not in SUPPORTED_ALGORITHMS or not top.is_dir(follow_symlinks=False):
                    strays.append(Path(top.path))
                    continue
                for item in sorted(os.scandir(top.path), key=lambda e: e.name):
                    st = item.stat(follow_symlinks=False)
                    try:
                        digest = Digest(top.name, item.name)
                    except InvalidDigest:
                        digest = None
                    if digest is None or not stat.S_ISREG(st.st_mode):
                        strays.append(Path(item.path))
                    else:
                        blobs.append(StoredBlob(digest, st.st_size, st))
        return blobs, strays

    def delete_blob(self, digest: Digest, seen: os.stat_result | None = None) -> int | None:
        """Delete a blob; return the bytes freed, or None if there was nothing to delete.

        With ``seen``, delete only that very file: a blob committed since (by a pull that
        re-downloaded it) is kept. Callers hold :meth:`exclusive_use`.
        """
        path = self.blob_path(digest)
        with _os_errors(self.root, f"delete blob {digest}"):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return None
            if seen is not None and not os.path.samestat(st, seen):
                return None
            path.unlink()
        return st.st_size

    def ingests(self) -> list[IngestFiles]:
        """What is under ``ingest/``, per digest, and whether each download is still running.

        Probes the locks without taking them for long and without creating lock files.
        Temp files of :meth:`write_blob` never hold a lock, so they count as not live.
        """
        groups: dict[str, list[Path]] = {}
        with _os_errors(self.root, "list ingest/"):
            for item in os.scandir(self.root / "ingest"):
                match = _INGEST_NAME.fullmatch(item.name)
                if match and item.is_file(follow_symlinks=False):
                    groups.setdefault(match[1], []).append(Path(item.path))
            found = []
            for name, paths in sorted(groups.items()):
                size = 0
                for path in paths:
                    with contextlib.suppress(FileNotFoundError):
                        size += os.lstat(path).st_size
                live = self._ingest_is_live(self.root / "ingest" / f"{name}.lock")
                found.append(IngestFiles(name, tuple(sorted(paths)), size, live))
        return found

    @staticmethod
    def _ingest_is_live(lock_path: Path) -> bool:
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            # A shared probe: an ingest holds the lock exclusively, so this fails while it
            # runs, and a waiting ingest only retries its poll a little later.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def remove_ingest(self, name: str) -> int | None:
        """Delete the files of ingest ``name`` (``<alg>-<hex>``) unless a download holds its
        lock; return the bytes freed, or None if it is live.

        Takes the lock the way an ingest does (``_lock``'s inode rule) and deletes the lock
        file last, while holding it, so a download starting meanwhile waits, then starts over
        on a fresh lock file. ``write_blob``'s temp files have no lock; callers hold
        :meth:`exclusive_use`, which keeps pulls, and so ``write_blob``, away.
        """
        if not _INGEST_STEM.fullmatch(name):
            raise ValueError(f"not an ingest name: {name!r}")
        ingest = self.root / "ingest"
        lock_path = ingest / f"{name}.lock"
        with _os_errors(self.root, f"remove ingest {name}"):
            fd = _try_lock(lock_path)
            if fd is None:
                return None
            try:
                freed = 0
                for item in os.scandir(ingest):
                    if item.name.startswith(f"{name}.") and item.path != str(lock_path):
                        with contextlib.suppress(FileNotFoundError):
                            freed += item.stat(follow_symlinks=False).st_size
                            os.unlink(item.path)
                lock_path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return freed

    def index_debris(self, *, remove: bool) -> list[tuple[str, int]]:
        """Temp files of ``index.json`` writers that were killed: (name, bytes) of each,
        deleted with ``remove``. A live writer holds the index lock while its temp file
        exists, so under that lock every such file is debris."""
        found = []
        with self._index_lock(), _os_errors(self.root, "remove temp files"):
            for name in sorted(os.listdir(self.root)):
                if name.startswith(".index.json.") and _INIT_TEMP.fullmatch(name):
                    path = self.root / name
                    size = os.lstat(path).st_size
                    if remove:
                        path.unlink()
                    found.append((name, size))
        return found

    @contextlib.contextmanager
    def shared_use(self) -> Iterator[None]:
        """Held by a pull from start to finish; waits while gc or rmi hold the store."""
        with _os_errors(self.root, "lock gc.lock"):
            fd = os.open(self.root / "gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _flock_until(fd, fcntl.LOCK_SH, None)
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
        with _os_errors(self.root, "lock gc.lock"):
            fd = os.open(self.root / "gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not _flock_until(fd, fcntl.LOCK_EX, time.monotonic()):
                on_wait()
                if not _flock_until(fd, fcntl.LOCK_EX, time.monotonic() + timeout):
                    raise StoreError(
                        f"store {self.root} is still in use by another fastpull process "
                        f"(a pull or verify) after {timeout:g} s; try again when it has finished",
                        store=str(self.root),
                    )
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        # Never deleted, so waiters never need _lock's retry; one small file per store.
        with _os_errors(self.root, "lock index.json"):
            fd = _lock(self.root / "index.json.lock")
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
            raise _store_error(exc, self.root, "read index.json") from exc
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

    def _write_index(self, index: dict[str, Any]) -> None:
        with _os_errors(self.root, "update index.json"):
            _atomic_write(self.root, "index.json", orjson.dumps(index) + b"\n", replace=True)


class Ingest:
    """One blob being downloaded into ``ingest/``; made by :meth:`Store.ingest`.

    Files, all named ``ingest/<alg>-<hex>.*``: ``.lock`` (flock'ed while entered, deleted
    on exit), ``.data`` (the bytes, at their offsets) and ``.journal`` (which ranges of
    ``.data`` are finished, see :mod:`fastpull.store.journal`). After entering, ``present``
    tells whether the blob was already stored; otherwise :attr:`resumed` lists the ranges
    an earlier, interrupted download left that still match their checksums, and the
    caller fetches only the rest. An ingest left without :meth:`commit` keeps its data and
    journal for the next run, unless :meth:`discard` threw them away.

    One process must not enter two ingests of the same digest at once: flock would make it
    wait for itself forever, so that raises RuntimeError instead.
    """

    def __init__(self, store: Store, digest: Digest, size: int) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        stem = store.root / "ingest" / f"{digest.algorithm}-{digest.hex}"
        self.path = stem.with_name(stem.name + ".data")
        self.journal_path = stem.with_name(stem.name + ".journal")
        self._lock_path = stem.with_name(stem.name + ".lock")
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._journal: Journal | None = None
        self.present = False
        self.committed = False

    def __enter__(self) -> Ingest:
        root = self.store.root
        if self._lock_path in _HELD_INGESTS:
            raise RuntimeError(f"this process is already ingesting {self.digest}")
        with _os_errors(root, f"lock {self._lock_path.name}"):
            self._lock_fd = _lock(self._lock_path)
        _HELD_INGESTS.add(self._lock_path)
        try:
            if self.store.has_blob(self.digest, self.size):
                self.present = True
                self.discard()  # what a run killed after its commit left behind
            else:
                self._open()
        except BaseException:
            self._close()
            self._release_lock()
            raise
        return self

    def _open(self) -> None:
        with _os_errors(self.store.root, f"open {self.path.name}"):
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._journal = Journal.resume(self.journal_path, self.digest, self.size, self._fd)
            if not self._journal.extents:
                os.ftruncate(self._fd, 0)  # stale bytes nobody vouches for

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._journal is not None and not self._journal.extents:
            self.discard()  # nothing finished: nothing worth keeping
        self._close()
        self._release_lock()

    @property
    def fd(self) -> int:
        """The data file, open read-write, for ``os.pwrite`` at any offset."""
        if self._fd is None:
            raise RuntimeError(f"ingest of {self.digest} is not open for writing")
        return self._fd

    @property
    def resumed(self) -> tuple[Extent, ...]:
        """Finished ranges found in the journal (checked against the data) at entry."""
        return tuple(self._journal.extents) if self._journal is not None else ()

    @property
    def etag(self) -> str | None:
        """The server's validator for the journaled bytes, if one was recorded."""
        return self._journal.etag if self._journal is not None else None

    def preallocate(self) -> None:
        """Reserve ``size`` bytes now, so a full disk fails here and not mid-download."""
        if self.size == 0:
            return
        try:
            try:
                os.posix_fallocate(self.fd, 0, self.size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                # The file system cannot reserve space; a sparse file of the right size will do.
                os.ftruncate(self.fd, self.size)
        except OSError as exc:
            raise _store_error(exc, self.store.root, "preallocate", need=self.size) from exc

    def record(self, extent: Extent) -> None:
        """Journal a finished range of the data file (durable after :meth:`journal_sync`)."""
        with _os_errors(self.store.root, f"write {self.journal_path.name}"):
            self._open_journal().record(extent)

    def journal_sync(self) -> Callable[[], None] | None:
        """A call, safe on any thread, that makes the journal records written so far
        durable (raising StoreError); None if there is nothing to sync."""
        sync = self._journal.detach_sync() if self._journal is not None else None
        if sync is None:
            return None
        root, action = self.store.root, f"sync {self.journal_path.name}"

        def durable() -> None:
            with _os_errors(root, action):
                sync()

        return durable

    def record_etag(self, etag: str) -> None:
        """Journal the validator the server sent with the blob's bytes."""
        with _os_errors(self.store.root, f"write {self.journal_path.name}"):
            self._open_journal().record_etag(etag)

    def restart(self) -> None:
        """Forget every journaled range: the blob is being fetched again from byte 0."""
        with _os_errors(self.store.root, f"write {self.journal_path.name}"):
            self._open_journal().reset()

    def _open_journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError(f"ingest of {self.digest} is not open for writing")
        return self._journal

    def commit(self, actual_hex: str) -> None:
        """Move the data into ``blobs/``, given the hex digest the caller computed over it.

        Raises DigestMismatch, deleting the data, if ``actual_hex`` is not the expected
        digest or the file is not exactly ``size`` bytes long.
        """
        fd = self.fd
        if actual_hex != self.digest.hex:
            self.discard()
            raise DigestMismatch(
                f"downloaded blob does not match its digest: expected {self.digest}, "
                f"got {self.digest.algorithm}:{actual_hex[:128]}",
                expected=str(self.digest),
                actual=f"{self.digest.algorithm}:{actual_hex[:128]}",
            )
        root = self.store.root
        with _os_errors(root, f"commit blob {self.digest}"):
            written = os.fstat(fd).st_size
        if written != self.size:
            self.discard()
            raise DigestMismatch(
                f"downloaded blob {self.digest} is {written} bytes, expected {self.size}",
                expected=str(self.digest),
                actual_size=written,
            )
        with _os_errors(root, f"commit blob {self.digest}"):
            os.fsync(fd)
            # Clean now: free the pages for whatever is written next.
            release_pages(fd, 0, self.size)
            self.store._publish(self.path, self.digest)
        self.committed = True
        self.discard()  # only the journal and the descriptor are left to drop

    def discard(self) -> None:
        """Close and delete the data and its journal (nothing of them is worth keeping)."""
        self._close(keep=False)
        self._journal = None
        # Best effort: this runs while an exception may be propagating, and leftovers
        # are harmless (a journal without its data resumes nothing).
        for path in (self.journal_path, self.path):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _close(self, *, keep: bool = True) -> None:
        """Close the files, with the journal synced if they are ``keep`` for the next run."""
        if self._journal is not None:
            # A failed sync loses at most the newest records: their ranges come again.
            with contextlib.suppress(OSError):
                self._journal.close(sync=keep)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        _HELD_INGESTS.discard(self._lock_path)
        # Unlink while still holding the lock; _lock's inode check makes that safe for
        # waiters, and it keeps ingest/ from filling with one lock file per blob ever pulled.
        with contextlib.suppress(OSError):
            self._lock_path.unlink()
        os.close(fd)


__all__ = [
    "INDEX_MEDIA_TYPE",
    "LAYOUT_VERSION",
    "REF_NAME_ANNOTATION",
    "Ingest",
    "IngestFiles",
    "Store",
    "StoredBlob",
    "resolve_store_path",
]
