"""The options several commands share, each declared once (as crane's root command declares
its flags once for every subcommand).

A command takes the ones it needs with :func:`settings_options` and receives them as one
:class:`SettingsOptions` argument named ``settings``; :meth:`SettingsOptions.load` merges
them with the config file and the environment. Nothing heavy is imported here: ``fastpull
version`` reads this module too.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import click
import orjson

from fastpull.errors import BatchFileError, UsageError

if TYPE_CHECKING:
    from fastpull.registry.settings import Settings

_F = TypeVar("_F", bound=Callable[..., Any])

STORE_HELP = "OCI layout directory (default: $FASTPULL_STORE or ~/.local/share/fastpull/store)"
# Shown in --help; test_cli_options checks it is store.maintenance.DEFAULT_TIMEOUT, which is
# read only when a command runs (so that `fastpull version` does not import maintenance).
TIMEOUT_SHOWN = "60"


class SettingsOptions(NamedTuple):
    """What the command line said about the settings (None or empty: not given)."""

    store: str | None = None
    insecure: tuple[str, ...] = ()
    ca_cert: str | None = None
    connections: int | None = None
    max_connections: int | None = None
    workers: int | None = None
    stall_timeout: int | None = None

    def load(self) -> Settings:
        """The settings: these options over the environment over the config file."""
        from fastpull.registry.settings import Settings

        return Settings.load(
            insecure_registries=self.insecure,
            ca_cert=self.ca_cert,
            store=self.store,
            connections=self.connections,
            max_connections=self.max_connections,
            workers=self.workers,
            stall_timeout=self.stall_timeout,
        )


_FIELDS = SettingsOptions._fields

_STORE = click.option("--store", help=STORE_HELP)
_REGISTRY = (
    click.option(
        "--insecure-registry",
        "insecure",
        multiple=True,
        metavar="HOST[:PORT]",
        help="Allow plain HTTP / unverified TLS for this registry (repeatable).",
    ),
    click.option("--ca-cert", type=click.Path(dir_okay=False), help="Extra CA certificate (PEM)."),
)
_TRANSFER = (
    click.option(
        "--connections",
        "--max-concurrent-downloads",
        "connections",
        type=click.IntRange(1, 256),
        help="Pin the transfers at once, across all blobs and chunks (default: from 4, "
        "more while they raise the total rate, up to --max-connections).",
    ),
    click.option(
        "--max-connections",
        type=click.IntRange(1, 256),
        help="The most transfers an adaptive run opens (default 64).",
    ),
    click.option(
        "--workers",
        type=click.IntRange(0, 16),
        help="Download processes (default: none for small pulls, else one per two cores, max 4).",
    ),
    click.option(
        "--stall-timeout",
        type=click.IntRange(1, 3600),
        metavar="SECONDS",
        help="Restart a transfer slower than 1 KiB/s for this long (default 30).",
    ),
)


def settings_options(
    *, store: bool = True, registry: bool = False, transfer: bool = False
) -> Callable[[_F], _F]:
    """Declare the shared options a command takes (``--store``; ``--insecure-registry`` and
    ``--ca-cert`` with ``registry``; ``--connections``, ``--workers`` and
    ``--stall-timeout`` with ``transfer``) and hand them to it as ``settings``."""
    declared = [_STORE] if store else []
    declared += [*_REGISTRY] if registry else []
    declared += [*_TRANSFER] if transfer else []

    def decorate(command: _F) -> _F:
        @functools.wraps(command)
        def with_settings(*args: Any, **kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in _FIELDS if name in kwargs}
            return command(*args, settings=SettingsOptions(**given), **kwargs)

        for option in reversed(declared):
            with_settings = option(with_settings)
        return with_settings  # type: ignore[return-value]

    return decorate


def _default_timeout() -> float:
    from fastpull.store.maintenance import DEFAULT_TIMEOUT

    return DEFAULT_TIMEOUT


def timeout_option(command: _F) -> _F:
    """``--timeout``: how long a maintenance command waits for pulls into the store."""
    return click.option(
        "--timeout",
        type=click.FloatRange(0, 86400),
        default=_default_timeout,
        metavar="SECONDS",
        help=f"How long to wait for running pulls into the store to finish "
        f"(default {TIMEOUT_SHOWN}).",
    )(command)


def check_output_path(option: str, path: str | None) -> None:
    """Fail before the work, not after it, if an output file cannot be written there."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: cannot write a file there")


def read_batch(path: str) -> str:
    """A batch file's text (``pull -f``, ``copy -f``); ``-`` is standard input."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise BatchFileError(f"cannot read batch file {path}: {why}") from None


def write_json(path: str, document: Any) -> None:
    """An output file (``--report``, ``--stats``) as indented JSON."""
    with open(path, "wb") as out:
        out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2))


__all__ = [
    "STORE_HELP",
    "SettingsOptions",
    "check_output_path",
    "read_batch",
    "settings_options",
    "timeout_option",
    "write_json",
]
