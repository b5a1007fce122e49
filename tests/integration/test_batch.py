"""`fastpull pull -f FILE` against the real registry: one engine run for many images."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fastpull.errors import ManifestError, StoreError
from fastpull.puller import ImagePlan, Puller, StagedImage
from fastpull.store.layout import ImageName, Store
from tests.integration.conftest import (
    assert_store_consistent,
    blob,
    blob_gets,
    entry_for,
    env_store,
    index_entries,
)
from tests.support.diskcalls import record_disk_calls
from tests.support.faultserver import Respond, Serve
from tests.support.images import Image, make_image, make_index, make_layer
from tests.support.tools import require_tool

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _shared_images(registry: Any, repo: str, count: int, seed: int) -> dict[str, Image]:
    """``count`` images of 3 shared base layers plus one layer of their own, pushed as
    ``repo:t0`` ..."""
    base = [make_layer(40_000 + i, seed=seed + i) for i in range(3)]
    images = {}
    for i in range(count):
        image = make_image([*base, make_layer({f"app/{i}": b"x" * i}, seed=seed + 10 + i)])
        registry.pusher.push_image(repo, f"t{i}", image)
        images[f"{registry.host}/{repo}:t{i}"] = image
    return images


def test_a_batch_fetches_every_shared_blob_once(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    images = _shared_images(registry, repo, 6, seed=500)
    refs = list(images)
    plain = _write(tmp_path, "list.txt", "# six images\n" + "\n".join(refs[:4]) + "\n")
    as_json = _write(tmp_path, "list.json", json.dumps({"images": refs[3:]}))
    report = tmp_path / "report.json"
    mark = registry.mark()

    result = cli("pull", "-f", plain, "-f", as_json, "--report", str(report))

    assert result.code == 0, result.err
    unique = {b.digest: b.size for image in images.values() for b in image.referenced_blobs()}
    gets = blob_gets(registry.requests(mark))
    assert sorted(gets) == sorted(unique)  # every blob requested, and exactly once
    store = env_store()
    for ref, image in images.items():
        assert entry_for(store, ref)["digest"] == image.manifest_digest
        for b in image.referenced_blobs():
            assert blob(store, b.digest).stat().st_size == b.size
    document = json.loads(report.read_text())
    rows = document["images"]
    # refs[3] is in both files: listed twice, stored once, reused the second time.
    assert [r["image"] for r in rows] == refs[:4] + refs[3:]
    assert {r["status"] for r in rows} == {"downloaded"}
    assert sum(r["new_bytes"] for r in rows) == sum(unique.values())
    assert rows[1]["reused_bytes"] == sum(b.size for b in images[refs[1]].layers[:3])
    assert document["summary"]["failed"] == 0
    assert document["summary"]["bytes_downloaded"] == sum(unique.values())
    table = result.lines[result.lines.index("") + 1 :]
    assert table[0].split() == ["IMAGE", "STATUS", "NEW", "REUSED", "SECONDS"]
    assert [line.split()[:2] for line in table[1:]] == [[r["image"], "downloaded"] for r in rows]


def test_one_failing_image_does_not_stop_the_others(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    images = _shared_images(registry, repo, 3, seed=520)
    refs = list(images)
    broken = make_image([make_layer(30_000, seed=530)])
    registry.pusher.push_image(repo, "broken", broken)
    # Same size, other bytes: the registry serves it, and it never matches its digest.
    data_path = registry.blob_data_path(broken.layers[0].digest)
    data_path.write_bytes(b"\0" * broken.layers[0].size)
    listing = [refs[0], f"{registry.host}/{repo}:nosuchtag", f"{registry.host}/{repo}:broken"]
    listing += refs[1:]
    path = _write(tmp_path, "list.txt", "\n".join(listing))
    report = tmp_path / "report.json"
    mark = registry.mark()

    result = cli("pull", "-f", path, "--report", str(report))

    assert result.code != 0
    # One engine run went on around the bad blob: every good blob came once, the bad one
    # as often as the engine tries a blob whose bytes do not match (twice).
    gets = blob_gets(registry.requests(mark))
    good = {d for image in images.values() for d in image.blobs}
    assert {d: gets.count(d) for d in good} == dict.fromkeys(good, 1)
    assert gets.count(broken.layers[0].digest) == 2
    statuses = {r["image"]: r["status"] for r in json.loads(report.read_text())["images"]}
    assert statuses == {
        refs[0]: "downloaded",
        f"{registry.host}/{repo}:nosuchtag": "failed",
        f"{registry.host}/{repo}:broken": "failed",
        refs[1]: "downloaded",
        refs[2]: "downloaded",
    }
    for ref in refs:
        assert entry_for(env_store(), ref)["digest"] == images[ref].manifest_digest
    named = {
        e["annotations"]["org.opencontainers.image.ref.name"] for e in index_entries(env_store())
    }
    assert named == set(refs)
    errors = result.err.splitlines()
    assert any(e.startswith(f"Error: {registry.host}/{repo}:nosuchtag: ") for e in errors)
    assert any(f"{registry.host}/{repo}:broken: " in e and "digest" in e for e in errors)
    assert errors[-1] == "Error: 2 of 5 images failed"
    assert "Traceback" not in result.err


def test_a_batch_names_its_images_in_one_rewrite_once_their_blobs_are_durable(
    registry: Any, repo: str, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _shared_images(registry, repo, 4, seed=560)
    path = _write(tmp_path, "list.txt", "\n".join(images))
    Store.open(env_store())  # its first index.json is not what this test is about
    calls = record_disk_calls(monkeypatch)

    result = cli("pull", "-f", path)

    assert result.code == 0, result.err
    store = env_store()
    blob_dir, index = str(store / "blobs" / "sha256"), str(store / "index.json")
    # One rewrite of index.json names the four images (it was one each)...
    (index_write,) = [i for i, c in enumerate(calls) if c == ("rename", index)]
    # ...after every blob and manifest went into blobs/, and their directory was synced.
    into_blobs = [i for i, c in enumerate(calls) if c[0] == "rename" and c[1].startswith(blob_dir)]
    unique = {b.digest for image in images.values() for b in image.referenced_blobs()}
    assert len(into_blobs) >= len(unique)
    dir_syncs = [i for i, c in enumerate(calls) if c == ("fsync", blob_dir)]
    assert any(max(into_blobs) < i < index_write for i in dir_syncs)
    for ref, image in images.items():
        assert entry_for(store, ref)["digest"] == image.manifest_digest
    assert_store_consistent(store)


@pytest.mark.parametrize("failing", ["manifests", "name"])
def test_an_image_that_cannot_be_stored_fails_alone_and_the_others_are_named(
    registry: Any,
    repo: str,
    cli: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    images = _shared_images(registry, repo, 3, seed=580)
    refs = list(images)
    bad = refs[1]
    if failing == "manifests":  # storing its manifests fails (before any name is written)
        stage = Puller.stage

        def bad_stage(self: Puller, plan: ImagePlan, **kwargs: Any) -> StagedImage:
            if str(plan.ref) == bad:
                raise ManifestError(f"{bad}: config is not valid JSON")
            return stage(self, plan, **kwargs)

        monkeypatch.setattr(Puller, "stage", bad_stage)
    else:  # naming it fails, and with it the rewrite that was to name all three
        entries = Store._entries

        def bad_entries(self: Store, image: ImageName) -> dict[str, dict[str, Any]]:
            if image.ref_name == bad:
                raise StoreError(f"cannot name {bad}: its manifest is gone", store=str(self.root))
            return entries(self, image)

        monkeypatch.setattr(Store, "_entries", bad_entries)
    path = _write(tmp_path, "list.txt", "\n".join(refs))
    report = tmp_path / "report.json"

    result = cli("pull", "-f", path, "--report", str(report))

    assert result.code != 0
    statuses = {r["image"]: r["status"] for r in json.loads(report.read_text())["images"]}
    assert statuses == {refs[0]: "downloaded", bad: "failed", refs[2]: "downloaded"}
    store = env_store()
    named = {e["annotations"]["org.opencontainers.image.ref.name"] for e in index_entries(store)}
    assert named == {refs[0], refs[2]}
    for ref in (refs[0], refs[2]):
        assert entry_for(store, ref)["digest"] == images[ref].manifest_digest
    errors = result.err.splitlines()
    assert any(e.startswith(f"Error: {bad}: ") for e in errors), errors
    assert errors[-1] == "Error: 1 of 3 images failed"
    assert_store_consistent(store)


def test_fail_fast_stops_at_the_first_failure(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    images = _shared_images(registry, repo, 2, seed=540)
    refs = list(images)
    missing = f"{registry.host}/{repo}:nosuchtag"
    path = _write(tmp_path, "list.txt", "\n".join([missing, *refs]))
    report = tmp_path / "report.json"

    result = cli("pull", "-f", path, "--fail-fast", "--report", str(report))

    assert result.code == 4  # not found
    rows = json.loads(report.read_text())["images"]
    assert rows[0]["status"] == "failed"
    assert {r["status"] for r in rows[1:]} <= {"skipped"}  # nothing pulled after the failure
    assert index_entries(env_store()) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("debian\n\n  Bad Name\n", ":3: invalid reference format"),
        ('[\n  "debian",\n  {"image": "alpine", "tag": "3"}\n]', ": entry 2: unknown key 'tag'"),
        ('{"images": [\n  "a",\n  "b"\n  ]', ":4:4: invalid JSON"),
    ],
)
def test_file_errors_name_the_line_before_anything_is_fetched(
    registry: Any, repo: str, cli: Any, tmp_path: Path, text: str, message: str
) -> None:
    image = make_image([make_layer(1000, seed=550)])
    registry.pusher.push_image(repo, "ok", image)
    good = _write(tmp_path, "good.txt", f"{registry.host}/{repo}:ok\n")
    bad = _write(tmp_path, "bad.txt", text)
    mark = registry.mark()

    result = cli("pull", "-f", good, "-f", bad)

    assert result.code == 2
    assert result.err.startswith(f"Error: {bad}{message}")
    assert len(result.err.splitlines()) == 1
    assert registry.requests(mark) == []


def test_batch_from_stdin_with_all_tags_and_a_tag_pattern(
    registry: Any, repo: str, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for tag in ("v1.0", "v1.1", "v2.0"):
        registry.pusher.push_image(repo, tag, make_image([make_layer(500, seed=560)]))
    entry = {"image": f"{registry.host}/{repo}", "all_tags": True, "tags": r"v1\..*"}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([entry])))

    result = cli("pull", "-q", "-f", "-")

    assert result.code == 0, result.err
    assert sorted(result.lines) == [f"{registry.host}/{repo}:v1.0", f"{registry.host}/{repo}:v1.1"]


def test_multi_platform_pull_stores_the_index(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    skopeo = require_tool("skopeo")
    umoci = require_tool("umoci")
    base = make_layer({"etc/os-release": b"ID=multi\n"}, seed=570)
    platforms = {
        "linux/amd64": make_image([base, make_layer(2000, seed=571)]),
        "linux/arm64": make_image([base, make_layer(2000, seed=572)], architecture="arm64"),
        "linux/arm/v7": make_image([base], architecture="arm", variant="v7"),
    }
    index = make_index(list(platforms.values()))
    registry.pusher.push_index(repo, "multi", index)
    every = f"{registry.host}/{repo}:multi"
    two = f"{registry.host}/{repo}:two"
    registry.pusher.push_index(repo, "two", index)
    path = _write(
        tmp_path,
        "list.json",
        json.dumps([{"image": two, "platforms": ["linux/amd64", "linux/arm64"]}]),
    )

    assert cli("pull", "--platform", "all", every).code == 0
    result = cli("pull", "-f", path)

    assert result.code == 0, result.err
    store = str(env_store())
    # All platforms: the registry's index, byte for byte.
    entry = entry_for(env_store(), every)
    assert (entry["mediaType"], entry["digest"]) == (OCI_INDEX, index.manifest_digest)
    raw = subprocess.run(
        [skopeo, "inspect", "--raw", f"oci:{store}:{every}"], capture_output=True, timeout=60
    )
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == index.manifest_bytes
    # Two of three: an index of just those two.
    entry = entry_for(env_store(), two)
    assert entry["mediaType"] == OCI_INDEX
    assert entry["annotations"]["io.fastpull.repo-digest"] == index.manifest_digest
    raw = subprocess.run(
        [skopeo, "inspect", "--raw", f"oci:{store}:{two}"], capture_output=True, timeout=60
    )
    assert raw.returncode == 0, raw.stderr
    listed = json.loads(raw.stdout)["manifests"]
    assert [m["digest"] for m in listed] == [
        platforms["linux/amd64"].manifest_digest,
        platforms["linux/arm64"].manifest_digest,
    ]
    for name in ("linux/amd64", "linux/arm64", "linux/arm/v7"):
        for b in platforms[name].referenced_blobs():
            assert blob(env_store(), b.digest).exists()
    # skopeo picks a platform from the stored index and finds all of its blobs.
    for arch in ("amd64", "arm64"):
        info = subprocess.run(
            [skopeo, "--override-arch", arch, "inspect", f"oci:{store}:{two}"],
            capture_output=True,
            timeout=60,
            text=True,
        )
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["Architecture"] == arch
    listing = subprocess.run(
        [umoci, "ls", "--layout", store], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    assert {every, two} <= set(listing.stdout.split())


_HOLD_INGEST = """
import os, pathlib, sys, time
from fastpull.store.layout import Store
from fastpull.types import Digest

