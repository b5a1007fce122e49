"""Every error fastpull raises on purpose.

The tree::

    FastpullError                      exit 1 unless a subclass says otherwise
    ├── UsageError                     exit 2  bad option values, unusable settings
    │   ├── InvalidReference           exit 2  (also a ValueError) malformed image reference
    │   └── BatchFileError             exit 2  a batch file (pull -f) that cannot be used
    ├── ConfigError                    exit 2  unreadable / broken config.json or fastpull config
    ├── CredentialError                exit 3  a credential helper is missing or failed
    ├── RegistryError                  exit 5  anything the remote side did wrong
    │   ├── ConnectionFailed           exit 5  DNS, connect, reset, timeout   (retryable)
    │   ├── TLSFailure                 exit 5  certificate / handshake / downgrade refused
    │   ├── Unauthorized               exit 3  401 after auth was attempted
    │   ├── Denied                     exit 3  403
    │   ├── NotFound                   exit 4  manifest / blob / repository unknown
    │   ├── TooManyRequests            exit 5  429 after retries                 (retryable)
    │   ├── ServerError                exit 5  5xx after retries                 (retryable)
    │   └── ProtocolError              exit 5  the server answered something impossible
    │       └── ResponseTooLarge       exit 5  a body over its cap (manifests: ManifestError)
    ├── ManifestError                  exit 6  a document that must not be used
    │   ├── UnsupportedManifest        exit 6  schema 1, unknown media type, unknown algorithm
    │   ├── PlatformNotFound           exit 4  no manifest for the requested platform
    │   └── ArchiveError               exit 6  an image archive (load) that is malformed or unsafe
    ├── DigestMismatch                 exit 6  bytes do not match their digest; nothing was kept
    ├── StoreError                     exit 7  the local OCI layout cannot be used or written
    │   ├── StoreDamaged               exit 7  blobs missing, corrupt or unusable (verify, gc)
    │   └── NoSuchImage                exit 4  no image in the store has that reference
    ├── ClusterError                   exit 5  the Dask cluster is unreachable or unfit
    ├── OutputFailed                   exit 1  an archive (save) could not be written out
    ├── BatchFailed                    the failed images' exit code (1 if they differ)
    └── Interrupted                    exit 130 / 143  Ctrl-C or SIGTERM

``retryable`` marks errors worth another attempt. The errors that carry data beyond their
message declare it as keyword-only fields: :class:`RegistryError` (``host``, the HTTP
``status``, ``retry_after``, and ``diagnostics``: the registry's codes and messages as
:class:`Diagnostic` values, from the distribution spec's error body),
:class:`ConnectionFailed` (``refused``), :class:`ResponseTooLarge` (``limit``),
:class:`DigestMismatch` (``expected``, ``actual``, ``expected_size``, ``actual_size``),
:class:`StoreError` (``store``, ``errno``),
:class:`OutputFailed` (``errno``), and :class:`BatchFailed` and :class:`Interrupted` (their
own ``exit_code``). Every error pickles (worker processes send them to the parent), keeping
its message and fields. Messages never contain credentials: code that builds them passes
URLs through :func:`redact_url`.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import orjson

# What of a registry's error body is kept: the spec's body is small, a hostile one is not.
MAX_ERROR_BODY = 65536
_MAX_DIAGNOSTICS = 4


class FastpullError(Exception):
    """Root of fastpull's errors. ``str(err)`` is the one line shown to the user."""

    exit_code = 1
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt without calling the subclass's __init__ (its fields may be required), then
        # given back every attribute: the message, the declared fields, any notes.
        return (_rebuild, (type(self), self.message, dict(vars(self))))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[FastpullError], message: str, state: dict[str, Any]) -> FastpullError:
    error = cls.__new__(cls, message)  # sets ``args`` as __init__ would
    error.__dict__.update(state)
    return error


class UsageError(FastpullError):
    """The user asked for something that cannot work (bad option value, bad setting)."""

    exit_code = 2


class InvalidReference(UsageError, ValueError):
    """An image reference that does not follow Docker's grammar."""


class BatchFileError(UsageError):
    """A batch file that cannot be read or has an error; the message names the file and
    the line (plain text, invalid JSON) or the entry (JSON) at fault."""


class ConfigError(FastpullError):
    """A configuration file exists but cannot be read or parsed."""

    exit_code = 2


class CredentialError(FastpullError):
    """Credentials could not be obtained or stored (missing or failing helper)."""

    exit_code = 3


class Diagnostic(NamedTuple):
    """One entry of a registry's error body (``{"errors": [{"code", "message"}]}``): the
    spec's code as sent (``MANIFEST_UNKNOWN``) and its message."""

    code: str
    message: str


