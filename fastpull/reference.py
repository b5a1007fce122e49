"""Image references (``debian``, ``ghcr.io/owner/app:1.2@sha256:…``), parsed the way docker does.

The grammar and the normalization follow ``github.com/distribution/reference``
(``ParseNormalizedNamed``), which is what ``docker pull`` uses:

* A reference is ``[registry/]path[:tag][@digest]``.
* The text before the first ``/`` is the registry only if it is ``localhost``, contains a
  ``.`` or a ``:`` (a domain, an IPv4 address, a port, a bracketed IPv6 address such as
  ``[::1]:5000``), or contains an uppercase letter (paths are always lowercase, so such a
  component can only be a host). Otherwise the whole name is a path on Docker Hub.
  So ``host:5000/x`` and ``localhost/x`` name registries ``host:5000`` and ``localhost``,
  while ``user/repo`` is ``docker.io/user/repo``.
* A name without any ``/`` is an official image: ``debian`` becomes
  ``docker.io/library/debian``. The same holds on Docker Hub when the path has a single
  component: ``docker.io/debian`` is ``docker.io/library/debian``. A bare ``localhost`` or
  ``example.com`` is therefore an image name, not a registry (docker's behaviour too).
* ``index.docker.io`` (the legacy Hub name) is rewritten to ``docker.io``, so
  ``index.docker.io/x`` becomes ``docker.io/library/x``. ``registry-1.docker.io`` is *not*
  rewritten: docker treats it as a registry of its own, and so does fastpull.
* The tag defaults to ``latest`` only when neither a tag nor a digest is given:
  ``debian`` is ``debian:latest``, ``debian@sha256:…`` has no tag, and
  ``debian:12@sha256:…`` keeps both (the digest decides what is pulled).
* A bare 64-character lowercase hex string is refused: it is an image ID, not a name.
* The path must be at most 255 characters and a tag at most 128; the registry part is not
  counted, as in current distribution/reference.
* Nothing is stripped: whitespace anywhere is an error, as it is for docker.

Every problem raises :class:`~fastpull.errors.InvalidReference` with a message
``invalid reference format: <what is wrong>``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass

from fastpull.errors import InvalidReference
from fastpull.types import SUPPORTED_ALGORITHMS, Digest, InvalidDigest

DEFAULT_REGISTRY = "docker.io"
"""The registry of names that do not name one (Docker Hub)."""

DEFAULT_TAG = "latest"
"""The tag of references that give neither a tag nor a digest."""

DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
"""The host that serves Docker Hub's registry API (``docker.io`` itself does not)."""

_LEGACY_REGISTRY = "index.docker.io"
_OFFICIAL_PREFIX = "library/"
_LOCALHOST = "localhost"
_MAX_PATH_LENGTH = 255
_MAX_TAG_LENGTH = 128
_MAX_PORT = 65535

# distribution/reference regexp.go. Every pattern is used with fullmatch: Python's ``$``
# would also match before a trailing newline.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
# The tag grammar is ``[\w][\w.-]{0,127}``; the length is checked apart to say so. ASCII
# because Go's ``\w`` is ASCII-only.
_TAG = re.compile(r"\w[\w.-]*", re.ASCII)
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_IDENTIFIER = re.compile(r"[a-f0-9]{64}")


def _invalid(what: str) -> InvalidReference:
    return InvalidReference(f"invalid reference format: {what}")


