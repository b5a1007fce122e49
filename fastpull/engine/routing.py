"""Where a blob's requests go, and what an HTTP answer that is not data means for the blob.

Pure: :func:`judge` applies the response policy (``registry.responses.classify``) to one
blob's :class:`Route` and returns the new route with the :data:`Step` the engine takes.

- A redirect moves the blob's route (once, whichever chunk's answer brings it; answers to an
  older URL only send their chunk again), and the registry's ``Authorization`` goes only to
  the registry's origin.
- A 401 from the registry is answered by logging in again, at most ``MAX_REAUTH`` times.
- 401/403/400 from a redirect target (a signed URL that expired) sends the blob back to the
  registry for a fresh URL.
- 408/429/5xx back off; a 416 below the declared size means the descriptor lies.
"""

from __future__ import annotations

from typing import NamedTuple

from fastpull.errors import DigestMismatch, FastpullError, Unauthorized
from fastpull.registry.responses import (
    Fail,
    Origin,
    Reauthenticate,
    Redirect,
    Reresolve,
    RetryAfter,
    classify,
)
from fastpull.registry.transport import Response, http_error
from fastpull.types import Digest, Marker

MAX_REAUTH = 3


class Route(NamedTuple):
    """A blob's URL and what is known of it: whether the registry's credentials go with it,
    whether it has answered with data yet (until then the blob's first request runs alone,
    so redirects are followed once per blob), and the redirects and logins spent on it."""

    url: str = ""
    with_auth: bool = True
    resolved: bool = False
    hops: int = 0
    reauths: int = 0

    def resolve(self, url: str) -> Route:
        """Start from the registry's own URL for the blob."""
        return self._replace(url=url, with_auth=True, resolved=False)

    def data_from(self, url: str) -> Route:
        """A request to ``url`` got the blob's bytes: if that is the current URL, it is
        settled, and every chunk may go there."""
        return self._replace(resolved=True, hops=0) if url == self.url else self

    def forget(self) -> Route:
        """Ask the registry for the blob's URL again (expired, or the content was wrong)."""
        return self._replace(url="", with_auth=True, resolved=False, hops=0)


class Resend(Marker):
    """Send the chunk again at once, as the same attempt (a redirect was followed)."""


class Reauthorize(NamedTuple):
    """Answer the registry's challenge with ``response``, then send the chunk again."""

    response: Response


class Backoff(NamedTuple):
    """A failed attempt of the chunk: retry after its backoff (``wait``: the server's
    Retry-After, 0 for at once); ``error`` is what to raise once attempts run out."""

    wait: float | None
    error: FastpullError | None


class Refuse(NamedTuple):
    """No retry changes this; ``discard``: the bytes written so far must not be resumed."""

    error: FastpullError
    discard: bool = False


Step = Resend | Reauthorize | Backoff | Refuse


def judge(
    route: Route,
    digest: Digest,
    size: int,
    registry: Origin,
    response: Response,
    position: int,
) -> tuple[Route, Step]:
    """The blob's route after ``response`` (to a request for ``response.url`` that had
    written up to ``position``) and what to do with the chunk."""
    url = response.url
    current = url == route.url
    hops = route.hops if current else 0
    action = classify(response.status, dict(response.headers), url, registry, hops=hops)
    what = f"blob {digest}"
    match action:
        case Redirect(target, keep_auth):
            if current:
                route = route._replace(
                    url=target, with_auth=route.with_auth and keep_auth, hops=route.hops + 1
                )
            return route, Resend()
        case Reauthenticate():
            if route.reauths >= MAX_REAUTH:
                return route, Refuse(Unauthorized(f"unauthorized: {what} refused after login"))
            return route._replace(reauths=route.reauths + 1), Reauthorize(response)
        case Reresolve():
            # Once, however many requests to the old URL come back refused.
            return (route.forget() if current else route), Backoff(0.0, None)
        case RetryAfter(seconds):
            return route, Backoff(seconds, http_error(response, what))
        case Fail() if response.status == 416:
            # Nothing at an offset below the declared size: the descriptor lies about the
            # blob, and no retry changes that.
            error = DigestMismatch(
                f"{what} is shorter than the {size} bytes its descriptor declares: the "
                f"server has nothing at byte {position} (HTTP 416)",
                expected=str(digest),
                expected_size=size,
            )
            return route, Refuse(error, discard=True)
        case _:
            return route, Refuse(http_error(response, what))
