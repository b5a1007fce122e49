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


def test_umoci_and_skopeo_address_each_platform_of_a_multi_platform_pull(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    """umoci refuses a name that points at an index ("tag is ambiguous"); each pulled
    platform has a name of its own that it unpacks, and skopeo reads."""
    skopeo = require_tool("skopeo")
    umoci = require_tool("umoci")
    shared = make_layer({"etc/os-release": b"ID=fastpull-test\n"}, seed=220)
    platforms = {"linux/amd64": ("amd64", None), "linux/arm64": ("arm64", None)}
    platforms["linux/arm/v7"] = ("arm", "v7")
    oci = {
        name: make_image(
            [shared, make_layer({"arch.txt": name.encode()}, seed=221 + i)],
            architecture=arch,
            variant=variant,
        )
        for i, (name, (arch, variant)) in enumerate(platforms.items())
    }
    registry.pusher.push_index(repo, "all", make_index(list(oci.values())))
    docker = {
        name: make_image(
            [make_layer({"arch.txt": f"docker {name}".encode()}, seed=231 + i, format="docker")],
            architecture=arch,
            variant=variant,
            format="docker",
        )
        for i, (name, (arch, variant)) in enumerate(platforms.items())
    }
    registry.pusher.push_index(repo, "list", make_index(list(docker.values()), format="docker"))
    all_ref, list_ref = f"{registry.host}/{repo}:all", f"{registry.host}/{repo}:list"
    assert cli("pull", "-q", "--platform", "all", all_ref).code == 0
    assert cli("pull", "-q", "--platform", "linux/arm64,linux/arm/v7", list_ref).code == 0
    store = os.environ["FASTPULL_STORE"]
    suffixes = {"linux/amd64": "linux-amd64", "linux/arm64": "linux-arm64"}
    suffixes["linux/arm/v7"] = "linux-arm-v7"
    wanted = [(all_ref, name, oci[name], name) for name in platforms]
    wanted += [(list_ref, name, docker[name], f"docker {name}") for name in platforms]
    wanted = [w for w in wanted if w[0] == all_ref or w[1] != "linux/amd64"]

    for ref, platform, image, content in wanted:
        name = f"{ref}-{suffixes[platform]}"
        bundle = tmp_path / name.replace("/", "_").replace(":", "_")
        _run(umoci, "unpack", "--rootless", "--image", f"{store}:{name}", str(bundle))
        assert (bundle / "rootfs/arch.txt").read_text() == content
        info = json.loads(_run(skopeo, "inspect", f"oci:{store}:{name}"))
        assert (info["Os"], info["Architecture"]) == ("linux", platforms[platform][0])
        assert info["Layers"][-1] == image.layers[-1].digest
        if image.media_type == "application/vnd.oci.image.manifest.v1+json":
            raw = _run(skopeo, "inspect", "--raw", f"oci:{store}:{name}")
            assert raw.encode() == image.manifest_bytes
    # The plain names still point at the index of the pulled platforms.
    for ref, count in ((all_ref, 3), (list_ref, 2)):
        index = json.loads(_run(skopeo, "inspect", "--raw", f"oci:{store}:{ref}"))
        assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
        assert len(index["manifests"]) == count
    assert not any(f"{list_ref}-linux-amd64" in line for line in cli("images").lines)
