"""Tests for fastpull.hashing and the fastpull._native extension behind it."""

from __future__ import annotations

import errno
import hashlib
import importlib
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpull import hashing

REPO_ROOT = Path(__file__).resolve().parents[2]
HAVE_NATIVE = "native" in hashing.AVAILABLE_BACKENDS
needs_native = pytest.mark.skipif(
    not HAVE_NATIVE,
    reason="fastpull._native is not built (python setup.py build_ext --inplace)",
)
BACKENDS = [pytest.param("native", marks=needs_native), "python"]
SHA2 = ["sha256", "sha512"]

# FIPS 180-2, appendices B and C.
MESSAGE_448 = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
VECTORS = {
    "sha256": {
        b"": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        b"abc": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        MESSAGE_448: "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        b"a" * 1_000_000: "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
    },
    "sha512": {
        b"": "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
        "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
        b"abc": "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        MESSAGE_448: "204a8fc6dda82f0a0ced7beb8e08a41657c16ef468b228a8279be331a703c335"
        "96fd15c13b1b07f9aa1d3bea57789ca031ad85c7a71dd70354ec631238ca3445",
        b"a" * 1_000_000: "e718483d0ce769644e2e42c7bc15b4638e1f98b13b2044285632a803afa973eb"
        "de0ff244877ea60a4cb0432ce577c31beb009c5c2c49aa2e4eadb217ad8cc09b",
    },
}
VECTOR_CASES = [
    pytest.param(algorithm, message, digest, id=f"{algorithm}-{len(message)}")
    for algorithm, table in VECTORS.items()
    for message, digest in table.items()
]
BLAKE3_EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"

# Crosses the extension's 1 MiB read buffer twice and ends mid-buffer.
FILE_SIZE = 2 * (1 << 20) + 12_345


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, bytes]]:
    """An open fd on a file of FILE_SIZE random bytes, and those bytes."""
    content = random.Random(1).randbytes(FILE_SIZE)
    path = tmp_path_factory.mktemp("hashing") / "blob"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    yield fd, content
    os.close(fd)


def native_module() -> ModuleType:
    """The extension itself, for tests that call it directly."""
    return importlib.import_module("fastpull._native")


def test_ci_uses_native_backend() -> None:
    if os.environ.get("CI") != "true":
        pytest.skip("the native backend is only mandatory in CI")
    assert hashing.BACKEND == "native"


def test_backend_description() -> None:
    assert hashing.BACKEND in hashing.AVAILABLE_BACKENDS
    if hashing.BACKEND == "native":
        assert hashing.BACKEND_DETAIL.startswith("OpenSSL 3")
    else:
        assert hashing.BACKEND_DETAIL == "hashlib"


# --- known answers -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("algorithm", "message", "expected"), VECTOR_CASES)
def test_fips_vectors(backend: str, algorithm: str, message: bytes, expected: str) -> None:
    whole = hashing.new_hasher(algorithm, backend)
    whole.update(message)
    assert whole.hexdigest() == expected
    assert whole.digest() == bytes.fromhex(expected)

    # Small pieces take the path that keeps the GIL.
    pieces = hashing.new_hasher(algorithm, backend)
    for start in range(0, len(message), 1000):
        pieces.update(message[start : start + 1000])
    assert pieces.hexdigest() == expected


def test_blake3_empty() -> None:
    assert hashing.new_hasher("blake3").hexdigest() == BLAKE3_EMPTY


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("algorithm", "size"), [("sha256", 32), ("sha512", 64)])
def test_hasher_attributes(backend: str, algorithm: str, size: int) -> None:
    hasher = hashing.new_hasher(algorithm, backend)
    assert hasher.name == algorithm
    assert hasher.digest_size == size


@needs_native
@pytest.mark.parametrize("algorithm", SHA2)
def test_native_constructor_takes_initial_data(algorithm: str) -> None:
    native = native_module()
    cls = native.SHA256 if algorithm == "sha256" else native.SHA512
    hasher = cls(MESSAGE_448)
    assert hasher.hexdigest() == VECTORS[algorithm][MESSAGE_448]
    assert hasher.block_size == hashlib.new(algorithm).block_size


# --- equivalence with hashlib ------------------------------------------------------------


@settings(max_examples=200)
@given(data=st.data(), message=st.binary(max_size=10_000))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", SHA2)
def test_split_updates_match_hashlib(
    backend: str, algorithm: str, message: bytes, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(message)), max_size=8)))
    hasher = hashing.new_hasher(algorithm, backend)
    start = 0
    for cut in [*cuts, len(message)]:
        hasher.update(memoryview(message)[start:cut])
        # digest() must not disturb the running state.
        assert hasher.digest() == hashlib.new(algorithm, message[:cut]).digest()
        start = cut
    assert hasher.hexdigest() == hashlib.new(algorithm, message).hexdigest()


