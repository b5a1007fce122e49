"""Tests for fastpull.cluster.plan: how a batch's blobs become cluster tasks."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from fastpull.cluster.plan import MIB, BlobRef, registries, split, task_budget
from fastpull.types import Descriptor, Digest

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _blob(size: int, name: str, registry: str = "r.example", repository: str = "app") -> BlobRef:
    digest = Digest.parse("sha256:" + hashlib.sha256(name.encode()).hexdigest())
    return BlobRef(Descriptor(LAYER, digest, size), registry, repository)


def test_small_blobs_share_one_task_and_a_big_one_has_its_own() -> None:
    blobs = [_blob(300 * MIB, "big"), _blob(10 * MIB, "a"), _blob(20 * MIB, "b")]

    tasks = split(blobs, workers=2)

    assert [[b.descriptor.digest for b in t.blobs] for t in tasks] == [
        [blobs[0].descriptor.digest],
        [blobs[2].descriptor.digest, blobs[1].descriptor.digest],
    ]
    assert [t.number for t in tasks] == [0, 1]


def test_budget_spreads_a_large_batch_over_tasks_per_worker() -> None:
    # 64 blobs of 100 MiB over 4 workers: 16 tasks of 400 MiB, 4 blobs each.
    blobs = [_blob(100 * MIB, f"b{i}") for i in range(64)]

    tasks = split(blobs, workers=4)

    assert task_budget(6400 * MIB, 4) == 400 * MIB
    assert len(tasks) == 16
    assert {len(t.blobs) for t in tasks} == {4}


def test_a_blob_two_images_share_is_fetched_in_one_task_only() -> None:
    shared = _blob(5 * MIB, "base", repository="one")
    again = _blob(5 * MIB, "base", repository="two")

    tasks = split([shared, again, _blob(1, "x")], workers=1, min_task_bytes=1)

    digests = [b.descriptor.digest for t in tasks for b in t.blobs]
    assert digests.count(shared.descriptor.digest) == 1


def test_registries_lists_each_once() -> None:
    tasks = split(
        [_blob(1, "a", "b.example"), _blob(2, "b", "a.example"), _blob(3, "c", "b.example")], 1
    )

    assert registries(tasks) == ["a.example", "b.example"]


sizes = st.lists(st.integers(min_value=0, max_value=2**34), min_size=0, max_size=60)


@given(sizes, st.integers(min_value=1, max_value=50), st.integers(min_value=1, max_value=2**30))
def test_every_blob_lands_in_exactly_one_task_within_the_budget(
    blob_sizes: list[int], workers: int, minimum: int
) -> None:
    blobs = [_blob(size, f"blob-{i}") for i, size in enumerate(blob_sizes)]
    budget = task_budget(sum(blob_sizes), workers, minimum)

    tasks = split(blobs, workers, min_task_bytes=minimum)

    placed = [b.descriptor.digest for t in tasks for b in t.blobs]
    assert sorted(map(str, placed)) == sorted(str(b.descriptor.digest) for b in blobs)
    for task in tasks:
        assert task.size <= budget or len(task.blobs) == 1
    assert [t.size for t in tasks] == sorted((t.size for t in tasks), reverse=True)
    assert [t.number for t in tasks] == list(range(len(tasks)))


@given(
    sizes,
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=1, max_value=2**30),
    st.integers(min_value=1, max_value=2**33),
)
def test_a_cap_bounds_every_task_but_a_lone_larger_blob(
    blob_sizes: list[int], workers: int, minimum: int, cap: int
) -> None:
    blobs = [_blob(size, f"blob-{i}") for i, size in enumerate(blob_sizes)]

    tasks = split(blobs, workers, min_task_bytes=minimum, max_task_bytes=cap)

    assert sum(len(t.blobs) for t in tasks) == len(blobs)
    for task in tasks:
        assert task.size <= cap or len(task.blobs) == 1
    assert task_budget(sum(blob_sizes), workers, minimum, cap) <= cap


def test_a_relay_spec_never_shows_its_credentials() -> None:
    from fastpull.cluster.relay import RelayBlob, RelaySpec, Target
    from fastpull.registry.settings import Settings
    from fastpull.types import Credentials

    creds = Credentials("bob", "s3cret-pass", "refresh-ghi", "bearer-jkl")
    blob = RelayBlob(_blob(1, "a"), (Target("dest.example", "mirror/app"),))
    spec = RelaySpec("job", 0, Settings(), (blob,), (("dest.example", creds),))

    shown = repr(spec) + str(spec)
    assert "bob" in shown
    for secret in ("s3cret-pass", "refresh-ghi", "bearer-jkl"):
        assert secret not in shown


def test_a_task_spec_never_shows_its_credentials() -> None:
    # Dask logs a failed task's arguments with repr().
    from fastpull.cluster.tasks import TaskSpec
    from fastpull.registry.settings import Settings
    from fastpull.types import Credentials

    creds = Credentials("alice", "pa55-word-xyz", "refresh-abc", "bearer-def")
    spec = TaskSpec("job", 0, "/srv/store", Settings(), (_blob(1, "a"),), (("r.example", creds),))

    shown = repr(spec) + str(spec)
    assert "alice" in shown
    for secret in ("pa55-word-xyz", "refresh-abc", "bearer-def"):
        assert secret not in shown
