"""What to do with an HTTP answer, and when to ask again: the one response policy.

Pure rules, no I/O, shared by the small-request loop (``transport.Transport.request``) and
the blob engine (``engine.routing``), and tested as tables (``tests/unit/test_responses.py``),
the way urllib3's ``Retry`` or go-containerregistry's retry predicate and backoff are:

- :func:`classify` maps (status, headers, the URL asked, the registry's origin) to one
  :data:`Action`: follow a redirect, re-authenticate, resolve the blob's URL again, retry
  after a delay, or fail;
- :class:`RetryPolicy` is the backoff and its bounds, and :class:`Retries` the history of one
  thing being retried (a request, a chunk's byte range), so every delay and every decision to
  give up depends on that thing's own attempts, never on what happened elsewhere.

Why redirects are followed here instead of by libcurl: the registry's ``Authorization``
header must never reach another origin (libcurl CVE-2018-1000007, CVE-2022-27774/27776; the
distribution spec now says so too). :func:`next_hop` and ``Redirect.keep_auth`` are the single
rule for that.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urljoin, urlsplit

from fastpull.errors import ProtocolError, TLSFailure, redact_url
from fastpull.types import Marker

MAX_REDIRECTS = 5
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Refusals that, from a host other than the registry, mean a signed URL has expired (S3 and
# GCS answer 400 or 403, some CDNs 401): the registry hands out a fresh one.
EXPIRED_STATUS = frozenset({400, 401, 403})

Origin = tuple[str, str, int]


def origin(url: str) -> Origin:
    """(scheme, host, port) with the default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def next_hop(current: str, location: str | None) -> str:
    """Where a 3xx points, refusing what would be unsafe to follow.

    The caller must drop credentials unless ``origin(new) == origin(current)``.
    """
    if not location:
        raise ProtocolError(f"redirect from {redact_url(current)} without a Location header")
    target = urljoin(current, location.strip())
    scheme = urlsplit(target).scheme.lower()
    if scheme not in ("http", "https"):
        raise ProtocolError(f"redirect to unsupported scheme {scheme!r} refused")
    if urlsplit(current).scheme.lower() == "https" and scheme == "http":
        raise TLSFailure(
            f"redirect from {redact_url(current)} to plain HTTP {redact_url(target)} refused"
        )
    return target


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    # Imported here: an HTTP-date is rare, and email.utils costs every start a few ms.
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# -- what to do with an answer ---------------------------------------------------------------


class Redirect(NamedTuple):
    """Ask ``target`` next; ``keep_auth`` when it is still the registry's origin."""

    target: str
    keep_auth: bool


class Reauthenticate(Marker):
    """The registry wants (fresh) credentials: answer its challenge, then ask again."""


class Reresolve(Marker):
    """A redirect target refused the request (its signed URL expired): ask the registry
    for the blob's URL again."""


class RetryAfter(NamedTuple):
    """A transient refusal: ask again after a backoff; ``seconds`` is the server's
    Retry-After (None when it sent none)."""

    seconds: float | None


class Fail(Marker):
    """An answer no retry changes: the caller turns it into an error (``http_error``)."""


Action = Redirect | Reauthenticate | Reresolve | RetryAfter | Fail


def classify(
    status: int, headers: Mapping[str, str], url: str, registry: Origin, *, hops: int = 0
) -> Action:
    """What an answer that is not data calls for.

    ``headers`` are the response's (names lower-case), ``url`` where the request went,
    ``registry`` the origin credentials belong to, ``hops`` the redirects followed so far.
    Raises :class:`ProtocolError` past ``MAX_REDIRECTS`` hops or for a redirect that is
    unsafe to follow (:func:`next_hop`).
    """
    on_registry = origin(url) == registry
    if status in REDIRECT_STATUS:
        if hops >= MAX_REDIRECTS:
            raise ProtocolError(f"too many redirects from {redact_url(url)}")
        target = next_hop(url, headers.get("location"))
        return Redirect(target, origin(target) == registry)
    if status == 401 and on_registry:
        return Reauthenticate()
    if status in EXPIRED_STATUS and not on_registry:
        return Reresolve()
    if status in RETRYABLE_STATUS:
        return RetryAfter(parse_retry_after(headers.get("retry-after")))
    return Fail()


