"""User settings: which registries may use plain HTTP, which CAs to trust, defaults.

Sources, later ones winning for scalar values and adding up for lists:
``$FASTPULL_CONFIG`` or ``$XDG_CONFIG_HOME/fastpull/config.json`` (``~/.config/...``),
then ``FASTPULL_INSECURE_REGISTRIES`` (comma separated), then command-line options.

Plain HTTP is allowed only for loopback registries (as Docker does) and for hosts the
user names as insecure; for those, HTTPS is still tried first, without verification,
exactly like Docker's ``insecure-registries``. Everything else must be HTTPS, verified.
CIDR entries match only registries named by an IP literal, never a DNS answer (a Docker
bug, CVE-2026-92543, matched any resolved address).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import re
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import orjson

from fastpull.errors import ConfigError, UsageError
from fastpull.reference import (
    canonical_registry,
    endpoint_host,
    is_loopback_registry,
    split_registry,
)
from fastpull.registry.transport import TLSConfig

# The most transfers one run may have at once (``--connections``, ``--max-connections``).
MAX_CONNECTIONS = 256

_CONFIG_KEYS = {
    "insecure-registries",
    "store",
    "connections",
    "max-connections",
    "registry-max-connections",
    "workers",
    "stall-timeout",
    "ca-cert",
}


def config_file_path() -> Path:
    """Where fastpull's own settings live."""
    explicit = os.environ.get("FASTPULL_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fastpull" / "config.json"


def certs_d_dir() -> Path:
    """Docker's per-registry certificate directory (``FASTPULL_CERTS_D`` overrides it)."""
    return Path(os.environ.get("FASTPULL_CERTS_D", "/etc/docker/certs.d"))


def _load_config_file(path: Path) -> dict[str, object]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    unknown = set(data) - _CONFIG_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    insecure = data.get("insecure-registries", [])
    if not isinstance(insecure, list) or not all(isinstance(x, str) for x in insecure):
        raise ConfigError(f"{path}: insecure-registries must be a list of strings")
    for key in ("store", "ca-cert"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{path}: {key} must be a string")
    limits = (
        ("connections", 1, MAX_CONNECTIONS),
        ("max-connections", 1, MAX_CONNECTIONS),
        ("workers", 0, 16),
        ("stall-timeout", 1, 3600),
    )
    for key, low, high in limits:
        if not _integer_within(data.get(key, low), low, high):
            raise ConfigError(f"{path}: {key} must be an integer from {low} to {high}")
    per_registry = data.get("registry-max-connections", {})
    if not isinstance(per_registry, dict) or not all(
        _HOST_PORT.fullmatch(_registry_name(k)) and _integer_within(v, 1, MAX_CONNECTIONS)
        for k, v in per_registry.items()
    ):
        raise ConfigError(
            f"{path}: registry-max-connections must map registries (HOST[:PORT]) to integers"
            f" from 1 to {MAX_CONNECTIONS}"
        )
    return data


def _integer_within(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


# A host name or bracketed IPv6 literal, with an optional port.
_HOST_PORT = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?"
)


def _check_insecure_entry(entry: str) -> str:
    entry = entry.strip().lower()
    if "://" in entry:
        entry = urlsplit(entry).netloc
    valid = _HOST_PORT.fullmatch(entry) or _ip(entry) is not None
    if "/" in entry:
        valid = _cidr(entry) is not None
    if not entry or not valid:
        raise UsageError(f"invalid insecure registry {entry!r}: expected HOST[:PORT] or a CIDR")
    return entry


def _registry_name(name: str) -> str:
    """A registry as references name it (``docker.io``, ``ghcr.io``, ``localhost:5000``)."""
    return canonical_registry(name.strip().lower())


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _cidr(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


class Settings(NamedTuple):
    """Everything that shapes how fastpull talks to registries and where it stores images."""

    insecure_registries: tuple[str, ...] = ()
    ca_cert: str | None = None
    store: str | None = None
    # None: as many transfers as raise the rate, up to max_connections; a number pins it.
    connections: int | None = None
    max_connections: int = 64
    # The ceiling for a registry's endpoint host (``registry-1.docker.io`` for docker.io),
    # where the config file names one; ``max_connections`` elsewhere.
    registry_max_connections: tuple[tuple[str, int], ...] = ()
    workers: int | None = None
    stall_timeout: int = 30

    @classmethod
    def load(
        cls,
        *,
        insecure_registries: tuple[str, ...] = (),
        ca_cert: str | None = None,
        store: str | None = None,
        connections: int | None = None,
        max_connections: int | None = None,
        workers: int | None = None,
        stall_timeout: int | None = None,
    ) -> Settings:
        """Merge the config file, the environment and explicit (command-line) values."""
        data = _load_config_file(config_file_path())
        insecure = list(data.get("insecure-registries", []))  # type: ignore[call-overload]
        env = os.environ.get("FASTPULL_INSECURE_REGISTRIES", "")
        insecure += [e for e in env.split(",") if e.strip()]
        insecure += list(insecure_registries)
        ca = ca_cert or data.get("ca-cert")
        if ca is not None and not os.path.isfile(str(ca)):
            raise UsageError(f"CA certificate file {ca} does not exist")
        return cls(
            insecure_registries=tuple(_check_insecure_entry(e) for e in insecure),
            ca_cert=str(ca) if ca else None,
            store=store or data.get("store"),  # type: ignore[arg-type]
            connections=connections or data.get("connections"),  # type: ignore[arg-type]
            max_connections=max_connections or int(data.get("max-connections", 64)),  # type: ignore[call-overload]
            registry_max_connections=tuple(
                (endpoint_host(_registry_name(name)), limit)
                for name, limit in data.get("registry-max-connections", {}).items()  # type: ignore[attr-defined]
            ),
            workers=workers if workers is not None else data.get("workers"),  # type: ignore[arg-type]
            stall_timeout=stall_timeout or int(data.get("stall-timeout", 30)),  # type: ignore[call-overload]
        )

    def ceiling_for(self, host: str) -> int:
        """The most transfers at once to one endpoint host (``HOST[:PORT]`` of its URLs).

        ``--max-connections`` applies to every registry the config file does not name;
        ``--connections N`` pins every registry to N.
        """
        if self.connections:
            return self.connections
        return dict(self.registry_max_connections).get(host.lower(), self.max_connections)

    def is_insecure(self, registry: str) -> bool:
        """May this registry be reached over plain HTTP / unverified TLS?"""
        if is_loopback_registry(registry):
            return True
        host, port = split_registry(registry)
        ip = _ip(host)
        for entry in self.insecure_registries:
            net = _cidr(entry) if "/" in entry else None
            if net is not None:
                if ip is not None and ip in net:
                    return True
                continue
            e_host, e_port = split_registry(entry)
            if e_host == host and (e_port is None or e_port == port):
                return True
        return False

    def tls_for(self, url: str) -> TLSConfig:
        """TLS settings for one https origin: certs.d files, --ca-cert, insecure policy."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        cas: list[str] = [self.ca_cert] if self.ca_cert else []
        client_cert = client_key = None
        directory = certs_d_dir() / netloc
        if directory.is_dir():
            for entry in sorted(directory.iterdir()):
                if entry.suffix == ".crt":
                    cas.append(str(entry))
                elif entry.suffix == ".cert" and entry.with_suffix(".key").is_file():
                    client_cert, client_key = str(entry), str(entry.with_suffix(".key"))
        return TLSConfig(
            verify=not self.is_insecure(netloc),
            ca_file=_bundle(cas),
            client_cert=client_cert,
            client_key=client_key,
        )


_bundles: dict[tuple[str, ...], str] = {}


def _bundle(paths: list[str]) -> str | None:
    """One CA file for libcurl: the file itself, or the concatenation of several."""
    if len(paths) <= 1:
        return paths[0] if paths else None
    key = tuple(paths)
    if key not in _bundles:
        import tempfile  # only with several CA files: every start would pay for it

        fd, name = tempfile.mkstemp(prefix="fastpull-ca-", suffix=".pem")
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                out.write(Path(path).read_bytes().rstrip(b"\n") + b"\n")
        _bundles[key] = name
        atexit.register(_remove, name)
    return _bundles[key]


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
