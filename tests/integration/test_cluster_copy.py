"""``copy -f FILE --to REGISTRY --cluster ADDRESS`` on a real Dask cluster: ``dask scheduler``
and ``dask worker`` processes on loopback, a real source registry and a second real registry
as the destination, and no filesystem shared with the workers beyond their own scratch."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _serve
from tests.integration.conftest import one_line, start_fastpull
from tests.integration.test_cluster import (
    _RUN_TIMEOUT,
    _blob_bytes,
    _cluster,
    _env,
    _fastpull,
    _odd_cluster,
    _wait_until,
    assert_names_the_odd_worker,
)
from tests.integration.test_mirror import _mounts, _put_digests, _raw_manifest, _uploads
from tests.support.daskcluster import DaskCluster
from tests.support.faultproxy import FaultProxy, Rule, Trickle, blob_path
from tests.support.images import Image, MiB, make_image, make_index, make_layer
from tests.support.netutil import free_loopback_port
from tests.support.registry import RegistryServer


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[DaskCluster]:
    with _cluster(2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def dest_registry() -> Iterator[RegistryServer]:
    """A second plain-HTTP registry without auth: where the batches are copied to."""
    yield from _serve()


def _family(registry: Any, repo: str, count: int, seed: int) -> dict[str, Image]:
    """``count`` images sharing one base layer, each with a layer of its own, by reference."""
    base = make_layer(3 * MiB, seed=seed)
    pushed = {}
    for number in range(count):
        image = make_image([base, make_layer(MiB + number * 4096, seed=seed + 1 + number)])
        registry.pusher.push_image(f"{repo}/app{number}", "1", image)
        pushed[f"{registry.host}/{repo}/app{number}:1"] = image
    return pushed


def _unique_sizes(images: Any) -> dict[str, int]:
    return {b.digest: b.size for image in images for b in image.referenced_blobs()}


def _relay_dirs(cluster: DaskCluster) -> list[Path]:
    """Scratch stores of relay tasks left in the workers' local directories."""
    return sorted(cluster.local_directory.rglob("fastpull-relay-*"))


