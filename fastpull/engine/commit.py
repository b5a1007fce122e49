"""The end of a blob's download: judge the digest, publish the file.

The job hashes each blob over the part of its ingest file that will never be written again
(``Scheduler.hashable``); once every byte is hashed the digest decides: publish (the fsync
and rename run on a publishing thread, so the engine's loop keeps feeding the workers),
fetch the whole blob once more, or fail with :class:`DigestMismatch`.
"""

from __future__ import annotations

import enum

from fastpull.engine.records import BlobRun
from fastpull.errors import DigestMismatch

MAX_DIGEST_ATTEMPTS = 2


class Verdict(enum.Enum):
    """What the digest of a blob whose every byte is hashed says."""

    VERIFIED = "verified"  # publish it
    REFETCH = "refetch"  # wrong content: the whole blob comes again


def hashed(blob: BlobRun, complete: bool) -> bool:
    """Whether the whole blob is hashed and nothing of it is still being fetched
    (``complete``), so its digest can be judged."""
    return blob.verifier.position >= blob.size and complete


def judge(blob: BlobRun) -> Verdict:
    """Judge the digest of a wholly hashed blob; on a mismatch, set the blob up to be
    fetched again from the registry's URL.

    Raises :class:`DigestMismatch` (and discards the bytes, so no run resumes them) when
    the content was wrong ``MAX_DIGEST_ATTEMPTS`` times.
    """
    if blob.verifier.matches():
        return Verdict.VERIFIED
    if blob.digest_attempts >= MAX_DIGEST_ATTEMPTS:
        blob.ingest.discard()
        raise DigestMismatch(
            f"blob {blob.digest}: downloaded content has digest "
            f"{blob.digest.algorithm}:{blob.verifier.hexdigest()}; refused after "
            f"{blob.digest_attempts} attempts",
            expected=str(blob.digest),
            actual=f"{blob.digest.algorithm}:{blob.verifier.hexdigest()}",
        )
    blob.digest_attempts += 1
    blob.ingest.restart()
    blob.verifier.restart()
    blob.route = blob.route.forget()
    return Verdict.REFETCH


def publish(blob: BlobRun, hexdigest: str) -> None:
    """Commit a verified blob and release its ingest (on a publishing thread)."""
    try:
        blob.ingest.commit(hexdigest)
    finally:
        blob.exit.close()
