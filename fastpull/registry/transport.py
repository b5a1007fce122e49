"""HTTP over libcurl: one place that configures handles, follows redirects safely,
retries, and turns curl failures into fastpull errors.

Redirects are followed here, never by libcurl (``FOLLOWLOCATION`` is off), and every
answer is judged by the one response policy in :mod:`fastpull.registry.responses`, which
the blob engine uses too.

Every transfer runs on a ``CurlMulti`` polled in short slices, so Ctrl-C is seen within
a fraction of a second even while a server is silent.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

import pycurl

from fastpull import cancel
from fastpull.errors import (
    ConnectionFailed,
    Denied,
    FastpullError,
    NotFound,
    ProtocolError,
    RegistryError,
    ResponseTooLarge,
    ServerError,
    TLSFailure,
    TooManyRequests,
    Unauthorized,
    parse_diagnostics,
    redact_url,
)
from fastpull.registry.responses import (
    MAX_REDIRECTS,
    RETRYABLE_STATUS,
    Origin,
    Redirect,
    RetryAfter,
    RetryPolicy,
    classify,
    next_hop,
    origin,
    parse_retry_after,
)

USER_AGENT = "fastpull/0.1 (+libcurl)"
# Error and token bodies are capped; manifests have their own cap (manifest.MAX_MANIFEST_SIZE).
MAX_SMALL_BODY = 1 << 20
# The speed below which a transfer counts as stalled (bytes per second).
STALL_FLOOR = 1024
# Bytes libcurl asks an upload body for at a time (its default, 64 KiB, costs a Python
# call per 64 KiB).
UPLOAD_BUFFER = 1 << 20

_SYSTEM_CA_CANDIDATES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)


class TLSConfig(NamedTuple):
    """How to talk TLS to one origin: verify or not, which CA file, optional client cert."""

    verify: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


def tls_per_origin(tls_for: Callable[[str], TLSConfig]) -> Callable[[str], TLSConfig]:
    """``tls_for``, asked once per origin: its answer depends on the origin alone, and
    finding it reads certs.d, which a run of hundreds of requests need not do each time."""
    known: dict[Origin, TLSConfig] = {}

    def lookup(url: str) -> TLSConfig:
        key = origin(url)
        tls = known.get(key)
        if tls is None:
            tls = known[key] = tls_for(url)
        return tls

    return lookup


@functools.cache
def system_ca_file() -> str | None:
    """The distribution's CA bundle; the pycurl wheel's libcurl may not know where it is."""
    import ssl  # only HTTPS needs it: a plain-HTTP pull does not pay for loading it

    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, *_SYSTEM_CA_CANDIDATES):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


class Response(NamedTuple):
    """A complete HTTP response with its body (bodies here are always small)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    url: str

    def header(self, name: str) -> str | None:
        """The last value of a header (names compare case-insensitively)."""
        name = name.lower()
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        """Every value of a header, in order."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]


def parse_header_line(line: bytes, headers: list[tuple[str, str]]) -> int | None:
    """Feed one raw header line; returns the status code on a status line.

    A status line resets the list, so only the final response's headers remain
    (libcurl passes along the headers of 100-continue and proxy CONNECT responses too).
    """
    text = line.decode("iso-8859-1").rstrip("\r\n")
    if text.startswith("HTTP/"):
        headers.clear()
        parts = text.split(" ", 2)
        if len(parts) >= 2 and parts[1].isdigit():
            return int(parts[1])
        return None
    name, sep, value = text.partition(":")
    if sep and name and name == name.strip():
        headers.append((name.lower(), value.strip()))
    return None


def configure_easy(
    easy: pycurl.Curl,
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    tls: TLSConfig | None = None,
    body: bytes | None = None,
    stall_seconds: int = 60,
    stall_floor: int = 1,
    upload: Callable[[int], bytes] | None = None,
    upload_size: int = 0,
) -> None:
    """Set every option fastpull relies on; shared by small requests and blob downloads.

    A transfer moving fewer than ``stall_floor`` bytes a second for ``stall_seconds`` is
    dropped (libcurl's low-speed limit), so a silent or trickling server cannot hold it.
    ``upload`` (a ``read(size)`` function, e.g. a file's) streams ``upload_size`` bytes as
    the body of a PUT or PATCH, so a blob is never held in memory whole.
    """
    easy.setopt(pycurl.URL, url)
    easy.setopt(pycurl.NOSIGNAL, 1)
    easy.setopt(pycurl.FOLLOWLOCATION, 0)
    easy.setopt(pycurl.UNRESTRICTED_AUTH, 0)
    easy.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    easy.setopt(pycurl.USERAGENT, USER_AGENT)
    easy.setopt(pycurl.CONNECTTIMEOUT, 30)
    easy.setopt(pycurl.LOW_SPEED_LIMIT, stall_floor)
    easy.setopt(pycurl.LOW_SPEED_TIME, stall_seconds)
    easy.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in (headers or {}).items()])
    if method == "HEAD":
        easy.setopt(pycurl.NOBODY, 1)
    elif method == "POST":
        easy.setopt(pycurl.POST, 1)
        easy.setopt(pycurl.POSTFIELDS, body or b"")
    elif method != "GET":
        easy.setopt(pycurl.CUSTOMREQUEST, method)
    if upload is not None:
        easy.setopt(pycurl.UPLOAD, 1)
        easy.setopt(pycurl.READFUNCTION, upload)
        easy.setopt(pycurl.INFILESIZE_LARGE, upload_size)
        easy.setopt(pycurl.UPLOAD_BUFFERSIZE, UPLOAD_BUFFER)
    tls = tls or TLSConfig()
    if url.lower().startswith("https:"):
        # HTTP/1.1 even where the server offers HTTP/2: every transfer has its own
        # connection anyway (no multiplexing, see engine/worker.py), and a Go registry spends
        # about a third more CPU per byte serving HTTP/2 (measured against docker-registry:
        # 1.08 against 0.82 CPU-s/GB), CPU that a shared machine takes from the pull.
        easy.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        easy.setopt(pycurl.SSL_VERIFYPEER, 1 if tls.verify else 0)
        easy.setopt(pycurl.SSL_VERIFYHOST, 2 if tls.verify else 0)
        # Without verification no CA is read: loading the system bundle costs milliseconds.
        ca = (tls.ca_file or system_ca_file()) if tls.verify else None
        if ca:
            easy.setopt(pycurl.CAINFO, ca)
        if tls.verify and tls.ca_file and os.path.isdir("/etc/ssl/certs"):
            # A registry's own CA is added to the system roots, as docker's certs.d does.
            easy.setopt(pycurl.CAPATH, "/etc/ssl/certs")
        if tls.client_cert and tls.client_key:
            easy.setopt(pycurl.SSLCERT, tls.client_cert)
            easy.setopt(pycurl.SSLKEY, tls.client_key)


# curl error codes (curl/curl.h) grouped by what they mean to a user.
_TLS_CODES = {35, 51, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98}
_RESOLVE_CODES = {5, 6}


def curl_error(code: int, message: str, url: str) -> FastpullError:
    """Map a libcurl error to the fastpull error a user can act on (the one place for it)."""
    host = urlsplit(url).netloc.rpartition("@")[2] or url
    if code in _RESOLVE_CODES:
        return ConnectionFailed(f"cannot reach registry {host}: could not resolve host", host=host)
    if code == 7:
        return ConnectionFailed(
            f"cannot reach registry {host}: connection refused", host=host, refused=True
        )
    if code == 52:
        return ConnectionFailed(
            f"connection to {host} failed: closed without an answer", host=host, refused=True
        )
    if code == 28:
        return ConnectionFailed(f"cannot reach registry {host}: timed out ({message})", host=host)
    if code in _TLS_CODES:
        return TLSFailure(f"TLS error talking to {host}: {message}", host=host)
    return ConnectionFailed(f"connection to {host} failed: {message}", host=host)


def drive(multi: pycurl.CurlMulti, until: Callable[[], bool], slice_seconds: float = 0.2) -> None:
    """Run a multi handle until ``until()`` is true, waking often enough for signals."""
    while not until():
        cancel.check()
        status, _ = multi.perform()
        while status == pycurl.E_CALL_MULTI_PERFORM:
            status, _ = multi.perform()
        if until():
            return
        multi.select(slice_seconds)


@dataclass
class _Capture:
    max_body: int
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    overflow: bool = False

    def on_header(self, line: bytes) -> None:
        status = parse_header_line(line, self.headers)
        if status is not None:
            self.status = status

    def on_body(self, data: bytes) -> int | None:
        self.size += len(data)
        if self.size > self.max_body:
            self.overflow = True
            return 0  # abort the transfer: a body this large is not what we asked for
        self.chunks.append(data)
        return None


class Transport:
    """Small HTTP requests (ping, manifests, tokens, tag lists) with retries and redirects.

    ``tls_for(url)`` decides TLS settings per origin, asked once per origin
    (:func:`tls_per_origin`). An answer slower than 1 KiB/s for
    ``stall_seconds`` is dropped and asked again, as blob transfers are (``--stall-timeout``):
    small bodies arrive in one go, so only a server that stalls or trickles is affected.
    ``sleep`` is injectable for tests.
    """

    def __init__(
        self,
        tls_for: Callable[[str], TLSConfig] | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        stall_seconds: int = 30,
    ) -> None:
        self._tls_for = tls_per_origin(tls_for) if tls_for else lambda _url: TLSConfig()
        self.retry = retry or RetryPolicy()
        self.stall_seconds = stall_seconds
        self._sleep = sleep
        self._multi = pycurl.CurlMulti()
        self._easy = pycurl.Curl()

    def close(self) -> None:
        """Release the libcurl handles (and with them the kept-alive connections)."""
        self._easy.close()
        self._multi.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pause(self, seconds: float) -> None:
        cancel.pause(seconds, self._sleep)

    def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        max_body: int = MAX_SMALL_BODY,
        upload: Callable[[int], bytes] | None = None,
        upload_size: int = 0,
    ) -> Response:
        """One attempt, no redirects. Raises on network failure or an oversized body.

        ``upload`` streams a request body (see :func:`configure_easy`).
        """
        easy = self._easy
        easy.reset()
        configure_easy(
            easy,
            url,
            method=method,
            headers=headers,
            tls=self._tls_for(url),
            body=body,
            stall_seconds=self.stall_seconds,
            stall_floor=STALL_FLOOR,
            upload=upload,
            upload_size=upload_size,
        )
        capture = _Capture(max_body)
        easy.setopt(pycurl.HEADERFUNCTION, capture.on_header)
        easy.setopt(pycurl.WRITEFUNCTION, capture.on_body)
        done: list[tuple[int, str] | None] = []
        self._multi.add_handle(easy)
        try:

            def finished() -> bool:
                _, ok, failed = self._multi.info_read()
                if ok:
                    done.append(None)
                for _handle, code, message in failed:
                    done.append((code, message))
                return bool(done)

            drive(self._multi, finished)
        finally:
            self._multi.remove_handle(easy)
        if capture.overflow:
            raise ResponseTooLarge(
                f"response from {redact_url(url)} is larger than {max_body} bytes; refused",
                limit=max_body,
            )
        failure = done[0]
        if failure is not None:
            raise curl_error(failure[0], failure[1], url) from None
        status = capture.status or int(easy.getinfo(pycurl.RESPONSE_CODE))
        return Response(status, tuple(capture.headers), b"".join(capture.chunks), url)

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        max_body: int = MAX_SMALL_BODY,
    ) -> Response:
        """Send with retries (network errors, 408/429/5xx) and safe redirect following.

        Credentials (``Authorization``) are only kept while the redirect stays on the
        original origin; a redirect that would carry a request body (an OAuth form with a
        refresh token) to another origin is refused. The final response is returned
        whatever its status, except that 429 and 5xx still failing after all attempts raise.
        """
        retries = self.retry.begin()
        current = url
        hdrs = dict(headers or {})
        registry = origin(url)
        hops = 0
        while True:
            try:
                response = self.send(method, current, hdrs, body, max_body)
            except ConnectionFailed:
                retries = retries.failed(0, time.monotonic())
                if retries.exhausted:
                    raise
                self._pause(retries.delay())
                continue
            action = classify(response.status, dict(response.headers), current, registry, hops=hops)
            match action:
                case Redirect(target, keep_auth):
                    hops += 1
                    if response.status == 303:
                        method, body = "GET", None
                    if body and origin(target) != origin(current):
                        raise ProtocolError(
                            f"{redact_url(current)} redirected a {method} to another origin "
                            f"({redact_url(target)}); refused, its body would go along"
                        )
                    if not keep_auth:
                        hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
                    current = target
                case RetryAfter(seconds):
                    retries = retries.failed(0, time.monotonic())
                    if retries.exhausted:
                        raise http_error(response, redact_url(url))
                    self._pause(retries.delay(seconds))
                case _:
                    # A refusal is the caller's to judge (a 401 is answered by logging in).
                    return response


def http_error(response: Response, what: str) -> FastpullError:
    """The error docker would print for a failed response, using the spec's error body.

    The single place where HTTP statuses become fastpull errors; at most 64 KiB of the
    body is read, and only the registry's error codes and messages are shown.
    """
    diagnostics = parse_diagnostics(response.body)
    shown: list[str] = []
    for diagnostic in diagnostics:
        # MANIFEST_UNKNOWN reads as docker prints it: "manifest unknown".
        for text in (diagnostic.code.lower().replace("_", " "), diagnostic.message.lower()):
            if text and text not in shown:
                shown.append(text)
    detail = ": ".join(shown)
    host = urlsplit(response.url).netloc.rpartition("@")[2]
    status = response.status
    kind: type[RegistryError]
    if status == 401:
        kind, message = Unauthorized, f"unauthorized: authentication required ({what})"
    elif status == 403:
        kind, message = Denied, f"denied: requested access to the resource is denied ({what})"
    elif status == 404:
        kind, message = NotFound, f"{what} not found: {detail or 'not found'}"
    elif status == 429:
        kind = TooManyRequests
        message = (
            f"toomanyrequests: {host} is rate limiting requests (HTTP 429, still after "
            "retries); wait, or log in for a higher limit"
        )
    elif status >= 500:
        kind, message = ServerError, f"{what}: {host} answered HTTP {status} (still after retries)"
    else:
        kind = ProtocolError
        message = f"{what}: {host} answered HTTP {status}" + (f": {detail}" if detail else "")
    return kind(
        message,
        status=status,
        diagnostics=diagnostics,
        host=host,
        retry_after=parse_retry_after(response.header("retry-after")),
    )


__all__ = [
    "MAX_REDIRECTS",
    "MAX_SMALL_BODY",
    "RETRYABLE_STATUS",
    "STALL_FLOOR",
    "Response",
    "RetryPolicy",
    "TLSConfig",
    "Transport",
    "configure_easy",
    "curl_error",
    "drive",
    "http_error",
    "next_hop",
    "origin",
    "parse_header_line",
    "parse_retry_after",
    "system_ca_file",
    "tls_per_origin",
]
