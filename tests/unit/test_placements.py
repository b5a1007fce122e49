"""The placements file: what earlier pushes and copies placed where, read back per registry."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fastpull.store.placements import FILENAME, Placement, Placements
from fastpull.types import Digest

A = Digest.parse("sha256:" + "a" * 64)
B = Digest.parse("sha256:" + "b" * 64)


def test_placements_are_read_back_per_registry_without_repeats(tmp_path: Path) -> None:
    first = Placements(tmp_path)
    first.record(Placement("registry.lab:5000", "base/os", A))
    first.record(Placement("registry.lab:5000", "base/os", A))  # known: not written twice
    first.record(Placement("registry.lab:5000", "apps/web", B))
    first.record(Placement("ghcr.io", "me/tool", A))
    assert len((tmp_path / FILENAME).read_bytes().splitlines()) == 3

    later = Placements(tmp_path)  # the next run
    assert later.at("registry.lab:5000") == [
        Placement("registry.lab:5000", "base/os", A),
        Placement("registry.lab:5000", "apps/web", B),
    ]
    assert later.at("ghcr.io") == [Placement("ghcr.io", "me/tool", A)]
    assert later.at("quay.io") == []
    # What the file holds already is not appended again by the run that read it.
    later.record(Placement("ghcr.io", "me/tool", A))
    assert len((tmp_path / FILENAME).read_bytes().splitlines()) == 3


def test_no_file_is_no_memory(tmp_path: Path) -> None:
    assert Placements(tmp_path).at("registry.lab:5000") == []


def test_lines_that_are_not_placements_are_skipped(tmp_path: Path) -> None:
    good = b'{"registry":"registry.lab:5000","repository":"base/os","digest":"sha256:' + b"a" * 64
    (tmp_path / FILENAME).write_bytes(
        b"\n".join(
            [
                good + b'"}',
                good[:40],  # torn by a crash mid-append
                b"not json at all",
                b'{"registry":"registry.lab:5000","repository":"Base/OS","digest":"' + b"x" * 5,
                b'{"registry":"registry.lab:5000","repository":"../../etc","digest":"sha256:'
                + b"a" * 64
                + b'"}',
                b'{"registry":"registry.lab:5000","repository":"x","digest":"md5:abc"}',
                b'{"registry":"registry.lab:5000","repository":"x"}',
                b"[1, 2]",
                b"",
            ]
        )
    )
    assert Placements(tmp_path).at("registry.lab:5000") == [
        Placement("registry.lab:5000", "base/os", A)
    ]


def test_a_store_that_cannot_be_written_loses_only_the_memory(tmp_path: Path) -> None:
    (tmp_path / FILENAME).mkdir()  # opening it for appending fails
    Placements(tmp_path).record(Placement("registry.lab:5000", "base/os", A))
    assert Placements(tmp_path).at("registry.lab:5000") == []


def test_concurrent_writers_never_tear_each_others_lines(tmp_path: Path) -> None:
    def write(n: int) -> None:
        mine = Placements(tmp_path)
        for i in range(200):
            mine.record(Placement("registry.lab:5000", f"w{n}/r{i}", A))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(Placements(tmp_path).at("registry.lab:5000")) == 800
    assert os.stat(tmp_path / FILENAME).st_size > 0


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400))
def test_any_bytes_in_the_file_read_as_placements_or_nothing(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / FILENAME).write_bytes(data)
        for placed in Placements(root).at("registry.lab:5000"):
            assert placed.registry == "registry.lab:5000"
