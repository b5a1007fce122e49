"""Tests for fastpull.registry.auth: challenges, token requests, realm checks, token cache."""

from __future__ import annotations

import base64
import threading
from urllib.parse import parse_qs, parse_qsl, urlsplit

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpull.errors import ProtocolError
from fastpull.registry.auth import (
    MAX_TOKEN_RESPONSE,
    Challenge,
    Token,
    TokenCache,
    basic_authorization,
    parse_token_response,
    parse_www_authenticate,
    parse_www_authenticate_headers,
    repository_scope,
    token_cache_key,
    token_request,
    validate_realm,
)
from fastpull.registry.credentials import Credentials

HUB_HEADER = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/debian:pull"'
)
HUB_CHALLENGE = Challenge(
    "bearer",
    {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/debian:pull",
    },
)
PASSWORD = "pa55-Secret"
IDENTITY = "refresh-Token-123"


# -- WWW-Authenticate -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (HUB_HEADER, [HUB_CHALLENGE]),
        (
            'Basic realm="Registry Realm"',
            [Challenge("basic", {"realm": "Registry Realm"})],
        ),
        ("Basic", [Challenge("basic")]),
        ("Basic abc+/9==", [Challenge("basic", token68="abc+/9==")]),
        (
            # Escaped quotes and commas inside a quoted string; a token value.
            'BEARER Realm="https://a/t?x=\\"1,2\\"", error=invalid_token',
            [Challenge("bearer", {"realm": 'https://a/t?x="1,2"', "error": "invalid_token"})],
        ),
        (
            # RFC 7235 section 4.1's example of two challenges in one header.
            'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
            [
                Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
                Challenge("basic", {"realm": "simple"}),
            ],
        ),
        (
            '  Basic   realm = "a" ,, ,  Bearer\trealm="b" , service = "c"  ,',
            [
                Challenge("basic", {"realm": "a"}),
                Challenge("bearer", {"realm": "b", "service": "c"}),
            ],
        ),
        (
            'Basic abc=, Bearer realm="x"',
            [Challenge("basic", token68="abc="), Challenge("bearer", {"realm": "x"})],
        ),
        ('Bearer realm="first", realm="second"', [Challenge("bearer", {"realm": "first"})]),
        (
            # Lenient: unquoted URL and a missing comma, as some servers send.
            'Bearer realm=https://auth.example/token service="svc"',
            [Challenge("bearer", {"realm": "https://auth.example/token", "service": "svc"})],
        ),
        ('Bearer realm=""', [Challenge("bearer", {"realm": ""})]),
        ("", []),
        ("   ,  , ", []),
        ('realm="orphan"', []),
        ('"junk"', []),
        ('Bearer realm="unterminated', [Challenge("bearer")]),
        ('Bearer"x", Basic realm="ok"', [Challenge("basic", {"realm": "ok"})]),
        ('=== , Basic realm="ok"', [Challenge("basic", {"realm": "ok"})]),
        ("\x00\x01\x7f", []),
    ],
)
def test_parse_www_authenticate(header: str, expected: list[Challenge]) -> None:
    assert parse_www_authenticate(header) == expected


def test_parse_several_headers() -> None:
    assert parse_www_authenticate_headers(['Basic realm="r"', HUB_HEADER, ""]) == [
        Challenge("basic", {"realm": "r"}),
        HUB_CHALLENGE,
    ]


@given(st.text())
def test_parse_never_raises(text: str) -> None:
    for challenge in parse_www_authenticate(text):
        assert challenge.scheme == challenge.scheme.lower()


@given(st.text(alphabet=' \t,="\\=abcXYZ/+', max_size=60))
def test_parse_never_raises_on_dense_syntax(text: str) -> None:
    parse_www_authenticate(text)


TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(alphabet=TCHARS, min_size=1, max_size=12)
# qdtext: HTAB, SP, visible ASCII and obs-text; quotes and backslashes get escaped.
param_values = st.text(
    alphabet=st.sampled_from(["\t", *map(chr, range(0x20, 0x7F)), "é", "\xff"]), max_size=30
)
token68s = st.from_regex(r"[A-Za-z0-9._~+/-]{1,20}={0,2}", fullmatch=True)
challenges = st.one_of(
    st.builds(
        lambda scheme, params: Challenge(scheme, params),
        tokens,
        st.dictionaries(tokens.map(str.lower), param_values, max_size=4),
    ),
    st.builds(lambda scheme, t68: Challenge(scheme, token68=t68), tokens, token68s),
)


def render(challenge: Challenge, separator: str) -> str:
    if challenge.token68:
        return f"{challenge.scheme} {challenge.token68}"
    params = separator.join(
        f'{key}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for key, value in challenge.params.items()
    )
    return f"{challenge.scheme} {params}" if params else challenge.scheme


@given(
    st.lists(challenges, max_size=4),
    st.sampled_from([",", ", ", " , ", ",\t", " ,, "]),
)
def test_well_formed_headers_round_trip(items: list[Challenge], separator: str) -> None:
    header = separator.join(render(challenge, separator) for challenge in items)
    expected = [Challenge(c.scheme.lower(), c.params, c.token68) for c in items]
    assert parse_www_authenticate(header) == expected


# -- token requests ------------------------------------------------------------------------


def test_repository_scope() -> None:
    assert repository_scope("library/debian") == "repository:library/debian:pull"
    assert repository_scope("a/b", ("pull", "push")) == "repository:a/b:pull,push"


SCOPE = "repository:library/debian:pull"
HUB = "https://registry-1.docker.io"


