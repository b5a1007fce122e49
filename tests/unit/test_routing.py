"""What an HTTP answer that is not data does to a blob's route, as a table."""

from __future__ import annotations

import pytest

from fastpull.engine.routing import (
    MAX_REAUTH,
    Backoff,
    Reauthorize,
    Refuse,
    Resend,
    Route,
    Step,
    judge,
)
from fastpull.errors import DigestMismatch, NotFound, ProtocolError, ServerError, Unauthorized
from fastpull.registry.transport import Response
from fastpull.types import Digest

DIGEST = Digest.parse("sha256:" + "ab" * 32)
REGISTRY = ("https", "r.example", 443)
BLOB = f"https://r.example/v2/x/blobs/{DIGEST}"
CDN = "https://cdn.example/b?sig=1"
OTHER = "https://cdn.example/older?sig=0"


def _answer(status: int, url: str, **headers: str) -> Response:
    return Response(status, tuple((k.replace("_", "-"), v) for k, v in headers.items()), b"", url)


AT_REGISTRY = Route(BLOB, with_auth=True, resolved=False)
AT_CDN = Route(CDN, with_auth=False, resolved=True)

# (route before, the answer, route after, the step's type)
TABLE: list[tuple[Route, Response, Route, type[Step]]] = [
    # A redirect elsewhere moves the route and drops the credentials.
    (AT_REGISTRY, _answer(307, BLOB, location=CDN), Route(CDN, False, False, 1), Resend),
    # A redirect on the registry's origin keeps them.
    (
        AT_REGISTRY,
        _answer(302, BLOB, location="/b2"),
        Route("https://r.example/b2", True, False, 1),
        Resend,
    ),
    # Once dropped, credentials stay dropped even when a hop comes back to the registry.
    (
        Route(CDN, False, False, 1),
        _answer(302, CDN, location=BLOB),
        Route(BLOB, False, False, 2),
        Resend,
    ),
    # An answer to an older URL sends its chunk again and leaves the route alone.
    (AT_CDN, _answer(307, OTHER, location="https://elsewhere.example/"), AT_CDN, Resend),
    (AT_REGISTRY, _answer(401, BLOB), Route(BLOB, True, False, 0, 1), Reauthorize),
    # The signed URL expired: back to the registry, once.
    (AT_CDN, _answer(403, CDN), Route(), Backoff),
    (AT_CDN, _answer(401, CDN), Route(), Backoff),
    (AT_CDN, _answer(400, CDN), Route(), Backoff),
    (AT_CDN, _answer(403, OTHER), AT_CDN, Backoff),
    (AT_CDN, _answer(503, CDN, retry_after="2"), AT_CDN, Backoff),
    (AT_REGISTRY, _answer(429, BLOB), AT_REGISTRY, Backoff),
    (AT_REGISTRY, _answer(404, BLOB), AT_REGISTRY, Refuse),
    (AT_REGISTRY, _answer(403, BLOB), AT_REGISTRY, Refuse),
    (AT_CDN, _answer(416, CDN), AT_CDN, Refuse),
    (AT_CDN, _answer(501, CDN), AT_CDN, Refuse),
]


@pytest.mark.parametrize(("before", "answer", "after", "step"), TABLE)
def test_each_answer_moves_the_route_and_takes_one_step(
    before: Route, answer: Response, after: Route, step: type[Step]
) -> None:
    route, taken = judge(before, DIGEST, 1000, REGISTRY, answer, 100)
    assert route == after
    assert isinstance(taken, step)


def test_backoffs_carry_the_wait_and_the_error_to_raise_at_the_end() -> None:
    _, expired = judge(AT_CDN, DIGEST, 1000, REGISTRY, _answer(403, CDN), 0)
    assert isinstance(expired, Backoff) and expired == Backoff(0.0, None)
    _, busy = judge(AT_CDN, DIGEST, 1000, REGISTRY, _answer(503, CDN, retry_after="2"), 0)
    assert isinstance(busy, Backoff) and busy.wait == 2.0
    assert isinstance(busy.error, ServerError)
    _, limited = judge(AT_CDN, DIGEST, 1000, REGISTRY, _answer(429, CDN), 0)
    assert isinstance(limited, Backoff) and limited.wait is None


def test_logins_are_bounded() -> None:
    route = AT_REGISTRY
    for _ in range(MAX_REAUTH):
        route, step = judge(route, DIGEST, 1000, REGISTRY, _answer(401, BLOB), 0)
        assert isinstance(step, Reauthorize)
    _, step = judge(route, DIGEST, 1000, REGISTRY, _answer(401, BLOB), 0)
    assert isinstance(step, Refuse) and isinstance(step.error, Unauthorized)
    assert "refused after login" in str(step.error)


def test_a_416_below_the_declared_size_is_a_lying_descriptor() -> None:
    _, step = judge(AT_CDN, DIGEST, 1000, REGISTRY, _answer(416, CDN), 700)
    assert isinstance(step, Refuse) and step.discard
    assert isinstance(step.error, DigestMismatch)
    assert "nothing at byte 700" in str(step.error)
    _, other = judge(AT_CDN, DIGEST, 1000, REGISTRY, _answer(404, CDN), 700)
    assert isinstance(other, Refuse) and not other.discard
    assert isinstance(other.error, NotFound)


def test_redirects_are_bounded_per_route() -> None:
    route = AT_REGISTRY
    for hop in range(5):
        route, _ = judge(
            route, DIGEST, 1000, REGISTRY, _answer(302, route.url, location=f"/h{hop}"), 0
        )
    with pytest.raises(ProtocolError, match="too many redirects"):
        judge(route, DIGEST, 1000, REGISTRY, _answer(302, route.url, location="/again"), 0)
    # Data from the current URL settles the route and resets the count.
    settled = route.data_from(route.url)
    assert (settled.resolved, settled.hops) == (True, 0)
    assert route.data_from(OTHER) == route
