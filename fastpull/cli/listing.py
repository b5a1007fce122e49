"""What ``fastpull images`` shows: one row per tagged image in the store.

The platforms of a multi-platform image have names of their own (``app:1.0-linux-arm64``,
see :func:`fastpull.store.layout.platform_name`), each a row beside the image's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from fastpull.errors import FastpullError, InvalidReference
from fastpull.reference import Reference
from fastpull.registry.manifest import (
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    ImageManifest,
    parse_config,
    parse_document,
)
from fastpull.store.layout import (
    PLATFORM_OF_ANNOTATION,
    REF_NAME_ANNOTATION,
    REPO_DIGEST_ANNOTATION,
    Store,
)


@dataclass(frozen=True)
class ImageRow:
    """One line of ``fastpull images``."""

    repository: str
    tag: str
    digest: str
    image_id: str
    created: datetime | None
    size: int
    reference: str


def image_rows(store: Store, pattern: str | None = None) -> list[ImageRow]:
    """Rows for every image whose reference matches ``pattern`` (``repo`` or ``repo:tag``),
    with the rows of its platforms' names."""
    wanted = _filter(pattern)
    rows: list[ImageRow] = []
    for entry in store.images():
        name = entry.annotations.get(REF_NAME_ANNOTATION)
        if not name:
            continue
        ref = _reference(name)
        if ref is None:
            continue  # written by another tool with its own naming; not ours to show
        image = _reference(entry.annotations.get(PLATFORM_OF_ANNOTATION, ""))
        if wanted is not None and not wanted(ref) and not (image is not None and wanted(image)):
            continue
        created, image_id, size = None, "<unknown>", entry.size
        try:
            doc = parse_document(
                store.read_blob(entry.digest, max_size=MAX_MANIFEST_SIZE),
                entry.media_type,
                entry.digest,
                name,
            )
            if isinstance(doc, ImageManifest):
                config_raw = store.read_blob(doc.config.digest, max_size=MAX_CONFIG_SIZE)
                created = parse_config(config_raw, name).created
                image_id, size = doc.config.digest.short, doc.size
        except FastpullError:
            pass  # a damaged entry still gets a row; `fastpull verify` explains it
        rows.append(
            ImageRow(
                repository=ref.familiar_name,
                tag=ref.tag or "<none>",
                digest=entry.annotations.get(REPO_DIGEST_ANNOTATION, str(entry.digest)),
                image_id=image_id,
                created=created,
                size=size,
                reference=name,
            )
        )
    rows.sort(key=lambda r: (r.repository, r.tag))
    return rows


def _reference(name: str) -> Reference | None:
    try:
        return Reference.parse(name)
    except InvalidReference:
        return None


def _filter(pattern: str | None) -> Callable[[Reference], bool] | None:
    if not pattern:
        return None
    ref = Reference.parse(pattern)
    explicit_tag = ":" in pattern.rsplit("/", 1)[-1]
    return lambda r: r.name == ref.name and (not explicit_tag or r.tag == ref.tag)


def human_duration(then: datetime | None, now: datetime | None = None) -> str:
    """``5 days ago``, as docker words ages."""
    if then is None:
        return "N/A"
    now = now or datetime.now(timezone.utc)
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    seconds = (now - then).total_seconds()
    if seconds < 1:
        return "Less than a second ago"
    if seconds < 60:
        return f"{int(seconds)} seconds ago"
    minutes = seconds / 60
    if minutes < 2:
        return "About a minute ago"
    if minutes < 60:
        return f"{int(minutes)} minutes ago"
    hours = minutes / 60
    if hours < 2:
        return "About an hour ago"
    if hours < 48:
        return f"{int(hours)} hours ago"
    days = hours / 24
    if days < 14:
        return f"{int(days)} days ago"
    if days < 60:
        return f"{int(days / 7)} weeks ago"
    if days < 730:
        return f"{int(days / 30)} months ago"
    return f"{int(days / 365)} years ago"
