"""Small HTTP helpers shared by the harness modules (stdlib only, no fastpull)."""

from __future__ import annotations

import http.client
import socket
import ssl
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP(S) server on 127.0.0.1 (free port) for the harness's own servers.

    The TLS handshake happens in the handler thread, not in ``accept()``, so a client that
    never completes it cannot block the accept loop; clients that reject the certificate or
    hang up mid-response are what tests provoke, so they are not reported as errors.
    """

    daemon_threads = True

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
