"""``fastpull verify [--repair]``: re-hash every blob, check every image's closure, mend.

Checking runs under :meth:`Store.shared_use` (beside pulls, never beside gc): every file in
``blobs/`` is hashed again, on a thread pool as wide as the machine (the native SHA-256/512
releases the GIL), and every index.json entry is walked (see :mod:`fastpull.store.inventory`)
through the blobs that hashed right only, so a damaged manifest is never believed.

Repairing then deletes every blob whose content is wrong (taking the store exclusively, so no
pull is running, and only the very file that was hashed), and pulls each damaged image again
by the digest it was pulled at (``io.fastpull.repo-digest``), under its own name, with the
platform its entry records: exactly what was there, never a tag's newer content.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from fastpull import cancel, events, hashing
from fastpull.errors import FastpullError, Interrupted, ManifestError
from fastpull.puller import Puller
from fastpull.reference import Reference
from fastpull.registry.manifest import MAX_CONFIG_SIZE, parse_config
from fastpull.registry.settings import Settings
from fastpull.store.gc import StoredBlob, delete_blob, stored_blobs
from fastpull.store.inventory import CONFIG, Closure, Need, display_name, walk
from fastpull.store.layout import Store
from fastpull.store.maintenance import (
    DEFAULT_TIMEOUT,
    StoredImage,
    closure_of,
    load_images,
    platforms_of,
    read_manifest,
    whole_images,
)
from fastpull.types import Digest, PlatformSelection

# Hashed between checks for Ctrl-C: a few tenths of a second of work.
_SLICE = 64 << 20
_WAIT_SECONDS = 0.2


@dataclass(frozen=True)
class Problem:
    """One thing wrong, as the one line ``verify`` prints for it."""

    message: str
    digest: Digest | None = None


@dataclass(frozen=True)
class Report:
    """What ``verify`` found. ``damaged`` are the blobs with wrong content (or unreadable),
    ``broken`` the images that lack something they need."""

    blobs: int
    bytes: int
    images: int
    problems: tuple[Problem, ...]
    damaged: tuple[StoredBlob, ...]
    broken: tuple[StoredImage, ...]
    skipped: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return not self.problems


def _hash_blob(path: str, algorithm: str) -> str:
    hasher = hashing.new_hasher(algorithm)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset = 0
        while True:
            cancel.check()
            hashed = hashing.hash_fd_range(hasher, fd, offset, _SLICE)
            offset += hashed
            if hashed < _SLICE:
                return hasher.hexdigest()
    finally:
        os.close(fd)


def _hash_all(store: Store, blobs: Sequence[StoredBlob], jobs: int) -> dict[Digest, str | OSError]:
    """Hex digest of every blob's content, or why it could not be read, by digest."""
    results: dict[Digest, str | OSError] = {}
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="fastpull-verify")
    try:
        # Largest first, so that one big layer does not start last and run alone.
        pending: dict[Future[str], StoredBlob] = {
            pool.submit(_hash_blob, str(store.blob_path(b.digest)), b.digest.algorithm): b
            for b in sorted(blobs, key=lambda b: -b.size)
        }
        while pending:
            done, _ = wait(pending, timeout=_WAIT_SECONDS, return_when=FIRST_COMPLETED)
            cancel.check()
            for future in done:
                blob = pending.pop(future)
                try:
                    results[blob.digest] = future.result()
                except OSError as exc:
                    results[blob.digest] = exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def verify(store: Store, *, jobs: int | None = None) -> Report:
    """Check every blob's content and every image's closure; nothing is changed."""
    with store.shared_use():
        blobs, strays = stored_blobs(store)
        images = whole_images(load_images(store))
        hashes = _hash_all(store, blobs, jobs or os.cpu_count() or 1)
        return _judge(store, blobs, strays, images, hashes)


def _judge(
    store: Store,
    blobs: list[StoredBlob],
    strays: list[Path],
    images: list[StoredImage],
    hashes: dict[Digest, str | OSError],
) -> Report:
    by_digest = {blob.digest: blob for blob in blobs}
    damaged = [blob for blob in blobs if hashes[blob.digest] != blob.digest.hex]
    bad = {blob.digest for blob in damaged}

    def read(digest: Digest, size: int | None) -> bytes | None:
        blob = by_digest.get(digest)
        if blob is None or digest in bad or (size is not None and blob.size != size):
            return None
        return read_manifest(store, digest, blob.size)

    uses: dict[Digest, list[str]] = {}
    closures: dict[int, Closure] = {}
    for image in images:
        if image.descriptor is None:
            continue
        closure = walk(image.descriptor, read, image.source_manifest)
        closures[image.position] = closure
        for need in closure.needs:
            uses.setdefault(need.digest, []).append(f"{need.role} of {image.label}")

    def used_by(digest: Digest) -> str:
        found = uses.get(digest)
        return ", ".join(dict.fromkeys(found)) if found else "not used by any image"

    problems: list[Problem] = []
    for blob in damaged:
        found = hashes[blob.digest]
        if isinstance(found, OSError):
            what = f"cannot be read ({found.strerror or found})"
        else:
            what = f"its content is {blob.digest.algorithm}:{found}"
        problems.append(
            Problem(f"corrupt blob {blob.digest}: {what} ({used_by(blob.digest)})", blob.digest)
        )
    broken: list[StoredImage] = []
    for image in images:
        found_here = _image_problems(
            store, image, closures.get(image.position), by_digest, bad, used_by
        )
        if found_here or any(d in bad for d in _digests(closures.get(image.position))):
            broken.append(image)
        for problem in found_here:
            if problem not in problems:  # a blob several images lack is one line
                problems.append(problem)
    skipped = tuple(f"{path}: not a blob fastpull can check" for path in strays)
    return Report(
        blobs=len(blobs),
        bytes=sum(blob.size for blob in blobs),
        images=len(images),
        problems=tuple(problems),
        damaged=tuple(damaged),
        broken=tuple(broken),
        skipped=skipped,
    )


