"""What a pull reports while it runs. Plain data, emitted by ``pull``/``download`` and
rendered by ``progress`` (docker-style lines, terminal bars, or ``--json``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastpull.types import Digest

# Layer states, worded as docker words them.
WAITING = "Waiting"
PULLING = "Pulling fs layer"
DOWNLOADING = "Downloading"
RETRYING = "Retrying"
VERIFYING = "Verifying Checksum"
DOWNLOAD_COMPLETE = "Download complete"
PULL_COMPLETE = "Pull complete"
ALREADY_EXISTS = "Already exists"


@dataclass(frozen=True)
class PullStarted:
    """``latest: Pulling from library/debian``; ``default_tag`` when the tag was implied."""

    reference: str
    tag_or_digest: str
    repository: str
    default_tag: bool


@dataclass(frozen=True)
class LayerEvent:
    """One layer (or config) changed state or made progress."""

    digest: Digest
    state: str
    current: int = 0
    total: int = 0
    message: str = ""


@dataclass(frozen=True)
class PullFinished:
    """The image is in the store: ``Digest:`` and ``Status:`` lines."""

    reference: str
    familiar: str
    digest: Digest
    up_to_date: bool


# Image states in a batch (``pull -f``), for the summary and ``--report``.
DOWNLOADED = "downloaded"
UP_TO_DATE = "up-to-date"
FAILED = "failed"
SKIPPED = "skipped"


@dataclass(frozen=True)
class BatchPlanned:
    """A batch's images are resolved: ``images`` to store, needing ``blobs`` missing blobs
    of ``bytes_total`` bytes between them (each counted once)."""

    images: int
    blobs: int
    bytes_total: int


@dataclass(frozen=True)
class ImageDone:
    """One image of a batch is stored, or failed (``error``), or was skipped (fail-fast)."""

    reference: str
    status: str
    new_bytes: int = 0
    reused_bytes: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class BatchFinished:
    """The whole batch is over."""

    images: int
    failed: int
    bytes_downloaded: int
    seconds: float


Event = PullStarted | LayerEvent | PullFinished | BatchPlanned | ImageDone | BatchFinished
Listener = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """A listener that drops everything (library use without output)."""
