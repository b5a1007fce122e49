"""Store maintenance against the real registry: ``rmi``, ``gc``, ``verify [--repair]``, ``df``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastpull.cli.progress import human_size
from fastpull.registry.transport import RetryPolicy
from fastpull.store.layout import Store
from fastpull.types import Descriptor, Digest
from tests.integration.conftest import blob, entry_for, index_entries
from tests.support.images import Image, make_image, make_index, make_layer, sha256_digest
from tests.support.tools import require_tool

# Holds an ingest (a download in progress) or the store's pull lock in another process until
# stdin closes. Prints "ready" once it holds it.
_HOLDER = """
import os
import sys

from fastpull.store.layout import Store
from fastpull.types import Digest

store = Store.open(sys.argv[2])
if sys.argv[1] == "ingest":
    digest = Digest.parse(sys.argv[3])
    with store.ingest(digest, 1000) as ingest:
        os.pwrite(ingest.fd, b"x" * 600, 0)
        print("ready", flush=True)
        sys.stdin.read()
else:
    with store.shared_use():
        # As a pull does: a blob lands before index.json names it.
        body = sys.argv[3].encode()
        store.write_blob(Digest.parse(sys.argv[4]), body)
        print("ready", flush=True)
        sys.stdin.read()
"""


@dataclass
class Holder:
    """A process holding a lock in the store; ``release`` lets it finish."""

    process: subprocess.Popen[str]

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0


@pytest.fixture
def hold() -> Iterator[Any]:
    started: list[Holder] = []

    def start(*args: str) -> Holder:
        process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        holder = Holder(process)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        if holder.process.poll() is None:
            holder.process.kill()
            holder.process.wait()


@pytest.fixture
def store() -> Path:
    return Path(os.environ["FASTPULL_STORE"])


def _skopeo_inspect(store: Path, ref: str) -> subprocess.CompletedProcess[str]:
    skopeo = require_tool("skopeo")
    return subprocess.run(
        [skopeo, "inspect", f"oci:{store}:{ref}"], capture_output=True, text=True, timeout=120
    )


def _blob_files(store: Path) -> set[str]:
    return {f"{p.parent.name}:{p.name}" for p in (store / "blobs").rglob("*") if p.is_file()}


def _one_error(result: Any) -> str:
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    return lines[0]


def _shared_pair(registry: Any, repo: str) -> tuple[str, Image, str, Image]:
    """An OCI image and a Docker-format image sharing their base layer, pushed and pulled."""
    base = make_layer({"etc/os-release": b"ID=shared\n"}, seed=300)
    oci = make_image([base, make_layer(40_000, seed=301)])
    docker = make_image(
        [base, make_layer(30_000, seed=302, format="docker")],
        format="docker",
        created="2024-02-02T00:00:00Z",
    )
    registry.pusher.push_image(repo, "oci", oci)
    registry.pusher.push_image(repo, "docker", docker)
    return f"{registry.host}/{repo}:oci", oci, f"{registry.host}/{repo}:docker", docker


def _names(store: Path) -> list[str]:
    return [e["annotations"]["org.opencontainers.image.ref.name"] for e in index_entries(store)]


def _pull(cli: Any, *refs: str) -> None:
    for ref in refs:
        result = cli("pull", "-q", ref)
        assert result.code == 0, result.err


# -- rmi ---------------------------------------------------------------------------------------


def test_rmi_deletes_what_only_it_used_and_keeps_shared_blobs(
    registry: Any, repo: str, cli: Any, store: Path
) -> None:
    oci_ref, oci, docker_ref, docker = _shared_pair(registry, repo)
    _pull(cli, oci_ref, docker_ref)
    docker_entry = entry_for(store, docker_ref)
    base = oci.layers[0].digest

    result = cli("rmi", oci_ref)

    assert result.code == 0, result.err
    assert result.lines == [
        f"Untagged: {oci_ref}",
        f"Untagged: {registry.host}/{repo}@{oci.manifest_digest}",
        f"Deleted: {oci.config_digest}",
        f"Deleted: {oci.layers[1].digest}",
        f"Deleted: {oci.manifest_digest}",
    ]
    for gone in (oci.config_digest, oci.layers[1].digest, oci.manifest_digest):
        assert not blob(store, gone).exists()
    assert blob(store, base).read_bytes() == oci.layers[0].data
    assert [
        e["annotations"]["org.opencontainers.image.ref.name"] for e in index_entries(store)
    ] == [docker_ref]
    inspected = _skopeo_inspect(store, docker_ref)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Layers"] == [layer.digest for layer in docker.layers]
    assert _skopeo_inspect(store, oci_ref).returncode != 0

    # The Docker-format image takes its converted manifest and the registry's original along.
    result = cli("rmi", docker_ref)

    assert result.code == 0, result.err
    assert result.lines[2:] == [
        f"Deleted: {docker.config_digest}",
        f"Deleted: {base}",
        f"Deleted: {docker.layers[1].digest}",
        f"Deleted: {docker_entry['digest']}",
        f"Deleted: {docker.manifest_digest}",
    ]
    assert _blob_files(store) == set()
    assert index_entries(store) == []


def test_rmi_follows_docker_names_and_digests(
    registry: Any, repo: str, cli: Any, store: Path
) -> None:
    oci_ref, oci, docker_ref, _docker = _shared_pair(registry, repo)
    _pull(cli, oci_ref, docker_ref)
    entry = entry_for(store, oci_ref)
    # An image named as a Docker Hub pull would name it.
    Store.open(store).add_image(Descriptor.from_json(entry), "docker.io/library/debian:latest")

    by_short_name = cli("rmi", "--no-prune", "debian")
    by_digest = cli("rmi", "--no-prune", f"{registry.host}/{repo}@{oci.manifest_digest}")

    assert by_short_name.code == 0, by_short_name.err
    assert by_short_name.lines == [
        "Untagged: debian:latest",
        f"Untagged: debian@{oci.manifest_digest}",
    ]
    assert by_digest.code == 0, by_digest.err
    assert by_digest.lines == [
        f"Untagged: {oci_ref}",
        f"Untagged: {registry.host}/{repo}@{oci.manifest_digest}",
    ]
    # --no-prune kept every blob; gc then finds the image's own ones unreferenced.
    assert blob(store, oci.layers[1].digest).read_bytes() == oci.layers[1].data
    collected = cli("gc")
    assert collected.code == 0, collected.err
    own = [oci.config_digest, oci.layers[1].digest, oci.manifest_digest]
    sizes = {oci.config_digest: len(oci.config_bytes), oci.layers[1].digest: oci.layers[1].size}
    sizes[oci.manifest_digest] = len(oci.manifest_bytes)
    assert sorted(collected.lines[:-1]) == sorted(
        f"Deleted blob {d} ({human_size(sizes[d])})" for d in own
    )
    assert collected.lines[-1] == f"Total reclaimed space: {human_size(sum(sizes.values()))}"
    assert [
        e["annotations"]["org.opencontainers.image.ref.name"] for e in index_entries(store)
    ] == [docker_ref]


def test_rmi_of_an_unknown_image(registry: Any, repo: str, cli: Any, store: Path) -> None:
    image = make_image([make_layer(5_000, seed=310)])
    registry.pusher.push_image(repo, "1", image)
    ref = f"{registry.host}/{repo}:1"
    _pull(cli, ref)

    alone = cli("rmi", "nothing")
    mixed = cli("rmi", f"{registry.host}/{repo}:2", ref)

    assert alone.code == 4
    assert _one_error(alone) == "Error: No such image: nothing:latest"
    assert alone.out == ""
    # Like docker, the images that exist are removed all the same.
    assert mixed.code == 4
    assert _one_error(mixed) == f"Error: No such image: {registry.host}/{repo}:2"
    assert mixed.lines[0] == f"Untagged: {ref}"
    assert index_entries(store) == []


def test_the_names_of_platforms_go_with_their_image(
    registry: Any, repo: str, cli: Any, store: Path
) -> None:
    base = make_layer({"etc/os-release": b"ID=multi\n"}, seed=320)
    amd = make_image([base, make_layer(20_000, seed=321)])
    arm = make_image([base, make_layer(25_000, seed=322)], architecture="arm64")
    index = make_index([amd, arm])
    registry.pusher.push_index(repo, "1", index)
    ref = f"{registry.host}/{repo}:1"
    names = [ref, f"{ref}-linux-amd64", f"{ref}-linux-arm64"]
    result = cli("pull", "-q", "--platform", "all", ref)
    assert result.code == 0, result.err
    assert _names(store) == names
    images = cli("images", ref).lines
    assert [line.split()[:2] for line in images[1:]] == [
        [f"{registry.host}/{repo}", tag] for tag in ("1", "1-linux-amd64", "1-linux-arm64")
    ]
    listed = cli("images", "--format", "json", f"{registry.host}/{repo}").lines
    assert sorted(json.loads(line)["Tag"] for line in listed) == [
        "1",
        "1-linux-amd64",
        "1-linux-arm64",
    ]
    # Everything is needed: gc finds nothing, verify and df count one image.
    assert cli("gc", "--dry-run").lines == ["Would reclaim: 0B"]
    blobs = 1 + 2 * 2 + 3  # index; two manifests and configs; three layers
    assert cli("verify").lines[-1].startswith(f"Verified 1 image and {blobs} blobs (")
    assert json.loads(cli("df", "--format", "json").out)["Images"] == 1
    assert json.loads(cli("df", "--format", "json").out)["SharedBlobs"] == 0

    # Repair pulls the image again with the platforms it had, names included.
    _flip_a_byte(blob(store, arm.layers[1].digest))
    found = cli("verify")
    assert found.code == 7
    assert found.lines[0].endswith(f"(layer of {ref})")
    repaired = cli("verify", "--repair")
    assert repaired.code == 0, repaired.err
    assert blob(store, arm.layers[1].digest).read_bytes() == arm.layers[1].data
    assert _names(store) == names
    assert entry_for(store, ref)["digest"] == index.manifest_digest

    # One platform's name alone goes, its blobs stay: the image still needs them.
    alone = cli("rmi", f"{ref}-linux-arm64")
    assert alone.code == 0, alone.err
    assert alone.lines == [f"Untagged: {ref}-linux-arm64"]
    assert blob(store, arm.layers[1].digest).exists()

    result = cli("rmi", ref)

    assert result.code == 0, result.err
    assert result.lines[:3] == [
        f"Untagged: {ref}",
        f"Untagged: {ref}-linux-amd64",
        f"Untagged: {registry.host}/{repo}@{index.manifest_digest}",
    ]
    assert index_entries(store) == []
    assert _blob_files(store) == set()


# -- gc ----------------------------------------------------------------------------------------


def _stale_ingest(store: Path, data: bytes) -> tuple[str, int]:
    """Debris of a crashed download: data, journal and an unlocked lock file."""
    name = "sha256-" + sha256_digest(data).split(":")[1]
    (store / "ingest" / f"{name}.data").write_bytes(data)
    (store / "ingest" / f"{name}.journal").write_bytes(b"{}")
    (store / "ingest" / f"{name}.lock").touch()
    return name, len(data) + 2


def test_gc_deletes_unreferenced_blobs_and_stale_downloads_only(
    registry: Any, repo: str, cli: Any, store: Path, hold: Any
) -> None:
    image = make_image([make_layer(20_000, seed=320)])
    registry.pusher.push_image(repo, "1", image)
    ref = f"{registry.host}/{repo}:1"
    _pull(cli, ref)
    kept = _blob_files(store)
    junk = os.urandom(3000)
    Store.open(store).write_blob(Digest.parse(sha256_digest(junk)), junk)
    stale, stale_size = _stale_ingest(store, os.urandom(5000))
    running = sha256_digest(b"a download in progress")
    holder = hold("ingest", str(store), running)
    running_name = running.replace(":", "-")
    # What an index.json writer killed before its rename leaves.
    torn = store / ".index.json.0123456789abcdef.tmp"
    torn.write_bytes(b'{"schemaVersion": 2, "manif')

    dry = cli("gc", "--dry-run")

    assert dry.code == 0, dry.err
    assert dry.lines == [
        f"Would delete blob {sha256_digest(junk)} ({human_size(3000)})",
        f"Would delete partial download of {stale.replace('-', ':')} ({human_size(stale_size)})",
        f"Would delete temp file {torn.name} ({human_size(27)})",
        f"Kept partial download of {running}: in progress",
        f"Would reclaim: {human_size(3000 + stale_size + 27)}",
    ]
    assert torn.exists()
    assert blob(store, sha256_digest(junk)).exists()
    assert (store / "ingest" / f"{stale}.data").exists()

    done = cli("gc")

    assert done.code == 0, done.err
    assert done.lines == [line.replace("Would delete", "Deleted") for line in dry.lines[:-1]] + [
        f"Total reclaimed space: {human_size(3000 + stale_size + 27)}"
    ]
    assert not torn.exists()
    assert _blob_files(store) == kept
    assert sorted(p.name for p in (store / "ingest").iterdir()) == [
        f"{running_name}.data",
        f"{running_name}.journal",
        f"{running_name}.lock",
    ]
    assert _skopeo_inspect(store, ref).returncode == 0
    holder.release()
    assert cli("gc").lines == ["Total reclaimed space: 0B"]
    assert list((store / "ingest").iterdir()) == []


def test_gc_waits_for_a_pull_that_has_not_named_its_blobs_yet(
    cli: Any, store: Path, hold: Any
) -> None:
    Store.open(store)
    body = '{"just":"committed"}'
    digest = sha256_digest(body.encode())
    holder = hold("pull", str(store), body, digest)

    impatient = cli("gc", "--timeout", "0.2")

    assert impatient.code == 7
    assert impatient.err.splitlines() == [
        f"Waiting for other fastpull processes using {store} to finish (at most 0.2 s)...",
        f"Error: store {store} is still in use by another fastpull process (a pull or verify) "
        "after 0.2 s; try again when it has finished",
    ]
    assert blob(store, digest).exists()
    # A patient gc waits for the pull, then finds the blob unreferenced (this "pull" never
    # named it) and deletes it.
    patient = subprocess.Popen(
        [sys.executable, "-m", "fastpull", "gc", "--store", str(store), "--timeout", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert patient.stderr is not None
    assert patient.stderr.readline().startswith("Waiting for other fastpull processes")
    assert blob(store, digest).exists()
    holder.release()
    out, err = patient.communicate(timeout=120)
    assert patient.returncode == 0, err
    assert out.splitlines()[0] == f"Deleted blob {digest} ({human_size(len(body))})"
    assert not blob(store, digest).exists()


def test_gc_refuses_when_an_image_cannot_be_walked(
    registry: Any, repo: str, cli: Any, store: Path
) -> None:
    image = make_image([make_layer(8_000, seed=330)])
    registry.pusher.push_image(repo, "1", image)
    ref = f"{registry.host}/{repo}:1"
    _pull(cli, ref)
    blob(store, image.manifest_digest).unlink()
    before = _blob_files(store)

    result = cli("gc")

    assert result.code == 7
    assert _one_error(result) == (
        f"Error: cannot tell which blobs {ref} uses: its manifest {image.manifest_digest} is "
        "missing or damaged; nothing was deleted. Run 'fastpull verify --repair', or remove "
        "the image with 'fastpull rmi'"
    )
    assert _blob_files(store) == before


# -- verify ------------------------------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_finds_and_repair_restores_a_corrupt_layer_and_a_missing_blob(
    registry: Any, repo: str, cli: Any, store: Path
) -> None:
    base = make_layer(50_000, seed=340)
    amd = make_image([base, make_layer(60_000, seed=341)])
    arm = make_image([base], architecture="arm64")
    registry.pusher.push_index(repo, "multi", make_index([amd, arm]))
    docker = make_image([make_layer(30_000, seed=342, format="docker")], format="docker")
    registry.pusher.push_image(repo, "docker", docker)
    multi_ref, docker_ref = f"{registry.host}/{repo}:multi", f"{registry.host}/{repo}:docker"
    assert cli("pull", "-q", "--platform", "linux/amd64", multi_ref).code == 0
    _pull(cli, docker_ref)
    assert cli("verify").lines[-1].startswith("Verified 2 images and 8 blobs (")
    corrupt, missing = amd.layers[1], docker.config
    _flip_a_byte(blob(store, corrupt.digest))
    blob(store, missing.digest).unlink()

    found = cli("verify")

    assert found.code == 7
    actual = sha256_digest(blob(store, corrupt.digest).read_bytes())
    assert found.lines == [
        f"corrupt blob {corrupt.digest}: its content is {actual} (layer of {multi_ref})",
        f"missing blob {missing.digest} (config of {docker_ref}, {missing.size} bytes)",
    ]
    assert _one_error(found) == (
        f"Error: store {store} has 2 problems; 'fastpull verify --repair' deletes corrupt "
        "blobs and pulls damaged images again"
    )

    repaired = cli("verify", "--repair")

    assert repaired.code == 0, repaired.err
    assert f"Deleted corrupt blob {corrupt.digest}" in repaired.lines
    assert repaired.lines[-2:] == [f"Restored {multi_ref}", f"Restored {docker_ref}"]
    assert blob(store, corrupt.digest).read_bytes() == corrupt.data
    assert blob(store, missing.digest).read_bytes() == docker.config_bytes
    # Restored under their own names, pinned to what they were.
    multi = entry_for(store, multi_ref)
    assert multi["digest"] == amd.manifest_digest
    assert multi["annotations"]["io.fastpull.repo-digest"].startswith("sha256:")
    assert len(index_entries(store)) == 2
    assert cli("verify").lines[-1].startswith("Verified 2 images and 8 blobs (")


def test_repair_reports_what_it_cannot_restore(
    registry: Any, repo: str, cli: Any, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RetryPolicy, "delay", lambda self, attempt, retry_after=None: 0.0)
    image = make_image([make_layer(10_000, seed=350)])
    elsewhere = make_image([make_layer(12_000, seed=351)])
    registry.pusher.push_image(repo, "1", image)
    registry.pusher.push_image(repo, "2", elsewhere)
    ref, other = f"{registry.host}/{repo}:1", f"{registry.host}/{repo}:2"
    _pull(cli, ref, other)
    # The second image, as if pulled from a registry that is gone now.
    gone = f"127.0.0.1:1/{repo}:2"
    the_store = Store.open(store)
    the_store.add_image(Descriptor.from_json(entry_for(store, other)), gone)
    the_store.remove_image(other)
    blob(store, image.layers[0].digest).unlink()
    blob(store, elsewhere.layers[0].digest).unlink()
    unreferenced_junk = b"not what its name says"
    junk_path = blob(store, sha256_digest(b"the right content"))
    junk_path.write_bytes(unreferenced_junk)

    result = cli("verify", "--repair")

    assert result.code == 7
    assert f"Deleted corrupt blob {sha256_digest(b'the right content')}" in result.lines
    assert not junk_path.exists()
    assert f"Restored {ref}" in result.lines
    assert result.lines[-1] == (
        f"cannot restore {gone}: pulling 127.0.0.1:1/{repo}@{elsewhere.manifest_digest} failed: "
        "cannot reach registry 127.0.0.1:1: connection refused"
    )
    assert _one_error(result) == (
        f"Error: 1 of 2 damaged images in store {store} could not be restored"
    )
    assert blob(store, image.layers[0].digest).read_bytes() == image.layers[0].data


# -- df ----------------------------------------------------------------------------------------


def test_df_adds_up_the_store(registry: Any, repo: str, cli: Any, store: Path, hold: Any) -> None:
    oci_ref, oci, docker_ref, docker = _shared_pair(registry, repo)
    _pull(cli, oci_ref, docker_ref)
    junk = os.urandom(2500)
    Store.open(store).write_blob(Digest.parse(sha256_digest(junk)), junk)
    _stale, stale_size = _stale_ingest(store, os.urandom(4000))
    in_progress = sha256_digest(b"in progress")
    hold("ingest", str(store), in_progress)
    # Its 600 bytes of data and the header of its resume journal.
    live = sum(
        p.stat().st_size for p in (store / "ingest").glob(in_progress.replace(":", "-") + ".*")
    )
    assert live > 600
    converted = entry_for(store, docker_ref)
    # Computed from what was pushed: each image's manifest(s), config and layers.
    oci_blobs = {d: len(b) for d, b in oci.blobs.items()} | {
        oci.manifest_digest: len(oci.manifest_bytes)
    }
    docker_blobs = {d: len(b) for d, b in docker.blobs.items()} | {
        docker.manifest_digest: len(docker.manifest_bytes),
        converted["digest"]: converted["size"],
    }
    image_bytes = sum((oci_blobs | docker_blobs).values())
    shared = oci.layers[0]

    result = cli("df", "--format", "json")

    assert result.code == 0, result.err
    assert json.loads(result.out) == {
        "Images": 2,
        "Blobs": len(oci_blobs | docker_blobs) + 1,
        "TotalBytes": image_bytes + 2500 + stale_size + live,
        "BlobBytes": image_bytes + 2500,
        "ImageBytes": image_bytes,
        "SharedBlobs": 1,
        "SharedBytes": shared.size,
        "UnreferencedBlobs": 1,
        "UnreferencedBytes": 2500,
        "Ingests": 2,
        "IngestBytes": stale_size + live,
        "StaleIngests": 1,
        "StaleIngestBytes": stale_size,
        "ReclaimableBytes": 2500 + stale_size,
    }
    table = cli("df").lines
    assert table[0].split() == ["TYPE", "TOTAL", "SIZE", "SHARED", "RECLAIMABLE"]
    assert table[1].split() == [
        "Images",
        "2",
        human_size(image_bytes),
        human_size(shared.size),
        "-",
    ]
    reclaim = 2500 + stale_size
    total = image_bytes + 2500 + stale_size + live
    assert table[4].split() == [
        "Total",
        human_size(total),
        human_size(shared.size),
        human_size(reclaim),
        f"({reclaim * 100 // total}%)",
    ]


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["verify"], ["gc"], ["df"], ["rmi", "busybox"]], ids=lambda c: c[0]
)
def test_commands_refuse_what_is_not_a_store(cli: Any, tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nowhere"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")

    absent = cli(*command, "--store", str(missing))
    other = cli(*command, "--store", str(foreign))

    assert absent.code == 7
    assert _one_error(absent) == f"Error: store {missing} does not exist"
    assert other.code == 7
    assert _one_error(other) == (
        f"Error: {foreign} is not an OCI image layout: it has no oci-layout file and is not empty"
    )
    assert not missing.exists()
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_rmi_needs_a_valid_reference(cli: Any, store: Path) -> None:
    Store.open(store)

    result = cli("rmi", "Not/Valid")

    assert result.code == 2
    assert _one_error(result) == (
        "Error: invalid reference format: repository name must be lowercase: 'Valid'"
    )