def query_of(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def test_anonymous_token_request() -> None:
    request = token_request(
        HUB_CHALLENGE, scopes=[SCOPE], credentials=Credentials(), registry_url=HUB
    )
    assert request.method == "GET"
    assert request.url == (
        "https://auth.docker.io/token?service=registry.docker.io"
        "&scope=repository%3Alibrary%2Fdebian%3Apull"
    )
    assert dict(request.headers) == {}
    assert request.body is None


def test_basic_token_request_with_several_scopes() -> None:
    scopes = [SCOPE, "repository:library/alpine:pull"]
    creds = Credentials("bob", PASSWORD)
    request = token_request(HUB_CHALLENGE, scopes=scopes, credentials=creds, registry_url=HUB)
    assert request.method == "GET"
    assert urlsplit(request.url)._replace(query="").geturl() == "https://auth.docker.io/token"
    assert query_of(request.url) == [
        ("service", "registry.docker.io"),
        ("scope", SCOPE),
        ("scope", "repository:library/alpine:pull"),
        ("account", "bob"),
    ]
    expected = "Basic " + base64.b64encode(f"bob:{PASSWORD}".encode()).decode()
    assert dict(request.headers) == {"Authorization": expected}
    assert request.body is None
    assert PASSWORD not in request.url


def test_token_request_keeps_realm_query_and_omits_missing_service() -> None:
    challenge = Challenge("bearer", {"realm": "https://auth.example/token?tenant=a%20b#frag"})
    request = token_request(
        challenge, scopes=[SCOPE], credentials=Credentials(), registry_url="https://r.example"
    )
    assert request.url.startswith("https://auth.example/token?tenant=a%20b&scope=")
    assert query_of(request.url) == [("tenant", "a b"), ("scope", SCOPE)]


def test_token_request_without_scopes_or_path() -> None:
    challenge = Challenge("bearer", {"realm": "https://auth.example", "service": "s"})
    request = token_request(
        challenge, scopes=[], credentials=Credentials(), registry_url="https://r.example"
    )
    assert request.url == "https://auth.example/?service=s"


def test_identity_token_request() -> None:
    creds = Credentials("bob", identity_token=IDENTITY)
    scopes = [SCOPE, "repository:library/alpine:pull"]
    request = token_request(HUB_CHALLENGE, scopes=scopes, credentials=creds, registry_url=HUB)
    assert request.method == "POST"
    assert request.url == "https://auth.docker.io/token"
    assert dict(request.headers) == {"Content-Type": "application/x-www-form-urlencoded"}
    assert request.body is not None
    form = parse_qs(request.body.decode("ascii"), strict_parsing=True)
    assert form == {
        "grant_type": ["refresh_token"],
        "refresh_token": [IDENTITY],
        "service": ["registry.docker.io"],
        "scope": [f"{SCOPE} repository:library/alpine:pull"],
        "client_id": ["fastpull"],
    }


def test_identity_token_request_custom_client_id_and_realm_query() -> None:
    challenge = Challenge("bearer", {"realm": "https://auth.example/oauth?v=2"})
    request = token_request(
        challenge,
        scopes=[SCOPE],
        credentials=Credentials(identity_token=IDENTITY),
        registry_url="https://r.example",
        client_id="my-tool",
    )
    assert request.url == "https://auth.example/oauth?v=2"
    assert request.body is not None
    form = parse_qs(request.body.decode())
    assert form["client_id"] == ["my-tool"] and "service" not in form


def test_token_request_caller_errors() -> None:
    with pytest.raises(ValueError, match="Bearer"):
        token_request(
            Challenge("basic", {"realm": "x"}),
            scopes=[],
            credentials=Credentials(),
            registry_url=HUB,
        )
    with pytest.raises(ValueError, match="registry token"):
        token_request(
            HUB_CHALLENGE,
            scopes=[],
            credentials=Credentials(registry_token="rt"),
            registry_url=HUB,
        )
    with pytest.raises(ValueError, match="registry_url"):
        validate_realm("https://auth.example/", "registry.example")


def test_challenge_without_realm() -> None:
    with pytest.raises(ProtocolError, match="without a realm"):
        token_request(
            Challenge("bearer", {"service": "s"}),
            scopes=[],
            credentials=Credentials(),
            registry_url=HUB,
        )


# -- realm validation ----------------------------------------------------------------------

PUBLIC = "https://registry.example"


@pytest.mark.parametrize(
    ("realm", "registry"),
    [
        ("https://auth.example/token", PUBLIC),
        ("https://auth.example:8443/token?x=1", PUBLIC),
        ("https://8.8.8.8/token", PUBLIC),
        ("http://auth.example/token", "http://registry.example"),
        ("https://auth.example/token", "http://registry.example"),
        ("HTTPS://Auth.Example/token", PUBLIC),
        # Everything on loopback, as in the test suite.
        ("http://127.0.0.1:5001/token", "http://127.0.0.1:5000"),
        ("http://localhost:5001/token", "http://127.0.0.1:5000"),
        ("https://[::1]:5001/token", "https://localhost:5000"),
        ("https://10.1.2.4/token", "https://10.1.2.3"),
        ("https://192.168.1.10/token", "https://127.0.0.1:5000"),
        # A realm on the registry's own host is always allowed.
        ("http://169.254.10.10:5001/token", "http://169.254.10.10:5000"),
        ("https://registry.example/token", PUBLIC),
    ],
)
def test_realm_allowed(realm: str, registry: str) -> None:
    validate_realm(realm, registry)
    challenge = Challenge("bearer", {"realm": realm})
    token_request(challenge, scopes=[], credentials=Credentials(), registry_url=registry)


@pytest.mark.parametrize(
    ("realm", "registry", "reason"),
    [
        ("http://auth.example/token", PUBLIC, "plain http"),
        ("https://169.254.169.254/latest/meta-data", PUBLIC, "link-local"),
        ("http://169.254.169.254/latest", "http://127.0.0.1:5000", "link-local"),
        ("https://[fe80::1]/token", PUBLIC, "link-local"),
        ("https://[fe80::1%25eth0]/token", PUBLIC, "link-local"),
        ("https://[::ffff:169.254.169.254]/token", PUBLIC, "link-local"),
        ("https://2852039166/token", PUBLIC, "link-local"),
        ("https://0xa9.0xfe.0xa9.0xfe/token", PUBLIC, "link-local"),
        ("https://169.254.43518/token", PUBLIC, "link-local"),
        ("https://0.0.0.0/token", PUBLIC, "unspecified"),
        ("https://[::]/token", PUBLIC, "unspecified"),
        ("https://0/token", "https://10.0.0.1", "unspecified"),
        ("https://224.0.0.1/token", PUBLIC, "link-local"),
        ("https://metadata.google.internal/token", PUBLIC, "metadata"),
        ("https://127.0.0.1/token", PUBLIC, "private or loopback"),
        ("https://127.1/token", PUBLIC, "private or loopback"),
        ("https://017700000001/token", PUBLIC, "private or loopback"),
        ("https://localhost/token", PUBLIC, "private or loopback"),
        ("https://api.localhost/token", PUBLIC, "private or loopback"),
        ("https://[::1]/token", PUBLIC, "private or loopback"),
        ("https://10.0.0.1/token", PUBLIC, "private or loopback"),
        ("https://192.168.1.1/token", PUBLIC, "private or loopback"),
        ("https://[fd00:ec2::254]/token", PUBLIC, "private or loopback"),
        ("https://user:hunter2@auth.example/token", PUBLIC, "user credentials"),
        ("https://user@auth.example/token", PUBLIC, "user credentials"),
        ("ftp://auth.example/token", PUBLIC, "only http and https"),
        ("file:///etc/passwd", PUBLIC, "only http and https"),
        ("gopher://auth.example/", PUBLIC, "only http and https"),
        ("auth.example/token", PUBLIC, "only http and https"),
        ("//auth.example/token", PUBLIC, "only http and https"),
        ("https:///token", PUBLIC, "no host"),
        ("https://auth.example:99999/token", PUBLIC, "not a valid URL"),
        ("https://[zz::1/token", PUBLIC, "not a valid URL"),
        ("https://auth.example/to ken", PUBLIC, "whitespace"),
        ("https://auth.example/\r\nX-Injected: 1", PUBLIC, "control"),
    ],
)
def test_realm_refused(realm: str, registry: str, reason: str) -> None:
    challenge = Challenge("bearer", {"realm": realm})
    creds = Credentials("bob", PASSWORD)
    with pytest.raises(ProtocolError) as info:
        token_request(challenge, scopes=[SCOPE], credentials=creds, registry_url=registry)
    message = str(info.value)
    assert message.startswith("refusing token realm ")
    assert reason in message
    assert PASSWORD not in message and "hunter2" not in message


def test_refused_realm_message_is_redacted() -> None:
    with pytest.raises(ProtocolError) as info:
        validate_realm("http://169.254.169.254/latest?sig=abc", PUBLIC)
    assert str(info.value).startswith("refusing token realm http://169.254.169.254/latest?…:")
    assert "sig=abc" not in str(info.value)


# -- token responses -----------------------------------------------------------------------


def response(**fields: object) -> bytes:
    return orjson.dumps(fields)


@pytest.mark.parametrize(
    ("body", "value", "lifetime"),
    [
        (response(token="abc", expires_in=300), "abc", 300.0),
        (response(access_token="def", expires_in=120), "def", 120.0),
        (response(token="abc", access_token="def"), "abc", 60.0),
        (response(token="", access_token="def"), "def", 60.0),
        (response(token="abc"), "abc", 60.0),
        (response(token="abc", expires_in=None), "abc", 60.0),
        (response(token="abc", expires_in=10), "abc", 60.0),
        (response(token="abc", expires_in=-5), "abc", 60.0),
        (response(token="abc", expires_in=90.5), "abc", 90.5),
        (response(token="abc", expires_in=10**15), "abc", 86400.0),
        (b'{"token": "abc", "expires_in": 100000000000000000000000}', "abc", 86400.0),
        (response(token="abc", expires_in=300, issued_at="1999-01-01T00:00:00Z"), "abc", 300.0),
    ],
)
def test_parse_token_response(body: bytes, value: str, lifetime: float) -> None:
    token = parse_token_response(body, now=1000.0)
    assert token == Token(value, 1000.0 + lifetime, "", lifetime)


def test_parse_token_response_refresh_token() -> None:
    body = response(access_token="abc", refresh_token=IDENTITY, expires_in=900)
    token = parse_token_response(body, now=5.0)
    assert token.refresh_token == IDENTITY
    assert token.expires_at == 905.0
    assert token.authorization == "Bearer abc"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json " + PASSWORD.encode(),
        b"\xff\xfe",
        b"[]",
        b'"token"',
        b"{}",
        response(token=""),
        response(token=None, access_token=None),
        response(token=5),
        response(token=["abc"]),
        response(token="has space"),
        response(token="abc\r\nX-Injected: 1"),
        response(token="abcé"),
        response(token="abc", expires_in="300"),
        response(token="abc", expires_in=True),
        response(token="abc", refresh_token=5),
        b'{"token": "abc", "expires_in": 1e400}',
        b'{"token": "abc", "expires_in": NaN}',
    ],
)
def test_parse_token_response_garbage(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_token_response(body, now=0.0)
    assert str(info.value) == "token server returned an invalid response"


def test_parse_token_response_too_large() -> None:
    body = response(token="a" * MAX_TOKEN_RESPONSE)
    with pytest.raises(ProtocolError, match="oversized") as info:
        parse_token_response(body, now=0.0)
    assert "aaaa" not in str(info.value)


def test_token_repr_hides_secrets() -> None:
    token = Token("the-access-token", 100.0, IDENTITY, 60.0)
    text = repr(token) + str(token)
    assert "the-access-token" not in text and IDENTITY not in text
    assert "100.0" in text


def test_basic_authorization() -> None:
    header = basic_authorization(Credentials("jürgen", "p:w"))
    assert header == "Basic " + base64.b64encode("jürgen:p:w".encode()).decode()


# -- token cache ---------------------------------------------------------------------------

REALM = "https://auth.docker.io/token"


def test_cache_key_ignores_scope_order() -> None:
    assert token_cache_key(REALM, "svc", ["a", "b"]) == token_cache_key(REALM, "svc", ("b", "a"))
    assert token_cache_key(REALM, "svc", ["a"]) != token_cache_key(REALM, "other", ["a"])


def test_cache_expiry_with_fake_clock() -> None:
    cache = TokenCache()
    key = token_cache_key(REALM, "svc", [SCOPE])
    now = 1000.0
    token = parse_token_response(response(token="abc", expires_in=300), now=now)
    assert cache.get(key, now) is None
    cache.put(key, token)
    assert cache.get(key, now) is token
    # The margin is 10 % of 300 s: fresh until 30 s before expiry.
    assert cache.get(key, now + 269.9) is token
    assert cache.get(key, now + 270.0) is None
    # Once stale the entry is gone, even if the clock were to go back.
    assert cache.get(key, now) is None


def test_cache_margin_is_at_least_five_seconds() -> None:
    cache = TokenCache()
    key = token_cache_key(REALM, "svc", [SCOPE])
    cache.put(key, Token("abc", expires_at=30.0, expires_in=30.0))
    assert cache.get(key, 24.9) is not None
    assert cache.get(key, 25.0) is None


def test_cache_keys_and_invalidate() -> None:
    cache = TokenCache()
    pull = token_cache_key(REALM, "svc", [SCOPE])
    other = token_cache_key(REALM, "svc", ["repository:library/alpine:pull"])
    first = Token("one", 600.0, expires_in=600.0)
    cache.put(pull, first)
    assert cache.get(other, 0.0) is None
    second = Token("two", 600.0, expires_in=600.0)
    cache.put(pull, second)
    assert cache.get(pull, 0.0) is second
    cache.invalidate(pull)
    cache.invalidate(pull)
    assert cache.get(pull, 0.0) is None


def test_cache_is_thread_safe() -> None:
    cache = TokenCache()
    keys = [token_cache_key(REALM, "svc", [f"repository:r{i}:pull"]) for i in range(8)]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(2000):
                key = keys[(seed + i) % len(keys)]
                cache.put(key, Token(f"t{i}", float(i % 50), expires_in=60.0))
                cache.get(key, float(i % 70))
                if i % 7 == 0:
                    cache.invalidate(key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
