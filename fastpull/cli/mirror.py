"""``fastpull push`` and ``fastpull copy``: images from the store, or from another
registry through the store, into a registry. Thin: parse options, call the library, print.

Errors reach :func:`fastpull.cli.commands.main`, which prints them as one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from fastpull import cancel, events
from fastpull.cli.options import (
    SettingsOptions,
    check_output_path,
    read_batch,
    settings_options,
    write_json,
)
from fastpull.cli.progress import renderer_for, summary_table
from fastpull.errors import BatchFailed, NoSuchImage, UsageError
from fastpull.reference import Reference
from fastpull.types import PlatformSelection

if TYPE_CHECKING:
    from fastpull.batchfile import BatchEntry
    from fastpull.mirror import CopyBatchResult
    from fastpull.registry.settings import Settings
    from fastpull.store.layout import Store


def _common(f: Callable[..., None]) -> Callable[..., None]:
    """Options push and copy share beyond the settings: output, upload parallelism."""
    options = [
        click.option("-q", "--quiet", is_flag=True, help="Print only the pushed reference."),
        click.option("--json", "json_output", is_flag=True, help="One JSON event per line."),
        click.option(
            "--jobs",
            type=click.IntRange(1, 64),
            help="Blob uploads at once, across all images (default 8).",
        ),
        click.option(
            "--chunk-size",
            type=click.IntRange(1 << 20, None),
            metavar="BYTES",
            help="Upload blobs larger than this in PATCH chunks (default: one PUT per blob).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command()
@click.argument("name")
@click.argument("dest", required=False)
@click.option("-a", "--all-tags", is_flag=True, help="Push every tag of the repository.")
@_common
@settings_options(registry=True)
def push(
    name: str,
    dest: str | None,
    all_tags: bool,
    quiet: bool,
    json_output: bool,
    jobs: int | None,
    chunk_size: int | None,
    settings: SettingsOptions,
) -> None:
    """Upload an image of the store (NAME[:TAG|@DIGEST]) to its registry, or under the
    name DEST (like docker tag + docker push)."""
    from fastpull.batchfile import check_all_tags
    from fastpull.pusher import Pusher
    from fastpull.store.layout import Store, resolve_store_path

    ref = Reference.parse(name)
    target = Reference.parse(dest) if dest else None
    if all_tags:
        check_all_tags(name, ref)
        if dest is not None and target is not None:
            check_all_tags(dest, target)
    loaded = settings.load()
    the_store = Store.open(resolve_store_path(loaded.store), create=False)
    render = renderer_for(quiet=quiet, json_output=json_output)
    sources = _tags_of(the_store, ref) if all_tags else [ref]
    with (
        cancel.handled(ignore_after_stop=True),
        Pusher(
            the_store, settings=loaded, jobs=jobs, chunk_size=chunk_size, on_event=render
        ) as pusher,
    ):
        for source in sources:
            destination = target or source
            if all_tags and source.tag:
                destination = destination.with_tag(source.tag)
            pusher.push(source, destination)


def _tags_of(store: Store, ref: Reference) -> list[Reference]:
    """Every tagged image of ``ref``'s repository in the store, in index.json order."""
    from fastpull.pusher import named_images

    found = [
        other
        for other, _ in named_images(store)
        if other.name == ref.name and other.tag and other.digest is None
    ]
    if not found:
        raise NoSuchImage(f"An image does not exist locally with the name: {ref.familiar_name}")
    return found


