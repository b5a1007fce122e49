"""Tests for fastpull.cluster.copying's pure part: which manifests a copied image pushes."""

from __future__ import annotations

import json

from fastpull.cluster.copying import manifests_to_push
from fastpull.puller import ImagePlan, PlannedManifest
from fastpull.reference import Reference
from fastpull.registry.manifest import ImageIndex, ImageManifest, digest_of, parse_document
from fastpull.types import Descriptor, Digest, PlatformSelection
from tests.support.images import Image, Index, make_image, make_index, make_layer


def _parsed(raw: bytes, media_type: str) -> ImageIndex | ImageManifest:
    return parse_document(raw, media_type, digest_of(raw), "test")


def _plan(index: Index | None, chosen: list[Image]) -> ImagePlan:
    parsed_index = None
    entries: list[Descriptor | None] = [None] * len(chosen)
    if index is not None:
        parsed_index = _parsed(index.manifest_bytes, index.media_type)
        assert isinstance(parsed_index, ImageIndex)
        by_digest = {str(d.digest): d for d in parsed_index.manifests}
        entries = [by_digest[image.manifest_digest] for image in chosen]
    manifests = []
    for image, entry in zip(chosen, entries, strict=True):
        manifest = _parsed(image.manifest_bytes, image.media_type)
        assert isinstance(manifest, ImageManifest)
        manifests.append(PlannedManifest(manifest, entry))
    top = index.manifest_digest if index is not None else chosen[0].manifest_digest
    return ImagePlan(
        Reference.parse("r.example/app:1"),
        Digest.parse(top),
        tuple(manifests),
        parsed_index,
        PlatformSelection.parse("all"),
    )


def _images(format: str) -> list[Image]:
    return [
        make_image([make_layer(100, seed=n)], architecture=arch, format=format)  # type: ignore[arg-type]
        for n, arch in enumerate(("amd64", "arm64", "s390x"))
    ]


def test_a_single_manifest_is_pushed_as_served() -> None:
    image = _images("docker")[0]

    pushed = manifests_to_push(_plan(None, [image]))

    assert pushed == [(image.manifest_bytes, image.media_type, Digest.parse(image.manifest_digest))]


def test_a_whole_index_goes_after_its_children_byte_for_byte() -> None:
    images = _images("docker")
    index = make_index(images, format="docker")

    pushed = manifests_to_push(_plan(index, images))

    assert [raw for raw, _, _ in pushed] == [i.manifest_bytes for i in images] + [
        index.manifest_bytes
    ]
    assert pushed[-1][1:] == (index.media_type, Digest.parse(index.manifest_digest))


def test_an_index_of_some_platforms_is_remade_with_only_those() -> None:
    images = _images("oci")
    index = make_index(images)
    chosen = [images[2], images[0]]

    pushed = manifests_to_push(_plan(index, chosen))

    assert [raw for raw, _, _ in pushed[:-1]] == [i.manifest_bytes for i in chosen]
    raw, media_type, digest = pushed[-1]
    assert media_type == index.media_type
    assert digest == digest_of(raw)
    remade = json.loads(raw)
    assert remade["mediaType"] == index.media_type
    assert [m["digest"] for m in remade["manifests"]] == [i.manifest_digest for i in chosen]
    assert [m["platform"]["architecture"] for m in remade["manifests"]] == ["s390x", "amd64"]
