"""What ``fastpull save`` writes is read by the real consumers (skopeo, podman, containerd's
ctr), and what they write is read by ``fastpull load``."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import entry_for, env_store
from tests.support.images import Image, make_image, make_index, make_layer
from tests.support.registry import terminate
from tests.support.tools import require_tool


def _run(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed: {done.stderr}"
    return done.stdout


@pytest.fixture
def images(registry: Any, repo: str, cli: Any) -> dict[str, Image]:
    """Pulled into the store: an OCI image, a Docker-format one sharing its base layer, and
    the amd64 image of a two-platform index (pulled with every platform)."""
    base = make_layer({"etc/os-release": b"ID=consumers\n", "bin/": b""}, seed=500)
    oci = make_image([base, make_layer({"app/oci.txt": b"oci\n"}, seed=501)])
    docker = make_image(
        [make_layer({"app/docker.txt": b"docker\n"}, seed=502, format="docker")], format="docker"
    )
    amd = make_image([base, make_layer({"app/amd.txt": b"amd\n"}, seed=503)])
    arm = make_image([make_layer({"app/arm.txt": b"arm\n"}, seed=504)], architecture="arm64")
    registry.pusher.push_image(repo, "oci", oci)
    registry.pusher.push_image(repo, "docker", docker)
    registry.pusher.push_index(repo, "multi", make_index([amd, arm]))
    found = {
        f"{registry.host}/{repo}:oci": oci,
        f"{registry.host}/{repo}:docker": docker,
        f"{registry.host}/{repo}:multi": amd,
    }
    for ref in found:
        extra = ["--platform", "all"] if ref.endswith(":multi") else []
        assert cli("pull", *extra, ref).code == 0
    return found


def _save(cli: Any, path: Path, *refs: str) -> Path:
    result = cli("save", "-o", str(path), *refs)
    assert result.code == 0, result.err
    return path


def _stored_manifest(ref: str) -> str:
    entry = entry_for(env_store(), ref)
    if entry["mediaType"].endswith("index.v1+json"):
        index = json.loads((env_store() / "blobs/sha256" / entry["digest"][7:]).read_bytes())
        amd = [m for m in index["manifests"] if m["platform"]["architecture"] == "amd64"]
        return str(amd[0]["digest"])
    return str(entry["digest"])


def test_skopeo_reads_every_saved_archive(
    images: dict[str, Image], cli: Any, tmp_path: Path
) -> None:
    skopeo = require_tool("skopeo")
    for i, (ref, image) in enumerate(images.items()):
        archive = _save(cli, tmp_path / f"one-{i}.tar", ref)
        docker = json.loads(_run(skopeo, "inspect", "--raw", f"docker-archive:{archive}"))
        assert docker["config"]["digest"] == image.config_digest
        assert [la["digest"] for la in docker["layers"]] == [la.diff_id for la in image.layers]
        oci = _run(skopeo, "inspect", "--raw", f"oci-archive:{archive}")
        stored = env_store() / "blobs/sha256" / _stored_manifest(ref)[7:]
        assert oci.encode() == stored.read_bytes()
    both = _save(cli, tmp_path / "all.tar", *images)
    for ref, image in images.items():
        by_tag = json.loads(_run(skopeo, "inspect", f"docker-archive:{both}:{ref}"))
        assert by_tag["Layers"] == [la.diff_id for la in image.layers]
        by_name = json.loads(_run(skopeo, "inspect", "--raw", f"oci-archive:{both}:{ref}"))
        assert by_name["config"]["digest"] == image.config_digest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temporary directory with a short path: podman refuses a runroot over 50
    characters, and unix socket names are limited to 108 bytes."""
    home = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _podman(root: Path) -> list[str]:
    podman = require_tool("podman")
    return [
        podman,
        "--root",
        str(root / "root"),
        "--runroot",
        str(root / "run"),
        "--storage-driver",
        "vfs",
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "file",
    ]


