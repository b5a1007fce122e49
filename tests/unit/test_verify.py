"""Streaming verification: chunks written in any order, hashed over the contiguous prefix,
give the same digest as hashlib, with the native extension and with the fallback."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import tempfile

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpull import hashing
from fastpull.engine import verify
from fastpull.engine.verify import STEP, Verifier
from fastpull.errors import StoreError
from fastpull.types import Digest

BACKENDS = hashing.AVAILABLE_BACKENDS
REFERENCE = {
    "sha256": lambda data: hashlib.sha256(data).hexdigest(),
    "sha512": lambda data: hashlib.sha512(data).hexdigest(),
    "blake3": lambda data: blake3.blake3(data).hexdigest(),
}


def _verify_out_of_order(
    data: bytes, cuts: list[int], order_seed: int, algorithm: str, backend: str
) -> Verifier:
    """Write ``data`` in chunks completing in a random order, advancing like the engine."""
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = list(itertools.pairwise(bounds))
    random.Random(order_seed).shuffle(chunks)
    digest = Digest(algorithm, REFERENCE[algorithm](data))
    with tempfile.TemporaryFile() as fh:
        fd = fh.fileno()
        os.ftruncate(fd, len(data))
        verifier = Verifier(digest, fd, backend)
        done: dict[int, int] = {}
        prefix = 0
        for start, end in chunks:
            os.pwrite(fd, data[start:end], start)
            done[start] = end
            while prefix in done:
                prefix = done.pop(prefix)
            while verifier.position < prefix:
                verifier.advance(prefix)
        assert verifier.position == len(data)
        return verifier


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", ["sha256", "sha512", "blake3"])
@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=200_000),
    cuts=st.lists(st.integers(0, 200_000), max_size=12),
    order=st.integers(0, 2**32),
)
def test_out_of_order_chunks_verify_like_hashlib(
    backend: str, algorithm: str, data: bytes, cuts: list[int], order: int
) -> None:
    verifier = _verify_out_of_order(data, cuts, order, algorithm, backend)
    assert verifier.matches()
    assert verifier.hexdigest() == REFERENCE[algorithm](data)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_blob_in_many_steps_and_a_mismatch(backend: str) -> None:
    data = random.Random(1).randbytes(5 * STEP // 2 + 12345)  # more than two STEPs
    verifier = _verify_out_of_order(data, [1 << 20, 70 << 20, 90 << 20], 7, "sha256", backend)
    assert verifier.matches()
    wrong = Digest("sha256", hashlib.sha256(data + b"x").hexdigest())
    with tempfile.TemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        other = Verifier(wrong, fh.fileno(), backend)
        while other.advance(len(data)) < len(data):
            pass
        assert not other.matches()
        other.restart()
        assert other.position == 0


def test_a_file_shorter_than_claimed_is_an_error() -> None:
    with tempfile.TemporaryFile() as fh:
        fh.write(b"short")
        fh.flush()
        verifier = Verifier(Digest("sha256", "0" * 64), fh.fileno())
        with pytest.raises(StoreError, match="shorter"):
            verifier.advance(100)


def test_hashed_ranges_are_released_and_released_again_once_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(verify, "STEP", 1000)
    monkeypatch.setattr(verify, "RELEASE_AGAIN_AFTER", 2500)
    monkeypatch.setattr(verify, "RELEASE_AGAIN_MIN", 1500)
    data = random.Random(2).randbytes(7000)
    released: list[tuple[int, int]] = []
    with tempfile.TemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
        verifier = Verifier(digest, fh.fileno(), release=lambda _fd, o, n: released.append((o, n)))
        while verifier.position < len(data):
            verifier.advance(len(data))
        assert verifier.matches()
    first = [(i * 1000, 1000) for i in range(7)]
    # At 4000 the first 1500 settled bytes go; at 5000 only 1000 more have settled (under
    # the minimum); at 6000 it is 2000; at 7000 again only 1000.
    again = [(0, 1500), (1500, 2000)]
    assert sorted(released) == sorted(first + again)
    assert released.index((0, 1500)) == released.index((3000, 1000)) + 1
