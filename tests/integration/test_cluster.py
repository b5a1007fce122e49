"""``pull -f FILE --cluster ADDRESS`` on a real Dask cluster: a ``dask scheduler`` and
``dask worker`` processes on loopback, the real registry, one store every node reaches."""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import assert_store_consistent, index_entries, one_line
from tests.support.daskcluster import DaskCluster, DaskUnavailable
from tests.support.faultproxy import FaultProxy, Rule, Trickle, blob_path
from tests.support.images import MiB, make_image, make_layer
from tests.support.netutil import free_loopback_port

_IN_CI = os.environ.get("CI") == "true"
_RUN_TIMEOUT = 180


def _cluster(workers: int) -> DaskCluster:
    try:
        return DaskCluster(workers)
    except DaskUnavailable as exc:
        if _IN_CI:
            pytest.fail(f"dask/distributed must be installed in CI: {exc}")
        pytest.skip(f"dask/distributed is not installed: {exc}")


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[DaskCluster]:
    with _cluster(2) as cluster:
        yield cluster


def _fastpull(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastpull", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_RUN_TIMEOUT,
    )


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _push_family(registry: Any, repo: str, count: int, seed: int) -> list[str]:
    """``count`` images sharing one base layer, each with a layer of its own."""
    return list(_family(registry, repo, count, seed))


def _family(registry: Any, repo: str, count: int, seed: int) -> dict[str, dict[str, int]]:
    """As :func:`_push_family`, with each image's blob sizes by digest."""
    base = make_layer(3 * MiB, seed=seed)
    pushed = {}
    for number in range(count):
        image = make_image([base, make_layer(MiB + number * 4096, seed=seed + 1 + number)])
        registry.pusher.push_image(f"{repo}/app{number}", "1", image)
        sizes = {b.digest: b.size for b in image.referenced_blobs()}
        pushed[f"{registry.host}/{repo}/app{number}:1"] = sizes
    return pushed


def _blob_bytes(requests: list[Any]) -> collections.Counter[str]:
    """Body bytes the registry sent per blob digest."""
    sent: collections.Counter[str] = collections.Counter()
    for r in requests:
        if r.method == "GET" and "/blobs/" in r.path:
            sent[r.path.rsplit("/", 1)[1]] += r.size
    return sent


def test_a_batch_on_the_cluster_fetches_every_blob_once_across_workers(
    registry: Any, repo: str, dask_cluster: DaskCluster, tmp_path: Path
) -> None:
    family = _family(registry, repo, 4, seed=610)
    sizes = {digest: size for blobs in family.values() for digest, size in blobs.items()}
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(family) + "\n")
    store, report = tmp_path / "store", tmp_path / "report.json"
    mark = registry.mark()

    done = _fastpull(
        "pull", "-f", str(listing), "--cluster", dask_cluster.address, "--store", str(store),
        "--report", str(report),
        # One task per blob, so both workers get some.
        env=_env(FASTPULL_CLUSTER_TASK_BYTES="1"),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    sent = _blob_bytes(registry.requests(mark))
    assert len(index_entries(store)) == 4
    # 1 shared layer + 4 own layers + 4 configs: each one's bytes came from the registry
    # once, in one request or in the Range chunks of one engine run.
    assert len(sizes) == 9
    assert dict(sent) == sizes
    document = json.loads(report.read_text())
    moved = {b["digest"]: b["worker"] for b in document["blobs"]}
    assert set(moved) == set(sizes)
    assert set(moved.values()) == {"w1", "w2"}
    assert [i["status"] for i in document["images"]] == ["downloaded"] * 4
    assert_store_consistent(store)
    verified = _fastpull("verify", "--store", str(store))
    assert verified.returncode == 0, verified.stderr


def test_a_second_run_finds_everything_stored(
    registry: Any, repo: str, dask_cluster: DaskCluster, tmp_path: Path
) -> None:
    refs = _push_family(registry, repo, 2, seed=620)
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(refs) + "\n")
    store = tmp_path / "store"
    args = ["pull", "-f", str(listing), "--store", str(store)]
    assert _fastpull(*args, "--cluster", dask_cluster.address).returncode == 0
    mark = registry.mark()

    done = _fastpull(*args, env=_env(FASTPULL_CLUSTER=dask_cluster.address))

    assert done.returncode == 0, done.stderr
    assert not _blob_bytes(registry.requests(mark))


