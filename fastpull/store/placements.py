"""Which repositories of which registries hold this store's blobs, remembered across runs.

A push or copy learns where each blob is at its destination (uploaded there, mounted there,
or found there by ``HEAD``). Within a run that is what lets a second image mount a shared
layer instead of uploading it; written down here, it lets the *next* run do the same: a
nightly ``copy -f`` of new images into a mirror mounts their base layers from the
repositories that earlier runs filled, where a ``HEAD`` in the new repository would only
say 404. A remembered holder is a guess, never trusted: a registry that no longer has the
blob there answers the mount with 202, and the blob is uploaded after all.

On disk: ``<root>/placements.jsonl`` beside ``index.json``, one JSON object a line
(``registry``, ``repository``, ``digest``), appended with ``O_APPEND`` so that concurrent
runs do not interleave their lines. Other tools ignore the file; losing it, or a line of
it, costs uploads, never correctness, so it is neither fsynced nor locked, a line that
does not parse is skipped, and a run that cannot write it carries on without it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import orjson

from fastpull.errors import FastpullError
from fastpull.reference import Reference
from fastpull.types import Digest

FILENAME = "placements.jsonl"


@dataclass(frozen=True)
class Placement:
    """``repository`` of ``registry`` holds the blob ``digest``."""

    registry: str
    repository: str
    digest: Digest


def _parse(line: bytes) -> Placement | None:
    """The placement a line records, or None for a line that is not one (torn, edited)."""
    try:
        record = orjson.loads(line)
        registry, repository = record["registry"], record["repository"]
        digest = Digest.parse(record["digest"])
        ref = Reference.parse(f"{registry}/{repository}")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, FastpullError):
        return None
    if (ref.registry, ref.repository) != (registry, repository):
        return None  # docker's defaults changed it: not a name this file would hold
    return Placement(registry, repository, digest)


class Placements:
    """The placements file of a store: read per registry, appended to as blobs land."""

    def __init__(self, root: Path) -> None:
        self.path = root / FILENAME
        self._lock = threading.Lock()
        self._known: set[Placement] = set()

    def at(self, registry: str) -> list[Placement]:
        """What earlier runs recorded at ``registry``, oldest first, without repeats."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return []  # none yet, or unreadable: no memory is the worst it costs
        found = [p for p in map(_parse, data.splitlines()) if p and p.registry == registry]
        with self._lock:
            self._known.update(found)
        return list(dict.fromkeys(found))

    def record(self, placement: Placement) -> None:
        """Remember ``placement`` (once: what is known already is not written again)."""
        with self._lock:
            if placement in self._known:
                return
            self._known.add(placement)
        line = orjson.dumps(
            {
                "registry": placement.registry,
                "repository": placement.repository,
                "digest": str(placement.digest),
            }
        )
        # Best effort by design (see the module docstring): a full or read-only disk must
        # not fail a push over a hint.
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line + b"\n")
            finally:
                os.close(fd)


__all__ = ["FILENAME", "Placement", "Placements"]
