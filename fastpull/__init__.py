"""fastpull: pull container images from OCI / Docker registries at line rate.

Library use::

    import fastpull
    result = fastpull.pull("debian:bookworm", store="/var/lib/images")
    print(result.digest, result.bytes_downloaded, result.seconds)
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import hashing
from .errors import FastpullError
from .pull import PullResult, pull
from .reference import Reference

__all__ = ["FastpullError", "PullResult", "Reference", "__version__", "hashing", "pull"]
