"""The download engine: every missing blob of a pull, in Range chunks, across worker
processes, verified as the bytes land.

Callers hand :meth:`Downloader.fetch` descriptors and a :class:`BlobSource` and get the
blobs committed to the store. Inside, the parent process plans (``scheduler``), resolves
URLs and credentials (``routing``), hashes (``verify``, ``commit``) and reports progress;
workers (``worker``, started by ``pool``) only move bytes from sockets into the ingest files.
What can block on the disk runs on background threads, so the loop that feeds the workers
(``job``) never waits for the device: writeback advice and journal syncs on one
(``diskqueue``), the fsync and rename that publish a blob on a few (so that the fsyncs of
blobs finishing together overlap).

Every finished range goes into the ingest's resume journal with the checksum its worker
computed (``resume``); on any stop (Ctrl-C, an error) the transfers in flight are cancelled
and what they wrote is journaled too, so the next run of any pull needing the blob fetches
only what is missing (``store.Ingest.resumed``). A server whose ETag for the blob changed
since then gets every resumed range fetched again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from fastpull import events
from fastpull.engine.job import FailureListener, Job
from fastpull.engine.pool import WorkerPool
from fastpull.engine.records import BlobRun, BlobSource, BlobStats, EngineConfig, Fetched
from fastpull.engine.verify import Verifier
from fastpull.registry.responses import RetryPolicy
from fastpull.registry.transport import TLSConfig
from fastpull.store.diskqueue import DiskQueue
from fastpull.store.layout import Store
from fastpull.types import Descriptor, Digest

# Below this many bytes in total, starting worker processes costs more than it saves.
INLINE_BELOW = 64 << 20
# Blobs published (fsync, rename) at once: the fsyncs of blobs that finish together overlap,
# and the file system commits them together, instead of each waiting for the one before.
PUBLISH_THREADS = 4
# Blobs hashed at once, at most one per core: on a fast link the blobs' hashing falls behind
# their download (see Job._hash) and what is left is hashed on every core.
HASH_THREADS = 4
DEFAULT_CONNECTIONS = 4
DEFAULT_MAX_CONNECTIONS = 64


def default_workers(total_bytes: int) -> int:
    """Worker processes for a job: none (inline) for small jobs, else one per two cores
    (the parent hashes on another), at most 4.

    One per two cores because on 2 cores one worker used less CPU than two for the same
    throughput (``python -m benchmarks.bench_pull --images big --tools fastpull``, both
    scenarios)."""
    if total_bytes < INLINE_BELOW:
        return 0
    return max(1, min(4, (os.cpu_count() or 1) // 2))


class Downloader:
    """Fetch blobs into a store over up to ``max_connections`` transfers per registry host
    (``ceiling_for(host)`` where given; as many as raise the total rate, from
    :data:`DEFAULT_CONNECTIONS`; exactly ``connections`` when given) in ``workers``
    processes."""

    def __init__(
        self,
        store: Store,
        *,
        tls_for: Callable[[str], TLSConfig],
        connections: int | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        ceiling_for: Callable[[str], int] | None = None,
        workers: int | None = None,
        retry: RetryPolicy | None = None,
        stall_seconds: int = 30,
        on_event: events.Listener = events.ignore,
    ) -> None:
        self.store = store
        self.workers = workers
        self.config = EngineConfig(
            tls_for=tls_for,
            connections=max(1, connections or min(DEFAULT_CONNECTIONS, max_connections)),
            max_connections=max(1, connections or max_connections),
            pinned=connections is not None,
            ceiling_for=ceiling_for,
            retry=retry or RetryPolicy(attempts=6),
            stall_seconds=stall_seconds,
            emit=on_event,
        )

    def fetch(
        self,
        blobs: Sequence[Descriptor],
        source: BlobSource | Mapping[Digest, BlobSource],
        *,
        on_failure: FailureListener | None = None,
    ) -> Fetched:
        """Download, verify and commit every blob; raise the first unrecoverable error.

        ``source`` serves every blob, or maps each digest to its own source (a batch
        spans repositories and registries). With ``on_failure``, a blob that cannot be had
        (refused, not found, wrong content after retries...) is reported there and the
        others go on; only what stops every blob (Ctrl-C, the store) is raised. Stats are
        returned for the blobs that were stored.
        """
        unique = sorted({d.digest: d for d in blobs}.values(), key=lambda d: str(d.digest))
        results: list[BlobStats] = []
        if not unique:
            return Fetched(())
        total = sum(d.size for d in unique)
        count = self.workers if self.workers is not None else default_workers(total)
        with contextlib.ExitStack() as stack:
            disk = DiskQueue()
            # Each worker is a fresh interpreter that takes a tenth of a second to start: it
            # boots while the blobs are claimed (their locks, files and journals).
            pool = WorkerPool(count)
            try:
                # Locks are taken in digest order, so two processes never wait on each other.
                todo = []
                for descriptor in unique:
                    own = source[descriptor.digest] if isinstance(source, Mapping) else source
                    claimed = self._claim(descriptor, own, results, stack, disk)
                    if claimed is not None:
                        todo.append(claimed)
            except BaseException:
                pool.close()
                raise
            # Registered after the blobs, so they close first (in reverse order): no worker
            # writes and nothing queued uses an ingest once the blobs' stacks close them.
            stack.callback(disk.close)
            stack.callback(pool.close)
            if not todo:
                return Fetched(tuple(results))
            publisher = ThreadPoolExecutor(
                min(PUBLISH_THREADS, len(todo)), thread_name_prefix="fastpull-publish"
            )
            stack.callback(publisher.shutdown)
            hashers = min(len(todo), os.cpu_count() or 1, HASH_THREADS)
            hasher = None
            if hashers > 1:
                hasher = ThreadPoolExecutor(hashers, thread_name_prefix="fastpull-hash")
                stack.callback(hasher.shutdown)
            job = Job(self.config, todo, pool, disk, on_failure, publisher, hasher)
            results.extend(job.run())
        return Fetched(tuple(results), count)

    def _claim(
        self,
        descriptor: Descriptor,
        source: BlobSource,
        results: list[BlobStats],
        stack: contextlib.ExitStack,
        disk: DiskQueue,
    ) -> BlobRun | None:
        """Lock the blob's ingest; None when another process already stored it."""
        blob_stack = contextlib.ExitStack()
        try:
            ingest = blob_stack.enter_context(self.store.ingest(descriptor.digest, descriptor.size))
            if ingest.present:
                blob_stack.close()
                self.config.emit(events.LayerEvent(descriptor.digest, events.ALREADY_EXISTS))
                results.append(BlobStats.already_stored(descriptor.digest, descriptor.size))
                return None
            ingest.preallocate()
        except BaseException:
            blob_stack.close()
            raise
        stack.push(blob_stack)
        resumed = sum(extent.length for extent in ingest.resumed)
        verifier = Verifier(descriptor.digest, ingest.fd, release=disk.release)
        return BlobRun(descriptor, ingest, blob_stack, verifier, source, resumed=resumed)


__all__ = [
    "BlobSource",
    "BlobStats",
    "Downloader",
    "FailureListener",
    "Fetched",
    "default_workers",
]
