"""The response policy as tables: what each answer calls for, and when to ask again."""

from __future__ import annotations

import pickle

import pytest

from fastpull.errors import ProtocolError, TLSFailure
from fastpull.registry.responses import (
    MAX_REDIRECTS,
    Action,
    Fail,
    Reauthenticate,
    Redirect,
    Reresolve,
    RetryAfter,
    RetryPolicy,
    classify,
)

REGISTRY = ("https", "r.example", 443)
ON_REGISTRY = "https://r.example/v2/x/blobs/sha256:ab"
ELSEWHERE = "https://cdn.example/blob?sig=1"

# (status, headers, url asked, expected action); the registry is r.example:443.
TABLE: list[tuple[int, dict[str, str], str, Action]] = [
    (
        301,
        {"location": "/v2/y/blobs/sha256:ab"},
        ON_REGISTRY,
        Redirect("https://r.example/v2/y/blobs/sha256:ab", True),
    ),
    (302, {"location": ELSEWHERE}, ON_REGISTRY, Redirect(ELSEWHERE, False)),
    (
        303,
        {"location": "https://r.example:443/z"},
        ON_REGISTRY,
        Redirect("https://r.example:443/z", True),
    ),
    (
        307,
        {"location": "https://r.example:5000/z"},
        ON_REGISTRY,
        Redirect("https://r.example:5000/z", False),
    ),
    (308, {"location": "https://R.EXAMPLE/z"}, ELSEWHERE, Redirect("https://R.EXAMPLE/z", True)),
    (401, {}, ON_REGISTRY, Reauthenticate()),
    (401, {}, ELSEWHERE, Reresolve()),
    (403, {}, ELSEWHERE, Reresolve()),
    (400, {}, ELSEWHERE, Reresolve()),
    (403, {}, ON_REGISTRY, Fail()),
    (400, {}, ON_REGISTRY, Fail()),
    (404, {}, ON_REGISTRY, Fail()),
    (404, {}, ELSEWHERE, Fail()),
    (416, {}, ON_REGISTRY, Fail()),
    (408, {}, ON_REGISTRY, RetryAfter(None)),
    (429, {"retry-after": "7"}, ON_REGISTRY, RetryAfter(7.0)),
    (429, {"retry-after": "soon"}, ON_REGISTRY, RetryAfter(None)),
    (500, {}, ELSEWHERE, RetryAfter(None)),
    (502, {}, ON_REGISTRY, RetryAfter(None)),
    (503, {"retry-after": "0"}, ELSEWHERE, RetryAfter(0.0)),
    (504, {}, ON_REGISTRY, RetryAfter(None)),
    (501, {}, ON_REGISTRY, Fail()),
    (418, {}, ON_REGISTRY, Fail()),
    (200, {}, ON_REGISTRY, Fail()),
]


@pytest.mark.parametrize(("status", "headers", "url", "action"), TABLE)
def test_each_answer_calls_for_one_action(
    status: int, headers: dict[str, str], url: str, action: Action
) -> None:
    got = classify(status, headers, url, REGISTRY)
    # NamedTuples of different kinds can be equal as tuples: the kind must match too.
    assert type(got) is type(action)
    assert got == action


def test_actions_without_data_equal_only_their_own_kind() -> None:
    assert Fail() == Fail()
    assert hash(Reresolve()) == hash(Reresolve())
    assert Fail() != Reauthenticate()
    assert Fail() != ()
    assert pickle.loads(pickle.dumps(Reauthenticate())) == Reauthenticate()
    assert repr(Reresolve()) == "Reresolve()"


def test_redirects_stop_after_the_limit() -> None:
    location = {"location": "/next"}
    assert isinstance(
        classify(302, location, ON_REGISTRY, REGISTRY, hops=MAX_REDIRECTS - 1), Redirect
    )
    with pytest.raises(ProtocolError, match="too many redirects"):
        classify(302, location, ON_REGISTRY, REGISTRY, hops=MAX_REDIRECTS)


def test_unsafe_redirects_are_refused() -> None:
    with pytest.raises(TLSFailure, match="plain HTTP"):
        classify(302, {"location": "http://cdn.example/x"}, ON_REGISTRY, REGISTRY)
    with pytest.raises(ProtocolError, match="Location"):
        classify(307, {}, ON_REGISTRY, REGISTRY)


def _fixed(attempt: int, retry_after: float | None = None) -> float:
    """Backoff without jitter, so the tables below name exact delays."""
    return retry_after if retry_after is not None else float(2 ** (attempt - 1))


@pytest.fixture
def exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        RetryPolicy, "delay", lambda self, attempt, retry_after=None: _fixed(attempt, retry_after)
    )


# (bytes each failed attempt wrote, delay before the next, given up?) under attempts=3 and
# min_progress=100: an attempt that wrote 100 bytes or more made progress.
HISTORIES: list[tuple[list[int], float, bool]] = [
    ([0], 1.0, False),
    ([0, 0], 2.0, False),
    ([0, 0, 0], 4.0, True),
    ([500], 0.0, False),
    ([500, 0], 1.0, False),
    ([0, 500, 0], 2.0, False),
    ([99, 99, 99], 4.0, True),
    ([100] * 9, 0.0, True),  # max_tries
    ([100] * 8, 0.0, False),
]


@pytest.mark.usefixtures("exact")
@pytest.mark.parametrize(("wrote", "delay", "exhausted"), HISTORIES)
def test_retries_count_only_attempts_without_progress(
    wrote: list[int], delay: float, exhausted: bool
) -> None:
    retries = RetryPolicy(attempts=3, min_progress=100, max_tries=9).begin()
    for at, amount in enumerate(wrote):
        retries = retries.failed(amount, float(at))
    assert (retries.delay(), retries.exhausted) == (delay, exhausted)
    assert len(retries.history) == len(wrote)


def test_retries_give_up_after_too_long_without_progress() -> None:
    retries = RetryPolicy(attempts=100, min_progress=1, max_idle=60.0).begin()
    retries = retries.failed(0, 10.0)
    assert not retries.failed(0, 70.0).exhausted
    assert retries.failed(0, 70.5).exhausted
    assert not retries.failed(5, 50.0).failed(0, 110.0).exhausted  # progress restarts the clock


def test_retry_after_wins_over_the_backoff() -> None:
    retries = RetryPolicy(max_retry_after=60).begin().failed(0, 0.0)
    assert retries.delay(12.0) == 12.0
    assert retries.delay(3600.0) == 60.0


def test_a_history_is_never_changed_in_place() -> None:
    first = RetryPolicy().begin()
    second = first.failed(0, 1.0)
    assert first.history == () and len(second.history) == 1
    assert (first.attempt, second.attempt) == (1, 2)
