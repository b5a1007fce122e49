"""`fastpull push` and `fastpull copy` between two real registries (Debian's
docker-registry): what moves, what is mounted, what the destination ends up holding."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from fastpull import mirror
from fastpull.errors import DigestMismatch
from fastpull.pusher import Pusher
from fastpull.reference import Reference
from fastpull.registry.client import RegistryClient
from fastpull.registry.credentials import CredentialStore
from fastpull.registry.responses import RetryPolicy
from fastpull.registry.settings import Settings
from fastpull.registry.transport import Transport
from fastpull.registry.upload import MOUNTED, PUSHED, BlobFile, PushAuth, Uploader
from fastpull.store.layout import Store
from fastpull.types import Descriptor, Digest
from tests.conftest import _serve
from tests.integration.conftest import (
    assert_store_consistent,
    blob,
    entry_for,
    env_store,
    one_line,
    start_fastpull,
)
from tests.support.faultproxy import (
    CutUpload,
    ExpireToken,
    Flip,
    Redirect,
    SetHeaders,
    Stall,
    blob_path,
)
from tests.support.images import Image, Layer, PushError, make_image, make_index, make_layer
from tests.support.netutil import free_loopback_port
from tests.support.registry import LoggedRequest, RegistryServer
from tests.support.tools import require_tool


@pytest.fixture(scope="module")
def dest_registry() -> Iterator[RegistryServer]:
    """A second plain-HTTP registry without auth: the destination of copies and pushes."""
    yield from _serve()


def _short(digest: str) -> str:
    return digest.split(":", 1)[1][:12]


def _uploads(requests: list[LoggedRequest]) -> list[LoggedRequest]:
    """Requests that carry blob bytes (PUT/PATCH on an upload session)."""
    return [r for r in requests if r.method in ("PUT", "PATCH") and "/blobs/uploads/" in r.path]


def _mounts(requests: list[LoggedRequest]) -> list[LoggedRequest]:
    return [r for r in requests if r.method == "POST" and "mount=" in r.path and r.status == 201]


def _pulled(cli: Any, registry: RegistryServer, repo: str, tag: str, image: Image) -> str:
    registry.pusher.push_image(repo, tag, image)
    ref = f"{registry.host}/{repo}:{tag}"
    result = cli("pull", ref)
    assert result.code == 0, result.err
    return ref


def _raw_manifest(registry: Any, repo: str, reference: str, creds: str | None = None) -> bytes:
    """What skopeo reads back from the registry (or a proxy: anything with ``host``)."""
    skopeo = require_tool("skopeo")
    separator = "@" if reference.startswith("sha256:") else ":"
    return subprocess.run(
        [
            skopeo,
            "inspect",
            "--raw",
            "--tls-verify=false",
            *(["--creds", creds] if creds else []),
            f"docker://{registry.host}/{repo}{separator}{reference}",
        ],
        check=True,
        capture_output=True,
    ).stdout


def test_push_prints_docker_lines_then_a_second_push_moves_no_blob(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    layers = [make_layer(300_000, seed=501), make_layer(2000, seed=502)]
    image = make_image(layers)
    ref = _pulled(cli, registry, repo, "1", image)
    dest = f"{dest_registry.host}/{repo}:1"

    mark = dest_registry.mark()
    result = cli("push", ref, dest)

    assert result.code == 0, result.err
    assert result.lines[0] == f"The push refers to repository [{dest_registry.host}/{repo}]"
    for layer in layers:
        assert f"{_short(layer.digest)}: Preparing" in result.lines
        assert f"{_short(layer.digest)}: Pushed" in result.lines
    size = len(image.manifest_bytes)
    assert result.lines[-1] == f"1: digest: {image.manifest_digest} size: {size}"
    sent = _uploads(dest_registry.requests(mark))
    assert sum(r.status == 201 for r in sent) == 3  # config and two layers
    assert _raw_manifest(dest_registry, repo, "1") == image.manifest_bytes

    mark = dest_registry.mark()
    again = cli("push", ref, dest)

    assert again.code == 0, again.err
    for layer in layers:
        assert f"{_short(layer.digest)}: Layer already exists" in again.lines
    assert _uploads(dest_registry.requests(mark)) == []
    assert [r.method for r in dest_registry.requests(mark) if "/blobs/uploads/" in r.path] == []


def _put_digests(requests: list[LoggedRequest]) -> list[str]:
    """The digest of every upload the registry completed (its final PUT)."""
    return [
        unquote(r.path.split("digest=", 1)[1].split("&", 1)[0])
        for r in _uploads(requests)
        if r.method == "PUT" and r.status == 201
    ]


def _sharing_a_base(seed: int) -> tuple[Layer, Image, Image]:
    """A base layer and two images made of it and a small layer of their own."""
    base = make_layer(200_000, seed=seed)
    first = make_image([base, make_layer(1000, seed=seed + 1)])
    second = make_image([base, make_layer(1000, seed=seed + 2)])
    return base, first, second


def test_a_second_image_sharing_layers_is_mounted_not_uploaded(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    base, first, second = _sharing_a_base(511)
    one = _pulled(cli, registry, repo, "one", first)
    two = _pulled(cli, registry, repo, "two", second)
    assert cli("push", one, f"{dest_registry.host}/{repo}/a:1").code == 0

    mark = dest_registry.mark()
    result = cli("push", two, f"{dest_registry.host}/{repo}/b:1")

    assert result.code == 0, result.err
    assert f"{_short(base.digest)}: Mounted from {repo}/a" in result.lines
    logged = dest_registry.requests(mark)
    assert base.digest not in _put_digests(logged)
    assert [unquote(r.path) for r in _mounts(logged)] == [
        f"/v2/{repo}/b/blobs/uploads/?mount={base.digest}&from={repo}/a"
    ]
    assert _raw_manifest(dest_registry, f"{repo}/b", "1") == second.manifest_bytes


def test_a_later_copy_mounts_what_an_earlier_run_placed_in_another_repository(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    base, first, second = _sharing_a_base(521)
    registry.pusher.push_image(repo, "one", first)
    registry.pusher.push_image(repo, "two", second)
    dest = dest_registry.host
    assert cli("copy", f"{registry.host}/{repo}:one", f"{dest}/{repo}/a:1").code == 0

    # Another run (nothing of the first is in memory): the store remembers where it put the
    # base layer, so the new repository mounts it instead of being sent it again.
    mark = dest_registry.mark()
    result = cli("copy", f"{registry.host}/{repo}:two", f"{dest}/{repo}/b:1")

    assert result.code == 0, result.err
    logged = dest_registry.requests(mark)
    assert base.digest not in _put_digests(logged)
    assert [unquote(r.path) for r in _mounts(logged)] == [
        f"/v2/{repo}/b/blobs/uploads/?mount={base.digest}&from={repo}/a"
    ]
    assert _raw_manifest(dest_registry, f"{repo}/b", "1") == second.manifest_bytes
    assert (env_store() / "placements.jsonl").is_file()
    assert_store_consistent(env_store())


def test_a_remembered_holder_that_lost_the_blob_costs_an_upload_not_a_failure(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    layer = make_layer(200_000, seed=531)
    image = make_image([layer])
    registry.pusher.push_image(repo, "1", image)
    assert cli("pull", f"{registry.host}/{repo}:1").code == 0
    # A stale memory: a repository that never got the blob (deleted since, say).
    line = {"registry": dest_registry.host, "repository": f"{repo}/gone", "digest": layer.digest}
    (env_store() / "placements.jsonl").write_text(json.dumps(line) + "\n")

    mark = dest_registry.mark()
    result = cli("copy", f"{registry.host}/{repo}:1", f"{dest_registry.host}/{repo}/c:1")

    assert result.code == 0, result.err
    logged = dest_registry.requests(mark)
    assert layer.digest in _put_digests(logged)
    assert _raw_manifest(dest_registry, f"{repo}/c", "1") == image.manifest_bytes


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_multi_platform_copy_is_byte_for_byte_at_the_destination(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any, fmt: str
) -> None:
    base = make_layer(50_000, seed=520, format=fmt)
    amd = make_image([base, make_layer(100, seed=521, format=fmt)], format=fmt)
    arm = make_image(
        [base, make_layer(200, seed=522, format=fmt)], architecture="arm64", format=fmt
    )
    index = make_index([amd, arm], format=fmt)
    registry.pusher.push_index(repo, "multi", index)

    result = cli(
        "copy",
        "--platform",
        "all",
        f"{registry.host}/{repo}:multi",
        f"{dest_registry.host}/{repo}:multi",
    )

    assert result.code == 0, result.err
    assert result.lines[:2] == [
        f"multi: Pulling from {repo}",
        f"The push refers to repository [{dest_registry.host}/{repo}]",
    ]
    size = len(index.manifest_bytes)
    assert result.lines[-1] == f"multi: digest: {index.manifest_digest} size: {size}"
    assert _raw_manifest(dest_registry, repo, "multi") == index.manifest_bytes
    for image in (amd, arm):
        raw = _raw_manifest(dest_registry, repo, image.manifest_digest)
        assert raw == image.manifest_bytes


def test_copying_some_platforms_pushes_the_index_the_store_made(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    amd = make_image([make_layer(100, seed=531)])
    arm = make_image([make_layer(200, seed=532)], architecture="arm64")
    s390 = make_image([make_layer(300, seed=533)], architecture="s390x")
    registry.pusher.push_index(repo, "3", make_index([amd, arm, s390]))
    source = f"{registry.host}/{repo}:3"

    result = cli(
        "copy", "--platform", "linux/amd64,linux/arm64", source, f"{dest_registry.host}/{repo}:2"
    )

    assert result.code == 0, result.err
    stored = entry_for(env_store(), source)
    pushed = _raw_manifest(dest_registry, repo, "2")
    assert pushed == blob(env_store(), stored["digest"]).read_bytes()
    listed = [m["digest"] for m in json.loads(pushed)["manifests"]]
    assert listed == [amd.manifest_digest, arm.manifest_digest]


def test_an_upload_broken_off_mid_blob_is_sent_again_and_nothing_else(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any, proxies: Any
) -> None:
    layers = [make_layer(400_000, seed=541), make_layer(300_000, seed=542)]
    image = make_image(layers)
    ref = _pulled(cli, registry, repo, "1", image)
    proxy = proxies(dest_registry)
    # One upload at a time, config first: the second PUT is the first layer's.
    proxy.on(r"/v2/.+/blobs/uploads/.+", CutUpload(after=100_000), method="PUT", first=2)

    result = cli("push", "--jobs", "1", ref, f"{proxy.host}/{repo}:1")

    assert result.code == 0, result.err
    # Submitted while two uploads were unfinished, with one slot: it waited, as docker says.
    assert f"{_short(layers[1].digest)}: Waiting" in result.lines
    puts = proxy.requests_for(r"/v2/.+/blobs/uploads/.+", "PUT")
    cut = puts[1]
    assert isinstance(cut.action, CutUpload) and cut.body_received == 100_000
    broken = unquote(cut.target.split("digest=", 1)[1])
    assert broken == layers[0].digest
    sizes = {b.digest: len(b.data) for b in image.referenced_blobs()}
    sent = [int(r.header("Content-Length") or 0) for r in puts]
    assert sum(sent) == sum(sizes.values()) + sizes[broken]
    assert _raw_manifest(dest_registry, repo, "1") == image.manifest_bytes


def test_chunked_upload_patches_in_order_from_the_latest_location(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    layer = make_layer(2_500_000, seed=545)
    image = make_image([layer])
    ref = _pulled(cli, registry, repo, "1", image)

    mark = dest_registry.mark()
    result = cli("push", "--chunk-size", str(1 << 20), ref, f"{dest_registry.host}/{repo}:1")

    assert result.code == 0, result.err
    patches = [r for r in _uploads(dest_registry.requests(mark)) if r.method == "PATCH"]
    assert [r.status for r in patches] == [202, 202, 202]
    assert _raw_manifest(dest_registry, repo, "1") == image.manifest_bytes


def test_push_to_basic_auth_registry_with_login(
    registry: Any, basic_registry: RegistryServer, repo: str, cli: Any, docker_config: Any
) -> None:
    image = make_image([make_layer(5000, seed=551)])
    ref = _pulled(cli, registry, repo, "1", image)
    dest = f"{basic_registry.host}/{repo}:1"

    anonymous = cli("push", ref, dest)
    assert anonymous.code == 3
    assert "authentication required" in one_line(anonymous.err)
    assert f"fastpull login {basic_registry.host}" in anonymous.err

    docker_config.add_auth(
        basic_registry.host, username=basic_registry.username, password=basic_registry.password
    )
    result = cli("push", ref, dest)
    assert result.code == 0, result.err
    assert basic_registry.pusher.blob_exists(repo, image.layers[0].digest)


def test_push_to_token_registry_asks_push_scopes_and_mounts_with_source_pull(
    registry: Any, token_registry: RegistryServer, repo: str, cli: Any, docker_config: Any
) -> None:
    layer = make_layer(5000, seed=561)
    first = make_image([layer])
    second = make_image([layer, make_layer(100, seed=562)])
    one = _pulled(cli, registry, repo, "1", first)
    two = _pulled(cli, registry, repo, "2", second)
    docker_config.add_auth(
        token_registry.host, username=token_registry.username, password=token_registry.password
    )
    ca = str(token_registry.ca_path)
    assert cli("push", "--ca-cert", ca, one, f"{token_registry.host}/{repo}/a:1").code == 0

    result = cli("push", "--ca-cert", ca, two, f"{token_registry.host}/{repo}/b:1")

    assert result.code == 0, result.err
    assert f"{_short(layer.digest)}: Mounted from {repo}/a" in result.lines
    scopes = {s for r in token_registry.token_server.requests for s in r.scopes}
    assert f"repository:{repo}/b:pull,push" in scopes
    assert f"repository:{repo}/a:pull" in scopes


def test_denied_push_is_exit_3_with_one_line(
    registry: Any, token_registry: RegistryServer, repo: str, cli: Any, docker_config: Any
) -> None:
    image = make_image([make_layer(3000, seed=571)])
    ref = _pulled(cli, registry, repo, "1", image)
    assert token_registry.token_server is not None
    token_registry.token_server.policy.acl = {token_registry.username: {"*": ["pull"]}}
    docker_config.add_auth(
        token_registry.host, username=token_registry.username, password=token_registry.password
    )

    result = cli(
        "push", "--ca-cert", str(token_registry.ca_path), ref, f"{token_registry.host}/{repo}:1"
    )

    assert result.code == 3
    assert one_line(result.err) == (
        f"Error: denied: requested access to the resource is denied (push to {repo})"
    )


def test_batch_copy_fails_the_missing_image_alone_and_mounts_what_images_share(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any, tmp_path: Path
) -> None:
    base = make_layer(100_000, seed=581)
    first = make_image([base, make_layer(1000, seed=582)])
    second = make_image([base, make_layer(1000, seed=583)])
    registry.pusher.push_image(f"{repo}/a", "1", first)
    registry.pusher.push_image(f"{repo}/b", "1", second)
    batch = tmp_path / "batch.json"
    batch.write_text(
        json.dumps(
            [
                f"{registry.host}/{repo}/a:1",
                f"{registry.host}/{repo}/missing:1",
                {"image": f"{registry.host}/{repo}/b:1", "to": f"{dest_registry.host}/elsewhere"},
            ]
        )
    )
    report = tmp_path / "report.json"

    mark = dest_registry.mark()
    result = cli(
        "copy", "-f", str(batch), "--to", f"{dest_registry.host}/mirror", "--report", str(report)
    )

    assert result.code == 4, result.err
    assert "Traceback" not in result.err
    assert result.err.splitlines() == [
        f"Error: {registry.host}/{repo}/missing:1: manifest for "
        f"{registry.host}/{repo}/missing:1 not found: manifest unknown",
        "Error: 1 of 3 images failed",
    ]
    document = json.loads(report.read_text())
    statuses = [(i["image"], i["status"]) for i in document["images"]]
    assert statuses == [
        (f"{registry.host}/{repo}/a:1", "copied"),
        (f"{registry.host}/{repo}/missing:1", "failed"),
        (f"{registry.host}/{repo}/b:1", "copied"),
    ]
    assert [i["destination"] for i in document["images"]][::2] == [
        f"{dest_registry.host}/mirror/{repo}/a:1",
        f"{dest_registry.host}/elsewhere:1",
    ]
    assert any(line.startswith("IMAGE") for line in result.lines)
    assert _raw_manifest(dest_registry, f"mirror/{repo}/a", "1") == first.manifest_bytes
    assert _raw_manifest(dest_registry, "elsewhere", "1") == second.manifest_bytes
    # The shared layer went up once; the other image mounted it.
    logged = dest_registry.requests(mark)
    assert _put_digests(logged).count(base.digest) == 1
    assert document["summary"]["blobs_mounted"] == 1
    # Mounted from a repository this run put it in: straight away, without a HEAD first.
    heads = [r.path for r in logged if r.method == "HEAD" and r.path.endswith(base.digest)]
    assert len(heads) == 1, heads
    unique = {b.digest: len(b.data) for i in (first, second) for b in i.referenced_blobs()}
    assert document["summary"]["bytes_uploaded"] == sum(unique.values())


def test_ctrl_c_during_a_copy_leaves_the_store_consistent_and_the_next_copy_completes(
    registry: Any,
    dest_registry: RegistryServer,
    repo: str,
    proxies: Any,
    docker_config: Any,
) -> None:
    layers = [make_layer(300_000, seed=591), make_layer(200_000, seed=592)]
    image = make_image(layers)
    registry.pusher.push_image(repo, "1", image)
    proxy = proxies(dest_registry)
    # Every upload hangs mid-body, so the copy is surely uploading when Ctrl-C comes.
    proxy.on(
        r"/v2/.+/blobs/uploads/.+", CutUpload(after=50_000, stall=True), method="PUT", times=None
    )
    source = f"{registry.host}/{repo}:1"
    proc = start_fastpull("copy", source, f"{proxy.host}/{repo}:1")
    try:
        deadline = time.monotonic() + 30
        while not proxy.requests_for(r"/v2/.+/blobs/uploads/.+", "PUT"):
            assert time.monotonic() < deadline, "no upload was ever started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert code == 130, err
    assert err.startswith("Error: interrupted") and err.count("\n") == 1, err
    assert_store_consistent(docker_config.store)

    again = subprocess.run(
        [sys.executable, "-m", "fastpull", "copy", source, f"{dest_registry.host}/{repo}:1"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert again.returncode == 0, again.stderr
    assert _raw_manifest(dest_registry, repo, "1") == image.manifest_bytes
    assert_store_consistent(docker_config.store)


def test_copy_no_keep_removes_what_it_added_and_keeps_what_was_there(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    kept = make_image([make_layer(1000, seed=601)])
    dropped = make_image([make_layer(1000, seed=602)])
    already = _pulled(cli, registry, repo, "kept", kept)
    registry.pusher.push_image(repo, "dropped", dropped)
    fresh = f"{registry.host}/{repo}:dropped"

    for source, tag in ((already, "kept"), (fresh, "dropped")):
        result = cli("copy", "--no-keep", source, f"{dest_registry.host}/{repo}:{tag}")
        assert result.code == 0, result.err

    names = [e["annotations"]["org.opencontainers.image.ref.name"] for e in _entries()]
    assert names == [already]
    assert blob(env_store(), kept.layers[0].digest).exists()
    assert not blob(env_store(), dropped.layers[0].digest).exists()
    assert not blob(env_store(), dropped.manifest_digest).exists()
    assert _raw_manifest(dest_registry, repo, "dropped") == dropped.manifest_bytes


def test_copy_all_tags_copies_every_tag_of_the_repository(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    images = {tag: make_image([make_layer(700, seed=850 + i)]) for i, tag in enumerate("ab")}
    for tag, image in images.items():
        registry.pusher.push_image(repo, tag, image)
    target = f"{dest_registry.host}/{repo}/copy"

    result = cli("copy", "--all-tags", f"{registry.host}/{repo}", target)

    assert result.code == 0, result.err
    for tag, image in images.items():
        assert _raw_manifest(dest_registry, f"{repo}/copy", tag) == image.manifest_bytes
    refused = cli("copy", "--all-tags", f"{registry.host}/{repo}:a", target)
    assert refused.code == 2
    assert "tag can't be used with --all-tags" in one_line(refused.err)


def _entries() -> list[dict[str, Any]]:
    return json.loads((env_store() / "index.json").read_text())["manifests"]


def test_push_all_tags_pushes_every_tag_the_store_holds(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    images = {tag: make_image([make_layer(500, seed=610 + i)]) for i, tag in enumerate("ab")}
    for tag, image in images.items():
        _pulled(cli, registry, repo, tag, image)

    result = cli("push", "--all-tags", f"{registry.host}/{repo}", f"{dest_registry.host}/{repo}")

    assert result.code == 0, result.err
    for tag, image in images.items():
        assert _raw_manifest(dest_registry, repo, tag) == image.manifest_bytes
    refused = cli("push", "--all-tags", f"{registry.host}/{repo}:a")
    assert refused.code == 2
    assert "tag can't be used with --all-tags" in one_line(refused.err)


def test_batch_copy_no_keep_leaves_no_image_and_no_blob_behind(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any, tmp_path: Path
) -> None:
    images = [make_image([make_layer(3000, seed=620 + n)]) for n in range(2)]
    for n, image in enumerate(images):
        registry.pusher.push_image(f"{repo}/{n}", "1", image)
    batch = tmp_path / "batch.txt"
    batch.write_text("".join(f"{registry.host}/{repo}/{n}:1\n" for n in range(2)))

    result = cli("copy", "--no-keep", "-f", str(batch), "--to", f"{dest_registry.host}/keepless")

    assert result.code == 0, result.err
    assert _entries() == []
    assert [p for p in (env_store() / "blobs").rglob("*") if p.is_file()] == []
    for n, image in enumerate(images):
        assert _raw_manifest(dest_registry, f"keepless/{repo}/{n}", "1") == image.manifest_bytes


def test_a_token_expiring_mid_push_is_renewed_and_the_upload_sent_again(
    registry: Any,
    token_registry: RegistryServer,
    repo: str,
    cli: Any,
    proxies: Any,
    docker_config: Any,
    tmp_path: Path,
) -> None:
    image = make_image([make_layer(50_000, seed=631), make_layer(40_000, seed=632)])
    ref = _pulled(cli, registry, repo, "1", image)
    # TLS like the registry, whose upload Locations say https.
    proxy = proxies(token_registry, tls=True)
    # Every token works once: each request after the first meets the registry's own 401.
    proxy.on(r"/v2/.+", ExpireToken(), method=None, times=None)
    docker_config.add_auth(
        proxy.host, username=token_registry.username, password=token_registry.password
    )
    cas = tmp_path / "cas.pem"
    cas.write_bytes(token_registry.ca_path.read_bytes() + Path(proxy.ca_path).read_bytes())

    result = cli(
        "push",
        "--jobs",
        "1",
        "--ca-cert",
        str(cas),
        ref,
        f"{proxy.host}/{repo}:1",
    )

    assert result.code == 0, result.err
    refused = [r for r in proxy.requests if r.status == 401 and r.method in ("PUT", "POST")]
    assert refused, "no upload request met an expired token"
    creds = f"{token_registry.username}:{token_registry.password}"
    assert _raw_manifest(proxy, repo, "1", creds) == image.manifest_bytes


def test_an_upload_location_on_another_origin_gets_no_credentials(
    registry: Any,
    basic_registry: RegistryServer,
    repo: str,
    cli: Any,
    proxies: Any,
    docker_config: Any,
) -> None:
    image = make_image([make_layer(20_000, seed=641)])
    ref = _pulled(cli, registry, repo, "1", image)
    user, password = basic_registry.username, basic_registry.password
    assert user is not None and password is not None
    front = proxies(basic_registry)
    # Another origin that reaches the registry with credentials of its own, as a storage
    # front end would; it records what the client sent it.
    other = proxies(basic_registry, upstream_headers={"Authorization": _basic(user, password)})
    uploads = rf"/v2/{repo}/blobs/uploads/"
    front.on(uploads, Redirect(f"{other.url}{uploads}"), method="POST", times=None)
    docker_config.add_auth(front.host, username=user, password=password)

    result = cli("push", ref, f"{front.host}/{repo}:1")

    assert result.code == 0, result.err
    moved = [r for r in other.requests if r.method in ("POST", "PUT")]
    assert {r.method for r in moved} == {"POST", "PUT"}
    assert all(r.header("Authorization") is None for r in moved)
    assert basic_registry.pusher.blob_exists(repo, image.layers[0].digest)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_docker_image_stored_as_oci_is_pushed_as_the_registry_served_it(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    image = make_image([make_layer(4000, seed=651, format="docker")], format="docker")
    ref = _pulled(cli, registry, repo, "d", image)
    stored = entry_for(env_store(), ref)
    assert stored["digest"] != image.manifest_digest  # the store keeps an OCI conversion

    result = cli("push", ref, f"{dest_registry.host}/{repo}:d")

    assert result.code == 0, result.err
    assert result.lines[-1].startswith(f"d: digest: {image.manifest_digest} ")
    assert _raw_manifest(dest_registry, repo, "d") == image.manifest_bytes


def test_a_declined_mount_falls_back_to_uploading_through_its_session(
    registry: Any, repo: str, cli: Any
) -> None:
    layer = make_layer(30_000, seed=661)
    image = make_image([layer])
    ref = _pulled(cli, registry, repo, "1", image)
    # The store names the image in repo, so a push to the same registry tries a mount from
    # there; with the blob gone from repo, the registry declines (202) and opens a session.
    registry.pusher.delete_blob(repo, layer.digest)

    mark = registry.mark()
    result = cli("push", ref, f"{registry.host}/{repo}-copy:1")

    assert result.code == 0, result.err
    assert f"{_short(layer.digest)}: Pushed" in result.lines
    logged = registry.requests(mark)
    mounts = [r for r in logged if r.method == "POST" and "mount=" in r.path]
    declined = [r.status for r in mounts if f"mount={layer.digest}" in unquote(r.path)]
    assert declined == [202]
    assert layer.digest in _put_digests(logged)
    assert _raw_manifest(registry, f"{repo}-copy", "1") == image.manifest_bytes


def test_an_upload_location_downgrading_to_plain_http_is_refused(
    registry: Any, repo: str, cli: Any, proxies: Any
) -> None:
    image = make_image([make_layer(1000, seed=671)])
    ref = _pulled(cli, registry, repo, "1", image)
    front = proxies(registry, tls=True)
    plain = f"http://{front.host}/v2/{repo}-tls/blobs/uploads/x"
    front.on(
        rf"/v2/{repo}-tls/blobs/uploads/",
        SetHeaders({"Location": plain}),
        method="POST",
        times=None,
    )

    result = cli("push", "--ca-cert", str(front.ca_path), ref, f"{front.host}/{repo}-tls:1")

    assert result.code == 5
    assert "to plain HTTP" in one_line(result.err)
    assert not [r for r in front.requests if r.method == "PUT"]


def test_without_pull_on_the_mount_source_the_blob_is_uploaded(
    registry: Any, token_registry: RegistryServer, repo: str, cli: Any, docker_config: Any
) -> None:
    layer = make_layer(6000, seed=681)
    one = _pulled(cli, registry, repo, "1", make_image([layer]))
    two = _pulled(cli, registry, repo, "2", make_image([layer, make_layer(100, seed=682)]))
    user = token_registry.username
    docker_config.add_auth(token_registry.host, username=user, password=token_registry.password)
    ca = str(token_registry.ca_path)
    assert cli("push", "--ca-cert", ca, one, f"{token_registry.host}/{repo}/a:1").code == 0
    assert token_registry.token_server is not None
    # Push rights on b only: the registry answers the mount from a with 401, not 202.
    token_registry.token_server.policy.acl = {user: {f"{repo}/b": ["pull", "push"]}}

    mark = token_registry.mark()
    result = cli("push", "--ca-cert", ca, two, f"{token_registry.host}/{repo}/b:1")

    assert result.code == 0, result.err
    assert f"{_short(layer.digest)}: Pushed" in result.lines
    mounts = [r for r in token_registry.requests(mark) if "mount=" in r.path]
    assert mounts and {r.status for r in mounts} == {401}
    assert token_registry.pusher.blob_exists(f"{repo}/b", layer.digest)


def test_a_second_copy_to_another_registry_downloads_nothing(
    registry: Any,
    dest_registry: RegistryServer,
    basic_registry: RegistryServer,
    repo: str,
    cli: Any,
    docker_config: Any,
    tmp_path: Path,
) -> None:
    image = make_image([make_layer(80_000, seed=691), make_layer(500, seed=692)])
    registry.pusher.push_image(repo, "1", image)
    source = f"{registry.host}/{repo}:1"
    total = sum(len(b.data) for b in image.referenced_blobs())
    report = tmp_path / "report.json"
    first = cli("copy", "--report", str(report), source, f"{dest_registry.host}/{repo}:1")
    assert first.code == 0, first.err
    summary = json.loads(report.read_text())["summary"]
    assert (summary["bytes_downloaded"], summary["bytes_uploaded"]) == (total, total)
    docker_config.add_auth(
        basic_registry.host, username=basic_registry.username, password=basic_registry.password
    )

    mark = registry.mark()
    result = cli("copy", "--report", str(report), source, f"{basic_registry.host}/{repo}:1")

    assert result.code == 0, result.err
    assert [r for r in registry.requests(mark) if "/blobs/" in r.path] == []
    summary = json.loads(report.read_text())["summary"]
    assert (summary["bytes_downloaded"], summary["bytes_uploaded"]) == (0, total)
    for layer in image.layers:
        assert basic_registry.pusher.blob_exists(repo, layer.digest)


def test_a_batch_copies_to_several_registries_at_once(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any, tmp_path: Path
) -> None:
    images = [make_image([make_layer(20_000, seed=700 + n)]) for n in range(2)]
    for n, image in enumerate(images):
        registry.pusher.push_image(f"{repo}/{n}", "1", image)
    targets = [f"{dest_registry.host}/spread/0", f"{registry.host}/{repo}/spread-1"]
    batch = tmp_path / "batch.json"
    batch.write_text(
        json.dumps([{"image": f"{registry.host}/{repo}/{n}:1", "to": targets[n]} for n in range(2)])
    )

    result = cli("copy", "-f", str(batch))

    assert result.code == 0, result.err
    assert _raw_manifest(dest_registry, "spread/0", "1") == images[0].manifest_bytes
    assert _raw_manifest(registry, f"{repo}/spread-1", "1") == images[1].manifest_bytes


def test_push_by_digest_creates_no_tag_and_a_wrong_digest_is_refused(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any
) -> None:
    image = make_image([make_layer(700, seed=711)])
    registry.pusher.push_image(repo, "1", image)
    pinned = f"{registry.host}/{repo}@{image.manifest_digest}"
    assert cli("pull", pinned).code == 0

    result = cli("push", pinned, f"{dest_registry.host}/{repo}@{image.manifest_digest}")

    assert result.code == 0, result.err
    digest = image.manifest_digest
    assert result.lines[-1] == f"{digest}: digest: {digest} size: {len(image.manifest_bytes)}"
    assert _raw_manifest(dest_registry, repo, digest) == image.manifest_bytes
    with pytest.raises(PushError, match="NAME_UNKNOWN"):  # 2.8.2: a repository with no tag
        dest_registry.pusher.list_tags(repo)
    wrong = f"{dest_registry.host}/{repo}@sha256:{'0' * 64}"
    refused = cli("push", pinned, wrong)
    assert refused.code == 2
    assert "push it by tag instead" in one_line(refused.err)


@pytest.mark.parametrize(
    ("reached", "asked", "resent"),
    # Nothing of the broken PATCH reached the registry: it confirms the offset, and only
    # that chunk goes again. Part of it did: distribution 2.8 drops the upload, and the
    # blob starts again from POST.
    [(False, [204], 1), (True, [404], 2)],
    ids=["registry-confirms-offset", "registry-dropped-upload"],
)
def test_a_chunked_upload_broken_off_asks_the_registry_where_it_stands(
    registry: Any,
    dest_registry: RegistryServer,
    repo: str,
    cli: Any,
    proxies: Any,
    reached: bool,
    asked: list[int],
    resent: int,
) -> None:
    layer = make_layer(2_500_000, seed=721 + int(reached))
    image = make_image([layer])
    ref = _pulled(cli, registry, repo, "1", image)
    proxy = proxies(dest_registry)
    sessions = r"/v2/.+/blobs/uploads/.+"
    proxy.on(sessions, CutUpload(after=200_000, forward=reached), method="PATCH", first=2)
    chunk = 1 << 20

    result = cli("push", "--jobs", "1", "--chunk-size", str(chunk), ref, f"{proxy.host}/{repo}:1")

    assert result.code == 0, result.err
    assert [r.status for r in proxy.requests_for(sessions, "GET")] == asked
    patches = proxy.requests_for(sessions, "PATCH")
    declared = sum(int(r.header("Content-Length") or 0) for r in patches)
    # Besides the blob once, the chunk that broke off; and when the upload was dropped,
    # the chunk before it too.
    assert declared == layer.size + resent * chunk
    assert _raw_manifest(dest_registry, repo, "1") == image.manifest_bytes


def test_copy_to_an_unreachable_registry_fails_before_downloading(
    registry: Any, repo: str, cli: Any
) -> None:
    registry.pusher.push_image(repo, "1", make_image([make_layer(9000, seed=731)]))
    closed = f"127.0.0.1:{free_loopback_port()}"

    mark = registry.mark()
    result = cli("copy", f"{registry.host}/{repo}:1", f"{closed}/{repo}:1")

    assert result.code == 5
    assert f"cannot reach registry {closed}" in one_line(result.err)
    assert [r for r in registry.requests(mark) if "/blobs/" in r.path] == []


def test_a_to_without_a_registry_is_refused_before_anything_moves(
    registry: Any, repo: str, cli: Any, tmp_path: Path
) -> None:
    registry.pusher.push_image(repo, "1", make_image([make_layer(900, seed=741)]))
    batch = tmp_path / "batch.txt"
    batch.write_text(f"{registry.host}/{repo}:1\n")

    mark = registry.mark()
    result = cli("copy", "-f", str(batch), "--to", "mirror")

    assert result.code == 2
    assert "expected REGISTRY[/PREFIX]" in one_line(result.err)
    assert registry.requests(mark) == []


# -- a large blob streams to the destination while it downloads -------------------------------

# The layer's first answer stops after this many bytes and goes silent for STALL_SECONDS (then
# the proxy drops it and the engine resumes): its download cannot end before that, while what
# came is hashed and may be streamed.
STALL_AFTER = 1_000_000
STALL_SECONDS = 3.0


@pytest.fixture
def streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blobs of 1 MiB and more stream (the default threshold would need 32 MiB layers)."""
    monkeypatch.setattr(mirror, "STREAM_MIN", 1 << 20)