def _digests(closure: Closure | None) -> frozenset[Digest]:
    return closure.digests if closure is not None else frozenset()


def _image_problems(
    store: Store,
    image: StoredImage,
    closure: Closure | None,
    stored: dict[Digest, StoredBlob],
    bad: set[Digest],
    used_by: Callable[[Digest], str],
) -> list[Problem]:
    """What ``image`` lacks, besides the corrupt blobs (reported once, for all images)."""
    if closure is None:
        return [Problem(f"{image.label}: the index.json entry cannot be used: {image.error}")]
    problems = []
    for need in closure.needs:
        blob = stored.get(need.digest)
        if blob is None:
            size = f", {need.size} bytes" if need.size is not None else ""
            problems.append(
                Problem(f"missing blob {need.digest} ({used_by(need.digest)}{size})", need.digest)
            )
        elif need.size is not None and blob.size != need.size and need.digest not in bad:
            problems.append(
                Problem(
                    f"blob {need.digest} is {blob.size} bytes, but the {need.role} of "
                    f"{image.label} says {need.size}",
                    need.digest,
                )
            )
        elif need.role == CONFIG and need.digest not in bad:
            problems.extend(_config_problem(store, need, image))
    for gap in closure.gaps:
        if gap.reason is not None:
            problems.append(
                # The reason names the document: "manifest sha256:…: not valid JSON".
                Problem(f"{image.label}: {gap.reason}", gap.need.digest)
            )
    return problems


def _config_problem(store: Store, need: Need, image: StoredImage) -> list[Problem]:
    try:
        parse_config(store.read_blob(need.digest, max_size=MAX_CONFIG_SIZE), str(need.digest))
    except ManifestError as exc:
        return [Problem(f"config of {image.label} cannot be used: {exc}", need.digest)]
    return []


# ── repair ─────────────────────────────────────────────────────────────────────────────────


def delete_damaged(
    store: Store,
    report: Report,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    on_wait: Callable[[], None] = lambda: None,
) -> list[Digest]:
    """Delete the blobs whose content ``report`` found wrong; return those deleted.

    Holds the store exclusively, so no pull is using them meanwhile; a blob a pull has
    replaced since it was hashed is a new file, and stays.
    """
    deleted = []
    if report.damaged:
        with store.exclusive_use(timeout, on_wait):
            for blob in report.damaged:
                if delete_blob(store, blob.digest, blob.stat) is not None:
                    deleted.append(blob.digest)
    return deleted


def restore(
    store: Store,
    images: Sequence[StoredImage],
    *,
    settings: Settings,
    on_event: events.Listener = events.ignore,
) -> tuple[list[str], list[str]]:
    """Pull ``images`` again exactly as they were: the names restored, and for each image
    that could not be, a line saying why."""
    restored, failed = [], []
    for image in images:
        why = _restore(store, image, settings, on_event)
        if why is None:
            restored.append(image.label)
        else:
            failed.append(f"cannot restore {image.label}: {why}")
    return restored, failed


def _restore(
    store: Store, image: StoredImage, settings: Settings, on_event: events.Listener
) -> str | None:
    """Pull ``image`` again exactly as it was; None on success, else why not."""
    if image.descriptor is None:
        return f"its index.json entry cannot be used ({image.error})"
    if image.name is None:
        return "its index.json entry has no name to pull it by"
    if image.repo_digest is None:
        return (
            "it records no digest to pull it by (io.fastpull.repo-digest: not pulled by fastpull)"
        )
    try:
        named = Reference.parse(image.name)
    except FastpullError:
        return f"its name {image.name!r} is not a reference to pull it by"
    # Another image's restore may have brought back what this one lacked.
    if _is_whole(store, image):
        return None
    pinned = Reference(named.registry, named.repository, None, image.repo_digest)
    # A multi-platform image comes back with the platforms that had names of their own.
    platforms = platforms_of(load_images(store), image)
    platform = PlatformSelection.of(platforms) if platforms else image.descriptor.platform
    try:
        with Puller(store, settings=settings, platform=platform, on_event=on_event) as puller:
            puller.pull(pinned, name=image.name)
    except Interrupted:
        raise
    except FastpullError as exc:
        return f"pulling {display_name(str(pinned))} failed: {exc}"
    if not _is_whole(store, image):
        return "the registry's image does not have all the blobs this one needs"
    return None


def _is_whole(store: Store, image: StoredImage) -> bool:
    """Whether the image named like ``image`` has all its blobs now (sizes checked: what
    is there was verified before, or just now by the pull)."""
    current = next((i for i in load_images(store) if i.name == image.name), None)
    closure = closure_of(store, current) if current is not None else None
    if closure is None or not closure.complete:
        return False
    return all(store.has_blob(need.digest, need.size) for need in closure.needs)


__all__ = ["Problem", "Report", "delete_damaged", "restore", "verify"]
