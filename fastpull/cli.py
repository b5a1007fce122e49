"""The ``fastpull`` command. Thin: parse options, call the library, print.

Errors are turned into one line on stderr and an exit code here and nowhere else
(:func:`main`); see the README for the table of exit codes.
"""

from __future__ import annotations

import platform as _platform
import sys
from collections.abc import Sequence

import click
import orjson

from . import __version__, cancel, events, hashing
from .batchfile import BatchEntry, check_all_tags, parse_batch, tag_was_defaulted
from .bulk import BatchResult, pull_batch
from .credentials import Credentials, CredentialStore
from .errors import BatchFailed, BatchFileError, FastpullError, UsageError
from .listing import human_duration, image_rows
from .progress import human_size, renderer_for, summary_table
from .puller import Puller, PullResult
from .reference import Reference
from .registry import DOCKER_HUB, RegistryClient
from .settings import Settings
from .store import Store, resolve_store_path
from .transport import Transport
from .types import Platform, PlatformSelection

_STORE_HELP = "OCI layout directory (default: $FASTPULL_STORE or ~/.local/share/fastpull/store)"


def _open_store(settings: Settings, create: bool = True) -> Store:
    return Store.open(resolve_store_path(settings.store), create=create)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--store", help=_STORE_HELP)
@click.option(
    "--insecure-registry",
    "insecure",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Allow plain HTTP / unverified TLS for this registry (repeatable).",
)
@click.option("--ca-cert", type=click.Path(dir_okay=False), help="Extra CA certificate (PEM).")
@click.option(
    "--connections",
    "--max-concurrent-downloads",
    "connections",
    type=click.IntRange(1, 64),
    help="Transfers at once, across all blobs and chunks (default 16).",
)
@click.option(
    "--workers",
    type=click.IntRange(0, 16),
    help="Download processes (default: none for small pulls, else one per two cores, max 4).",
)
@click.option(
    "--stall-timeout",
    type=click.IntRange(1, 3600),
    metavar="SECONDS",
    help="Restart a transfer slower than 1 KiB/s for this long (default 30).",
)
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
def pull(
    name: str | None,
    batch_files: tuple[str, ...],
    all_tags: bool,
    platform_text: str | None,
    quiet: bool,
    json_output: bool,
    store: str | None,
    insecure: tuple[str, ...],
    ca_cert: str | None,
    connections: int | None,
    workers: int | None,
    stall_timeout: int | None,
    stats_file: str | None,
    fail_fast: bool,
    report_file: str | None,
) -> None:
    """Download an image (NAME[:TAG|@DIGEST]), or every image of batch files (-f FILE),
    into the local OCI layout store."""
    if name is None and not batch_files:
        raise UsageError("Missing argument 'NAME' (or -f FILE)")
    if (fail_fast or report_file) and not batch_files:
        raise UsageError("--fail-fast and --report go with -f FILE")
    ref = Reference.parse(name) if name is not None else None
    if all_tags:
        if ref is None or name is None:
            raise UsageError("--all-tags needs a repository NAME")
        check_all_tags(name, ref)
    # Every batch file is read and checked before anything is downloaded.
    entries = [entry for path in batch_files for entry in parse_batch(_read_batch(path), path)]
    settings = Settings.load(
        insecure_registries=insecure,
        ca_cert=ca_cert,
        store=store,
        connections=connections,
        workers=workers,
        stall_timeout=stall_timeout,
    )
    target = PlatformSelection.parse(platform_text) if platform_text else None
    if batch_files:
        if ref is not None and name is not None:
            default_tag = tag_was_defaulted(name, ref) and not all_tags
            entries.insert(
                0, BatchEntry(ref, "command line", None, all_tags, default_tag=default_tag)
            )
        render = renderer_for(quiet=quiet, json_output=json_output, batch=True)
        with cancel.handled():
            batch = pull_batch(
                entries, settings=settings, platforms=target, fail_fast=fail_fast, on_event=render
            )
        _finish_batch(batch, quiet or json_output, report_file, stats_file)
        return
    assert ref is not None and name is not None
    the_store = _open_store(settings)
    render = renderer_for(quiet=quiet, json_output=json_output)
    with (
        cancel.handled(),
        Puller(the_store, settings=settings, platform=target, on_event=render) as puller,
    ):
        if all_tags:
            tags = puller.tags(ref)
            if not tags:
                raise UsageError(f"repository {ref.familiar_name} has no tags")
            results = [puller.pull(ref.with_tag(tag)) for tag in tags]
        else:
            results = [puller.pull(ref, default_tag=tag_was_defaulted(name, ref))]
    if stats_file:
        _write_stats(stats_file, results)


def _read_batch(path: str) -> str:
    """A batch file's text; ``-`` is standard input."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise BatchFileError(f"cannot read batch file {path}: {why}") from None


def _finish_batch(
    batch: BatchResult, machine_output: bool, report_file: str | None, stats_file: str | None
) -> None:
    """The summary table, ``--report``, ``--stats``, and the exit status of a batch."""
    if not machine_output:
        click.echo()
        for line in summary_table([o.event() for o in batch.outcomes]):
            click.echo(line)
    if report_file:
        with open(report_file, "wb") as out:
            out.write(orjson.dumps(batch.to_json(), option=orjson.OPT_INDENT_2))
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
    with open(path, "wb") as out:
        out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2))


@cli.command()
@click.argument("repository", required=False)
@click.option("--digests", is_flag=True, help="Show repo digests.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--store", help=_STORE_HELP)
def images(repository: str | None, digests: bool, fmt: str, store: str | None) -> None:
    """List the images in the store."""
    settings = Settings.load(store=store)
    path = resolve_store_path(settings.store)
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
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _login_server(server: str | None) -> str:
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
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]")
@click.option("--ca-cert", type=click.Path(dir_okay=False))
def login(
    server: str | None,
    username: str | None,
    password: str | None,
    password_stdin: bool,
    insecure: tuple[str, ...],
    ca_cert: str | None,
) -> None:
    """Log in to a registry (default Docker Hub); credentials go to docker's config.json."""
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
    if not username:
        username = click.prompt("Username")
    if not password:
        password = click.prompt("Password", hide_input=True)
    if not username or not password:
        raise UsageError("username and password are required")
    credentials = Credentials(username=username, password=password)
    settings = Settings.load(insecure_registries=insecure, ca_cert=ca_cert)
    with cancel.handled(), Transport(tls_for=settings.tls_for) as transport:
        client = RegistryClient(
            registry, settings=settings, credentials=credentials, transport=transport
        )
        client.check_login()
    CredentialStore().store(registry, credentials)
    click.echo("Login Succeeded")


@cli.command()
@click.argument("server", required=False)
def logout(server: str | None) -> None:
    """Remove stored credentials for a registry (default Docker Hub)."""
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
    """Entry point: run the command, map errors to one stderr line and an exit code."""
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
