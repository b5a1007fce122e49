"""The ``fastpull`` command. Thin: parse options, call the library, print.

Errors are turned into one line on stderr and an exit code here and nowhere else
(:func:`main`); see the README for the table of exit codes. Each command imports the
library code it runs when it runs, so that ``fastpull version`` (or ``--help``) does not
load the pull, batch and maintenance machinery.
"""

from __future__ import annotations

import contextlib
import gc as _gc
import os
import platform as _platform
import sys
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import click
import orjson

from fastpull import __version__, cancel, events, hashing
from fastpull.cli.options import (
    SettingsOptions,
    check_output_path,
    read_batch,
    settings_options,
    timeout_option,
    write_json,
)
from fastpull.cli.progress import human_size, renderer_for, summary_table
from fastpull.errors import (
    BatchFailed,
    FastpullError,
    NoSuchImage,
    StoreDamaged,
    UsageError,
)
from fastpull.types import Platform, PlatformSelection

if TYPE_CHECKING:
    from fastpull.bulk import BatchResult
    from fastpull.cluster.client import Cluster
    from fastpull.puller import PullResult
    from fastpull.registry.settings import Settings
    from fastpull.store.layout import Store


def _open_store(settings: Settings, create: bool = True) -> Store:
    from fastpull.store.layout import Store, resolve_store_path

    return Store.open(resolve_store_path(settings.store), create=create)


def _waiting_message(store: Store, timeout: float) -> Callable[[], None]:
    def notify() -> None:
        click.echo(
            f"Waiting for other fastpull processes using {store.root} to finish "
            f"(at most {timeout:g} s)...",
            err=True,
        )

    return notify


# Commands defined in modules of their own, by name, and the module: imported only when the
# command runs (or --help lists every command), so a pull does not load push, copy, save, load.
LAZY_COMMANDS = {"push": "mirror", "copy": "mirror", "save": "archive", "load": "archive"}


def command_module(name: str) -> ModuleType:
    """The module of :data:`LAZY_COMMANDS` called ``name``, imported now."""
    if name == "mirror":
        from fastpull.cli import mirror

        return mirror
    from fastpull.cli import archive

    return archive


class _Commands(click.Group):
    """A group that imports the modules of :data:`LAZY_COMMANDS` on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            for command in command_module(LAZY_COMMANDS[cmd_name]).COMMANDS:
                self.add_command(command)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Pull container images from OCI / Docker registries at line rate."""


@cli.command()
@click.argument("name", required=False)
@click.option(
    "-f",
    "--file",
    "batch_files",
    multiple=True,
    metavar="FILE",
    help="Pull every image a batch file lists (repeatable; - for stdin). See the README.",
)
@click.option("-a", "--all-tags", is_flag=True, help="Pull every tagged image of the repository.")
@click.option(
    "--platform",
    "platform_text",
    help="os/arch[/variant], a comma list, or all (default: this host); "
    "with several the image index is stored too.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the image reference.")
