"""Uploads to a registry: blob existence, cross-repository mounts, blob uploads, manifests.

Shaped on what distribution 2.8.2 does (``shared/field-notes.md``, "Pushing to
docker-registry 2.8.2"):

- ``HEAD`` a blob first: 200 means this repository has it and nothing is sent.
- A blob another repository of the same registry holds is mounted (``POST
  .../blobs/uploads/?mount=DIGEST&from=REPO``): 201 is done; 202 is a fresh upload session,
  which the blob is uploaded through. A token without ``pull`` on the source answers 401
  instead, so the blob is then uploaded through a plain ``POST``.
- An upload is ``POST`` then one streaming ``PUT <Location>&digest=`` read from the file.
  With ``chunk_size`` set, a larger blob goes as ``PATCH`` chunks strictly in order, each
  to the ``Location`` of the latest answer, then an empty ``PUT``.
- A blob still downloading (:class:`GrowingBlob`) is read as its bytes become final: the
  body waits for the download, never holding more than one piece. Its last byte is final
  only once the download's digest matched, and the registry checks ``digest=`` besides;
  when the download starts again from byte 0 the request is aborted and the blob is
  uploaded again through a new session.
- After a failure mid-upload the registry is asked where the upload stands (``GET`` on the
  latest ``Location``). Only when it confirms every byte acknowledged so far (``Range:
  0-N``, N+1 = our offset > 0) does the upload continue from there; otherwise (2.8.2 kills
  a session after an interrupted PATCH, and ``Range: 0-0`` cannot tell 0 bytes from 1) the
  blob starts again, after a ``HEAD`` in case it landed although its answer was lost.
- Only ``201`` confirms a blob or a manifest, and its ``Docker-Content-Digest`` must be ours.
- A manifest goes byte for byte, with its own media type as ``Content-Type``.

Credentials go only to the registry's own origin; an upload ``Location`` or redirect to
another origin is followed without them. Each :class:`Uploader` owns one libcurl handle
(one thread); :class:`PushAuth` shares a destination's credentials and tokens between them.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import quote

import pycurl

from fastpull import cancel
from fastpull.errors import (
    Denied,
    DigestMismatch,
    FastpullError,
    ProtocolError,
    RegistryError,
    StoreError,
    Unauthorized,
    parse_diagnostics,
    redact_url,
)
from fastpull.registry import auth
from fastpull.registry.client import RegistryClient
from fastpull.registry.manifest import digest_of
from fastpull.registry.responses import Reauthenticate, Redirect, classify
from fastpull.registry.transport import (
    Response,
    RetryPolicy,
    Transport,
    http_error,
    next_hop,
    origin,
)
from fastpull.types import Descriptor, Digest

PUSH_ACTIONS = ("pull", "push")
EXISTS = "exists"
MOUNTED = "mounted"
PUSHED = "pushed"
# libcurl sends "Expect: 100-continue" before large bodies and waits for the answer; the
# registry needs no such round trip (an empty value removes the header).
_NO_EXPECT = {"Expect": ""}
_OCTET_STREAM = {"Content-Type": "application/octet-stream"}
# How often a reader waiting for a download's next bytes looks for Ctrl-C (seconds).
_WAIT_SLICE = 0.2

Progress = Callable[[int], None]
_R = TypeVar("_R")


def push_scope(repository: str, mount_from: str | None = None) -> str:
    """The token scope of a push, plus ``pull`` on the repository a blob is mounted from."""
    scope = auth.repository_scope(repository, PUSH_ACTIONS)
    if mount_from and mount_from != repository:
        scope += " " + auth.repository_scope(mount_from)
    return scope


def with_digest(location: str, digest: Digest) -> str:
    """An upload ``Location`` with ``digest=`` added to its query (``_state`` kept as is)."""
    separator = "&" if "?" in location else "?"
    return f"{location}{separator}digest={quote(str(digest), safe=':')}"


def parse_range_end(value: str | None) -> int | None:
    """The inclusive end of an upload's ``Range: 0-N`` header; None if absent or malformed."""
    if not value:
        return None
    start, sep, end = value.strip().removeprefix("bytes=").partition("-")
    if not sep or start != "0" or not end.isdigit():
        return None
    return int(end)


