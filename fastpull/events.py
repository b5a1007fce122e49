"""What a pull or a push reports while it runs. Plain data, emitted by ``puller``,
``download`` and ``pusher`` and rendered by ``progress`` (docker-style lines, terminal bars,
or ``--json``); :class:`BlobHashed` is for programs (``mirror`` streams uploads from it),
not shown. NamedTuples: they cost a fraction of a frozen dataclass to define (0.1-0.2 ms
against 0.7-1 ms) and to make, and every command imports this module."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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
# ... and as docker words them for a push ("Mounted from REPO" names the repository).
PREPARING = "Preparing"
PUSHING = "Pushing"
PUSHED = "Pushed"
LAYER_EXISTS = "Layer already exists"
MOUNTED_FROM = "Mounted from"


class PullStarted(NamedTuple):
    """``latest: Pulling from library/debian``; ``default_tag`` when the tag was implied."""

    reference: str
    tag_or_digest: str
    repository: str
    default_tag: bool


class LayerEvent(NamedTuple):
    """One layer (or config) changed state or made progress."""

    digest: Digest
    state: str
    current: int = 0
    total: int = 0
    message: str = ""


class BlobHashed(NamedTuple):
    """The engine has hashed the first ``hashed`` bytes of a blob it is downloading into the
    file ``path``: those bytes are final and may be read (an upload streams them while the
    rest downloads). A value below the previous one means the blob started again from byte
    0 and what was read before may change; ``hashed == size`` comes only once the digest
    matched. Emitted from the engine's loop, as hashing advances."""

    digest: Digest
    path: str
    hashed: int
    size: int


class PullFinished(NamedTuple):
    """The image is in the store: ``Digest:`` and ``Status:`` lines."""

    reference: str
    familiar: str
    digest: Digest
    up_to_date: bool


class PushStarted(NamedTuple):
    """``The push refers to repository [localhost:5000/app]``."""

    repository: str


class PushFinished(NamedTuple):
    """The manifest is in the destination: ``TAG: digest: sha256:... size: N``; ``tag`` is
    the digest itself when the image was pushed by digest."""

    reference: str
    tag: str
    digest: Digest
    size: int


# Image states in a batch (``pull -f``), for the summary and ``--report``.
DOWNLOADED = "downloaded"
UP_TO_DATE = "up-to-date"
FAILED = "failed"
SKIPPED = "skipped"
COPIED = "copied"


class BatchPlanned(NamedTuple):
    """A batch's images are resolved: ``images`` to store, needing ``blobs`` missing blobs
    of ``bytes_total`` bytes between them (each counted once)."""

    images: int
    blobs: int
    bytes_total: int


class ImageDone(NamedTuple):
    """One image of a batch is stored, or failed (``error``), or was skipped (fail-fast)."""

    reference: str
    status: str
    new_bytes: int = 0
    reused_bytes: int = 0
    seconds: float = 0.0
    error: str = ""


class BatchFinished(NamedTuple):
    """The whole batch is over."""

    images: int
    failed: int
    bytes_downloaded: int
    seconds: float


Event = (
    PullStarted
    | LayerEvent
    | BlobHashed
    | PullFinished
    | PushStarted
    | PushFinished
    | BatchPlanned
    | ImageDone
    | BatchFinished
)
Listener = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """A listener that drops everything (library use without output)."""
