"""What a pull reports while it runs. Plain data, emitted by ``pull``/``download`` and
rendered by ``progress`` (docker-style lines, terminal bars, or ``--json``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .types import Digest

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


Event = PullStarted | LayerEvent | PullFinished
Listener = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """A listener that drops everything (library use without output)."""
