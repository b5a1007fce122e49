"""Which registries may use plain HTTP, and which CA files apply to which origin."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastpull.errors import ConfigError, UsageError
from fastpull.reference import is_loopback_registry, split_registry
from fastpull.registry.settings import Settings


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTPULL_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.setenv("FASTPULL_CERTS_D", str(tmp_path / "certs.d"))
    monkeypatch.delenv("FASTPULL_INSECURE_REGISTRIES", raising=False)


def test_split_registry() -> None:
    assert split_registry("[::1]:5000") == ("::1", 5000)
    assert split_registry("Registry.Example:443") == ("registry.example", 443)
    assert split_registry("localhost") == ("localhost", None)
    with pytest.raises(UsageError):
        split_registry("host:port")


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("docker.io", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback(registry: str, expected: bool) -> None:
    assert is_loopback_registry(registry) is expected


def test_insecure_sources_add_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text('{"insecure-registries": ["cfg.example:5000"]}')
    monkeypatch.setenv("FASTPULL_INSECURE_REGISTRIES", "env.example, 10.1.0.0/16")
    s = Settings.load(insecure_registries=("cli.example",))
    assert s.is_insecure("cfg.example:5000")
    assert not s.is_insecure("cfg.example:5001")  # a port in the entry must match
    assert s.is_insecure("env.example:443")  # an entry without a port matches every port
    assert s.is_insecure("cli.example")
    assert s.is_insecure("10.1.2.3:5000")
    assert not s.is_insecure("registry.example")
    # CIDRs match IP literals only, never names that might resolve into them.
    assert not s.is_insecure("ten-one.example")


@pytest.mark.parametrize(
    "content",
    [
        '{"insecure-registries": "x"}',
        "[1]",
        "{nope",
        '{"unknown-key": 1}',
        '{"max-concurrent-downloads": 0}',
        '{"max-connections": 0}',
        '{"max-connections": 257}',
        '{"connections": true}',
        '{"registry-max-connections": [8]}',
        '{"registry-max-connections": {"ghcr.io": 0}}',
        '{"registry-max-connections": {"ghcr.io": "8"}}',
        '{"registry-max-connections": {"not a host": 8}}',
    ],
)
def test_bad_config_files_are_reported(tmp_path: Path, content: str) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=r"config\.json"):
        Settings.load()


def test_connections_adapt_unless_pinned(tmp_path: Path) -> None:
    assert (Settings.load().connections, Settings.load().max_connections) == (None, 64)
    (tmp_path / "config.json").write_text('{"max-connections": 128, "connections": 8}')
    assert (Settings.load().connections, Settings.load().max_connections) == (8, 128)
    pinned = Settings.load(connections=3, max_connections=4)
    assert (pinned.connections, pinned.max_connections) == (3, 4)


def test_each_registry_can_have_its_own_ceiling(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"max-connections": 32,'
        ' "registry-max-connections": {"GHCR.io": 128, "index.docker.io": 8, "[::1]:5000": 4}}'
    )
    settings = Settings.load()

    # Engines see endpoint hosts: Docker Hub's names its API host, under any spelling.
    assert settings.ceiling_for("ghcr.io") == 128
    assert settings.ceiling_for("registry-1.docker.io") == 8
    assert settings.ceiling_for("[::1]:5000") == 4
    assert settings.ceiling_for("quay.io") == 32
    # --connections pins every registry.
    assert Settings.load(connections=3).ceiling_for("ghcr.io") == 3


def test_missing_ca_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        Settings.load(ca_cert=str(tmp_path / "nope.pem"))


def test_tls_for_uses_certs_d_and_ca_cert(tmp_path: Path) -> None:
    d = tmp_path / "certs.d" / "reg.example:5000"
    d.mkdir(parents=True)
    (d / "ca.crt").write_text("CA-ONE\n")
    (d / "client.cert").write_text("C")
    (d / "client.key").write_text("K")
    extra = tmp_path / "extra.pem"
    extra.write_text("CA-TWO\n")
    tls = Settings.load(ca_cert=str(extra)).tls_for("https://reg.example:5000/v2/")
    assert tls.verify
    assert tls.ca_file is not None
    bundle = Path(tls.ca_file).read_text()
    assert "CA-ONE" in bundle and "CA-TWO" in bundle
    assert tls.client_cert == str(d / "client.cert")
    other = Settings.load().tls_for("https://other.example/v2/")
    assert other.ca_file is None and other.verify
    assert not Settings.load().tls_for("https://127.0.0.1:5000/v2/").verify