def _stalled_source(registry: Any, proxies: Any, repo: str, seed: int) -> tuple[Any, Layer, Image]:
    """A 3 MB layer behind a proxy that stalls its first answer after STALL_AFTER bytes."""
    layer = make_layer(3_000_000, seed=seed)
    image = make_image([layer])
    registry.pusher.push_image(repo, "1", image)
    source = proxies(registry, max_response_seconds=STALL_SECONDS)
    source.on(blob_path(repo, layer.digest), Stall(after=STALL_AFTER))
    return source, layer, image


def _layer_states(out: str, digest: str) -> list[str]:
    """The states --json reported for one layer, in order."""
    found = []
    for line in out.splitlines():
        event = json.loads(line)
        if event["event"] == "layer" and event["digest"] == digest:
            found.append(event["status"])
    return found


def _assert_arrived(
    dest_registry: RegistryServer, repo: str, layer: Layer, image: Image, puts: Any = None
) -> None:
    """The layer and the image read back at the destination as they were; with ``puts``
    (the layer's PUTs through a proxy), in two of them: one broken off, one accepted."""
    if puts is not None:
        assert [p.status for p in puts][-1] == 201
        assert len(puts) == 2, [(p.status, p.body_received) for p in puts]
    assert dest_registry.blob_data_path(layer.digest).read_bytes() == layer.data
    assert _raw_manifest(dest_registry, repo, "1") == image.manifest_bytes


