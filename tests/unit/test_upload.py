"""The pure parts of pushing: upload URLs and headers, scopes, destinations, blob holders;
and how an upload body reads a blob that is still downloading."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pycurl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpull.batchfile import BatchEntry, parse_batch
from fastpull.errors import BatchFileError, StoreError, UsageError
from fastpull.mirror import destination, entry_destination
from fastpull.pusher import BlobHolders
from fastpull.reference import Reference
from fastpull.registry.upload import (
    GrowingBlob,
    _GrowingBody,
    parse_range_end,
    push_scope,
    with_digest,
)
from fastpull.types import Digest

DIGEST = Digest("sha256", "a" * 64)
OTHER = Digest("sha256", "b" * 64)


def test_digest_joins_the_query_the_registry_signed() -> None:
    signed = "http://r:5000/v2/app/blobs/uploads/u1?_state=abc%3D%3D"
    assert with_digest(signed, DIGEST) == f"{signed}&digest=sha256:{'a' * 64}"
    bare = "http://r:5000/v2/app/blobs/uploads/u1"
    assert with_digest(bare, DIGEST) == f"{bare}?digest=sha256:{'a' * 64}"


@given(st.integers(min_value=0, max_value=1 << 50))
def test_range_end_reads_what_the_registry_writes(end: int) -> None:
    assert parse_range_end(f"0-{end}") == end
    assert parse_range_end(f"bytes=0-{end}") == end


@given(st.text(max_size=40))
def test_range_end_never_raises(text: str) -> None:
    found = parse_range_end(text)
    assert found is None or (found >= 0 and text.strip().endswith(str(found)))


@pytest.mark.parametrize("value", [None, "", "5-10", "0-", "-4", "0-x", "0 - 4"])
def test_range_end_refuses_what_is_not_a_prefix(value: str | None) -> None:
    assert parse_range_end(value) is None


def test_push_scopes_add_pull_on_the_mount_source() -> None:
    assert push_scope("a/b") == "repository:a/b:pull,push"
    assert push_scope("a/b", "c") == "repository:a/b:pull,push repository:c:pull"
    assert push_scope("a/b", "a/b") == "repository:a/b:pull,push"


def test_destination_keeps_the_repository_path_and_tag() -> None:
    source = Reference.parse("debian:12")
    assert str(destination(source, "localhost:5000/mirror")) == (
        "localhost:5000/mirror/library/debian:12"
    )
    assert str(destination(source, "localhost:5000/")) == "localhost:5000/library/debian:12"
    pinned = Reference.parse(f"quay.io/a/b@sha256:{'b' * 64}")
    assert str(destination(pinned, "r.example")) == f"r.example/a/b@sha256:{'b' * 64}"


@pytest.mark.parametrize("to", ["mirror", "mirror/sub", "", "/"])
def test_destination_must_name_a_registry(to: str) -> None:
    with pytest.raises(UsageError):
        destination(Reference.parse("debian:12"), to)


def test_an_entry_to_names_a_repository_or_with_a_tag_the_image() -> None:
    source = Reference.parse("registry.example/app:2")
    repo = BatchEntry(source, "f:1", to="localhost:5000/other")
    assert str(entry_destination(repo, source, None)) == "localhost:5000/other:2"
    image = BatchEntry(source, "f:1", to="localhost:5000/other:stable")
    assert str(entry_destination(image, source, None)) == "localhost:5000/other:stable"
    with pytest.raises(UsageError, match="no destination"):
        entry_destination(BatchEntry(source, "f:1"), source, None)


def test_batch_entries_take_a_to_that_must_be_a_reference() -> None:
    entries = parse_batch('[{"image": "app:1", "to": "localhost:5000/x"}]', "f.json")
    assert entries[0].to == "localhost:5000/x"
    with pytest.raises(BatchFileError, match="entry 1"):
        parse_batch('[{"image": "app:1", "to": "Not A Ref"}]', "f.json")
    with pytest.raises(BatchFileError, match="'to' must be a string"):
        parse_batch('[{"image": "app:1", "to": 3}]', "f.json")


def test_holders_put_known_repositories_before_guesses() -> None:
    holders = BlobHolders()
    holders.guess(DIGEST, "guessed")
    holders.add(DIGEST, "seen")
    holders.add(DIGEST, "seen")
    assert holders.sources(DIGEST, "target") == ["seen", "guessed"]
    assert holders.sources(DIGEST, "seen") == ["guessed"]
    assert holders.holds(DIGEST, "seen") and not holders.holds(DIGEST, "guessed")


def test_a_blob_being_placed_puts_the_next_aside_until_it_ends() -> None:
    holders = BlobHolders()
    later: list[str] = []
    assert not holders.begun(DIGEST)
    assert holders.begin(DIGEST, lambda: later.append("first")) is True
    assert holders.begun(DIGEST)
    assert holders.begin(DIGEST, lambda: later.append("second")) is None
    assert holders.begin(DIGEST, lambda: later.append("third")) is None
    assert later == []
    holders.end(DIGEST)
    assert later == ["second", "third"]
    assert not holders.begun(DIGEST)
    # Nobody holds it yet (the placement failed): the next to come places it.
    assert holders.begin(DIGEST, lambda: later.append("fourth")) is True
    holders.add(DIGEST, "placed")
    holders.end(DIGEST)
    assert later == ["second", "third"]


def test_a_placement_waits_for_the_question_in_flight_instead_of_asking_again() -> None:
    holders = BlobHolders()
    assert holders.ask_first(DIGEST)
    assert holders.start_asking(DIGEST)
    waited: list[str] = []
    placement = threading.Thread(
        target=lambda: (holders.await_answer(DIGEST), waited.append("answered"))
    )
    placement.start()
    placement.join(0.2)
    assert placement.is_alive() and waited == []  # the HEAD is still out
    holders.lacks(DIGEST, "target")
    holders.answered(DIGEST)
    placement.join(5)
    assert waited == ["answered"] and holders.lacking(DIGEST, "target")
    holders.await_answer(DIGEST)  # nothing in flight: no wait


def test_no_question_goes_once_the_placement_has_begun() -> None:
    holders = BlobHolders()
    assert holders.begin(DIGEST, lambda: None) is True
    assert not holders.start_asking(DIGEST)
    holders.await_answer(DIGEST)  # none in flight


def test_a_blob_a_repository_holds_is_mounted_by_many_at_once() -> None:
    holders = BlobHolders()
    holders.add(DIGEST, "placed")
    assert holders.begin(DIGEST, lambda: None) is False
    assert holders.begin(DIGEST, lambda: None) is False
    holders.guess(OTHER, "maybe")
    assert holders.begin(OTHER, lambda: None) is True


# -- a blob read while it downloads ------------------------------------------------------------


def _read_all(body: _GrowingBody, out: list[bytes | int]) -> None:
    while True:
        piece = body.read(1000)
        out.append(piece)
        if not isinstance(piece, bytes) or not piece:
            return


def test_a_growing_body_reads_only_final_bytes_and_waits_for_the_rest(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    path = tmp_path / "ingest.data"
    # Preallocated as the engine does: bytes not written yet read as zeros.
    path.write_bytes(b"\0" * len(data))
    growing = GrowingBlob(path, len(data), tmp_path / "stored")
    body = _GrowingBody(growing, 0, len(data), None)
    pieces: list[bytes | int] = []
    reader = threading.Thread(target=_read_all, args=(body, pieces))
    reader.start()
    with path.open("r+b") as fh:
        for end in (1, 999, 4096, 7000, len(data)):
            start = fh.tell()
            fh.write(data[start:end])
            fh.flush()
            growing.grew(path, end)
    reader.join(10)
    body.close()

    assert not reader.is_alive()
    assert body.error is None
    assert b"".join(p for p in pieces if isinstance(p, bytes)) == data
    assert body.read_bytes == len(data)


def test_a_restart_or_a_failed_download_aborts_the_body(tmp_path: Path) -> None:
    path = tmp_path / "ingest.data"
    path.write_bytes(b"x" * 5000)
    for stop in ("restart", "fail"):
        growing = GrowingBlob(path, 5000, tmp_path / "stored")
        growing.grew(path, 2000)
        body = _GrowingBody(growing, 0, 5000, None)
        pieces: list[bytes | int] = []
        reader = threading.Thread(target=_read_all, args=(body, pieces))
        reader.start()
        deadline = time.monotonic() + 10
        while body.read_bytes < 2000 and time.monotonic() < deadline:
            time.sleep(0.001)  # what is final is read before the download stops
        if stop == "restart":
            growing.grew(path, 0)
        else:
            growing.fail(StoreError("the download failed"))
        reader.join(10)
        body.close()

        assert not reader.is_alive()
        assert pieces[-1] == pycurl.READFUNC_ABORT
        assert b"".join(p for p in pieces if isinstance(p, bytes)) == b"x" * 2000
        expected = "started again" if stop == "restart" else "the download failed"
        assert expected in str(body.error)


def test_a_growing_blob_committed_meanwhile_is_read_from_the_store(tmp_path: Path) -> None:
    stored = tmp_path / "stored"
    stored.write_bytes(b"committed")
    growing = GrowingBlob(tmp_path / "renamed-away.data", 9, stored)
    growing.grew(tmp_path / "renamed-away.data", 9)
    body = _GrowingBody(growing, 0, 9, None)
    try:
        assert body.read(100) == b"committed"
    finally:
        body.close()