def _show(text: str) -> str:
    """Quote user text for a message, cut short so a huge input cannot flood the terminal."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _split_registry(name: str) -> tuple[str, str]:
    """Split ``name`` (possibly still carrying ``:tag``/``@digest``) into registry and rest.

    This is splitDockerDomain: it decides what the first component is, and supplies the
    Docker Hub defaults, before anything is validated.
    """
    first, slash, rest = name.partition("/")
    if not slash:
        return DEFAULT_REGISTRY, _OFFICIAL_PREFIX + name
    if first == _LEGACY_REGISTRY:
        registry, remainder = DEFAULT_REGISTRY, rest
    elif first == _LOCALHOST or "." in first or ":" in first or first.lower() != first:
        registry, remainder = first, rest
    else:
        registry, remainder = DEFAULT_REGISTRY, name
    if registry == DEFAULT_REGISTRY and "/" not in remainder:
        remainder = _OFFICIAL_PREFIX + remainder
    return registry, remainder


def _split_port(registry: str) -> tuple[str, str]:
    """Host (without IPv6 brackets) and port text (empty when absent) of a valid registry."""
    if registry.startswith("["):
        host, _, after = registry[1:].partition("]")
        return host, after.removeprefix(":")
    host, _, port = registry.partition(":")
    return host, port


def _check_registry(registry: str) -> None:
    if _REGISTRY.fullmatch(registry):
        port = _split_port(registry)[1].lstrip("0")
        # Docker accepts any digits here and fails when it connects; refusing now is kinder.
        # The length test comes first because int() refuses very long digit strings.
        if len(port) > len(str(_MAX_PORT)) or (port and int(port) > _MAX_PORT):
            raise _invalid(f"registry port in {_show(registry)} is out of range")
        return
    if registry.lower() != registry and "." not in registry and ":" not in registry:
        # It was taken for a host only because it has capitals; docker reports it as a
        # path component that is not lowercase, and so do we.
        raise _invalid(f"repository name must be lowercase: {_show(registry)}")
    if not registry.startswith("[") and registry.count(":") > 1:
        raise _invalid(
            f"invalid registry host {_show(registry)}: IPv6 addresses must be in brackets"
        )
    raise _invalid(f"invalid registry host {_show(registry)}")


def _check_path(path: str) -> None:
    if path.lower() != path:
        raise _invalid(f"repository name must be lowercase: {_show(path)}")
    for component in path.split("/"):
        if not component:
            raise _invalid(f"repository name {_show(path)} has an empty path component")
        if not _PATH_COMPONENT.fullmatch(component):
            raise _invalid(
                f"invalid repository name component {_show(component)}: components are "
                "lowercase letters and digits, joined by '.', '_', '__' or dashes"
            )
    if len(path) > _MAX_PATH_LENGTH:
        raise _invalid(
            f"repository name must not be longer than {_MAX_PATH_LENGTH} characters "
            f"({len(path)} given)"
        )


def _check_tag(tag: str) -> None:
    if not tag:
        raise _invalid("tag is empty")
    if not _TAG.fullmatch(tag):
        raise _invalid(
            f"invalid tag {_show(tag)}: tags are letters, digits, '_', '.' and '-', "
            "and do not start with '.' or '-'"
        )
    if len(tag) > _MAX_TAG_LENGTH:
        raise _invalid(f"tag is longer than {_MAX_TAG_LENGTH} characters ({len(tag)} characters)")


def _parse_digest(text: str) -> Digest:
    if not _DIGEST.fullmatch(text):
        raise _invalid(f"invalid digest {_show(text)}: expected <algorithm>:<hex>")
    algorithm = text.partition(":")[0]
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise _invalid(
            f"unsupported digest algorithm {_show(algorithm)} "
            f"(supported: {', '.join(SUPPORTED_ALGORITHMS)})"
        )
    try:
        return Digest.parse(text)
    except InvalidDigest as exc:
        raise _invalid(str(exc)) from None


@dataclass(frozen=True)
class Reference:
    """A normalized image reference: where to pull from, and which image.

    ``registry`` is ``docker.io``, ``ghcr.io``, ``localhost:5000``, ``[::1]:5000``…;
    ``repository`` is the path inside it (``library/debian``). When ``digest`` is set it is
    what gets pulled, and ``tag`` is only informative.

    Build one with :meth:`parse`. The constructor accepts only the normalized form
    (``docker.io``, never ``index.docker.io``; ``library/debian``, never ``debian``; at least
    a tag or a digest), so that ``Reference.parse(str(ref)) == ref`` always holds.
    """

    registry: str
    repository: str
    tag: str | None
    digest: Digest | None

    def __post_init__(self) -> None:
        _check_registry(self.registry)
        _check_path(self.repository)
        if self.tag is not None:
            _check_tag(self.tag)
        if self.tag is None and self.digest is None:
            raise _invalid(f"{_show(self.name)} needs a tag or a digest")
        normalized = _split_registry(self.name)
        if normalized != (self.registry, self.repository):
            raise _invalid(
                f"{_show(self.name)} is not normalized: docker reads it as "
                f"{_show('/'.join(normalized))}"
            )

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse a reference as ``docker pull`` would, applying docker's defaults.

        Raises :class:`~fastpull.errors.InvalidReference` for anything docker refuses, and
        for digests whose algorithm fastpull cannot verify.
        """
        if not text:
            raise _invalid("reference is empty")
        if any(char.isspace() for char in text):
            raise _invalid(f"reference must not contain whitespace: {_show(text)}")
        if _IDENTIFIER.fullmatch(text):
            raise _invalid(
                f"invalid repository name ({text}), cannot specify 64-byte hexadecimal strings"
            )
        if text[0] in ":@" and "/" not in text:
            raise _invalid(f"repository name is missing: {_show(text)}")
        registry, remainder = _split_registry(text)
        # Neither the path nor a tag can contain '@', and the path cannot contain ':', so
        # the first '@' starts the digest and the first ':' before it starts the tag.
        before_digest, at, digest_text = remainder.partition("@")
        path, colon, tag_text = before_digest.partition(":")
        _check_registry(registry)
        _check_path(path)
        tag = tag_text if colon else None
        if tag is not None:
            _check_tag(tag)
        digest = _parse_digest(digest_text) if at else None
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, path, tag, digest)

    def with_tag(self, tag: str) -> Reference:
        """The same repository with another tag; a digest, if any, is kept (and still wins)."""
        return dataclasses.replace(self, tag=tag)

    def with_digest(self, digest: Digest) -> Reference:
        """The same repository and tag, pinned to ``digest``."""
        return dataclasses.replace(self, digest=digest)

    @property
    def name(self) -> str:
        """Registry and repository: ``docker.io/library/debian``."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar_name(self) -> str:
        """The name as docker shows it: ``debian``, ``user/repo``, ``localhost:5000/foo``.

        Like docker's FamiliarName, this drops ``docker.io/`` and then ``library/`` when what
        is left has a single component. Unlike docker, it keeps ``docker.io/`` when dropping
        it would change the meaning (a Hub namespace such as ``localhost`` or ``foo.com``
        would be read back as a registry), so the short form always parses back to this
        reference.
        """
        if self.registry != DEFAULT_REGISTRY:
            return self.name
        short = self.repository
        official = short.removeprefix(_OFFICIAL_PREFIX)
        if official != short and "/" not in official:
            short = official
        if _split_registry(short) != (self.registry, self.repository):
            return self.name
        return short

    @property
    def familiar(self) -> str:
        """The whole reference as docker shows it: ``debian:latest``, ``user/repo@sha256:…``."""
        return self.familiar_name + self._suffix()

    @property
    def registry_host(self) -> str:
        """The registry without its port, and without brackets for IPv6: ``::1``."""
        return split_registry(self.registry)[0]

    @property
    def registry_port(self) -> int | None:
        """The registry's explicit port, or ``None`` when it has none."""
        return split_registry(self.registry)[1]

    @property
    def is_loopback(self) -> bool:
        """Whether the registry is this machine (see :func:`is_loopback_registry`)."""
        return is_loopback_registry(self.registry)

    def _suffix(self) -> str:
        tag = f":{self.tag}" if self.tag is not None else ""
        digest = f"@{self.digest}" if self.digest is not None else ""
        return tag + digest

    def __str__(self) -> str:
        return self.name + self._suffix()


