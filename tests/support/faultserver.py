"""A scripted registry for faults the real registry cannot produce.

:class:`FaultServer` is a small threaded HTTP(S) server on ``127.0.0.1`` that serves the
distribution API read side (``/v2/`` ping, manifests by tag and digest, blobs by digest with
``Range`` support) for images built with :mod:`tests.support.images`, plus arbitrary content at
any path (a second server then plays a CDN). Each route can be scripted with a queue of
faults, consumed in order, before normal service resumes:

* :class:`Respond`: a fixed answer (429 or 503, with or without ``Retry-After``), at once or
  late;
* :class:`Redirect`: a 3xx to another origin, to ``http://``, or back to itself (a loop), at
  once or late;
* :class:`Serve`: the real content with altered headers (wrong ``Content-Type`` or
  ``Docker-Content-Digest``), trickled or throttled to a rate, cut off mid-body or stalled,
  with one byte flipped, with ``Range`` ignored (a 200 with the whole body) or answered with
  a wrong ``Content-Range``;
* :class:`Flood`: a body far larger than anything a client should read.

``Serve()`` unaltered is normal service, so ``Serve(times=3), Respond(403)`` answers the
fourth request 403 (a signed URL expiring). A fault with ``covering`` answers only requests
whose bytes (their ``Range``, or the whole content) include that offset, so one chunk of a
blob fetched in ranges can be singled out; other requests pass it by.

With ``basic_auth`` every route requires that ``Authorization: Basic`` header and answers 401
with a Basic challenge otherwise. Every request is recorded (method, target, headers, status,
body bytes sent, arrival time) for assertions, and so is the most responses ever in progress
at once (:attr:`FaultServer.peak_answering`); methods other than GET are recorded and
answered 405.
Nothing here imports fastpull. Slow answers are bounded by
``max_response_seconds`` and end at once when the server stops.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.support.images import Blob, Image, Index
from tests.support.netutil import LoopbackService, RequestRecord, TrackedHandler

# What Go's net/http (and so the real registry) answers to a TLS handshake on a plain port;
# curl then fails the handshake at once instead of waiting for its connect timeout.
_TLS_ON_PLAIN_PORT = (
    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
_TLS_HANDSHAKE_RECORD = 0x16
_FLOOD_CHUNK = b" " * (64 * 1024)


@dataclass
class Respond:
    """Answer with a fixed status, headers and body instead of the route's content, after
    ``delay`` seconds."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    times: int | None = 1
    covering: int | None = None
    delay: float = 0.0


@dataclass
class Redirect:
    """Answer with a redirect to ``location`` (absolute or relative), after ``delay`` seconds."""

    location: str
    status: int = 307
    times: int | None = 1
    covering: int | None = None
    delay: float = 0.0


@dataclass
class Serve:
    """Serve the route's content, altered.

    ``headers`` replace or add response headers. The body goes out ``chunk`` bytes at a time,
    after a pause of ``interval`` seconds before each chunk (a trickle), and no faster than
    ``rate`` bytes per second if set. After ``close_after`` body bytes the connection is
    dropped; after ``stall_after`` the server goes silent until it stops or the response's time
    bound runs out, then drops the connection.

    ``flip`` inverts the content byte at that offset (if the response carries it), so the
    bytes no longer match the digest. ``ignore_range`` answers a ``Range`` request 200 with the
    whole body, as servers without range support do; ``content_range`` is sent instead of the
    true ``Content-Range`` of a 206. With ``gate``, each response waits at that barrier after
    its headers, so that responses to requests sent together reach the client together.
    """

    headers: Mapping[str, str] = field(default_factory=dict)
    chunk: int = 64 * 1024
    interval: float = 0.0
    rate: float | None = None
    close_after: int | None = None
    stall_after: int | None = None
    flip: int | None = None
    ignore_range: bool = False
    content_range: str | None = None
    gate: threading.Barrier | None = None
    times: int | None = 1
    covering: int | None = None