@given(prefix=st.binary(max_size=5000), left=st.binary(max_size=5000), right=st.binary())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", [*SHA2, "blake3"])
def test_copy_is_independent(
    backend: str, algorithm: str, prefix: bytes, left: bytes, right: bytes
) -> None:
    original = hashing.new_hasher(algorithm, backend)
    original.update(prefix)
    clone = original.copy()
    original.update(left)
    clone.update(right)
    reference = hashing.new_hasher(algorithm, "python")
    reference.update(prefix + left)
    assert original.digest() == reference.digest()
    reference = hashing.new_hasher(algorithm, "python")
    reference.update(prefix + right)
    assert clone.digest() == reference.digest()


# --- hash_fd_range -----------------------------------------------------------------------


def reference_hexdigest(algorithm: str, message: bytes) -> str:
    hasher = hashing.new_hasher(algorithm, "python")
    hasher.update(message)
    return hasher.hexdigest()


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.integers(0, FILE_SIZE + 100),
    length=st.integers(0, FILE_SIZE + (1 << 20)),
    prefix=st.binary(max_size=100),
)
@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", [*SHA2, "blake3"])
def test_fd_range_matches_slice(
    data_file: tuple[int, bytes],
    backend: str,
    algorithm: str,
    mapped: bool,
    offset: int,
    length: int,
    prefix: bytes,
) -> None:
    fd, content = data_file
    expected = content[offset : offset + length]
    hasher = hashing.new_hasher(algorithm, backend)
    hasher.update(prefix)
    assert hashing.hash_fd_range(hasher, fd, offset, length, mapped=mapped) == len(expected)
    assert hasher.hexdigest() == reference_hexdigest(algorithm, prefix + expected)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, FILE_SIZE), max_size=6))
@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fd_range_increments_add_up(
    data_file: tuple[int, bytes], backend: str, mapped: bool, cuts: list[int]
) -> None:
    # The engine hashes the written prefix of a download in consecutive ranges.
    fd, content = data_file
    hasher = hashing.new_hasher("sha256", backend)
    start = 0
    for cut in [*sorted(cuts), FILE_SIZE]:
        hashed = hashing.hash_fd_range(hasher, fd, start, cut - start, mapped=mapped)
        assert hashed == cut - start
        start = cut
    assert hasher.hexdigest() == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", [*SHA2, "blake3"])
def test_hash_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, algorithm: str
) -> None:
    content = random.Random(2).randbytes(10_000)
    for size in (0, 1000, 4000, 10_000):
        path = tmp_path / f"blob-{size}"
        path.write_bytes(content[:size])
        expected = reference_hexdigest(algorithm, content[:size])
        assert hashing.hash_file(path, algorithm, backend) == expected
        # Slices that divide the file exactly, and ones that do not.
        monkeypatch.setattr(hashing, "_FILE_SLICE", 1000)
        assert hashing.hash_file(path, algorithm, backend) == expected
        monkeypatch.setattr(hashing, "_FILE_SLICE", 3000)
        assert hashing.hash_file(path, algorithm, backend) == expected
        monkeypatch.undo()


# --- threads -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_with_their_own_hashers(data_file: tuple[int, bytes], backend: str) -> None:
    fd, content = data_file
    expected = hashlib.sha256(content).hexdigest()

    def by_updates(seed: int) -> str:
        hasher = hashing.new_hasher("sha256", backend)
        step = 1000 + seed * 7919
        for start in range(0, FILE_SIZE, step):
            hasher.update(content[start : start + step])
        return hasher.hexdigest()

    def by_fd(seed: int) -> str:
        hasher = hashing.new_hasher("sha256", backend)
        assert hashing.hash_fd_range(hasher, fd, 0, FILE_SIZE) == FILE_SIZE
        return hasher.hexdigest()

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(by_updates if n % 2 else by_fd, n) for n in range(16)]
        assert [future.result() for future in futures] == [expected] * 16


@needs_native
@pytest.mark.parametrize("algorithm", SHA2)
def test_threads_sharing_one_native_hasher(data_file: tuple[int, bytes], algorithm: str) -> None:
    # Every thread feeds the same bytes, so any interleaving of atomic updates gives
    # the same digest; a torn update would not.
    fd, content = data_file
    threads, rounds = 6, 5
    hasher = hashing.new_hasher(algorithm, "native")
    barrier = threading.Barrier(threads + 1)

    def feed(use_fd: bool) -> None:
        barrier.wait()
        for _ in range(rounds):
            if use_fd:
                assert hashing.hash_fd_range(hasher, fd, 0, FILE_SIZE) == FILE_SIZE
            else:
                hasher.update(content)

    def observe() -> None:
        # Readers take the same lock; they must neither crash nor corrupt the state.
        barrier.wait()
        for _ in range(200):
            hasher.copy().digest()
            hasher.hexdigest()

    with ThreadPoolExecutor(max_workers=threads + 1) as pool:
        futures = [pool.submit(feed, n % 2 == 0) for n in range(threads)]
        futures.append(pool.submit(observe))
        for future in futures:
            future.result()

    expected = hashlib.new(algorithm)
    for _ in range(threads * rounds):
        expected.update(content)
    assert hasher.hexdigest() == expected.hexdigest()


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", SHA2)
def test_update_rejects_str(backend: str, algorithm: str) -> None:
    with pytest.raises(TypeError):
        hashing.new_hasher(algorithm, backend).update("abc")  # type: ignore[arg-type]


