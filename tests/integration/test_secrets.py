"""Credentials never show up in anything fastpull writes: stdout (docker lines or ``--json``
events), stderr (error messages included), ``--stats`` files, the store.

Pulls go through a :class:`~tests.support.faultproxy.FaultProxy`, which records every
``Authorization`` header the registry received, so the tokens actually issued are known too;
everything fastpull wrote is then searched for each secret, and for its base64 form.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import CliResult, Proxy
from tests.support.faultproxy import ANY_BLOB, ExpireToken, FaultProxy, Status
from tests.support.images import make_image, make_layer

IDENTITY_TOKEN = "identity-token-that-must-stay-secret"


def _written(results: list[CliResult], *roots: Path) -> Iterator[tuple[str, bytes]]:
    """Everything fastpull wrote: its output streams and every file under ``roots``."""
    for i, result in enumerate(results):
        yield f"stdout of pull {i}", result.out.encode()
        yield f"stderr of pull {i}", result.err.encode()
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                yield str(path), path.read_bytes()


def _secrets(proxy: FaultProxy, *known: str) -> set[str]:
    """The known secrets, and every credential the registry was sent through ``proxy``."""
    found = {s for s in known if s}
    for request in proxy.requests:
        value = request.header("Authorization")
        if value:
            found.add(value.split(" ", 1)[1])
    for secret in list(found):
        found.add(base64.b64encode(secret.encode()).decode())
    return found


def _assert_nothing_leaked(results: list[CliResult], secrets: set[str], *roots: Path) -> None:
    assert secrets, "no secret was ever sent: the test proves nothing"
    for where, data in _written(results, *roots):
        for secret in secrets:
            assert secret.encode() not in data, f"{secret[:12]}… appears in {where}"


def _fastpull_files(tmp_path: Path, docker_config: Any) -> list[Path]:
    """Where fastpull may have written: the test's directory but docker's config (which
    holds the credentials by design)."""
    return [path for path in tmp_path.iterdir() if path != docker_config.path]


def _pulls(
    pull: Callable[..., CliResult], tmp_path: Path, ref: str, *extra: str
) -> Callable[..., CliResult]:
    """``pull`` with --json and a --stats file of its own each time."""
    count = iter(range(100))

    def run(*args: str) -> CliResult:
        stats = tmp_path / "stats" / f"{next(count)}.json"
        stats.parent.mkdir(exist_ok=True)
        return pull("--json", "--stats", str(stats), *extra, *args, ref)

    return run


def test_basic_credentials_never_appear_in_output_stats_or_store(
    basic_registry: Any,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    docker_config: Any,
    tmp_path: Path,
) -> None:
    basic_registry.pusher.push_image(repo, "1", make_image([make_layer(3_000, seed=500)]))
    proxy = proxies(basic_registry)
    ref = f"{proxy.host}/{repo}:1"
    run = _pulls(pull, tmp_path, ref)
    user, password = basic_registry.username, basic_registry.password
    results = []

    docker_config.add_auth(proxy.host, username=user, password=password)
    results.append(run())
    assert results[-1].code == 0, results[-1].err
    # A registry failing mid-pull, after the credentials were accepted.
    proxy.on(ANY_BLOB, Status(503, "0"), times=None)
    results.append(run("--store", str(tmp_path / "other-store")))
    assert results[-1].code == 5
    docker_config.add_auth(proxy.host, username=user, password=password + "-wrong")
    results.append(run())
    assert results[-1].code == 3

    secrets = _secrets(proxy, password, password + "-wrong", f"{user}:{password}")
    _assert_nothing_leaked(results, secrets, *_fastpull_files(tmp_path, docker_config))


@pytest.mark.parametrize("credentials", ["password", "identity-token"])
def test_tokens_and_token_credentials_never_appear_in_output_stats_or_store(
    token_registry: Any,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    docker_config: Any,
    tmp_path: Path,
    credentials: str,
) -> None:
    server = token_registry.token_server
    server.policy.allow_anonymous = False
    server.policy.identity_tokens = {IDENTITY_TOKEN: token_registry.username}
    image = make_image([make_layer(3_000, seed=501), make_layer(4_000, seed=502)])
    token_registry.pusher.push_image(repo, "1", image)
    proxy = proxies(token_registry)
    ref = f"{proxy.host}/{repo}:1"
    run = _pulls(pull, tmp_path, ref, "--ca-cert", str(token_registry.ca_path))
    user, password = token_registry.username, token_registry.password
    if credentials == "password":
        docker_config.add_auth(proxy.host, username=user, password=password)
    else:
        docker_config.add_auth(proxy.host, identity_token=IDENTITY_TOKEN)
    results = []

    # Every request's token is used once only, so several are issued.
    proxy.on(r"/v2/.+", ExpireToken(), times=None)
    results.append(run())
    assert results[-1].code == 0, results[-1].err
    server.policy.failure, server.policy.failure_count = "garbage", None
    results.append(run("--store", str(tmp_path / "store-2")))
    assert results[-1].code == 5
    server.policy.failure = None
    server.policy.users = {user: "changed"}
    server.policy.identity_tokens = {}
    results.append(run("--store", str(tmp_path / "store-3")))
    assert results[-1].code == 3

    secrets = _secrets(proxy, password, IDENTITY_TOKEN, f"{user}:{password}")
    assert len(secrets) > 4  # the tokens the registry saw are among them
    _assert_nothing_leaked(results, secrets, *_fastpull_files(tmp_path, docker_config))
