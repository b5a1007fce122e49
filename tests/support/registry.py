"""Run the real registry (Debian's ``docker-registry``, distribution 2.8) for tests.

:class:`RegistryServer` writes a config, starts ``docker-registry serve`` on a free loopback
port with filesystem storage in a temporary directory, and waits until ``GET /v2/`` answers.
It can serve plain HTTP or TLS (trustme certificate), and require htpasswd Basic auth or token
auth backed by :class:`~tests.support.tokenserver.TokenServer`.

The registry writes its JSON application log to stderr and a Combined Log Format access log to
stdout; both go to :attr:`RegistryServer.log_path`, and :meth:`RegistryServer.requests` parses
the access lines.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

import trustme

from tests.support.images import Pusher
from tests.support.netutil import HARNESS_USER_AGENT, connect, free_loopback_port
from tests.support.tokenserver import TokenPolicy, TokenServer

AuthMode = Literal["none", "htpasswd", "token"]

# One access-log line, e.g.
#   127.0.0.1 - - [28/Nov/2026:07:56:53 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<target>\S+) (?P<protocol>[^"]*)" '
    r"(?P<status>\d{3}) (?P<size>\S+) "
    r'"(?:[^"\\]|\\.)*" "(?P<agent>(?:[^"\\]|\\.)*)"'
)
_SYNC_PARAM = "fastpull-harness-sync"
_PORT_ATTEMPTS = 5


class RegistryUnavailable(RuntimeError):
    """The registry binary (or ``htpasswd``) is not installed."""


class RegistryStartError(RuntimeError):
    """The registry process exited or never answered ``GET /v2/``."""


class LoggedRequest(NamedTuple):
    """One access-log entry; ``path`` is the request target as logged, query included,
    ``size`` the body bytes sent and ``protocol`` the HTTP version (``HTTP/1.1``)."""

    method: str
    path: str
    status: int
    size: int = 0
    protocol: str = ""


class RegistryServer:
    """A real ``docker-registry`` process on ``127.0.0.1``.

    With ``auth="token"`` and no ``token_server`` a :class:`TokenServer` is created (HTTPS,
    same CA as the registry) with one user, ``username``/``password``, and stopped with the
    registry. :attr:`ca_pem_path` then trusts both the registry and the token realm.
    """

    def __init__(
        self,
        *,
        tls: bool = False,
        auth: AuthMode = "none",
        username: str = "fastpull",
        password: str = "fastpull-secret",
        token_server: TokenServer | None = None,
        ca: trustme.CA | None = None,
        workdir: str | Path | None = None,
        binary: str = "docker-registry",
        startup_timeout: float = 20.0,
    ) -> None:
        if auth not in ("none", "htpasswd", "token"):
            raise ValueError(f"unknown auth mode {auth!r}")
        self.tls = tls
        self.auth = auth
        self.username = username if auth != "none" else None
        self.password = password if auth != "none" else None
        self.token_server = token_server
        self.ca = ca or trustme.CA()
        self.binary = binary
        self.startup_timeout = startup_timeout
        self._workdir = Path(workdir) if workdir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._owns_token_server = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self.log_path: Path | None = None
        self.ca_pem_path: Path | None = None
        self.storage_path: Path | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> RegistryServer:
        """Start the registry and wait until it answers; returns ``self``."""
        binary = shutil.which(self.binary)
        if binary is None:
            raise RegistryUnavailable(f"{self.binary!r} not found on PATH")
        htpasswd = shutil.which("htpasswd")
        if self.auth == "htpasswd" and htpasswd is None:
            raise RegistryUnavailable("'htpasswd' (apache2-utils) not found on PATH")
        try:
            self._prepare(htpasswd)
            self._launch(binary)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the registry (and an owned token server) and remove its files."""
        if "pusher" in self.__dict__:
            self.__dict__.pop("pusher").close()
        if self._proc is not None:
            terminate(self._proc)
            self._proc = None
        if self._owns_token_server and self.token_server is not None:
            self.token_server.stop()
            self.token_server = None
            self._owns_token_server = False
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._workdir = None

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses and clients -------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        if self._port is None:
            raise RuntimeError("registry is not running")
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        """``http://HOST`` or ``https://HOST``."""
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def ca_path(self) -> Path | None:
        """Alias of :attr:`ca_pem_path`."""
        return self.ca_pem_path

    @cached_property
    def pusher(self) -> Pusher:
        """A :class:`Pusher` configured with this registry's URL, CA and credentials."""
        return Pusher(
            self.url, ca_path=self.ca_pem_path, username=self.username, password=self.password
        )

    def blob_data_path(self, digest: str) -> Path:
        """Where filesystem storage keeps a blob's bytes (to corrupt or remove it in tests)."""
        assert self.storage_path is not None
        algorithm, hex_digest = digest.split(":", 1)
        return (
            self.storage_path
            / "docker/registry/v2/blobs"
            / algorithm
            / hex_digest[:2]
            / hex_digest
            / "data"
        )

    # -- access log ------------------------------------------------------------------------

    def mark(self) -> int:
        """Return a log position; pass it to :meth:`requests` as ``since``."""
        self._sync_log()
        assert self.log_path is not None
        return self.log_path.stat().st_size

    def requests(self, since: int = 0, *, include_harness: bool = False) -> list[LoggedRequest]:
        """Requests the registry logged after position ``since`` (see :meth:`mark`).

        The registry writes an access line only after the response is sent, so this first makes
        a marker request and waits for its line; every request answered before the call is
        then in the log. The harness's own traffic (pushes, readiness probes, markers) is left
        out unless ``include_harness``.
        """
        self._sync_log()
        assert self.log_path is not None
        with self.log_path.open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode("utf-8", "replace")
        entries = []
        for line in text.splitlines():
            match = _ACCESS_LINE.match(line)
            if match is None:
                continue
            if not include_harness and match["agent"].startswith(HARNESS_USER_AGENT):
                continue
            size = int(match["size"]) if match["size"].isdigit() else 0
            entries.append(
                LoggedRequest(
                    match["method"], match["target"], int(match["status"]), size, match["protocol"]
                )
            )
        return entries

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the registry's log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return "<no log>"
        return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])

    # -- internals -------------------------------------------------------------------------

    def _prepare(self, htpasswd: str | None) -> None:
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fastpull-registry-")
            self._workdir = Path(self._tmp.name)
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.storage_path = self._workdir / "storage"
        self.storage_path.mkdir(exist_ok=True)
        self.log_path = self._workdir / "registry.log"

        ca_pems: list[bytes] = []
        if self.tls:
            cert = self.ca.issue_cert("127.0.0.1", "localhost")
            cert.cert_chain_pems[0].write_to_path(str(self._workdir / "tls.crt"))
            cert.private_key_pem.write_to_path(str(self._workdir / "tls.key"))
            ca_pems.append(self.ca.cert_pem.bytes())
        if self.auth == "htpasswd":
            assert htpasswd is not None and self.username and self.password is not None
            # The registry accepts only bcrypt entries, hence -B.
            entry = subprocess.run(
                [htpasswd, "-Bbn", self.username, self.password],
                check=True,
                capture_output=True,
            ).stdout
            (self._workdir / "htpasswd").write_bytes(entry)
        if self.auth == "token":
            if self.token_server is None:
                assert self.username and self.password is not None
                self.token_server = TokenServer(
                    TokenPolicy(users={self.username: self.password}),
                    ca=self.ca,
                    workdir=self._workdir / "tokens",
                )
                self._owns_token_server = True
                self.token_server.start()
            token_ca = self.token_server.ca
            if token_ca is not None and (token_ca is not self.ca or not self.tls):
                ca_pems.append(token_ca.cert_pem.bytes())
        if ca_pems:
            self.ca_pem_path = self._workdir / "ca.pem"
            self.ca_pem_path.write_bytes(b"".join(ca_pems))

    def _config(self, port: int) -> dict[str, Any]:
        assert self._workdir is not None and self.storage_path is not None
        http: dict[str, Any] = {
            "addr": f"127.0.0.1:{port}",
            # A fixed secret silences the "No HTTP secret provided" warning at startup.
            "secret": secrets.token_hex(16),
        }
        if self.tls:
            http["tls"] = {
                "certificate": str(self._workdir / "tls.crt"),
                "key": str(self._workdir / "tls.key"),
            }
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_path)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self.auth == "htpasswd":
            config["auth"] = {
                "htpasswd": {
                    "realm": "fastpull-test-registry",
                    "path": str(self._workdir / "htpasswd"),
                }
            }
        elif self.auth == "token":
            assert self.token_server is not None
            config["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.token_server.service,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(self.token_server.rootcertbundle_path),
                }
            }
        return config

    def _launch(self, binary: str) -> None:
        assert self._workdir is not None and self.log_path is not None
        config_path = self._workdir / "config.yml"
        # REGISTRY_* variables override the config file; never inherit them from the shell.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        for _attempt in range(_PORT_ATTEMPTS):
            port = free_loopback_port()
            # JSON is valid YAML, and spares us quoting rules for paths and URLs.
            config_path.write_text(json.dumps(self._config(port), indent=2))
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            # O_APPEND lets the access log (stdout) and the JSON log (stderr) share one file.
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [binary, "serve", str(config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            self._port = port
            if self._wait_ready():
                return
            returncode = self._proc.poll()
            terminate(self._proc)
            self._proc = None
            self._port = None
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                attempt_log = fh.read().decode("utf-8", "replace")
            if "address already in use" not in attempt_log:
                raise RegistryStartError(
                    f"docker-registry did not start (exit status {returncode}, "
                    f"config {config_path}); log tail:\n{self.log_tail()}"
                )
        raise RegistryStartError(
            f"no free port after {_PORT_ATTEMPTS} attempts; log tail:\n{self.log_tail()}"
        )

    def _wait_ready(self) -> bool:
        """Poll ``GET /v2/`` until it answers 200/401; False if the process exits first."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                status = self._get(f"/v2/?{_SYNC_PARAM}=ready", timeout=2.0)
            except OSError:
                status = None
            if status in (200, 401):
                return True
            time.sleep(0.05)
        return False

    def _get(self, target: str, timeout: float) -> int:
        conn = connect(self.url, ca_path=self.ca_pem_path, timeout=timeout)
        try:
            conn.request("GET", target, headers={"User-Agent": HARNESS_USER_AGENT})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def _sync_log(self, timeout: float = 10.0) -> None:
        """Make a marker request and wait until its access line has been written."""
        assert self.log_path is not None
        marker = f"{_SYNC_PARAM}={uuid.uuid4().hex}".encode()
        start = self.log_path.stat().st_size
        self._get(f"/v2/?{marker.decode()}", timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            with self.log_path.open("rb") as fh:
                fh.seek(start)
                if marker in fh.read():
                    return
            if time.monotonic() > deadline:
                raise RegistryStartError(f"marker {marker!r} never reached {self.log_path}")
            time.sleep(0.01)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process politely, then forcefully."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
