"""Tests for fastpull.store.layout and fastpull.store.ingest: the OCI image layout and downloads
into it, on real files in temporary directories."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import blake3
import orjson
import pytest
import xxhash

from fastpull.errors import DigestMismatch, StoreError
from fastpull.store.ingest import IngestPaths, ingest_name
from fastpull.store.journal import Extent
from fastpull.store.layout import (
    PLATFORM_OF_ANNOTATION,
    REF_NAME_ANNOTATION,
    ImageName,
    Store,
    platform_name,
    resolve_store_path,
)
from fastpull.types import Descriptor, Digest, Platform
from tests.support.diskcalls import record_disk_calls
from tests.support.tools import require_tool

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
SPAWN = multiprocessing.get_context("spawn")
NOBODY = 65534


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    if algorithm == "blake3":
        return Digest("blake3", blake3.blake3(data).hexdigest())
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def put_manifest(store: Store, body: bytes = b'{"schemaVersion":2}') -> Descriptor:
    """A blob standing in for a manifest (add_image only needs it to be present)."""
    digest = digest_of(body)
    store.write_blob(digest, body)
    return Descriptor(MANIFEST_TYPE, digest, len(body))


def raw_index(root: Path) -> dict[str, Any]:
    return orjson.loads((root / "index.json").read_bytes())


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


# ── resolve_store_path ──────────────────────────────────────────────────────────────────


def test_resolve_store_path_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASTPULL_STORE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_store_path(tmp_path / "cli") == tmp_path / "cli"
    assert resolve_store_path(None) == tmp_path / "env"
    monkeypatch.delenv("FASTPULL_STORE")
    assert resolve_store_path(None) == tmp_path / "xdg" / "fastpull" / "store"
    # The XDG spec says to ignore empty and relative values.
    for value in ("", "relative/dir"):
        monkeypatch.setenv("XDG_DATA_HOME", value)
        expected = tmp_path / "home" / ".local" / "share" / "fastpull" / "store"
        assert resolve_store_path(None) == expected


def test_resolve_store_path_is_absolute_and_expands_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert resolve_store_path("~/s") == tmp_path / "s"
    assert resolve_store_path("rel") == tmp_path / "rel"


# ── opening ─────────────────────────────────────────────────────────────────────────────


def test_open_creates_a_layout(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "store"
    store = Store.open(root)
    assert store.root == root
    assert orjson.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    assert raw_index(root) == {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [],
    }
    assert (root / "blobs").is_dir() and (root / "ingest").is_dir()
    assert sorted(os.listdir(root)) == ["blobs", "index.json", "ingest", "oci-layout"]
    assert store.images() == []
    Store.open(root, create=False)


def test_open_fills_an_empty_directory(tmp_path: Path) -> None:
    Store.open(tmp_path)
    assert (tmp_path / "oci-layout").is_file()


def test_open_finishes_an_interrupted_creation(tmp_path: Path) -> None:
    # What a kill -9 between writing index.json and oci-layout leaves behind.
    (tmp_path / "blobs").mkdir()
    (tmp_path / "index.json").write_bytes(
        orjson.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [],
            }
        )
        + b"\n"
    )
    (tmp_path / ".oci-layout.0123abcd.tmp").write_bytes(b"{")
    Store.open(tmp_path)
    assert (tmp_path / "oci-layout").is_file()


def test_open_without_create(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "missing", create=False)
    with pytest.raises(StoreError, match="is not an OCI image layout"):
        Store.open(tmp_path, create=False)
    assert os.listdir(tmp_path) == []


def test_open_refuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StoreError, match=re.escape(f"store path {path} is not a directory")):
        Store.open(path)


def test_open_refuses_a_parent_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="Not a directory"):
        Store.open(tmp_path / "file" / "store")


@pytest.mark.parametrize(
    "contents",
    [
        {"notes.txt": b"hello"},
        {"blobs/sha256/abc": b"x"},
        {"index.json": b'{"schemaVersion":2,"manifests":[{"x":1}]}'},
    ],
    ids=["other-file", "non-empty-blobs", "foreign-index"],
)
def test_open_refuses_a_non_empty_directory(tmp_path: Path, contents: dict[str, bytes]) -> None:
    for name, data in contents.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(StoreError, match=re.escape(f"{tmp_path} is not an OCI image layout")):
        Store.open(tmp_path)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("layout", "why"),
    [
        (b'{"imageLayoutVersion":"2.0.0"}', "oci-layout has imageLayoutVersion '2.0.0'"),
        (b"{}", "oci-layout has imageLayoutVersion None"),
        (b"[1]", "oci-layout has imageLayoutVersion None"),
        (b"not json", "oci-layout is not valid JSON"),
    ],
)
def test_open_refuses_a_bad_oci_layout(tmp_path: Path, layout: bytes, why: str) -> None:
    Store.open(tmp_path)
    (tmp_path / "oci-layout").write_bytes(layout)
    with pytest.raises(StoreError, match=re.escape(f"is not an OCI image layout: {why}")):
        Store.open(tmp_path)


@pytest.mark.parametrize(
    ("index", "why"),
    [
        (b'{"schemaVersion":2,"manifests":[', "index.json is not valid JSON"),
        (b"[]", "index.json is not a JSON object"),
        (b'{"schemaVersion":2}', "index.json has no 'manifests' list"),
        (b'{"schemaVersion":2,"manifests":[1]}', "index.json has no 'manifests' list"),
        (None, "index.json is missing"),
    ],
)
def test_open_refuses_a_broken_index(tmp_path: Path, index: bytes | None, why: str) -> None:
    store = Store.open(tmp_path)
    if index is None:
        (tmp_path / "index.json").unlink()
    else:
        (tmp_path / "index.json").write_bytes(index)
    with pytest.raises(StoreError, match=re.escape(f"is not an OCI image layout: {why}")):
        Store.open(tmp_path)
    with pytest.raises(StoreError, match=re.escape(why)):
        store.images()


def test_open_accepts_a_layout_from_another_tool(tmp_path: Path) -> None:
    # As skopeo writes it: no ingest/, no top-level mediaType.
    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    (tmp_path / "oci-layout").write_bytes(b'{"imageLayoutVersion": "1.0.0"}')
    (tmp_path / "index.json").write_bytes(b'{"schemaVersion":2,"manifests":[]}')
    Store.open(tmp_path)
    assert (tmp_path / "ingest").is_dir()


def _open_store(root: str) -> str:
    return str(Store.open(Path(root)).root)


def test_concurrent_creation(tmp_path: Path) -> None:
    root = tmp_path / "new" / "store"
    with ProcessPoolExecutor(8, mp_context=SPAWN) as pool:
        results = list(pool.map(_open_store, [str(root)] * 16))
    assert results == [str(root)] * 16
    assert sorted(os.listdir(root)) == ["blobs", "index.json", "ingest", "oci-layout"]


# Root ignores permission bits, so as root these checks run in a child that has dropped
# to nobody; the directories live under a world-readable temp dir so that nobody can
# reach them (pytest's tmp_path is private to its user).


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fastpull-store-test-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(path)


def _drop_privileges() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _unprivileged(fn: Callable[..., Any], *args: Any) -> Any:
    if os.geteuid() != 0:
        return fn(*args)
    # Unpickling the initializer imports this module, and with it everything the tests need,
    # while the child is still root: nobody may not be able to read the interpreter's files.
    with ProcessPoolExecutor(1, mp_context=SPAWN, initializer=_drop_privileges) as pool:
        return pool.submit(fn, *args).result()


def test_open_refuses_a_read_only_store(shared_tmp: Path) -> None:
    root = shared_tmp / "store"
    Store.open(root)
    root.chmod(0o555)
    with pytest.raises(StoreError, match=re.escape(f"store {root} is not writable")):
        _unprivileged(_open_store, str(root))


def test_open_refuses_a_read_only_ingest_dir(shared_tmp: Path) -> None:
    root = shared_tmp / "store"
    Store.open(root)
    (root / "ingest").chmod(0o555)
    root.chmod(0o777)
    (root / "blobs").chmod(0o777)
    with pytest.raises(
        StoreError, match=re.escape(f"store {root} is not writable ({root}/ingest)")
    ):
        _unprivileged(_open_store, str(root))


def test_creating_in_a_read_only_parent_fails_cleanly(shared_tmp: Path) -> None:
    root = shared_tmp / "store"
    with pytest.raises(
        StoreError, match=re.escape(f"cannot create the layout in store {root}: Permission")
    ):
        _unprivileged(_open_store, str(root))


# ── blobs ───────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("algorithm", ["sha256", "sha512", "blake3"])
def test_write_blob_round_trip(store: Store, algorithm: str) -> None:
    data = os.urandom(1000)
    digest = digest_of(data, algorithm)
    assert not store.has_blob(digest)
    assert store.blob_size(digest) is None
    assert store.write_blob(digest, data) is True
    path = store.root / "blobs" / algorithm / digest.hex
    assert store.blob_path(digest) == path
    assert path.read_bytes() == data
    assert store.has_blob(digest) and store.has_blob(digest, 1000)
    assert not store.has_blob(digest, 999)
    assert store.blob_size(digest) == 1000
    assert store.read_blob(digest, max_size=1000) == data
    assert os.listdir(store.root / "ingest") == []


def test_write_blob_is_idempotent(store: Store) -> None:
    data = b"config"
    digest = digest_of(data)
    assert store.write_blob(digest, data) is True
    mtime = store.blob_path(digest).stat().st_mtime_ns
    assert store.write_blob(digest, data) is False
    assert store.blob_path(digest).stat().st_mtime_ns == mtime


def test_write_blob_repairs_a_blob_of_the_wrong_size(store: Store) -> None:
    data = b"config"
    digest = digest_of(data)
    store.blob_path(digest).parent.mkdir(parents=True)
    store.blob_path(digest).write_bytes(b"trunc")
    assert store.write_blob(digest, data) is True
    assert store.blob_path(digest).read_bytes() == data


def test_write_blob_refuses_wrong_content(store: Store) -> None:
    digest = digest_of(b"expected")
    with pytest.raises(DigestMismatch, match=f"expected {digest}") as info:
        store.write_blob(digest, b"something else")
    assert info.value.actual == str(digest_of(b"something else"))
    assert blob_files(store.root) == []
    assert os.listdir(store.root / "ingest") == []


def test_read_blob_limits(store: Store) -> None:
    data = b"x" * 100
    digest = digest_of(data)
    with pytest.raises(StoreError, match=f"blob {digest} is not in store"):
        store.read_blob(digest, max_size=1000)
    store.write_blob(digest, data)
    with pytest.raises(StoreError, match="is 100 bytes, more than the 99 allowed"):
        store.read_blob(digest, max_size=99)


def test_error_for_names_the_store(store: Store) -> None:
    full = store.error_for(OSError(28, "No space left on device"))
    assert str(full) == f"no space left on device in store {store.root}"
    other = store.error_for(OSError(5, "Input/output error"), "write blob x")
    assert str(other) == f"cannot write blob x in store {store.root}: Input/output error"
    assert other.exit_code == 7


# ── ingest ──────────────────────────────────────────────────────────────────────────────


def test_ingest_commit(store: Store) -> None:
    data = os.urandom(300_000)
    digest = digest_of(data)
    with store.ingest(digest, len(data)) as ing:
        assert not ing.present
        assert ing.path == store.root / "ingest" / f"sha256-{digest.hex}.data"
        ing.preallocate()
        assert os.fstat(ing.fd).st_size == len(data)
        # Out of order, as chunks land.
        os.pwrite(ing.fd, data[150_000:], 150_000)
        os.pwrite(ing.fd, data[:150_000], 0)
        ing.commit(digest.hex)
        assert ing.committed
    assert store.blob_path(digest).read_bytes() == data
    assert os.listdir(store.root / "ingest") == []


def test_a_failed_journal_sync_is_a_store_error(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1000)
    digest = digest_of(data)
    with store.ingest(digest, len(data)) as ing:
        ing.preallocate()
        assert ing.journal_sync() is None
        ing.record(Extent(0, 10, xxhash.xxh3_128_hexdigest(bytes(10))))
        sync = ing.journal_sync()
        assert sync is not None

        def broken(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", broken)
        with pytest.raises(StoreError, match=f"sync sha256-{digest.hex}.journal in store"):
            sync()
        monkeypatch.undo()


def test_ingest_of_an_empty_blob(store: Store) -> None:
    digest = digest_of(b"")
    with store.ingest(digest, 0) as ing:
        ing.preallocate()
        ing.commit(digest.hex)
    assert store.has_blob(digest, 0)


def test_ingest_commit_with_wrong_digest(store: Store) -> None:
    data = b"layer bytes"
    digest = digest_of(data)
    with store.ingest(digest, len(data)) as ing:
        os.pwrite(ing.fd, b"other bytes", 0)
        with pytest.raises(DigestMismatch, match=f"expected {digest}"):
            ing.commit(digest_of(b"other bytes").hex)
        assert not ing.path.exists()
    assert blob_files(store.root) == []
    assert os.listdir(store.root / "ingest") == []


def test_ingest_commit_with_wrong_size(store: Store) -> None:
    data = b"layer bytes"
    digest = digest_of(data)
    with store.ingest(digest, len(data)) as ing:
        os.pwrite(ing.fd, data + b"extra", 0)
        with pytest.raises(DigestMismatch, match=f"is {len(data) + 5} bytes, expected 11"):
            ing.commit(digest.hex)
    assert blob_files(store.root) == []
    assert os.listdir(store.root / "ingest") == []


def test_ingest_without_commit_removes_the_data(store: Store) -> None:
    digest = digest_of(b"never finished")
    with pytest.raises(KeyboardInterrupt), store.ingest(digest, 14) as ing:
        os.pwrite(ing.fd, b"never", 0)
        assert ing.path.exists()
        raise KeyboardInterrupt
    assert os.listdir(store.root / "ingest") == []
    assert blob_files(store.root) == []


def _extent(data: bytes, start: int, end: int) -> Extent:
    return Extent(start, end, xxhash.xxh3_128_hexdigest(data[start:end]))


def test_ingest_keeps_journaled_data_for_the_next_ingest_to_resume(store: Store) -> None:
    data = os.urandom(200_000)
    digest = digest_of(data)
    first = _extent(data, 0, 80_000)
    with pytest.raises(KeyboardInterrupt), store.ingest(digest, len(data)) as ing:
        ing.preallocate()
        os.pwrite(ing.fd, data[:90_000], 0)  # the last 10 kB were never journaled
        ing.record_etag('"v1"')
        ing.record(first)
        raise KeyboardInterrupt
    assert sorted(os.listdir(store.root / "ingest")) == [
        f"sha256-{digest.hex}.data",
        f"sha256-{digest.hex}.journal",
    ]
    with store.ingest(digest, len(data)) as again:
        assert again.resumed == (first,)
        assert again.etag == '"v1"'
        again.preallocate()
        os.pwrite(again.fd, data[80_000:], 80_000)
        again.commit(digest.hex)
    assert store.blob_path(digest).read_bytes() == data
    assert os.listdir(store.root / "ingest") == []


def test_ingest_restart_forgets_the_journaled_ranges(store: Store) -> None:
    data = os.urandom(1000)
    digest = digest_of(data)
    with pytest.raises(KeyboardInterrupt), store.ingest(digest, len(data)) as ing:
        os.pwrite(ing.fd, data, 0)
        ing.record(_extent(data, 0, 500))
        ing.restart()
        raise KeyboardInterrupt
    assert os.listdir(store.root / "ingest") == []  # nothing vouched for: nothing kept
    with store.ingest(digest, len(data)) as again:
        assert again.resumed == ()
        assert os.fstat(again.fd).st_size == 0


def test_ingest_of_a_present_blob_drops_what_a_killed_run_left(store: Store) -> None:
    data = b"committed, but the run died before cleaning up"
    digest = digest_of(data)
    store.write_blob(digest, data)
    for suffix in (".data", ".journal"):
        (store.root / "ingest" / f"sha256-{digest.hex}{suffix}").write_bytes(b"left over")
    with store.ingest(digest, len(data)) as ing:
        assert ing.present
    assert os.listdir(store.root / "ingest") == []


def test_ingest_truncates_a_stale_data_file(store: Store) -> None:
    data = b"fresh"
    digest = digest_of(data)
    stale = store.root / "ingest" / f"sha256-{digest.hex}.data"
    stale.write_bytes(b"left behind by a crash, longer than the blob")
    with store.ingest(digest, len(data)) as ing:
        os.pwrite(ing.fd, data, 0)
        ing.commit(digest.hex)
    assert store.blob_path(digest).read_bytes() == data


def test_ingest_of_a_present_blob(store: Store) -> None:
    data = b"already here"
    digest = digest_of(data)
    store.write_blob(digest, data)
    with store.ingest(digest, len(data)) as ing:
        assert ing.present
        with pytest.raises(RuntimeError, match="not open"):
            _ = ing.fd
    assert os.listdir(store.root / "ingest") == []


def test_preallocate_reports_a_full_disk(store: Store) -> None:
    vfs = os.statvfs(store.root)
    size = vfs.f_bavail * vfs.f_frsize + (1 << 30)
    digest = digest_of(b"huge")
    with store.ingest(digest, size) as ing:
        try:
            ing.preallocate()
        except StoreError as exc:
            assert str(exc) == f"no space left on device in store {store.root} (need {size} bytes)"
        else:
            # File systems without fallocate get a sparse file, which cannot fail here.
            assert os.fstat(ing.fd).st_size == size


def test_nested_ingest_of_one_digest_fails_instead_of_hanging(store: Store) -> None:
    digest = digest_of(b"twice")
    with store.ingest(digest, 5), pytest.raises(RuntimeError, match="already ingesting"):
        store.ingest(digest, 5).__enter__()
    with store.ingest(digest, 5) as again:
        assert not again.present


def test_ingest_busy_sees_a_download_in_progress_and_creates_nothing(store: Store) -> None:
    digest = digest_of(b"busy")
    paths = IngestPaths.of(store.root, digest)
    assert not store.ingest_busy(digest)
    assert not paths.lock.exists()
    with store.ingest(digest, 4) as ing:
        assert ing.path == paths.data and ing.journal_path == paths.journal
        assert store.ingest_busy(digest)
        assert not store.ingest_busy(digest_of(b"other"))
    assert not store.ingest_busy(digest)
    assert os.listdir(store.root / "ingest") == []


def test_ingest_paths_name_one_digest_and_nothing_else(tmp_path: Path) -> None:
    digest = digest_of(b"x")
    paths = IngestPaths.of(tmp_path, digest)
    assert paths == IngestPaths.named(tmp_path, f"sha256-{digest.hex}")
    assert paths.lock == tmp_path / "ingest" / f"sha256-{digest.hex}.lock"
    temp = paths.new_temp()
    assert paths.owns(temp.name) and temp != paths.new_temp()
    assert ingest_name(temp.name) == paths.name == ingest_name(paths.journal.name)
    assert not paths.owns(f"sha256-{digest.hex}0.data")
    assert ingest_name("unrelated") is None
    for bad in ("../x", "sha256-XYZ", "sha256-ab/cd", ""):
        with pytest.raises(ValueError, match="not an ingest name"):
            IngestPaths.named(tmp_path, bad)


def _hold_ingest(root: str, data: bytes, locked: Any) -> None:
    store = Store.open(Path(root))
    digest = digest_of(data)
    with store.ingest(digest, len(data)) as ing:
        locked.set()
        time.sleep(0.5)
        os.pwrite(ing.fd, data, 0)
        ing.commit(digest.hex)


def test_second_ingest_waits_and_finds_the_blob(store: Store) -> None:
    data = os.urandom(4096)
    digest = digest_of(data)
    locked = SPAWN.Event()
    holder = SPAWN.Process(target=_hold_ingest, args=(str(store.root), data, locked))
    holder.start()
    try:
        assert locked.wait(30)
        start = time.monotonic()
        with store.ingest(digest, len(data)) as ing:
            waited = time.monotonic() - start
            assert ing.present
    finally:
        holder.join(30)
    assert holder.exitcode == 0
    assert waited > 0.2
    assert store.blob_path(digest).read_bytes() == data
    assert os.listdir(store.root / "ingest") == []


def _contend(root: str, digest: Digest, rounds: int) -> int:
    """Enter the same ingest repeatedly; count the times someone else was inside too."""
    store = Store.open(Path(root))
    marker = store.root / "inside"
    overlaps = 0
    for _ in range(rounds):
        with store.ingest(digest, 1):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                overlaps += 1
                continue
            time.sleep(0.001)
            marker.unlink()
    return overlaps


def test_ingest_lock_is_exclusive_although_lock_files_are_deleted(store: Store) -> None:
    # Each holder deletes the lock file on exit while others wait on it; without the
    # inode check in locks.lock_file, a waiter and a newcomer would both get in.
    digest = digest_of(b"contended")
    with ProcessPoolExecutor(6, mp_context=SPAWN) as pool:
        overlaps = list(pool.map(_contend, [str(store.root)] * 6, [digest] * 6, [60] * 6))
    assert overlaps == [0] * 6
    assert os.listdir(store.root / "ingest") == []


# ── index.json ──────────────────────────────────────────────────────────────────────────


def test_add_and_find_images(store: Store) -> None:
    first = put_manifest(store, b"m1")
    second = put_manifest(store, b"m2")
    store.add_image(first, "docker.io/library/debian:12")
    store.add_image(second, "docker.io/library/alpine:3", {"org.example": "yes"})
    found = store.find_image("docker.io/library/alpine:3")
    assert found == second
    assert found is not None
    assert found.annotations == {
        "org.example": "yes",
        REF_NAME_ANNOTATION: "docker.io/library/alpine:3",
    }
    assert store.find_image("docker.io/library/nope:1") is None
    assert [d.annotations[REF_NAME_ANNOTATION] for d in store.images()] == [
        "docker.io/library/debian:12",
        "docker.io/library/alpine:3",
    ]
    raw = (store.root / "index.json").read_bytes()
    assert raw.endswith(b"}\n") and b"\n" not in raw[:-1]


def test_add_image_replaces_the_same_name(store: Store) -> None:
    old = put_manifest(store, b"old")
    new = put_manifest(store, b"new")
    store.add_image(old, "r/x:1")
    store.add_image(old, "r/x:2")
    store.add_image(new, "r/x:1")
    assert store.find_image("r/x:1") == new
    assert [d.digest for d in store.images()] == [old.digest, new.digest]


def test_add_image_merges_annotations(store: Store) -> None:
    base = put_manifest(store)
    annotated = Descriptor(
        base.media_type,
        base.digest,
        base.size,
        annotations={"a": "descriptor", "b": "descriptor", REF_NAME_ANNOTATION: "ignored"},
    )
    store.add_image(annotated, "r/x:1", {"b": "argument"})
    assert raw_index(store.root)["manifests"][0]["annotations"] == {
        "a": "descriptor",
        "b": "argument",
        REF_NAME_ANNOTATION: "r/x:1",
    }


def test_add_image_requires_the_manifest_blob(store: Store) -> None:
    missing = Descriptor(MANIFEST_TYPE, digest_of(b"absent"), 6)
    with pytest.raises(StoreError, match="is not in the store"):
        store.add_image(missing, "r/x:1")
    assert raw_index(store.root)["manifests"] == []


def test_index_keeps_what_it_does_not_understand(store: Store) -> None:
    ours = put_manifest(store)
    foreign = [
        {
            "mediaType": MANIFEST_TYPE,
            "digest": "sha384:" + "a" * 96,
            "size": 10,
            "annotations": {REF_NAME_ANNOTATION: "other:tool"},
            "x-custom": [1, 2.5, None],
        },
        {"mediaType": "application/vnd.example", "digest": "nope", "size": -1},
    ]
    index = {
        "schemaVersion": 2,
        "manifests": foreign,
        "annotations": {"org.example": "top"},
        "x-extension": {"k": "v"},
    }
    (store.root / "index.json").write_bytes(orjson.dumps(index))
    assert store.images() == []
    assert store.find_image("other:tool") is None
    store.add_image(ours, "r/x:1")
    store.remove_image("r/x:2")
    after = raw_index(store.root)
    assert after["manifests"][:2] == foreign
    assert after["annotations"] == {"org.example": "top"}
    assert after["x-extension"] == {"k": "v"}
    assert "mediaType" not in after
    assert store.images() == [ours]


def test_remove_image(store: Store) -> None:
    manifest = put_manifest(store)
    store.add_image(manifest, "r/x:1")
    store.add_image(manifest, "r/x:2")
    removed = store.remove_image("r/x:1")
    assert removed == manifest
    assert removed is not None and removed.annotations[REF_NAME_ANNOTATION] == "r/x:1"
    assert store.remove_image("r/x:1") is None
    assert [d.annotations[REF_NAME_ANNOTATION] for d in store.images()] == ["r/x:2"]
    assert store.has_blob(manifest.digest)


# ── names of the platforms of a multi-platform image ──────────────────────────────────


@pytest.mark.parametrize(
    ("name", "platform", "expected"),
    [
        ("docker.io/library/app:1.0", "linux/arm64", "docker.io/library/app:1.0-linux-arm64"),
        ("docker.io/library/app:1.0", "linux/arm/v7", "docker.io/library/app:1.0-linux-arm-v7"),
        ("localhost:5000/a/b:latest", "linux/amd64", "localhost:5000/a/b:latest-linux-amd64"),
        (
            f"localhost:5000/app@sha256:{'a' * 64}",
            "linux/s390x",
            "localhost:5000/app:linux-s390x",
        ),
        (f"quay.io/x/y:2@sha256:{'b' * 64}", "windows/amd64", "quay.io/x/y:2-windows-amd64"),
        ("localhost:5000/app", "linux/ppc64le", "localhost:5000/app:linux-ppc64le"),
    ],
)
def test_platform_names(name: str, platform: str, expected: str) -> None:
    assert platform_name(name, Platform.parse(platform)) == expected


def test_platform_names_keep_to_the_grammar_whatever_a_registry_sends() -> None:
    odd = Platform("Linux OS", "arm/64", "-v8.x-")
    assert platform_name("r.io/a:1", odd) == "r.io/a:1-linux_os-arm_64-v8_x"
    assert platform_name("r.io/a:1", Platform("", "???", "")) == "r.io/a:1-unknown"


def _platform_manifests(store: Store) -> tuple[Descriptor, list[Descriptor]]:
    index = put_manifest(store, b'{"the":"index"}')
    index = Descriptor("application/vnd.oci.image.index.v1+json", index.digest, index.size)
    manifests = []
    for text in ("linux/amd64", "linux/arm64", "linux/arm/v7"):
        blob = put_manifest(store, text.encode())
        manifests.append(Descriptor(MANIFEST_TYPE, blob.digest, blob.size, Platform.parse(text)))
    return index, manifests


def test_each_platform_of_an_index_gets_an_entry_of_its_own(store: Store) -> None:
    index, manifests = _platform_manifests(store)
    annotations = {
        "io.fastpull.repo-digest": str(index.digest),
        "io.containerd.image.name": "r.io/app:1",
        "io.fastpull.source-manifest": str(manifests[0].digest),
    }
    unnamed = Descriptor(MANIFEST_TYPE, manifests[0].digest, manifests[0].size)
    store.add_image(index, "r.io/app:1", annotations, [*manifests, unnamed])

    entries = raw_index(store.root)["manifests"]
    assert [e["annotations"][REF_NAME_ANNOTATION] for e in entries] == [
        "r.io/app:1",
        "r.io/app:1-linux-amd64",
        "r.io/app:1-linux-arm64",
        "r.io/app:1-linux-arm-v7",
    ]
    assert entries[0]["digest"] == str(index.digest)
    assert entries[0]["annotations"] == {**annotations, REF_NAME_ANNOTATION: "r.io/app:1"}
    for entry, manifest in zip(entries[1:], manifests, strict=True):
        assert entry["digest"] == str(manifest.digest)
        assert entry["platform"]["architecture"] == manifest.platform.architecture
        assert entry["annotations"] == {
            "io.fastpull.repo-digest": str(index.digest),
            "io.containerd.image.name": entry["annotations"][REF_NAME_ANNOTATION],
            PLATFORM_OF_ANNOTATION: "r.io/app:1",
            REF_NAME_ANNOTATION: entry["annotations"][REF_NAME_ANNOTATION],
        }
    assert store.find_image("r.io/app:1-linux-arm64") == manifests[1]


def test_a_new_pull_of_the_name_replaces_its_platform_entries(store: Store) -> None:
    index, manifests = _platform_manifests(store)
    store.add_image(index, "r.io/app:1", platforms=manifests)
    store.add_image(index, "r.io/other:1", platforms=manifests[:1])
    store.add_image(index, "r.io/app:1", platforms=manifests[1:2])
    names = [d.annotations[REF_NAME_ANNOTATION] for d in store.images()]
    assert sorted(names) == [
        "r.io/app:1",
        "r.io/app:1-linux-arm64",
        "r.io/other:1",
        "r.io/other:1-linux-amd64",
    ]
    # A single-platform pull of the name leaves it no platform names.
    store.add_image(manifests[0], "r.io/app:1")
    names = [d.annotations[REF_NAME_ANNOTATION] for d in store.images()]
    assert sorted(names) == ["r.io/app:1", "r.io/other:1", "r.io/other:1-linux-amd64"]


def test_a_platform_entry_needs_its_manifest_in_the_store(store: Store) -> None:
    index, manifests = _platform_manifests(store)
    missing = Descriptor(MANIFEST_TYPE, digest_of(b"absent"), 6, Platform.parse("linux/386"))
    with pytest.raises(StoreError, match=re.escape("r.io/app:1-linux-386")):
        store.add_image(index, "r.io/app:1", platforms=[*manifests, missing])
    assert store.images() == []


def test_remove_image_takes_the_platform_names_along(store: Store) -> None:
    index, manifests = _platform_manifests(store)
    store.add_image(index, "r.io/app:1", platforms=manifests)
    store.add_image(index, "r.io/app:2", platforms=manifests)
    assert store.remove_image("r.io/app:1-linux-arm64") == manifests[1]
    assert store.remove_image("r.io/app:1") == index
    names = [d.annotations[REF_NAME_ANNOTATION] for d in store.images()]
    assert names == [
        "r.io/app:2",
        "r.io/app:2-linux-amd64",
        "r.io/app:2-linux-arm64",
        "r.io/app:2-linux-arm-v7",
    ]


def _add_many(root: str, worker: int, count: int, descriptor: Descriptor) -> None:
    store = Store.open(Path(root))
    for n in range(count):
        store.add_image(descriptor, f"example.com/w{worker}/image:{n}")


def test_concurrent_add_image_loses_nothing(store: Store) -> None:
    manifest = put_manifest(store)
    workers, count = 8, 20
    procs = [
        SPAWN.Process(target=_add_many, args=(str(store.root), w, count, manifest))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        assert isinstance(raw_index(store.root)["manifests"], list)
        reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    names = [d.annotations[REF_NAME_ANNOTATION] for d in store.images()]
    expected = {f"example.com/w{w}/image:{n}" for w in range(workers) for n in range(count)}
    assert len(names) == workers * count
    assert set(names) == expected
    assert reads > 0


def _churn(root: str, ready: Any) -> None:
    """Write blobs, ingests and index entries forever, until killed."""
    store = Store.open(Path(root))
    ready.set()
    rng = random.Random(os.getpid())
    n = 0
    while True:
        n += 1
        body = orjson.dumps({"n": n, "pid": os.getpid()})
        manifest = Descriptor(MANIFEST_TYPE, digest_of(body), len(body))
        store.write_blob(manifest.digest, body)
        store.add_image(manifest, f"example.com/churn:{rng.randrange(10)}")
        layer = rng.randbytes(rng.randrange(1, 1 << 20))
        digest = digest_of(layer)
        with store.ingest(digest, len(layer)) as ing:
            ing.preallocate()
            for offset in range(0, len(layer), 1 << 16):
                os.pwrite(ing.fd, layer[offset : offset + (1 << 16)], offset)
            ing.commit(digest.hex)


def test_kill_9_leaves_a_consistent_store(store: Store) -> None:
    rng = random.Random(1234)
    for _ in range(6):
        ready = SPAWN.Event()
        child = SPAWN.Process(target=_churn, args=(str(store.root), ready))
        child.start()
        assert ready.wait(30)
        time.sleep(rng.uniform(0.05, 0.4))
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        Store.open(store.root)
        for path in blob_files(store.root):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        for image in store.images():
            assert store.has_blob(image.digest, image.size)
    assert len(store.images()) > 0
    # Whatever a killed ingest left behind does not stop the next one.
    data = b"after the crashes"
    digest = digest_of(data)
    with store.ingest(digest, len(data)) as ing:
        os.pwrite(ing.fd, data, 0)
        ing.commit(digest.hex)


# ── interoperability with skopeo and umoci ──────────────────────────────────────────────


def build_image(store: Store) -> tuple[Descriptor, bytes]:
    """A minimal valid image with one gzipped layer holding ``hello.txt``."""
    content = b"hello from fastpull\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mode, info.mtime = len(content), 0o644, 0
        tar.addfile(info, io.BytesIO(content))
    layer_tar = buffer.getvalue()
    layer = gzip.compress(layer_tar, mtime=0)
    config = orjson.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [str(digest_of(layer_tar))]},
        }
    )
    manifest = orjson.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": str(digest_of(config)),
                "size": len(config),
            },
            "layers": [
                {"mediaType": LAYER_TYPE, "digest": str(digest_of(layer)), "size": len(layer)}
            ],
        }
    )
    for blob in (layer, config, manifest):
        store.write_blob(digest_of(blob), blob)
    return Descriptor(MANIFEST_TYPE, digest_of(manifest), len(manifest)), manifest


def run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


def test_skopeo_reads_the_store(store: Store) -> None:
    skopeo = require_tool("skopeo")
    descriptor, manifest = build_image(store)
    ref = "docker.io/library/test:1.0"
    store.add_image(descriptor, ref)
    # skopeo splits oci:<dir>:<name> at the first colon after "oci:", so the full
    # normalized reference works as the name as long as the store path has no colon.
    shown = run(skopeo, "inspect", "--raw", f"oci:{store.root}:{ref}")
    assert orjson.loads(shown.stdout) == orjson.loads(manifest)


def test_umoci_unpacks_the_store(store: Store, tmp_path: Path) -> None:
    umoci = require_tool("umoci")
    descriptor, _ = build_image(store)
    ref = "docker.io/library/test:1.0"
    store.add_image(descriptor, ref)
    bundle = tmp_path / "bundle"
    run(umoci, "unpack", "--rootless", "--image", f"{store.root}:{ref}", str(bundle))
    assert (bundle / "rootfs" / "hello.txt").read_bytes() == b"hello from fastpull\n"


def test_entries_written_by_skopeo_survive(store: Store, tmp_path: Path) -> None:
    skopeo = require_tool("skopeo")
    descriptor, _ = build_image(store)
    store.add_image(descriptor, "docker.io/library/test:1.0")
    run(
        skopeo,
        "copy",
        "--quiet",
        f"oci:{store.root}:docker.io/library/test:1.0",
        f"oci:{store.root}:example.com/copy:2",
    )
    other = tmp_path / "skopeo-layout"
    run(skopeo, "copy", "--quiet", f"oci:{store.root}:docker.io/library/test:1.0", f"oci:{other}:x")
    store.add_image(descriptor, "docker.io/library/test:1.1")
    names = [d.annotations[REF_NAME_ANNOTATION] for d in store.images()]
    assert names == [
        "docker.io/library/test:1.0",
        "example.com/copy:2",
        "docker.io/library/test:1.1",
    ]
    # A layout skopeo created from scratch opens and takes new names too.
    theirs = Store.open(other)
    assert theirs.find_image("x") == descriptor
    theirs.add_image(descriptor, "y")
    run(skopeo, "inspect", "--raw", f"oci:{other}:x")
    run(skopeo, "inspect", "--raw", f"oci:{other}:y")


def test_blobs_are_durable_before_index_json_names_them(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # publish() leaves the directory sync to add_image, once for every blob of the image:
    # each blob's bytes are fsynced before its rename, and every rename into blobs/ is
    # fsynced (its directory) before index.json is replaced.
    calls = record_disk_calls(monkeypatch)
    layers = [os.urandom(5000 + i) for i in range(3)]
    for data in layers:
        digest = digest_of(data)
        with store.ingest(digest, len(data)) as ing:
            os.pwrite(ing.fd, data, 0)
            ing.commit(digest.hex)
    manifest = put_manifest(store)
    store.add_image(manifest, "example.com/app:1")
    blob_dir = str(store.root / "blobs" / "sha256")
    index = str(store.root / "index.json")
    renames = [i for i, (call, path) in enumerate(calls) if call == "rename"]
    into_blobs = [i for i in renames if calls[i][1].startswith(blob_dir + "/")]
    assert len(into_blobs) == 4
    for previous, i in zip([-1, *into_blobs], into_blobs, strict=False):
        # The file renamed was fsynced (under its ingest name) since the rename before.
        synced = [path for call, path in calls[previous + 1 : i] if call == "fsync"]
        assert any("/ingest/" in path for path in synced)
    (index_write,) = [i for i in renames if calls[i][1] == index]
    dir_syncs = [i for i, c in enumerate(calls) if c == ("fsync", blob_dir)]
    assert any(max(into_blobs) < i < index_write for i in dir_syncs)
    # One directory sync for the whole image, not one per blob.
    assert len(dir_syncs) == 1
    # index.json itself: fsynced temp file (meanwhile: the blobs' directory), rename, then
    # the root directory.
    before = [path for call, path in calls[max(into_blobs) + 1 : index_write] if call == "fsync"]
    assert len(before) == 2 and blob_dir in before
    assert any(Path(path).name.startswith(".index.json.") for path in before)
    assert calls[index_write + 1] == ("fsync", str(store.root))


def test_a_new_ingest_journal_is_not_synced_but_one_with_records_is(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A header-only journal vouches for nothing, so losing it costs nothing: no fsync
    # before the first byte. Rewriting one that holds records (resume) still syncs it.
    data = os.urandom(4096)
    digest = digest_of(data)
    calls = record_disk_calls(monkeypatch)
    with store.ingest(digest, len(data)) as ing:
        ing.preallocate()
        assert not [c for c in calls if c[0] == "fsync"]
        os.pwrite(ing.fd, data[:1000], 0)
        ing.record(Extent(0, 1000, xxhash.xxh3_128_hexdigest(data[:1000])))
    calls.clear()
    with store.ingest(digest, len(data)) as ing:
        assert [e.end for e in ing.resumed] == [1000]
        journal_temp = str(ing.journal_path) + ".tmp"
        assert ("fsync", journal_temp) in calls


def test_index_json_is_not_changed_when_the_blobs_cannot_be_made_durable(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = put_manifest(store)
    before = (store.root / "index.json").read_bytes()
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/blobs/sha256"):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreError, match=r"update index\.json in store .*Input/output error"):
        store.add_image(manifest, "example.com/app:1")
    assert (store.root / "index.json").read_bytes() == before
    assert not [n for n in os.listdir(store.root) if n.startswith(".index.json.")]


def test_several_images_are_named_in_one_rewrite_after_their_blobs_are_durable(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_image(put_manifest(store, b'{"old":1}'), "example.com/old:1")
    calls = record_disk_calls(monkeypatch)
    manifests = [put_manifest(store, b'{"n":%d}' % n) for n in range(3)]
    names = [
        ImageName(m, f"example.com/{n}:1", {"k": n}) for n, m in zip("abc", manifests, strict=True)
    ]

    store.add_images(names)

    blob_dir = str(store.root / "blobs" / "sha256")
    index = str(store.root / "index.json")
    into_blobs = [i for i, c in enumerate(calls) if c[0] == "rename" and blob_dir in c[1]]
    (index_write,) = [i for i, c in enumerate(calls) if c == ("rename", index)]
    (dir_sync,) = [i for i, c in enumerate(calls) if c == ("fsync", blob_dir)]
    assert max(into_blobs) < dir_sync < index_write
    # The earlier name stays; the new ones come in the order given, replacing none.
    assert [
        (e["annotations"][REF_NAME_ANNOTATION], e["digest"]) for e in store.index_entries()
    ] == [
        ("example.com/old:1", str(digest_of(b'{"old":1}'))),
        *((n.ref_name, str(n.descriptor.digest)) for n in names),
    ]
    assert store.index_entries()[2]["annotations"]["k"] == "b"


def test_a_later_name_in_one_rewrite_replaces_an_earlier_one(store: Store) -> None:
    first, second = put_manifest(store, b'{"v":1}'), put_manifest(store, b'{"v":2}')
    store.add_images(
        [ImageName(first, "example.com/a:1", {}), ImageName(second, "example.com/a:1", {})]
    )
    assert [e["digest"] for e in store.index_entries()] == [str(second.digest)]


def test_naming_images_together_is_all_or_nothing(store: Store) -> None:
    store.add_image(put_manifest(store), "example.com/kept:1")
    before = (store.root / "index.json").read_bytes()
    present = put_manifest(store, b'{"here":1}')
    absent = Descriptor(MANIFEST_TYPE, digest_of(b"absent"), 6)
    with pytest.raises(StoreError, match=r"cannot name example\.com/gone:1 .* not in the store"):
        store.add_images(
            [
                ImageName(present, "example.com/here:1", {}),
                ImageName(absent, "example.com/gone:1", {}),
            ]
        )
    assert (store.root / "index.json").read_bytes() == before