def parse_diagnostics(body: bytes) -> tuple[Diagnostic, ...]:
    """The first entries of a registry's error body; none for anything else. Reads at most
    :data:`MAX_ERROR_BODY` bytes and keeps short codes and messages."""
    try:
        document = orjson.loads(body[:MAX_ERROR_BODY]) if body else None
    except orjson.JSONDecodeError:
        return ()
    entries = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return ()
    return tuple(
        Diagnostic(str(e.get("code", "")).strip()[:60], str(e.get("message", "")).strip()[:200])
        for e in entries[:_MAX_DIAGNOSTICS]
        if isinstance(e, dict)
    )


class RegistryError(FastpullError):
    """The registry (or the network to it) did not give us what we asked for.

    ``host`` is the registry (or redirect target) at fault when known; ``status`` the HTTP
    status that failed, if the failure was one; ``diagnostics`` what the registry's error
    body said (as go-containerregistry's ``transport.Error`` keeps them); ``retry_after``
    the seconds its ``Retry-After`` asked for, if it sent one.
    """

    exit_code = 5

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        status: int | None = None,
        diagnostics: tuple[Diagnostic, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.host = host
        self.status = status
        self.diagnostics = diagnostics
        self.retry_after = retry_after


class ConnectionFailed(RegistryError):
    """The host could not be reached or the connection broke.

    ``refused``: the server turned the connection away (refused it, or closed it without
    an answer), which the engine takes as push-back, as it takes a 503.
    """

    retryable = True

    def __init__(self, message: str, *, refused: bool = False, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.refused = refused


class TLSFailure(RegistryError):
    """TLS verification or negotiation failed, or a downgrade to plain HTTP was refused."""


class Unauthorized(RegistryError):
    """401: no credentials, or the registry rejected the ones we sent."""

    exit_code = 3


class Denied(RegistryError):
    """403: authenticated, but not allowed."""

    exit_code = 3


class NotFound(RegistryError):
    """The manifest, blob, tag or repository does not exist."""

    exit_code = 4


class TooManyRequests(RegistryError):
    """429: rate limited, still after honouring Retry-After."""

    retryable = True


class ServerError(RegistryError):
    """5xx from the registry."""

    retryable = True


class ProtocolError(RegistryError):
    """A response that breaks the protocol: wrong Content-Range, bad redirect, garbage body."""


class ResponseTooLarge(ProtocolError):
    """A response body larger than fastpull reads for its kind (``limit`` bytes)."""

    def __init__(self, message: str, *, limit: int, host: str | None = None) -> None:
        super().__init__(message, host=host)
        self.limit = limit


class ManifestError(FastpullError):
    """A manifest, index or config that is malformed or unsafe to use."""

    exit_code = 6


class UnsupportedManifest(ManifestError):
    """Well-formed, but something fastpull does not pull (schema 1, unknown type)."""


class PlatformNotFound(ManifestError):
    """An index with no entry for the requested platform."""

    exit_code = 4


class ArchiveError(ManifestError):
    """A tar archive given to ``load`` that is truncated, malformed, unsafe (paths outside
    the archive, links, devices) or inconsistent (blobs missing or not matching their
    digests). Nothing of it was stored."""


class DigestMismatch(FastpullError):
    """Content did not hash to its digest (or had the wrong size). Nothing was stored.

    ``expected`` is the digest the content should have; ``actual`` the one it had, when it
    was computed; ``expected_size`` and ``actual_size`` the lengths, when a length was wrong.
    """

    exit_code = 6
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        expected: str,
        actual: str | None = None,
        expected_size: int | None = None,
        actual_size: int | None = None,
    ) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual
        self.expected_size = expected_size
        self.actual_size = actual_size


class StoreError(FastpullError):
    """The local store cannot be used: not a layout, not writable, disk full.

    ``store`` is the store's directory when the error is about one; ``errno`` the OS error
    number behind it, if any (``ENOSPC``: disk full).
    """

    exit_code = 7

    def __init__(self, message: str, *, store: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.store = store
        self.errno = errno


class StoreDamaged(StoreError):
    """Blobs the images need are missing, corrupt or unusable (what ``verify`` reports)."""


class NoSuchImage(StoreError):
    """A reference that names no image in the store (``rmi``)."""

    exit_code = 4


class ClusterError(FastpullError):
    """The Dask cluster cannot be reached, runs another fastpull, or lost a task."""

    exit_code = 5


class OutputFailed(FastpullError):
    """``save`` could not write the archive: full disk, closed pipe. A partial archive
    file is removed. ``errno`` is the OS error number behind it."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class BatchFailed(FastpullError):
    """Some images of a batch (``pull -f``) failed; each failure is in the summary and the
    report. Exits with the failures' common exit code, or 1 when they differ."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(FastpullError):
    """The user stopped the pull (SIGINT → 130, SIGTERM → 143)."""

    exit_code = 130

    def __init__(self, message: str, *, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def redact_url(url: str) -> str:
    """Drop userinfo and the query string, which may carry secrets (signed CDN URLs)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    query = "…" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
