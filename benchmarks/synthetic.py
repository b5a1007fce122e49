"""The benchmark's synthetic images, with their layers cached on disk between harness runs.

Layers are uncompressed tars of pseudo-random bytes (gzip would not shrink them, and
compressing gigabytes would dominate the set-up time). Building the big image means generating
and hashing about 2 GB, so each layer is kept in the cache directory under a name derived from
its seed and size, next to a small JSON file with its digests; a later run reuses both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import Image, Layer, MiB, make_image, make_layer


@dataclass(frozen=True)
class ImageSpec:
    """What to build: one layer per ``(payload bytes, seed)`` pair, pushed as ``repo:tag``."""

    name: str
    repository: str
    tag: str
    layers: tuple[tuple[int, int], ...]


def image_specs(*, quick: bool) -> dict[str, ImageSpec]:
    """The ``big``, ``many`` and ``small`` images, or stand-ins for ``big`` and ``many`` for
    ``--quick``."""
    if quick:
        big_sizes = [64 * MiB, 16 * MiB, 4 * MiB, 1 * MiB]
        many_sizes = _random_sizes(count=8, low_mib=1, high_mib=4, seed=8)
    else:
        big_sizes = [1024 * MiB, 512 * MiB, 256 * MiB, 64 * MiB, 8 * MiB, 1 * MiB]
        many_sizes = _random_sizes(count=40, low_mib=4, high_mib=16, seed=40)
    # What most pulls look like: tens of MB in a handful of layers; the same in --quick.
    small_sizes = [20 * MiB, 8 * MiB, 4 * MiB, 1 * MiB, MiB // 4]
    # Distinct seed ranges keep every layer of every image distinct, so no blob is shared.
    return {
        "big": ImageSpec(
            "big", "bench/big", "1", tuple((s, 1000 + i) for i, s in enumerate(big_sizes))
        ),
        "many": ImageSpec(
            "many", "bench/many", "1", tuple((s, 2000 + i) for i, s in enumerate(many_sizes))
        ),
        "small": ImageSpec(
            "small", "bench/small", "1", tuple((s, 3000 + i) for i, s in enumerate(small_sizes))
        ),
    }


def _random_sizes(*, count: int, low_mib: int, high_mib: int, seed: int) -> list[int]:
    # A fixed seed gives every run of the harness the same layer sizes (and cache keys).
    rng = random.Random(seed)
    return [rng.randint(low_mib, high_mib) * MiB for _ in range(count)]


def build_image(spec: ImageSpec, cache_dir: Path) -> Image:
    """The image for ``spec``, building only the layers missing from ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return make_image([cached_layer(cache_dir, size, seed) for size, seed in spec.layers])


def cached_layer(cache_dir: Path, size: int, seed: int) -> Layer:
    """A layer holding ``size`` random bytes from ``seed``, read from or added to the cache.

    A cached file is trusted if its size matches: the registry checks every pushed blob
    against its digest, so a damaged cache file fails loudly at push time.
    """
    stem = f"layer-seed{seed}-{size}"
    blob_path = cache_dir / f"{stem}.tar"
    meta_path = cache_dir / f"{stem}.json"
    if blob_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if blob_path.stat().st_size == meta["size"]:
            return Layer(
                digest=meta["digest"],
                size=meta["size"],
                media_type=meta["media_type"],
                diff_id=meta["diff_id"],
                path=blob_path,
            )
    # Building in a private directory means an interrupted build leaves no half-written file
    # under a name a later run would trust.
    with tempfile.TemporaryDirectory(prefix=".building-", dir=cache_dir) as tmp:
        layer = make_layer(size, compression="none", seed=seed, workdir=tmp)
        assert layer.path is not None
        os.replace(layer.path, blob_path)
        tmp_meta = Path(tmp) / "meta.json"
        tmp_meta.write_text(
            json.dumps(
                {
                    "digest": layer.digest,
                    "diff_id": layer.diff_id,
                    "size": layer.size,
                    "media_type": layer.media_type,
                }
            )
        )
        os.replace(tmp_meta, meta_path)
    return dataclasses.replace(layer, path=blob_path)


def largest_layer(image: Image) -> Layer:
    """The blob ``curl`` and ``aria2c`` fetch as single-file references."""
    return max(image.layers, key=lambda layer: layer.size)
