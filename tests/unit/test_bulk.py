"""A batch's per-image record and its tag selection, without a registry or a store."""

from __future__ import annotations

import re

import pytest

from fastpull import events
from fastpull.batchfile import BatchEntry
from fastpull.bulk import ImageOutcome, _Image, selected_tags
from fastpull.errors import NotFound, UsageError
from fastpull.reference import Reference
from fastpull.types import Platform, PlatformSelection

ARM = PlatformSelection((Platform.parse("linux/arm64"),))


def _entry(text: str, **fields: object) -> BatchEntry:
    return BatchEntry(Reference.parse(text), "list.txt:3", **fields)  # type: ignore[arg-type]


def test_an_entry_s_own_image_keeps_its_defaulted_tag_and_platforms() -> None:
    image = _Image.of(_entry("r.example/app", platforms=ARM, default_tag=True), 4)
    assert (str(image.ref), image.entry, image.origin) == ("r.example/app:latest", 4, "list.txt:3")
    assert image.platforms == ARM
    assert image.default_tag
    assert image.plan is None and image.outcome is None and not image.waiting


def test_a_tag_of_an_all_tags_entry_is_an_image_of_its_own() -> None:
    entry = _entry("r.example/app", platforms=ARM, all_tags=True)
    image = _Image.of(entry, 2, "v1.2")
    assert str(image.ref) == "r.example/app:v1.2"
    assert (image.entry, image.platforms, image.default_tag) == (2, ARM, False)


def test_an_image_s_failure_and_skip_name_it_and_its_origin() -> None:
    image = _Image.of(_entry("r.example/app:1"))
    failed = image.failed(NotFound("manifest unknown"), seconds=1.5)
    assert failed == ImageOutcome(
        "r.example/app:1",
        "list.txt:3",
        events.FAILED,
        seconds=1.5,
        error="manifest unknown",
        exit_code=4,
    )
    skipped = image.skipped()
    assert (skipped.status, skipped.exit_code, skipped.ok) == (events.SKIPPED, 0, False)
    assert skipped.error == "not pulled: an earlier image failed"


@pytest.mark.parametrize(
    ("pattern", "tags", "expected"),
    [
        (None, ["b", "a", "v1.0"], ["b", "a", "v1.0"]),
        (r"v1\..*", ["v1.0", "v10", "v1.2", "xv1.3"], ["v1.0", "v1.2"]),
        ("a", ["ab", "a", "ba"], ["a"]),
    ],
)
def test_selected_tags_keep_the_registry_order_and_match_whole_tags(
    pattern: str | None, tags: list[str], expected: list[str]
) -> None:
    compiled = re.compile(pattern) if pattern is not None else None
    entry = _entry("r.example/app", all_tags=True, tags=compiled)
    assert selected_tags(entry, tags) == expected


def test_no_selected_tag_is_a_usage_error_naming_the_repository() -> None:
    with pytest.raises(UsageError, match=r"^repository r.example/app has no tags$"):
        selected_tags(_entry("r.example/app", all_tags=True), [])
    pattern = _entry("r.example/app", all_tags=True, tags=re.compile("v2.*"))
    with pytest.raises(UsageError, match=r"has no tags matching the 'tags' pattern$"):
        selected_tags(pattern, ["v1"])
