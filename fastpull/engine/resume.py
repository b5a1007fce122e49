"""Resuming across runs: what a finished transfer adds to its blob's journal, and whether the
journaled bytes still hold once the server has answered with its ETag.

Every transfer that wrote bytes, however it ended, has them journaled with the checksum its
worker computed, so the next run of any pull needing the blob fetches only what is missing
(``store.Ingest.resumed``). A server whose ETag for the blob changed since has every resumed
range fetched again.
"""

from __future__ import annotations

import enum

from fastpull.engine.worker import Cancelled, Done, Failed, Finished
from fastpull.store.journal import Extent


def written(report: Finished, start: int) -> Extent | None:
    """The journal record for what the transfer of a chunk starting at ``start`` wrote
    (None when it wrote nothing)."""
    match report:
        case Done(checksum=checksum) | Cancelled(checksum=checksum) | Failed(checksum=checksum):
            if checksum and report.position > start:
                return Extent(start, report.position, checksum)
    return None


class Validator(enum.Enum):
    """What the ETag of the blob's first answer in a run says about its resumed bytes."""

    NONE = "none"  # no ETag: nothing to judge by
    RECORD = "record"  # the first ETag seen for this ingest: remember it
    SAME = "same"  # resumed bytes are the server's current ones
    CHANGED = "changed"  # the blob changed since: fetch the resumed ranges again


def judge_etag(known: str | None, etag: str, checked: bool) -> Validator:
    """Judge an answer's ETag against the one journaled with the ingest (``known``).

    Only the blob's first answer in a run is judged (``checked`` says one was): the first
    request of a blob runs alone, so what later answers write is current either way.
    """
    if not etag:
        return Validator.NONE
    if known is None:
        return Validator.RECORD
    if etag != known and not checked:
        return Validator.CHANGED
    return Validator.SAME
