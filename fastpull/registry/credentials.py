"""Registry credentials, read from and written to docker's own ``config.json``.

fastpull shares docker's credential storage so that an existing ``docker login`` works
unchanged and ``fastpull login`` is visible to docker. Lookup follows docker/cli:

1. ``DOCKER_AUTH_CONFIG`` (a JSON document shaped like config.json; only its ``auths``
   are used, as docker does), then
2. the credential helper named by ``credHelpers[<key>]``, else by ``credsStore``, else
3. the ``auths`` entry of ``$DOCKER_CONFIG/config.json`` (default ``~/.docker``).

Helpers speak the docker-credential-helpers protocol: ``docker-credential-NAME
get|store|erase``, server URL or JSON on stdin, JSON ``{ServerURL, Username, Secret}`` on
stdout. No message built here ever contains a secret or a helper's stdout.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from fastpull.errors import ConfigError, CredentialError
from fastpull.types import Credentials

if TYPE_CHECKING:
    import subprocess

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
# Every name Docker Hub goes by; keys for any of them find Hub credentials.
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

HELPER_TIMEOUT = 30.0
_HELPER_PREFIX = "docker-credential-"
# Helpers return (and take) identity tokens under this pseudo user name.
_TOKEN_USERNAME = "<token>"
_NOT_FOUND_TEXT = "credentials not found in native keychain"
# The name becomes part of an executable name: a slash would let config.json run any
# program by path.
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENTRY_STRING_FIELDS = ("auth", "username", "password", "identitytoken", "registrytoken")
_MAX_DETAIL = 200
# A "Secret" member of a helper's JSON reply, wherever it turns up.
_SECRET_FIELD = re.compile(r'("Secret"\s*:\s*)"(?:[^"\\]|\\.)*"')


def docker_config_dir() -> Path:
    """The docker CLI configuration directory: ``$DOCKER_CONFIG``, else ``~/.docker``."""
    configured = os.environ.get("DOCKER_CONFIG")
    if configured:
        return Path(configured)
    return Path.home() / ".docker"


def config_key(registry: str) -> str:
    """The key docker uses for ``registry`` in ``auths`` and when talking to helpers."""
    if registry.lower() in _DOCKER_HUB_HOSTS:
        return DOCKER_HUB_KEY
    return registry


def _key_host(key: str) -> str:
    """Reduce a config key to a comparable ``host[:port]``, as docker's ConvertToHostname.

    Keys written by various tools look like ``host``, ``https://host``, ``http://host:5000``
    or ``https://host/v1/``; all Docker Hub names collapse to ``docker.io``.
    """
    host = ""
    if "://" in key:
        try:
            parts = urlsplit(key)
            name, port = parts.hostname, parts.port
        except ValueError:
            name, port = None, None
        if name:
            name = f"[{name}]" if ":" in name else name
            host = name if port is None else f"{name}:{port}"
    if not host:
        host = key.split("/", 1)[0]
    host = host.lower()
    return "docker.io" if host in _DOCKER_HUB_HOSTS else host


def _parse_config(raw: bytes, source: str) -> dict[str, Any]:
    """Parse and shape-check a config.json document; ``source`` names it in errors."""
    if not raw.strip():
        # docker treats an empty config file as an empty configuration.
        return {}
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        # exc.msg describes the syntax error without quoting the document.
        raise ConfigError(
            f"{source}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    auths = doc.get("auths")
    if auths is not None:
        if not isinstance(auths, dict):
            raise ConfigError(f"{source}: 'auths' must be an object")
        for key, entry in auths.items():
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: auths[{key!r}] must be an object")
            for field in _ENTRY_STRING_FIELDS:
                if entry.get(field) is not None and not isinstance(entry[field], str):
                    raise ConfigError(f"{source}: auths[{key!r}].{field} must be a string")
    store = doc.get("credsStore")
    if store is not None and not isinstance(store, str):
        raise ConfigError(f"{source}: 'credsStore' must be a string")
    helpers = doc.get("credHelpers")
    if helpers is not None and (
        not isinstance(helpers, dict) or not all(isinstance(v, str) for v in helpers.values())
    ):
        raise ConfigError(f"{source}: 'credHelpers' must map registries to helper names")
    return doc


def _find_auth_entry(doc: dict[str, Any], registry: str) -> tuple[str, dict[str, Any]] | None:
    """The ``auths`` entry for ``registry``: the exact key first, then any equivalent key."""
    auths = doc.get("auths") or {}
    key = config_key(registry)
    if key in auths:
        return key, auths[key] or {}
    wanted = _key_host(key)
    for candidate, entry in auths.items():
        if _key_host(candidate) == wanted:
            return candidate, entry or {}
    return None


def _decode_auth(value: str, key: str, source: str) -> tuple[str, str]:
    """Split the ``auth`` field (base64 of ``user:password``) like docker does."""
    compact = "".join(value.split())
    try:
        decoded = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        text = decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        text = ""
    username, sep, password = text.partition(":")
    if not sep or not username:
        raise ConfigError(f"{source}: auths[{key!r}].auth is not base64 of 'user:password'")
    # Some old tools padded the password with NULs; docker strips them too.
    return username, password.strip("\x00")


def _entry_credentials(key: str, entry: dict[str, Any], source: str) -> Credentials:
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    if entry.get("auth"):
        username, password = _decode_auth(entry["auth"], key, source)
    return Credentials(
        username=username,
        password=password,
        identity_token=entry.get("identitytoken") or "",
        registry_token=entry.get("registrytoken") or "",
    )


def _helper_for(doc: dict[str, Any], registry: str, source: str) -> tuple[str, str] | None:
    """The helper that manages ``registry`` and the setting that chose it, if any."""
    helpers = doc.get("credHelpers") or {}
    key = config_key(registry)
    name: str | None = None
    if key in helpers:
        name, origin = helpers[key], f"credHelpers[{key!r}]"
    else:
        wanted = _key_host(key)
        for candidate, helper in helpers.items():
            if _key_host(candidate) == wanted:
                name, origin = helper, f"credHelpers[{candidate!r}]"
                break
    if name is None:
        name, origin = doc.get("credsStore") or "", "credsStore"
    # An empty credHelpers entry deliberately opts a registry out of credsStore (as in docker).
    if not name:
        return None
    if not _HELPER_NAME.fullmatch(name):
        raise ConfigError(f"{source}: {origin} names an invalid credential helper {name[:64]!r}")
    return name, origin


def _first_line(data: bytes) -> str:
    for line in data.decode("utf-8", "replace").splitlines():
        if line.strip():
            return line.strip()
    return ""


class CredentialSource(Protocol):
    """Where a registry client's credentials come from: a :class:`CredentialStore`, or the
    credentials a cluster task carries for its registries."""

    def get(self, registry: str) -> Credentials:
        """The credentials for ``registry`` (empty: anonymous)."""
        ...


class CredentialStore:
    """Docker-compatible credential lookup and storage for one config.json."""

    def __init__(self, path: Path | None = None, *, helper_timeout: float = HELPER_TIMEOUT) -> None:
        self.path = path if path is not None else docker_config_dir() / "config.json"
        self.helper_timeout = helper_timeout

    def get(self, registry: str) -> Credentials:
        """Credentials for ``registry`` (``docker.io``, ``ghcr.io``, ``host:port``).

        Returns anonymous credentials when nothing is configured; raises
        :class:`ConfigError` for a broken config and :class:`CredentialError` when a
        helper is missing or fails.
        """
        env_value = os.environ.get("DOCKER_AUTH_CONFIG")
        if env_value:
            env_doc = _parse_config(
                env_value.encode("utf-8", "surrogateescape"), "DOCKER_AUTH_CONFIG"
            )
            found = _find_auth_entry(env_doc, registry)
            if found is not None:
                return _entry_credentials(*found, "DOCKER_AUTH_CONFIG")

        doc = self._load()
        helper = _helper_for(doc, registry, str(self.path))
        if helper is not None:
            return self._helper_get(*helper, config_key(registry))
        found = _find_auth_entry(doc, registry)
        if found is None:
            return Credentials()
        return _entry_credentials(*found, str(self.path))

    def store(self, registry: str, credentials: Credentials) -> None:
        """Save credentials for ``registry`` where docker would: its helper, else the file."""
        if credentials.anonymous:
            raise ValueError("refusing to store empty credentials")
        key = config_key(registry)
        doc = self._load()
        helper = _helper_for(doc, registry, str(self.path))
        if helper is not None:
            name, origin = helper
            if credentials.registry_token:
                raise CredentialError(
                    f"credential helper {_HELPER_PREFIX}{name} cannot store a registry token"
                )
            if credentials.identity_token:
                username, secret = _TOKEN_USERNAME, credentials.identity_token
            else:
                username, secret = credentials.username, credentials.password
            payload = json.dumps({"ServerURL": key, "Username": username, "Secret": secret})
            result = self._run_helper(name, origin, "store", payload.encode())
            if result.returncode != 0:
                raise self._helper_failure(name, "store", result, hide=(secret,))
            return

        auths = doc.get("auths")
        if not isinstance(auths, dict):
            auths = doc["auths"] = {}
        # Keep unrelated fields of the entry (e.g. "email"); replace every credential field.
        entry = {k: v for k, v in (auths.get(key) or {}).items() if k not in _ENTRY_STRING_FIELDS}
        if credentials.username or credentials.password:
            raw = f"{credentials.username}:{credentials.password}".encode()
            entry["auth"] = base64.b64encode(raw).decode("ascii")
        if credentials.identity_token:
            entry["identitytoken"] = credentials.identity_token
        if credentials.registry_token:
            entry["registrytoken"] = credentials.registry_token
        auths[key] = entry
        self._write(doc)

    def erase(self, registry: str) -> bool:
        """Forget the credentials for ``registry``; return whether anything was removed.

        Besides the helper's entry, every ``auths`` key equivalent to the registry goes,
        so that a later :meth:`get` cannot find stale credentials under another spelling.
        """
        key = config_key(registry)
        doc = self._load()
        removed = False
        helper = _helper_for(doc, registry, str(self.path))
        if helper is not None:
            name, origin = helper
            result = self._run_helper(name, origin, "erase", key.encode())
            if result.returncode == 0:
                removed = True
            elif not self._says_not_found(result):
                raise self._helper_failure(name, "erase", result)

        auths = doc.get("auths")
        if isinstance(auths, dict):
            wanted = _key_host(key)
            doomed = [k for k in auths if k == key or _key_host(k) == wanted]
            if doomed:
                for k in doomed:
                    del auths[k]
                self._write(doc)
                removed = True
        return removed

    # -- config file --------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        return _parse_config(raw, str(self.path))

    def _write(self, doc: dict[str, Any]) -> None:
        # Write through a symlinked config.json (dotfile managers) instead of replacing it.
        target = Path(os.path.realpath(self.path))
        directory = target.parent
        data = json.dumps(doc, indent="\t", ensure_ascii=False).encode()
        # Imported here, as in _run_helper: only login, logout and helpers need them, and
        # every pull would pay for them at start.
        import tempfile

        try:
            if not directory.exists():
                directory.mkdir(mode=0o700, parents=True)
            # mkstemp creates the file 0600, so the secrets are never readable by others,
            # and the rename gives an existing looser file that mode too.
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._fsync_dir(directory)
        except OSError as exc:
            raise CredentialError(f"cannot write {target}: {exc.strerror or exc}") from None

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        # Makes the rename durable; not possible on every platform, hence best effort.
        with contextlib.suppress(OSError):
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- credential helpers -------------------------------------------------------------

    def _run_helper(
        self, name: str, origin: str, action: str, stdin: bytes
    ) -> subprocess.CompletedProcess[bytes]:
        import shutil
        import subprocess

        program = _HELPER_PREFIX + name
        executable = shutil.which(program, path=_absolute_search_path())
        if executable is None:
            raise CredentialError(
                f"credential helper {program} not found in PATH "
                f"(configured by {origin} in {self.path})"
            )
        try:
            return subprocess.run(
                [executable, action],
                input=stdin,
                capture_output=True,
                timeout=self.helper_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            # "from None": the TimeoutExpired carries the helper's partial output.
            raise CredentialError(
                f"credential helper {program} {action} timed out after {self.helper_timeout:g} s"
            ) from None
        except OSError as exc:
            raise CredentialError(
                f"credential helper {program} could not be run: {exc.strerror or exc}"
            ) from None

    def _helper_get(self, name: str, origin: str, key: str) -> Credentials:
        result = self._run_helper(name, origin, "get", key.encode())
        if result.returncode != 0:
            if self._says_not_found(result):
                return Credentials()
            raise self._helper_failure(name, "get", result)
        try:
            reply = json.loads(result.stdout)
            if not isinstance(reply, dict):
                raise ValueError
            username = reply.get("Username") or ""
            secret = reply.get("Secret") or ""
            if not isinstance(username, str) or not isinstance(secret, str):
                raise ValueError
        except ValueError:
            # The reply may hold a secret, so it is not quoted.
            raise CredentialError(
                f"credential helper {_HELPER_PREFIX}{name} returned an invalid response"
            ) from None
        if username == _TOKEN_USERNAME:
            return Credentials(identity_token=secret)
        return Credentials(username=username, password=secret)

    @staticmethod
    def _says_not_found(result: subprocess.CompletedProcess[bytes]) -> bool:
        # docker-credential-helpers print this to stdout; some helpers use stderr.
        text = (result.stdout + b"\n" + result.stderr).decode("utf-8", "replace").lower()
        return _NOT_FOUND_TEXT in text

    @staticmethod
    def _helper_failure(
        name: str,
        action: str,
        result: subprocess.CompletedProcess[bytes],
        hide: tuple[str, ...] = (),
    ) -> CredentialError:
        # Only stderr is shown: stdout is where a helper puts secrets. A helper that echoes
        # its reply to stderr too (debug output) must not have the secret shown either.
        detail = _SECRET_FIELD.sub(r'\1"***"', _first_line(result.stderr))
        for secret in hide:
            if secret:
                detail = detail.replace(secret, "***")
        detail = detail[:_MAX_DETAIL] or f"exit status {result.returncode}"
        return CredentialError(
            f"credential helper {_HELPER_PREFIX}{name} {action} failed: {detail}"
        )


__all__ = [
    "DOCKER_HUB_KEY",
    "HELPER_TIMEOUT",
    "CredentialSource",
    "CredentialStore",
    "Credentials",
    "config_key",
    "docker_config_dir",
]


def _absolute_search_path() -> str:
    """``PATH`` without its relative entries (``.``, empty ones): a helper is never run from
    whatever directory the user happens to be in (Go's ``os/exec``, and so docker, refuse
    such a match the same way)."""
    entries = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(entry for entry in entries if os.path.isabs(entry))
