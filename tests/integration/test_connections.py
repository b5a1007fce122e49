"""How many connections a pull opens, against a real registry behind nginx with a
per-connection rate cap (``limit_rate``, as CDN edges and S3 give each TCP connection its
share). The counts are checked, never the time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fastpull
from fastpull.engine.download import DEFAULT_CONNECTIONS
from tests.support.images import MiB, make_image, make_layer
from tests.support.nginxproxy import RateCappedProxy
from tests.support.tools import require_tool


@pytest.fixture
def capped(registry: Any, repo: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A 96 MiB layer behind nginx at 2 MB/s per connection: (reference, layer digest)."""
    require_tool("nginx")
    layer = make_layer(96 * MiB, compression="none", seed=71, workdir=tmp_path)
    registry.pusher.push_image(repo, "1", make_image([layer]))
    access_log = tmp_path / "nginx-access.log"
    with RateCappedProxy(registry.host, rate_bytes=2_000_000, access_log=access_log) as proxy:
        yield f"{proxy.host}/{repo}:1", layer.digest


def _connections(result: fastpull.PullResult, digest: str) -> int:
    return next(b.connections for b in result.blobs if str(b.digest) == digest)


def test_behind_a_per_connection_cap_the_pull_adds_connections(
    capped: tuple[str, str], tmp_path: Path
) -> None:
    ref, digest = capped

    result = fastpull.pull(ref, store=str(tmp_path / "store"), workers=2)

    # Every doubling raised the rate (each connection brings 2 MB/s), so the pull went past
    # its start, and never past the ceiling.
    assert DEFAULT_CONNECTIONS < _connections(result, digest) <= 64


def test_a_pinned_count_is_kept_behind_the_cap(capped: tuple[str, str], tmp_path: Path) -> None:
    ref, digest = capped

    result = fastpull.pull(ref, store=str(tmp_path / "store"), workers=2, connections=6)

    assert 0 < _connections(result, digest) <= 6


def test_the_ceiling_is_kept_behind_the_cap(
    capped: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ref, digest = capped
    config = tmp_path / "fastpull.json"
    config.write_text('{"max-connections": 20}')
    monkeypatch.setenv("FASTPULL_CONFIG", str(config))

    result = fastpull.pull(ref, store=str(tmp_path / "store"), workers=2)

    assert DEFAULT_CONNECTIONS < _connections(result, digest) <= 20


def test_each_registry_host_keeps_its_own_ceiling(
    registry: Any, repo: str, cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # One batch from two hosts (two nginx fronts of one registry, 2 MB/s per connection
    # each): each host's blob grows behind its cap, up to that host's own ceiling.
    require_tool("nginx")
    big = make_layer(96 * MiB, compression="none", seed=72, workdir=tmp_path)
    small = make_layer(24 * MiB, compression="none", seed=73, workdir=tmp_path)
    registry.pusher.push_image(repo, "big", make_image([big]))
    registry.pusher.push_image(repo, "small", make_image([small]))
    with (
        RateCappedProxy(
            registry.host, rate_bytes=2_000_000, access_log=tmp_path / "wide.log"
        ) as wide,
        RateCappedProxy(
            registry.host, rate_bytes=2_000_000, access_log=tmp_path / "narrow.log"
        ) as narrow,
    ):
        config = tmp_path / "fastpull.json"
        config.write_text(json.dumps({"registry-max-connections": {wide.host: 20, narrow.host: 6}}))
        monkeypatch.setenv("FASTPULL_CONFIG", str(config))
        batch = tmp_path / "batch.txt"
        batch.write_text(f"{wide.host}/{repo}:big\n{narrow.host}/{repo}:small\n")
        stats = tmp_path / "stats.json"

        result = cli("pull", "-q", "-f", str(batch), "--stats", str(stats))

    assert result.code == 0, result.err
    connections = {
        b["digest"]: b["connections"]
        for image in json.loads(stats.read_text())["images"]
        for b in image["blobs"]
    }
    assert DEFAULT_CONNECTIONS < connections[big.digest] <= 20
    assert 0 < connections[small.digest] <= 6
