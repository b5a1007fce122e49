"""`fastpull pull` against the real registry: what it prints, what it stores, what it fetches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

import fastpull
from fastpull.errors import DigestMismatch, ManifestError
from tests.integration.conftest import blob, blob_gets, entry_for, env_store, index_entries
from tests.support.images import make_image, make_index, make_layer, raw_blob


def test_pull_prints_docker_lines_and_stores_an_oci_layout(
    registry: Any, repo: str, cli: Any
) -> None:
    layers = [make_layer({"etc/os-release": b"ID=test\n"}, seed=1), make_layer(300_000, seed=2)]
    image = make_image(layers)
    registry.pusher.push_image(repo, "1.0", image)
    ref = f"{registry.host}/{repo}:1.0"

    result = cli("pull", ref)

    assert result.code == 0, result.err
    assert result.lines[0] == f"1.0: Pulling from {repo}"
    for layer in layers:
        short = layer.digest.split(":")[1][:12]
        assert f"{short}: Pulling fs layer" in result.lines
        assert f"{short}: Pull complete" in result.lines
    assert f"Digest: {image.manifest_digest}" in result.lines
    assert f"Status: Downloaded newer image for {ref}" in result.lines
    assert result.lines[-1] == ref

    store = env_store()
    assert json.loads((store / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    entry = entry_for(store, ref)
    assert entry["digest"] == image.manifest_digest
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert entry["annotations"]["io.fastpull.repo-digest"] == image.manifest_digest
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert blob(store, image.manifest_digest).read_bytes() == image.manifest_bytes
    for digest, data in image.blobs.items():
        assert blob(store, digest).read_bytes() == data
    assert list((store / "ingest").glob("*.data")) == []


def test_repull_fetches_only_the_manifest(registry: Any, repo: str, cli: Any) -> None:
    image = make_image([make_layer(1000, seed=3), make_layer(2000, seed=4)])
    registry.pusher.push_image(repo, "v1", image)
    ref = f"{registry.host}/{repo}:v1"
    assert cli("pull", ref).code == 0

    mark = registry.mark()
    again = cli("pull", ref)

    assert again.code == 0
    assert f"Status: Image is up to date for {ref}" in again.lines
    assert sum("Already exists" in line for line in again.lines) == 2
    fetched = [(r.method, r.path) for r in registry.requests(mark) if r.path != "/v2/"]
    assert fetched == [("GET", f"/v2/{repo}/manifests/v1")]


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_multi_platform_index_selects_the_requested_platform(
    registry: Any, repo: str, cli: Any, fmt: str
) -> None:
    base = make_layer(5000, seed=10, format=fmt)
    amd = make_image([base, make_layer(100, seed=11, format=fmt)], format=fmt)
    arm = make_image(
        [base, make_layer(200, seed=12, format=fmt)], architecture="arm64", variant="v8", format=fmt
    )
    index = make_index([amd, arm], format=fmt)
    registry.pusher.push_index(repo, "multi", index)
    ref = f"{registry.host}/{repo}:multi"

    result = cli("pull", "--platform", "linux/aarch64", ref)

    assert result.code == 0, result.err
    assert f"Digest: {index.manifest_digest}" in result.lines
    entry = entry_for(env_store(), ref)
    if fmt == "oci":
        assert entry["digest"] == arm.manifest_digest
    else:
        # Stored converted to OCI (as `skopeo copy` does); the registry's digest is kept.
        assert entry["annotations"]["io.fastpull.source-manifest"] == arm.manifest_digest
        assert blob(env_store(), arm.manifest_digest).read_bytes() == arm.manifest_bytes
    stored = json.loads(blob(env_store(), entry["digest"]).read_bytes())
    assert stored["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert stored["config"]["digest"] == arm.config_digest
    assert [layer["digest"] for layer in stored["layers"]] == [x.digest for x in arm.layers]
    # Normalized as containerd does: arm64/v8 is plain arm64.
    assert entry["platform"] == {"architecture": "arm64", "os": "linux"}
    assert entry["annotations"]["io.fastpull.repo-digest"] == index.manifest_digest
    assert not blob(env_store(), amd.layers[1].digest).exists()

    missing = cli("pull", "--platform", "linux/s390x", ref)
    assert missing.code == 4
    assert "no matching manifest for linux/s390x" in missing.err
    assert "available: linux/amd64, linux/arm64" in missing.err


def test_pull_by_digest_wins_over_the_tag(registry: Any, repo: str, cli: Any) -> None:
    old = make_image([make_layer(100, seed=20)])
    new = make_image([make_layer(100, seed=21)])
    registry.pusher.push_image(repo, None, old)
    registry.pusher.push_image(repo, "latest", new)

    by_digest = f"{registry.host}/{repo}@{old.manifest_digest}"
    assert cli("pull", by_digest).code == 0
    assert entry_for(env_store(), by_digest)["digest"] == old.manifest_digest

    both = f"{registry.host}/{repo}:latest@{old.manifest_digest}"
    result = cli("pull", both)
    assert result.code == 0
    assert entry_for(env_store(), both)["digest"] == old.manifest_digest
    assert result.lines[0].startswith(f"{old.manifest_digest}: Pulling from")


def test_all_tags_pulls_every_tag_and_fetches_shared_blobs_once(
    registry: Any, repo: str, cli: Any
) -> None:
    base = make_layer(50_000, seed=30)
    images = {f"t{i}": make_image([base, make_layer(100, seed=31 + i)]) for i in range(3)}
    for tag, image in images.items():
        registry.pusher.push_image(repo, tag, image)
    mark = registry.mark()

    result = cli("pull", "--all-tags", f"{registry.host}/{repo}")

    assert result.code == 0, result.err
    for tag, image in images.items():
        assert (
            entry_for(env_store(), f"{registry.host}/{repo}:{tag}")["digest"]
            == image.manifest_digest
        )
    gets = blob_gets(registry.requests(mark))
    assert gets.count(base.digest) == 1
    assert len(gets) == len(set(gets))
    assert cli("pull", "-a", f"{registry.host}/{repo}:t1").code == 2


def test_empty_and_large_layers(registry: Any, repo: str, cli: Any, tmp_path: Path) -> None:
    empty = raw_blob(b"")
    large = make_layer(110 * 1024 * 1024, seed=40, compression="none", workdir=tmp_path)
    image = make_image([empty, large])
    registry.pusher.push_image(repo, "big", image)

    result = fastpull.pull(f"{registry.host}/{repo}:big")

    assert result.manifest_digest.hex == image.manifest_digest.split(":")[1]
    assert result.bytes_downloaded == image.config.size + large.size
    assert blob(env_store(), empty.digest).stat().st_size == 0
    stored = blob(env_store(), large.digest)
    assert stored.stat().st_size == large.size
    with stored.open("rb") as fh:
        assert "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest() == large.digest


def test_corrupted_blob_at_the_registry_is_refused_and_not_kept(
    registry: Any, repo: str, docker_config: Any
) -> None:
    layer = make_layer(64_000, seed=50)
    image = make_image([layer])
    registry.pusher.push_image(repo, "bad", image)
    data = registry.blob_data_path(layer.digest)
    data.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))

    with pytest.raises(DigestMismatch, match="refused"):
        fastpull.pull(f"{registry.host}/{repo}:bad")

    store = env_store()
    assert not blob(store, layer.digest).exists()
    assert index_entries(store) == []
    assert list((store / "ingest").glob("*.data")) == []


def test_corrupted_manifest_at_the_registry_is_refused(
    registry: Any, repo: str, docker_config: Any
) -> None:
    image = make_image([make_layer(100, seed=51)])
    registry.pusher.push_image(repo, "bad", image)
    path = registry.blob_data_path(image.manifest_digest)
    path.write_bytes(image.manifest_bytes.replace(b'"schemaVersion":2', b'"schemaVersion": 2'))

    with pytest.raises(ManifestError, match="expected"):
        fastpull.pull(f"{registry.host}/{repo}:bad")
    assert index_entries(env_store()) == []


def test_cli_errors_are_one_line_with_an_exit_code(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    unknown = cli("pull", f"{registry.host}/{repo}:nope")
    assert unknown.code == 4
    assert unknown.err.strip() == (
        f"Error: manifest for {registry.host}/{repo}:nope not found: manifest unknown"
    )

    bad = cli("pull", "Not/A:Valid:Ref")
    assert bad.code == 2
    assert bad.err.startswith("Error: invalid reference format")
    assert len(bad.err.strip().splitlines()) == 1

    a_file = tmp_path / "file"
    a_file.write_text("x")
    not_store = cli("pull", "--store", str(a_file), f"{registry.host}/{repo}:x")
    assert not_store.code == 7
    assert "not a directory" in not_store.err

    refused = cli("pull", "127.0.0.1:1/nothing:here")
    assert refused.code == 5
    assert "cannot reach registry 127.0.0.1:1" in refused.err
    for result in (unknown, bad, not_store, refused):
        assert "Traceback" not in result.err


def test_quiet_json_and_images_output(registry: Any, repo: str, cli: Any) -> None:
    image = make_image([make_layer(1234, seed=60)])
    registry.pusher.push_image(repo, "a", image)
    registry.pusher.push_image(repo, "b", image)
    ref_a, ref_b = f"{registry.host}/{repo}:a", f"{registry.host}/{repo}:b"

    assert cli("pull", "-q", ref_a).out == ref_a + "\n"
    events = [json.loads(line) for line in cli("pull", "--json", ref_b).lines]
    assert events[0]["event"] == "pull-started"
    assert events[-1] == {
        "event": "pull-finished",
        "reference": ref_b,
        "digest": image.manifest_digest,
        "status": "downloaded",
    }

    table = cli("images", f"{registry.host}/{repo}").lines
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    image_id = image.config_digest.split(":")[1][:12]
    rows = [line.split() for line in table[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (f"{registry.host}/{repo}", "a", image_id),
        (f"{registry.host}/{repo}", "b", image_id),
    ]
    assert "years ago" in table[1]
    only_b = cli("images", "--format", "json", ref_b).lines
    assert [json.loads(line)["Tag"] for line in only_b] == ["b"]
    with_digests = cli("images", "--digests", ref_a).lines
    assert image.manifest_digest in with_digests[1]