@dataclass(frozen=True)
class BlobFile:
    """A blob to upload and the file holding its bytes (verified); with ``growing``, the
    blob is still downloading and its bytes are read as they become final."""

    descriptor: Descriptor
    path: Path
    growing: GrowingBlob | None = None

    @property
    def digest(self) -> Digest:
        return self.descriptor.digest

    @property
    def size(self) -> int:
        return self.descriptor.size

    @property
    def source(self) -> Path | GrowingBlob:
        """Where to read the bytes now: the growing file until the blob is stored."""
        if self.growing is not None and not self.growing.complete:
            return self.growing
        return self.path


@dataclass(frozen=True)
class BlobResult:
    """How a blob of ``size`` bytes reached a repository: ``exists``, ``mounted``
    (``mounted_from``) or ``pushed``; ``bytes_sent`` counts every body byte sent for it,
    retries included."""

    digest: Digest
    size: int
    outcome: str
    bytes_sent: int = 0
    mounted_from: str | None = None
    attempts: int = 1


class _SessionLost(ProtocolError):
    """The registry no longer knows the upload session (404 on its Location)."""

    retryable = True


class _Restarted(FastpullError):
    """The download of a blob being streamed started again from byte 0."""

    retryable = True


class GrowingBlob:
    """A blob the engine is still downloading, as an upload streams it: how many of its
    first bytes are final (hashed), in which file, and whether the download restarted
    (a generation per start from byte 0), finished or failed. Fed from the engine's
    :class:`~fastpull.events.BlobHashed` events; read by upload threads."""

    def __init__(self, path: Path, size: int, stored_path: Path) -> None:
        self._cond = threading.Condition()
        self._path = path
        self.size = size
        self.stored_path = stored_path
        self._final = 0
        self._generation = 0
        self._error: FastpullError | None = None
        self.complete = False

    def grew(self, path: Path, final: int) -> None:
        """The first ``final`` bytes of ``path`` are final now (fewer than before: the
        download restarted, and what was read of the earlier bytes may be wrong)."""
        with self._cond:
            if self.complete:
                return
            if final < self._final:
                self._generation += 1
            self._path, self._final = path, final
            self._cond.notify_all()

    def stored(self) -> None:
        """The blob is verified and stored whole at ``stored_path``."""
        with self._cond:
            self._path, self._final, self.complete = self.stored_path, self.size, True
            self._cond.notify_all()

    def fail(self, error: FastpullError) -> None:
        """The download stopped for good: a reader waiting for bytes raises ``error``."""
        with self._cond:
            if not self.complete:
                self._error = error
            self._cond.notify_all()

    def current(self) -> tuple[int, Path]:
        """The generation to read and the file holding it; once the engine commits the
        blob, the file is at ``stored_path``, a little before :meth:`stored` says so."""
        with self._cond:
            return self._generation, self._path

    def wait(self, position: int, generation: int) -> int:
        """How many bytes are final, once more than ``position`` are (Ctrl-C is seen while
        waiting). Raises _Restarted when the download started again after ``generation``
        was read, and the download's error if it stopped."""
        with self._cond:
            while True:
                if self._generation != generation:
                    raise _Restarted("the download of the blob started again")
                if self._final > position:
                    return self._final
                if self._error is not None:
                    raise self._error
                self._cond.wait(_WAIT_SLICE)
                cancel.check()


# What a request body is read from: a file, bytes, or a blob still downloading.
_Source = Path | bytes | GrowingBlob


class PushAuth:
    """One destination registry's credentials and tokens, shared by upload threads.

    The :class:`RegistryClient` does the handshake on its own transport, so every use of
    it happens under one lock; a 401 that another thread has already answered is not
    answered twice.
    """

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """``scheme://host`` of the registry (pings it the first time)."""
        with self._lock:
            return self.client.base_url

    def repository_url(self, repository: str, *parts: str) -> str:
        """``base/v2/<repository>/<parts...>``."""
        with self._lock:
            return self.client.repository_url(repository, *parts)

    def headers(self, scope: str) -> dict[str, str]:
        """What to send for ``scope`` now (maybe nothing until the first challenge)."""
        with self._lock:
            return self.client.authorization(scope)

    def renew(self, response: Response, scope: str, sent: dict[str, str]) -> dict[str, str]:
        """Answer a 401 for ``scope``: a token another thread got meanwhile, or a new one."""
        with self._lock:
            if self.client.credentials.registry_token:
                raise _refused(response, self.client, scope)
            current = self.client.authorization(scope)
            if current and current != sent:
                return current
            return self.client.authenticate(response, scope)


