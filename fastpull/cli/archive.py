"""``fastpull save`` and ``fastpull load``: image archives for container engines and
air-gapped sites (see :mod:`fastpull.archive`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fastpull import cancel
from fastpull.cli.options import SettingsOptions, settings_options
from fastpull.errors import UsageError
from fastpull.reference import Reference
from fastpull.types import PlatformSelection


@click.command()
@click.argument("names", metavar="NAME[:TAG]...", nargs=-1, required=True)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Write to FILE, not standard output."
)
@click.option(
    "--platform",
    "platform_text",
    help="os/arch[/variant] of a multi-platform image (default: this machine), or all.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["docker", "oci"]),
    default="docker",
    show_default=True,
    help="docker: OCI layout plus docker's manifest.json (what docker save writes); "
    "oci: the OCI layout only.",
)
@settings_options()
def save(
    names: tuple[str, ...],
    output: str | None,
    platform_text: str | None,
    fmt: str,
    settings: SettingsOptions,
) -> None:
    """Save images of the store to a tar archive that docker, podman, containerd and skopeo
    load (standard output by default). A NAME without a tag saves every tag of it."""
    from fastpull.archive.writer import SaveRequest
    from fastpull.archive.writer import save as save_archive
    from fastpull.batchfile import tag_was_defaulted
    from fastpull.store.layout import Store, resolve_store_path

    requests = []
    for text in names:
        ref = Reference.parse(text)
        requests.append(SaveRequest(ref, every_tag=tag_was_defaulted(text, ref)))
    platforms = PlatformSelection.parse(platform_text) if platform_text is not None else None
    if output is None and sys.stdout.isatty():
        raise UsageError("cowardly refusing to save to a terminal; use -o FILE or redirect")
    the_store = Store.open(resolve_store_path(settings.load().store), create=False)
    if output is None:
        sys.stdout.flush()  # the archive goes to the descriptor, past Python's buffer
    with cancel.handled():
        save_archive(
            the_store,
            requests,
            output=Path(output) if output is not None else None,
            fd=sys.stdout.fileno() if output is None else None,
            platforms=platforms,
            oci_only=fmt == "oci",
        )


@click.command()
@click.option(
    "-i",
    "--input",
    "input_path",
    type=click.Path(dir_okay=False),
    help="Read FILE, not standard input.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing.")
@settings_options()
def load(input_path: str | None, quiet: bool, settings: SettingsOptions) -> None:
    """Load images from a tar archive (fastpull, docker or podman save, skopeo
    docker-archive or oci-archive; gzip, bzip2 or xz compressed or not) into the store,
    checking every digest first."""
    from fastpull.archive.reader import load as load_archive
    from fastpull.store.layout import Store, resolve_store_path

    if input_path is None and sys.stdin.isatty():
        raise UsageError("requested load from standard input, but it is a terminal; use -i FILE")
    the_store = Store.open(resolve_store_path(settings.load().store))
    with cancel.handled():
        if input_path is None:
            result = load_archive(the_store, sys.stdin.buffer)
        else:
            try:
                stream = open(input_path, "rb")  # noqa: SIM115 - closed below, after the load
            except OSError as exc:
                raise UsageError(f"cannot read {input_path}: {exc.strerror}") from None
            with stream:
                result = load_archive(the_store, stream)
    for problem in result.unnamed:
        click.echo(f"warning: {problem}; not loaded", err=True)
    if not quiet:
        for name in result.names:
            click.echo(f"Loaded image: {name.familiar}")


COMMANDS = (save, load)
"""The commands of this module, for the main group to add."""
