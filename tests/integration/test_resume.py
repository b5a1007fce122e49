"""Interruption, resume and crash safety of the store, measured in bytes at the real registry.

An interrupted pull leaves ``ingest/<alg>-<hex>.data`` and a ``.journal`` of the finished
ranges, each with its xxh3-128; the next pull of any image needing the blob checks those
ranges, keeps the intact ones and fetches only the rest. What the second run fetched is
counted in the registry's access log (body bytes per request), not taken from fastpull.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from fastpull.store.layout import Store
from tests.integration.conftest import (
    Start,
    assert_store_consistent,
    blob,
    entry_for,
    file_digest,
    index_entries,
    process_tree,
    start_fastpull,
)
from tests.support.faultserver import Serve
from tests.support.images import Layer, make_image, make_layer
from tests.support.registry import RegistryServer

MIB = 1 << 20
CI = os.environ.get("CI") == "true"


@pytest.fixture
def store(docker_config: Any) -> Path:
    """The store this test pulls into (``$FASTPULL_STORE``)."""
    return Path(docker_config.store)


def _layer(size: int, seed: int = 0) -> Layer:
    return make_layer(size, compression="none", seed=seed)


def _bytes_fetched(registry: RegistryServer, since: int, digest: str) -> int:
    """Body bytes the registry sent for GETs of one blob since ``since``."""
    encoded = digest.replace(":", "%3A")
    return sum(
        r.size
        for r in registry.requests(since)
        if r.method == "GET" and r.path.split("?")[0].endswith((digest, encoded))
    )


def _journaled(store: Path, digest: str) -> list[tuple[int, int]]:
    """The finished ranges the journal of ``digest`` lists (each checked with xxhash here)."""
    stem = store / "ingest" / digest.replace(":", "-", 1)
    journal = stem.with_suffix(".journal")
    if not journal.exists():
        return []
    # The journal first: a range journaled after the data was read would look wrong.
    lines = journal.read_bytes().splitlines()[1:]
    data = stem.with_suffix(".data").read_bytes()
    ranges = []
    for line in lines:
        record = json.loads(line)
        if "start" in record:
            piece = data[record["start"] : record["end"]]
            assert xxhash.xxh3_128_hexdigest(piece) == record["xxh3"]
            ranges.append((record["start"], record["end"]))
    return ranges


def _write_journal(
    store: Path, layer: Layer, ranges: list[tuple[int, int]], etag: str | None = None
) -> Path:
    """Leave in ``ingest/`` what an interrupted pull of ``layer`` would have: its bytes at
    ``ranges`` and a journal of them."""
    Store.open(store)
    stem = store / "ingest" / layer.digest.replace(":", "-", 1)
    content = layer.data
    data = bytearray(len(content))
    lines = [{"journal": 1, "digest": layer.digest, "size": layer.size}]
    if etag is not None:
        lines.append({"etag": etag})
    for start, end in ranges:
        data[start:end] = content[start:end]
        lines.append(
            {"start": start, "end": end, "xxh3": xxhash.xxh3_128_hexdigest(content[start:end])}
        )
    stem.with_suffix(".data").write_bytes(bytes(data))
    journal = stem.with_suffix(".journal")
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return journal


def _pull(cli: Any, ref: str, stats: Path) -> dict[str, Any]:
    # One connection: no endgame split, whose cut the registry has already sent bytes past
    # (they would count as fetched twice when the machine is slow).
    result = cli("pull", "--workers", "0", "--connections", "1", "--stats", str(stats), ref)
    assert result.code == 0, result.err
    return json.loads(stats.read_text())


def _blob_stats(stats: dict[str, Any], digest: str) -> dict[str, Any]:
    return next(b for b in stats["blobs"] if b["digest"] == digest)


# -- resume from a journal --------------------------------------------------------------------


@pytest.mark.parametrize("presses", [1, 3], ids=["ctrl-c", "ctrl-c-thrice"])
def test_ctrl_c_keeps_what_was_written_and_the_next_pull_fetches_only_the_rest(
    servers: Start, registry: RegistryServer, repo: str, store: Path, tmp_path: Path, presses: int
) -> None:
    layer = _layer(24 * MIB)
    image = make_image([layer])
    # First run: from a server that sends each request's bytes at 1 MiB/s, Ctrl-C mid-way.
    slow = servers()
    slow.add_image("slow/app", "1", image)
    slow.script(slow.blob_path("slow/app", layer.digest), Serve(rate=MIB, times=None))
    proc = start_fastpull("pull", "--workers", "2", "--connections", "4", f"{slow.host}/slow/app:1")
    try:
        deadline = time.monotonic() + 30
        while not _journaled(store, layer.digest):
            assert time.monotonic() < deadline, "no chunk was ever journaled"
            time.sleep(0.05)
        for _ in range(presses):  # more presses than needed must change nothing
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.1)
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert code == 130, err
    assert err.startswith("Error: interrupted") and err.count("\n") == 1, err
    kept = _journaled(store, layer.digest)
    resumable = sum(end - start for start, end in kept)
    assert 0 < resumable < layer.size
    assert not blob(store, layer.digest).exists()
    assert_store_consistent(store)

    # Second run: the same blob from the real registry, which counts what it sends.
    registry.pusher.push_image(repo, "1", image)
    mark = registry.mark()
    stats = _pull_from(registry, repo, tmp_path)
    assert file_digest(blob(store, layer.digest)) == layer.digest
    assert _bytes_fetched(registry, mark, layer.digest) == layer.size - resumable
    assert _blob_stats(stats, layer.digest)["resumed"] == resumable
    assert list((store / "ingest").iterdir()) == []


def _pull_from(registry: RegistryServer, repo: str, tmp_path: Path) -> dict[str, Any]:
    stats = tmp_path / "stats.json"
    # One connection: no endgame split (see test_two_pulls_sharing_a_layer_download_it_once).
    args = ["pull", "--connections", "1", "--stats", str(stats), f"{registry.host}/{repo}:1"]
    done = subprocess.run(
        [sys.executable, "-m", "fastpull", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(stats.read_text())


def test_journaled_ranges_are_checked_and_only_bad_ones_fetched_again(
    registry: RegistryServer, repo: str, store: Path, cli: Any, tmp_path: Path
) -> None:
    layer = _layer(16 * MIB, seed=1)
    image = make_image([layer])
    registry.pusher.push_image(repo, "1", image)
    good, damaged = (0, 4 * MIB), (4 * MIB, 9 * MIB)
    _write_journal(store, layer, [good, damaged])
    data = store / "ingest" / (layer.digest.replace(":", "-", 1) + ".data")
    with data.open("r+b") as fh:  # bit rot inside the second range
        fh.seek(6 * MIB)
        byte = fh.read(1)
        fh.seek(6 * MIB)
        fh.write(bytes([byte[0] ^ 0xFF]))

    mark = registry.mark()
    stats = _pull(cli, f"{registry.host}/{repo}:1", tmp_path / "stats.json")

    assert file_digest(blob(store, layer.digest)) == layer.digest
    assert _bytes_fetched(registry, mark, layer.digest) == layer.size - 4 * MIB
    assert _blob_stats(stats, layer.digest)["resumed"] == 4 * MIB


@pytest.mark.parametrize(
    ("etag", "resumed"),
    [(None, True), ('"an-etag-the-registry-never-sent"', False)],
    ids=["no-etag-yet", "etag-changed"],
)
def test_a_changed_etag_means_the_resumed_bytes_are_fetched_again(
    registry: RegistryServer,
    repo: str,
    store: Path,
    cli: Any,
    tmp_path: Path,
    etag: str | None,
    resumed: bool,
) -> None:
    layer = _layer(12 * MIB, seed=2)
    registry.pusher.push_image(repo, "1", make_image([layer]))
    journal = _write_journal(store, layer, [(0, 6 * MIB)], etag=etag)

    mark = registry.mark()
    stats = _pull(cli, f"{registry.host}/{repo}:1", tmp_path / "stats.json")

    assert file_digest(blob(store, layer.digest)) == layer.digest
    expected = layer.size - 6 * MIB if resumed else layer.size
    assert _bytes_fetched(registry, mark, layer.digest) == expected
    assert _blob_stats(stats, layer.digest)["resumed"] == (6 * MIB if resumed else 0)
    assert not journal.exists()


def test_a_journal_of_another_blob_or_size_resumes_nothing(
    registry: RegistryServer, repo: str, store: Path, cli: Any, tmp_path: Path
) -> None:
    layer = _layer(8 * MIB, seed=3)
    registry.pusher.push_image(repo, "1", make_image([layer]))
    journal = _write_journal(store, layer, [(0, 4 * MIB)])
    lines = journal.read_text().splitlines()
    header = json.loads(lines[0])
    journal.write_text("\n".join([json.dumps({**header, "size": layer.size + 1}), *lines[1:]]))

    mark = registry.mark()
    _pull(cli, f"{registry.host}/{repo}:1", tmp_path / "stats.json")

    assert _bytes_fetched(registry, mark, layer.digest) == layer.size
    assert file_digest(blob(store, layer.digest)) == layer.digest


# -- kill -9 -----------------------------------------------------------------------------------


def _wait_gone(pids: set[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} outlived their killed parent"
        time.sleep(0.02)


def _assert_entries_complete(store: Path) -> None:
    """index.json parses and every entry's manifest, config and layers are in blobs/ (a
    process killed before it created the store leaves no index.json, and no blobs)."""
    if not (store / "index.json").exists():
        assert not list(store.glob("blobs/*/*"))
        return
    for entry in index_entries(store):
        manifest = json.loads(blob(store, entry["digest"]).read_bytes())
        for descriptor in [manifest["config"], *manifest["layers"]]:
            path = blob(store, descriptor["digest"])
            assert path.stat().st_size == descriptor["size"], path


def test_kill_9_at_random_moments_never_corrupts_the_store(
    registry: RegistryServer, repo: str, store: Path, tmp_path: Path
) -> None:
    tags = ["1", "2", "3"]
    for number, tag in enumerate(tags):
        layers = [_layer(24 * MIB, seed=10 + number), _layer(MIB, seed=20 + number)]
        registry.pusher.push_image(repo, tag, make_image(layers))
    args = ("pull", "--all-tags", "--connections", "4", f"{registry.host}/{repo}")
    started = time.monotonic()
    scratch = subprocess.run(
        [sys.executable, "-m", "fastpull", *args, "--store", str(tmp_path / "scratch")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert scratch.returncode == 0, scratch.stderr
    whole = time.monotonic() - started

    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    kills = 0
    for _ in range(8):
        proc = start_fastpull(*args)
        # Resumed pulls are shorter than the first, cold one: aim at its first part.
        time.sleep(rng.uniform(0.0, 0.7 * whole))
        workers = process_tree(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=10)
        _wait_gone(workers)
        if code == 0:
            break
        assert code == -signal.SIGKILL, (seed, proc.stderr.read() if proc.stderr else "")
        kills += 1
        assert_store_consistent(store, killed=True)
        _assert_entries_complete(store)
    assert kills > 0, f"seed {seed}: every pull ended before its kill"

    final = subprocess.run(
        [sys.executable, "-m", "fastpull", *args], capture_output=True, text=True, timeout=120
    )
    assert final.returncode == 0, (seed, final.stderr)
    assert {
        e["annotations"]["org.opencontainers.image.ref.name"] for e in index_entries(store)
    } == {f"{registry.host}/{repo}:{tag}" for tag in tags}
    _assert_entries_complete(store)
    # A process killed right after a commit leaves its lock and journal files: no data is
    # left behind them, and gc takes them.
    assert not list((store / "ingest").glob("*.data"))
    gc = subprocess.run(
        [sys.executable, "-m", "fastpull", "gc"], capture_output=True, text=True, timeout=120
    )
    assert gc.returncode == 0, gc.stderr
    assert list((store / "ingest").iterdir()) == []
    assert_store_consistent(store)
    verify = subprocess.run(
        [sys.executable, "-m", "fastpull", "verify"], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


# -- two processes, one store -----------------------------------------------------------------


def test_two_pulls_sharing_a_layer_download_it_once(
    registry: RegistryServer, repo: str, store: Path
) -> None:
    base = _layer(32 * MIB, seed=30)
    images = {tag: make_image([base, _layer(2 * MIB, seed=31 + i)]) for i, tag in enumerate("ab")}
    for tag, image in images.items():
        registry.pusher.push_image(repo, tag, image)

    mark = registry.mark()
    # One connection each: no transfer is ever idle, so no endgame split, whose request
    # would bring bytes past its cut that the server had sent already.
    procs = [
        start_fastpull("pull", "--connections", "1", f"{registry.host}/{repo}:{tag}")
        for tag in images
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err

    assert _bytes_fetched(registry, mark, base.digest) == base.size
    for tag, image in images.items():
        entry = entry_for(store, f"{registry.host}/{repo}:{tag}")
        assert entry["digest"] == image.manifest_digest
    _assert_entries_complete(store)
    assert_store_consistent(store)


# -- full and read-only disks -----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 10 MiB tmpfs to hold the store (root only; required under CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        message = f"cannot mount a tmpfs here: {done.stderr.strip()}"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def test_a_full_disk_is_a_clear_error_and_the_pull_completes_once_there_is_room(
    registry: RegistryServer, repo: str, small_disk: Path
) -> None:
    layers = [_layer(6 * MIB, seed=40), _layer(6 * MIB, seed=41)]
    registry.pusher.push_image(repo, "1", make_image(layers))
    store = small_disk / "store"
    args = ["pull", "--store", str(store), f"{registry.host}/{repo}:1"]

    full = subprocess.run(
        [sys.executable, "-m", "fastpull", *args], capture_output=True, text=True, timeout=120
    )
    assert full.returncode == 7, full.stderr
    (line,) = full.stderr.strip().splitlines()
    assert line.startswith(f"Error: no space left on device in store {store}"), line
    assert index_entries(store) == []
    assert_store_consistent(store)

    _remount(small_disk, "size=64m")
    done = subprocess.run(
        [sys.executable, "-m", "fastpull", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for layer in layers:
        assert file_digest(blob(store, layer.digest)) == layer.digest
    assert_store_consistent(store)


def test_a_read_only_store_is_a_clear_error(
    registry: RegistryServer, repo: str, small_disk: Path
) -> None:
    registry.pusher.push_image(repo, "1", make_image([_layer(MIB, seed=50)]))
    store = small_disk / "store"
    store.mkdir()
    _remount(small_disk, "ro")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastpull",
            "pull",
            "--store",
            str(store),
            f"{registry.host}/{repo}:1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 7, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert str(store) in line and "read-only file system" in line.lower(), line