@needs_native
def test_native_constructor_rejects_str() -> None:
    with pytest.raises(TypeError, match="encoded"):
        native_module().SHA256("abc")


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fd_range_on_closed_fd(tmp_path: Path, backend: str, mapped: bool) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    hasher = hashing.new_hasher("sha256", backend)
    with pytest.raises(OSError):
        hashing.hash_fd_range(hasher, fd, 0, 100, mapped=mapped)
    with pytest.raises(OSError):
        hashing.hash_fd_range(hasher, -1, 0, 100, mapped=mapped)


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fd_range_on_directory(tmp_path: Path, backend: str, mapped: bool) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(IsADirectoryError):
            hasher = hashing.new_hasher("sha256", backend)
            hashing.hash_fd_range(hasher, fd, 0, 10, mapped=mapped)
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fd_range_that_cannot_be_mapped_is_read_instead(tmp_path: Path, backend: str) -> None:
    """Write-only: no mapping, and pread says why; a pipe: no mapping, no pread either."""
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            hashing.hash_fd_range(hashing.new_hasher("sha256", backend), fd, 0, 100, mapped=True)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)
    read, write = os.pipe()
    try:
        os.write(write, b"x" * 100)
        with pytest.raises(OSError) as info:
            hashing.hash_fd_range(hashing.new_hasher("sha256", backend), read, 0, 100, mapped=True)
        assert info.value.errno == errno.ESPIPE
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mapped_ranges_cross_map_windows(tmp_path: Path, backend: str) -> None:
    """The extension maps at most 64 MiB at a time, from page boundaries: ranges that start
    mid-page and cross window edges hash exactly their bytes."""
    window = 64 << 20
    size = 2 * window + 3 * 4096 + 5
    path = tmp_path / "sparse"
    marks = {0: b"start", window - 3: b"edge-one", 2 * window - 1: b"edge-two", size - 4: b"end!"}
    with open(path, "wb") as file:
        file.truncate(size)
        for offset, mark in marks.items():
            file.seek(offset)
            file.write(mark)
    content = bytearray(size)
    for offset, mark in marks.items():
        content[offset : offset + len(mark)] = mark
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in [(0, size), (window - 5, window + 10), (4097, size), (size - 2, 9)]:
            hasher = hashing.new_hasher("sha256", backend)
            expected = content[offset : offset + length]
            assert hashing.hash_fd_range(hasher, fd, offset, length, mapped=True) == len(expected)
            assert hasher.hexdigest() == hashlib.sha256(expected).hexdigest()
    finally:
        os.close(fd)


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("offset", "length"), [(-1, 10), (0, -1), (-5, -5), ((1 << 63) - 10, 11)])
def test_fd_range_rejects_bad_ranges(
    data_file: tuple[int, bytes], backend: str, mapped: bool, offset: int, length: int
) -> None:
    fd, _ = data_file
    with pytest.raises(ValueError):
        hasher = hashing.new_hasher("sha256", backend)
        hashing.hash_fd_range(hasher, fd, offset, length, mapped=mapped)


@needs_native
def test_native_fd_range_rejects_foreign_hasher(data_file: tuple[int, bytes]) -> None:
    fd, _ = data_file
    with pytest.raises(TypeError, match="hasher"):
        native_module().hash_fd_range(hashlib.sha256(), fd, 0, 10)


def test_new_hasher_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="md5"):
        hashing.new_hasher("md5")
    with pytest.raises(ValueError, match="not available"):
        hashing.new_hasher("sha256", "assembly")


# --- environment switches ----------------------------------------------------------------

# Importing a module whose sys.modules entry is None raises ImportError: a missing build.
PRETEND_UNBUILT = "import sys; sys.modules['fastpull._native'] = None; "
REPORT = "import fastpull.hashing as h; print(h.BACKEND, ','.join(h.AVAILABLE_BACKENDS))"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {name: value for name, value in os.environ.items() if "FASTPULL" not in name}
    environ.update(PYTHONPATH=str(REPO_ROOT), **env)
    return subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=False
    )


def test_missing_extension_falls_back() -> None:
    result = run_python(PRETEND_UNBUILT + REPORT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["python", "python"]


def test_missing_extension_is_fatal_when_required() -> None:
    result = run_python(PRETEND_UNBUILT + REPORT, FASTPULL_REQUIRE_NATIVE="1")
    assert result.returncode != 0
    assert "FASTPULL_REQUIRE_NATIVE=1 requires it" in result.stderr


@needs_native
def test_native_can_be_switched_off() -> None:
    result = run_python(REPORT, FASTPULL_NATIVE="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["python", "native,python"]
