"""Prove the test harness against the real registry before fastpull's tests rely on it.

Everything here talks HTTP with urllib / http.client; fastpull is not involved.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.support.images import (
    DOCKER_LAYER_GZIP,
    MANIFEST_MEDIA_TYPES,
    OCI_LAYER_TAR,
    Hardlink,
    MiB,
    Pusher,
    PushError,
    Symlink,
    make_image,
    make_index,
    make_layer,
    parse_challenge,
    raw_blob,
)
from tests.support.netutil import connect, url_opener
from tests.support.registry import (
    RegistryServer,
    RegistryStartError,
    RegistryUnavailable,
)
from tests.support.tokenserver import decode_jwt
from tests.support.tools import require_tool

ACCEPT_ALL = {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}


def fetch(
    url: str,
    *,
    ca_path: str | Path | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> tuple[int, Message, bytes]:
    """GET (or ``method``) ``url``; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with url_opener(ca_path).open(request, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def basic(username: str, password: str) -> dict[str, str]:
    raw = f"{username}:{password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def small_image(name: str, **options: Any) -> Any:
    """An image with one file layer and one random layer, distinct per ``name``."""
    fmt = options.pop("format", "oci")
    layers = [
        make_layer({f"etc/{name}": name.encode()}, format=fmt),
        make_layer(64 * 1024, seed=len(name), format=fmt),
    ]
    return make_image(layers, format=fmt, **options)


# -- images.py without a registry -----------------------------------------------------------


def test_file_layer_is_a_real_tar_with_consistent_digests() -> None:
    files = {
        "etc/hostname": b"harness\n",
        "usr/bin/tool": b"#!/bin/sh\n",
        "usr/bin/link": Symlink("tool"),
        "usr/bin/hard": Hardlink("usr/bin/tool"),
        "var/empty/": b"",
    }
    layer = make_layer(files)
    tar_bytes = gzip.decompress(layer.data)
    assert layer.digest == "sha256:" + hashlib.sha256(layer.data).hexdigest()
    assert layer.diff_id == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    assert layer.size == len(layer.data)
    assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile("etc/hostname").read() == b"harness\n"  # type: ignore[union-attr]
    # Parent directories come before their children, as real image builders write them.
    assert list(members)[:2] == ["etc", "etc/hostname"]
    assert members["usr/bin/link"].issym() and members["usr/bin/link"].linkname == "tool"
    assert members["usr/bin/hard"].islnk()
    assert members["var/empty"].isdir()
    # Same input, same bytes: digests are reproducible across runs.
    assert make_layer(files).digest == layer.digest


def test_size_layer_is_deterministic_in_memory_and_on_disk(tmp_path: Path) -> None:
    in_memory = make_layer(3 * MiB + 5, seed=42)
    on_disk = make_layer(3 * MiB + 5, seed=42, workdir=tmp_path)
    assert on_disk.path is not None and on_disk.content is None
    assert (in_memory.digest, in_memory.diff_id) == (on_disk.digest, on_disk.diff_id)
    assert on_disk.path.read_bytes() == in_memory.data
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(in_memory.data))) as tar:
        (member,) = tar.getmembers()
    assert (member.name, member.size) == ("random-42.bin", 3 * MiB + 5)
    assert make_layer(3 * MiB + 5, seed=43).digest != in_memory.digest

    plain = make_layer(1000, compression="none")
    assert plain.digest == plain.diff_id and plain.media_type == OCI_LAYER_TAR
    assert make_layer(1000, format="docker").media_type == DOCKER_LAYER_GZIP