def _blob_puts(proxy: Any, repo: str, digest: str) -> list[Any]:
    """The upload PUTs for ``digest`` the destination proxy received (started or not)."""
    return [
        r
        for r in proxy.requests_for(rf"/v2/{repo}/blobs/uploads/.+", "PUT")
        if digest in unquote(r.target)
    ]


def test_a_large_blob_uploads_while_it_downloads(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any, proxies: Any, streaming: None
) -> None:
    source, layer, image = _stalled_source(registry, proxies, repo, seed=801)

    mark = dest_registry.mark()
    result = cli("copy", "--json", f"{source.host}/{repo}:1", f"{dest_registry.host}/{repo}:1")

    assert result.code == 0, result.err
    states = _layer_states(result.out, layer.digest)
    assert states.index("Pushing") < states.index("Download complete"), states
    assert _put_digests(dest_registry.requests(mark)).count(layer.digest) == 1
    _assert_arrived(dest_registry, repo, layer, image)


@pytest.mark.parametrize("fault", ["cut at the destination", "download restarted"])
def test_a_stream_broken_off_is_sent_again_whole(
    registry: Any,
    dest_registry: RegistryServer,
    repo: str,
    cli: Any,
    proxies: Any,
    streaming: None,
    fault: str,
) -> None:
    source, layer, image = _stalled_source(registry, proxies, repo, seed=811)
    # The config is there already, so the only upload is the layer's.
    dest_registry.pusher.push_blob(repo, image.config)
    dest = proxies(dest_registry)
    if fault == "cut at the destination":
        dest.on(r"/v2/.+/blobs/uploads/.+", CutUpload(after=500_000), method="PUT")
    else:
        # The layer's next answer carries a wrong byte: the digest does not match, and the
        # engine fetches the whole blob again (from byte 0) after streaming had begun.
        source.on(blob_path(repo, layer.digest), Flip(offset=100_000), first=2)

    result = cli("copy", f"{source.host}/{repo}:1", f"{dest.host}/{repo}:1")

    assert result.code == 0, result.err
    _assert_arrived(dest_registry, repo, layer, image, puts=_blob_puts(dest, repo, layer.digest))


