"""External programs the tests drive (skopeo, umoci): present, or a skip that CI turns into a
failure, because CI installs them and a skip there would hide a missing install step."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """The path of ``name``; skips without it, fails under ``CI=true``."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI (apt-get install {name})")
        pytest.skip(f"{name} is not installed")
    return path