def test_a_batch_copy_moves_each_blob_once_and_a_second_run_uploads_nothing(
    registry: Any,
    dest_registry: RegistryServer,
    repo: str,
    dask_cluster: DaskCluster,
    tmp_path: Path,
) -> None:
    family = _family(registry, repo, 4, seed=710)
    # A multi-platform image too: its index and both platform manifests go byte for byte.
    platforms = [
        make_image([make_layer(200_000, seed=720 + n)], architecture=arch)
        for n, arch in enumerate(("amd64", "arm64"))
    ]
    index = make_index(platforms)
    registry.pusher.push_index(f"{repo}/multi", "1", index)
    sizes = _unique_sizes([*family.values(), *platforms])
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(family) + f"\n{registry.host}/{repo}/multi:1\n")
    report = tmp_path / "report.json"
    to = f"{dest_registry.host}/mirror"
    args = ["copy", "-f", str(listing), "--to", to, "--platform", "all"]
    source_mark, dest_mark = registry.mark(), dest_registry.mark()

    done = _fastpull(
        *args, "--cluster", dask_cluster.address, "--report", str(report),
        # Scratch for one blob per task: each blob is a task, and both workers get some.
        env=_env(FASTPULL_CLUSTER_SCRATCH_BYTES="1"),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert any(line.startswith("IMAGE") for line in done.stdout.splitlines())
    # Every blob's bytes left the source once, across the whole cluster.
    assert dict(_blob_bytes(registry.requests(source_mark))) == sizes
    logged = dest_registry.requests(dest_mark)
    # Each blob was uploaded once to the destination registry; the shared base layer was
    # mounted into the three other repositories.
    assert sorted(_put_digests(logged)) == sorted(sizes)
    base = next(iter(family.values())).layers[0].digest
    assert len([r for r in _mounts(logged) if base in r.path]) == 3
    document = json.loads(report.read_text())
    assert [i["status"] for i in document["images"]] == ["copied"] * 5
    assert document["summary"]["bytes_uploaded"] == sum(sizes.values())
    assert document["summary"]["blobs_mounted"] == 3
    moved = {b["digest"]: b["worker"] for b in document["blobs"]}
    assert set(moved) == set(sizes)
    assert set(moved.values()) == {"w1", "w2"}
    for ref, image in family.items():
        name = ref.split("/", 1)[1].rsplit(":", 1)[0]
        assert _raw_manifest(dest_registry, f"mirror/{name}", "1") == image.manifest_bytes
    assert _raw_manifest(dest_registry, f"mirror/{repo}/multi", "1") == index.manifest_bytes
    for image in platforms:
        pinned = _raw_manifest(dest_registry, f"mirror/{repo}/multi", image.manifest_digest)
        assert pinned == image.manifest_bytes
    # Nothing of the copy is left on the workers.
    assert _relay_dirs(dask_cluster) == []

    source_mark, dest_mark = registry.mark(), dest_registry.mark()
    again = _fastpull(
        *args, "--report", str(report), "--json", env=_env(FASTPULL_CLUSTER=dask_cluster.address)
    )

    assert again.returncode == 0, again.stderr
    records = [json.loads(line) for line in again.stdout.splitlines()]
    # Every image is complete before anything is planned; the plan is still told first.
    assert records[0] == {"event": "batch-planned", "images": 5, "blobs": 0, "bytes": 0}
    assert not _blob_bytes(registry.requests(source_mark))
    logged = dest_registry.requests(dest_mark)
    assert [r for r in logged if "/blobs/uploads/" in r.path] == []
    document = json.loads(report.read_text())
    assert document["summary"]["bytes_uploaded"] == 0
    assert document["blobs"] == []


@pytest.fixture(scope="module")
def other_registry() -> Iterator[RegistryServer]:
    """A third registry: a second destination of one batch."""
    yield from _serve()


def test_a_batch_to_several_registries_uploads_once_per_registry(
    registry: Any,
    dest_registry: RegistryServer,
    other_registry: RegistryServer,
    repo: str,
    dask_cluster: DaskCluster,
    tmp_path: Path,
) -> None:
    family = _family(registry, repo, 4, seed=780)
    refs = list(family)
    listing = tmp_path / "batch.json"
    entries: list[dict[str, str]] = [{"image": refs[0]}, {"image": refs[1]}]
    entries += [{"image": r, "to": f"{other_registry.host}/other/{n}"} for n, r in enumerate(refs)]
    # Within the source registry itself: every blob is mounted from the source repository.
    entries.append({"image": refs[0], "to": f"{registry.host}/{repo}/copy0"})
    listing.write_text(json.dumps(entries))
    marks = {r: r.mark() for r in (registry, dest_registry, other_registry)}

    done = _fastpull(
        "copy", "-f", str(listing), "--to", f"{dest_registry.host}/first", "--json",
        "--cluster", dask_cluster.address, env=_env(FASTPULL_CLUSTER_TASK_BYTES="1"),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    # --json: the events of a local batch copy, the workers' progress among them.
    records = [json.loads(line) for line in done.stdout.splitlines()]
    kinds = [r["event"] for r in records]
    assert kinds[0] == "batch-planned" and kinds[-1] == "batch-finished"
    assert kinds.count("image-done") == kinds.count("push-finished") == len(entries)
    assert {r["status"] for r in records if r["event"] == "image-done"} == {"copied"}
    assert "layer" in kinds
    sizes = _unique_sizes(family.values())
    assert dict(_blob_bytes(registry.requests(marks[registry]))) == sizes
    first_two = _unique_sizes(family[r] for r in refs[:2])
    assert sorted(_put_digests(dest_registry.requests(marks[dest_registry]))) == sorted(first_two)
    assert sorted(_put_digests(other_registry.requests(marks[other_registry]))) == sorted(sizes)
    within = registry.requests(marks[registry])
    assert _put_digests(within) == []
    assert len(_mounts(within)) == len(family[refs[0]].referenced_blobs())
    for n, ref in enumerate(refs):
        manifest = family[ref].manifest_bytes
        assert _raw_manifest(other_registry, f"other/{n}", "1") == manifest
    assert _raw_manifest(registry, f"{repo}/copy0", "1") == family[refs[0]].manifest_bytes


def test_an_image_missing_at_the_source_fails_alone(
    registry: Any,
    dest_registry: RegistryServer,
    repo: str,
    dask_cluster: DaskCluster,
    tmp_path: Path,
) -> None:
    family = _family(registry, repo, 2, seed=730)
    first, second = family
    listing = tmp_path / "images.txt"
    listing.write_text(f"{first}\n{registry.host}/{repo}/missing:1\n{second}\n")
    report = tmp_path / "report.json"

    done = _fastpull(
        "copy", "-f", str(listing), "--to", f"{dest_registry.host}/alone",
        "--cluster", dask_cluster.address, "--report", str(report),
    )  # fmt: skip

    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"Error: {registry.host}/{repo}/missing:1: manifest for "
        f"{registry.host}/{repo}/missing:1 not found: manifest unknown",
        "Error: 1 of 3 images failed",
    ]
    document = json.loads(report.read_text())
    assert [i["status"] for i in document["images"]] == ["copied", "failed", "copied"]
    for ref, image in family.items():
        name = ref.split("/", 1)[1].rsplit(":", 1)[0]
        assert _raw_manifest(dest_registry, f"alone/{name}", "1") == image.manifest_bytes


def test_fail_fast_skips_the_images_after_a_failure(
    registry: Any,
    dest_registry: RegistryServer,
    repo: str,
    dask_cluster: DaskCluster,
    tmp_path: Path,
) -> None:
    ref = next(iter(_family(registry, repo, 1, seed=735)))
    listing = tmp_path / "images.txt"
    listing.write_text(f"{registry.host}/{repo}/missing:1\n{ref}\n")
    report = tmp_path / "report.json"
    dest_mark = dest_registry.mark()

    done = _fastpull(
        "copy", "-f", str(listing), "--to", f"{dest_registry.host}/fast", "--fail-fast",
        "--cluster", dask_cluster.address, "--report", str(report),
    )  # fmt: skip

    assert done.returncode == 4, done.stderr
    document = json.loads(report.read_text())
    assert [i["status"] for i in document["images"]] == ["failed", "skipped"]
    assert dest_registry.requests(dest_mark) == []


@dataclass
class _SlowCopy:
    """A batch of one image whose blob's first request trickles (64 KiB, then a byte a
    second), so the task fetching it is mid-blob for as long as a test needs; the client
    runs in the background on a cluster of one worker, w1."""

    proxy: FaultProxy
    cluster: DaskCluster
    path: str
    layer: Any
    image: Image
    report: Path
    client: subprocess.Popen[str]


@contextlib.contextmanager
def _slow_copy(
    registry: Any, dest: RegistryServer, repo: str, tmp_path: Path, seed: int, prefix: str
) -> Iterator[_SlowCopy]:
    layer = make_layer(6 * MiB, seed=seed)
    image = make_image([layer])
    registry.pusher.push_image(f"{repo}/big", "1", image)
    path = blob_path(f"{repo}/big", layer.digest)
    with FaultProxy(registry.url) as proxy, _cluster(1) as cluster:
        proxy.add(Rule(Trickle(after=64 * 1024), path=path, times=1))
        listing = tmp_path / "images.txt"
        listing.write_text(f"{proxy.host}/{repo}/big:1\n")
        report = tmp_path / "report.json"
        client = start_fastpull(
            "copy", "-f", str(listing), "--to", f"{dest.host}/{prefix}",
            "--cluster", cluster.address, "--report", str(report), "--stall-timeout", "120",
        )  # fmt: skip
        try:
            _wait_until(lambda: proxy.requests_for(path), "w1 to start on the blob")
            yield _SlowCopy(proxy, cluster, path, layer, image, report, client)
        finally:
            if client.poll() is None:
                client.kill()
            client.communicate()


def test_killing_a_worker_mid_blob_and_the_batch_completes_on_the_other(
    registry: Any, dest_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    with _slow_copy(registry, dest_registry, repo, tmp_path, 740, "killed") as run:
        _wait_until(lambda: _relay_dirs(run.cluster), "w1's scratch store")
        left_by_w1 = _relay_dirs(run.cluster)
        config = run.image.config_digest
        _wait_until(
            lambda: config in _put_digests(dest_registry.requests()), "w1 to place the config"
        )
        run.cluster.add_worker("w2")
        # w1's other chunks are in by now; it waits on the trickling one.
        by_w1 = len(run.proxy.requests_for(run.path))
        config_gets = len(run.proxy.requests_for(blob_path(f"{repo}/big", config)))
        killed = run.cluster.kill_worker("w1")
        _, err = run.client.communicate(timeout=_RUN_TIMEOUT)

        assert run.client.returncode == 0, err + run.cluster.log("scheduler")
        _wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in killed), "orphans")
        document = json.loads(run.report.read_text())
        workers = {b["digest"]: b["worker"] for b in document["blobs"]}
        assert workers[run.layer.digest] == "w2"
        assert workers[config] not in ("", "w2")  # w1 placed it before it was killed
        # The rerun on w2 skipped what w1 had placed: the config was not fetched again.
        assert len(run.proxy.requests_for(blob_path(f"{repo}/big", config))) == config_gets
        # What w1 had received of the layer died with its scratch store; w2 fetched the
        # layer once, whole.
        requests = run.proxy.requests_for(run.path)
        assert sum(r.body_sent for r in requests[by_w1:]) == run.layer.size
        # The dead worker's scratch store is removed by the next worker that starts there.
        assert all(d.exists() for d in left_by_w1)
        run.cluster.add_worker("w3")
        assert _relay_dirs(run.cluster) == []
    raw = _raw_manifest(dest_registry, f"killed/{repo}/big", "1")
    assert raw == run.image.manifest_bytes


