"""Tests for fastpull.batchfile: both formats, and errors that name the line or entry."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpull.batchfile import parse_batch
from fastpull.errors import BatchFileError, UsageError
from fastpull.reference import Reference
from fastpull.types import Platform, PlatformSelection

NAMES = st.lists(
    st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9]{1,8})?(:[a-z0-9][a-z0-9.-]{0,8})?", fullmatch=True),
    max_size=8,
)


def test_plain_text_skips_comments_and_blank_lines() -> None:
    text = "# mirror list\n\ndebian:12\n  alpine   # pinned below\nlocalhost:5000/app@sha256:" + (
        "a" * 64 + "\n"
    )
    entries = parse_batch(text, "list.txt")
    assert [str(e.reference) for e in entries] == [
        "docker.io/library/debian:12",
        "docker.io/library/alpine:latest",
        f"localhost:5000/app@sha256:{'a' * 64}",
    ]
    assert [e.origin for e in entries] == ["list.txt:3", "list.txt:4", "list.txt:5"]
    assert [e.default_tag for e in entries] == [False, True, False]


def test_a_hash_inside_a_word_is_not_a_comment() -> None:
    with pytest.raises(BatchFileError, match=r"^f:1: invalid reference format"):
        parse_batch("debian#12\n", "f")


def test_json_entries_with_every_option() -> None:
    document = {
        "images": [
            "debian",
            {"image": "alpine:3", "platforms": ["linux/amd64", "aarch64"], "store": "/srv/s"},
            {"image": "localhost:5000/app", "all_tags": True, "tags": r"v1\..*"},
            {"image": "busybox", "platforms": "all"},
        ]
    }
    entries = parse_batch(orjson.dumps(document).decode(), "b.json")
    assert [e.origin for e in entries] == [f"b.json: entry {i}" for i in range(1, 5)]
    assert entries[0].platforms is None and entries[0].default_tag
    assert entries[1].platforms == PlatformSelection(
        (Platform("linux", "amd64"), Platform("linux", "arm64"))
    )
    assert entries[1].store == "/srv/s"
    assert entries[2].all_tags and not entries[2].default_tag
    assert entries[2].wants_tag("v1.2")
    assert not entries[2].wants_tag("v10")
    assert not entries[2].wants_tag("xv1.2")
    assert entries[3].platforms == PlatformSelection(every=True)


def test_a_bare_json_list_works_too() -> None:
    assert [str(e.reference) for e in parse_batch('  ["a", "b:1"]', "-")] == [
        "docker.io/library/a:latest",
        "docker.io/library/b:1",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[\n  "a",\n  "b"\n  "c"]', r"^f:4:3: invalid JSON"),
        ('{"image": ["a"]}', r"^f: unknown top-level key 'image'"),
        ('{"images": "a"}', r"^f: 'images' must be a list"),
        ("{}", r"^f: 'images' must be a list"),
        ('["a", 3]', r"^f: entry 2: expected a reference"),
        ('["a", {"platforms": "all"}]', r"^f: entry 2: 'image' is required"),
        ('[{"image": "a", "tag": "1"}]', r"^f: entry 1: unknown key 'tag'"),
        ('[{"image": "A"}]', r"^f: entry 1: invalid reference format"),
        ('[{"image": "a", "all_tags": "yes"}]', r"^f: entry 1: 'all_tags' must be a boolean"),
        ('[{"image": "a:1", "all_tags": true}]', r"^f: entry 1: tag can't be used"),
        ('[{"image": "a", "tags": "v.*"}]', r"^f: entry 1: 'tags' selects among all tags"),
        ('[{"image": "a", "all_tags": true, "tags": "("}]', r"^f: entry 1: 'tags' is not a valid"),
        ('[{"image": "a", "platforms": []}]', r"^f: entry 1: 'platforms' must be"),
        ('[{"image": "a", "platforms": ["linux/"]}]', r"^f: entry 1: invalid platform"),
        ('[{"image": "a", "store": " "}]', r"^f: entry 1: 'store' is empty"),
        ("ok\n\n  bad name\n", r"^f:3: invalid reference format"),
    ],
)
def test_errors_name_the_line_or_entry(text: str, message: str) -> None:
    with pytest.raises(BatchFileError, match=message):
        parse_batch(text, "f")


def test_stdin_is_named_in_messages() -> None:
    with pytest.raises(BatchFileError, match=r"^<stdin>:1: "):
        parse_batch("Nope\n", "-")


@given(NAMES, st.lists(st.sampled_from(["", "# note", "   "]), max_size=8))
def test_plain_text_and_json_agree(names: list[str], noise: list[str]) -> None:
    lines = names + noise
    plain = parse_batch("\n".join(lines), "f")
    as_json = parse_batch(orjson.dumps(names).decode(), "f")
    assert [e.reference for e in plain] == [Reference.parse(n) for n in names]
    assert [e.reference for e in as_json] == [e.reference for e in plain]
    assert [e.default_tag for e in as_json] == [e.default_tag for e in plain]


@given(st.text(max_size=200))
def test_any_text_parses_or_fails_with_a_batch_file_error(text: str) -> None:
    try:
        entries = parse_batch(text, "f")
    except BatchFileError as exc:
        assert str(exc).startswith("f")
    else:
        assert all(e.origin.startswith("f") for e in entries)


@given(st.lists(st.integers(0, 30), min_size=1, max_size=5))
def test_the_first_bad_line_is_reported(bad_lines: list[int]) -> None:
    lines = ["debian"] * 31
    for number in bad_lines:
        lines[number] = "Bad Reference"
    with pytest.raises(BatchFileError, match=rf"^f:{min(bad_lines) + 1}: "):
        parse_batch("\n".join(lines), "f")


def test_platform_lists_for_the_command_line() -> None:
    assert PlatformSelection.parse("ALL") == PlatformSelection(every=True)
    both = PlatformSelection.parse("linux/amd64, aarch64,linux/arm64/v8")
    assert both.platforms == (Platform("linux", "amd64"), Platform("linux", "arm64"))
    assert both.multiple and not PlatformSelection.parse("linux/amd64").multiple
    assert str(both) == "linux/amd64,linux/arm64"
    with pytest.raises(UsageError, match="empty entry"):
        PlatformSelection.parse("linux/amd64,")
