"""``fastpull save``: what goes into the archive, byte for byte, and what is refused."""

from __future__ import annotations

import json
import os
import pty
import resource
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import blob, entry_for, env_store, one_line
from tests.support.images import Image, make_image, make_index, make_layer

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def read_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(name)
        assert member is not None, name
        return member.read()


def read_json(archive: Path, name: str) -> Any:
    return json.loads(read_member(archive, name))


@pytest.fixture
def pair(registry: Any, repo: str, cli: Any) -> tuple[str, Image, str, Image]:
    """Two images sharing a base layer (one OCI, one Docker format), pulled into the store:
    (ref, image) of each."""
    base = make_layer({"etc/os-release": b"ID=archive\n"}, seed=300)
    one = make_image([base, make_layer({"one.txt": b"one\n"}, seed=301)])
    two = make_image([base, make_layer({"two.txt": b"two\n"}, seed=302)], format="docker")
    registry.pusher.push_image(repo, "one", one)
    registry.pusher.push_image(repo, "two", two)
    refs = f"{registry.host}/{repo}:one", f"{registry.host}/{repo}:two"
    for ref in refs:
        assert cli("pull", ref).code == 0
    return refs[0], one, refs[1], two


def test_save_writes_docker_25_layout_deterministically(
    registry: Any, repo: str, cli: Any, tmp_path: Path, pair: tuple[str, Image, str, Image]
) -> None:
    ref_one, one, ref_two, two = pair
    store = env_store()
    archive = tmp_path / "both.tar"
    result = cli("save", "-o", str(archive), ref_one, ref_two)
    assert result.code == 0, result.err
    assert result.out == ""

    found = members(archive)
    names = list(found)
    assert names == sorted(names)
    for info in found.values():
        assert info.isreg(), info.name
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
        assert info.mode == 0o644
    blobs = [n for n in names if n.startswith("blobs/")]
    assert names == [*blobs, "index.json", "manifest.json", "oci-layout", "repositories"]
    # Shared base layer once; every blob byte for byte as stored.
    assert len(blobs) == len(set(blobs))
    for name in blobs:
        digest = "sha256:" + name.rsplit("/", 1)[1]
        assert read_member(archive, name) == blob(store, digest).read_bytes()
    base = one.layers[0].digest
    assert f"blobs/sha256/{base.split(':')[1]}" in found

    assert read_json(archive, "oci-layout") == {"imageLayoutVersion": "1.0.0"}
    index = read_json(archive, "index.json")
    assert index["mediaType"] == OCI_INDEX
    by_name = {e["annotations"]["io.containerd.image.name"]: e for e in index["manifests"]}
    assert set(by_name) == {ref_one, ref_two}
    for ref, entry in by_name.items():
        assert "platform" not in entry
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == ref
        stored = entry_for(store, ref)
        assert entry["digest"] == stored["digest"]
    docker = read_json(archive, "manifest.json")
    by_tag = {item["RepoTags"][0]: item for item in docker}
    assert set(by_tag) == {ref_one, ref_two}
    for ref, image in ((ref_one, one), (ref_two, two)):
        item = by_tag[ref]
        assert item["Config"] == "blobs/sha256/" + image.config_digest.split(":")[1]
        assert item["Layers"] == ["blobs/sha256/" + la.digest.split(":")[1] for la in image.layers]
    repositories = read_json(archive, "repositories")
    assert repositories[f"{registry.host}/{repo}"]["one"] == one.layers[-1].diff_id.split(":")[1]

    again = tmp_path / "again.tar"
    assert cli("save", "-o", str(again), ref_two, ref_one).code == 0
    assert again.read_bytes() == archive.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_save_oci_format_and_bare_name_saves_every_tag(
    registry: Any, repo: str, cli: Any, tmp_path: Path, pair: tuple[str, Image, str, Image]
) -> None:
    ref_one, _, ref_two, _ = pair
    archive = tmp_path / "oci.tar"
    assert cli("save", "--format", "oci", "-o", str(archive), f"{registry.host}/{repo}").code == 0
    names = set(members(archive))
    assert "manifest.json" not in names and "repositories" not in names
    index = read_json(archive, "index.json")
    saved = {e["annotations"]["io.containerd.image.name"] for e in index["manifests"]}
    assert saved == {ref_one, ref_two}


