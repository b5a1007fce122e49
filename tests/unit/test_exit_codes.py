"""The README's table of exit codes is the one the code uses."""

from __future__ import annotations

import re
from pathlib import Path

import fastpull.errors as errors
from fastpull import cancel

README = Path(__file__).resolve().parents[2] / "README.md"


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def _documented() -> set[int]:
    text = README.read_text()
    section = text.split("## Errors and exit codes", 1)[1].split("\n## ", 1)[0]
    codes: set[int] = set()
    for cell in re.findall(r"^\| ([0-9 /]+) \|", section, re.MULTILINE):
        codes.update(int(code) for code in cell.split("/"))
    return codes


def test_readme_lists_exactly_the_exit_codes_fastpull_uses() -> None:
    used = {errors.FastpullError.exit_code}
    used |= {cls.exit_code for cls in _subclasses(errors.FastpullError)}
    used |= set(cancel._EXIT_CODES.values())
    used |= {0, 2}  # success; click's own usage errors
    assert _documented() == used
