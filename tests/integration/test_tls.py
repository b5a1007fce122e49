"""TLS against the real HTTPS registry: the loopback policy, certificate verification, where
CA certificates come from, and that plain HTTP is only ever tried for insecure registries.

The TLS registry's certificate comes from a throwaway trustme CA that no system store trusts,
so every successful verified request below proves the CA was really taken from where the test
put it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import trustme

from fastpull.errors import ConnectionFailed, TLSFailure
from fastpull.registry.client import RegistryClient
from fastpull.registry.credentials import Credentials
from fastpull.registry.settings import Settings
from fastpull.registry.transport import Response, RetryPolicy, TLSConfig, Transport
from tests.integration.conftest import blob, entry_for, one_line
from tests.support.images import make_image, make_layer

# RFC 6761: .invalid never resolves, so nothing here can reach a real host.
UNREACHABLE = "registry.invalid:5000"


@pytest.fixture(autouse=True)
def _own_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's fastpull config and /etc/docker/certs.d out of these tests."""
    monkeypatch.setenv("FASTPULL_CONFIG", str(tmp_path / "fastpull-config.json"))
    monkeypatch.setenv("FASTPULL_CERTS_D", str(tmp_path / "certs.d"))


@pytest.fixture
def requested_urls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL of the small requests (ping, tokens, manifests) fastpull sends.

    Blob downloads may run in worker processes, out of reach of a monkeypatch; against the
    TLS-only registry their success is proof enough that they used HTTPS.
    """
    urls: list[str] = []
    send = Transport.send

    def recording_send(self: Transport, method: str, url: str, *args: Any, **kw: Any) -> Any:
        urls.append(url)
        return send(self, method, url, *args, **kw)

    monkeypatch.setattr(Transport, "send", recording_send)
    return urls


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry connection failures at once: the tests wait for the outcome, not the backoff."""
    monkeypatch.setattr(RetryPolicy, "delay", lambda self, attempt, retry_after=None: 0.0)


def _get_v2(url: str, tls_for: Callable[[str], TLSConfig]) -> int:
    with Transport(tls_for=tls_for) as transport:
        return transport.request("GET", f"{url}/v2/").status


def _verifying(settings: Settings) -> Callable[[str], TLSConfig]:
    """``settings.tls_for`` with verification forced on (loopback would switch it off)."""
    return lambda url: settings.tls_for(url)._replace(verify=True)


# -- loopback policy ---------------------------------------------------------------------------


def test_loopback_registry_is_pulled_over_https_without_its_ca(
    tls_registry: Any, repo: str, cli: Any, docker_config: Any, requested_urls: list[str]
) -> None:
    image = make_image([make_layer({"hello.txt": b"over TLS\n"}, seed=300)])
    tls_registry.pusher.push_image(repo, "1", image)
    ref = f"{tls_registry.host}/{repo}:1"
    mark = tls_registry.mark()

    result = cli("pull", ref)

    assert result.code == 0, result.err
    assert entry_for(docker_config.store, ref)["digest"] == image.manifest_digest
    assert blob(docker_config.store, image.layers[0].digest).read_bytes() == image.layers[0].data
    # The registry speaks only TLS, so the requests it logged, blobs included, came over HTTPS...
    logged = {(r.method, r.path) for r in tls_registry.requests(mark)}
    assert ("GET", f"/v2/{repo}/manifests/1") in logged
    assert ("GET", f"/v2/{repo}/blobs/{image.layers[0].digest}") in logged
    # ...and fastpull never even tried plain HTTP first.
    assert requested_urls
    assert all(url.startswith(f"https://{tls_registry.host}/") for url in requested_urls)