@dataclass
class Flood:
    """A 200 declaring ``size`` bytes of body and streaming them until the client hangs up."""

    headers: Mapping[str, str] = field(default_factory=dict)
    size: int = 1 << 30
    times: int | None = 1
    covering: int | None = None


Fault = Respond | Redirect | Serve | Flood


@dataclass
class RecordedRequest(RequestRecord):
    """One request as the server saw it; ``status`` and ``body_sent`` fill in as it is answered.
    ``received`` is when it arrived (``time.monotonic()``)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    status: int = 0
    body_sent: int = 0
    received: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Content:
    body: bytes
    headers: Mapping[str, str]


class _Handler(TrackedHandler):
    def handle(self) -> None:
        if self.server.ssl_context is None:
            try:
                first = self.connection.recv(1, socket.MSG_PEEK)
            except OSError:
                return
            if first and first[0] == _TLS_HANDSHAKE_RECORD:
                self.connection.sendall(_TLS_ON_PLAIN_PORT)
                return
        super().handle()

    def do_GET(self) -> None:
        self.server.owner._handle(self)

    # The API served is read-only: other methods are recorded, then refused.
    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET


class _Dropped(Exception):
    """The response ends by closing the connection (scripted, or the client hung up)."""


class FaultServer(LoopbackService):
    """A scripted registry on ``127.0.0.1`` (HTTPS with a trustme certificate if ``tls``)."""

    handler = _Handler
    thread_name = "fastpull-fault-server"

    def __init__(
        self,
        *,
        tls: bool = False,
        basic_auth: tuple[str, str] | None = None,
        realm: str = "fault-registry",
        max_response_seconds: float = 30.0,
    ) -> None:
        super().__init__(tls=tls, max_response_seconds=max_response_seconds)
        self.basic_auth = basic_auth
        self.realm = realm
        self._lock = threading.Condition()
        self._content: dict[str, _Content] = {}
        self._scripts: dict[str, list[list[Any]]] = {}
        self._requests: list[RecordedRequest] = []
        self._answering = 0
        self._peak_answering = 0
        self.add_content("/v2/", b"{}", "application/json")

    # -- lifecycle -------------------------------------------------------------------------

    def _before_stop(self) -> None:
        with self._lock:
            faults = [fault for queue in self._scripts.values() for fault, _ in queue]
        for fault in faults:
            if isinstance(fault, Serve) and fault.gate is not None:
                fault.gate.abort()  # responses waiting at a gate end now

    @staticmethod
    def manifest_path(repository: str, reference: str) -> str:
        """``/v2/<repository>/manifests/<tag or digest>``."""
        return f"/v2/{repository}/manifests/{reference}"

    @staticmethod
    def blob_path(repository: str, digest: str) -> str:
        """``/v2/<repository>/blobs/<digest>``."""
        return f"/v2/{repository}/blobs/{digest}"

    # -- content and scripts ---------------------------------------------------------------

    def add_content(
        self,
        path: str,
        body: bytes,
        content_type: str = "application/octet-stream",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Serve ``body`` at ``path`` (with Range support) until scripted otherwise."""
        all_headers = {"Content-Type": content_type, **(headers or {})}
        with self._lock:
            self._content[path] = _Content(body, all_headers)

    def add_blob(self, repository: str, blob: Blob) -> None:
        """Serve a blob under ``/v2/<repository>/blobs/<digest>``."""
        self.add_content(
            self.blob_path(repository, blob.digest),
            blob.data,
            headers={"Docker-Content-Digest": blob.digest},
        )

    def add_image(self, repository: str, tag: str | None, image: Image | Index) -> None:
        """Serve an image or index under ``tag`` (if given) and its digest, with its blobs."""
        images = image.images if isinstance(image, Index) else (image,)
        for child in images:
            for blob in child.referenced_blobs():
                self.add_blob(repository, blob)
            self._add_manifest(repository, child.manifest_digest, child.manifest)
        self._add_manifest(repository, image.manifest_digest, image.manifest)
        if tag is not None:
            self._add_manifest(repository, tag, image.manifest)

    def _add_manifest(self, repository: str, reference: str, manifest: Blob) -> None:
        self.add_content(
            self.manifest_path(repository, reference),
            manifest.data,
            manifest.media_type,
            {"Docker-Content-Digest": manifest.digest},
        )

    def script(self, path: str, *faults: Fault) -> None:
        """Queue faults for GETs of ``path``; each answers ``times`` requests (None: all)."""
        with self._lock:
            queue = self._scripts.setdefault(path, [])
            queue.extend([fault, fault.times] for fault in faults)

    # -- what happened ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """The requests for one path (query ignored)."""
        return [r for r in self.requests if r.path == path]

    @property
    def peak_answering(self) -> int:
        """The most responses ever written at the same time (concurrent transfers)."""
        with self._lock:
            return self._peak_answering

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no response is being written (a client that hung up is noticed late)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._answering == 0, timeout):
                raise TimeoutError(f"fault server still answering after {timeout} s")

    # -- serving ---------------------------------------------------------------------------

    def _take(self, record: RecordedRequest) -> Fault | None:
        with self._lock:
            content = self._content.get(record.path)
            for entry in self._scripts.get(record.path, []):
                fault, left = entry
                if fault.covering is not None and not _covers(record, content, fault.covering):
                    continue
                if left is None:
                    return fault
                if left > 0:
                    entry[1] = left - 1
                    return fault
        return None

    def _handle(self, handler: _Handler) -> None:
        record = RecordedRequest(handler.command, handler.path, tuple(handler.headers.items()))
        with self._lock:
            self._requests.append(record)
            self._answering += 1
            self._peak_answering = max(self._peak_answering, self._answering)
        try:
            self._answer(handler, record)
        except (_Dropped, ConnectionError, TimeoutError, ssl.SSLError):
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
        finally:
            with self._lock:
                self._answering -= 1
                self._lock.notify_all()

    def _answer(self, handler: _Handler, record: RecordedRequest) -> None:
        if self._stopping.is_set():
            raise _Dropped
        path = record.path
        if self.basic_auth is not None and not self._authorized(record):
            challenge = {"WWW-Authenticate": f'Basic realm="{self.realm}"'}
            body = _error_body("UNAUTHORIZED", "authentication required")
            self._send_whole(handler, record, 401, challenge, body)
            return
        if record.method != "GET":
            self._send_whole(handler, record, 405, {}, b"")
            return
        fault = self._take(record)
        delay = fault.delay if isinstance(fault, (Respond, Redirect)) else 0.0
        if delay and self._pause(delay, time.monotonic() + self.max_response_seconds):
            raise _Dropped
        if isinstance(fault, Respond):
            self._send_whole(handler, record, fault.status, fault.headers, fault.body)
        elif isinstance(fault, Redirect):
            self._send_whole(handler, record, fault.status, {"Location": fault.location}, b"")
        elif isinstance(fault, Flood):
            self._flood(handler, record, fault)
        else:
            with self._lock:
                content = self._content.get(path)
            if content is None:
                body = _error_body(_unknown_code(path), f"{path} not found")
                self._send_whole(handler, record, 404, {}, body)
                return
            self._serve(handler, record, content, fault or Serve())

    def _authorized(self, record: RecordedRequest) -> bool:
        assert self.basic_auth is not None
        user, password = self.basic_auth
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        return record.header("Authorization") == expected

    def _start_response(
        self, handler: _Handler, record: RecordedRequest, status: int, headers: Mapping[str, str]
    ) -> None:
        record.status = status
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()

    def _send_whole(
        self,
        handler: _Handler,
        record: RecordedRequest,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        all_headers = {"Content-Length": str(len(body)), **headers}
        if body and "Content-Type" not in headers:
            all_headers["Content-Type"] = "application/json"
        self._start_response(handler, record, status, all_headers)
        handler.wfile.write(body)
        record.body_sent += len(body)

    def _serve(
        self, handler: _Handler, record: RecordedRequest, content: _Content, shape: Serve
    ) -> None:
        body = content.body
        size = len(body)
        headers = {
            "Docker-Distribution-API-Version": "registry/2.0",
            **content.headers,
            **shape.headers,
        }
        status = 200
        start = 0
        wanted = None if shape.ignore_range else record.header("Range")
        if wanted is not None:
            span = _parse_range(wanted, size)
            if span is None:
                headers["Content-Range"] = f"bytes */{size}"
                self._send_whole(handler, record, 416, headers, b"")
                return
            start, end = span
            body = body[start : end + 1]
            status = 206
            headers["Content-Range"] = shape.content_range or f"bytes {start}-{end}/{size}"
        if shape.flip is not None and start <= shape.flip < start + len(body):
            altered = bytearray(body)
            altered[shape.flip - start] ^= 0xFF
            body = bytes(altered)
        headers["Content-Length"] = str(len(body))
        self._start_response(handler, record, status, headers)
        if shape.gate is not None:
            try:
                shape.gate.wait(self.max_response_seconds)
            except threading.BrokenBarrierError:
                raise _Dropped from None
        cut = shape.close_after if shape.close_after is not None else shape.stall_after
        limit = len(body) if cut is None else min(cut, len(body))
        started = time.monotonic()
        deadline = started + self.max_response_seconds
        sent = 0
        while sent < limit:
            pause = shape.interval
            if shape.rate:
                pause = max(pause, started + sent / shape.rate - time.monotonic())
            if pause > 0 and self._pause(pause, deadline):
                raise _Dropped
            piece = body[sent : min(limit, sent + max(1, shape.chunk))]
            handler.wfile.write(piece)
            sent += len(piece)
            record.body_sent = sent
        if sent < len(body):
            if shape.stall_after is not None:
                self._pause(deadline - time.monotonic(), deadline)
            raise _Dropped

    def _flood(self, handler: _Handler, record: RecordedRequest, flood: Flood) -> None:
        headers = {"Content-Type": "application/json", **flood.headers}
        headers["Content-Length"] = str(flood.size)
        self._start_response(handler, record, 200, headers)
        deadline = time.monotonic() + self.max_response_seconds
        while record.body_sent < flood.size:
            if self._stopping.is_set() or time.monotonic() > deadline:
                raise _Dropped
            piece = _FLOOD_CHUNK[: flood.size - record.body_sent]
            handler.wfile.write(piece)
            record.body_sent += len(piece)

    def _pause(self, seconds: float, deadline: float) -> bool:
        """Sleep; True when the server is stopping or the response ran out of time."""
        seconds = min(seconds, deadline - time.monotonic())
        if seconds > 0 and self._stopping.wait(seconds):
            return True
        return time.monotonic() >= deadline


def _covers(record: RecordedRequest, content: _Content | None, offset: int) -> bool:
    """Whether the request asks for the content byte at ``offset``."""
    if content is None:
        return False
    size = len(content.body)
    wanted = record.header("Range")
    span = (0, size - 1) if wanted is None else _parse_range(wanted, size)
    return span is not None and span[0] <= offset <= span[1]


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` or ``bytes=a-`` → (a, b) clamped to the content; None if unsatisfiable."""
    unit, _, spec = value.strip().partition("=")
    first, dash, last = spec.partition("-")
    if unit != "bytes" or not dash or not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end


def _unknown_code(path: str) -> str:
    if "/manifests/" in path:
        return "MANIFEST_UNKNOWN"
    if "/blobs/" in path:
        return "BLOB_UNKNOWN"
    return "NAME_UNKNOWN"


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()
