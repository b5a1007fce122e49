"""Pure parts of the transport: header parsing, redirect rules, Retry-After, error mapping."""

from __future__ import annotations

import email.utils
from collections.abc import Mapping

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpull.errors import (
    ConnectionFailed,
    Denied,
    FastpullError,
    NotFound,
    ProtocolError,
    ServerError,
    TLSFailure,
    TooManyRequests,
    Unauthorized,
    redact_url,
)
from fastpull.registry.transport import (
    MAX_REDIRECTS,
    Response,
    RetryPolicy,
    TLSConfig,
    Transport,
    curl_error,
    http_error,
    next_hop,
    origin,
    parse_header_line,
    parse_retry_after,
    tls_per_origin,
)


def test_header_lines_keep_only_the_final_response() -> None:
    headers: list[tuple[str, str]] = []
    assert parse_header_line(b"HTTP/1.1 100 Continue\r\n", headers) == 100
    parse_header_line(b"X-Early: 1\r\n", headers)
    assert parse_header_line(b"HTTP/2 200\r\n", headers) == 200
    parse_header_line(b"Content-Type: application/json\r\n", headers)
    parse_header_line(b"Docker-Content-Digest:  sha256:abc \r\n", headers)
    parse_header_line(b"\r\n", headers)
    assert headers == [
        ("content-type", "application/json"),
        ("docker-content-digest", "sha256:abc"),
    ]


def test_response_header_lookup_is_case_insensitive() -> None:
    r = Response(200, (("link", "a"), ("link", "b"), ("location", "x")), b"", "http://h/")
    assert r.header("Location") == "x"
    assert r.header_all("LINK") == ["a", "b"]
    assert r.header("missing") is None


def test_origin_fills_default_ports() -> None:
    assert origin("https://Registry.Example/v2/") == ("https", "registry.example", 443)
    assert origin("http://h:5000/x") == ("http", "h", 5000)
    assert origin("https://h:443/") == origin("https://h/")


def test_next_hop_resolves_relative_and_refuses_downgrades() -> None:
    assert next_hop("https://r/v2/x/blobs/d", "/cdn/abc") == "https://r/cdn/abc"
    assert next_hop("http://r/v2/", "https://cdn/abc?sig=1") == "https://cdn/abc?sig=1"
    with pytest.raises(TLSFailure, match="plain HTTP"):
        next_hop("https://r/v2/", "http://cdn/abc")
    with pytest.raises(ProtocolError, match="scheme"):
        next_hop("https://r/v2/", "file:///etc/passwd")
    with pytest.raises(ProtocolError, match="Location"):
        next_hop("https://r/v2/", None)


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30, abs=1)


def test_retry_policy_backs_off_and_honours_retry_after() -> None:
    policy = RetryPolicy(attempts=5, base=1.0, cap=8.0, max_retry_after=60)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        delay = policy.delay(attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert policy.delay(1, retry_after=12) == 12
    assert policy.delay(1, retry_after=3600) == 60


def _error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"errors": [{"code": code, "message": message}]})


@pytest.mark.parametrize(
    ("status", "body", "kind", "text"),
    [
        (401, b"", Unauthorized, "unauthorized: authentication required"),
        (403, b"", Denied, "denied: requested access"),
        (
            404,
            _error_body("MANIFEST_UNKNOWN", "manifest unknown"),
            NotFound,
            "x not found: manifest unknown",
        ),
        (404, b"<html>", NotFound, "x not found: not found"),
        (429, b"", TooManyRequests, "toomanyrequests"),
        (503, b"", ServerError, "HTTP 503"),
        (400, _error_body("NAME_INVALID", "bad name"), ProtocolError, "name invalid: bad name"),
    ],
)
def test_http_errors_read_the_spec_error_body(
    status: int, body: bytes, kind: type, text: str
) -> None:
    err = http_error(Response(status, (), body, "https://r.example/v2/x"), "x")
    assert isinstance(err, kind)
    assert text in str(err)


def test_curl_errors_map_to_user_actionable_errors() -> None:
    assert isinstance(curl_error(7, "refused", "https://user:pw@h:1/v2/"), ConnectionFailed)
    assert "pw" not in str(curl_error(7, "refused", "https://user:pw@h:1/v2/"))
    assert "cannot reach registry h:1" in str(curl_error(6, "x", "https://h:1/"))
    assert isinstance(curl_error(60, "self signed", "https://h/"), TLSFailure)


@pytest.mark.parametrize(
    ("code", "refused"),
    [(7, True), (52, True), (56, False), (28, False), (18, False)],
)
def test_a_server_turning_connections_away_is_marked_refused(code: int, refused: bool) -> None:
    error = curl_error(code, "x", "https://h/")
    assert isinstance(error, ConnectionFailed)
    assert error.refused is refused


def test_redact_url_drops_userinfo_and_query() -> None:
    assert redact_url("https://u:secret@h:5000/v2/x?X-Amz-Signature=abc") == "https://h:5000/v2/x?…"
    assert redact_url("http://[::1]:5000/v2/") == "http://[::1]:5000/v2/"


@given(st.binary(max_size=200))
def test_header_parser_never_raises(line: bytes) -> None:
    headers: list[tuple[str, str]] = []
    parse_header_line(line, headers)


# -- the request loop, on scripted answers ---------------------------------------------------