def test_podman_loads_saved_archives(
    images: dict[str, Image], cli: Any, tmp_path: Path, short_dir: Path
) -> None:
    podman = _podman(short_dir)
    ref = next(iter(images))
    one = _save(cli, tmp_path / "one.tar", ref)
    _run(*podman, "load", "-i", str(one))
    (info,) = json.loads(_run(*podman, "image", "inspect", ref))
    assert info["Id"] == images[ref].config_digest[7:]
    # A single-image archive is read through index.json: the registry's manifest digest.
    assert info["Digest"] == _stored_manifest(ref)

    both = _save(cli, tmp_path / "all.tar", *images)
    loaded = _run(*podman, "load", "-i", str(both))
    for ref, image in images.items():
        assert ref in loaded
        (info,) = json.loads(_run(*podman, "image", "inspect", ref))
        assert info["Id"] == image.config_digest[7:]

    # And back: what podman saves, fastpull loads, and it verifies.
    back = tmp_path / "podman.tar"
    _run(*podman, "save", "-o", str(back), ref)
    target = tmp_path / "from-podman"
    result = cli("load", "-i", str(back), "--store", str(target))
    assert result.code == 0, result.err
    assert cli("verify", "--store", str(target)).code == 0
    (row,) = [
        json.loads(line) for line in cli("images", "--format", "json", "--store", str(target)).lines
    ]
    assert row["ID"] == images[ref].config_digest[7:19]


@contextlib.contextmanager
def _containerd(home: Path) -> Iterator[str]:
    """containerd on a private socket, its root and state in a temporary directory; only
    the plugins an import needs (no CRI, no runtime), the native snapshotter."""
    binary = require_tool("containerd")
    ctr = require_tool("ctr")
    socket = home / "containerd.sock"
    disabled = [
        "io.containerd.grpc.v1.cri",
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.snapshotter.v1.overlayfs",
        "io.containerd.runtime.v1.linux",
        "io.containerd.runtime.v2.task",
        "io.containerd.tracing.processor.v1.otlp",
    ]
    config = home / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{home / "root"}"\n'
        f'state = "{home / "state"}"\n'
        f"disabled_plugins = {json.dumps(disabled)}\n"
        f'[grpc]\n  address = "{socket}"\n'
        f'[ttrpc]\n  address = "{socket}.ttrpc"\n'
        '[debug]\n  address = ""\n'
        '[metrics]\n  address = ""\n'
    )
    log = (home / "containerd.log").open("wb")
    process = subprocess.Popen(
        [binary, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([ctr, "-a", str(socket), "version"], capture_output=True).returncode:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"containerd did not start: {(home / 'containerd.log').read_text()}")
            time.sleep(0.2)
        yield str(socket)
    finally:
        terminate(process)
        log.close()


def test_containerd_imports_saved_archives(
    images: dict[str, Image], cli: Any, tmp_path: Path, short_dir: Path
) -> None:
    ctr = require_tool("ctr")
    archive = _save(cli, tmp_path / "all.tar", *images)
    with _containerd(short_dir) as socket:
        _run(ctr, "-a", socket, "images", "import", "--snapshotter", "native", str(archive))
        listed = _run(ctr, "-a", socket, "images", "ls")
        rows = {line.split()[0]: line.split()[2] for line in listed.splitlines()[1:]}
        for ref in images:
            assert rows[ref] == _stored_manifest(ref)
        # With every platform, the image is the stored index itself.
        multi = next(ref for ref in images if ref.endswith(":multi"))
        everything = tmp_path / "multi.tar"
        assert cli("save", "--platform", "all", "-o", str(everything), multi).code == 0
        _run(ctr, "-a", socket, "images", "rm", multi)
        _run(ctr, "-a", socket, "images", "import", "--snapshotter", "native", str(everything))
        listed = _run(ctr, "-a", socket, "images", "ls")
        rows = {line.split()[0]: line.split()[2] for line in listed.splitlines()[1:]}
        assert rows[multi] == entry_for(env_store(), multi)["digest"]


def test_skopeo_docker_archives_load(images: dict[str, Image], cli: Any, tmp_path: Path) -> None:
    skopeo = require_tool("skopeo")
    for i, (ref, image) in enumerate(images.items()):
        archive = tmp_path / f"skopeo-{i}.tar"
        # The multi-platform entry is an index; skopeo takes this machine's platform from it.
        source = f"oci:{env_store()}:{ref}"
        _run(skopeo, "copy", source, f"docker-archive:{archive}:{ref}")
        target = tmp_path / f"loaded-{i}"
        result = cli("load", "-i", str(archive), "--store", str(target))
        assert result.code == 0, result.err
        assert result.lines == [f"Loaded image: {ref}"]
        assert cli("verify", "--store", str(target)).code == 0
        stored = json.loads(_run(skopeo, "inspect", f"oci:{target}:{ref}"))
        # Layers as skopeo wrote them (uncompressed): their digests are the DiffIDs.
        assert stored["Layers"] == [la.diff_id for la in image.layers]
        raw = json.loads(_run(skopeo, "inspect", "--raw", f"oci:{target}:{ref}"))
        assert raw["config"]["digest"] == image.config_digest
