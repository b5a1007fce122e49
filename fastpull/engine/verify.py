"""Verification as the bytes land: a hash that advances over the written prefix of a file.

SHA-256 is sequential, so a blob fetched in chunks out of order is hashed from byte 0 up to
the first gap, reading back what the workers wrote (mapped from the page cache, in C with the
GIL released: ``hashing.hash_fd_range``). When the last chunk lands only that chunk is left to
hash, so verification ends with the download instead of taking a second pass.
"""

from __future__ import annotations

from collections.abc import Callable

from fastpull.errors import StoreError
from fastpull.hashing import Hasher, hash_fd_range, new_hasher
from fastpull.store.diskqueue import release_pages
from fastpull.types import Digest

# Hash at most this much per call (about 10 ms), so the engine's loop answers its workers
# promptly: a connection whose chunk ended waits for the loop to hand it the next one.
STEP = 16 << 20
# A range is released again this far behind hashing (RELEASE_AGAIN_MIN at a time): its pages,
# dirty at the first release, are clean now and really freed, so workers reuse them instead of
# fresh ones (worker 1.0-1.3 against 1.7-1.9 CPU s/GB on the 2 GB image:
# `python -m benchmarks.bench_pull --images big --tools fastpull`).
RELEASE_AGAIN_AFTER = 64 << 20
RELEASE_AGAIN_MIN = 16 << 20


class Verifier:
    """The running digest of one ingest file's prefix ``[0, position)``.

    Every range hashed is handed to ``release(fd, offset, length)``: those bytes are final,
    and by default the kernel is told to write them out and drop them from its cache
    (:func:`diskqueue.release_pages`; the engine does that off its loop). Each range is
    handed over once more when hashing is ``RELEASE_AGAIN_AFTER`` bytes past it, by when
    its pages are usually written and can be dropped.
    """

    def __init__(
        self,
        digest: Digest,
        fd: int,
        backend: str | None = None,
        release: Callable[[int, int, int], None] = release_pages,
    ) -> None:
        self.digest = digest
        self._fd = fd
        self._backend = backend
        self._release = release
        self._released_again = 0
        self._hasher: Hasher = new_hasher(digest.algorithm, backend)
        self.position = 0

    def advance(self, to: int) -> int:
        """Hash forward towards ``to`` (at most ``STEP`` bytes); returns the new position."""
        want = min(to - self.position, STEP)
        if want <= 0:
            return self.position
        # Mapped: the ingest file is this process's (locked, never shrunk while open), and
        # the bytes were just written, so they are hashed in the page cache, not copied out.
        got = hash_fd_range(self._hasher, self._fd, self.position, want, mapped=True)
        if got != want:
            raise StoreError(f"ingest file of {self.digest} is shorter than what was written to it")
        self._release(self._fd, self.position, got)
        self.position += got
        settled = self.position - RELEASE_AGAIN_AFTER
        if settled - self._released_again >= RELEASE_AGAIN_MIN:
            self._release(self._fd, self._released_again, settled - self._released_again)
            self._released_again = settled
        return self.position

    def restart(self) -> None:
        """Forget everything hashed (the blob is being fetched again from byte 0)."""
        self._hasher = new_hasher(self.digest.algorithm, self._backend)
        self.position = 0
        self._released_again = 0

    def matches(self) -> bool:
        """Whether everything hashed so far has exactly the expected digest."""
        return self._hasher.hexdigest() == self.digest.hex

    def hexdigest(self) -> str:
        """The digest of what has been hashed."""
        return self._hasher.hexdigest()
