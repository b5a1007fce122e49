"""Hostile content end to end: documents a registry serves that fastpull must refuse.

The real registry validates what is pushed, so these are served by
:class:`~tests.support.faultserver.FaultServer` with a correct ``Docker-Content-Digest``
(the bytes are what the server means to send). Each must end in one error line with the
README's exit code, nothing unverified in ``blobs/`` and no file written outside the store
(the directory around the store is compared before and after). Parsing rules themselves are
unit-tested in ``tests/unit/test_manifest.py``; this is about what the whole pull does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fastpull.registry.manifest import MAX_MANIFEST_SIZE
from tests.integration.conftest import (
    CliResult,
    Start,
    assert_store_consistent,
    index_entries,
)
from tests.support.faultserver import FaultServer, Serve
from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    make_image,
    make_layer,
    sha256_digest,
)

REPO = "hostile/app"
EVIL_TYPE = "application/vnd.evil.v1+json"
Document = dict[str, Any]


def _image() -> Image:
    return make_image([make_layer(5_000, seed=300)])


def _serve_document(
    server: FaultServer, reference: str, raw: bytes, media_type: str = OCI_MANIFEST
) -> None:
    server.add_content(
        server.manifest_path(REPO, reference),
        raw,
        media_type,
        {"Docker-Content-Digest": sha256_digest(raw)},
    )


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _manifest(image: Image, **changes: Any) -> Document:
    doc = json.loads(image.manifest_bytes)
    doc.update(changes)
    return doc


def _with_layer(image: Image, **changes: Any) -> Document:
    doc = json.loads(image.manifest_bytes)
    doc["layers"][0].update(changes)
    return doc


def _with_config(image: Image, **changes: Any) -> Document:
    doc = json.loads(image.manifest_bytes)
    doc["config"].update(changes)
    return doc


def _oversized(image: Image) -> bytes:
    doc = _manifest(image, annotations={"padding": ""})
    doc["annotations"]["padding"] = "x" * (MAX_MANIFEST_SIZE + 1 - len(_json(doc)))
    return _json(doc)


# name: (manifest bytes, exit code, fragment of the error line)
Case = tuple[Callable[[Image], bytes], int, str]
_CASES: dict[str, Case] = {
    "over-4-mib": (_oversized, 6, f"larger than {MAX_MANIFEST_SIZE} bytes"),
    "not-json": (lambda i: b'{"schemaVersion": 2, "layers": [', 6, "not valid JSON"),
    "json-array": (lambda i: b"[1, 2, 3]", 6, "not a JSON object"),
    "unknown-media-type": (
        lambda i: _json(_manifest(i, mediaType=EVIL_TYPE)),
        6,
        "unsupported manifest media type",
    ),
    "unknown-config-type": (
        lambda i: _json(_with_config(i, mediaType="application/vnd.evil.config+json")),
        6,
        "not a container image",
    ),
    "malformed-config-digest": (
        lambda i: _json(_with_config(i, digest="sha256:xyz")),
        6,
        "config: invalid sha256 digest",
    ),
    "traversing-layer-digest": (
        lambda i: _json(_with_layer(i, digest="sha256:../../x")),
        6,
        "invalid digest",
    ),
    "traversing-digest-without-algorithm": (
        lambda i: _json(_with_layer(i, digest="../../../x")),
        6,
        "invalid digest",
    ),
    "unknown-algorithm": (
        lambda i: _json(_with_layer(i, digest="md5:" + "0" * 32)),
        6,
        "unsupported digest algorithm",
    ),
    "negative-size": (lambda i: _json(_with_layer(i, size=-1)), 6, "impossible size"),
    "enormous-size": (lambda i: _json(_with_layer(i, size=1 << 62)), 6, "impossible size"),
    "size-as-string": (lambda i: _json(_with_layer(i, size="5000")), 6, "'size'"),
    "too-many-layers": (
        lambda i: _json(_manifest(i, layers=[json.loads(i.manifest_bytes)["layers"][0]] * 5000)),
        6,
        "5000 layers; refused",
    ),
    "index-and-manifest-at-once": (
        lambda i: _json(_manifest(i, manifests=[])),
        6,
        "ambiguous",
    ),
}


def _tree(root: Path, skip: Path) -> dict[str, int]:
    """Every file and directory under ``root`` but outside ``skip``, with its size."""
    found = {}
    for path in root.rglob("*"):
        if path == skip or skip in path.parents:
            continue
        found[str(path.relative_to(root))] = path.stat().st_size if path.is_file() else -1
    return found


@pytest.fixture
def around_store(docker_config: Any, tmp_path: Path) -> Any:
    """Check after the test that nothing outside the store changed (the test's tmp_path
    holds the store, the docker config and nothing else fastpull should touch)."""
    store = Path(docker_config.store)
    before = _tree(tmp_path, store)
    yield store
    assert _tree(tmp_path, store) == before
    assert_store_consistent(store)


@pytest.mark.parametrize("name", sorted(_CASES))
def test_hostile_manifest_is_refused_with_one_line(
    servers: Start, pull: Callable[..., CliResult], around_store: Path, name: str
) -> None:
    make, code, fragment = _CASES[name]
    server = servers()
    image = _image()
    server.add_image(REPO, None, image)
    raw = make(image)
    _serve_document(server, "1", raw, EVIL_TYPE if EVIL_TYPE.encode() in raw else OCI_MANIFEST)

    result = pull(f"{server.host}/{REPO}:1")

    assert result.code == code, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert fragment in lines[0]
    assert not any("/blobs/" in r.path for r in server.requests)
    assert index_entries(around_store) == []


def test_index_whose_child_is_the_index_again_is_refused(
    servers: Start, pull: Callable[..., CliResult], around_store: Path
) -> None:
    # A digest cannot name a document that contains it, so a server that makes an index its
    # own child has to serve the index under the child's digest: a digest mismatch.
    server = servers()
    image = _image()
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_INDEX,
                    "digest": image.manifest_digest,
                    "size": image.manifest.size,
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        }
    )
    _serve_document(server, "1", index, OCI_INDEX)
    server.add_content(server.manifest_path(REPO, image.manifest_digest), index, OCI_INDEX)

    result = pull("--platform", "linux/amd64", f"{server.host}/{REPO}:1")

    assert result.code == 6, result.err
    assert "refused" in result.err
    assert index_entries(around_store) == []


def test_indexes_nested_too_deep_are_refused(
    servers: Start, pull: Callable[..., CliResult], around_store: Path
) -> None:
    server = servers()
    image = _image()
    server.add_image(REPO, None, image)
    child = {
        "mediaType": OCI_MANIFEST,
        "digest": image.manifest_digest,
        "size": image.manifest.size,
    }
    for _ in range(6):
        raw = _json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{**child, "platform": {"os": "linux", "architecture": "amd64"}}],
            }
        )
        _serve_document(server, sha256_digest(raw), raw, OCI_INDEX)
        child = {"mediaType": OCI_INDEX, "digest": sha256_digest(raw), "size": len(raw)}
    server.add_content(
        server.manifest_path(REPO, "1"),
        raw,
        OCI_INDEX,
        {"Docker-Content-Digest": sha256_digest(raw)},
    )

    result = pull("--platform", "linux/amd64", f"{server.host}/{REPO}:1")

    assert result.code == 6, result.err
    assert "nests too deep" in result.err
    assert len([r for r in server.requests if "/manifests/" in r.path]) <= 5
    assert index_entries(around_store) == []


def test_config_that_is_not_json_is_refused(
    servers: Start, pull: Callable[..., CliResult], around_store: Path
) -> None:
    server = servers()
    layer = make_layer(5_000, seed=301)
    junk = b"\x00not a config"
    doc = json.loads(make_image([layer]).manifest_bytes)
    doc["config"].update(digest=sha256_digest(junk), size=len(junk))
    server.add_content(server.blob_path(REPO, sha256_digest(junk)), junk)
    server.add_content(server.blob_path(REPO, layer.digest), layer.data)
    _serve_document(server, "1", _json(doc))

    result = pull(f"{server.host}/{REPO}:1")

    assert result.code == 6, result.err
    assert "image config is not valid JSON" in result.err
    assert index_entries(around_store) == []


@pytest.mark.parametrize(
    ("declared", "code", "fragment"),
    [
        # The bytes beyond the declared size are never read: what is left fails the digest.
        ("smaller", 6, "refused after 2 attempts"),
        # The body ends early, the resume of the missing bytes is refused by the server.
        ("larger", 6, "shorter than"),
    ],
)
def test_layer_size_that_lies_is_refused(
    servers: Start,
    pull: Callable[..., CliResult],
    around_store: Path,
    declared: str,
    code: int,
    fragment: str,
) -> None:
    server = servers()
    image = _image()
    layer = image.layers[0]
    server.add_image(REPO, None, image)
    size = layer.size - 100 if declared == "smaller" else layer.size + 100
    _serve_document(server, "1", _json(_with_layer(image, size=size)))

    result = pull(f"{server.host}/{REPO}:1")

    assert result.code == code, result.err
    (line,) = result.err.strip().splitlines()
    assert layer.digest in line
    assert fragment in line
    assert index_entries(around_store) == []


@pytest.mark.parametrize("pages", [["self"], ["a", "b"]], ids=["to-itself", "a-b-a"])
def test_tag_list_whose_link_loops_is_refused(
    servers: Start, pull: Callable[..., CliResult], around_store: Path, pages: list[str]
) -> None:
    server = servers()
    path = f"/v2/{REPO}/tags/list"
    targets = [f"{path}?page={name}" for name in pages]
    # The route ignores the query, so the script decides each page's Link in turn: the first
    # page links to the first target, each target to the next, the last back to the first.
    links = [targets[0]] + [targets[(i + 1) % len(targets)] for i in range(len(targets))] * 3
    server.add_content(path, _json({"name": REPO, "tags": ["t0"]}), "application/json")
    server.script(path, *[Serve(headers={"Link": f'<{link}>; rel="next"'}) for link in links])

    result = pull("--all-tags", f"{server.host}/{REPO}")

    assert result.code == 5, result.err
    assert "pagination loops" in result.err
    assert len(server.requests_for(path)) == len(targets) + 1
    assert index_entries(around_store) == []


def test_tag_list_that_is_not_json_is_refused(
    servers: Start, pull: Callable[..., CliResult], around_store: Path
) -> None:
    server = servers()
    server.add_content(f"/v2/{REPO}/tags/list", b"<html>tags</html>", "text/html")

    result = pull("--all-tags", f"{server.host}/{REPO}")

    assert result.code == 5, result.err
    assert "not valid JSON" in result.err


# ``python -m fastpull ARGS`` that writes its own peak resident size (VmHWM, KiB) to the file
# named by its first argument on the way out. VmHWM belongs to the address space exec made, so
# it holds nothing of the parent's; ru_maxrss of a child does (Linux carries the forking
# process's peak across exec), and would measure pytest.
_PEAK_RSS_RUNNER = """
import atexit, runpy, sys