store, digest, size, data, ready, go = sys.argv[1:]
with Store.open(store).ingest(Digest.parse(digest), int(size)) as ingest:
    pathlib.Path(ready).touch()
    deadline = time.monotonic() + 60
    while not pathlib.Path(go).exists():
        if time.monotonic() > deadline:
            sys.exit("never told to go")
        time.sleep(0.01)
    ingest.preallocate()
    os.pwrite(ingest.fd, pathlib.Path(data).read_bytes(), 0)
    ingest.commit(digest.split(":")[1])
"""


def test_a_blob_another_process_is_downloading_is_waited_for_not_fetched(
    registry: Any, repo: str, docker_config: Any, tmp_path: Path
) -> None:
    shared = make_layer(50_000, seed=580)
    needs_it = make_image([shared, make_layer(100, seed=581)])
    other = make_image([make_layer(100, seed=582)])
    registry.pusher.push_image(repo, "needs", needs_it)
    registry.pusher.push_image(repo, "other", other)
    refs = [f"{registry.host}/{repo}:needs", f"{registry.host}/{repo}:other"]
    listing = _write(tmp_path, "list.txt", "\n".join(refs))
    data = tmp_path / "shared.bin"
    data.write_bytes(shared.data)
    ready, go = tmp_path / "ready", tmp_path / "go"
    store = docker_config.store
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_INGEST, str(store), shared.digest, str(shared.size)]
        + [str(path) for path in (data, ready, go)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    mark = registry.mark()
    batch = subprocess.Popen(
        [sys.executable, "-m", "fastpull", "pull", "-f", listing],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The image that does not need the held blob is stored while the blob is still held.
    while time.monotonic() < deadline and batch.poll() is None:
        if any(e["digest"] == other.manifest_digest for e in index_entries(store)):
            break
        time.sleep(0.02)
    assert [e["digest"] for e in index_entries(store)] == [other.manifest_digest]
    go.touch()
    _, err = batch.communicate(timeout=60)
    assert holder.wait(timeout=60) == 0, holder.stderr.read() if holder.stderr else ""

    assert batch.returncode == 0, err
    assert entry_for(store, refs[0])["digest"] == needs_it.manifest_digest
    gets = blob_gets(registry.requests(mark))
    assert shared.digest not in gets
    fetched = [needs_it.config_digest, needs_it.layers[1].digest, other.config_digest]
    assert sorted(gets) == sorted([*fetched, other.layers[0].digest])


@pytest.mark.parametrize("workers", ["0", "2"], ids=["inline", "processes"])
def test_a_blob_that_fails_mid_run_fails_alone_and_its_transfers_stop(
    servers: Any, cli: Any, tmp_path: Path, workers: str
) -> None:
    server = servers()
    good = make_image([make_layer(12 << 20, compression="none", seed=560)])
    bad = make_image([make_layer(12 << 20, compression="none", seed=561)])
    server.add_image("batch/app", "good", good)
    server.add_image("batch/app", "bad", bad)
    bad_path = server.blob_path("batch/app", bad.layers[0].digest)
    # The bad layer's first requests crawl; then the registry says it is gone. The engine
    # must drop those slow transfers and finish the good image, not wait for them.
    server.script(bad_path, Serve(rate=256 << 10, times=3), Respond(404, times=None))
    refs = [f"{server.host}/batch/app:good", f"{server.host}/batch/app:bad"]
    listing = _write(tmp_path, "list.txt", "\n".join(refs))
    report = tmp_path / "report.json"

    result = cli(
        "pull", "-f", listing, "--workers", workers, "--connections", "4", "--report", str(report)
    )

    assert result.code == 4, result.err
    statuses = {r["image"]: r["status"] for r in json.loads(report.read_text())["images"]}
    assert statuses == {refs[0]: "downloaded", refs[1]: "failed"}
    assert entry_for(env_store(), refs[0])["digest"] == good.manifest_digest
    assert not blob(env_store(), bad.layers[0].digest).exists()
    assert_store_consistent(env_store())
    bad_requests = server.requests_for(bad_path)
    # Three slow transfers were running when the 404 came; nothing was asked after it.
    assert [r.status for r in bad_requests] == [206, 206, 206, 404]
    good_path = server.blob_path("batch/app", good.layers[0].digest)
    spans = sorted(r.header("Range") or "" for r in server.requests_for(good_path))
    assert len(spans) == len(set(spans))  # every range of the good layer asked once
