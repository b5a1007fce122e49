"""The network misbehaving between fastpull and the real registry, injected by
:class:`~tests.support.faultproxy.FaultProxy`: resets, stalls, trickles, short and long
bodies, flipped bytes, 5xx and 429, a 200 or a wrong ``Content-Range`` to a resume, redirect
loops and redirects elsewhere, tokens that stop working, a failing token endpoint.

Each fault ends one of two ways, within a bounded time (the ``pull`` fixture interrupts a
pull after 20 s, which fails the test with exit 130): exactly the right bytes in the store,
or one error line with the README's exit code and nothing unverified in ``blobs/``.

Chunk-level faults of big blobs (one bad chunk among many, endgame) are in
``test_engine.py``; content the registry would refuse to store is in ``test_content.py``.
"""

from __future__ import annotations

import base64
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastpull.engine import job
from fastpull.engine.scheduler import MIB, Policy
from fastpull.registry.transport import MAX_REDIRECTS, RetryPolicy, Transport
from tests.integration.conftest import (
    CliResult,
    Proxy,
    assert_store_consistent,
    blob,
    entry_for,
    index_entries,
    one_line,
)
from tests.support.faultproxy import (
    Action,
    DropRange,
    ExpireToken,
    Extra,
    FaultProxy,
    Flip,
    Redirect,
    Reset,
    SetHeaders,
    Stall,
    Status,
    Trickle,
    Truncate,
    blob_path,
    manifest_path,
)
from tests.support.images import DOCKER_MANIFEST, Image, make_image, make_layer, sha256_digest

LAYER_SIZE = 200_000
CUT = 65_536
FOREVER = 50  # "every time": finite, so a client that never gave up would end up succeeding


