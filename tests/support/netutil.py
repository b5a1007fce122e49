"""Small HTTP helpers shared by the harness modules (stdlib and trustme, no fastpull)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import trustme

# The harness marks its own traffic so request logs can tell it apart from the client under test.
HARNESS_USER_AGENT = "fastpull-test-harness/1"


def ssl_context(ca_path: str | Path | None) -> ssl.SSLContext:
    """Return a verifying client context that trusts ``ca_path`` (or the system store)."""
    return ssl.create_default_context(cafile=str(ca_path) if ca_path else None)


def connect(
    url: str, *, ca_path: str | Path | None = None, timeout: float = 60.0
) -> http.client.HTTPConnection:
    """Open an ``HTTPConnection`` or ``HTTPSConnection`` to the origin of ``url``."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(
            parts.netloc, timeout=timeout, context=ssl_context(ca_path)
        )
    if parts.scheme == "http":
        return http.client.HTTPConnection(parts.netloc, timeout=timeout)
    raise ValueError(f"unsupported URL scheme in {url!r}")


def url_opener(ca_path: str | Path | None = None) -> urllib.request.OpenerDirector:
    """Build a urllib opener that ignores proxy variables from the developer's shell.

    Loopback test servers must never be reached through ``http_proxy``.
    """
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=ssl_context(ca_path)),
    )


def free_loopback_port() -> int:
    """Ask the kernel for a currently free TCP port on 127.0.0.1.

    The port is released before returning, so another process may grab it first; callers that
    hand it to a subprocess must be ready to retry.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RequestRecord:
    """What the recorded requests of the harness's servers share: the request target and
    headers, and lookups on them."""

    target: str
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        """The URL-decoded path, without the query string."""
        return unquote(urlsplit(self.target).path)

    def header(self, name: str) -> str | None:
        """The last value of a request header (names compare case-insensitively)."""
        name = name.lower()
        for key, value in reversed(self.headers):
            if key.lower() == name:
                return value
        return None


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP(S) server on 127.0.0.1 (free port) for the harness's own servers.

    The TLS handshake happens in the handler thread, not in ``accept()``, so a client that
    never completes it cannot block the accept loop; clients that reject the certificate or
    hang up mid-response are what tests provoke, so they are not reported as errors.
    """

    daemon_threads = True
    # socketserver's default backlog is 5; a client opening all its connections at once
    # would see the rest wait for SYN retries, which no real registry makes it do.
    request_queue_size = 128

    def __init__(
        self, handler: type[BaseHTTPRequestHandler], ssl_context: ssl.SSLContext | None
    ) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.ssl_context = ssl_context

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` this server listens on."""
        return f"127.0.0.1:{self.server_address[1]}"

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class ServiceHTTPServer(LoopbackHTTPServer):
    """The HTTP server of a :class:`LoopbackService`; handlers reach it as ``owner``."""

    # stop() joins handler threads itself, with a bound; server_close() must not wait forever.
    block_on_close = False

    def __init__(
        self,
        owner: LoopbackService,
        handler: type[BaseHTTPRequestHandler],
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(handler, ssl_context)
        self.owner = owner


class TrackedHandler(BaseHTTPRequestHandler):
    """A keep-alive handler whose connection its service tracks, so that ``stop`` can end
    it; requests are recorded by the services, not logged."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle kept-alive connection must not hold its thread past the test
    server: ServiceHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.owner.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # a connection the test reset on purpose
        finally:
            self.server.owner.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request stderr output."""


class LoopbackService:
    """Base of the harness's scripted servers: serves ``handler`` on 127.0.0.1 from a
    background thread, over HTTPS with a throwaway trustme CA (``ca_path``) if ``tls``, and
    on ``stop`` ends every open connection and slow answer within a bound."""

    handler: type[TrackedHandler] = TrackedHandler
    thread_name = "fastpull-test-server"

    def __init__(self, *, tls: bool = False, max_response_seconds: float = 30.0) -> None:
        self.tls = tls
        self.max_response_seconds = max_response_seconds
        self.ca_path: Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._live: dict[socket.socket, threading.Thread] = {}
        self._live_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ServiceHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Start serving in a background thread; returns ``self``."""
        context = self._ssl_context() if self.tls else None
        self._httpd = ServiceHTTPServer(self, self.handler, context)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=self.thread_name,
            daemon=True,
        )
        self._thread.start()
        return self

    def _ssl_context(self) -> ssl.SSLContext:
        """A server context with a certificate of a throwaway CA, written to ``ca_path``."""
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.thread_name}-")
        self.ca_path = Path(self._tmp.name) / "ca.pem"
        return serving_context(trustme.CA(), self.ca_path)

    def _before_stop(self) -> None:
        """End whatever waits on something other than a connection (a hook)."""

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every slow answer and open connection, and clean up."""
        self._stopping.set()
        self._before_stop()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._live_lock:
            live = list(self._live.items())
        for sock, _thread in live:
            # Wakes handlers blocked reading a kept-alive connection.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _sock, thread in live:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        if self._httpd is None:
            raise RuntimeError(f"{self.thread_name} is not running")
        return self._httpd.host

    @property
    def url(self) -> str:
        """``http://HOST`` or ``https://HOST``."""
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def track(self, sock: socket.socket) -> None:
        """A handler thread serves ``sock`` now."""
        with self._live_lock:
            self._live[sock] = threading.current_thread()

    def untrack(self, sock: socket.socket) -> None:
        """The handler of ``sock`` is done with it."""
        with self._live_lock:
            self._live.pop(sock, None)


def serving_context(ca: trustme.CA, ca_path: Path) -> ssl.SSLContext:
    """A TLS server context for 127.0.0.1/localhost signed by ``ca``, whose certificate is
    written to ``ca_path`` for clients to trust."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca.cert_pem.write_to_path(str(ca_path))
    return context