def test_save_refuses_missing_image_and_missing_platform(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    base = make_layer({"a": b"a\n"}, seed=310)
    amd = make_image([base])
    arm = make_image([make_layer({"b": b"b\n"}, seed=311)], architecture="arm64")
    registry.pusher.push_index(repo, "multi", make_index([amd, arm]))
    ref = f"{registry.host}/{repo}:multi"
    assert cli("pull", "--platform", "all", ref).code == 0
    archive = tmp_path / "x.tar"

    missing = cli("save", "-o", str(archive), f"{registry.host}/{repo}:nope")
    one_line(missing.err)
    assert missing.code == 4
    assert "reference does not exist" in missing.err
    assert not archive.exists()

    wrong = cli("save", "--platform", "linux/s390x", "-o", str(archive), ref)
    one_line(wrong.err)
    assert wrong.code == 4
    assert "linux/s390x" in wrong.err and "linux/arm64" in wrong.err
    assert not archive.exists()

    assert cli("save", "--platform", "linux/arm64", "-o", str(archive), ref).code == 0
    (entry,) = read_json(archive, "index.json")["manifests"]
    assert entry["digest"] == arm.manifest_digest
    (item,) = read_json(archive, "manifest.json")
    assert item["Config"].endswith(arm.config_digest.split(":")[1])

    everything = tmp_path / "all.tar"
    assert cli("save", "--platform", "all", "-o", str(everything), ref).code == 0
    (entry,) = read_json(everything, "index.json")["manifests"]
    assert entry["mediaType"] == OCI_INDEX
    assert entry["digest"] == entry_for(env_store(), ref)["digest"]
    names = set(members(everything))
    for image in (amd, arm):
        digests = [image.manifest_digest, image.config_digest, *(x.digest for x in image.layers)]
        for digest in digests:
            assert "blobs/sha256/" + digest.split(":")[1] in names
    # manifest.json holds one platform: this machine's.
    (item,) = read_json(everything, "manifest.json")
    assert item["Config"].endswith(amd.config_digest.split(":")[1])


def _run_fastpull(args: list[str], **options: Any) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "fastpull", *args], env=env, timeout=60, **options)


def _run_save(args: list[str], **options: Any) -> subprocess.CompletedProcess[bytes]:
    return _run_fastpull(["save", *args], **options)


