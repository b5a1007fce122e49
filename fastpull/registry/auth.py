"""Registry authentication, without I/O: challenges in, token requests out, tokens cached.

The transport sends a request, gets a 401, feeds the ``WWW-Authenticate`` headers to
:func:`parse_www_authenticate_headers`, then either sends :func:`basic_authorization`
(Basic challenge) or executes the :class:`TokenRequest` built by :func:`token_request`
(Bearer challenge) and parses the answer with :func:`parse_token_response`.

Relevant specs: RFC 7235 (challenge syntax), distribution ``docs/spec/auth/token.md``
(GET token endpoint) and ``oauth.md`` (POST with a refresh token).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson

from fastpull.errors import ProtocolError, redact_url
from fastpull.types import Credentials

# Callers read at most this much of a token response; larger ones are refused here too.
MAX_TOKEN_RESPONSE = 1 << 20
# token.md: "tokens never live less than 60 seconds" and 60 s is the default.
MIN_TOKEN_LIFETIME = 60.0
# Bounds the clock arithmetic for absurd expires_in values; refreshing daily costs nothing.
MAX_TOKEN_LIFETIME = 86400.0

_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_SPACE = " \t"
# An unquoted parameter value ends at any of these (lenient: RFC 7235 allows only tchars).
_VALUE_END = frozenset(' \t,"')
# Tokens go into an Authorization header: visible ASCII only, so no header injection.
_TOKEN_VALUE = re.compile(r"[\x21-\x7e]+")
# Cloud metadata services reachable by name rather than by a link-local literal.
_METADATA_HOSTS = frozenset({"metadata.google.internal"})


@dataclass(frozen=True)
class Challenge:
    """One challenge from ``WWW-Authenticate``.

    ``scheme`` and the ``params`` keys are lower-cased; values are kept as sent.
    ``token68`` holds the rare token68 form (``Basic abc==``) instead of params.
    """

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict, hash=False)
    token68: str = ""


def _skip(text: str, i: int, chars: str) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _token_end(text: str, i: int) -> int:
    while i < len(text) and text[i] in _TCHARS:
        i += 1
    return i


def _skip_item(text: str, i: int) -> int:
    """Skip unparseable input up to the next comma outside a quoted string."""
    quoted = False
    while i < len(text):
        char = text[i]
        if quoted and char == "\\":
            i += 1
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            break
        i += 1
    return i


def _param_value(text: str, i: int) -> tuple[str | None, int]:
    """Read a token or quoted-string at ``i``; ``None`` for an unterminated quote."""
    i = _skip(text, i, _SPACE)
    if i < len(text) and text[i] == '"':
        out: list[str] = []
        i += 1
        while i < len(text):
            char = text[i]
            if char == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 2
            elif char == '"':
                return "".join(out), i + 1
            else:
                out.append(char)
                i += 1
        return None, i
    start = i
    while i < len(text) and text[i] not in _VALUE_END:
        i += 1
    return text[start:i], i


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Parse one ``WWW-Authenticate`` header value (RFC 7235) into its challenges.

    Several comma-separated challenges, quoted-strings with backslash escapes, token68
    and extra whitespace are understood. Garbage never raises: whatever could be parsed
    is returned, possibly nothing. A repeated parameter keeps its first value.
    """
    found: list[tuple[str, dict[str, str], str]] = []
    current: dict[str, str] | None = None
    n = len(value)
    i = 0
    while i < n:
        i = _skip(value, i, _SPACE + ",")
        if i >= n:
            break
        start = i
        i = _token_end(value, i)
        if i == start:
            i = _skip_item(value, i)
            current = None
            continue
        name = value[start:i]
        j = _skip(value, i, _SPACE)
        if j < n and value[j] == "=":
            param, i = _param_value(value, j + 1)
            if param is not None and current is not None:
                current.setdefault(name.lower(), param)
            continue
        # Not "name=": a new challenge begins with its scheme.
        if j < n and value[j] != "," and j == i:
            # The scheme must be followed by a space before its parameters.
            i = _skip_item(value, i)
            current = None
            continue
        token68 = ""
        match = _TOKEN68.match(value, j)
        if match:
            after = _skip(value, match.end(), _SPACE)
            if after >= n or value[after] == ",":
                token68, j = match.group(), after
        current = {}
        found.append((name.lower(), current, token68))
        if token68:
            current = None
        i = j
    return [Challenge(scheme, params, token68) for scheme, params, token68 in found]


def parse_www_authenticate_headers(values: Iterable[str]) -> list[Challenge]:
    """Parse every ``WWW-Authenticate`` header of a response, in order."""
    return [challenge for value in values for challenge in parse_www_authenticate(value)]


