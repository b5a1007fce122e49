"""Build fastpull's optional C extension; all package metadata lives in pyproject.toml.

``fastpull._native`` (SHA-256 / SHA-512 on OpenSSL libcrypto, the download workers' write
callback with libxxhash's xxh3-128) is optional: when it cannot be compiled the install still
succeeds with a warning and fastpull falls back to hashlib, os.pwrite and the xxhash package.
Set ``FASTPULL_REQUIRE_NATIVE=1`` to make a failed build fatal instead (CI does).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

REQUIRE_NATIVE = os.environ.get("FASTPULL_REQUIRE_NATIVE") == "1"


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed build into a warning unless the extension is required."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        # What a missing compiler, missing OpenSSL headers or a failed link raise.
        except (CCompilerError, ExecError, PlatformError) as exc:
            if REQUIRE_NATIVE:
                raise
            print(
                f"WARNING: fastpull's native extension was not built ({exc}); "
                "fastpull will hash and write in Python instead. Install a C compiler and the "
                "OpenSSL 3 and xxHash headers (e.g. libssl-dev, libxxhash-dev) to build it.",
                file=sys.stderr,
            )


setup(
    ext_modules=[
        Extension(
            "fastpull._native",
            sources=["csrc/native.c"],
            libraries=["crypto", "xxhash"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            # Lets `build_ext --inplace` skip copying an extension that was not built.
            optional=not REQUIRE_NATIVE,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
