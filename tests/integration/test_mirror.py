"""`fastpull push` and `fastpull copy` between two real registries (Debian's
docker-registry): what moves, what is mounted, what the destination ends up holding."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import _serve
from tests.support.images import Image, make_image, make_layer
from tests.support.registry import LoggedRequest, RegistryServer


@pytest.fixture(scope="module")
def dest_registry() -> Iterator[RegistryServer]:
    """A second plain-HTTP registry without auth: the destination of copies and pushes."""
    yield from _serve()


def _short(digest: str) -> str:
    return digest.split(":", 1)[1][:12]


def _uploads(requests: list[LoggedRequest]) -> list[LoggedRequest]:
    """Requests that carry blob bytes (PUT/PATCH on an upload session)."""
    return [r for r in requests if r.method in ("PUT", "PATCH") and "/blobs/uploads/" in r.path]


def _mounts(requests: list[LoggedRequest]) -> list[LoggedRequest]:
    return [r for r in requests if r.method == "POST" and "mount=" in r.path and r.status == 201]


def _pulled(cli: Any, registry: RegistryServer, repo: str, tag: str, image: Image) -> str:
    registry.pusher.push_image(repo, tag, image)
    ref = f"{registry.host}/{repo}:{tag}"
    result = cli("pull", ref)
    assert result.code == 0, result.err
    return ref


def _raw_manifest(registry: RegistryServer, repo: str, reference: str) -> bytes:
    """What skopeo reads back from the registry, byte for byte."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        if os.environ.get("CI") == "true":
            pytest.fail("skopeo is required when CI=true")
        pytest.skip("skopeo not installed")
    separator = "@" if reference.startswith("sha256:") else ":"
    return subprocess.run(
        [
            skopeo,
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://{registry.host}/{repo}{separator}{reference}",
        ],
        check=True,
        capture_output=True,
    ).stdout


def test_push_prints_docker_lines_then_a_second_push_moves_no_blob(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    layers = [make_layer(300_000, seed=501), make_layer(2000, seed=502)]
    image = make_image(layers)
    ref = _pulled(cli, registry, repo, "1", image)
    dest = f"{dest_registry.host}/{repo}:1"

    mark = dest_registry.mark()
    result = cli("push", ref, dest)

    assert result.code == 0, result.err
    assert result.lines[0] == f"The push refers to repository [{dest_registry.host}/{repo}]"
    for layer in layers:
        assert f"{_short(layer.digest)}: Preparing" in result.lines
        assert f"{_short(layer.digest)}: Pushed" in result.lines
    size = len(image.manifest_bytes)
    assert result.lines[-1] == f"1: digest: {image.manifest_digest} size: {size}"
    sent = _uploads(dest_registry.requests(mark))
    assert sum(r.status == 201 for r in sent) == 3  # config and two layers
    assert _raw_manifest(dest_registry, repo, "1") == image.manifest_bytes

    mark = dest_registry.mark()
    again = cli("push", ref, dest)

    assert again.code == 0, again.err
    for layer in layers:
        assert f"{_short(layer.digest)}: Layer already exists" in again.lines
    assert _uploads(dest_registry.requests(mark)) == []
    assert [r.method for r in dest_registry.requests(mark) if "/blobs/uploads/" in r.path] == []
