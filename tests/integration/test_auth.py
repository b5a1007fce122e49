"""Authentication end to end: Basic (htpasswd), token auth with a real token server,
docker's config.json and credential helpers, `login` / `logout`."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import fastpull
from fastpull.errors import ProtocolError, Unauthorized
from fastpull.puller import Puller
from fastpull.reference import Reference
from fastpull.registry.settings import Settings
from fastpull.store.layout import Store
from tests.integration.conftest import entry_for
from tests.support.images import make_image, make_layer
from tests.support.registry import RegistryServer
from tests.support.tokenserver import TokenPolicy, TokenServer


def _login(cli: Any, monkeypatch: pytest.MonkeyPatch, server: str, user: str, password: str) -> Any:
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    return cli("login", "--username", user, "--password-stdin", server)


def _all_output(*results: Any) -> str:
    return "".join(r.out + r.err for r in results)


def test_basic_auth_login_pull_logout(
    basic_registry: Any, repo: str, cli: Any, docker_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = make_image([make_layer(2000, seed=100)])
    basic_registry.pusher.push_image(repo, "1", image)
    ref = f"{basic_registry.host}/{repo}:1"

    anonymous = cli("pull", ref)
    assert anonymous.code == 3
    assert "unauthorized: authentication required" in anonymous.err
    assert f"fastpull login {basic_registry.host}" in anonymous.err

    wrong = _login(cli, monkeypatch, basic_registry.host, basic_registry.username, "wrong")
    assert wrong.code == 3
    assert "incorrect username or password" in wrong.err
    assert not docker_config.config_file.exists()

    good = _login(
        cli, monkeypatch, basic_registry.host, basic_registry.username, basic_registry.password
    )
    assert good.code == 0, good.err
    assert good.lines == ["Login Succeeded"]
    assert stat.S_IMODE(docker_config.config_file.stat().st_mode) == 0o600
    auth = docker_config.read()["auths"][basic_registry.host]["auth"]
    assert base64.b64decode(auth).decode() == f"{basic_registry.username}:{basic_registry.password}"

    pulled = cli("pull", ref)
    assert pulled.code == 0, pulled.err
    assert entry_for(docker_config.store, ref)["digest"] == image.manifest_digest

    out = cli("logout", basic_registry.host)
    assert out.lines == [f"Removing login credentials for {basic_registry.host}"]
    assert basic_registry.host not in docker_config.read().get("auths", {})
    assert cli("logout", basic_registry.host).lines == [f"Not logged in to {basic_registry.host}"]
    assert basic_registry.password not in _all_output(anonymous, wrong, good, pulled, out)


def test_token_auth_anonymous_pull_uses_one_cached_token(
    token_registry: Any, repo: str, cli: Any
) -> None:
    image = make_image([make_layer(3000, seed=101), make_layer(4000, seed=102)])
    token_registry.pusher.push_image(repo, "1", image)
    ref = f"{token_registry.host}/{repo}:1"
    server = token_registry.token_server
    server.clear_requests()

    result = cli("pull", ref)

    assert result.code == 0, result.err
    requests = server.requests
    assert len(requests) == 1, requests
    assert requests[0].method == "GET"
    assert not requests[0].basic_auth
    assert requests[0].scopes == (f"repository:{repo}:pull",)


def test_token_auth_with_docker_config_credentials(
    token_registry: Any, repo: str, cli: Any, docker_config: Any
) -> None:
    token_registry.token_server.policy.allow_anonymous = False
    image = make_image([make_layer(1000, seed=103)])
    token_registry.pusher.push_image(repo, "1", image)
    ref = f"{token_registry.host}/{repo}:1"

    denied = cli("pull", ref)
    assert denied.code == 3
    assert "unauthorized" in denied.err

    docker_config.add_auth(
        token_registry.host, username=token_registry.username, password=token_registry.password
    )
    token_registry.token_server.clear_requests()
    result = cli("pull", ref)
    assert result.code == 0, result.err
    [request] = token_registry.token_server.requests
    assert request.basic_auth and request.username == token_registry.username
    assert token_registry.password not in _all_output(denied, result)


def test_identity_token_uses_the_refresh_token_grant(
    token_registry: Any, repo: str, cli: Any, docker_config: Any
) -> None:
    policy = token_registry.token_server.policy
    policy.allow_anonymous = False
    policy.identity_tokens = {"identity-secret-123": token_registry.username}
    token_registry.pusher.push_image(repo, "1", make_image([make_layer(500, seed=104)]))
    docker_config.add_auth(token_registry.host, identity_token="identity-secret-123")
    token_registry.token_server.clear_requests()

    result = cli("pull", f"{token_registry.host}/{repo}:1")

    assert result.code == 0, result.err
    [request] = token_registry.token_server.requests
    assert (request.method, request.grant_type) == ("POST", "refresh_token")
    assert "identity-secret-123" not in _all_output(result)


def test_credential_helper_from_credsstore(
    token_registry: Any,
    repo: str,
    cli: Any,
    docker_config: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token_registry.token_server.policy.allow_anonymous = False
    token_registry.pusher.push_image(repo, "1", make_image([make_layer(500, seed=105)]))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fptest"
    reply = json.dumps(
        {
            "ServerURL": token_registry.host,
            "Username": token_registry.username,
            "Secret": token_registry.password,
        }
    )
    helper.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = get ] || exit 1\nread server\necho "$server" >> {tmp_path}/asked\n'
        f"echo '{reply}'\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    docker_config.write({"credsStore": "fptest"})
    token_registry.token_server.clear_requests()

    result = cli("pull", f"{token_registry.host}/{repo}:1")

    assert result.code == 0, result.err
    assert (tmp_path / "asked").read_text().split() == [token_registry.host]
    [request] = token_registry.token_server.requests
    assert request.username == token_registry.username

    docker_config.write({"credsStore": "missing-helper"})
    missing = cli("pull", f"{token_registry.host}/{repo}:1")
    assert missing.code == 3
    assert "docker-credential-missing-helper" in missing.err


def test_expired_tokens_are_refreshed_mid_session(
    token_registry: Any, repo: str, docker_config: Any
) -> None:
    """A cached token that the registry rejects (401) is replaced once, and the pull goes on."""
    images = [make_image([make_layer(700, seed=106 + i)]) for i in range(2)]
    for i, image in enumerate(images):
        token_registry.pusher.push_image(repo, f"v{i}", image)
    # The first token dies at the registry (60 s leeway included) about 4 s after it is
    # issued, while fastpull, told expires_in=300, would keep it for minutes.
    policy = token_registry.token_server.policy
    policy.time_offset = -(300 + 56)
    token_registry.token_server.clear_requests()
    store = Store.open(docker_config.store)
    with Puller(store, settings=Settings.load()) as puller:
        puller.pull(Reference.parse(f"{token_registry.host}/{repo}:v0"))
        policy.time_offset = 0
        time.sleep(5)
        puller.pull(Reference.parse(f"{token_registry.host}/{repo}:v1"))
    assert len(token_registry.token_server.requests) == 2
    assert entry_for(docker_config.store, f"{token_registry.host}/{repo}:v1")


def test_tokens_the_registry_never_accepts_fail_after_one_retry(
    token_registry: Any, repo: str, docker_config: Any
) -> None:
    token_registry.pusher.push_image(repo, "1", make_image([make_layer(100, seed=108)]))
    token_registry.token_server.policy.time_offset = -3600  # every token is already expired
    token_registry.token_server.clear_requests()
    with pytest.raises(Unauthorized):
        fastpull.pull(f"{token_registry.host}/{repo}:1")
    assert len(token_registry.token_server.requests) == 1


def test_plain_http_realm_for_an_https_registry_is_refused(docker_config: Any, repo: str) -> None:
    users = {"fastpull": "fastpull-secret"}
    with (
        TokenServer(TokenPolicy(users=users), tls=False) as tokens,
        RegistryServer(tls=True, auth="token", token_server=tokens) as registry,
    ):
        registry.pusher.push_image(repo, "1", make_image([make_layer(100, seed=109)]))
        tokens.clear_requests()
        with pytest.raises(ProtocolError, match="realm"):
            fastpull.pull(f"{registry.host}/{repo}:1")
        assert tokens.requests == []