@click.option("--json", "json_output", is_flag=True, help="One JSON event per line.")
@settings_options(registry=True, transfer=True)
@click.option(
    "--stats",
    "stats_file",
    type=click.Path(dir_okay=False, writable=True),
    help="Write per-blob bytes, seconds, connections and retries as JSON.",
)
@click.option("--fail-fast", is_flag=True, help="With -f: stop at the first image that fails.")
@click.option(
    "--report",
    "report_file",
    type=click.Path(dir_okay=False, writable=True),
    help="With -f: write every image's status, bytes and seconds as JSON.",
)
@click.option(
    "--cluster",
    "cluster_address",
    metavar="ADDRESS",
    help="With -f: fetch on a Dask cluster (tcp:// or tls:// scheduler; "
    "default $FASTPULL_CLUSTER) into a store every worker mounts at the same path.",
)
def pull(
    name: str | None,
    batch_files: tuple[str, ...],
    all_tags: bool,
    platform_text: str | None,
    quiet: bool,
    json_output: bool,
    settings: SettingsOptions,
    stats_file: str | None,
    fail_fast: bool,
    report_file: str | None,
    cluster_address: str | None,
) -> None:
    """Download an image (NAME[:TAG|@DIGEST]), or every image of batch files (-f FILE),
    into the local OCI layout store."""
    from fastpull.batchfile import command_line_entry, parse_batch
    from fastpull.bulk import pull_batch, pull_each

    if name is None and not batch_files:
        raise UsageError("Missing argument 'NAME' (or -f FILE)")
    if (fail_fast or report_file or cluster_address) and not batch_files:
        raise UsageError("--fail-fast, --report and --cluster go with -f FILE")
    for option, path in (("--stats", stats_file), ("--report", report_file)):
        check_output_path(option, path)
    if all_tags and name is None:
        raise UsageError("--all-tags needs a repository NAME")
    entries = [command_line_entry(name, all_tags)] if name is not None else []
    # Every batch file is read and checked before anything is downloaded.
    entries += [entry for path in batch_files for entry in parse_batch(read_batch(path), path)]
    loaded = settings.load()
    target = PlatformSelection.parse(platform_text) if platform_text is not None else None
    render = renderer_for(quiet=quiet, json_output=json_output, batch=bool(batch_files))
    if batch_files:
        address = cluster_address or os.environ.get("FASTPULL_CLUSTER") or None
        with cancel.handled(ignore_after_stop=True), _cluster(address) as cluster:
            batch = pull_batch(
                entries,
                settings=loaded,
                platforms=target,
                fail_fast=fail_fast,
                on_event=render,
                cluster=cluster,
            )
        _finish_batch(batch, quiet or json_output, report_file, stats_file)
        return
    # docker's `pull NAME` and `pull -a NAME`: one image after the other, docker's lines.
    with cancel.handled(ignore_after_stop=True):
        results = pull_each(entries, settings=loaded, platforms=target, on_event=render)
    if stats_file:
        _write_stats(stats_file, results)


@contextlib.contextmanager
def _cluster(address: str | None) -> Iterator[Cluster | None]:
    """The Dask cluster a batch runs on, connected and checked before anything downloads."""
    if address is None:
        yield None
        return
    from fastpull.cluster.client import Cluster

    with Cluster(address) as cluster:
        yield cluster


def _finish_batch(
    batch: BatchResult, machine_output: bool, report_file: str | None, stats_file: str | None
) -> None:
    """The summary table, ``--report``, ``--stats``, and the exit status of a batch."""
    if not machine_output:
        click.echo()
        for line in summary_table([o.event() for o in batch.outcomes]):
            click.echo(line)
    if report_file:
        write_json(report_file, batch.to_json())
    results = [o.result for o in batch.outcomes if o.result is not None]
    if stats_file and results:
        _write_stats(stats_file, results)
    failed = [o for o in batch.failed if o.status == events.FAILED]
    for outcome in failed:
        click.echo(f"Error: {outcome.reference}: {outcome.error}", err=True)
    if batch.failed:
        skipped = len(batch.failed) - len(failed)
        extra = f", {skipped} skipped" if skipped else ""
        raise BatchFailed(
            f"{len(failed)} of {len(batch.outcomes)} images failed{extra}",
            exit_code=batch.exit_code,
        )


def _write_stats(path: str, results: list[PullResult]) -> None:
    """``--stats``: the first image's numbers at the top level, every image under "images"."""
    images = [r.stats() for r in results]
    document = {
        **images[0],
        "seconds": round(sum(r.seconds for r in results), 6),
        "bytes": sum(r.bytes_downloaded for r in results),
        "blobs": [b for image in images for b in image["blobs"]],  # type: ignore[attr-defined]
        "images": images,
    }
    write_json(path, document)


