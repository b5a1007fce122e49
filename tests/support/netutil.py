"""Small HTTP helpers shared by the harness modules (stdlib only, no fastpull)."""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.request
from pathlib import Path
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
