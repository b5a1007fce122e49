"""fastpull: pull container images from OCI / Docker registries at line rate.

Library use::

    import fastpull
    result = fastpull.pull("debian:bookworm", store="/var/lib/images")
    print(result.digest, result.bytes_downloaded, result.seconds)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastpull import hashing  # fails at once under FASTPULL_REQUIRE_NATIVE=1 without the extension
from fastpull.errors import FastpullError

if TYPE_CHECKING:
    from fastpull.puller import PullResult, pull
    from fastpull.reference import Reference

__version__ = "0.1.0"

__all__ = ["FastpullError", "PullResult", "Reference", "__version__", "hashing", "pull"]

# Imported on first use: download worker processes import this package too, and should
# not pay for the whole pull machinery at start-up.
_LAZY = {"pull": "puller", "PullResult": "puller", "Reference": "reference"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastpull' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