def test_a_corrupt_source_blob_never_becomes_a_blob_at_the_destination(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any, proxies: Any, streaming: None
) -> None:
    source, layer, _ = _stalled_source(registry, proxies, repo, seed=831)
    source.on(blob_path(repo, layer.digest), Flip(offset=100_000), first=2, times=None)
    dest = proxies(dest_registry)

    result = cli("copy", f"{source.host}/{repo}:1", f"{dest.host}/{repo}:1")

    assert result.code == 6
    assert "digest" in one_line(result.err)
    puts = _blob_puts(dest, repo, layer.digest)
    assert puts, "the blob never streamed"
    assert 201 not in [p.status for p in puts]
    assert not dest_registry.blob_data_path(layer.digest).exists()


def test_the_registry_refuses_an_upload_whose_bytes_are_not_the_digest(
    dest_registry: RegistryServer, repo: str, tmp_path: Path, docker_config: Any
) -> None:
    # What a stream relies on, were it ever to send wrong bytes: the digest= of the final
    # PUT is checked by the registry, which then keeps nothing.
    wrong = tmp_path / "blob"
    wrong.write_bytes(b"not the bytes of the digest" * 1000)
    digest = Digest.parse("sha256:" + "ab" * 32)
    descriptor = Descriptor("application/octet-stream", digest, wrong.stat().st_size)
    registry = dest_registry.host
    with Transport() as handshakes, Transport() as uploads:
        client = RegistryClient(
            registry,
            settings=Settings(),
            credentials=CredentialStore().get(registry),
            transport=handshakes,
        )
        uploader = Uploader(PushAuth(client), uploads, retry=RetryPolicy(attempts=1))
        with pytest.raises(DigestMismatch):
            uploader.upload(repo, BlobFile(descriptor, wrong))
    assert not dest_registry.blob_data_path(str(digest)).exists()