def test_save_refuses_a_terminal_and_removes_a_partial_file(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    ref = f"{registry.host}/{repo}:big"
    registry.pusher.push_image(repo, "big", make_image([make_layer(256 << 10, seed=320)]))
    assert cli("pull", ref).code == 0

    leader, follower = pty.openpty()
    try:
        done = _run_save([ref], stdout=follower, stderr=subprocess.PIPE)
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 2
    assert b"refusing to save to a terminal" in done.stderr
    leader, follower = pty.openpty()
    try:
        done = _run_fastpull(["load"], stdin=follower, capture_output=True)
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 2
    assert b"is a terminal" in done.stderr

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = tmp_path / "out"
    out.mkdir()
    done = _run_save(["-o", str(out / "x.tar"), ref], preexec_fn=small_files, capture_output=True)
    assert done.returncode == 1, done.stderr
    assert b"partial archive was removed" in done.stderr
    assert b"Traceback" not in done.stderr
    assert list(out.iterdir()) == []

    full = _run_save(["-o", "/dev/full", ref], capture_output=True)
    assert full.returncode == 1
    assert b"No space left on device" in full.stderr

    piped = _run_save([ref], capture_output=True)
    assert piped.returncode == 0, piped.stderr
    streamed = tmp_path / "streamed.tar"
    streamed.write_bytes(piped.stdout)
    assert cli("save", "-o", str(tmp_path / "file.tar"), ref).code == 0
    assert streamed.read_bytes() == (tmp_path / "file.tar").read_bytes()
    # What a pipe carries loads from standard input.
    target = tmp_path / "piped-store"
    done = _run_fastpull(["load", "--store", str(target)], input=piped.stdout, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"Loaded image: {ref}\n"


def _image_rows(cli: Any, store: Path) -> list[dict[str, Any]]:
    listed = cli("images", "--format", "json", "--store", str(store))
    assert listed.code == 0, listed.err
    rows = [json.loads(line) for line in listed.lines]
    for row in rows:
        row.pop("CreatedAt")
    return rows


def test_round_trip_into_an_empty_store(
    registry: Any, repo: str, cli: Any, tmp_path: Path, pair: tuple[str, Image, str, Image]
) -> None:
    ref_one, _, ref_two, _ = pair
    arm_amd = make_index(
        [
            make_image([make_layer({"m": b"amd\n"}, seed=330)]),
            make_image([make_layer({"m": b"arm\n"}, seed=331)], architecture="arm64"),
        ]
    )
    registry.pusher.push_index(repo, "multi", arm_amd)
    ref_multi = f"{registry.host}/{repo}:multi"
    assert cli("pull", "--platform", "all", ref_multi).code == 0
    archive = tmp_path / "all.tar"
    saved = cli("save", "--platform", "all", "-o", str(archive), ref_one, ref_two, ref_multi)
    assert saved.code == 0, saved.err

    target = tmp_path / "loaded"
    loaded = cli("load", "-i", str(archive), "--store", str(target))
    assert loaded.code == 0, loaded.err
    familiar = sorted(line.removeprefix("Loaded image: ") for line in loaded.lines)
    assert familiar == sorted(f"{registry.host}/{repo}:{t}" for t in ("one", "two", "multi"))
    verified = cli("verify", "--store", str(target))
    assert verified.code == 0, verified.out + verified.err
    assert _image_rows(cli, target) == _image_rows(cli, env_store())
    for ref in (ref_one, ref_two, ref_multi):
        assert entry_for(target, ref) == entry_for(env_store(), ref)
    assert not list((target / "ingest").iterdir())

    # Loading again changes nothing; a gzip-compressed archive loads the same.
    compressed = tmp_path / "all.tar.gz"
    subprocess.run(["gzip", "-k", str(archive)], check=True)
    assert compressed.exists()
    before = (target / "index.json").read_bytes()
    assert cli("load", "-i", str(compressed), "--store", str(target)).code == 0
    assert json.loads((target / "index.json").read_bytes()) == json.loads(before)


# Runs fastpull, then reports the process's own high-water mark (VmHWM belongs to the
# process image since exec; ru_maxrss would include the forked test process).
_MEASURED = """
import re, sys
from fastpull.cli.commands import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read()
print(re.search(r"VmHWM:\\s+(\\d+) kB", status)[1], file=sys.stderr)
sys.exit(code)
"""


def _peak_rss_mib(args: list[str]) -> float:
    """Run ``fastpull ARGS`` to completion; its peak resident memory in MiB."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stderr.split()[-1]) / 1024


def test_save_and_load_memory_does_not_grow_with_the_image(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    # 128 MiB in one layer; both commands stay far below it (the interpreter alone is ~35).
    layer = make_layer(128 << 20, seed=340, compression="none", workdir=tmp_path)
    registry.pusher.push_image(repo, "big", make_image([layer]))
    ref = f"{registry.host}/{repo}:big"
    assert cli("pull", ref).code == 0
    archive = tmp_path / "big.tar"
    saving = _peak_rss_mib(["save", "-o", str(archive), ref])
    assert saving < 64
    assert archive.stat().st_size > 128 << 20
    loaded = tmp_path / "loaded"
    loading = _peak_rss_mib(["load", "-i", str(archive), "--store", str(loaded)])
    assert loading < 64
    assert (loaded / "blobs/sha256" / layer.digest[7:]).stat().st_size == layer.size