def split_registry(registry: str) -> tuple[str, int | None]:
    """``[::1]:5000`` → (``::1``, 5000); ``localhost`` → (``localhost``, None)."""
    host, port = _split_port(registry)
    if port and not (port.isascii() and port.isdigit()):
        raise _invalid(f"invalid registry port in {_show(registry)}")
    # Leading zeros are legal and could push the text past int()'s digit limit.
    return host.lower(), int(port.lstrip("0")[:6] or "0") if port else None


def canonical_registry(registry: str) -> str:
    """A registry name as references carry it: the legacy Hub name is ``docker.io``."""
    return DEFAULT_REGISTRY if registry == _LEGACY_REGISTRY else registry


def endpoint_host(registry: str) -> str:
    """The host that serves a registry name (Docker Hub is not served at docker.io)."""
    return DOCKER_HUB_ENDPOINT if registry == DEFAULT_REGISTRY else registry


def is_loopback_registry(registry: str) -> bool:
    """Whether a registry (``host[:port]``) is this machine: ``localhost``, 127/8, ``::1``.

    Only literal names count: resolving other names here would make the answer depend
    on DNS, and this decides whether plain HTTP is allowed.
    """
    host = split_registry(registry)[0]
    if host == _LOCALHOST:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # ::ffff:7f00:1 is 127.0.0.1 on a dual-stack socket.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


__all__ = [
    "DEFAULT_REGISTRY",
    "DEFAULT_TAG",
    "DOCKER_HUB_ENDPOINT",
    "Reference",
    "canonical_registry",
    "endpoint_host",
    "is_loopback_registry",
    "split_registry",
]