def repository_scope(repository: str, actions: Sequence[str] = ("pull",)) -> str:
    """The token scope for ``repository``: ``repository:library/debian:pull``."""
    return f"repository:{repository}:{','.join(actions)}"


@dataclass(frozen=True)
class TokenRequest:
    """An HTTP request for the transport to send to the token server."""

    method: str
    url: str
    headers: Mapping[str, str] = field(hash=False)
    body: bytes | None = None


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton-style numbers (``2130706433``, ``0x7f.1``, ``127.1``) that resolvers accept."""
    parts = host.removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", part):
            numbers.append(int(part, 16))
        elif re.fullmatch(r"0[0-7]*", part):
            numbers.append(int(part, 8))
        elif re.fullmatch(r"[1-9][0-9]*", part):
            numbers.append(int(part))
        else:
            return None
    *leading, last = numbers
    if any(number > 255 for number in leading) or last >= 256 ** (4 - len(leading)):
        return None
    address = last
    for index, number in enumerate(leading):
        address += number << (8 * (3 - index))
    return ipaddress.IPv4Address(address)


def _host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP a host name stands for without DNS: literals, numeric forms, localhost."""
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return ipaddress.IPv4Address("127.0.0.1")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return _legacy_ipv4(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_private or address.is_loopback or address.is_reserved


def validate_realm(realm: str, registry_url: str) -> None:
    """Refuse token realms that could be abused for SSRF or a downgrade.

    The realm must be an absolute http(s) URL with a host and no userinfo; an https
    registry needs an https realm. Link-local, unspecified and multicast addresses and
    cloud metadata names are refused unless the realm is on the registry's own host;
    private and loopback addresses only when the registry itself is private or loopback.
    Names are not resolved (no I/O here), so a public name pointing inward is not caught.
    Also call this for every redirect the token server answers with.
    """
    registry = urlsplit(registry_url)
    if registry.scheme not in ("http", "https") or not registry.hostname:
        raise ValueError(f"registry_url must be an absolute http(s) URL: {registry_url!r}")

    def refuse(reason: str) -> ProtocolError:
        return ProtocolError(f"refusing token realm {redact_url(realm)}: {reason}")

    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in realm):
        raise refuse("it contains whitespace or control characters")
    try:
        parts = urlsplit(realm)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        raise refuse("it is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise refuse("only http and https token servers are allowed")
    if not parts.hostname:
        raise refuse("it has no host")
    if "@" in parts.netloc:
        raise refuse("it contains user credentials")
    if registry.scheme == "https" and parts.scheme != "https":
        raise refuse("an https registry may not send credentials over plain http")

    host = parts.hostname.lower()
    if host == registry.hostname.lower():
        return
    address = _host_address(host)
    if host in _METADATA_HOSTS or (
        address is not None
        and (address.is_link_local or address.is_unspecified or address.is_multicast)
    ):
        raise refuse("it points at a link-local, unspecified or metadata address")
    if address is not None and _is_internal(address):
        registry_address = _host_address(registry.hostname)
        if registry_address is None or not _is_internal(registry_address):
            raise refuse("it points at a private or loopback address but the registry does not")


def token_request(
    challenge: Challenge,
    *,
    scopes: Sequence[str],
    credentials: Credentials,
    registry_url: str,
    client_id: str = "fastpull",
) -> TokenRequest:
    """The request that exchanges ``credentials`` for a bearer token.

    An identity token is used as an OAuth2 refresh token (``POST``, oauth.md); a user
    name and password go as Basic auth on a ``GET`` (token.md), and anonymous is the same
    ``GET`` without ``Authorization``. ``scopes`` are sent exactly as given. Raises
    :class:`ProtocolError` for a missing or unsafe realm (see :func:`validate_realm`).
    Registry tokens need no exchange; passing one is a caller error (``ValueError``).
    """
    if challenge.scheme != "bearer":
        raise ValueError(f"token_request needs a Bearer challenge, not {challenge.scheme!r}")
    if credentials.registry_token:
        raise ValueError("a registry token is sent as-is; it is not exchanged at the realm")
    realm = challenge.params.get("realm", "")
    if not realm:
        raise ProtocolError("the registry sent a Bearer challenge without a realm")
    validate_realm(realm, registry_url)
    service = challenge.params.get("service", "")
    parts = urlsplit(realm)

    if credentials.identity_token:
        form = [("grant_type", "refresh_token"), ("refresh_token", credentials.identity_token)]
        if service:
            form.append(("service", service))
        if scopes:
            # oauth.md: one space-delimited scope parameter in the POST form.
            form.append(("scope", " ".join(scopes)))
        form.append(("client_id", client_id))
        url = urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))
        return TokenRequest(
            "POST",
            url,
            {"Content-Type": "application/x-www-form-urlencoded"},
            urlencode(form).encode("ascii"),
        )

    params = [("service", service)] if service else []
    # token.md: each scope is its own query parameter on a GET.
    params += [("scope", scope) for scope in scopes]
    headers: dict[str, str] = {}
    if credentials.username or credentials.password:
        if credentials.username:
            params.append(("account", credentials.username))
        headers["Authorization"] = basic_authorization(credentials)
    extra = urlencode(params)
    query = "&".join(q for q in (parts.query, extra) if q)
    url = urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))
    return TokenRequest("GET", url, headers, None)


