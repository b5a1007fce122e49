"""How a batch's missing blobs become cluster tasks: pure, no Dask, no I/O.

A task is one engine run on one worker. Tasks are filled largest blob first up to a byte
budget, so that the cluster is kept busy to the end (many tasks per worker) while each
engine run still has enough bytes to keep its connections full; a blob larger than the
budget is a task of its own. Tasks are handed to Dask largest first, which is what
balances a set of uneven jobs over workers best (``shared/field-notes.md``, Dask §22).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fastpull.types import Descriptor

MIB = 1024 * 1024
# Below this a task's fixed costs (a Dask round trip, worker processes starting) dominate.
MIN_TASK_BYTES = 256 * MIB
# Tasks per worker: enough that a slow or lost worker leaves little for the others to
# wait on, few enough that the fixed costs stay small.
TASKS_PER_WORKER = 4


@dataclass(frozen=True)
class BlobRef:
    """A blob and where to get it: one repository of one registry that has it."""

    descriptor: Descriptor
    registry: str
    repository: str

    @property
    def size(self) -> int:
        return self.descriptor.size


@dataclass(frozen=True)
class Task:
    """Blobs fetched together in one engine run on one worker."""

    number: int
    blobs: tuple[BlobRef, ...]

    @property
    def size(self) -> int:
        return sum(blob.size for blob in self.blobs)


def task_budget(
    total_bytes: int,
    workers: int,
    min_task_bytes: int = MIN_TASK_BYTES,
    max_task_bytes: int | None = None,
) -> int:
    """Bytes per task for ``total_bytes`` over ``workers`` workers; ``max_task_bytes`` caps
    it (a worker that must hold a whole task on its own disk)."""
    share = -(-total_bytes // max(1, workers * TASKS_PER_WORKER))
    budget = max(min_task_bytes, share)
    return budget if max_task_bytes is None else max(1, min(budget, max_task_bytes))


def split(
    blobs: Iterable[BlobRef],
    workers: int,
    *,
    min_task_bytes: int = MIN_TASK_BYTES,
    max_task_bytes: int | None = None,
) -> list[Task]:
    """Every blob (each digest once) in a task, the tasks largest first.

    First-fit decreasing: each blob, largest first, goes into the first task it fits in.
    """
    unique = {blob.descriptor.digest: blob for blob in blobs}
    ordered = sorted(unique.values(), key=lambda b: (-b.size, str(b.descriptor.digest)))
    total = sum(b.size for b in ordered)
    budget = task_budget(total, workers, min_task_bytes, max_task_bytes)
    bins: list[list[BlobRef]] = []
    sizes: list[int] = []
    for blob in ordered:
        for index, used in enumerate(sizes):
            if used + blob.size <= budget:
                bins[index].append(blob)
                sizes[index] += blob.size
                break
        else:
            bins.append([blob])
            sizes.append(blob.size)
    ranked = sorted(zip(sizes, bins, strict=True), key=lambda pair: -pair[0])
    return [Task(number, tuple(chosen)) for number, (_, chosen) in enumerate(ranked)]


def registries(tasks: Sequence[Task]) -> list[str]:
    """Every registry some task fetches from, each once, sorted."""
    return sorted({blob.registry for task in tasks for blob in task.blobs})


__all__ = ["BlobRef", "Task", "registries", "split", "task_budget"]