peak_file = sys.argv.pop(1)

def write_peak():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(peak_file, "w") as out:
        out.write(peak)

atexit.register(write_peak)
runpy.run_module("fastpull", run_name="__main__", alter_sys=True)
"""


def test_a_million_layers_are_refused_in_bounded_memory(
    servers: Start, docker_config: Any, tmp_path: Path
) -> None:
    # The smallest JSON objects, as many as fit under the manifest size limit: parsing is
    # bounded by that limit, and the layer count is refused before anything else happens.
    server = servers()
    count = (MAX_MANIFEST_SIZE - 400) // 3
    raw = b'{"schemaVersion":2,"mediaType":"%s","config":%s,"layers":[%s]}' % (
        OCI_MANIFEST.encode(),
        _json(json.loads(_image().manifest_bytes)["config"]),
        b",".join([b"{}"] * count),
    )
    assert len(raw) <= MAX_MANIFEST_SIZE
    _serve_document(server, "1", raw)
    peak_file = tmp_path / "peak-rss"
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_RUNNER, str(peak_file), "pull", f"{server.host}/{REPO}:1"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )

    assert proc.returncode == 6, proc.stderr
    assert f"{count} layers; refused" in proc.stderr
    # KiB: the interpreter, libcurl and one parsed 4 MiB document.
    peak = int(peak_file.read_text())
    assert 0 < peak < 400 * 1024, f"peak resident size {peak} KiB"
    assert index_entries(Path(docker_config.store)) == []
