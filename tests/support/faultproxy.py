"""A fault-injecting HTTP(S) proxy between the client under test and a real registry.

:class:`FaultProxy` listens on ``127.0.0.1`` and forwards every request to its upstream (the
real ``docker-registry`` of the ``registry`` fixtures, or anything else), so the client sees
the registry's genuine answers: its challenges, its error bodies, its digests. Rules, added
per test, change what happens to chosen requests:

* the request: :class:`DropRange` (forward it without ``Range``, so a 206 becomes a 200),
  :class:`ExpireToken` (a bearer token works once; later requests reach the registry without
  it and get its own 401);
* the answer instead of the registry's: :class:`Status` (500, 502, 503, 429, with or without
  ``Retry-After``), :class:`Redirect` (elsewhere, to ``http://``, or back to the proxy: a loop);
* the registry's answer, altered: :class:`Reset` (RST after N body bytes), :class:`Truncate`
  (clean close after N bytes; ``Content-Length`` still promises all), :class:`Stall` (silence
  after N bytes), :class:`Trickle` (1 byte a second after N), :class:`Extra` (bytes appended,
  ``Content-Length`` grown to match), :class:`Flip` (one byte inverted), :class:`SetHeaders`
  (a wrong ``Content-Range``, ``Content-Type``, ``Docker-Content-Digest``...).

A :class:`Rule` matches requests by method and a path regex (the URL-decoded path, without the
query), optionally only those that carry an ``Authorization`` header, and applies to the
``first``-th matching request and the ``times - 1`` after it (each rule counts the requests it
matches, whatever other rules did to them). The first rule that applies wins; requests no rule
claims are forwarded untouched.

Every request is recorded as the proxy received it (headers and body included, to check what
the client sent where) with the status and body bytes it got back, so tests can count requests
and bytes per path. ``upstream_headers`` are added to every forwarded request: a second proxy
posing as a CDN can reach a Basic-auth registry with credentials of its own while recording
that the client sent none.

Nothing here imports fastpull. Slow answers end after ``max_response_seconds`` or at once
when the proxy stops.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.netutil import LoopbackService, RequestRecord, TrackedHandler, connect

# Not forwarded either way: they describe one connection, not the message.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"}
)
_PIECE = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})

# -- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """Pass the request and the answer through unchanged (what unmatched requests get)."""


@dataclass(frozen=True)
class DropRange:
    """Forward without the ``Range`` header: the registry answers 200 with the whole blob."""


@dataclass(frozen=True)
class ExpireToken:
    """A bearer token is good for one request: a token seen before is stripped, so the
    registry itself answers 401 with its challenge, as for an expired token."""


@dataclass(frozen=True)
class Status:
    """Answer ``status`` without asking the registry; ``retry_after`` adds that header."""

    status: int
    retry_after: str | None = None
    body: bytes = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the fault proxy"}]}'
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Redirect:
    """Answer a redirect to ``location`` (absolute, or relative to the proxy)."""

    location: str
    status: int = 307


@dataclass(frozen=True)
class Reset:
    """Send the headers and ``after`` body bytes, then reset the connection (RST)."""

    after: int = 0


@dataclass(frozen=True)
class Truncate:
    """Send the headers and ``after`` body bytes, then close cleanly; the declared
    ``Content-Length`` still promises the whole body."""

    after: int = 0


@dataclass(frozen=True)
class Stall:
    """Send the headers and ``after`` body bytes, then nothing until the proxy stops or the
    answer's time bound runs out; then drop the connection."""

    after: int = 0


@dataclass(frozen=True)
class Trickle:
    """Send ``after`` body bytes at once, then the rest at ``rate`` bytes per second."""

    after: int = 0
    rate: float = 1.0


@dataclass(frozen=True)
class Extra:
    """Append ``data`` to the body and declare the longer length."""

    data: bytes = b"\x00" * 16


@dataclass(frozen=True)
class Flip:
    """Invert the body byte at ``offset`` (of this answer's body; ignored if shorter)."""

    offset: int = 0


