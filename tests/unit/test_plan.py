"""An image plan's shape: each platform's manifest paired with the index entry naming it,
and the blobs and layers the plan needs, each digest once. No network, no store."""

from __future__ import annotations

import hashlib

from fastpull.engine.download import BlobStats, Fetched
from fastpull.puller import ImagePlan, PlannedManifest
from fastpull.reference import Reference
from fastpull.registry.manifest import OCI_CONFIG, OCI_MANIFEST, ImageManifest
from fastpull.types import Descriptor, Digest, Platform, PlatformSelection

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _digest(name: str) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(name.encode()).hexdigest())


def _blob(name: str, size: int, media_type: str = LAYER) -> Descriptor:
    return Descriptor(media_type, _digest(name), size)


def _manifest(name: str, *layers: Descriptor) -> ImageManifest:
    return ImageManifest(
        OCI_MANIFEST, _digest(name), _blob(f"{name}-config", 7, OCI_CONFIG), layers, b"{}"
    )


SHARED = _blob("shared", 1000)
AMD = _manifest("amd64", SHARED, _blob("amd-only", 10))
ARM = _manifest("arm64", SHARED, _blob("arm-only", 20))


def _entry(manifest: ImageManifest, platform: str) -> Descriptor:
    return Descriptor(OCI_MANIFEST, manifest.digest, 2, Platform.parse(platform))


def _plan(*manifests: PlannedManifest) -> ImagePlan:
    return ImagePlan(
        Reference.parse("r.example/app:1"),
        _digest("index"),
        manifests,
        index=None,
        platforms=PlatformSelection((Platform.parse("linux/amd64"),)),
    )


def test_each_manifest_travels_with_the_entry_that_named_it() -> None:
    amd, arm = _entry(AMD, "linux/amd64"), _entry(ARM, "linux/arm64")
    plan = _plan(PlannedManifest(AMD, amd), PlannedManifest(ARM, arm))
    assert [(p.manifest.digest, p.entry) for p in plan.manifests] == [
        (AMD.digest, amd),
        (ARM.digest, arm),
    ]
    assert PlannedManifest(AMD).entry is None


def test_blobs_are_configs_and_layers_each_once_in_manifest_order() -> None:
    plan = _plan(PlannedManifest(AMD), PlannedManifest(ARM))
    assert [b.digest for b in plan.blobs] == [
        AMD.config.digest,
        SHARED.digest,
        AMD.layers[1].digest,
        ARM.config.digest,
        ARM.layers[1].digest,
    ]
    assert plan.layers == (SHARED, AMD.layers[1], SHARED, ARM.layers[1])
    assert plan.layer_digests == {SHARED.digest, AMD.layers[1].digest, ARM.layers[1].digest}


def test_a_blob_already_stored_has_named_numbers() -> None:
    stats = BlobStats.already_stored(SHARED.digest, SHARED.size)
    assert stats == BlobStats(
        SHARED.digest,
        SHARED.size,
        downloaded=0,
        seconds=0.0,
        attempts=0,
        connections=0,
        already_present=True,
    )
    assert Fetched((stats,)).workers == 0
