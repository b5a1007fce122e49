"""Pure parts of the transport: header parsing, redirect rules, Retry-After, error mapping."""

from __future__ import annotations

import email.utils

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpull.errors import (
    ConnectionFailed,
    Denied,
    NotFound,
    ProtocolError,
    ServerError,
    TLSFailure,
    TooManyRequests,
    Unauthorized,
    redact_url,
)
from fastpull.registry.transport import (
    Response,
    RetryPolicy,
    curl_error,
    http_error,
    next_hop,
    origin,
    parse_header_line,
    parse_retry_after,
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


def test_redact_url_drops_userinfo_and_query() -> None:
    assert redact_url("https://u:secret@h:5000/v2/x?X-Amz-Signature=abc") == "https://h:5000/v2/x?…"
    assert redact_url("http://[::1]:5000/v2/") == "http://[::1]:5000/v2/"


@given(st.binary(max_size=200))
def test_header_parser_never_raises(line: bytes) -> None:
    headers: list[tuple[str, str]] = []
    parse_header_line(line, headers)