def test_https_requests_speak_http_1_1_though_the_registry_offers_http_2(
    tls_registry: Any, repo: str, cli: Any, docker_config: Any
) -> None:
    """HTTP/2 buys nothing with one connection per transfer and costs a Go registry CPU."""
    image = make_image([make_layer({"big.bin": bytes(range(256)) * 40_000}, seed=301)])
    tls_registry.pusher.push_image(repo, "1", image)
    mark = tls_registry.mark()

    result = cli("pull", f"{tls_registry.host}/{repo}:1")

    assert result.code == 0, result.err
    logged = tls_registry.requests(mark)
    assert ("GET", f"/v2/{repo}/blobs/{image.layers[0].digest}") in {
        (r.method, r.path) for r in logged
    }
    assert {r.protocol for r in logged} == {"HTTP/1.1"}
    # The registry does offer HTTP/2: a client that asks for it gets it.
    h2 = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(tls_registry.ca_path),
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            f"{tls_registry.url}/v2/",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert h2.stdout == "2"


# -- verification at the transport level -------------------------------------------------------


def test_verification_fails_without_the_registrys_ca(tls_registry: Any) -> None:
    with pytest.raises(TLSFailure, match=f"TLS error talking to {tls_registry.host}"):
        _get_v2(tls_registry.url, lambda _url: TLSConfig(verify=True))


def test_verification_fails_with_another_ca(tls_registry: Any, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))

    with pytest.raises(TLSFailure):
        _get_v2(tls_registry.url, lambda _url: TLSConfig(verify=True, ca_file=str(stranger)))


def test_verification_succeeds_with_the_registrys_ca(tls_registry: Any) -> None:
    mark = tls_registry.mark()
    ca = str(tls_registry.ca_path)

    assert _get_v2(tls_registry.url, lambda _url: TLSConfig(verify=True, ca_file=ca)) == 200
    assert [(r.method, r.path) for r in tls_registry.requests(mark)] == [("GET", "/v2/")]


def _ca_from_option(registry: Any, tmp_path: Path) -> Settings:
    return Settings.load(ca_cert=str(registry.ca_path))


def _ca_from_config_file(registry: Any, tmp_path: Path) -> Settings:
    config = tmp_path / "fastpull-config.json"
    config.write_text(f'{{"ca-cert": "{registry.ca_path}"}}')
    return Settings.load()


def _ca_from_certs_d(registry: Any, tmp_path: Path) -> Settings:
    directory = tmp_path / "certs.d" / registry.host
    directory.mkdir(parents=True)
    shutil.copyfile(registry.ca_path, directory / "ca.crt")
    return Settings.load()


@pytest.mark.parametrize(
    "load", [_ca_from_option, _ca_from_config_file, _ca_from_certs_d], ids=lambda f: f.__name__
)
def test_configured_ca_verifies_the_real_registry(
    tls_registry: Any, tmp_path: Path, load: Callable[[Any, Path], Settings]
) -> None:
    settings = load(tls_registry, tmp_path)

    tls = settings.tls_for(f"{tls_registry.url}/v2/")
    # Loopback: unverified by policy, but the CA is chosen all the same.
    assert not tls.verify
    assert tls.ca_file is not None
    assert _get_v2(tls_registry.url, _verifying(settings)) == 200


def test_certs_d_applies_only_to_its_own_host_and_port(tls_registry: Any, tmp_path: Path) -> None:
    host, port = tls_registry.host.rsplit(":", 1)
    directory = tmp_path / "certs.d" / f"{host}:{int(port) + 1}"
    directory.mkdir(parents=True)
    shutil.copyfile(tls_registry.ca_path, directory / "ca.crt")
    settings = Settings.load()

    assert settings.tls_for(f"{tls_registry.url}/v2/").ca_file is None
    with pytest.raises(TLSFailure):
        _get_v2(tls_registry.url, _verifying(settings))


# -- no plain HTTP for secure registries -------------------------------------------------------


def test_non_loopback_registry_is_never_tried_over_http(
    cli: Any, requested_urls: list[str], no_backoff: None
) -> None:
    result = cli("pull", f"{UNREACHABLE}/app:1")

    assert result.code == 5
    assert one_line(result.err) == (
        f"Error: cannot reach registry {UNREACHABLE}: could not resolve host"
    )
    assert requested_urls
    assert set(requested_urls) == {f"https://{UNREACHABLE}/v2/"}


