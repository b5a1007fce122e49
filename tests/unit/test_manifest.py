"""Manifest and index parsing: what is accepted, what is refused, platform choice."""

from __future__ import annotations

import contextlib
import hashlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpull.errors import FastpullError, ManifestError, PlatformNotFound, UnsupportedManifest
from fastpull.registry.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageIndex,
    ImageManifest,
    check_digest,
    parse_config,
    parse_document,
    select_platform,
)
from fastpull.types import Digest, Platform


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def _desc(media_type: str, data: bytes = b"x", **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": str(_digest(data)), "size": len(data), **extra}


def _manifest(**overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _desc(OCI_CONFIG, b"{}"),
        "layers": [_desc("application/vnd.oci.image.layer.v1.tar+gzip", b"layer")],
    }
    doc.update(overrides)
    return doc


def _parse(doc: object, content_type: str | None = OCI_MANIFEST) -> ImageIndex | ImageManifest:
    raw = orjson.dumps(doc)
    return parse_document(raw, content_type, _digest(raw), "test:1")


def test_oci_manifest_parses_with_config_and_layers() -> None:
    manifest = _parse(_manifest())
    assert isinstance(manifest, ImageManifest)
    assert manifest.config.media_type == OCI_CONFIG
    assert len(manifest.layers) == 1
    assert manifest.size == 2 + 5


def test_docker_schema2_manifest_parses() -> None:
    doc = _manifest(mediaType=DOCKER_MANIFEST)
    doc["config"] = _desc("application/vnd.docker.container.image.v1+json", b"{}")
    assert isinstance(_parse(doc, DOCKER_MANIFEST), ImageManifest)


def test_index_and_manifest_list_parse() -> None:
    entry = _desc(OCI_MANIFEST, b"m", platform={"os": "linux", "architecture": "amd64"})
    for media_type in (OCI_INDEX, DOCKER_LIST):
        index = _parse(
            {"schemaVersion": 2, "mediaType": media_type, "manifests": [entry]}, media_type
        )
        assert isinstance(index, ImageIndex)
        assert index.manifests[0].platform == Platform("linux", "amd64")


def test_media_type_may_come_from_content_type_alone() -> None:
    doc = _manifest()
    del doc["mediaType"]
    assert isinstance(_parse(doc, OCI_MANIFEST), ImageManifest)
    assert isinstance(_parse(doc, "application/json"), ImageManifest)


@pytest.mark.parametrize(
    ("doc", "content_type", "error", "fragment"),
    [
        ({"schemaVersion": 1, "fsLayers": []}, "application/json", UnsupportedManifest, "schema 1"),
        (
            _manifest(),
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            UnsupportedManifest,
            "schema 1",
        ),
        (_manifest(), DOCKER_MANIFEST, ManifestError, "does not match"),
        (_manifest(manifests=[]), OCI_MANIFEST, ManifestError, "both"),
        (_manifest(schemaVersion=3), OCI_MANIFEST, UnsupportedManifest, "schemaVersion"),
        (
            _manifest(mediaType="application/x-foo"),
            "application/x-foo",
            UnsupportedManifest,
            "media type",
        ),
        (_manifest(layers="nope"), OCI_MANIFEST, ManifestError, "layers"),
        (
            _manifest(config=_desc("application/vnd.cncf.helm.config.v1+json")),
            OCI_MANIFEST,
            UnsupportedManifest,
            "not a container image",
        ),
        (
            _manifest(
                layers=[{"mediaType": "a/b", "digest": "sha256:../../etc/passwd", "size": 1}]
            ),
            OCI_MANIFEST,
            ManifestError,
            "digest",
        ),
        (
            _manifest(layers=[{"mediaType": "a/b", "digest": "md5:" + "a" * 32, "size": 1}]),
            OCI_MANIFEST,
            ManifestError,
            "unsupported digest algorithm",
        ),
        (_manifest(layers=[_desc("a/b", size=-1)]), OCI_MANIFEST, ManifestError, "impossible size"),
        (
            _manifest(layers=[_desc("a/b", size=1 << 60)]),
            OCI_MANIFEST,
            ManifestError,
            "impossible size",
        ),
        (_manifest(layers=[_desc("a/b", size=True)]), OCI_MANIFEST, ManifestError, "size"),
        (_manifest(layers=[_desc("a/b")] * 5000), OCI_MANIFEST, ManifestError, "refused"),
        ([1, 2], OCI_MANIFEST, ManifestError, "not a JSON object"),
    ],
)
def test_bad_documents_are_refused(
    doc: object, content_type: str, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        _parse(doc, content_type)


def test_not_json_and_oversized_are_refused() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_document(b"{nope", OCI_MANIFEST, _digest(b"{nope"), "x")
    big = b" " * (4 << 20) + b"{}"
    with pytest.raises(ManifestError, match="larger than"):
        parse_document(big, OCI_MANIFEST, _digest(big), "x")


def test_check_digest_compares_raw_bytes() -> None:
    raw = orjson.dumps(_manifest())
    check_digest(raw, _digest(raw), "m")
    with pytest.raises(ManifestError, match="expected"):
        check_digest(raw + b" ", _digest(raw), "m")
    sha512 = Digest("sha512", hashlib.sha512(raw).hexdigest())
    check_digest(raw, sha512, "m")


def _index(*platforms: dict[str, str]) -> ImageIndex:
    entries = [_desc(OCI_MANIFEST, str(i).encode(), platform=p) for i, p in enumerate(platforms)]
    doc = _parse({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, OCI_INDEX)
    assert isinstance(doc, ImageIndex)
    return doc


def test_select_platform_normalizes_and_falls_back_for_arm() -> None:
    index = _index(
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
        {"os": "linux", "architecture": "arm", "variant": "v6"},
        {"os": "unknown", "architecture": "unknown"},
    )
    assert select_platform(index, Platform.parse("linux/amd64"), "x").platform == Platform(
        "linux", "amd64"
    )
    assert select_platform(index, Platform.parse("linux/aarch64"), "x").platform == Platform(
        "linux", "arm64"
    )
    assert select_platform(index, Platform.parse("linux/arm64/v8"), "x").platform == Platform(
        "linux", "arm64"
    )
    # An arm/v7 machine runs v6 images, as containerd's matcher allows.
    assert select_platform(index, Platform.parse("linux/arm/v7"), "x").platform == Platform(
        "linux", "arm", "v6"
    )
    with pytest.raises(PlatformNotFound, match=r"linux/s390x.*available: linux/amd64"):
        select_platform(index, Platform.parse("linux/s390x"), "x")


def test_parse_config_reads_created_and_checks_diff_ids() -> None:
    raw = orjson.dumps(
        {
            "created": "2024-01-02T03:04:05.123456789Z",
            "os": "linux",
            "architecture": "arm64",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
        }
    )
    config = parse_config(raw, "x", layer_count=1)
    assert config.created is not None and config.created.year == 2024
    assert config.platform == Platform("linux", "arm64")
    with pytest.raises(ManifestError, match="config lists 1 layers, the manifest 2"):
        parse_config(raw, "x", layer_count=2)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=512), st.sampled_from([None, OCI_MANIFEST, OCI_INDEX, "application/json"])
)
def test_arbitrary_bytes_never_crash_the_parser(raw: bytes, content_type: str | None) -> None:
    with contextlib.suppress(FastpullError):
        parse_document(raw, content_type, _digest(raw), "fuzz")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "mediaType",
                    "digest",
                    "size",
                    "layers",
                    "config",
                    "manifests",
                    "schemaVersion",
                    "platform",
                    "urls",
                    "annotations",
                    "os",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_documents_never_crash_the_parser(doc: object) -> None:
    with contextlib.suppress(FastpullError):
        _parse(doc, None)
