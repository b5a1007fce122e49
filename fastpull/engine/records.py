"""The engine's records: its frozen configuration, one record per blob of a run and one per
chunk in flight, and what a run returns.

The scheduler (``scheduler``) owns which byte ranges are done, queued or being fetched;
these records hold the rest of what the engine knows, each fact once.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from fastpull import events
from fastpull.engine.connections import machine_idle_seconds
from fastpull.engine.routing import Route
from fastpull.engine.verify import Verifier
from fastpull.registry.responses import RetryPolicy
from fastpull.registry.transport import Response, TLSConfig
from fastpull.store.ingest import Ingest
from fastpull.types import Descriptor, Digest


class BlobSource(Protocol):
    """Where blobs come from and how to be allowed to read them (a registry repository)."""

    def blob_url(self, digest: Digest) -> str:
        """The registry URL of a blob."""
        ...

    def authorization(self) -> dict[str, str]:
        """Headers that authorize a blob GET on the registry's origin."""
        ...

    def reauthorize(self, response: Response) -> dict[str, str]:
        """Answer a 401 (token expired, first challenge) with fresh headers."""
        ...


class EngineConfig(NamedTuple):
    """What a run of the engine is told: its limits, TLS per origin, whom to tell, its clock."""

    tls_for: Callable[[str], TLSConfig]
    # Transfers at the start; the run adds more up to ``max_connections`` while they raise
    # the total rate, unless ``pinned`` (see engine/connections.py).
    connections: int = 4
    max_connections: int = 64
    pinned: bool = False
    # A registry host's own ceiling (``HOST[:PORT]``); ``max_connections`` for all if None.
    ceiling_for: Callable[[str], int] | None = None
    retry: RetryPolicy = RetryPolicy(attempts=6)
    stall_seconds: int = 30
    emit: events.Listener = events.ignore
    clock: Callable[[], float] = time.monotonic
    # The machine's idle seconds as a whole, for the connection count (engine/connections.py).
    idle_clock: Callable[[], float | None] = machine_idle_seconds


class BlobStats(NamedTuple):
    """What it took to get one blob (for ``--stats`` and the Python API)."""

    digest: Digest
    size: int
    downloaded: int
    seconds: float
    attempts: int
    connections: int = 1
    already_present: bool = False
    chunks: int = 0
    retries: int = 0
    resumed: int = 0
    # The cluster worker that moved the blob; empty when this process did.
    worker: str = ""

    @classmethod
    def already_stored(cls, digest: Digest, size: int) -> BlobStats:
        """A blob that was in the store before this pull: nothing downloaded."""
        return cls(
            digest, size, downloaded=0, seconds=0.0, attempts=0, connections=0, already_present=True
        )


class Fetched(NamedTuple):
    """What one engine run did: the numbers of every blob it stored or found stored, and
    the worker processes it used (0: all transfers ran in the calling process)."""

    blobs: tuple[BlobStats, ...]
    workers: int = 0


class Stage(enum.Enum):
    """Where a blob of a run is."""

    FETCHING = "fetching"
    # The server ignored Range: waiting for the blob's other transfers to stop before one
    # plain stream starts from byte 0.
    SWITCHING = "switching"
    COMMITTING = "committing"  # verified; being published on a publishing thread
    DONE = "done"
    FAILED = "failed"  # given up (reported to the failure listener); its ingest is closed


@dataclass
class BlobRun:
    """One blob during a run: its ingest, hash, route, stage and counters."""

    descriptor: Descriptor
    ingest: Ingest
    exit: contextlib.ExitStack
    verifier: Verifier
    source: BlobSource
    route: Route = field(default_factory=Route)
    stage: Stage = Stage.FETCHING
    commit: Future[None] | None = None  # while COMMITTING
    digest_attempts: int = 1
    etag_checked: bool = False
    started: float | None = None
    downloaded: int = 0
    chunks: int = 0
    retries: int = 0
    connections: int = 0
    reported: float = 0.0
    resumed: int = 0

    @property
    def digest(self) -> Digest:
        return self.descriptor.digest

    @property
    def size(self) -> int:
        return self.descriptor.size

    @property
    def finished(self) -> bool:
        """Stored or given up: nothing more happens to it in this run."""
        return self.stage in (Stage.DONE, Stage.FAILED)

    @property
    def writing(self) -> bool:
        """Whether bytes may still be written to its ingest (and hashed, and journaled)."""
        return self.stage in (Stage.FETCHING, Stage.SWITCHING)

    def stats(self, now: float) -> BlobStats:
        """What it took, for a blob just stored."""
        return BlobStats(
            self.digest,
            self.size,
            self.downloaded,
            now - (self.started if self.started is not None else now),
            self.digest_attempts,
            max(1, self.connections),
            chunks=self.chunks,
            retries=self.retries,
            resumed=self.resumed,
        )


@dataclass
class InFlight:
    """One chunk's transfer: which blob, which worker, where it went, how far it wrote.

    Answers are judged by ``url``, where this request went, not by the blob's current URL,
    which may have moved on (a re-resolved redirect) meanwhile. ``stopping`` marks a transfer
    cancelled for a single-stream restart: its end is the acknowledgement that waits for.
    """

    chunk_id: int
    blob: int
    worker: int
    url: str
    position: int
    sent_at: float = 0.0
    stopping: bool = False
