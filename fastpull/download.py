"""Blob downloads: every missing blob of a pull, several at once, verified as they land.

This is the seam the chunked multi-process engine replaces: callers hand over descriptors
and a :class:`BlobSource` and get the blobs committed to the store, whatever happens
inside. Here each blob is one stream on a shared ``CurlMulti``; the bytes go straight to
the store's ingest file and into the hasher, so verification ends with the download.

Per blob, until it is committed or its attempts run out:
- 3xx: follow it ourselves; the registry's ``Authorization`` goes only to its own origin;
- 401 on the registry: re-authenticate once per attempt, then retry;
- 408/429/5xx, resets, stalls, short bodies: back off (Retry-After wins) and resume from
  the bytes already written with ``Range`` (a 200 answer restarts from zero);
- digest mismatch: discard and retry from zero; after the last attempt, DigestMismatch.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pycurl

from . import cancel, events
from .errors import (
    ConnectionFailed,
    DigestMismatch,
    FastpullError,
    ProtocolError,
    TLSFailure,
    Unauthorized,
    redact_url,
)
from .hashing import Hasher, new_hasher
from .store import Ingest, Store
from .transport import (
    MAX_REDIRECTS,
    RETRYABLE_STATUS,
    Response,
    RetryPolicy,
    TLSConfig,
    configure_easy,
    curl_error,
    http_error,
    next_hop,
    origin,
    parse_header_line,
    parse_retry_after,
)
from .types import Descriptor, Digest

_BUFFER_SIZE = 512 * 1024
_ERROR_BODY_CAP = 64 * 1024
_PROGRESS_STEP = 1 << 20


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


@dataclass(frozen=True)
class BlobStats:
    """What it took to get one blob (for ``--stats`` and the Python API)."""

    digest: Digest
    size: int
    downloaded: int
    seconds: float
    attempts: int
    connections: int = 1
    already_present: bool = False


@dataclass
class _Transfer:
    descriptor: Descriptor
    ingest: Ingest
    exit: contextlib.ExitStack
    hasher: Hasher
    url: str = ""
    attempt: int = 1
    hops: int = 0
    reauthorized: bool = False
    written: int = 0
    fetched: int = 0
    ready_at: float = 0.0
    started: float = field(default_factory=time.monotonic)
    # Per-request state:
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    error_body: bytearray = field(default_factory=bytearray)
    failure: FastpullError | None = None
    offset: int = 0
    reported: int = 0

    @property
    def digest(self) -> Digest:
        return self.descriptor.digest

    @property
    def size(self) -> int:
        return self.descriptor.size


class Downloader:
    """Fetch blobs into a store, ``parallel`` at a time, on one libcurl multi handle."""

    def __init__(
        self,
        store: Store,
        *,
        tls_for: Callable[[str], TLSConfig],
        parallel: int = 6,
        retry: RetryPolicy | None = None,
        on_event: events.Listener = events.ignore,
    ) -> None:
        self.store = store
        self._tls_for = tls_for
        self.parallel = max(1, parallel)
        self.retry = retry or RetryPolicy()
        self._emit = on_event

    def fetch(self, blobs: Sequence[Descriptor], source: BlobSource) -> list[BlobStats]:
        """Download and commit every blob; raise the first unrecoverable error."""
        unique = {d.digest: d for d in blobs}
        queue = sorted(unique.values(), key=lambda d: d.size, reverse=True)
        results: list[BlobStats] = []
        waiting: list[_Transfer] = []
        active: dict[pycurl.Curl, _Transfer] = {}
        multi = pycurl.CurlMulti()
        try:
            while queue or waiting or active:
                cancel.check()
                now = time.monotonic()
                while len(active) < self.parallel and (queue or _ready(waiting, now)):
                    transfer = _pop_ready(waiting, now)
                    if transfer is None:
                        transfer = self._open(queue.pop(0), results)
                        if transfer is None:
                            continue
                    easy = self._start(transfer, source)
                    multi.add_handle(easy)
                    active[easy] = transfer
                if not active:
                    time.sleep(min(0.2, max(0.0, min(t.ready_at for t in waiting) - now)))
                    continue
                status, _ = multi.perform()
                while status == pycurl.E_CALL_MULTI_PERFORM:
                    status, _ = multi.perform()
                _, ok, failed = multi.info_read()
                finished = [(e, None) for e in ok] + [(e, (c, m)) for e, c, m in failed]
                for easy, curl_failure in finished:
                    transfer = active.pop(easy)
                    multi.remove_handle(easy)
                    easy.close()
                    outcome = self._finish(transfer, curl_failure, source)
                    if outcome is None:
                        waiting.append(transfer)
                    else:
                        results.append(outcome)
                if not finished:
                    multi.select(0.2)
        finally:
            for easy, transfer in active.items():
                multi.remove_handle(easy)
                easy.close()
                transfer.exit.close()
            for transfer in waiting:
                transfer.exit.close()
            multi.close()
        return results

    def _open(self, descriptor: Descriptor, results: list[BlobStats]) -> _Transfer | None:
        """Claim the blob's ingest; None when it turned out to be in the store already."""
        stack = contextlib.ExitStack()
        try:
            ingest = stack.enter_context(self.store.ingest(descriptor.digest, descriptor.size))
            if ingest.present:
                stack.close()
                self._emit(events.LayerEvent(descriptor.digest, events.ALREADY_EXISTS))
                results.append(BlobStats(descriptor.digest, descriptor.size, 0, 0.0, 0, 0, True))
                return None
            ingest.preallocate()
        except BaseException:
            stack.close()
            raise
        hasher = new_hasher(descriptor.digest.algorithm)
        return _Transfer(descriptor, ingest, stack, hasher)

    def _start(self, t: _Transfer, source: BlobSource) -> pycurl.Curl:
        if not t.url:
            t.url = source.blob_url(t.digest)
        t.status, t.failure, t.offset = None, None, t.written
        t.headers.clear()
        t.error_body.clear()
        headers = {"Accept-Encoding": "identity"}
        registry_origin = origin(source.blob_url(t.digest))
        if origin(t.url) == registry_origin:
            headers.update(source.authorization())
        if t.written:
            headers["Range"] = f"bytes={t.written}-{t.size - 1}"
        easy = pycurl.Curl()
        configure_easy(easy, t.url, headers=headers, tls=self._tls_for(t.url))
        easy.setopt(pycurl.BUFFERSIZE, _BUFFER_SIZE)
        easy.setopt(pycurl.HEADERFUNCTION, lambda line: self._on_header(t, line))
        easy.setopt(pycurl.WRITEFUNCTION, lambda data: self._on_body(t, data))
        if t.attempt == 1 and not t.hops and not t.written:
            self._emit(events.LayerEvent(t.digest, events.DOWNLOADING, 0, t.size))
        return easy

    def _on_header(self, t: _Transfer, line: bytes) -> None:
        status = parse_header_line(line, t.headers)
        if status is not None:
            t.status = status
            return
        if line in (b"\r\n", b"\n") and t.status in (200, 206):
            self._accept_body(t)

    def _accept_body(self, t: _Transfer) -> None:
        """Decide, once headers are complete, where this response's bytes go."""
        if t.status == 200 and t.offset:
            # The server ignored Range: start over with the whole body.
            t.offset = t.written = 0
            t.hasher = new_hasher(t.digest.algorithm)
        elif t.status == 206:
            expected = f"bytes {t.offset}-{t.size - 1}/{t.size}"
            got = dict(t.headers).get("content-range", "").replace("*", str(t.size))
            if got.strip() != expected:
                t.failure = ProtocolError(
                    f"blob {t.digest}: bad Content-Range {got[:80]!r} (expected {expected!r})"
                )

    def _on_body(self, t: _Transfer, data: bytes) -> int | None:
        if t.failure is not None:
            return 0
        if t.status not in (200, 206):
            if len(t.error_body) < _ERROR_BODY_CAP:
                t.error_body += data[: _ERROR_BODY_CAP - len(t.error_body)]
            return None
        end = t.written + len(data)
        if end > t.size:
            t.failure = DigestMismatch(
                f"blob {t.digest}: server sent more than the {t.size} bytes the manifest declares"
            )
            return 0
        try:
            os.pwrite(t.ingest.fd, data, t.written)
        except OSError as exc:
            t.failure = self.store.error_for(exc)
            return 0
        t.hasher.update(data)
        t.written = end
        t.fetched += len(data)
        if t.written - t.reported >= _PROGRESS_STEP or t.written == t.size:
            t.reported = t.written
            self._emit(events.LayerEvent(t.digest, events.DOWNLOADING, t.written, t.size))
        return None

    def _finish(
        self, t: _Transfer, curl_failure: tuple[int, str] | None, source: BlobSource
    ) -> BlobStats | None:
        """Commit, schedule a retry (return None), or raise."""
        if t.failure is not None and not t.failure.retryable:
            raise t.failure
        status = t.status or 0
        if t.failure is None and curl_failure is None:
            if status in (200, 206):
                if t.written == t.size:
                    return self._commit(t)
                t.failure = ConnectionFailed(
                    f"blob {t.digest}: connection closed after {t.written} of {t.size} bytes"
                )
            elif status in (301, 302, 303, 307, 308):
                t.hops += 1
                if t.hops > MAX_REDIRECTS:
                    raise ProtocolError(f"blob {t.digest}: too many redirects")
                t.url = next_hop(t.url, dict(t.headers).get("location"))
                return self._later(t, 0.0)
            elif status == 401 and origin(t.url) == origin(source.blob_url(t.digest)):
                if t.reauthorized:
                    raise Unauthorized(f"unauthorized: blob {t.digest} refused after login")
                t.reauthorized = True
                source.reauthorize(Response(401, tuple(t.headers), bytes(t.error_body), t.url))
                return self._later(t, 0.0)
            elif status == 416:
                t.written = 0
                t.hasher = new_hasher(t.digest.algorithm)
            elif status not in RETRYABLE_STATUS:
                raise _blob_error(t, status)
        elif curl_failure is not None and t.failure is None:
            t.failure = curl_error(curl_failure[0], curl_failure[1], t.url)
            if isinstance(t.failure, TLSFailure):
                raise t.failure
        if t.attempt >= self.retry.attempts:
            if t.failure is not None:
                raise t.failure
            raise _blob_error(t, status)
        wait = parse_retry_after(dict(t.headers).get("retry-after"))
        self._emit(events.LayerEvent(t.digest, events.RETRYING, t.written, t.size))
        delay = self.retry.delay(t.attempt, wait)
        t.attempt += 1
        # Signed redirect targets expire: every retry starts again at the registry.
        t.url, t.hops, t.reauthorized = "", 0, False
        return self._later(t, delay)

    def _later(self, t: _Transfer, delay: float) -> None:
        t.ready_at = time.monotonic() + delay
        return None

    def _commit(self, t: _Transfer) -> BlobStats | None:
        self._emit(events.LayerEvent(t.digest, events.VERIFYING, t.size, t.size))
        actual = t.hasher.hexdigest()
        if actual != t.digest.hex:
            if t.attempt >= self.retry.attempts:
                t.exit.close()
                raise DigestMismatch(
                    f"blob {t.digest}: downloaded content has digest "
                    f"{t.digest.algorithm}:{actual}; refused after {t.attempt} attempts"
                )
            t.written = 0
            t.hasher = new_hasher(t.digest.algorithm)
            t.url, t.hops, t.reauthorized = "", 0, False
            delay = self.retry.delay(t.attempt)
            t.attempt += 1
            return self._later(t, delay)
        t.ingest.commit(actual)
        t.exit.close()
        self._emit(events.LayerEvent(t.digest, events.DOWNLOAD_COMPLETE, t.size, t.size))
        return BlobStats(t.digest, t.size, t.fetched, time.monotonic() - t.started, t.attempt)


def _ready(waiting: list[_Transfer], now: float) -> bool:
    return any(t.ready_at <= now for t in waiting)


def _pop_ready(waiting: list[_Transfer], now: float) -> _Transfer | None:
    for i, transfer in enumerate(waiting):
        if transfer.ready_at <= now:
            return waiting.pop(i)
    return None


def _blob_error(t: _Transfer, status: int) -> FastpullError:
    return http_error(
        Response(status, tuple(t.headers), bytes(t.error_body), t.url),
        f"blob {t.digest} ({redact_url(t.url)})",
    )
