"""What is on disk below ``index.json``, as gc, rmi, ``verify`` and df see it: the files in
``blobs/`` and the downloads in ``ingest/``, listed and deleted one by one.

Deciding *what* to delete is :mod:`fastpull.store.maintenance`'s job (and
:mod:`fastpull.storecheck`'s); this module only does it safely. Blobs are deleted only under
:meth:`Store.exclusive_use <fastpull.store.layout.Store.exclusive_use>`, which keeps pulls
away; an ingest is deleted only while holding its lock, as a download would hold it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fastpull.store.files import os_errors
from fastpull.store.ingest import IngestPaths, ingest_name
from fastpull.store.layout import Store
from fastpull.store.locks import delete_and_unlock, is_locked, lock_file_within
from fastpull.types import SUPPORTED_ALGORITHMS, Digest, InvalidDigest


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


def stored_blobs(store: Store) -> tuple[list[StoredBlob], list[Path]]:
    """Every blob file under ``blobs/``, and the paths there that are not blobs.

    The second list holds what fastpull does not know how to check: directories of
    other digest algorithms, names that are not a digest, anything but a regular file.
    """
    blobs: list[StoredBlob] = []
    strays: list[Path] = []
    with os_errors(store.root, "list blobs"):
        for top in sorted(os.scandir(store.root / "blobs"), key=lambda e: e.name):
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


def delete_blob(store: Store, digest: Digest, seen: os.stat_result | None = None) -> int | None:
    """Delete a blob; return the bytes freed, or None if there was nothing to delete.

    With ``seen``, delete only that very file: a blob committed since (by a pull that
    re-downloaded it) is kept. Callers hold :meth:`Store.exclusive_use`.
    """
    path = store.blob_path(digest)
    with os_errors(store.root, f"delete blob {digest}"):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if seen is not None and not os.path.samestat(st, seen):
            return None
        path.unlink()
    return st.st_size


def ingests(store: Store) -> list[IngestFiles]:
    """What is under ``ingest/``, per digest, and whether each download is still running.

    Probes the locks without taking them for long and without creating lock files.
    Temp files of :meth:`Store.write_blob` never hold a lock, so they count as not live.
    """
    groups: dict[str, list[Path]] = {}
    with os_errors(store.root, "list ingest/"):
        for item in os.scandir(store.root / "ingest"):
            name = ingest_name(item.name)
            if name is not None and item.is_file(follow_symlinks=False):
                groups.setdefault(name, []).append(Path(item.path))
        found = []
        for name, paths in sorted(groups.items()):
            size = 0
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    size += os.lstat(path).st_size
            live = is_locked(IngestPaths.named(store.root, name).lock)
            found.append(IngestFiles(name, tuple(sorted(paths)), size, live))
    return found


def remove_ingest(store: Store, name: str) -> int | None:
    """Delete the files of ingest ``name`` (``<alg>-<hex>``) unless a download holds its
    lock; return the bytes freed, or None if it is live. ValueError for other names.

    Takes the lock the way an ingest does (:func:`~fastpull.store.locks.lock_file`'s inode
    rule) and deletes the lock file last, while holding it, so a download starting meanwhile
    waits, then starts over on a fresh lock file. ``write_blob``'s temp files have no lock;
    callers hold :meth:`Store.exclusive_use`, which keeps pulls, and so ``write_blob``, away.
    """
    paths = IngestPaths.named(store.root, name)
    with os_errors(store.root, f"remove ingest {name}"):
        fd = lock_file_within(paths.lock, 0)
        if fd is None:
            return None
        try:
            freed = 0
            for item in os.scandir(paths.directory):
                if paths.owns(item.name) and item.path != str(paths.lock):
                    with contextlib.suppress(FileNotFoundError):
                        freed += item.stat(follow_symlinks=False).st_size
                        os.unlink(item.path)
        finally:
            delete_and_unlock(fd, paths.lock)
    return freed


__all__ = ["IngestFiles", "StoredBlob", "delete_blob", "ingests", "remove_ingest", "stored_blobs"]