def test_ctrl_c_while_a_blob_streams_leaves_the_store_consistent_and_the_next_copy_completes(
    registry: Any,
    dest_registry: RegistryServer,
    repo: str,
    cli: Any,
    proxies: Any,
    streaming: None,
) -> None:
    source, layer, image = _stalled_source(registry, proxies, repo, seed=841)
    dest = proxies(dest_registry)
    streamed = threading.Event()

    def interrupt_once_streaming() -> None:
        deadline = time.monotonic() + 20
        while not _blob_puts(dest, repo, layer.digest) and time.monotonic() < deadline:
            time.sleep(0.02)
        streamed.set()
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_once_streaming)
    watcher.start()
    try:
        result = cli("copy", f"{source.host}/{repo}:1", f"{dest.host}/{repo}:1")
    finally:
        watcher.join()

    assert streamed.is_set()
    assert result.code == 130, result.err
    assert one_line(result.err).startswith("Error: interrupted")
    assert_store_consistent(env_store())
    assert not dest_registry.blob_data_path(layer.digest).exists()

    again = cli("copy", f"{source.host}/{repo}:1", f"{dest_registry.host}/{repo}:1")

    assert again.code == 0, again.err
    _assert_arrived(dest_registry, repo, layer, image)
    assert_store_consistent(env_store())