def test_an_unreachable_cluster_is_one_line_before_anything_is_fetched(
    registry: Any, repo: str, tmp_path: Path
) -> None:
    refs = _push_family(registry, repo, 1, seed=630)
    listing = tmp_path / "images.txt"
    listing.write_text(refs[0] + "\n")
    mark = registry.mark()
    nobody = f"tcp://127.0.0.1:{free_loopback_port()}"

    done = _fastpull(
        "pull", "-f", str(listing), "--cluster", nobody, "--store", str(tmp_path / "store"),
        env=_env(FASTPULL_CLUSTER_TIMEOUT="2"),
    )  # fmt: skip

    assert done.returncode == 5
    line = one_line(done.stderr)
    assert line.startswith(f"Error: cannot reach the Dask scheduler at {nobody}"), line
    assert registry.requests(mark) == []


@pytest.mark.parametrize("address", ["127.0.0.1:8786", "http://127.0.0.1:8786", "tcp://"])
def test_a_malformed_cluster_address_is_a_usage_error(address: str, tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("localhost:1/x:1\n")

    done = _fastpull("pull", "-f", str(listing), "--cluster", address)

    assert done.returncode == 2
    assert "must be tcp://HOST:PORT or tls://HOST:PORT" in one_line(done.stderr)


def test_cluster_without_a_batch_file_is_a_usage_error() -> None:
    done = _fastpull("pull", "--cluster", "tcp://127.0.0.1:1", "localhost:1/x:1")

    assert done.returncode == 2
    assert "--cluster go with -f FILE" in one_line(done.stderr)


@contextlib.contextmanager
def _odd_cluster(tmp_path: Path) -> Iterator[DaskCluster]:
    """A cluster of w1 and a worker "odd" that runs a copy of this fastpull with one line
    changed: the same version number, other code."""
    other = tmp_path / "other-fastpull"
    source = Path(__file__).resolve().parents[2] / "fastpull"
    shutil.copytree(source, other / "fastpull", ignore=shutil.ignore_patterns("__pycache__"))
    with (other / "fastpull" / "cancel.py").open("a") as fh:
        fh.write("\n# patched on one node only\n")
    with _cluster(1) as cluster:
        cluster.add_worker("odd", env=dict(cluster.env, PYTHONPATH=str(other)))
        yield cluster


def assert_names_the_odd_worker(done: subprocess.CompletedProcess[str]) -> None:
    """The run stopped with one line naming worker "odd" only."""
    assert done.returncode == 5
    line = one_line(done.stderr)
    named = line.partition("do not run this fastpull ")[2].partition(";")[0]
    assert named.startswith("0.1.0+"), line
    odd = named.partition(": ")[2]
    assert odd.startswith("worker odd at tcp://127.0.0.1:"), line
    assert "w1" not in odd and "scheduler" not in odd, line


def test_a_node_running_another_fastpull_is_named_before_anything_is_fetched(
    registry: Any, repo: str, tmp_path: Path
) -> None:
    refs = _push_family(registry, repo, 1, seed=640)
    listing = tmp_path / "images.txt"
    listing.write_text(refs[0] + "\n")
    with _odd_cluster(tmp_path) as cluster:
        mark = registry.mark()

        done = _fastpull(
            "pull", "-f", str(listing), "--cluster", cluster.address,
            "--store", str(tmp_path / "store"),
        )  # fmt: skip

    assert_names_the_odd_worker(done)
    assert registry.requests(mark) == []


@dataclass
class _SlowPull:
    """A batch of one image whose blob's first request trickles, so the task fetching it is
    mid-blob for as long as a test needs; the client runs in the background."""

    proxy: FaultProxy
    cluster: DaskCluster
    path: str
    layer: Any
    store: Path
    args: list[str]
    client: subprocess.Popen[str]


@contextlib.contextmanager
def _slow_pull(
    registry: Any, repo: str, tmp_path: Path, seed: int, env: dict[str, str] | None = None
) -> Iterator[_SlowPull]:
    layer = make_layer(6 * MiB, seed=seed)
    registry.pusher.push_image(f"{repo}/big", "1", make_image([layer]))
    with FaultProxy(registry.url) as proxy, _cluster(1) as cluster:
        path = blob_path(f"{repo}/big", layer.digest)
        # 64 KiB at once, then one byte a second.
        proxy.add(Rule(Trickle(after=64 * 1024), path=path, times=1))
        listing = tmp_path / "images.txt"
        listing.write_text(f"{proxy.host}/{repo}/big:1\n")
        store = tmp_path / "store"
        args = ["pull", "-f", str(listing), "--store", str(store), "--cluster", cluster.address]
        client = subprocess.Popen(
            [sys.executable, "-m", "fastpull", *args, "--stall-timeout", "120"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_until(lambda: proxy.requests_for(path), "w1 to start on the blob")
            yield _SlowPull(proxy, cluster, path, layer, store, args, client)
        finally:
            if client.poll() is None:
                client.kill()
            client.communicate()


def _wait_until(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killing_a_worker_mid_blob_loses_only_that_task_and_the_batch_completes(
    registry: Any, repo: str, tmp_path: Path
) -> None:
    with _slow_pull(registry, repo, tmp_path, seed=650) as run:
        run.cluster.add_worker("w2")
        killed = run.cluster.kill_worker("w1")
        _, err = run.client.communicate(timeout=_RUN_TIMEOUT)

        assert run.client.returncode == 0, err + run.cluster.log("scheduler")
        # Nothing w1 started (its nanny, its engine's worker processes) outlived it.
        _wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in killed), "orphans")
        requests = run.proxy.requests_for(run.path)
        assert len(requests) >= 2
        # What w1 was receiving when it died was never journaled; everything else it had
        # written was, and is not fetched again.
        assert run.proxy.bytes_sent(run.path) <= run.layer.size + requests[0].body_sent
    assert len(index_entries(run.store)) == 1
    assert_store_consistent(run.store)
    assert _fastpull("verify", "--store", str(run.store)).returncode == 0


def test_ctrl_c_on_the_client_stops_the_tasks_and_the_next_run_completes(
    registry: Any, repo: str, tmp_path: Path
) -> None:
    with _slow_pull(registry, repo, tmp_path, seed=660) as run:
        started = time.monotonic()
        run.client.send_signal(signal.SIGINT)
        _, err = run.client.communicate(timeout=60)

        assert run.client.returncode == 130, err
        assert "interrupted" in one_line(err)
        assert time.monotonic() - started < 30
        # The task on w1 stopped too: it hung up on the answer it was still receiving.
        _wait_until(lambda: run.proxy.requests_for(run.path)[0].hung_up, "the task to stop", 20)
        assert_store_consistent(run.store, killed=True)
        assert index_entries(run.store) == []

        done = _fastpull(*run.args)

        assert done.returncode == 0, done.stderr
    assert len(index_entries(run.store)) == 1
    assert _fastpull("verify", "--store", str(run.store)).returncode == 0


def test_a_hung_worker_is_given_up_after_the_stall_time_not_waited_for(
    registry: Any, repo: str, tmp_path: Path
) -> None:
    with _slow_pull(
        registry, repo, tmp_path, seed=670, env=_env(FASTPULL_CLUSTER_STALL="3")
    ) as run:
        worker = run.cluster.workers["w1"]
        # Alive and connected, but silent: what Dask itself notices only after minutes.
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            _, err = run.client.communicate(timeout=60)
            waited = time.monotonic() - started
        finally:
            os.killpg(worker.pid, signal.SIGCONT)

        assert run.client.returncode == 5, err
        assert "no word from the cluster about task 0 for 3 s (a worker may hang)" in err
        assert waited < 30
        assert_store_consistent(run.store, killed=True)
        assert index_entries(run.store) == []


def test_credentials_reach_the_workers_but_no_log_or_output(
    token_registry: Any, repo: str, dask_cluster: DaskCluster, docker_config: Any, tmp_path: Path
) -> None:
    layer = make_layer(2 * MiB, seed=670)
    token_registry.pusher.push_image(repo, "1", make_image([layer]))
    docker_config.add_auth(
        token_registry.host, username=token_registry.username, password=token_registry.password
    )
    listing = tmp_path / "images.txt"
    listing.write_text(f"{token_registry.host}/{repo}:1\n")
    report = tmp_path / "report.json"

    done = _fastpull(
        "pull", "-f", str(listing), "--cluster", dask_cluster.address,
        "--store", str(tmp_path / "store"), "--ca-cert", str(token_registry.ca_path),
        "--report", str(report),
    )  # fmt: skip

    # The workers had to authenticate to fetch the layer: the token server saw them.
    assert done.returncode == 0, done.stderr
    secrets = {token_registry.password}
    secrets |= {
        base64.b64encode(f"{token_registry.username}:{s}".encode()).decode() for s in secrets
    }
    logs = {name: dask_cluster.log(name) for name in ("scheduler", "w1", "w2")}
    written = {"stdout": done.stdout, "stderr": done.stderr, "report": report.read_text(), **logs}
    for where, text in written.items():
        for secret in secrets:
            assert secret not in text, f"a credential appears in {where}"