def _refused(response: Response, client: RegistryClient, scope: str) -> FastpullError:
    """The error for a push the registry does not allow (401 even with our credentials)."""
    what = scope.split()[0].removeprefix("repository:").rsplit(":", 1)[0]
    if response.status == 401 and client.credentials.anonymous:
        return Unauthorized(
            f"unauthorized: authentication required to push to {what}; log in with "
            f"`fastpull login {client.registry}`"
        )
    return Denied(f"denied: requested access to the resource is denied (push to {what})")


class _FileBody:
    """A request body read from a file (or bytes) in the pieces libcurl asks for, counted."""

    def __init__(self, handle: BinaryIO, length: int, progress: Progress | None) -> None:
        self._handle = handle
        self._left = length
        self._progress = progress
        self.read_bytes = 0

    def read(self, size: int) -> bytes:
        data = self._handle.read(min(size, self._left))
        self._left -= len(data)
        self.read_bytes += len(data)
        if self._progress is not None and data:
            self._progress(len(data))
        return data


class _GrowingBody:
    """A request body read from a blob that is still downloading: each piece is read from
    the file once it is final, waiting for the download meanwhile (never holding more than
    one piece in memory, never stalling the download). When the download restarts, fails,
    or Ctrl-C comes, the transfer is aborted and :attr:`error` says why."""

    def __init__(
        self, growing: GrowingBlob, offset: int, length: int, progress: Progress | None
    ) -> None:
        self._growing = growing
        self._generation, path = growing.current()
        self._fd = _open_blob(path, growing.stored_path)
        self._position = offset
        self._end = offset + length
        self._final = 0
        self._progress = progress
        self.read_bytes = 0
        self.error: FastpullError | None = None

    def close(self) -> None:
        os.close(self._fd)

    def read(self, size: int) -> bytes | int:
        if self._position >= self._end:
            return b""
        try:
            if self._position >= self._final:
                self._final = self._growing.wait(self._position, self._generation)
            want = min(self._position + size, self._end, self._final) - self._position
            data = os.pread(self._fd, want, self._position)
            if len(data) != want:
                raise StoreError(f"the file being downloaded ends before byte {self._final}")
        except FastpullError as exc:
            self.error = exc
            return pycurl.READFUNC_ABORT
        except OSError as exc:
            self.error = StoreError(f"cannot read the blob being downloaded: {exc.strerror}")
            return pycurl.READFUNC_ABORT
        self._position += want
        self.read_bytes += want
        if self._progress is not None:
            self._progress(want)
        return data


def _open_blob(path: Path, stored_path: Path) -> int:
    """Open the file a growing blob is in; it may just have been committed (renamed into
    the store, an atomic move: the file is at one path or the other)."""
    for candidate in dict.fromkeys((path, stored_path)):
        try:
            return os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StoreError(f"cannot read {candidate}: {exc.strerror}") from None
    raise StoreError(f"the blob being downloaded is gone: {path}")


