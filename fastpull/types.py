"""The small value types every stage passes along: digests, platforms, descriptors.

Nothing here does I/O. Every constructor that takes text from the network validates it,
so that a ``Digest`` can always be turned into a path and a ``Descriptor`` always has a
sane size.
"""

from __future__ import annotations

import platform as _platform
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastpull.errors import ManifestError, UsageError

# image-spec descriptor.md: algorithm-component(separator algorithm-component)* ":" encoded
_DIGEST_GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
# Algorithms fastpull can verify, with the exact form of their encoded part.
_ALGORITHMS = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
    "blake3": re.compile(r"[a-f0-9]{64}"),
}
SUPPORTED_ALGORITHMS = tuple(_ALGORITHMS)

# Sizes beyond this are lies (the largest layers in the wild are tens of GB).
MAX_BLOB_SIZE = 1 << 44


class Marker:
    """Base of a message or decision that carries no data (``Shutdown``, ``Fail``...).

    Every instance of one such class equals every other, and nothing else: a NamedTuple
    without fields would equal ``()`` and every other empty NamedTuple.
    """

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class InvalidDigest(ManifestError):
    """Text that is not a digest fastpull can verify."""


@dataclass(frozen=True, order=True)
class Digest:
    """A content digest such as ``sha256:<64 hex>``; always safe to use in a path."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        pattern = _ALGORITHMS.get(self.algorithm)
        if pattern is None:
            raise InvalidDigest(f"unsupported digest algorithm {self.algorithm[:32]!r}")
        if not pattern.fullmatch(self.hex):
            raise InvalidDigest(f"invalid {self.algorithm} digest {self.hex[:140]!r}")

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``alg:hex``; raise :class:`InvalidDigest` for anything else."""
        if not isinstance(text, str) or not _DIGEST_GRAMMAR.fullmatch(text):
            shown = text[:140] if isinstance(text, str) else type(text).__name__
            raise InvalidDigest(f"invalid digest {shown!r}")
        algorithm, _, encoded = text.partition(":")
        return cls(algorithm, encoded)

    @property
    def short(self) -> str:
        """The first 12 hex characters, as docker shows layer and image IDs."""
        return self.hex[:12]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


# Docker / containerd platform normalization (containerd platforms/database.go).
_OS_ALIASES = {"macos": "darwin"}
_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "i386": "386",
    "i686": "386",
}
_IMPLIED_VARIANT = {"armhf": "v7", "armel": "v6"}