@dataclass(frozen=True, repr=False)
class Token:
    """A bearer token. ``expires_at`` is on the caller's clock; ``expires_in`` is its
    lifetime in seconds, which sets the cache's safety margin."""

    value: str
    expires_at: float
    refresh_token: str = ""
    expires_in: float = MIN_TOKEN_LIFETIME

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value for registry requests."""
        return f"Bearer {self.value}"

    def __repr__(self) -> str:
        refresh = "<hidden>" if self.refresh_token else "''"
        return (
            f"Token(value=<hidden>, expires_at={self.expires_at!r}, "
            f"expires_in={self.expires_in!r}, refresh_token={refresh})"
        )


def parse_token_response(body: bytes, *, now: float) -> Token:
    """Parse a token server's JSON answer into a :class:`Token` expiring on ``now``'s clock.

    ``token`` is preferred over ``access_token``; ``expires_in`` defaults to and is at
    least 60 s; ``issued_at`` is ignored because it is on the server's clock. Anything
    malformed raises :class:`ProtocolError` without quoting the body (it holds secrets).
    """
    invalid = ProtocolError("token server returned an invalid response")
    if len(body) > MAX_TOKEN_RESPONSE:
        raise ProtocolError("token server returned an oversized response")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid from None
    if not isinstance(doc, dict):
        raise invalid
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not _TOKEN_VALUE.fullmatch(value):
        raise invalid
    refresh = doc.get("refresh_token") or ""
    if not isinstance(refresh, str):
        raise invalid
    lifetime = doc.get("expires_in")
    if lifetime is None:
        lifetime = MIN_TOKEN_LIFETIME
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)):
        raise invalid
    lifetime = min(max(float(lifetime), MIN_TOKEN_LIFETIME), MAX_TOKEN_LIFETIME)
    return Token(value, now + lifetime, refresh, lifetime)


CacheKey = tuple[str, str, frozenset[str]]


def token_cache_key(realm: str, service: str, scopes: Iterable[str]) -> CacheKey:
    """The :class:`TokenCache` key for a token obtained with these parameters."""
    return realm, service, frozenset(scopes)


class TokenCache:
    """Bearer tokens by (realm, service, scopes), shared by threads.

    A token is handed out only while more than a safety margin of its life remains
    (10 % of its lifetime, at least 5 s), so it does not expire in flight.
    """

    MIN_MARGIN = 5.0
    MARGIN_FRACTION = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[CacheKey, Token] = {}

    def get(self, key: CacheKey, now: float) -> Token | None:
        """The cached token for ``key`` if it is still fresh at ``now``."""
        with self._lock:
            token = self._tokens.get(key)
            if token is None:
                return None
            margin = max(self.MIN_MARGIN, self.MARGIN_FRACTION * token.expires_in)
            if token.expires_at - now > margin:
                return token
            del self._tokens[key]
            return None

    def put(self, key: CacheKey, token: Token) -> None:
        """Remember ``token`` for ``key``, replacing any older one."""
        with self._lock:
            self._tokens[key] = token

    def invalidate(self, key: CacheKey) -> None:
        """Forget the token for ``key`` (e.g. the registry rejected it)."""
        with self._lock:
            self._tokens.pop(key, None)


def basic_authorization(credentials: Credentials) -> str:
    """The ``Authorization`` value for Basic auth: ``Basic base64(user:password)``."""
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


__all__ = [
    "MAX_TOKEN_RESPONSE",
    "CacheKey",
    "Challenge",
    "Token",
    "TokenCache",
    "TokenRequest",
    "basic_authorization",
    "parse_token_response",
    "parse_www_authenticate",
    "parse_www_authenticate_headers",
    "repository_scope",
    "token_cache_key",
    "token_request",
    "validate_realm",
]
