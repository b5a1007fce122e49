"""docs/guarantees.md names, for each promise, tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "guarantees.md"


def _test_names(path: Path) -> set[str]:
    return set(re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE))


def test_every_test_the_guarantees_name_exists() -> None:
    cited = re.findall(r"`(?:tests/unit/)?(test_\w+\.py)(?:::(test_\w+))?", DOC.read_text())
    assert len(cited) > 30
    missing = []
    for filename, name in cited:
        matches = list((ROOT / "tests").rglob(filename))
        if not matches:
            missing.append(filename)
        # ``test_fault[...]`` abbreviates a long parametrized name: a prefix will do.
        elif name and not any(
            any(test.startswith(name) for test in _test_names(path)) for path in matches
        ):
            missing.append(f"{filename}::{name}")
    assert missing == []
