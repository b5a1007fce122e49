"""What fastpull stores is read by real skopeo and umoci, and matches what the registry serves."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.support.images import make_image, make_index, make_layer
from tests.support.tools import require_tool


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{args[0]} failed: {done.stderr}"
    return done.stdout


def test_skopeo_and_umoci_read_pulled_images(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    skopeo = require_tool("skopeo")
    umoci = require_tool("umoci")
    base = make_layer({"etc/os-release": b"ID=fastpull-test\n", "bin/": b""}, seed=200)
    app = make_layer({"app/hello.txt": b"hello from layer two\n"}, seed=201)
    amd = make_image([base, app])
    arm = make_image([base], architecture="arm64")
    registry.pusher.push_index(repo, "multi", make_index([amd, arm]))
    docker_fmt = make_image(
        [make_layer({"srv/data": b"docker format\n"}, seed=202, format="docker")], format="docker"
    )
    registry.pusher.push_image(repo, "docker", docker_fmt)
    refs = {f"{registry.host}/{repo}:multi": amd, f"{registry.host}/{repo}:docker": docker_fmt}
    for ref in refs:
        assert cli("pull", "--platform", "linux/amd64", ref).code == 0
    store = os.environ["FASTPULL_STORE"]

    for ref, image in refs.items():
        raw = json.loads(_run(skopeo, "inspect", "--raw", f"oci:{store}:{ref}"))
        assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        assert raw["config"]["digest"] == image.config_digest
        info = json.loads(_run(skopeo, "inspect", f"oci:{store}:{ref}"))
        assert info["Layers"] == [layer.digest for layer in image.layers]
    # The OCI-format image is stored byte for byte as the registry serves it.
    oci_ref = f"{registry.host}/{repo}:multi"
    raw_oci = _run(skopeo, "inspect", "--raw", f"oci:{store}:{oci_ref}")
    assert raw_oci.encode() == amd.manifest_bytes
    assert json.loads(_run(skopeo, "inspect", f"oci:{store}:{oci_ref}"))["Digest"] == (
        amd.manifest_digest
    )

    bundle = tmp_path / "bundle"
    _run(
        umoci,
        "unpack",
        "--rootless",
        "--image",
        f"{store}:{registry.host}/{repo}:multi",
        str(bundle),
    )
    rootfs = bundle / "rootfs"
    assert (rootfs / "etc/os-release").read_text() == "ID=fastpull-test\n"
    assert (rootfs / "app/hello.txt").read_text() == "hello from layer two\n"

    docker_bundle = tmp_path / "docker-bundle"
    _run(
        umoci,
        "unpack",
        "--rootless",
        "--image",
        f"{store}:{registry.host}/{repo}:docker",
        str(docker_bundle),
    )
    assert (docker_bundle / "rootfs/srv/data").read_text() == "docker format\n"


def test_skopeo_copies_out_of_the_store_back_to_a_registry(
    registry: Any, repo: str, cli: Any
) -> None:
    """A round trip: fastpull → store → skopeo copy → registry serves the identical manifest."""
    skopeo = require_tool("skopeo")
    image = make_image([make_layer(20_000, seed=210)])
    registry.pusher.push_image(repo, "src", image)
    ref = f"{registry.host}/{repo}:src"
    assert cli("pull", ref).code == 0
    store = os.environ["FASTPULL_STORE"]
    _run(
        skopeo,
        "copy",
        "--dest-tls-verify=false",
        f"oci:{store}:{ref}",
        f"docker://{registry.host}/{repo}:copied",
    )
    tags = registry.pusher.list_tags(repo)
    assert "copied" in tags
    assert cli("pull", f"{registry.host}/{repo}:copied").code == 0
    out = cli("images", "--format", "json", f"{registry.host}/{repo}:copied").lines
    assert json.loads(out[0])["Digest"] == image.manifest_digest
