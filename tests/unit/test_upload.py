"""The pure parts of pushing: upload URLs and headers, scopes, destinations, blob holders."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpull.batchfile import BatchEntry, parse_batch
from fastpull.errors import BatchFileError, UsageError
from fastpull.mirror import destination, entry_destination
from fastpull.pusher import BlobHolders
from fastpull.reference import Reference
from fastpull.registry.upload import parse_range_end, push_scope, with_digest
from fastpull.types import Digest

DIGEST = Digest("sha256", "a" * 64)


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


def test_a_claimed_blob_makes_the_next_claimer_wait_until_release() -> None:
    holders = BlobHolders()
    assert holders.claim(DIGEST) is None
    busy = holders.claim(DIGEST)
    assert busy is not None and not busy.is_set()
    releaser = threading.Thread(target=holders.release, args=(DIGEST,))
    releaser.start()
    assert busy.wait(5)
    releaser.join()
    assert holders.claim(DIGEST) is None