def _scripted_send(
    monkeypatch: pytest.MonkeyPatch, answers: Mapping[str, Exception | int]
) -> list[str]:
    """Replace the network: each scheme fails with its exception or answers its status."""
    urls: list[str] = []

    def send(self: Transport, method: str, url: str, *args: Any, **kw: Any) -> Response:
        urls.append(url)
        answer = answers[url.split(":", 1)[0]]
        if isinstance(answer, Exception):
            raise answer
        return Response(answer, (), b"{}", url)

    monkeypatch.setattr(Transport, "send", send)
    return urls


def _client(settings: Settings, transport: Transport) -> RegistryClient:
    return RegistryClient(
        UNREACHABLE, settings=settings, credentials=Credentials(), transport=transport
    )


def test_tls_failure_on_a_secure_registry_is_final_and_names_the_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expired = TLSFailure(f"TLS error talking to {UNREACHABLE}: certificate has expired")
    urls = _scripted_send(monkeypatch, {"https": expired, "http": 200})

    with Transport() as transport, pytest.raises(TLSFailure) as excinfo:
        _client(Settings(), transport).base_url  # noqa: B018 - reading it pings

    assert urls == [f"https://{UNREACHABLE}/v2/"]
    assert f"pass --insecure-registry {UNREACHABLE}" in str(excinfo.value)


def test_insecure_registry_falls_back_to_http_after_https(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = TLSFailure(f"TLS error talking to {UNREACHABLE}: wrong version number")
    urls = _scripted_send(monkeypatch, {"https": refused, "http": 200})
    settings = Settings(insecure_registries=(UNREACHABLE,))

    with Transport() as transport:
        assert _client(settings, transport).base_url == f"http://{UNREACHABLE}"

    assert urls == [f"https://{UNREACHABLE}/v2/", f"http://{UNREACHABLE}/v2/"]


# -- --insecure-registry from every source -----------------------------------------------------


@pytest.mark.parametrize("source", ["option", "config file", "environment"])
def test_insecure_registry_reaches_the_pull_from_every_source(
    source: str,
    cli: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_backoff: None,
) -> None:
    urls = _scripted_send(
        monkeypatch,
        {"https": TLSFailure("handshake failed"), "http": ConnectionFailed("refused")},
    )
    options: list[str] = []
    if source == "option":
        options = ["--insecure-registry", UNREACHABLE]
    elif source == "config file":
        (tmp_path / "fastpull-config.json").write_text(
            f'{{"insecure-registries": ["other.example", "{UNREACHABLE}"]}}'
        )
    else:
        monkeypatch.setenv("FASTPULL_INSECURE_REGISTRIES", f"other.example, {UNREACHABLE}")

    result = cli("pull", *options, f"{UNREACHABLE}/app:1")

    assert result.code == 5
    assert one_line(result.err) == "Error: refused"
    assert urls[0] == f"https://{UNREACHABLE}/v2/"
    assert set(urls[1:]) == {f"http://{UNREACHABLE}/v2/"}


@pytest.mark.parametrize("source", ["option", "config file", "environment"])
def test_malformed_insecure_registry_is_a_usage_error_from_every_source(
    source: str, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options: list[str] = []
    if source == "option":
        options = ["--insecure-registry", "host/path"]
    elif source == "config file":
        (tmp_path / "fastpull-config.json").write_text('{"insecure-registries": ["host/path"]}')
    else:
        monkeypatch.setenv("FASTPULL_INSECURE_REGISTRIES", "host/path")

    result = cli("pull", *options, f"{UNREACHABLE}/app:1")

    assert result.code == 2
    assert one_line(result.err) == (
        "Error: invalid insecure registry 'host/path': expected HOST[:PORT] or a CIDR"
    )