@cli.command()
@click.argument("repository", required=False)
@click.option("--digests", is_flag=True, help="Show repo digests.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@settings_options()
def images(repository: str | None, digests: bool, fmt: str, settings: SettingsOptions) -> None:
    """List the images in the store."""
    from fastpull.cli.listing import human_duration, image_rows
    from fastpull.store.layout import Store, resolve_store_path

    path = resolve_store_path(settings.load().store)
    empty = not path.exists() or (path.is_dir() and not any(path.iterdir()))
    rows = [] if empty else image_rows(Store.open(path, create=False), repository)
    if fmt == "json":
        for row in rows:
            record = {
                "Repository": row.repository,
                "Tag": row.tag,
                "Digest": row.digest,
                "ID": row.image_id,
                "CreatedAt": row.created.isoformat() if row.created else None,
                "Size": row.size,
                "Reference": row.reference,
            }
            click.echo(orjson.dumps(record).decode())
        return
    header = ["REPOSITORY", "TAG"] + (["DIGEST"] if digests else [])
    header += ["IMAGE ID", "CREATED", "SIZE"]
    table = [header]
    for row in rows:
        cells = [row.repository, row.tag] + ([row.digest] if digests else [])
        cells += [row.image_id, human_duration(row.created), human_size(row.size)]
        table.append(cells)
    _print_table(table)


@cli.command()
@click.option(
    "--repair", is_flag=True, help="Delete corrupt blobs; pull damaged images again by digest."
)
@click.option("--jobs", type=click.IntRange(1, 256), help="Blobs hashed at once (default: CPUs).")
@settings_options(registry=True)
@timeout_option
def verify(repair: bool, jobs: int | None, settings: SettingsOptions, timeout: float) -> None:
    """Re-hash every blob and check that every image has all it needs."""
    from fastpull import storecheck

    loaded = settings.load()
    the_store = _open_store(loaded, create=False)
    with cancel.handled():
        report = storecheck.verify(the_store, jobs=jobs)
        for skipped in report.skipped:
            click.echo(f"warning: skipped {skipped}", err=True)
        for problem in report.problems:
            click.echo(problem.message)
        checked = f"{_count(report.images, 'image')} and {_count(report.blobs, 'blob')}"
        if report.ok:
            click.echo(f"Verified {checked} ({human_size(report.bytes)}): no problems")
            return
        if not repair:
            raise StoreDamaged(
                f"store {the_store.root} has {_count(len(report.problems), 'problem')}; "
                "'fastpull verify --repair' deletes corrupt blobs and pulls damaged images again",
                store=str(the_store.root),
            )
        deleted = storecheck.delete_damaged(
            the_store, report, timeout=timeout, on_wait=_waiting_message(the_store, timeout)
        )
        for digest in deleted:
            click.echo(f"Deleted corrupt blob {digest}")
        restored, failed = storecheck.restore(
            the_store,
            report.broken,
            settings=loaded,
            on_event=renderer_for(quiet=False, json_output=False),
        )
    for name in restored:
        click.echo(f"Restored {name}")
    for failure in failed:
        click.echo(failure)
    if failed:
        raise StoreDamaged(
            f"{len(failed)} of {_count(len(report.broken), 'damaged image')} in store "
            f"{the_store.root} could not be restored",
            store=str(the_store.root),
        )


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@cli.command()
@click.argument("references", metavar="IMAGE...", nargs=-1, required=True)
@click.option("--no-prune", is_flag=True, help="Keep the blobs of removed images.")
@settings_options()
@timeout_option
def rmi(
    references: tuple[str, ...], no_prune: bool, settings: SettingsOptions, timeout: float
) -> None:
    """Remove images, and the blobs no other image uses."""
    from fastpull.reference import Reference
    from fastpull.store.maintenance import remove_images

    refs = [Reference.parse(text) for text in references]
    the_store = _open_store(settings.load(), create=False)
    with cancel.handled():
        removal = remove_images(
            the_store,
            refs,
            prune=not no_prune,
            timeout=timeout,
            on_wait=_waiting_message(the_store, timeout),
        )
    for name in removal.untagged:
        click.echo(f"Untagged: {name}")
    for digest in removal.deleted:
        click.echo(f"Deleted: {digest}")
    if removal.kept_because:
        click.echo(
            f"warning: kept the blobs of the removed images: {removal.kept_because}", err=True
        )
    if removal.missing:
        raise NoSuchImage(f"No such image: {', '.join(removal.missing)}")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only show what would be deleted.")
@settings_options()
@timeout_option
def gc(dry_run: bool, settings: SettingsOptions, timeout: float) -> None:
    """Delete blobs no image uses and downloads no process is working on."""
    from fastpull.store.maintenance import collect_garbage

    the_store = _open_store(settings.load(), create=False)
    with cancel.handled():
        result = collect_garbage(
            the_store,
            dry_run=dry_run,
            timeout=timeout,
            on_wait=_waiting_message(the_store, timeout),
        )
    verb = "Would delete" if dry_run else "Deleted"
    for item in result.removed:
        what = {"blob": "blob", "download": "partial download of"}.get(item.kind, "temp file")
        name = item.name.replace("-", ":", 1) if item.kind == "download" else item.name
        click.echo(f"{verb} {what} {name} ({human_size(item.size)})")
    for name in result.in_progress:
        click.echo(f"Kept partial download of {name.replace('-', ':', 1)}: in progress")
    total = "Would reclaim" if dry_run else "Total reclaimed space"
    click.echo(f"{total}: {human_size(result.freed)}")


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@settings_options()
def df(fmt: str, settings: SettingsOptions) -> None:
    """Show the store's disk usage, what images share and what gc would reclaim."""
    from fastpull.store.maintenance import usage

    the_store = _open_store(settings.load(), create=False)
    found = usage(the_store)
    for warning in found.warnings:
        click.echo(f"warning: {warning}", err=True)
    u = found.usage
    if fmt == "json":
        record = {
            "Images": u.images,
            "Blobs": u.blobs,
            "TotalBytes": u.total_bytes,
            "BlobBytes": u.blob_bytes,
            "ImageBytes": u.used_bytes,
            "SharedBlobs": u.shared_blobs,
            "SharedBytes": u.shared_bytes,
            "UnreferencedBlobs": u.unreferenced_blobs,
            "UnreferencedBytes": u.unreferenced_bytes,
            "Ingests": u.ingests,
            "IngestBytes": u.ingest_bytes,
            "StaleIngests": u.stale_ingests,
            "StaleIngestBytes": u.stale_ingest_bytes,
            "ReclaimableBytes": u.reclaimable_bytes,
        }
        click.echo(orjson.dumps(record).decode())
        return

    def part(size: int, whole: int) -> str:
        return f"{human_size(size)} ({size * 100 // whole if whole else 0}%)"

    reclaim = part(u.reclaimable_bytes, u.total_bytes)
    table = [
        ["TYPE", "TOTAL", "SIZE", "SHARED", "RECLAIMABLE"],
        ["Images", str(u.images), human_size(u.used_bytes), human_size(u.shared_bytes), "-"],
        [
            "Blobs",
            str(u.blobs),
            human_size(u.blob_bytes),
            "-",
            part(u.unreferenced_bytes, u.blob_bytes),
        ],
        [
            "Ingest",
            str(u.ingests),
            human_size(u.ingest_bytes),
            "-",
            part(u.stale_ingest_bytes, u.ingest_bytes),
        ],
        ["Total", "", human_size(u.total_bytes), human_size(u.shared_bytes), reclaim],
    ]
    _print_table(table)


def _print_table(table: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _login_server(server: str | None) -> str:
    from fastpull.registry.client import DOCKER_HUB

    if not server:
        return DOCKER_HUB
    for prefix in ("https://", "http://"):
        server = server.removeprefix(prefix)
    server = server.split("/", 1)[0]
    if server in ("index.docker.io", "registry-1.docker.io"):
        return DOCKER_HUB
    return server


@cli.command()
@click.argument("server", required=False)
@click.option("-u", "--username", help="Username.")
@click.option("-p", "--password", help="Password (prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@settings_options(store=False, registry=True)
def login(
    server: str | None,
    username: str | None,
    password: str | None,
    password_stdin: bool,
    settings: SettingsOptions,
) -> None:
    """Log in to a registry (default Docker Hub); credentials go to docker's config.json."""
    from fastpull.registry.client import RegistryClient
    from fastpull.registry.credentials import Credentials, CredentialStore
    from fastpull.registry.transport import Transport

    registry = _login_server(server)
    if password_stdin:
        if password:
            raise UsageError("--password and --password-stdin are mutually exclusive")
        if not username:
            raise UsageError("must provide --username with --password-stdin")
        password = sys.stdin.read().rstrip("\r\n")
    elif password:
        click.echo(
            "WARNING! Using --password via the CLI is insecure. Use --password-stdin.", err=True
        )
    if (not username or not password) and not sys.stdin.isatty():
        # docker's rule: no prompt (and no getpass warnings) without a terminal.
        raise UsageError(
            "cannot ask for a username and password: standard input is not a terminal "
            "(use --username with --password-stdin)"
        )
    if not username:
        username = click.prompt("Username")
    if not password:
        password = click.prompt("Password", hide_input=True)
    if not username or not password:
        raise UsageError("username and password are required")
    credentials = Credentials(username=username, password=password)
    loaded = settings.load()
    with cancel.handled(), Transport(tls_for=loaded.tls_for) as transport:
        client = RegistryClient(
            registry, settings=loaded, credentials=credentials, transport=transport
        )
        client.check_login()
    CredentialStore().store(registry, credentials)
    click.echo("Login Succeeded")


@cli.command()
@click.argument("server", required=False)
def logout(server: str | None) -> None:
    """Remove stored credentials for a registry (default Docker Hub)."""
    from fastpull.registry.credentials import CredentialStore

    registry = _login_server(server)
    if CredentialStore().erase(registry):
        click.echo(f"Removing login credentials for {registry}")
    else:
        click.echo(f"Not logged in to {registry}")


@cli.command()
def version() -> None:
    """Show versions and which hashing backend is in use."""
    import pycurl

    click.echo(f"fastpull {__version__}")
    click.echo(f"hashing: {hashing.BACKEND} ({hashing.BACKEND_DETAIL})")
    click.echo(f"libcurl: {pycurl.version}")
    click.echo(f"python: {_platform.python_version()} on {Platform.host()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the command, map errors to one stderr line and an exit code.

    Without ``argv`` (the ``fastpull`` program, ``python -m fastpull``) the process is about
    to exit: every object is frozen out of the garbage collector's reach, which spares the
    interpreter's last full collections over everything the imports made (about 30 million
    instructions, 8-20 ms on the benchmark's VM). Nothing depends on them: files are closed
    by ``with`` and the store's own calls, atexit handlers run anyway, and the standard
    streams are flushed by the interpreter.
    """
    code = _run(argv)
    if argv is None:
        _gc.freeze()
    return code


def _run(argv: Sequence[str] | None) -> int:
    try:
        cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="fastpull",
            standalone_mode=False,
        )
    except FastpullError as exc:
        click.echo(f"Error: {exc}", err=True)
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Error: aborted", err=True)
        return 130
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "fastpull"
        message = exc.format_message().rstrip(".")
        click.echo(f"Error: {message} (see '{command} --help')", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("Error: interrupted", err=True)
        return 130
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"Error: {exc.strerror or exc}{where}", err=True)
        return 1
    return 0