@dataclass(frozen=True)
class SetHeaders:
    """Replace (or add) response headers; a value of ``None`` removes the header."""

    headers: Mapping[str, str | None]


Action = (
    Forward
    | DropRange
    | ExpireToken
    | Status
    | Redirect
    | Reset
    | Truncate
    | Stall
    | Trickle
    | Extra
    | Flip
    | SetHeaders
)


@dataclass
class Rule:
    """Apply ``action`` to requests number ``first`` .. ``first + times - 1`` (counting from
    1; ``times=None``: every one from ``first`` on) among those whose method is ``method``
    (any if None) and whose decoded path matches the regex ``path`` in full; with
    ``authorized``, only among those that carry an ``Authorization`` header."""

    action: Action
    path: str = ".*"
    method: str | None = "GET"
    first: int = 1
    times: int | None = 1
    authorized: bool = False
    seen: int = 0

    def __post_init__(self) -> None:
        self._pattern = re.compile(self.path)

    def claims(self, request: ProxiedRequest) -> bool:
        """Count the request if it matches; whether this rule acts on it."""
        if self.method is not None and request.method != self.method:
            return False
        if not self._pattern.fullmatch(request.path):
            return False
        if self.authorized and request.header("Authorization") is None:
            return False
        self.seen += 1
        if self.seen < self.first:
            return False
        return self.times is None or self.seen < self.first + self.times


# -- what happened -----------------------------------------------------------------------------