def test_a_batch_sharing_a_base_puts_it_once_and_mounts_it_everywhere_else(
    registry: Any, dest_registry: RegistryServer, repo: str, cli: Any, tmp_path: Path
) -> None:
    # Six images need the base at once: one upload places it, the other five are put
    # aside meanwhile (holding no upload thread), then mount it side by side.
    base = make_layer(400_000, seed=861)
    images = [make_image([base, make_layer(1000, seed=870 + n)]) for n in range(6)]
    for n, image in enumerate(images):
        registry.pusher.push_image(f"{repo}/{n}", "1", image)
    batch = tmp_path / "batch.txt"
    batch.write_text("".join(f"{registry.host}/{repo}/{n}:1\n" for n in range(6)))

    mark = dest_registry.mark()
    result = cli("copy", "-f", str(batch), "--to", f"{dest_registry.host}/mirror")

    assert result.code == 0, result.err
    logged = dest_registry.requests(mark)
    assert _put_digests(logged).count(base.digest) == 1
    base_mounts = [r for r in _mounts(logged) if base.digest in unquote(r.path)]
    assert len(base_mounts) == 5
    unique = {b.digest for image in images for b in image.referenced_blobs()}
    heads = [r for r in logged if r.method == "HEAD" and "/blobs/" in r.path]
    # Each blob was asked about once, in the repository that received its upload.
    assert sorted(unquote(r.path).rsplit("/", 1)[1] for r in heads) == sorted(unique)
    for n, image in enumerate(images):
        assert _raw_manifest(dest_registry, f"mirror/{repo}/{n}", "1") == image.manifest_bytes