# -- when to ask again ---------------------------------------------------------------------


class RetryPolicy(NamedTuple):
    """Bounded exponential backoff with jitter; Retry-After wins when the server sends one.

    ``attempts`` bounds the attempts that made no progress. An attempt that wrote at least
    ``min_progress`` bytes does not count against it (a middlebox that cuts every response
    after a few MiB still lets a large range finish); ``max_tries`` bounds every attempt and
    ``max_idle`` the seconds between the last progress and a failure.
    """

    attempts: int = 5
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 120.0
    min_progress: int = 256 << 10
    max_tries: int = 512
    max_idle: float = 600.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before attempt number ``attempt + 1`` (attempt counts from 1)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        backoff = min(self.cap, self.base * (2 ** (attempt - 1)))
        return backoff / 2 + random.uniform(0, backoff / 2)

    def begin(self) -> Retries:
        """The empty history of something about to be tried for the first time."""
        return Retries(self)


class Try(NamedTuple):
    """One failed attempt: how many bytes it wrote, and when it ended."""

    wrote: int
    at: float


class Retries(NamedTuple):
    """The failed attempts of one thing (a request, a chunk's byte range) under a policy.

    Immutable: :meth:`failed` returns the history with one more attempt, so a retried
    range carries its own record and nothing else's.
    """

    policy: RetryPolicy
    history: tuple[Try, ...] = ()
    idle_since: float | None = None  # the last progress, or else the first failure

    def _progressed(self, attempt: Try) -> bool:
        return attempt.wrote >= self.policy.min_progress

    @property
    def fruitless(self) -> int:
        """Failed attempts that made no progress."""
        return sum(not self._progressed(t) for t in self.history)

    @property
    def attempt(self) -> int:
        """The number of the next attempt, counting only attempts without progress."""
        return 1 + self.fruitless

    def failed(self, wrote: int, at: float) -> Retries:
        """This history with one more failed attempt that wrote ``wrote`` bytes."""
        attempt = Try(wrote, at)
        idle_since = at if self._progressed(attempt) else self.idle_since
        if idle_since is None and not self.history:
            idle_since = at  # the clock without progress starts at the first failure
        return self._replace(history=(*self.history, attempt), idle_since=idle_since)

    @property
    def exhausted(self) -> bool:
        """Whether to give up: too many attempts without progress, too many in all, or
        too long since the last progress."""
        if not self.history:
            return False
        last = self.history[-1]
        idle = last.at - (self.idle_since if self.idle_since is not None else last.at)
        return (
            self.fruitless >= self.policy.attempts
            or len(self.history) >= self.policy.max_tries
            or idle > self.policy.max_idle
        )

    def delay(self, retry_after: float | None = None) -> float:
        """Seconds to wait before the next attempt: none after an attempt that made
        progress (the link works; resume at once), else the backoff of this thing's own
        attempt number, or the server's Retry-After."""
        if self.history and self._progressed(self.history[-1]) and retry_after is None:
            return 0.0
        return self.policy.delay(max(1, self.fruitless), retry_after)


__all__ = [
    "EXPIRED_STATUS",
    "MAX_REDIRECTS",
    "REDIRECT_STATUS",
    "RETRYABLE_STATUS",
    "Action",
    "Fail",
    "Reauthenticate",
    "Redirect",
    "Reresolve",
    "Retries",
    "RetryAfter",
    "RetryPolicy",
    "Try",
    "classify",
    "next_hop",
    "origin",
    "parse_retry_after",
]
