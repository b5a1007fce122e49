"""A log of the calls that make store files durable or visible (fsync, rename, link), for
tests of the order the store's guarantees depend on."""

from __future__ import annotations

import os
from typing import Any

import pytest


def record_disk_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Log every fsync and rename (or hard link) of this process, as (call, path), in
    order; an fsync is logged by the path its descriptor has."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        calls.append(("rename", str(dst)))
        real_replace(src, dst, **kwargs)

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        calls.append(("rename", str(dst)))
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    return calls
