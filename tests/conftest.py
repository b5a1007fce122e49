"""Shared fixtures: real registries (plain, TLS, Basic, token auth) and an isolated environment.

Registries are session-scoped and shared, so tests should push to repository names of their own.
Without ``docker-registry`` installed the registry fixtures skip, except under ``CI=true`` where a
missing registry is a failure.

Property tests (hypothesis) run the ``ci`` profile under ``CI=true``: the same examples every run,
chosen by a hash of each test (so a bug is caught every run or never, and a failure is
reproducible), with the blob that replays a failure printed, and without deadlines (a loaded
2-core machine makes example timings meaningless). Elsewhere they draw new examples each run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.support.dockerconfig import DockerConfig
from tests.support.registry import RegistryServer, RegistryUnavailable

# Tests that name their own max_examples keep it; the rest get twice hypothesis's default.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

# Variables from the developer's shell that would change what fastpull does under test.
_LEAKY_PREFIXES = ("FASTPULL_", "DOCKER_")
_KEPT = frozenset({"FASTPULL_REQUIRE_NATIVE"})
# Loopback registries must be reached directly, never through a proxy configured in the shell.
_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drop FASTPULL_*/DOCKER_* (except FASTPULL_REQUIRE_NATIVE) and proxy variables, and
    point fastpull's config file and docker's certs.d at empty places, so nothing of the
    developer's own setup reaches the tests."""
    for name in list(os.environ):
        leaky = name.startswith(_LEAKY_PREFIXES) and name not in _KEPT
        if leaky or name.lower() in _PROXY_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("FASTPULL_CONFIG", str(tmp_path / "no-fastpull-config.json"))
    monkeypatch.setenv("FASTPULL_CERTS_D", str(tmp_path / "no-certs.d"))


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DockerConfig:
    """Point DOCKER_CONFIG at an empty directory and FASTPULL_STORE at a fresh store dir."""
    config_dir = tmp_path / "docker-config"
    store = tmp_path / "fastpull-store"
    config_dir.mkdir()
    store.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    monkeypatch.setenv("FASTPULL_STORE", str(store))
    return DockerConfig(config_dir, store)


def _serve(**options: Any) -> Iterator[RegistryServer]:
    server = RegistryServer(**options)
    try:
        server.start()
    except RegistryUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc}; the registry is required when CI=true")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryServer]:
    """A plain-HTTP registry without auth."""
    yield from _serve()


@pytest.fixture(scope="session")
def tls_registry() -> Iterator[RegistryServer]:
    """An HTTPS registry; trust ``.ca_path`` to talk to it."""
    yield from _serve(tls=True)


@pytest.fixture(scope="session")
def basic_registry() -> Iterator[RegistryServer]:
    """A plain-HTTP registry requiring htpasswd Basic auth (``.username``/``.password``)."""
    yield from _serve(auth="htpasswd")


@pytest.fixture(scope="session")
def _token_registry_session() -> Iterator[RegistryServer]:
    yield from _serve(auth="token", tls=True)


@pytest.fixture
def token_registry(_token_registry_session: RegistryServer) -> Iterator[RegistryServer]:
    """An HTTPS registry using token auth; ``.token_server`` is reset after each test.

    ``.ca_path`` trusts both the registry and the token realm; ``.username``/``.password``
    is the one user the token server knows.
    """
    yield _token_registry_session
    assert _token_registry_session.token_server is not None
    _token_registry_session.token_server.reset()