@click.command()
@click.argument("source", required=False)
@click.argument("dest", required=False)
@click.option(
    "-f",
    "--file",
    "batch_files",
    multiple=True,
    metavar="FILE",
    help="Copy every image a batch file lists (repeatable; - for stdin).",
)
@click.option("--to", metavar="REGISTRY[/PREFIX]", help="With -f: where the images go.")
@click.option(
    "-a", "--all-tags", is_flag=True, help="Copy every tag of the repository SOURCE into DEST."
)
@click.option(
    "--platform",
    "platform_text",
    help="os/arch[/variant], a comma list, or all (default: this host); "
    "with several the image index is pushed too.",
)
@click.option("--no-keep", is_flag=True, help="Remove what the copy added to the store.")
@click.option("--fail-fast", is_flag=True, help="With -f: stop at the first image that fails.")
@click.option(
    "--report",
    "report_file",
    type=click.Path(dir_okay=False),
    help="Write every image's status, bytes and seconds as JSON.",
)
@click.option(
    "--cluster",
    "cluster_address",
    metavar="ADDRESS",
    help="With -f: copy on a Dask cluster (tcp:// or tls:// scheduler; default "
    "$FASTPULL_CLUSTER); each worker fetches and uploads, nothing is kept.",
)
@_common
@settings_options(registry=True, transfer=True)
def copy(
    source: str | None,
    dest: str | None,
    batch_files: tuple[str, ...],
    to: str | None,
    all_tags: bool,
    platform_text: str | None,
    no_keep: bool,
    fail_fast: bool,
    report_file: str | None,
    cluster_address: str | None,
    quiet: bool,
    json_output: bool,
    jobs: int | None,
    chunk_size: int | None,
    settings: SettingsOptions,
) -> None:
    """Copy an image from one registry to another (SOURCE DEST), or every image of batch
    files (-f FILE --to REGISTRY[/PREFIX]), through the store (or a Dask cluster)."""
    from fastpull.batchfile import parse_batch, tag_was_defaulted
    from fastpull.mirror import Copier, CopyBatchResult, all_tags_entry, copy_batch
    from fastpull.store.layout import Store, resolve_store_path
    from fastpull.store.maintenance import remove_images

    if batch_files and (source or dest or all_tags):
        raise UsageError("give SOURCE DEST, or -f FILE with --to, not both")
    if not batch_files and not (source and dest):
        raise UsageError("Missing argument 'SOURCE DEST' (or -f FILE --to REGISTRY)")
    if cluster_address and not batch_files:
        raise UsageError("--cluster goes with -f FILE")
    check_output_path("--report", report_file)
    loaded = settings.load()
    platforms = PlatformSelection.parse(platform_text) if platform_text is not None else None
    if batch_files or all_tags:
        if all_tags:
            assert source is not None and dest is not None
            entries = [all_tags_entry(source, dest)]
        else:
            entries = [e for path in batch_files for e in parse_batch(read_batch(path), path)]
        render = renderer_for(quiet=quiet, json_output=json_output, batch=True)
        address = cluster_address or os.environ.get("FASTPULL_CLUSTER") or None
        if address is not None:
            batch = _copy_on_cluster(
                address, entries, to, loaded, platforms, jobs, chunk_size, fail_fast, render
            )
            _finish_batch(batch, quiet or json_output, report_file)
            return
        with cancel.handled(ignore_after_stop=True):
            batch = copy_batch(
                entries,
                to=to,
                settings=loaded,
                platforms=platforms,
                jobs=jobs,
                chunk_size=chunk_size,
                keep=not no_keep,
                fail_fast=fail_fast,
                on_event=render,
            )
        _finish_batch(batch, quiet or json_output, report_file)
        return
    assert source is not None and dest is not None
    src, target = Reference.parse(source), Reference.parse(dest)
    the_store = Store.open(resolve_store_path(loaded.store))
    existed = the_store.find_image(str(src)) is not None
    render = renderer_for(quiet=quiet, json_output=json_output)
    with cancel.handled(ignore_after_stop=True):
        with Copier(
            the_store,
            settings=loaded,
            platforms=platforms,
            jobs=jobs,
            chunk_size=chunk_size,
            on_event=render,
        ) as copier:
            outcome = copier.copy(src, target, default_tag=tag_was_defaulted(source, src))
        if no_keep and not existed:
            remove_images(the_store, [src], prune=True)
    if report_file:
        # The document of a batch of one, so scripts read every copy's report alike.
        write_json(report_file, CopyBatchResult((outcome,), outcome.seconds).to_json())


def _copy_on_cluster(
    address: str,
    entries: list[BatchEntry],
    to: str | None,
    settings: Settings,
    platforms: PlatformSelection | None,
    jobs: int | None,
    chunk_size: int | None,
    fail_fast: bool,
    render: events.Listener,
) -> CopyBatchResult:
    """``copy -f --cluster``: the destination is checked and the cluster reached (and its
    nodes checked) before anything is fetched."""
    from fastpull.cluster.client import Cluster, check_address
    from fastpull.cluster.copying import copy_batch_on_cluster
    from fastpull.mirror import check_entries

    check_address(address)
    check_entries(entries, to)
    with cancel.handled(ignore_after_stop=True), Cluster(address) as cluster:
        return copy_batch_on_cluster(
            entries,
            to=to,
            cluster=cluster,
            settings=settings,
            platforms=platforms,
            jobs=jobs,
            chunk_size=chunk_size,
            fail_fast=fail_fast,
            on_event=render,
        )


def _finish_batch(batch: CopyBatchResult, machine_output: bool, report_file: str | None) -> None:
    """The summary table, ``--report`` and the exit status of a batch copy."""
    if not machine_output:
        click.echo()
        for line in summary_table([o.event() for o in batch.outcomes]):
            click.echo(line)
    if report_file:
        write_json(report_file, batch.to_json())
    failed = [o for o in batch.failed if o.status == events.FAILED]
    for outcome in failed:
        click.echo(f"Error: {outcome.source}: {outcome.error}", err=True)
    if batch.failed:
        raise BatchFailed(
            f"{len(failed)} of {len(batch.outcomes)} images failed", exit_code=batch.exit_code
        )


COMMANDS = (push, copy)
"""The commands of this module, for the main group to add."""

__all__ = ["COMMANDS", "copy", "push"]