def test_image_and_index_documents() -> None:
    image = small_image("doc", architecture="arm64", variant="v8")
    manifest = json.loads(image.manifest_bytes)
    config = json.loads(image.config_bytes)
    assert manifest["mediaType"] == image.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["digest"] == image.config_digest
    assert [d["digest"] for d in manifest["layers"]] == [layer.digest for layer in image.layers]
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
    assert (config["os"], config["architecture"], config["variant"]) == ("linux", "arm64", "v8")
    assert len(config["history"]) == 2
    assert set(image.blobs) == {image.config_digest, *(layer.digest for layer in image.layers)}

    docker = small_image("doc", format="docker")
    assert json.loads(docker.config_bytes)["architecture"] == "amd64"
    index = make_index([image, docker], format="docker")
    document = json.loads(index.manifest_bytes)
    assert document["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert document["manifests"][0]["platform"] == {
        "architecture": "arm64",
        "os": "linux",
        "variant": "v8",
    }
    assert document["manifests"][1]["mediaType"] == (
        "application/vnd.docker.distribution.manifest.v2+json"
    )


def test_umoci_unpacks_built_image(tmp_path: Path) -> None:
    umoci = require_tool("umoci")
    files = {"etc/hostname": b"harness\n", "etc/alias": Symlink("hostname"), "srv/": b""}
    image = make_image([make_layer(files), make_layer(10_000, seed=3, compression="none")])
    layout = tmp_path / "layout"
    (layout / "blobs/sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    for digest, data in {**image.blobs, image.manifest_digest: image.manifest_bytes}.items():
        (layout / "blobs/sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    descriptor = {
        **image.manifest.descriptor(),
        "annotations": {"org.opencontainers.image.ref.name": "v1"},
    }
    index = {"schemaVersion": 2, "manifests": [descriptor]}
    (layout / "index.json").write_text(json.dumps(index))

    bundle = tmp_path / "bundle"
    subprocess.run(
        [umoci, "unpack", "--rootless", "--image", f"{layout}:v1", str(bundle)],
        check=True,
        capture_output=True,
    )
    rootfs = bundle / "rootfs"
    assert (rootfs / "etc/hostname").read_bytes() == b"harness\n"
    assert os.readlink(rootfs / "etc/alias") == "hostname"
    assert (rootfs / "srv").is_dir()
    assert (rootfs / "random-3.bin").stat().st_size == 10_000


# -- plain registry ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_pushed_image_reads_back_byte_for_byte(registry: RegistryServer, fmt: str) -> None:
    name = f"harness/image-{fmt}"
    image = small_image(name, format=fmt)
    assert registry.pusher.push_image(name, "v1", image) == image.manifest_digest

    status, headers, body = fetch(f"{registry.url}/v2/{name}/manifests/v1", headers=ACCEPT_ALL)
    assert status == 200
    assert body == image.manifest_bytes
    assert headers["Docker-Content-Digest"] == image.manifest_digest
    assert headers["Content-Type"] == image.media_type
    for digest, data in image.blobs.items():
        status, headers, body = fetch(f"{registry.url}/v2/{name}/blobs/{digest}")
        assert (status, body) == (200, data)
        assert headers["Docker-Content-Digest"] == digest


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_pushed_index_reads_back_with_children(registry: RegistryServer, fmt: str) -> None:
    name = f"harness/multiarch-{fmt}"
    images = [
        small_image(name, format=fmt),
        small_image(name, format=fmt, architecture="arm64", variant="v8"),
    ]
    index = make_index(images, format=fmt)
    assert registry.pusher.push_index(name, "multi", index) == index.manifest_digest

    status, headers, body = fetch(f"{registry.url}/v2/{name}/manifests/multi", headers=ACCEPT_ALL)
    assert (status, body) == (200, index.manifest_bytes)
    assert headers["Docker-Content-Digest"] == index.manifest_digest
    assert headers["Content-Type"] == index.media_type
    for image in images:
        url = f"{registry.url}/v2/{name}/manifests/{image.manifest_digest}"
        status, headers, body = fetch(url, headers=ACCEPT_ALL)
        assert (status, body) == (200, image.manifest_bytes)
        assert headers["Docker-Content-Digest"] == image.manifest_digest
    assert registry.pusher.list_tags(name) == ["multi"]


def test_empty_blob_layer_is_stored(registry: RegistryServer) -> None:
    name = "harness/empty-layer"
    image = make_image([raw_blob(b"")])
    registry.pusher.push_image(name, "v1", image)
    status, _, body = fetch(f"{registry.url}/v2/{name}/blobs/{image.layers[0].digest}")
    assert (status, body) == (200, b"")


def test_access_log_lists_client_requests_only(registry: RegistryServer) -> None:
    name = "harness/logged"
    image = small_image(name)
    registry.pusher.push_image(name, "v1", image)
    mark = registry.mark()
    fetch(f"{registry.url}/v2/{name}/manifests/v1", headers=ACCEPT_ALL)
    fetch(f"{registry.url}/v2/{name}/blobs/{image.config_digest}", method="HEAD")
    fetch(f"{registry.url}/v2/{name}/blobs/sha256:{'0' * 64}")

    logged = registry.requests(mark)
    assert [r[:3] for r in logged] == [
        ("GET", f"/v2/{name}/manifests/v1", 200),
        ("HEAD", f"/v2/{name}/blobs/{image.config_digest}", 200),
        ("GET", f"/v2/{name}/blobs/sha256:{'0' * 64}", 404),
    ]
    # The body bytes sent, which the resume tests count.
    assert logged[0].size == len(image.manifest_bytes)
    assert logged[1].size == 0
    everything = registry.requests(include_harness=True)
    assert ("PUT", f"/v2/{name}/manifests/v1", 201) in [r[:3] for r in everything]


def test_blob_range_requests(registry: RegistryServer) -> None:
    name = "harness/ranges"
    layer = make_layer(4000, compression="none", seed=5)
    registry.pusher.push_image(name, "v1", make_image([layer]))
    url = f"{registry.url}/v2/{name}/blobs/{layer.digest}"
    size = layer.size

    expectations = {
        "bytes=0-99": (f"bytes 0-99/{size}", layer.data[:100]),
        "bytes=100-": (f"bytes 100-{size - 1}/{size}", layer.data[100:]),
        "bytes=-100": (f"bytes {size - 100}-{size - 1}/{size}", layer.data[-100:]),
        f"bytes=0-{size + 100}": (f"bytes 0-{size - 1}/{size}", layer.data),
    }
    for value, (content_range, data) in expectations.items():
        status, headers, body = fetch(url, headers={"Range": value})
        assert (status, headers["Content-Range"], body) == (206, content_range, data), value

    # Past the end: 416 with "bytes */size". The 2.8.2 registry also keeps the blob's full size
    # in Content-Length while sending a short text body, so the body is not read here.
    conn = connect(registry.url)
    try:
        conn.request("GET", url, headers={"Range": f"bytes={size}-"})
        response = conn.getresponse()
        assert response.status == 416
        assert response.getheader("Content-Range") == f"bytes */{size}"
    finally:
        conn.close()


def test_pusher_deletes_and_lists_tags(registry: RegistryServer) -> None:
    name = "harness/deletions"
    image = small_image(name)
    for tag in ("a", "b"):
        registry.pusher.push_image(name, tag, image)
    assert sorted(registry.pusher.list_tags(name)) == ["a", "b"]
    # Deleting by tag deletes the manifest, which both tags point to.
    registry.pusher.delete_manifest(name, "b")
    assert fetch(f"{registry.url}/v2/{name}/manifests/a", headers=ACCEPT_ALL)[0] == 404
    layer = image.layers[0]
    registry.pusher.delete_blob(name, layer.digest)
    assert fetch(f"{registry.url}/v2/{name}/blobs/{layer.digest}")[0] == 404
    with pytest.raises(PushError, match="404"):
        registry.pusher.delete_blob(name, layer.digest)


def test_blob_data_path_points_at_stored_bytes(registry: RegistryServer) -> None:
    name = "harness/on-disk"
    image = small_image(name)
    registry.pusher.push_image(name, "v1", image)
    for digest, data in image.blobs.items():
        assert registry.blob_data_path(digest).read_bytes() == data


def test_large_layer_streams_in_chunks(registry: RegistryServer, tmp_path: Path) -> None:
    started = time.monotonic()
    layer = make_layer(100 * MiB, seed=100, workdir=tmp_path)
    built = time.monotonic()
    name = "harness/large"
    mark = registry.mark()
    registry.pusher.push_image(name, "v1", make_image([layer]))
    pushed = time.monotonic()
    print(
        f"\n100 MiB layer: build {built - started:.1f}s, push {pushed - built:.1f}s "
        f"({layer.size / MiB:.1f} MiB compressed)"
    )

    status, headers, _ = fetch(f"{registry.url}/v2/{name}/blobs/{layer.digest}", method="HEAD")
    assert (status, int(headers["Content-Length"])) == (200, layer.size)
    assert layer.path is not None
    with layer.path.open("rb") as fh:
        fh.seek(layer.size - 4096)
        tail = fh.read()
    status, _, body = fetch(
        f"{registry.url}/v2/{name}/blobs/{layer.digest}",
        headers={"Range": f"bytes={layer.size - 4096}-"},
    )
    assert (status, body) == (206, tail)
    patches = [r for r in registry.requests(mark, include_harness=True) if r.method == "PATCH"]
    assert len(patches) == -(-layer.size // registry.pusher.chunk_size)
    assert pushed - started < 60


# -- TLS and Basic auth ------------------------------------------------------------------------


def test_tls_registry_needs_its_ca(tls_registry: RegistryServer) -> None:
    assert tls_registry.url.startswith("https://") and tls_registry.ca_path is not None
    with pytest.raises(urllib.error.URLError) as excinfo:
        fetch(f"{tls_registry.url}/v2/")
    assert isinstance(excinfo.value.reason, ssl.SSLCertVerificationError)

    assert fetch(f"{tls_registry.url}/v2/", ca_path=tls_registry.ca_path)[0] == 200
    localhost = tls_registry.url.replace("127.0.0.1", "localhost")
    assert fetch(f"{localhost}/v2/", ca_path=tls_registry.ca_path)[0] == 200

    name = "harness/tls"
    image = small_image(name)
    tls_registry.pusher.push_image(name, "v1", image)
    url = f"{tls_registry.url}/v2/{name}/manifests/v1"
    status, _, body = fetch(url, ca_path=tls_registry.ca_path, headers=ACCEPT_ALL)
    assert (status, body) == (200, image.manifest_bytes)


def test_basic_registry_needs_credentials(basic_registry: RegistryServer) -> None:
    assert basic_registry.username and basic_registry.password
    status, headers, _ = fetch(f"{basic_registry.url}/v2/")
    assert status == 401
    assert parse_challenge(headers["WWW-Authenticate"])[0] == "basic"
    wrong = basic(basic_registry.username, "wrong")
    assert fetch(f"{basic_registry.url}/v2/", headers=wrong)[0] == 401
    creds = basic(basic_registry.username, basic_registry.password)
    assert fetch(f"{basic_registry.url}/v2/", headers=creds)[0] == 200

    name = "harness/basic"
    image = small_image(name)
    basic_registry.pusher.push_image(name, "v1", image)
    url = f"{basic_registry.url}/v2/{name}/manifests/v1"
    assert fetch(url, headers=ACCEPT_ALL)[0] == 401
    status, _, body = fetch(url, headers={**ACCEPT_ALL, **creds})
    assert (status, body) == (200, image.manifest_bytes)


# -- token auth --------------------------------------------------------------------------------


def get_token(
    registry: RegistryServer, scopes: list[str], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """GET the token realm; returns the status and the JSON answer (``{}`` if not JSON)."""
    server = registry.token_server
    assert server is not None
    query = urlencode([("service", server.service), *(("scope", s) for s in scopes)])
    status, _, body = fetch(f"{server.realm}?{query}", ca_path=registry.ca_path, headers=headers)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {}


def post_token(registry: RegistryServer, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POST an OAuth2 form to the token realm."""
    server = registry.token_server
    assert server is not None
    request = urllib.request.Request(
        server.realm,
        data=urlencode({"service": server.service, "client_id": "harness", **form}).encode(),
        method="POST",
    )
    try:
        with url_opener(registry.ca_path).open(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_token_registry_challenge_then_token(token_registry: RegistryServer) -> None:
    server = token_registry.token_server
    assert server is not None and token_registry.username and token_registry.password
    name = "harness/token"
    image = small_image(name)
    token_registry.pusher.push_image(name, "v1", image)
    server.clear_requests()

    url = f"{token_registry.url}/v2/{name}/manifests/v1"
    status, headers, _ = fetch(url, ca_path=token_registry.ca_path, headers=ACCEPT_ALL)
    assert status == 401
    scheme, params = parse_challenge(headers["WWW-Authenticate"])
    assert scheme == "bearer"
    assert params["realm"] == server.realm
    assert params["service"] == server.service
    assert params["scope"] == f"repository:{name}:pull"

    creds = basic(token_registry.username, token_registry.password)
    status, answer = get_token(token_registry, [params["scope"]], creds)
    assert status == 200
    assert answer["token"] == answer["access_token"]
    assert answer["expires_in"] == 300 and answer["issued_at"].endswith("Z")
    header, claims = decode_jwt(answer["token"])
    assert (header["alg"], header["typ"], len(header["x5c"])) == ("RS256", "JWT", 1)
    assert claims["aud"] == server.service and claims["iss"] == server.issuer
    assert claims["sub"] == token_registry.username
    assert claims["access"] == [{"type": "repository", "name": name, "actions": ["pull"]}]
    assert claims["exp"] - claims["iat"] == 300

    status, _, body = fetch(
        url, ca_path=token_registry.ca_path, headers={**ACCEPT_ALL, **bearer(answer["token"])}
    )
    assert (status, body) == (200, image.manifest_bytes)
    (recorded,) = server.requests
    assert (recorded.method, recorded.basic_auth, recorded.username) == (
        "GET",
        True,
        token_registry.username,
    )
    assert recorded.scopes == (f"repository:{name}:pull",) and recorded.status == 200


def test_token_server_grants_follow_policy(token_registry: RegistryServer) -> None:
    server = token_registry.token_server
    assert server is not None and token_registry.username and token_registry.password
    name = "harness/grants"
    token_registry.pusher.push_image(name, "v1", small_image(name))
    creds = basic(token_registry.username, token_registry.password)
    scope = f"repository:{name}:pull,push"

    # Anonymous: pull only, which the registry honours for reads and refuses for uploads.
    status, answer = get_token(token_registry, [scope])
    assert status == 200
    assert decode_jwt(answer["token"])[1]["access"][0]["actions"] == ["pull"]
    anonymous = Pusher(token_registry.url, ca_path=token_registry.ca_path, token=answer["token"])
    assert anonymous.list_tags(name) == ["v1"]
    with pytest.raises(PushError, match="401"):
        anonymous.push_blob(name, raw_blob(b"anonymous"))

    assert get_token(token_registry, [scope], basic(token_registry.username, "nope"))[0] == 401
    server.policy.allow_anonymous = False
    assert get_token(token_registry, [scope])[0] == 401

    server.policy.acl = {token_registry.username: {"harness/allowed-*": ["pull"]}}
    _, answer = get_token(token_registry, [scope, "repository:harness/allowed-x:pull,push"], creds)
    assert decode_jwt(answer["token"])[1]["access"] == [
        {"type": "repository", "name": "harness/allowed-x", "actions": ["pull"]}
    ]

    server.policy.token_field = "access_token"
    _, answer = get_token(token_registry, [scope], creds)
    assert "token" not in answer and "access_token" in answer


def test_token_server_oauth_grants(token_registry: RegistryServer) -> None:
    server = token_registry.token_server
    assert server is not None and token_registry.username and token_registry.password
    server.policy.identity_tokens = {"identity-123": token_registry.username}
    password_grant = {
        "grant_type": "password",
        "username": token_registry.username,
        "password": token_registry.password,
        "scope": "repository:harness/oauth:pull",
    }
    status, answer = post_token(token_registry, {**password_grant, "access_type": "offline"})
    assert status == 200 and answer["refresh_token"]
    assert "refresh_token" not in post_token(token_registry, password_grant)[1]
    assert post_token(token_registry, {**password_grant, "password": "bad"})[0] == 401

    for refresh in (answer["refresh_token"], "identity-123"):
        status, refreshed = post_token(
            token_registry, {"grant_type": "refresh_token", "refresh_token": refresh}
        )
        assert status == 200
        assert decode_jwt(refreshed["token"])[1]["sub"] == token_registry.username
    unknown = {"grant_type": "refresh_token", "refresh_token": "unknown"}
    assert post_token(token_registry, unknown)[0] == 401
    assert post_token(token_registry, {"grant_type": "magic"})[0] == 400

    # GET with offline_token=true also hands out a refresh token, but only to a known user.
    status, _, body = fetch(
        f"{server.realm}?service={server.service}&offline_token=true",
        ca_path=token_registry.ca_path,
        headers=basic(token_registry.username, token_registry.password),
    )
    assert status == 200 and "refresh_token" in json.loads(body)
    grant_types = [r.grant_type for r in server.requests]
    assert grant_types[:3] == ["password", "password", "password"]
    assert grant_types[-1] is None

    server.policy.support_post = False
    assert post_token(token_registry, password_grant)[0] == 404


def test_registry_enforces_token_expiry(token_registry: RegistryServer) -> None:
    server = token_registry.token_server
    assert server is not None and token_registry.username

    def accepted(exp_age: int) -> bool:
        """Whether the registry takes a token whose exp lies ``exp_age`` seconds in the past."""
        now = time.time()
        token = server.issue_token(token_registry.username, lifetime=10, now=now - 10 - exp_age)
        status, _, _ = fetch(
            f"{token_registry.url}/v2/", ca_path=token_registry.ca_path, headers=bearer(token)
        )
        return status == 200

    # Binary search for the registry's leeway on exp (distribution allows clock skew).
    low, high = 0, 300
    assert accepted(low) and not accepted(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(middle) else (low, middle)
    print(f"\nregistry accepts tokens up to {low}s past exp, rejects at {high}s")
    assert high <= 120

    # The realm flow with a token clock shifted past exp + leeway: the real registry says 401.
    server.policy.time_offset = -(server.policy.expires_in or 60) - high - 30
    status, answer = get_token(token_registry, [])
    assert status == 200
    status, headers, _ = fetch(
        f"{token_registry.url}/v2/", ca_path=token_registry.ca_path, headers=bearer(answer["token"])
    )
    assert status == 401
    assert parse_challenge(headers["WWW-Authenticate"])[1]["error"] == "invalid_token"


def test_token_server_failure_modes(token_registry: RegistryServer) -> None:
    server = token_registry.token_server
    assert server is not None
    server.policy.failure, server.policy.failure_count = "500", 1
    assert get_token(token_registry, [])[0] == 500
    assert get_token(token_registry, [])[0] == 200

    server.policy.failure, server.policy.failure_count = "garbage", None
    status, _, body = fetch(server.realm, ca_path=token_registry.ca_path)
    assert status == 200 and body.startswith(b"<html>")
    # A fresh pusher has no cached token, so it must go through the broken realm.
    pusher = Pusher(
        token_registry.url,
        ca_path=token_registry.ca_path,
        username=token_registry.username,
        password=token_registry.password,
    )
    with pusher, pytest.raises(PushError, match="not the token"):
        pusher.list_tags("harness/anything")
    assert [r.status for r in server.requests] == [500, 200, 200, 200]


# -- lifecycle errors --------------------------------------------------------------------------


def test_missing_binary_is_reported() -> None:
    with pytest.raises(RegistryUnavailable, match="not-a-registry"):
        RegistryServer(binary="not-a-registry").start()


def test_start_failure_carries_the_registry_log(registry: RegistryServer) -> None:
    # The ``registry`` fixture is requested only for its skip/fail rule on a missing binary.
    class BrokenRegistry(RegistryServer):
        def _config(self, port: int) -> dict[str, Any]:
            config = super()._config(port)
            config["storage"] = {"nosuchdriver": {}}
            return config

    server = BrokenRegistry()
    with pytest.raises(RegistryStartError, match="nosuchdriver"):
        server.start()
    # A failed start cleans up after itself.
    assert server.log_path is not None and not server.log_path.exists()
