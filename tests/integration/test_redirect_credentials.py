"""Credentials stay on the origin they were given for, on the small-request path: a manifest,
a tag list or a token request redirected to another origin, and a tag list whose ``Link``
names another host. (Blob redirects are in ``test_hostile.py``.)

The registry (real ``docker-registry``, Basic or token auth) sits behind a
:class:`~tests.support.faultproxy.FaultProxy` that answers with the redirect. The other
origin is a second FaultProxy on another loopback port: it records every request as it
arrived, headers and body, and reaches the registry or token server with credentials of its
own, as a CDN with signed URLs would, so the pull can succeed without fastpull's. Each test
first checks that fastpull did send its credentials on the registry's side (else it would
prove nothing), then that nothing of them, in any form, reached the other origin.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from fastpull.errors import ProtocolError
from fastpull.registry.client import RegistryClient
from fastpull.registry.settings import Settings
from fastpull.registry.transport import Transport
from fastpull.types import Credentials
from tests.integration.conftest import (
    CliResult,
    Proxy,
    assert_store_consistent,
    entry_for,
    index_entries,
    one_line,
)
from tests.support.faultproxy import FaultProxy, Redirect, SetHeaders
from tests.support.images import Image, make_image, make_layer

IDENTITY_TOKEN = "identity-token-that-must-stay-home"


@pytest.fixture
def store(docker_config: Any) -> Path:
    return Path(docker_config.store)


@pytest.fixture(params=["basic_registry", "token_registry"])
def secured(request: pytest.FixtureRequest) -> Any:
    """The real registry with htpasswd Basic auth, then with token auth."""
    return request.getfixturevalue(request.param)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _own_credentials(registry: Any, repo: str) -> str:
    """The ``Authorization`` the other origin sends the registry on its own behalf."""
    if registry.token_server is None:
        return _basic(registry.username, registry.password)
    token = registry.token_server.issue_token(registry.username, [f"repository:{repo}:pull"])
    return f"Bearer {token}"


def _front_and_elsewhere(
    registry: Any, repo: str, proxies: Proxy, docker_config: Any
) -> tuple[FaultProxy, FaultProxy]:
    """The proxy fastpull pulls through, logged in as the registry's user, and the other
    origin, which reaches the registry with credentials of its own."""
    front = proxies(registry)
    own = _own_credentials(registry, repo)
    elsewhere = proxies(registry, upstream_headers={"Authorization": own})
    docker_config.add_auth(front.host, username=registry.username, password=registry.password)
    return front, elsewhere


def _trust(registry: Any) -> tuple[str, ...]:
    """Options that make fastpull trust the registry's CA (and its token realm's)."""
    return ("--ca-cert", str(registry.ca_path)) if registry.ca_path else ()


def _push(registry: Any, repo: str, seed: int) -> Image:
    image = make_image([make_layer(2_000, seed=seed)])
    registry.pusher.push_image(repo, "1", image)
    return image


def _secrets(front: FaultProxy, *known: str) -> set[str]:
    """The known secrets and every credential fastpull sent through ``front``, each also
    base64- and URL-encoded (how they would travel in a header, a query or a form)."""
    found = {s for s in known if s}
    for request in front.requests:
        value = request.header("Authorization")
        if value:
            found.update((value, value.split(" ", 1)[1]))
    for secret in list(found):
        found.update(
            (base64.b64encode(secret.encode()).decode(), quote(secret, safe=""), quote_plus(secret))
        )
    return found


def _assert_nothing_arrived(elsewhere: FaultProxy, secrets: set[str]) -> None:
    assert secrets, "no secret is known: the test proves nothing"
    for request in elsewhere.requests:
        what = f"{request.method} {request.target} at {elsewhere.host}"
        assert request.header("Authorization") is None, f"Authorization reached {what}"
        seen = "\n".join([request.target, *(f"{k}: {v}" for k, v in request.headers)])
        for secret in secrets:
            assert secret.encode() not in seen.encode() + b"\n" + request.body, (
                f"{secret[:12]}… reached {what}"
            )


# -- manifests and tag lists -------------------------------------------------------------------


@pytest.mark.parametrize("what", ["manifest", "tag list"])
def test_a_redirect_to_another_origin_goes_without_the_credentials(
    secured: Any,
    what: str,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    docker_config: Any,
    store: Path,
) -> None:
    image = _push(secured, repo, seed=700)
    front, elsewhere = _front_and_elsewhere(secured, repo, proxies, docker_config)
    own = f"/v2/{repo}/manifests/1" if what == "manifest" else f"/v2/{repo}/tags/list"
    # Only requests that carry credentials: those are the ones that could leak them.
    front.on(re.escape(own), Redirect(f"{elsewhere.url}{own}"), authorized=True, times=None)
    user, password = secured.username, secured.password
    ref = f"{front.host}/{repo}:1"

    if what == "manifest":
        result = pull(*_trust(secured), ref)
    else:
        result = pull(*_trust(secured), "--all-tags", f"{front.host}/{repo}")

    assert result.code == 0, result.err
    redirected = [r for r in front.requests_for(re.escape(own)) if r.status == 307]
    assert redirected, "the registry's redirect was never asked for"
    assert all(r.header("Authorization") for r in redirected)
    arrived = elsewhere.requests_for(re.escape(own))
    assert [r.status for r in arrived] == [200] * len(redirected)
    _assert_nothing_arrived(elsewhere, _secrets(front, password, f"{user}:{password}"))
    assert entry_for(store, ref)["digest"] == image.manifest_digest
    assert_store_consistent(store)


# -- token requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [302, 303, 307, 308])
@pytest.mark.parametrize("credentials", ["password", "identity-token"])
def test_a_token_request_redirected_to_another_origin_goes_without_the_credentials(
    token_registry: Any,
    credentials: str,
    status: int,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    docker_config: Any,
    store: Path,
) -> None:
    server = token_registry.token_server
    user, password = token_registry.username, token_registry.password
    server.policy.allow_anonymous = False
    server.policy.identity_tokens = {IDENTITY_TOKEN: user}
    image = _push(token_registry, repo, seed=701)
    realm = proxies(server)
    elsewhere = proxies(server, upstream_headers={"Authorization": _basic(user, password)})
    front = proxies(token_registry)
    # The registry's challenges name the realm proxy, which sends every token request on.
    challenge = f'Bearer realm="{realm.url}/token",service="{server.service}"'
    front.on(r"/v2/.*", SetHeaders({"WWW-Authenticate": challenge}), method=None, times=None)
    target = f"{elsewhere.url}/token?service={server.service}&scope=repository:{repo}:pull"
    realm.on(re.escape("/token"), Redirect(target, status), method=None, times=None)
    if credentials == "password":
        docker_config.add_auth(front.host, username=user, password=password)
    else:
        docker_config.add_auth(front.host, identity_token=IDENTITY_TOKEN)
    ref = f"{front.host}/{repo}:1"

    result = pull(*_trust(token_registry), ref)

    asked = realm.requests_for(re.escape("/token"), None)
    assert asked, "the realm was never asked for a token"
    if credentials == "password":
        assert all(r.header("Authorization") == _basic(user, password) for r in asked)
    else:
        assert all(f"refresh_token={IDENTITY_TOKEN}".encode() in r.body for r in asked)
    secrets = _secrets(front, password, f"{user}:{password}", IDENTITY_TOKEN)
    _assert_nothing_arrived(elsewhere, secrets)
    if credentials == "identity-token" and status != 303:
        # Only a 303 turns the POST into a GET: any other would carry the form, refresh
        # token and all, to the other origin.
        assert result.code == 5
        assert "another origin" in one_line(result.err)
        assert elsewhere.requests == []
        assert index_entries(store) == []
    else:
        assert result.code == 0, result.err
        assert [r.method for r in elsewhere.requests] == ["GET"] * len(asked)
        assert entry_for(store, ref)["digest"] == image.manifest_digest
    assert_store_consistent(store)


# -- tag list pages on another host ------------------------------------------------------------


def test_a_tag_list_link_to_another_host_is_not_followed(
    secured: Any,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    docker_config: Any,
    store: Path,
) -> None:
    _push(secured, repo, seed=702)
    front, elsewhere = _front_and_elsewhere(secured, repo, proxies, docker_config)
    tags = f"/v2/{repo}/tags/list"
    link = f'<{elsewhere.url}{tags}?n=1&last=1>; rel="next"'
    front.on(re.escape(tags), SetHeaders({"Link": link}), times=None)

    result = pull(*_trust(secured), "--all-tags", f"{front.host}/{repo}")

    assert result.code == 5
    line = one_line(result.err)
    # The tag list's own check, which names what was refused and why.
    assert f"tag list of {repo}" in line
    assert "another host" in line
    assert any(r.header("Authorization") for r in front.requests_for(re.escape(tags)))
    assert elsewhere.requests == []
    assert index_entries(store) == []
    assert_store_consistent(store)


def test_the_client_sends_no_request_with_credentials_off_the_registry_origin(
    basic_registry: Any, repo: str, proxies: Proxy
) -> None:
    # The check under every call, not only the tag list's: a URL on another origin is refused
    # before anything is sent, whoever built it.
    _push(basic_registry, repo, seed=703)
    front = proxies(basic_registry)
    elsewhere = proxies(basic_registry)
    user, password = basic_registry.username, basic_registry.password
    credentials = Credentials(username=user, password=password)
    scope = f"repository:{repo}:pull"
    with Transport() as transport:
        client = RegistryClient(
            front.host, settings=Settings(), credentials=credentials, transport=transport
        )
        at_home = client.call("GET", client.repository_url(repo, "tags", "list"), scope)
        assert at_home.status == 200
        with pytest.raises(ProtocolError, match="refusing to send registry credentials"):
            client.call("GET", f"{elsewhere.url}/v2/{repo}/tags/list", scope)

    assert any(r.header("Authorization") == _basic(user, password) for r in front.requests)
    assert elsewhere.requests == []