@pytest.fixture
def store(docker_config: Any) -> Path:
    """The empty store this test pulls into (``$FASTPULL_STORE``)."""
    return Path(docker_config.store)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry at once unless the server sends Retry-After: only outcomes are tested here."""
    original = RetryPolicy.delay

    def delay(self: RetryPolicy, attempt: int, retry_after: float | None = None) -> float:
        return original(self, attempt, retry_after) if retry_after is not None else 0.0

    monkeypatch.setattr(RetryPolicy, "delay", delay)


def _image(seed: int) -> Image:
    return make_image([make_layer(LAYER_SIZE, seed=seed, compression="none")])


# -- one fault, one outcome --------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """Faults on the image's manifest or layer; ``code`` 0 means the pull must succeed.

    ``rules`` are (action, first, times); ``asked`` is how many requests the target gets.
    """

    target: str
    rules: tuple[tuple[Action, int, int | None], ...]
    code: int = 0
    message: str = ""
    asked: int | None = None
    options: tuple[str, ...] = ()


_FAULTS = {
    # The layer (one request without Range when all goes well).
    "layer-reset": Fault("layer", ((Reset(CUT), 1, 1),), asked=2),
    "layer-truncated": Fault("layer", ((Truncate(CUT), 1, 1),), asked=2),
    # A few bytes only: libcurl averages the speed over ~5 s, so a fast start would keep a
    # stalled transfer above the floor for that long.
    "layer-stalls": Fault(
        "layer", ((Stall(1000), 1, 1),), asked=2, options=("--stall-timeout", "1")
    ),
    "layer-trickles": Fault(
        "layer", ((Trickle(1000), 1, 1),), asked=2, options=("--stall-timeout", "1")
    ),
    "layer-extra-bytes": Fault("layer", ((Extra(b"trailing junk"), 1, 1),), asked=1),
    "layer-flipped-once": Fault("layer", ((Flip(1000), 1, 1),), asked=2),
    "layer-flipped-always": Fault(
        "layer", ((Flip(1000), 1, FOREVER),), 6, "refused after 2 attempts", asked=2
    ),
    "layer-500": Fault("layer", ((Status(500), 1, 1),), asked=2),
    "layer-502": Fault("layer", ((Status(502), 1, 1),), asked=2),
    "layer-503-retry-after": Fault("layer", ((Status(503, "1"), 1, 1),), asked=2),
    "layer-429": Fault("layer", ((Status(429), 1, 1),), asked=2),
    "layer-503-always": Fault("layer", ((Status(503, "0"), 1, FOREVER),), 5, "HTTP 503", asked=6),
    "layer-429-always": Fault(
        "layer", ((Status(429, "0"), 1, FOREVER),), 5, "toomanyrequests", asked=6
    ),
    # The resume of a broken transfer answered 200 (Range dropped): one plain stream again.
    "layer-resume-gets-200": Fault("layer", ((Truncate(CUT), 1, 1), (DropRange(), 2, 1))),
    "layer-resume-wrong-content-range": Fault(
        "layer",
        ((Truncate(CUT), 1, 1), (SetHeaders({"Content-Range": f"bytes 0-99/{LAYER_SIZE}"}), 2, 1)),
        5,
        "Content-Range",
    ),
    # The manifest, by tag.
    "manifest-reset": Fault("manifest", ((Reset(100), 1, 1),), asked=2),
    "manifest-truncated": Fault("manifest", ((Truncate(100), 1, 1),), asked=2),
    "manifest-500": Fault("manifest", ((Status(500), 1, 1),), asked=2),
    "manifest-429-retry-after": Fault("manifest", ((Status(429, "1"), 1, 1),), asked=2),
    "manifest-503-always": Fault(
        "manifest", ((Status(503, "0"), 1, FOREVER),), 5, "HTTP 503", asked=5
    ),
    "manifest-extra-bytes": Fault("manifest", ((Extra(b" "), 1, 1),), 6, "refused", asked=1),
    "manifest-flipped": Fault("manifest", ((Flip(10), 1, 1),), 6, "refused", asked=1),
    "manifest-wrong-content-type": Fault(
        "manifest",
        ((SetHeaders({"Content-Type": DOCKER_MANIFEST}), 1, 1),),
        6,
        "does not match the document's mediaType",
        asked=1,
    ),
    "manifest-forged-docker-content-digest": Fault(
        "manifest",
        ((SetHeaders({"Docker-Content-Digest": sha256_digest(b"forged")}), 1, 1),),
        6,
        sha256_digest(b"forged"),
        asked=1,
    ),
}


@pytest.mark.parametrize("name", sorted(_FAULTS))
def test_fault_ends_in_the_right_bytes_or_one_clear_error(
    registry: Any,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    store: Path,
    no_backoff: None,
    name: str,
) -> None:
    fault = _FAULTS[name]
    image = _image(seed=sorted(_FAULTS).index(name))
    layer = image.layers[0]
    registry.pusher.push_image(repo, "1", image)
    proxy = proxies(registry)
    path = manifest_path(repo, "1") if fault.target == "manifest" else blob_path(repo, layer.digest)
    for action, first, times in fault.rules:
        proxy.on(path, action, first=first, times=times)
    ref = f"{proxy.host}/{repo}:1"

    result = pull(*fault.options, ref)

    asked = proxy.requests_for(path)
    if fault.asked is not None:
        assert len(asked) == fault.asked, [(r.status, r.header("Range")) for r in asked]
    assert_store_consistent(store)
    if fault.code == 0:
        assert result.code == 0, result.err
        assert blob(store, layer.digest).read_bytes() == layer.data
        assert entry_for(store, ref)["digest"] == image.manifest_digest
    else:
        assert result.code == fault.code, result.err
        assert fault.message in one_line(result.err)
        assert not blob(store, layer.digest).exists()
        assert index_entries(store) == []


def test_resume_after_a_clean_close_asks_for_exactly_the_missing_bytes(
    registry: Any, repo: str, proxies: Proxy, pull: Callable[..., CliResult], store: Path
) -> None:
    image = _image(seed=100)
    layer = image.layers[0]
    registry.pusher.push_image(repo, "1", image)
    proxy = proxies(registry)
    path = blob_path(repo, layer.digest)
    proxy.on(path, Truncate(CUT))

    result = pull(f"{proxy.host}/{repo}:1")

    assert result.code == 0, result.err
    first, second = proxy.requests_for(path)
    assert (first.header("Range"), first.body_sent) == (None, CUT)
    assert second.header("Range") == f"bytes={CUT}-{layer.size - 1}"
    assert (second.status, second.body_sent) == (206, layer.size - CUT)
    assert blob(store, layer.digest).read_bytes() == layer.data


def test_a_link_that_cuts_every_answer_after_a_mib_still_delivers_a_64_mib_chunk(
    registry: Any,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A middlebox with a response-size limit: every attempt makes progress, so none counts
    # against the range's attempts, and the one 64 MiB request resumes until it is whole.
    monkeypatch.setattr(job, "Policy", functools.partial(Policy, min_chunk=64 * MIB))
    image = make_image([make_layer(64 * MIB, seed=102, compression="none")])
    layer = image.layers[0]
    registry.pusher.push_image(repo, "1", image)
    proxy = proxies(registry)
    path = blob_path(repo, layer.digest)
    proxy.on(path, Truncate(MIB), times=None)

    result = pull("--connections", "1", f"{proxy.host}/{repo}:1")

    assert result.code == 0, result.err
    asked = proxy.requests_for(path)
    assert len(asked) == math.ceil(layer.size / MIB)
    assert asked[0].header("Range") is None  # one request for the whole blob, then resumes
    assert [r.header("Range") for r in asked[1:3]] == [
        f"bytes={MIB}-{layer.size - 1}",
        f"bytes={2 * MIB}-{layer.size - 1}",
    ]
    assert blob(store, layer.digest).read_bytes() == layer.data


def test_retry_after_is_waited_for(
    registry: Any, repo: str, proxies: Proxy, pull: Callable[..., CliResult], store: Path
) -> None:
    image = _image(seed=101)
    registry.pusher.push_image(repo, "1", image)
    proxy = proxies(registry)
    paths = [manifest_path(repo, "1"), blob_path(repo, image.layers[0].digest)]
    for path in paths:
        proxy.on(path, Status(429, "1"))

    result = pull(f"{proxy.host}/{repo}:1")

    assert result.code == 0, result.err
    for path in paths:
        refused, accepted = proxy.requests_for(path)
        assert (refused.status, accepted.status) == (429, 200)
        assert accepted.received - refused.received >= 1.0


# -- stalls the small requests must survive ----------------------------------------------------


@pytest.mark.parametrize("action", [Stall(100), Trickle(100)], ids=["stall", "trickle"])
def test_transport_drops_a_stalled_manifest_and_asks_again(
    registry: Any, repo: str, proxies: Proxy, action: Action
) -> None:
    image = _image(seed=102)
    registry.pusher.push_image(repo, "1", image)
    proxy = proxies(registry, max_response_seconds=10)
    path = manifest_path(repo, "1")
    proxy.on(path, action)

    with Transport(stall_seconds=1) as transport:
        response = transport.request(
            "GET", f"{proxy.url}/v2/{repo}/manifests/1", {"Accept": image.media_type}
        )

    assert response.body == image.manifest_bytes
    slow, fresh = proxy.requests_for(path)
    assert slow.hung_up, "the stalled answer was ended by the proxy, not dropped by the client"
    assert fresh.status == 200


def test_stall_timeout_applies_to_manifest_requests(
    registry: Any, repo: str, proxies: Proxy, pull: Callable[..., CliResult], store: Path
) -> None:
    image = _image(seed=103)
    registry.pusher.push_image(repo, "1", image)
    # The proxy gives up on its own after 4 s: only a client that gave up first passes.
    proxy = proxies(registry, max_response_seconds=4)
    path = manifest_path(repo, "1")
    proxy.on(path, Trickle(100))

    result = pull("--stall-timeout", "1", f"{proxy.host}/{repo}:1")

    assert result.code == 0, result.err
    assert proxy.requests_for(path)[0].hung_up


# -- redirects ---------------------------------------------------------------------------------


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_redirect_to_another_host_goes_without_the_registry_credentials(
    basic_registry: Any,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    store: Path,
    docker_config: Any,
) -> None:
    image = _image(seed=104)
    layer = image.layers[0]
    basic_registry.pusher.push_image(repo, "1", image)
    user, password = basic_registry.username, basic_registry.password
    front = proxies(basic_registry)
    # The "CDN" reaches the registry with credentials of its own and records what it got.
    cdn = proxies(basic_registry, upstream_headers={"Authorization": _basic(user, password)})
    path = blob_path(repo, layer.digest)
    front.on(path, Redirect(f"{cdn.url}/v2/{repo}/blobs/{layer.digest}?sig=abc"), times=None)
    docker_config.add_auth(front.host, username=user, password=password)

    result = pull(f"{front.host}/{repo}:1")

    assert result.code == 0, result.err
    at_registry = front.requests_for(path)
    assert [(r.status, r.header("Authorization")) for r in at_registry] == [
        (307, _basic(user, password))
    ]
    (hop,) = cdn.requests
    assert hop.target == f"/v2/{repo}/blobs/{layer.digest}?sig=abc"
    assert hop.header("Authorization") is None
    assert hop.status == 200
    assert blob(store, layer.digest).read_bytes() == layer.data
    assert_store_consistent(store)


def test_https_registry_redirecting_to_plain_http_is_refused(
    registry: Any, repo: str, proxies: Proxy, pull: Callable[..., CliResult], store: Path
) -> None:
    image = _image(seed=105)
    layer = image.layers[0]
    registry.pusher.push_image(repo, "1", image)
    front = proxies(registry, tls=True)
    cdn = proxies(registry)
    for item in image.referenced_blobs():
        target = f"{cdn.url}/v2/{repo}/blobs/{item.digest}"
        front.on(blob_path(repo, item.digest), Redirect(target), times=None)
    assert front.ca_path is not None

    result = pull("--ca-cert", str(front.ca_path), f"{front.host}/{repo}:1")

    assert result.code == 5
    assert "plain HTTP" in one_line(result.err)
    assert cdn.requests == []
    assert not blob(store, layer.digest).exists()
    assert index_entries(store) == []
    assert_store_consistent(store)


@pytest.mark.parametrize("target", ["manifest", "layer"])
def test_redirect_loop_ends_with_a_clear_error(
    registry: Any,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    store: Path,
    target: str,
) -> None:
    image = _image(seed=106)
    layer = image.layers[0]
    registry.pusher.push_image(repo, "1", image)
    proxy = proxies(registry)
    mirror = proxies(registry)
    own = f"/v2/{repo}/" + ("manifests/1" if target == "manifest" else f"blobs/{layer.digest}")
    # proxy → mirror → proxy → ...: after FOREVER rounds a client that kept going succeeds.
    proxy.on(re.escape(own), Redirect(f"{mirror.url}{own}"), times=FOREVER)
    mirror.on(re.escape(own), Redirect(f"{proxy.url}{own}"), times=FOREVER)

    result = pull(f"{proxy.host}/{repo}:1")

    assert result.code == 5
    assert "too many redirects" in one_line(result.err)
    hops = len(proxy.requests_for(re.escape(own))) + len(mirror.requests_for(re.escape(own)))
    assert hops <= MAX_REDIRECTS + 1
    assert not blob(store, layer.digest).exists()
    assert_store_consistent(store)


# -- tokens ------------------------------------------------------------------------------------


def _token_pull(
    token_registry: Any, repo: str, proxies: Proxy, pull: Callable[..., CliResult], seed: int
) -> tuple[FaultProxy, Image, str]:
    image = make_image(
        [make_layer(20_000, seed=seed), make_layer(30_000, seed=seed + 1)],
    )
    token_registry.pusher.push_image(repo, "1", image)
    proxy = proxies(token_registry)
    return proxy, image, f"{proxy.host}/{repo}:1"


def test_token_that_works_only_once_is_replaced_each_time(
    token_registry: Any,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    store: Path,
) -> None:
    proxy, image, ref = _token_pull(token_registry, repo, proxies, pull, seed=107)
    proxy.on(r"/v2/.+", ExpireToken(), times=None)
    token_registry.token_server.clear_requests()

    result = pull("--ca-cert", str(token_registry.ca_path), ref)

    assert result.code == 0, result.err
    assert entry_for(store, ref)["digest"] == image.manifest_digest
    asked = [r for r in proxy.requests if r.path != "/v2/"]
    bearers = [r.header("Authorization") for r in asked if r.status != 401]
    # Every request that got through carried a token never used before; requests that
    # shared a token while it was fresh each fetched their own.
    assert len(bearers) == len(set(bearers)) == 1 + len(image.referenced_blobs())
    assert len(bearers) <= len(token_registry.token_server.requests) <= 2 * len(bearers)
    assert_store_consistent(store)


@pytest.mark.parametrize(
    ("failure", "count", "code", "message"),
    [
        ("500", 1, 0, ""),
        ("500", None, 5, "HTTP 500"),
        ("garbage", 1, 5, "token"),
    ],
    ids=["500-once", "500-always", "garbage"],
)
def test_token_endpoint_failures(
    token_registry: Any,
    repo: str,
    proxies: Proxy,
    pull: Callable[..., CliResult],
    store: Path,
    no_backoff: None,
    failure: str,
    count: int | None,
    code: int,
    message: str,
) -> None:
    _proxy, image, ref = _token_pull(token_registry, repo, proxies, pull, seed=110)
    policy = token_registry.token_server.policy
    policy.failure, policy.failure_count = failure, count

    result = pull("--ca-cert", str(token_registry.ca_path), ref)

    assert result.code == code, result.err
    if code:
        assert message in one_line(result.err)
        assert index_entries(store) == []
    else:
        assert entry_for(store, ref)["digest"] == image.manifest_digest
    assert_store_consistent(store)