def test_ctrl_c_stops_the_tasks_and_pushes_no_manifest(
    registry: Any, dest_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    with _slow_copy(registry, dest_registry, repo, tmp_path, 750, "stopped") as run:
        run.client.send_signal(signal.SIGINT)
        _, err = run.client.communicate(timeout=60)

        assert run.client.returncode == 130, err
        assert "interrupted" in one_line(err)
        _wait_until(lambda: run.proxy.requests_for(run.path)[0].hung_up, "the task to stop", 20)
        _wait_until(lambda: not _relay_dirs(run.cluster), "the scratch store to go", 20)
    stopped = [r for r in dest_registry.requests() if "/stopped/" in r.path]
    assert [r for r in stopped if "/manifests/" in r.path and r.method == "PUT"] == []


def test_an_image_is_pushed_as_soon_as_its_blobs_are_there_not_when_its_task_ends(
    registry: Any, dest_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    small = make_image([make_layer(100_000, seed=755)])
    registry.pusher.push_image(f"{repo}/small", "1", small)
    slow = make_layer(4 * MiB, seed=756)
    registry.pusher.push_image(f"{repo}/slow", "1", make_image([slow]))
    path = blob_path(f"{repo}/slow", slow.digest)
    with FaultProxy(registry.url) as proxy, _cluster(1) as cluster:
        # Every request for the slow layer trickles: it never arrives.
        proxy.add(Rule(Trickle(after=64 * 1024), path=path, times=None))
        listing = tmp_path / "images.txt"
        listing.write_text(f"{proxy.host}/{repo}/small:1\n{proxy.host}/{repo}/slow:1\n")
        # Both images' blobs are one task (the default size), which cannot end while the
        # slow layer trickles.
        client = start_fastpull(
            "copy", "-f", str(listing), "--to", f"{dest_registry.host}/early",
            "--cluster", cluster.address, "--stall-timeout", "120",
        )  # fmt: skip
        try:
            _wait_until(
                lambda: any(
                    r.method == "PUT" and r.path == f"/v2/early/{repo}/small/manifests/1"
                    for r in dest_registry.requests()
                ),
                "the small image's manifest",
            )
            client.send_signal(signal.SIGINT)
            _, err = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.communicate()

    assert client.returncode == 130, err
    assert _raw_manifest(dest_registry, f"early/{repo}/small", "1") == small.manifest_bytes
    logged = dest_registry.requests()
    assert slow.digest not in _put_digests(logged)
    assert not any(f"/early/{repo}/slow/" in r.path for r in logged if "/manifests/" in r.path)


def test_an_unreachable_cluster_is_one_line_before_anything_is_fetched(
    registry: Any, dest_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    ref = next(iter(_family(registry, repo, 1, seed=760)))
    listing = tmp_path / "images.txt"
    listing.write_text(ref + "\n")
    source_mark, dest_mark = registry.mark(), dest_registry.mark()
    nobody = f"tcp://127.0.0.1:{free_loopback_port()}"

    done = _fastpull(
        "copy", "-f", str(listing), "--to", f"{dest_registry.host}/x", "--cluster", nobody,
        env=_env(FASTPULL_CLUSTER_TIMEOUT="2"),
    )  # fmt: skip

    assert done.returncode == 5
    line = one_line(done.stderr)
    assert line.startswith(f"Error: cannot reach the Dask scheduler at {nobody}"), line
    assert registry.requests(source_mark) == []
    assert dest_registry.requests(dest_mark) == []


def test_a_node_running_another_fastpull_is_named_before_anything_is_copied(
    registry: Any, dest_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    ref = next(iter(_family(registry, repo, 1, seed=765)))
    listing = tmp_path / "images.txt"
    listing.write_text(ref + "\n")
    with _odd_cluster(tmp_path) as cluster:
        source_mark, dest_mark = registry.mark(), dest_registry.mark()

        done = _fastpull(
            "copy", "-f", str(listing), "--to", f"{dest_registry.host}/odd",
            "--cluster", cluster.address,
        )  # fmt: skip

    assert_names_the_odd_worker(done)
    assert registry.requests(source_mark) == []
    assert dest_registry.requests(dest_mark) == []


def test_cluster_on_a_single_copy_is_a_usage_error() -> None:
    done = _fastpull("copy", "--cluster", "tcp://127.0.0.1:1", "localhost:1/a:1", "localhost:1/b:1")

    assert done.returncode == 2
    assert "--cluster goes with -f FILE" in one_line(done.stderr)


def test_a_token_destination_gets_its_credentials_but_no_log_does(
    registry: Any,
    token_registry: RegistryServer,
    repo: str,
    dask_cluster: DaskCluster,
    docker_config: Any,
    tmp_path: Path,
) -> None:
    family = _family(registry, repo, 2, seed=770)
    docker_config.add_auth(
        token_registry.host, username=token_registry.username, password=token_registry.password
    )
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(family) + "\n")
    report = tmp_path / "report.json"
    dest_mark = token_registry.mark()

    done = _fastpull(
        "copy", "-f", str(listing), "--to", f"{token_registry.host}/secured",
        "--cluster", dask_cluster.address, "--ca-cert", str(token_registry.ca_path),
        "--report", str(report),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    # The workers authenticated to upload: the blobs are there, and the images read back.
    assert sorted(_put_digests(_uploads(token_registry.requests(dest_mark)))) == sorted(
        _unique_sizes(family.values())
    )
    creds = f"{token_registry.username}:{token_registry.password}"
    for ref, image in family.items():
        name = ref.split("/", 1)[1].rsplit(":", 1)[0]
        raw = _raw_manifest(token_registry, f"secured/{name}", "1", creds=creds)
        assert raw == image.manifest_bytes
    secrets = {token_registry.password, base64.b64encode(creds.encode()).decode()}
    logs = {name: dask_cluster.log(name) for name in ("scheduler", "w1", "w2")}
    written = {"stdout": done.stdout, "stderr": done.stderr, "report": report.read_text(), **logs}
    for where, text in written.items():
        for secret in secrets:
            assert secret not in text, f"a credential appears in {where}"