@dataclass(frozen=True)
class Platform:
    """An ``os/architecture[/variant]`` triple, normalized the way containerd does it."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``linux/arm64/v8``, ``linux/amd64``, ``arm64`` (os defaults to linux)."""
        parts = [p.strip().lower() for p in text.split("/")]
        if not 1 <= len(parts) <= 3 or not all(parts):
            raise UsageError(f"invalid platform {text!r}: expected os/arch[/variant]")
        if len(parts) == 1:
            parts.insert(0, "linux")
        for part in parts:
            if not re.fullmatch(r"[a-z0-9_.-]+", part):
                raise UsageError(f"invalid platform {text!r}: {part!r} is not a valid component")
        return cls.normalized(*parts)

    @classmethod
    def normalized(cls, os: str, architecture: str, variant: str = "") -> Platform:
        """Apply aliases and default variants (aarch64 → arm64, arm64/v8 → arm64, arm → arm/v7)."""
        os = _OS_ALIASES.get(os.lower(), os.lower())
        raw_arch = architecture.lower()
        arch = _ARCH_ALIASES.get(raw_arch, raw_arch)
        variant = (variant or _IMPLIED_VARIANT.get(raw_arch, "")).lower()
        if arch == "arm64" and variant in ("v8", "8"):
            variant = ""
        elif arch == "arm":
            variant = "v" + variant.removeprefix("v") if variant else "v7"
        elif arch == "amd64" and variant == "v1":
            variant = ""
        return cls(os, arch, variant)

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine (what docker pulls by default)."""
        system = _platform.system().lower() or "linux"
        return cls.normalized(system, _platform.machine() or "amd64")

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


ALL_PLATFORMS = "all"


@dataclass(frozen=True)
class PlatformSelection:
    """Which entries of a multi-platform image to pull: some platforms, or ``every`` one.

    Written ``linux/amd64,linux/arm64/v8`` or ``all`` (``--platform``, batch files).
    """

    platforms: tuple[Platform, ...] = ()
    every: bool = False

    @classmethod
    def parse(cls, text: str) -> PlatformSelection:
        """Parse a comma-separated list of platforms, or ``all``."""
        if text.strip().lower() == ALL_PLATFORMS:
            return cls(every=True)
        parts = text.split(",")
        if not all(part.strip() for part in parts):
            raise UsageError(f"invalid platform list {text!r}: empty entry")
        return cls.of(Platform.parse(part.strip()) for part in parts)

    @classmethod
    def of(cls, platforms: Iterable[Platform]) -> PlatformSelection:
        """A selection of these platforms, duplicates dropped, order kept."""
        return cls(tuple(dict.fromkeys(platforms)))

    @property
    def multiple(self) -> bool:
        """Whether more than one platform may be pulled (then the index is stored too)."""
        return self.every or len(self.platforms) > 1

    def __str__(self) -> str:
        return ALL_PLATFORMS if self.every else ",".join(str(p) for p in self.platforms)


def _require(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ManifestError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    return value


# RFC 6838 type/subtype names.
_MT_PART = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE = re.compile(f"{_MT_PART}/{_MT_PART}")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says about one blob or child manifest."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_json(cls, obj: Any, where: str = "descriptor") -> Descriptor:
        """Validate a descriptor object taken from a manifest or index."""
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: not a JSON object")
        media_type = _require(obj, "mediaType", str, where)
        if not _MEDIA_TYPE.fullmatch(media_type):
            raise ManifestError(f"{where}: invalid media type {media_type[:100]!r}")
        try:
            digest = Digest.parse(_require(obj, "digest", str, where))
        except InvalidDigest as exc:
            raise InvalidDigest(f"{where}: {exc}") from None
        size = _require(obj, "size", int, where)
        if not 0 <= size <= MAX_BLOB_SIZE:
            raise ManifestError(f"{where}: impossible size {size}")
        platform = None
        if "platform" in obj:
            p = obj["platform"]
            if not isinstance(p, dict):
                raise ManifestError(f"{where}: platform is not an object")
            platform = Platform.normalized(
                _require(p, "os", str, where + ".platform"),
                _require(p, "architecture", str, where + ".platform"),
                p.get("variant") if isinstance(p.get("variant"), str) else "",
            )
        urls = obj.get("urls", [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ManifestError(f"{where}: urls must be a list of strings")
        annotations = obj.get("annotations", {})
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise ManifestError(f"{where}: annotations must map strings to strings")
        return cls(media_type, digest, size, platform, tuple(urls), dict(annotations))

    def to_json(self) -> dict[str, Any]:
        """The descriptor as it appears in an OCI document."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.platform is not None:
            plat = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            out["platform"] = plat
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True, repr=False)
class Credentials:
    """What to authenticate with. All fields empty means anonymous.

    ``identity_token`` is an OAuth refresh token (docker's ``identitytoken``);
    ``registry_token`` is a bearer token sent to the registry as-is.
    """

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    @property
    def anonymous(self) -> bool:
        """True when there is nothing to authenticate with."""
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def __repr__(self) -> str:
        # Secrets end up in logs and tracebacks through repr; show only which kinds are set.
        kinds = [
            name for name in ("password", "identity_token", "registry_token") if getattr(self, name)
        ]
        return f"Credentials(username={self.username!r}, secrets={kinds!r})"


__all__ = [
    "ALL_PLATFORMS",
    "MAX_BLOB_SIZE",
    "SUPPORTED_ALGORITHMS",
    "Credentials",
    "Descriptor",
    "Digest",
    "InvalidDigest",
    "Marker",
    "Platform",
    "PlatformSelection",
]