class Scripted(Transport):
    """A transport whose ``send`` answers from a script and records what it was asked;
    backoffs are recorded instead of slept."""

    def __init__(self, *answers: Response | FastpullError) -> None:
        super().__init__(retry=RetryPolicy(attempts=3))
        self.answers = list(answers)
        self.sent: list[tuple[str, str, dict[str, str], bytes | None]] = []
        self.paused: list[float] = []

    def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        max_body: int = 0,
    ) -> Response:
        self.sent.append((method, url, dict(headers or {}), body))
        answer = self.answers.pop(0)
        if isinstance(answer, FastpullError):
            raise answer
        return Response(answer.status, answer.headers, answer.body, url)

    def _pause(self, seconds: float) -> None:
        self.paused.append(seconds)


def _to(status: int, location: str = "", retry_after: str = "") -> Response:
    headers = (("location", location),) if location else ()
    headers += (("retry-after", retry_after),) if retry_after else ()
    return Response(status, headers, b"", "")


AUTH = {"Authorization": "Bearer secret"}


def test_credentials_stay_on_the_registry_origin_across_redirects() -> None:
    with Scripted(
        _to(307, "/v2/x/manifests/2"),
        _to(302, "https://cdn.example/m"),
        _to(302, "https://r.example/v2/x/manifests/3"),
        _to(200),
    ) as transport:
        response = transport.request("GET", "https://r.example/v2/x/manifests/1", AUTH)
    assert response.status == 200
    assert [(url, "Authorization" in headers) for _, url, headers, _ in transport.sent] == [
        ("https://r.example/v2/x/manifests/1", True),
        ("https://r.example/v2/x/manifests/2", True),  # same origin: kept
        ("https://cdn.example/m", False),  # another origin: dropped
        ("https://r.example/v2/x/manifests/3", False),  # and never picked up again
    ]


def test_a_303_turns_the_request_into_a_get_without_body() -> None:
    with Scripted(_to(303, "/token/2"), _to(200)) as transport:
        transport.request("POST", "https://auth.example/token", body=b"grant_type=x")
    assert [(m, b) for m, _, _, b in transport.sent] == [("POST", b"grant_type=x"), ("GET", None)]


def test_a_request_body_never_follows_a_redirect_to_another_origin() -> None:
    form = b"grant_type=refresh_token&refresh_token=secret"
    with (
        Scripted(_to(307, "https://elsewhere.example/token")) as transport,
        pytest.raises(ProtocolError, match="its body would go along"),
    ):
        transport.request("POST", "https://auth.example/token", body=form)
    assert [url for _, url, _, _ in transport.sent] == ["https://auth.example/token"]


def test_transient_answers_back_off_by_this_requests_attempts() -> None:
    with Scripted(_to(503), _to(429, retry_after="7"), _to(200)) as transport:
        assert transport.request("GET", "https://r.example/v2/").status == 200
    assert len(transport.paused) == 2
    assert 0.25 <= transport.paused[0] <= 0.5  # the first attempt's backoff
    assert transport.paused[1] == 7.0  # Retry-After wins


def test_transient_answers_raise_once_attempts_run_out() -> None:
    with Scripted(_to(503), _to(503), _to(503)) as transport, pytest.raises(ServerError):
        transport.request("GET", "https://r.example/v2/")
    assert len(transport.sent) == 3


def test_network_failures_are_retried_then_raised() -> None:
    reset = ConnectionFailed("connection reset")
    with Scripted(reset, _to(200)) as transport:
        assert transport.request("GET", "https://r.example/v2/").status == 200
    with Scripted(reset, reset, reset) as transport, pytest.raises(ConnectionFailed):
        transport.request("GET", "https://r.example/v2/")


@pytest.mark.parametrize("status", [401, 403, 404, 400])
def test_refusals_are_the_callers_to_judge(status: int) -> None:
    with Scripted(_to(status)) as transport:
        assert transport.request("GET", "https://r.example/v2/").status == status
    assert transport.paused == []


def test_redirect_loops_end() -> None:
    loop = [_to(302, "/again")] * (MAX_REDIRECTS + 1)
    with Scripted(*loop) as transport, pytest.raises(ProtocolError, match="too many redirects"):
        transport.request("GET", "https://r.example/v2/")
    assert len(transport.sent) == MAX_REDIRECTS + 1


def test_tls_settings_are_asked_for_once_per_origin() -> None:
    asked: list[str] = []

    def tls_for(url: str) -> TLSConfig:
        asked.append(url)
        return TLSConfig(ca_file=f"/ca/{len(asked)}.pem")

    lookup = tls_per_origin(tls_for)
    first = lookup("https://r.example/v2/a/blobs/uploads/1")
    assert lookup("https://R.example:443/v2/b/blobs/uploads/2?digest=x") is first
    other_port = lookup("https://r.example:5000/v2/a/")
    plain = lookup("http://r.example/v2/")
    assert [first.ca_file, other_port.ca_file, plain.ca_file] == [
        "/ca/1.pem",
        "/ca/2.pem",
        "/ca/3.pem",
    ]
    assert asked == [
        "https://r.example/v2/a/blobs/uploads/1",
        "https://r.example:5000/v2/a/",
        "http://r.example/v2/",
    ]


def test_a_transport_asks_for_tls_settings_once_per_origin() -> None:
    asked: list[str] = []

    def tls_for(url: str) -> TLSConfig:
        asked.append(url)
        return TLSConfig()

    with Transport(tls_for=tls_for) as transport:
        for path in ("/v2/", "/v2/a/manifests/1"):
            # Nothing listens on port 1: each request fails after asking for its settings.
            with pytest.raises(FastpullError):
                transport.send("GET", f"https://127.0.0.1:1{path}")
    assert asked == ["https://127.0.0.1:1/v2/"]
