"""Tests for what the store offers gc, rmi, verify and df (fastpull.store.gc): listing and deleting
blobs, stale downloads under ingest/, and the store-wide lock that keeps gc away from running
pulls."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fastpull.errors import StoreError
from fastpull.puller import Puller
from fastpull.store.gc import delete_blob, ingests, remove_ingest, stored_blobs
from fastpull.store.layout import Store
from fastpull.types import Digest


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def test_stored_blobs_and_strays(store: Store) -> None:
    a, b = b"first", b"second blob"
    store.write_blob(digest_of(a), a)
    store.write_blob(digest_of(b), b)
    (store.root / "blobs" / "sha384").mkdir()
    (store.root / "blobs" / "sha256" / "not-a-digest").write_bytes(b"?")

    blobs, strays = stored_blobs(store)

    assert sorted((blob.digest, blob.size) for blob in blobs) == sorted(
        [(digest_of(a), 5), (digest_of(b), 11)]
    )
    assert sorted(strays) == [
        store.root / "blobs" / "sha256" / "not-a-digest",
        store.root / "blobs" / "sha384",
    ]


def test_delete_blob_only_deletes_the_file_it_was_shown(store: Store) -> None:
    data = b"content"
    d = digest_of(data)
    store.write_blob(d, data)
    (seen,), _ = stored_blobs(store)
    # A pull replaces it (a new file, by rename) after it was looked at.
    replacement = store.root / "ingest" / "replacement"
    replacement.write_bytes(data)
    os.replace(replacement, store.blob_path(d))

    assert delete_blob(store, d, seen.stat) is None
    assert store.blob_path(d).read_bytes() == data
    assert delete_blob(store, d) == len(data)
    assert not store.blob_path(d).exists()
    assert delete_blob(store, d) is None


def test_ingests_tell_running_downloads_from_debris(store: Store) -> None:
    ingest = store.root / "ingest"
    (ingest / "sha256-aaaa.data").write_bytes(b"12345")
    (ingest / "sha256-aaaa.journal").write_bytes(b"{}")
    (ingest / "sha256-bbbb.data").write_bytes(b"123")
    (ingest / "sha256-bbbb.lock").touch()
    (ingest / "unrelated").write_bytes(b"left alone")
    running = digest_of(b"running")

    with store.ingest(running, 100) as live:
        os.pwrite(live.fd, b"x" * 10, 0)
        journal = live.journal_path.stat().st_size
        found = {i.name: (i.size, i.live) for i in ingests(store)}

    assert found == {
        "sha256-aaaa": (7, False),
        "sha256-bbbb": (3, False),
        f"sha256-{running.hex}": (10 + journal, True),
    }


def test_remove_ingest_deletes_debris_and_spares_live_downloads(store: Store) -> None:
    ingest = store.root / "ingest"
    (ingest / "sha256-aaaa.data").write_bytes(b"12345")
    (ingest / "sha256-aaaa.journal").write_bytes(b"{}")
    (ingest / "sha256-aaaa.lock").touch()
    (ingest / "sha256-aaaa0.data").write_bytes(b"another digest")
    (ingest / "sha256-cccc.data").write_bytes(b"no lock file")
    running = digest_of(b"running")
    name = f"sha256-{running.hex}"

    with store.ingest(running, 100) as live:
        os.pwrite(live.fd, b"x" * 10, 0)
        assert remove_ingest(store, name) is None
        assert live.path.exists()
        assert (ingest / f"{name}.lock").exists()

    assert remove_ingest(store, "sha256-aaaa") == 7
    assert remove_ingest(store, "sha256-cccc") == 12
    assert sorted(p.name for p in ingest.iterdir()) == ["sha256-aaaa0.data"]
    with pytest.raises(ValueError):
        remove_ingest(store, "../x")


def test_an_ingest_starting_during_gc_gets_a_lock_of_its_own(store: Store) -> None:
    # gc deletes the lock file it took; an ingest of that digest afterwards must still work.
    d = digest_of(b"later")
    (store.root / "ingest" / f"sha256-{d.hex}.data").write_bytes(b"old")
    assert remove_ingest(store, f"sha256-{d.hex}") == 3

    with store.ingest(d, 5) as ingest:
        os.pwrite(ingest.fd, b"later", 0)
        ingest.commit(d.hex)

    assert store.blob_path(d).read_bytes() == b"later"


def test_exclusive_use_waits_for_shared_use_then_gives_up(store: Store) -> None:
    waited: list[bool] = []

    with (
        store.shared_use(),
        store.shared_use(),
        pytest.raises(StoreError, match=r"still in use by another fastpull process"),
        store.exclusive_use(0.05, lambda: waited.append(True)),
    ):
        pytest.fail("exclusive use while a pull holds the store")
    with store.exclusive_use(0.05, lambda: waited.append(False)):
        pass

    assert waited == [True]


def test_a_puller_holds_the_store_until_closed(store: Store) -> None:
    puller = Puller(store)
    try:
        with pytest.raises(StoreError), store.exclusive_use(0.05):
            pass
    finally:
        puller.close()
    with store.exclusive_use(0.05):
        pass