class Uploader:
    """Uploads blobs and manifests to one registry from one thread.

    ``chunk_size`` None sends every blob in one ``PUT``; otherwise blobs larger than it
    go in ``PATCH`` chunks of that size.
    """

    def __init__(
        self,
        auth_: PushAuth,
        transport: Transport,
        *,
        retry: RetryPolicy | None = None,
        chunk_size: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.auth = auth_
        self.transport = transport
        self.retry = retry or RetryPolicy()
        self.chunk_size = chunk_size
        self._sleep = sleep

    def close(self) -> None:
        """Release this thread's connections."""
        self.transport.close()

    # -- requests ------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        scope: str,
        headers: dict[str, str] | None = None,
        body: tuple[_Source, int, int] | None = None,
        progress: Progress | None = None,
    ) -> tuple[Response, int]:
        """One request with authorization (a 401 is answered once) and method-preserving
        redirects; ``body`` is (file or bytes, offset, length). Returns the response and
        the body bytes read for it (every redirect hop counted)."""
        registry = origin(self.auth.base_url)
        credentials = self.auth.headers(scope)
        renewed = False
        hops = 0
        sent = 0
        while True:
            own = origin(url) == registry
            hdrs = {**_NO_EXPECT, **(headers or {}), **(credentials if own else {})}
            response, read = self._send(method, url, hdrs, body, progress)
            sent += read
            action = classify(response.status, dict(response.headers), url, registry, hops=hops)
            match action:
                # A 303 answers an upload (it asks for no resend of the body).
                case Redirect(target) if response.status != 303:
                    hops += 1
                    url = target
                case Reauthenticate() if not renewed:
                    credentials = self.auth.renew(response, scope, credentials)
                    renewed = True
                case _:
                    return response, sent

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: tuple[_Source, int, int] | None,
        progress: Progress | None,
    ) -> tuple[Response, int]:
        if body is None:
            return self.transport.send(method, url, headers), 0
        source, offset, length = body
        if isinstance(source, GrowingBlob):
            growing = _GrowingBody(source, offset, length, progress)
            try:
                return self._send_body(method, url, headers, growing, length)
            except FastpullError:
                # The abort the reader asked for reaches us as a curl error: say why.
                if growing.error is not None:
                    raise growing.error from None
                raise
            finally:
                growing.close()
        if isinstance(source, bytes):
            reader = _FileBody(io.BytesIO(source[offset : offset + length]), length, progress)
            return self._send_body(method, url, headers, reader, length)
        try:
            handle = open(source, "rb")  # noqa: SIM115 - closed below, after the transfer
        except OSError as exc:
            raise StoreError(f"cannot read {source}: {exc.strerror}") from None
        with handle:
            handle.seek(offset)
            os.posix_fadvise(handle.fileno(), offset, length, os.POSIX_FADV_SEQUENTIAL)
            reader = _FileBody(handle, length, progress)
            return self._send_body(method, url, headers, reader, length)

    def _send_body(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        reader: _FileBody | _GrowingBody,
        length: int,
    ) -> tuple[Response, int]:
        response = self.transport.send(method, url, headers, upload=reader.read, upload_size=length)
        return response, reader.read_bytes

    def _pause(self, attempt: int, error: FastpullError) -> None:
        """Back off before another attempt; a Retry-After the registry sent wins."""
        wait = error.retry_after if isinstance(error, RegistryError) else None
        cancel.pause(self.retry.delay(attempt, wait), self._sleep)

    def _retrying(self, action: Callable[[], _R]) -> _R:
        attempt = 0
        while True:
            attempt += 1
            try:
                return action()
            except FastpullError as exc:
                if not exc.retryable or attempt >= self.retry.attempts:
                    raise
                self._pause(attempt, exc)

    # -- blobs ---------------------------------------------------------------------------

    def exists(self, repository: str, digest: Digest) -> bool:
        """Whether ``repository`` holds the blob (``HEAD``)."""
        url = self.auth.repository_url(repository, "blobs", str(digest))
        scope = push_scope(repository)
        response, _ = self._request("HEAD", url, scope)
        if response.status == 200:
            return True
        if response.status == 404:
            return False
        raise self._error(response, scope, f"blob {digest.short} in {repository}")

    def _error(self, response: Response, scope: str, what: str) -> FastpullError:
        if response.status in (401, 403):
            return _refused(response, self.auth.client, scope)
        return http_error(response, what)

    def upload(
        self,
        repository: str,
        blob: BlobFile,
        *,
        mount_from: Sequence[str] = (),
        progress: Progress | None = None,
        probe: bool = True,
    ) -> BlobResult:
        """Make ``repository`` hold the blob: skip it if there, mount it from the first of
        ``mount_from`` that works, else upload it. Retried with backoff; raises the last
        error when the attempts run out or the error will not change (denied, invalid).

        ``probe=False`` skips the first ``HEAD``: when ``mount_from`` starts with a
        repository known to hold the blob (the mount answers 201 whether or not
        ``repository`` has it already, so the ``HEAD`` would only cost a round trip), or
        when a ``HEAD`` made ahead of the upload found that ``repository`` lacks it."""
        state = _UploadState(blob, skip_head=not probe)

        def counted(size: int) -> None:
            # Every byte read for the registry counts, also those of attempts that failed.
            state.sent += size
            if progress is not None:
                progress(size)

        attempt = 0
        while True:
            attempt += 1
            try:
                result = self._attempt(repository, blob, mount_from, state, counted)
                return replace(result, bytes_sent=state.sent, attempts=attempt)
            except _Restarted:
                # The download of a streamed blob began again: so does its upload, at once
                # (the engine bounds how often that happens).
                state.abandon(self, repository)
                attempt -= 1
            except FastpullError as exc:
                if not exc.retryable or attempt >= self.retry.attempts:
                    raise
                state.recover(self, repository)
                self._pause(attempt, exc)

    def _attempt(
        self,
        repository: str,
        blob: BlobFile,
        mount_from: Sequence[str],
        state: _UploadState,
        progress: Progress | None,
    ) -> BlobResult:
        if state.location is None:
            if not state.skip_head and self.exists(repository, blob.digest):
                return BlobResult(blob.digest, blob.size, EXISTS)
            state.skip_head = False  # a later attempt asks again
            source = next((s for s in mount_from if s != repository), None)
            location = self.start_upload(repository, blob.digest, source)
            if location is None:
                return BlobResult(blob.digest, blob.size, MOUNTED, mounted_from=source)
            state.begin(location)
        self._send_blob(repository, blob, state, progress)
        return BlobResult(blob.digest, blob.size, PUSHED)

    def start_upload(self, repository: str, digest: Digest, mount_from: str | None) -> str | None:
        """Open an upload session; with ``mount_from``, try the mount first. Returns the
        session's Location, or None when the mount made the blob present."""
        url = self.auth.repository_url(repository, "blobs", "uploads") + "/"
        if mount_from is not None:
            scope = push_scope(repository, mount_from)
            query = f"?mount={quote(str(digest), safe=':')}&from={quote(mount_from, safe='/')}"
            response, _ = self._request("POST", url + query, scope)
            if response.status == 201:
                self._check_digest(response, digest, f"mount of {digest.short}")
                return None
            if response.status == 202:
                return self._location(response)
            if response.status not in (401, 403):
                raise self._error(response, scope, f"mount into {repository}")
            # No pull on the source: the registry refuses rather than answering 202.
        scope = push_scope(repository)
        response, _ = self._request("POST", url, scope)
        if response.status != 202:
            raise self._error(response, scope, f"upload to {repository}")
        return self._location(response)

    def _location(self, response: Response) -> str:
        location = response.header("location")
        if not location:
            raise ProtocolError(
                f"{redact_url(response.url)}: upload answered without a Location header"
            )
        # Resolved and checked as a redirect is: no other scheme, no downgrade to http.
        return next_hop(response.url, location)

    def _send_blob(
        self, repository: str, blob: BlobFile, state: _UploadState, progress: Progress | None
    ) -> None:
        scope = push_scope(repository)
        assert state.location is not None
        chunk = self.chunk_size
        source = blob.source
        if chunk is not None and blob.size > chunk:
            while state.offset < blob.size:
                length = min(chunk, blob.size - state.offset)
                response, _ = self._request(
                    "PATCH",
                    state.location,
                    scope,
                    _OCTET_STREAM,
                    (source, state.offset, length),
                    progress,
                )
                if response.status == 404:
                    raise _SessionLost(f"upload of {blob.digest.short} was lost by the registry")
                if response.status != 202:
                    raise self._error(response, scope, f"upload of {blob.digest.short}")
                end = parse_range_end(response.header("range"))
                if end is not None and end + 1 != state.offset + length:
                    raise _SessionLost(
                        f"upload of {blob.digest.short}: the registry holds {end + 1} bytes, "
                        f"{state.offset + length} were sent"
                    )
                state.advance(self._location(response), state.offset + length)
        rest = blob.size - state.offset
        body = (source, state.offset, rest) if rest or state.offset == 0 else None
        response, _ = self._request(
            "PUT", with_digest(state.location, blob.digest), scope, _OCTET_STREAM, body, progress
        )
        if response.status == 201:
            self._check_digest(response, blob.digest, f"upload of {blob.digest.short}")
            return
        if response.status == 404:
            raise _SessionLost(f"upload of {blob.digest.short} was lost by the registry")
        codes = {d.code for d in parse_diagnostics(response.body)}
        if response.status == 400 and "DIGEST_INVALID" in codes:
            raise DigestMismatch(
                f"{repository}: the registry computed another digest than "
                f"{blob.digest} for the bytes sent",
                expected=str(blob.digest),
            )
        raise self._error(response, scope, f"upload of {blob.digest.short}")

    def _check_digest(self, response: Response, digest: Digest, what: str) -> None:
        answered = (response.header("docker-content-digest") or "").strip()
        if answered and answered != str(digest):
            raise ProtocolError(f"{what}: the registry answered digest {answered[:80]}, not ours")

    def status(self, location: str, repository: str) -> tuple[str, int] | None:
        """Where an upload session stands: its latest Location and the bytes it holds as
        ``Range: 0-N`` says (N+1), or None when the registry no longer knows it."""
        try:
            response, _ = self._request("GET", location, push_scope(repository))
        except FastpullError:
            return None
        end = parse_range_end(response.header("range"))
        if response.status != 204 or end is None:
            return None
        return self._location(response) if response.header("location") else location, end + 1

    def cancel_session(self, location: str, repository: str) -> None:
        """``DELETE`` an upload session we give up on; failures are ignored."""
        with contextlib.suppress(FastpullError):
            self._request("DELETE", location, push_scope(repository))

    # -- manifests -----------------------------------------------------------------------

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
        """Push a manifest or index under a tag or digest, byte for byte; return its digest
        after checking the registry's ``Docker-Content-Digest`` against it."""
        digest = digest_of(raw)
        url = self.auth.repository_url(repository, "manifests", reference)
        scope = push_scope(repository)

        def put() -> Digest:
            response, _ = self._request(
                "PUT", url, scope, {"Content-Type": media_type}, (raw, 0, len(raw))
            )
            if response.status != 201:
                raise self._error(response, scope, f"manifest {reference} of {repository}")
            self._check_digest(response, digest, f"manifest {reference} of {repository}")
            return digest

        return self._retrying(put)


