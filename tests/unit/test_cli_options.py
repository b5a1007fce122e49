"""The CLI's shared options: declared once, handed to commands as one object, and cheap to
import (``fastpull version`` loads none of the pull, batch or maintenance code)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fastpull.batchfile import command_line_entry
from fastpull.cli import options
from fastpull.cli.commands import cli
from fastpull.cli.options import SettingsOptions, settings_options, timeout_option
from fastpull.errors import InvalidReference, UsageError
from fastpull.registry.settings import Settings
from fastpull.store.maintenance import DEFAULT_TIMEOUT

SHARED = ("--store", "--insecure-registry", "--ca-cert", "--connections", "--workers")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTPULL_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.setenv("FASTPULL_CERTS_D", str(tmp_path / "certs.d"))
    monkeypatch.delenv("FASTPULL_INSECURE_REGISTRIES", raising=False)
    monkeypatch.delenv("FASTPULL_STORE", raising=False)


def _options_of(command: click.Command) -> dict[str, click.Option]:
    return {p.opts[0]: p for p in command.params if isinstance(p, click.Option) and p.opts}


def test_each_shared_option_reads_the_same_in_every_command() -> None:
    seen: dict[str, dict[str, tuple[object, ...]]] = {}
    context = click.Context(cli)
    for name in cli.list_commands(context):
        command = cli.get_command(context, name)
        assert command is not None
        for flag, option in _options_of(command).items():
            if flag in SHARED:
                shape = (option.help, option.metavar, option.multiple, repr(option.type))
                seen.setdefault(flag, {})[name] = shape
    stores = {"pull", "images", "verify", "rmi", "gc", "df", "save", "load", "push", "copy"}
    assert set(seen["--store"]) == stores
    assert set(seen["--insecure-registry"]) == {"pull", "verify", "login", "push", "copy"}
    assert set(seen["--ca-cert"]) == {"pull", "verify", "login", "push", "copy"}
    for flag, by_command in seen.items():
        assert len(set(by_command.values())) == 1, (flag, by_command)
        assert all(shape[0] for shape in by_command.values()), f"{flag} has no help"


def test_a_command_gets_its_shared_options_as_one_object() -> None:
    received: list[SettingsOptions] = []

    @click.command()
    @click.option("--other")
    @settings_options(registry=True, transfer=True)
    def command(other: str | None, settings: SettingsOptions) -> None:
        assert other == "x"
        received.append(settings)

    args = ["--other", "x", "--store", "/s", "--insecure-registry", "a:1"]
    args += ["--insecure-registry", "b", "--workers", "2", "--stall-timeout", "9"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    assert received == [
        SettingsOptions(store="/s", insecure=("a:1", "b"), workers=2, stall_timeout=9)
    ]
    flags = [p.opts[0] for p in command.params]
    assert flags == [
        "--other",
        "--store",
        "--insecure-registry",
        "--ca-cert",
        "--connections",
        "--max-connections",
        "--workers",
        "--stall-timeout",
    ]


def test_options_a_command_does_not_take_are_refused() -> None:
    @click.command()
    @settings_options(store=False, registry=True)
    def command(settings: SettingsOptions) -> None:
        assert settings.store is None

    assert CliRunner().invoke(command, ["--ca-cert", "x.pem"]).exit_code == 0
    assert CliRunner().invoke(command, ["--store", "/s"]).exit_code == 2


def test_loading_merges_them_as_settings_load_does(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    given = SettingsOptions("/s", ("reg.example:5000",), str(ca), 3, 100, 1, 7)
    assert given.load() == Settings.load(
        insecure_registries=("reg.example:5000",),
        ca_cert=str(ca),
        store="/s",
        connections=3,
        max_connections=100,
        workers=1,
        stall_timeout=7,
    )
    assert SettingsOptions().load() == Settings.load()


def test_the_timeout_default_is_the_maintenance_default() -> None:
    @click.command()
    @timeout_option
    def command(timeout: float) -> None:
        click.echo(repr(timeout))

    assert CliRunner().invoke(command, []).output.strip() == repr(DEFAULT_TIMEOUT)
    assert CliRunner().invoke(command, ["--timeout", "2.5"]).output.strip() == "2.5"
    assert f"{DEFAULT_TIMEOUT:g}" == options.TIMEOUT_SHOWN
    assert f"(default {options.TIMEOUT_SHOWN})" in CliRunner().invoke(command, ["--help"]).output


def test_version_imports_none_of_the_pull_code() -> None:
    script = (
        "import sys\n"
        "from fastpull.cli.commands import main\n"
        "assert main(['version']) == 0\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('fastpull'))))\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root, check=True
    )
    loaded = set(done.stdout.splitlines()[-1].split())
    assert "fastpull.cli.commands" in loaded
    heavy = {"fastpull.bulk", "fastpull.puller", "fastpull.storecheck", "fastpull.batchfile"}
    heavy |= {"fastpull.store.maintenance", "fastpull.store.layout", "fastpull.engine.download"}
    heavy |= {"fastpull.registry.client", "fastpull.registry.transport"}
    heavy |= {"fastpull.cli.archive", "fastpull.cli.mirror", "fastpull.cluster"}
    assert not loaded & heavy, sorted(loaded & heavy)


def test_the_command_line_names_one_image_or_a_repository() -> None:
    plain = command_line_entry("debian")
    assert (str(plain.reference), plain.origin, plain.all_tags) == (
        "docker.io/library/debian:latest",
        "command line",
        False,
    )
    assert plain.default_tag and plain.platforms is None and plain.store is None
    assert not command_line_entry("debian:12").default_tag
    repository = command_line_entry("r.example/app", all_tags=True)
    assert repository.all_tags and not repository.default_tag
    with pytest.raises(UsageError, match=r"^tag can't be used with --all-tags/-a$"):
        command_line_entry("r.example/app:1", all_tags=True)
    with pytest.raises(InvalidReference):
        command_line_entry("UPPER")
