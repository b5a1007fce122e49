"""Batch files for ``fastpull pull -f FILE``: which images to pull, parsed and checked. No I/O.

Two formats, told apart by the first character that is not white space:

- plain text: one reference per line; blank lines and ``#`` comments (whole lines, or after
  white space at the end of a line) are ignored::

      debian:12
      ghcr.io/owner/app:1.2   # the release we ship

- JSON (starts with ``[`` or ``{``): a list of entries, or ``{"images": [...]}``. An entry is
  a reference string, or an object with ``image`` and optionally ``platforms`` (a list of
  ``os/arch[/variant]``, or ``"all"``), ``all_tags`` (bool), ``tags`` (a regular expression
  that a whole tag must match; needs ``all_tags``), ``store`` (another OCI layout; pull
  only) and ``to`` (``copy -f`` only: the destination repository, or with a tag or digest
  the destination image)::

      {"images": ["debian:12",
                  {"image": "alpine", "platforms": ["linux/amd64", "linux/arm64"]},
                  {"image": "localhost:5000/app", "all_tags": true, "tags": "v1\\\\..*"}]}

Every problem raises :class:`~fastpull.errors.BatchFileError` naming the file and the line
(plain text, invalid JSON) or the entry number (JSON, counted from 1), so a whole batch is
checked before anything is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import orjson

from fastpull.errors import BatchFileError, UsageError
from fastpull.reference import Reference
from fastpull.types import ALL_PLATFORMS, Platform, PlatformSelection

ENTRY_KEYS = frozenset({"image", "platforms", "all_tags", "tags", "store", "to"})
_COMMENT = re.compile(r"(?:^|\s)#.*$")
_T = TypeVar("_T")


class BatchEntry(NamedTuple):
    """One line or entry of a batch file.

    ``platforms`` None means the command line's choice; ``store`` None the command
    line's store. ``origin`` says where the entry came from (``list.txt:3``,
    ``list.json: entry 2``), for messages.
    """

    reference: Reference
    origin: str
    platforms: PlatformSelection | None = None
    all_tags: bool = False
    tags: re.Pattern[str] | None = None
    store: str | None = None
    default_tag: bool = False
    to: str | None = None

    def wants_tag(self, tag: str) -> bool:
        """Whether ``tag`` of the repository is selected (with ``all_tags``)."""
        return self.tags is None or self.tags.fullmatch(tag) is not None


def tag_was_defaulted(text: str, ref: Reference) -> bool:
    """Whether ``text`` named neither a tag nor a digest (so ``latest`` was implied)."""
    last = text.rsplit("/", 1)[-1]
    return ref.digest is None and ":" not in last


def check_all_tags(text: str, ref: Reference) -> None:
    """``--all-tags`` takes a repository, not an image: refuse a tag or a digest."""
    if not tag_was_defaulted(text, ref):
        raise UsageError("tag can't be used with --all-tags/-a")


def command_line_entry(text: str, all_tags: bool = False) -> BatchEntry:
    """The image (or, with ``all_tags``, the repository) named on the command line."""
    ref = Reference.parse(text)
    if all_tags:
        check_all_tags(text, ref)
    default_tag = tag_was_defaulted(text, ref) and not all_tags
    return BatchEntry(ref, "command line", all_tags=all_tags, default_tag=default_tag)


def parse_batch(text: str, name: str) -> list[BatchEntry]:
    """Parse a whole batch file; ``name`` is how messages call the file (``-`` for stdin)."""
    name = "<stdin>" if name == "-" else name
    if text.lstrip()[:1] in ("[", "{"):
        return _parse_json(text, name)
    return _parse_lines(text, name)


def _parse_lines(text: str, name: str) -> list[BatchEntry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        item = _COMMENT.sub("", line).strip()
        if not item:
            continue
        origin = f"{name}:{number}"
        ref = _reference(item, origin)
        entries.append(BatchEntry(ref, origin, default_tag=tag_was_defaulted(item, ref)))
    return entries


def _parse_json(text: str, name: str) -> list[BatchEntry]:
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BatchFileError(f"{name}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if isinstance(document, dict):
        extra = sorted(set(document) - {"images"})
        if extra:
            raise BatchFileError(f"{name}: unknown top-level key {extra[0]!r} (expected 'images')")
        document = document.get("images")
        if not isinstance(document, list):
            raise BatchFileError(f"{name}: 'images' must be a list of entries")
    return [_entry(item, f"{name}: entry {i}") for i, item in enumerate(document, 1)]


def _entry(item: Any, origin: str) -> BatchEntry:
    if isinstance(item, str):
        ref = _reference(item, origin)
        return BatchEntry(ref, origin, default_tag=tag_was_defaulted(item, ref))
    if not isinstance(item, dict):
        raise BatchFileError(f"{origin}: expected a reference or an object with 'image'")
    unknown = sorted(set(item) - ENTRY_KEYS)
    if unknown:
        known = ", ".join(sorted(ENTRY_KEYS))
        raise BatchFileError(f"{origin}: unknown key {unknown[0]!r} (known: {known})")
    image = _typed(item, "image", str, origin)
    if image is None:
        raise BatchFileError(f"{origin}: 'image' is required")
    ref = _reference(image, origin)
    all_tags = bool(_typed(item, "all_tags", bool, origin))
    tags = _pattern(_typed(item, "tags", str, origin), origin)
    if tags is not None and not all_tags:
        raise BatchFileError(f"{origin}: 'tags' selects among all tags: set 'all_tags': true")
    if all_tags:
        _checked(lambda: check_all_tags(image, ref), origin)
    store = _typed(item, "store", str, origin)
    if store is not None and not store.strip():
        raise BatchFileError(f"{origin}: 'store' is empty")
    to = _typed(item, "to", str, origin)
    if to is not None:
        _reference(to, origin)
    return BatchEntry(
        ref,
        origin,
        platforms=_platforms(item.get("platforms"), origin),
        all_tags=all_tags,
        tags=tags,
        store=store,
        default_tag=tag_was_defaulted(image, ref) and not all_tags,
        to=to,
    )


def _typed(item: dict[str, Any], key: str, kind: type, origin: str) -> Any:
    value = item.get(key)
    if value is not None and not isinstance(value, kind):
        article = "a boolean" if kind is bool else "a string"
        raise BatchFileError(f"{origin}: {key!r} must be {article}")
    return value


def _platforms(value: Any, origin: str) -> PlatformSelection | None:
    if value is None:
        return None
    if value == ALL_PLATFORMS:
        return PlatformSelection(every=True)
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise BatchFileError(
            f"{origin}: 'platforms' must be a non-empty list of os/arch[/variant] or \"all\""
        )
    return PlatformSelection.of(_checked(lambda p=p: Platform.parse(p), origin) for p in value)


def _pattern(value: str | None, origin: str) -> re.Pattern[str] | None:
    if value is None:
        return None
    try:
        return re.compile(value)
    except re.error as exc:
        raise BatchFileError(f"{origin}: 'tags' is not a valid regular expression: {exc}") from None


def _reference(text: str, origin: str) -> Reference:
    return _checked(lambda: Reference.parse(text), origin)


def _checked(parse: Callable[[], _T], origin: str) -> _T:
    try:
        return parse()
    except UsageError as exc:
        raise BatchFileError(f"{origin}: {exc}") from None


__all__ = [
    "BatchEntry",
    "check_all_tags",
    "command_line_entry",
    "parse_batch",
    "tag_was_defaulted",
]
