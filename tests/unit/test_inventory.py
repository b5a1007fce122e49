"""Tests for fastpull.store.inventory: closures of images, rmi's matching rule, df's arithmetic."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpull.errors import ManifestError
from fastpull.reference import Reference
from fastpull.store.inventory import (
    CONFIG,
    INDEX,
    LAYER,
    MANIFEST,
    MAX_DEPTH,
    SOURCE_MANIFEST,
    Closure,
    Gap,
    Need,
    disk_usage,
    display_name,
    names_image,
    unreferenced,
    walk,
)
from fastpull.types import Descriptor, Digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


class Blobs(dict[Digest, bytes]):
    """A fake store: documents by digest, and a reader over them that counts reads."""

    def add(self, data: bytes) -> Descriptor:
        d = digest(data)
        self[d] = data
        return Descriptor("application/octet-stream", d, len(data))

    def read(self, d: Digest, size: int | None) -> bytes | None:
        data = self.get(d)
        if data is None or (size is not None and len(data) != size):
            return None
        return data


def descriptor_json(media_type: str, d: Descriptor, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": str(d.digest), "size": d.size, **extra}


def manifest(
    blobs: Blobs, config: Descriptor, layers: list[Descriptor], media_type: str = OCI_MANIFEST
) -> Descriptor:
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor_json(OCI_CONFIG, config),
        "layers": [descriptor_json(LAYER_TYPE, layer) for layer in layers],
    }
    stored = blobs.add(orjson.dumps(doc))
    return Descriptor(media_type, stored.digest, stored.size)


def index(blobs: Blobs, children: list[Descriptor]) -> Descriptor:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            descriptor_json(c.media_type, c, platform={"os": "linux", "architecture": "amd64"})
            for c in children
        ],
    }
    stored = blobs.add(orjson.dumps(doc))
    return Descriptor(OCI_INDEX, stored.digest, stored.size)


def roles(closure: Closure) -> list[tuple[Digest, str]]:
    return [(need.digest, need.role) for need in closure.needs]


def test_a_manifest_needs_itself_its_config_and_its_layers_once() -> None:
    blobs = Blobs()
    config, a, b = blobs.add(b"config"), blobs.add(b"a"), blobs.add(b"b")
    entry = manifest(blobs, config, [a, b, a])

    closure = walk(entry, blobs.read)

    assert closure.complete
    assert roles(closure) == [
        (entry.digest, MANIFEST),
        (config.digest, CONFIG),
        (a.digest, LAYER),
        (b.digest, LAYER),
    ]
    assert [need.size for need in closure.needs] == [entry.size, 6, 1, 1]


def test_an_index_is_walked_through_to_every_child() -> None:
    blobs = Blobs()
    shared = blobs.add(b"shared layer")
    amd = manifest(blobs, blobs.add(b"amd config"), [shared, blobs.add(b"amd layer")])
    arm = manifest(blobs, blobs.add(b"arm config"), [shared])
    nested = index(blobs, [arm])
    entry = index(blobs, [amd, nested])

    closure = walk(entry, blobs.read)

    assert closure.complete
    assert [role for _, role in roles(closure)] == [
        INDEX,
        MANIFEST,
        CONFIG,
        LAYER,
        LAYER,
        INDEX,
        MANIFEST,
        CONFIG,
    ]
    assert closure.digests == frozenset(blobs)


def test_the_source_manifest_is_needed_too() -> None:
    blobs = Blobs()
    config, layer = blobs.add(b"config"), blobs.add(b"layer")
    original = manifest(blobs, config, [layer], DOCKER_MANIFEST)
    converted = manifest(blobs, config, [layer])

    closure = walk(converted, blobs.read, original.digest)

    assert closure.complete
    assert roles(closure)[-1] == (original.digest, SOURCE_MANIFEST)
    assert closure.needs[-1].size is None
    assert closure.digests == frozenset(blobs)


def test_a_missing_manifest_is_a_gap_and_its_children_are_unknown() -> None:
    blobs = Blobs()
    entry = manifest(blobs, blobs.add(b"config"), [blobs.add(b"layer")])
    del blobs[entry.digest]

    closure = walk(entry, blobs.read)

    assert not closure.complete
    assert closure.gaps == (Gap(Need(entry.digest, entry.size, MANIFEST, OCI_MANIFEST), None),)
    assert roles(closure) == [(entry.digest, MANIFEST)]


def test_a_manifest_of_the_wrong_size_is_not_read() -> None:
    blobs = Blobs()
    entry = manifest(blobs, blobs.add(b"config"), [])
    bigger = Descriptor(OCI_MANIFEST, entry.digest, entry.size + 1)

    closure = walk(bigger, blobs.read)

    assert [gap.reason for gap in closure.gaps] == [None]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "manifest is not valid JSON"),
        (b'{"schemaVersion": 1}', "schema 1 is not supported"),
        (b'{"schemaVersion": 2, "manifests": [], "layers": []}', "ambiguous"),
    ],
)
def test_an_unusable_manifest_is_a_gap_with_its_reason(body: bytes, reason: str) -> None:
    blobs = Blobs()
    entry = blobs.add(body)

    closure = walk(Descriptor(OCI_MANIFEST, entry.digest, entry.size), blobs.read)

    (gap,) = closure.gaps
    assert gap.reason is not None and reason in gap.reason
    assert str(entry.digest) in gap.reason


def test_a_reader_may_say_why_a_blob_is_no_manifest() -> None:
    def refuse(d: Digest, size: int | None) -> bytes | None:
        raise ManifestError("too large to be a manifest")

    closure = walk(Descriptor(OCI_MANIFEST, digest(b"x"), 1), refuse)

    assert [gap.reason for gap in closure.gaps] == ["too large to be a manifest"]


def test_cycles_and_deep_nesting_end() -> None:
    blobs = Blobs()
    layer_doc = manifest(blobs, blobs.add(b"c"), [])
    entry = layer_doc
    for _ in range(MAX_DEPTH + 1):
        entry = index(blobs, [entry])

    deep = walk(entry, blobs.read)

    assert [gap.reason for gap in deep.gaps] == [f"indexes nest more than {MAX_DEPTH} deep"]
    # A document listing itself (possible only with a lying reader) is visited once.
    fake = Digest("sha256", "ab" * 32)
    looping = orjson.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_INDEX, "digest": str(fake), "size": 1}],
        }
    )
    closure = walk(Descriptor(OCI_INDEX, fake, 1), lambda d, size: looping)
    assert closure.complete and roles(closure) == [(fake, INDEX)]


def test_unreferenced_keeps_the_order_given() -> None:
    a, b, c = digest(b"a"), digest(b"b"), digest(b"c")
    needs = Closure((Need(b, 1, LAYER),), ())

    assert unreferenced([c, b, a], [needs]) == [c, a]
    assert unreferenced([a], []) == [a]


# -- rmi's names ---------------------------------------------------------------------------------

REPO_DIGEST = digest(b"index")
MANIFEST_DIGEST = digest(b"manifest")


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        ("debian", "docker.io/library/debian:latest", True),
        ("debian:12", "docker.io/library/debian:latest", False),
        ("library/debian", "docker.io/library/debian:latest", True),
        ("ubuntu", "docker.io/library/debian:latest", False),
        (f"debian@{REPO_DIGEST}", "docker.io/library/debian:latest", True),
        (f"debian@{MANIFEST_DIGEST}", "docker.io/library/debian:12", True),
        (f"debian:12@{REPO_DIGEST}", "docker.io/library/debian:latest", False),
        (f"debian:12@{REPO_DIGEST}", "docker.io/library/debian:12", True),
        (f"ubuntu@{REPO_DIGEST}", "docker.io/library/debian:latest", False),
        (f"debian@{digest(b'other')}", "docker.io/library/debian:latest", False),
        (f"debian@{digest(b'other')}", f"docker.io/library/debian@{digest(b'other')}", True),
        ("localhost:5000/app:1", "localhost:5000/app:1", True),
        ("localhost:5000/app:1", "not a reference", False),
    ],
)
def test_names_image(text: str, name: str, expected: bool) -> None:
    assert names_image(Reference.parse(text), name, {REPO_DIGEST, MANIFEST_DIGEST}) is expected


def test_display_name() -> None:
    assert display_name("docker.io/library/debian:latest") == "debian:latest"
    assert display_name("localhost:5000/app:1") == "localhost:5000/app:1"
    assert display_name("Not A Reference") == "Not A Reference"


# -- df ------------------------------------------------------------------------------------------


def test_disk_usage_by_hand() -> None:
    a, b, c, d, missing = (digest(x) for x in (b"a", b"b", b"c", b"d", b"missing"))
    stored = {a: 100, b: 20, c: 3, d: 4000}

    usage = disk_usage(stored, [{a, b, missing}, {a, c}, {a}], [(50, False), (7, True)])

    assert (usage.images, usage.blobs, usage.blob_bytes) == (3, 4, 4123)
    assert (usage.used_blobs, usage.used_bytes) == (3, 123)
    assert (usage.shared_blobs, usage.shared_bytes) == (1, 100)
    assert (usage.unreferenced_blobs, usage.unreferenced_bytes) == (1, 4000)
    assert (usage.ingests, usage.ingest_bytes) == (2, 57)
    assert (usage.stale_ingests, usage.stale_ingest_bytes) == (1, 50)
    assert usage.total_bytes == 4180
    assert usage.reclaimable_bytes == 4050


_DIGESTS = st.integers(0, 15).map(lambda i: digest(bytes([i])))


@given(
    stored=st.dictionaries(_DIGESTS, st.integers(0, 10**12)),
    images=st.lists(st.frozensets(_DIGESTS)),
    ingests=st.lists(st.tuples(st.integers(0, 10**9), st.booleans())),
)
def test_disk_usage_adds_up(
    stored: Mapping[Digest, int],
    images: list[frozenset[Digest]],
    ingests: list[tuple[int, bool]],
) -> None:
    usage = disk_usage(stored, images, ingests)

    needed = set().union(*images) if images else set()
    twice = {d for d in needed if sum(d in image for image in images) > 1}
    assert usage.used_bytes == sum(size for d, size in stored.items() if d in needed)
    assert usage.shared_bytes == sum(size for d, size in stored.items() if d in twice)
    assert usage.used_bytes + usage.unreferenced_bytes == usage.blob_bytes == sum(stored.values())
    assert 0 <= usage.shared_bytes <= usage.used_bytes
    assert usage.reclaimable_bytes <= usage.total_bytes
    assert usage.stale_ingest_bytes == sum(size for size, live in ingests if not live)