def test_the_destination_is_asked_about_a_blob_while_it_downloads(
    registry: Any, dest_registry: RegistryServer, repo: str, proxies: Any, docker_config: Any
) -> None:
    # The layer's download stalls at a third of it until the copy is interrupted: the
    # destination must hear about the layer (HEAD) before its bytes can all be here.
    layer = make_layer(3_000_000, seed=881)
    image = make_image([layer])
    registry.pusher.push_image(repo, "1", image)
    source = proxies(registry, max_response_seconds=60)
    source.on(blob_path(repo, layer.digest), Stall(after=STALL_AFTER), times=None)
    mark = dest_registry.mark()
    proc = start_fastpull("copy", f"{source.host}/{repo}:1", f"{dest_registry.host}/{repo}:1")
    try:
        deadline = time.monotonic() + 30
        while not any(
            r.method == "HEAD" and r.path.endswith(layer.digest)
            for r in dest_registry.requests(mark)
        ):
            assert time.monotonic() < deadline, "the layer was never asked about"
            time.sleep(0.05)
        served = source.bytes_sent(blob_path(repo, layer.digest))
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert served < len(layer.data)
    assert layer.digest not in _put_digests(dest_registry.requests(mark))


def test_a_blob_waiting_for_another_repositorys_upload_of_it_holds_no_upload_slot(
    registry: Any,
    dest_registry: RegistryServer,
    repo: str,
    cli: Any,
    docker_config: Any,
    proxies: Any,
) -> None:
    shared, other = make_layer(200_000, seed=891), make_layer(3000, seed=892)
    image = make_image([shared, other])
    _pulled(cli, registry, repo, "1", image)
    proxy = proxies(dest_registry, max_response_seconds=5)
    # The first upload (the shared layer's, into a) stalls until the proxy gives up on it.
    proxy.on(r"/v2/.+/blobs/uploads/.+", CutUpload(after=50_000, stall=True), method="PUT")
    store = Store.open(docker_config.store)
    descriptors = {b.digest: Descriptor.from_json(b.descriptor()) for b in (shared, other)}
    first, second = (Reference.parse(f"{proxy.host}/{repo}/{n}:1") for n in ("a", "b"))

    with Pusher(store, settings=Settings(), jobs=2) as pusher:
        placing = pusher.upload_blob(first, descriptors[shared.digest], True)
        deadline = time.monotonic() + 30
        while not proxy.requests_for(r"/v2/.+/blobs/uploads/.+", "PUT"):
            assert time.monotonic() < deadline, "the shared layer's upload never began"
            time.sleep(0.05)
        waiting = pusher.upload_blob(second, descriptors[shared.digest], True)
        # Two upload slots: one is stuck with the shared layer; the other is free, since
        # the second repository's turn for that layer waits without one.
        elsewhere = pusher.upload_blob(first, descriptors[other.digest], True)
        assert elsewhere.result(timeout=60).outcome == PUSHED
        assert not placing.done()
        assert placing.result(timeout=60).outcome == PUSHED
        mounted = waiting.result(timeout=60)

    assert mounted.outcome == MOUNTED and mounted.mounted_from == f"{repo}/a"
    assert dest_registry.blob_data_path(shared.digest).read_bytes() == shared.data