@dataclass
class _UploadState:
    """One blob's upload session across attempts: the latest Location, the bytes the
    registry acknowledged in it, and every body byte sent so far."""

    blob: BlobFile
    location: str | None = None
    offset: int = 0
    sent: int = 0
    # Whether the next attempt skips the HEAD (see Uploader.upload's ``probe``).
    skip_head: bool = False

    def begin(self, location: str) -> None:
        self.location, self.offset = location, 0

    def advance(self, location: str, offset: int) -> None:
        self.location, self.offset = location, offset

    def recover(self, uploader: Uploader, repository: str) -> None:
        """After a failure: continue where the registry confirms our offset, else start
        the blob again (from HEAD, in case it landed and only the answer was lost)."""
        if self.location is not None and self.offset > 0:
            found = uploader.status(self.location, repository)
            if found is not None and found[1] == self.offset:
                self.location = found[0]
                return
        self.location, self.offset = None, 0

    def abandon(self, uploader: Uploader, repository: str) -> None:
        """Start the blob again from a new session; the registry may drop the old one and
        the bytes it holds (best effort: it purges forgotten sessions itself)."""
        if self.location is not None:
            uploader.cancel_session(self.location, repository)
        self.location, self.offset = None, 0


__all__ = [
    "EXISTS",
    "MOUNTED",
    "PUSHED",
    "PUSH_ACTIONS",
    "BlobFile",
    "BlobResult",
    "GrowingBlob",
    "PushAuth",
    "Uploader",
    "parse_range_end",
    "push_scope",
    "with_digest",
]
