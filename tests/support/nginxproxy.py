"""nginx in front of the registry with a per-connection bandwidth cap, as CDNs have.

CDNs and S3-backed registries limit what one connection can carry, so a single stream cannot
reach line rate however fast the client is; a client only gets past the cap by opening more
connections. ``limit_rate`` applies per request, and an HTTP/1.1 connection carries one
request at a time, so it caps each connection.

The proxy runs in the foreground (``daemon off``) with its own prefix, config, logs and
temporary directories, listens on a free loopback port and forwards everything to the
registry. Responses are not buffered (``proxy_buffering off``), so a 1 GiB blob streams
through memory instead of being spooled to a temporary file first; nginx forwards ``Range``
headers and the registry's 206 answers unchanged when it has no cache.
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.netutil import HARNESS_USER_AGENT, free_loopback_port

_PORT_ATTEMPTS = 5

_CONFIG = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log {access_log};
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;

        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            # Keep the client's Host so URLs the registry builds point back at the proxy.
            proxy_set_header Host $http_host;
            proxy_set_header Connection "";
            # Buffer in memory only: with proxy_max_temp_file_size 0 nginx never spools a
            # response to disk, it stops reading from the registry while its buffers are full.
            # (proxy_buffering off is no alternative: unbuffered responses ignore limit_rate.)
            proxy_buffering on;
            proxy_max_temp_file_size 0;
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            limit_rate {rate};
        }}
    }}
}}
"""


class ProxyStartError(RuntimeError):
    """nginx is missing, exited at start-up or never answered ``GET /v2/``."""


class RateCappedProxy:
    """A foreground nginx on ``127.0.0.1`` proxying to ``upstream`` at ``rate_bytes``/s per
    connection, logging every request to ``access_log``."""

    def __init__(
        self,
        upstream: str,
        *,
        rate_bytes: int,
        access_log: Path,
        binary: str = "/usr/sbin/nginx",
        startup_timeout: float = 15.0,
    ) -> None:
        self.upstream = upstream
        self.rate_bytes = rate_bytes
        self.access_log = access_log
        self.binary = binary
        self.startup_timeout = startup_timeout
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        if self._port is None:
            raise RuntimeError("proxy is not running")
        return f"127.0.0.1:{self._port}"

    def start(self) -> RateCappedProxy:
        """Start nginx and wait until it answers through to the registry; returns ``self``."""
        binary = shutil.which(self.binary)
        if binary is None:
            raise ProxyStartError(f"{self.binary} not found (apt-get install nginx-light)")
        try:
            self._launch(binary)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop nginx (fast shutdown on SIGTERM) and remove its prefix directory."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
            self._port = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RateCappedProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _launch(self, binary: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fastpull-bench-nginx-")
        prefix = Path(self._tmp.name)
        # When started as root, nginx's workers drop to an unprivileged user, which must be
        # able to reach the temporary directories below the (0700) prefix.
        prefix.chmod(0o755)
        config_path = prefix / "nginx.conf"
        error_log = prefix / "error.log"
        for _attempt in range(_PORT_ATTEMPTS):
            port = free_loopback_port()
            config_path.write_text(
                _CONFIG.format(
                    prefix=prefix,
                    access_log=self.access_log,
                    port=port,
                    upstream=self.upstream,
                    rate=self.rate_bytes,
                )
            )
            offset = error_log.stat().st_size if error_log.exists() else 0
            # -e: without it nginx first opens the packaged error log, /var/log/nginx/error.log.
            self._proc = subprocess.Popen(
                [binary, "-p", str(prefix), "-c", str(config_path), "-e", str(error_log)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self._port = port
            if self._wait_ready():
                return
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            self._port = None
            with error_log.open("rb") as fh:
                fh.seek(offset)
                attempt_log = fh.read().decode("utf-8", "replace")
            if "Address already in use" not in attempt_log:
                raise ProxyStartError(f"nginx did not start ({config_path}):\n{attempt_log}")
        raise ProxyStartError(f"no free port for nginx after {_PORT_ATTEMPTS} attempts")

    def _wait_ready(self) -> bool:
        """Poll ``GET /v2/`` through the proxy until the registry answers; False if nginx exits."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            conn = http.client.HTTPConnection(self.host, timeout=2.0)
            try:
                conn.request("GET", "/v2/", headers={"User-Agent": HARNESS_USER_AGENT})
                if conn.getresponse().status == 200:
                    return True
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.05)
        return False