@dataclass
class ProxiedRequest(RequestRecord):
    """One request as the proxy received it, and what the client got back.

    ``hung_up`` tells that the client closed the connection while a stalled or trickled
    answer was still going (it gave up), rather than the proxy ending it; ``received`` is
    when the request arrived (``time.monotonic()``)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    action: Action
    body: bytes = b""
    status: int = 0
    body_sent: int = 0
    hung_up: bool = False
    received: float = field(default_factory=time.monotonic)


def manifest_path(repository: str, reference: str) -> str:
    """The path regex of one manifest (by tag or digest)."""
    return re.escape(f"/v2/{repository}/manifests/{reference}")


def blob_path(repository: str, digest: str) -> str:
    """The path regex of one blob."""
    return re.escape(f"/v2/{repository}/blobs/{digest}")


ANY_MANIFEST = r"/v2/.+/manifests/[^/]+"
ANY_BLOB = r"/v2/.+/blobs/[^/]+"


# -- the server --------------------------------------------------------------------------------


class _Dropped(Exception):
    """The answer ends by closing the connection (scripted, or the client hung up)."""


class _Handler(TrackedHandler):
    def do_GET(self) -> None:
        self.server.owner._handle(self)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET


class FaultProxy(LoopbackService):
    """A rule-driven proxy on ``127.0.0.1`` in front of ``upstream`` (``http(s)://host:port``).

    ``upstream_ca`` verifies an HTTPS upstream; with ``tls`` the proxy itself serves HTTPS
    with a certificate from a throwaway CA written to :attr:`ca_path`.
    """

    handler = _Handler
    thread_name = "fastpull-fault-proxy"

    def __init__(
        self,
        upstream: str,
        *,
        upstream_ca: str | Path | None = None,
        upstream_headers: Mapping[str, str] | None = None,
        tls: bool = False,
        max_response_seconds: float = 30.0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.upstream_ca = upstream_ca
        self.upstream_headers = dict(upstream_headers or {})
        super().__init__(tls=tls, max_response_seconds=max_response_seconds)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._requests: list[ProxiedRequest] = []
        self._tokens_seen: set[str] = set()

    # -- rules and records -----------------------------------------------------------------

    def add(self, *rules: Rule) -> None:
        """Add rules after those already there."""
        with self._lock:
            self._rules.extend(rules)

    def on(
        self,
        path: str,
        action: Action,
        *,
        method: str | None = "GET",
        first: int = 1,
        times: int | None = 1,
        authorized: bool = False,
    ) -> None:
        """Shorthand for ``add(Rule(action, path, method, first, times, authorized))``."""
        self.add(Rule(action, path, method, first, times, authorized))

    @property
    def requests(self) -> list[ProxiedRequest]:
        """Every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str, method: str | None = "GET") -> list[ProxiedRequest]:
        """The requests whose decoded path matches the regex ``path`` in full."""
        pattern = re.compile(path)
        return [
            r
            for r in self.requests
            if pattern.fullmatch(r.path) and (method is None or r.method == method)
        ]

    def bytes_sent(self, path: str) -> int:
        """Body bytes sent to the client for requests matching ``path``."""
        return sum(r.body_sent for r in self.requests_for(path, None))

    # -- serving ---------------------------------------------------------------------------

    def _choose(self, request: ProxiedRequest) -> Action:
        with self._lock:
            # Every rule counts the request, so "the n-th request for X" means just that.
            claimed = [rule for rule in self._rules if rule.claims(request)]
        return claimed[0].action if claimed else Forward()

    def _handle(self, handler: _Handler) -> None:
        method = handler.command
        headers = tuple(handler.headers.items())
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        record = ProxiedRequest(method, handler.path, headers, Forward(), body or b"")
        record.action = self._choose(record)
        with self._lock:
            self._requests.append(record)
        try:
            self._answer(handler, record, body)
        except (_Dropped, ConnectionError, TimeoutError, ssl.SSLError):
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)

    def _answer(self, handler: _Handler, record: ProxiedRequest, body: bytes | None) -> None:
        action = record.action
        if self._stopping.is_set():
            raise _Dropped
        if isinstance(action, Status):
            extra = {"Retry-After": action.retry_after} if action.retry_after is not None else {}
            answer = {"Content-Type": "application/json", **action.headers, **extra}
            self._send_whole(handler, record, action.status, answer, action.body)
            return
        if isinstance(action, Redirect):
            self._send_whole(handler, record, action.status, {"Location": action.location}, b"")
            return
        outgoing = [(k, v) for k, v in record.headers if k.lower() not in _HOP_BY_HOP]
        if isinstance(action, DropRange):
            outgoing = [(k, v) for k, v in outgoing if k.lower() != "range"]
        if isinstance(action, ExpireToken):
            outgoing = self._expire_token(outgoing)
        outgoing += list(self.upstream_headers.items())
        try:
            conn = connect(self.upstream, ca_path=self.upstream_ca, timeout=30)
            conn.putrequest(record.method, record.target, skip_host=True, skip_accept_encoding=True)
            for name, value in outgoing:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            upstream = conn.getresponse()
        except OSError as exc:
            message = f'{{"errors":[{{"code":"UNAVAILABLE","message":"proxy: {exc}"}}]}}'
            self._send_whole(handler, record, 502, {}, message.encode())
            return
        try:
            self._relay(handler, record, upstream)
        finally:
            conn.close()

    def _expire_token(self, outgoing: list[tuple[str, str]]) -> list[tuple[str, str]]:
        kept = []
        for name, value in outgoing:
            if name.lower() == "authorization" and value.lower().startswith("bearer "):
                with self._lock:
                    used = value in self._tokens_seen
                    self._tokens_seen.add(value)
                if used:
                    continue
            kept.append((name, value))
        return kept

    def _relay(
        self, handler: _Handler, record: ProxiedRequest, upstream: http.client.HTTPResponse
    ) -> None:
        action = record.action
        headers = [(k, v) for k, v in upstream.getheaders() if k.lower() not in _HOP_BY_HOP]
        has_body = record.method != "HEAD" and upstream.status not in _NO_BODY_STATUS
        declared = upstream.getheader("Content-Length")
        if has_body and declared is None:
            # A chunked answer (an error body, say): small, so read it whole.
            whole = upstream.read()
            headers.append(("Content-Length", str(len(whole))))
            pieces: Iterator[bytes] = iter([whole])
            size = len(whole)
        else:
            size = int(declared or 0)
            pieces = _read_pieces(upstream) if has_body else iter(())
        if isinstance(action, Extra):
            size += len(action.data)
            headers = _replace(headers, {"Content-Length": str(size)})
            pieces = _chain(pieces, action.data)
        if isinstance(action, SetHeaders):
            headers = _replace(headers, action.headers)
        record.status = upstream.status
        handler.send_response(upstream.status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.end_headers()
        if not has_body:
            return
        self._stream(handler, record, pieces, action)

    def _stream(
        self, handler: _Handler, record: ProxiedRequest, pieces: Iterator[bytes], action: Action
    ) -> None:
        cut: int | None = None
        if isinstance(action, (Reset, Truncate, Stall)):
            cut = action.after
        deadline = time.monotonic() + self.max_response_seconds
        for piece in pieces:
            if isinstance(action, Flip) and 0 <= action.offset - record.body_sent < len(piece):
                altered = bytearray(piece)
                altered[action.offset - record.body_sent] ^= 0xFF
                piece = bytes(altered)
            if cut is not None and record.body_sent + len(piece) >= cut:
                self._write(handler, record, piece[: cut - record.body_sent])
                self._break(handler, record, action, deadline)
            if isinstance(action, Trickle):
                self._trickle(handler, record, piece, action, deadline)
            else:
                self._write(handler, record, piece)

    def _write(self, handler: _Handler, record: ProxiedRequest, data: bytes) -> None:
        if data:
            handler.wfile.write(data)
            record.body_sent += len(data)

    def _trickle(
        self,
        handler: _Handler,
        record: ProxiedRequest,
        piece: bytes,
        action: Trickle,
        deadline: float,
    ) -> None:
        fast = max(0, min(len(piece), action.after - record.body_sent))
        self._write(handler, record, piece[:fast])
        for offset in range(fast, len(piece)):
            if self._pause(1.0 / action.rate, deadline, handler, record):
                raise _Dropped
            self._write(handler, record, piece[offset : offset + 1])

    def _break(
        self, handler: _Handler, record: ProxiedRequest, action: Action, deadline: float
    ) -> None:
        """End an answer early, as ``action`` says; always raises :class:`_Dropped`."""
        if isinstance(action, Stall):
            self._pause(deadline - time.monotonic(), deadline, handler, record)
        if isinstance(action, Reset):
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            with contextlib.suppress(OSError):
                handler.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                handler.connection.close()
        raise _Dropped

    def _send_whole(
        self,
        handler: _Handler,
        record: ProxiedRequest,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        record.status = status
        handler.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            handler.send_header(name, value)
        handler.end_headers()
        self._write(handler, record, body)

    def _pause(
        self, seconds: float, deadline: float, handler: _Handler, record: ProxiedRequest
    ) -> bool:
        """Wait; True when the client hung up, the proxy is stopping or time ran out.

        Mid-answer an HTTP/1.1 client sends nothing, so a readable socket means it closed
        the connection (or sent a TLS close_notify): it gave up on this answer.
        """
        until = min(time.monotonic() + seconds, deadline)
        while (left := until - time.monotonic()) > 0:
            if self._stopping.is_set():
                return True
            readable, _, _ = select.select([handler.connection], [], [], min(left, 0.05))
            if readable:
                record.hung_up = True
                return True
        return time.monotonic() >= deadline


def _read_pieces(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while piece := response.read(_PIECE):
        yield piece


def _chain(pieces: Iterator[bytes], tail: bytes) -> Iterator[bytes]:
    yield from pieces
    yield tail


def _replace(
    headers: list[tuple[str, str]], changes: Mapping[str, str | None]
) -> list[tuple[str, str]]:
    lowered = {name.lower() for name in changes}
    kept = [(k, v) for k, v in headers if k.lower() not in lowered]
    return kept + [(k, v) for k, v in changes.items() if v is not None]
