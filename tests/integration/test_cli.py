"""The ``fastpull`` command as users meet it: entry points, the hashing backend it reports,
how bad input and failures are reported, the Python API, and concurrent pulls into one store."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import fastpull
from fastpull import hashing
from fastpull.registry.transport import RetryPolicy
from fastpull.store.layout import REF_NAME_ANNOTATION
from tests.integration.conftest import blob, console_script, index_entries, one_line
from tests.support.images import MiB, make_image, make_index, make_layer

_IN_CI = os.environ.get("CI") == "true"
_HASHING_LINE = re.compile(r"hashing: (native \(.+\)|python \(hashlib\))")

# Runs the CLI in a fresh interpreter in which ``fastpull._native`` cannot be imported, as on a
# machine where the extension was never built.
_WITHOUT_NATIVE = """
import importlib.abc
import sys


class HideNative(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastpull._native":
            raise ImportError("hidden by the test", name=name)
        return None


sys.meta_path.insert(0, HideNative())
from fastpull.cli.commands import main

sys.exit(main(sys.argv[1:]))
"""

# One process pulling several references in turn, stopping at the first failure. It imports
# fastpull, says it is ready and waits for the go file, so that both processes really start
# pulling at the same moment instead of one finishing while the other still starts up.
_PULL_EACH = """
import pathlib
import sys
import time

from fastpull.cli.commands import main

ready, go, *references = sys.argv[1:]
pathlib.Path(ready).touch()
deadline = time.monotonic() + 60
while not pathlib.Path(go).exists():
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.005)
for reference in references:
    code = main(["pull", "-q", reference])
    if code:
        sys.exit(code)
"""


# Runs one command in a fresh interpreter, then names on stderr's last line the modules it
# imported (those the interpreter had loaded before are left out).
_MODULES_AFTER = """
import sys

before = set(sys.modules)
from fastpull.cli.commands import main

code = main(sys.argv[1:])
print(" ".join(sorted(set(sys.modules) - before)), file=sys.stderr)
sys.exit(code)
"""
# What a single pull has no use for: other commands' code, batches over a cluster, archives,
# pushing, store maintenance.
_NOT_FOR_A_PULL = (
    "fastpull.cli.archive",
    "fastpull.cli.mirror",
    "fastpull.cli.listing",
    "fastpull.archive",
    "fastpull.cluster",
    "fastpull.mirror",
    "fastpull.pusher",
    "fastpull.storecheck",
    "fastpull.registry.upload",
    "fastpull.store.maintenance",
    "fastpull.store.gc",
    "fastpull.store.inventory",
)
# Libraries a pull of a small image over HTTP has no use for: worker processes' plumbing (it
# runs inline), the hashing fallbacks beside the extension (SHA-256 blobs), secrets' hmac.
_NOT_FOR_A_SMALL_PULL = ("multiprocessing", "pickle", "subprocess", "blake3", "secrets", "hmac")


@pytest.fixture(autouse=True)
def _own_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's fastpull config out of these tests."""
    monkeypatch.setenv("FASTPULL_CONFIG", str(tmp_path / "fastpull-config.json"))


def _env(**changes: str | None) -> dict[str, str]:
    """This process's (already isolated) environment with some variables set or removed."""
    env = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env or _env())


# -- entry points and the hashing backend ------------------------------------------------------


def test_version_names_the_hashing_backend(cli: Any) -> None:
    result = cli("version")

    assert result.code == 0
    assert result.lines[0] == f"fastpull {fastpull.__version__}" == "fastpull 0.1.0"
    assert _HASHING_LINE.fullmatch(result.lines[1])
    assert result.lines[1].startswith(f"hashing: {hashing.BACKEND} (")
    if _IN_CI:
        # CI builds the extension; falling back there would hide a broken build.
        assert result.lines[1].startswith("hashing: native (")


def _modules_imported_by(*args: str) -> set[str]:
    done = _run(sys.executable, "-c", _MODULES_AFTER, *args)
    assert done.returncode == 0, done.stderr
    return set(done.stderr.strip().splitlines()[-1].split())


def _unneeded(modules: set[str]) -> set[str]:
    return {
        m
        for m in modules
        for prefix in _NOT_FOR_A_PULL
        if m.split(".")[: prefix.count(".") + 1] == prefix.split(".")
    }


def test_a_pull_imports_only_what_it_runs(registry: Any, repo: str, docker_config: Any) -> None:
    # (What `version` imports: tests/unit/test_cli_options.py.)
    registry.pusher.push_image(repo, "1", make_image([make_layer(30_000, seed=430)]))

    pulled = _modules_imported_by("pull", "-q", f"{registry.host}/{repo}:1")

    assert {"fastpull.bulk", "fastpull.engine.download", "fastpull.store.layout"} <= pulled
    assert _unneeded(pulled) == set()
    if hashing.BACKEND == "native":
        assert pulled & {*_NOT_FOR_A_SMALL_PULL, "hashlib"} == set()
    else:
        assert pulled & set(_NOT_FOR_A_SMALL_PULL) == set()
    # Commands registered lazily are there when asked for.
    assert "fastpull.cli.mirror" in _modules_imported_by("copy", "--help")


def test_lazily_registered_commands_are_where_the_cli_looks_for_them() -> None:
    from fastpull.cli.commands import LAZY_COMMANDS, command_module

    for name, module in LAZY_COMMANDS.items():
        assert name in {c.name for c in command_module(module).COMMANDS}
    for module in set(LAZY_COMMANDS.values()):
        assert {c.name for c in command_module(module).COMMANDS} <= set(LAZY_COMMANDS)


def test_python_m_fastpull_help() -> None:
    done = _run(sys.executable, "-m", "fastpull", "--help")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: ")
    for command in ("images", "login", "logout", "pull", "version"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.MULTILINE), command


def test_console_script_is_installed() -> None:
    done = _run(console_script(), "version")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"fastpull {fastpull.__version__}"


def test_require_native_refuses_to_import_without_the_extension() -> None:
    done = _run(
        sys.executable, "-c", _WITHOUT_NATIVE, "version", env=_env(FASTPULL_REQUIRE_NATIVE="1")
    )

    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1].startswith(
        "ImportError: fastpull was built without its native extension; "
        "FASTPULL_REQUIRE_NATIVE=1 requires it"
    )


def test_without_the_extension_hashing_falls_back_to_python() -> None:
    done = _run(
        sys.executable, "-c", _WITHOUT_NATIVE, "version", env=_env(FASTPULL_REQUIRE_NATIVE=None)
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "hashing: python (hashlib)"


def test_fastpull_native_0_selects_the_python_backend() -> None:
    done = _run(sys.executable, "-m", "fastpull", "version", env=_env(FASTPULL_NATIVE="0"))

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "hashing: python (hashlib)"


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ("pull", "--platform", "foo/bar/baz/qux", "busybox"),
            "Error: invalid platform 'foo/bar/baz/qux': expected os/arch[/variant]",
            id="platform",
        ),
        pytest.param(
            ("pull", "--ca-cert", "/nonexistent/ca.pem", "busybox"),
            "Error: CA certificate file /nonexistent/ca.pem does not exist",
            id="ca-cert",
        ),
        pytest.param(
            ("login", "--password-stdin", "registry.example"),
            "Error: must provide --username with --password-stdin",
            id="password-stdin-without-username",
        ),
        pytest.param(
            ("login", "-u", "me", "-p", "secret", "--password-stdin", "registry.example"),
            "Error: --password and --password-stdin are mutually exclusive",
            id="password-twice",
        ),
        pytest.param(
            ("pull", "--all-tags", "busybox:1.36"),
            "Error: tag can't be used with --all-tags/-a",
            id="all-tags-with-tag",
        ),
        pytest.param(
            ("pull", "Not/A:Valid:Ref"),
            "Error: invalid reference format: repository name must be lowercase",
            id="reference",
        ),
        pytest.param(
            ("pull", "--max-concurrent-downloads", "0", "busybox"),
            # click names the option by its first spelling, which may be an alias.
            "Error: Invalid value for '--",
            id="max-concurrent-downloads-0",
        ),
        pytest.param(
            ("frobnicate",),
            "Error: No such command 'frobnicate'",
            id="unknown-command",
        ),
        pytest.param(
            ("pull", "--bogus", "busybox"),
            "Error: No such option",
            id="unknown-option",
        ),
        pytest.param(("pull",), "Error: Missing argument 'NAME'", id="missing-argument"),
        pytest.param(
            ("images", "--format", "xml"),
            "Error: Invalid value for '--format'",
            id="images-format",
        ),
    ],
)
def test_bad_usage_exits_2_with_one_line(args: tuple[str, ...], message: str, cli: Any) -> None:
    result = cli(*args)

    assert result.code == 2
    assert one_line(result.err).startswith(message)
    assert result.out == ""


def test_images_on_a_store_that_does_not_exist_prints_only_the_header(
    cli: Any, tmp_path: Path
) -> None:
    missing = tmp_path / "no-store-here"

    result = cli("images", "--store", str(missing))

    assert result.code == 0, result.err
    assert result.lines == ["REPOSITORY   TAG   IMAGE ID   CREATED   SIZE"]
    assert not missing.exists()


def test_images_on_an_empty_store_directory_prints_only_the_header(
    cli: Any, tmp_path: Path
) -> None:
    empty = tmp_path / "empty-store"
    empty.mkdir()

    result = cli("images", "--store", str(empty))

    assert (result.code, result.err) == (0, "")
    assert result.lines == ["REPOSITORY   TAG   IMAGE ID   CREATED   SIZE"]


# -- failures while working --------------------------------------------------------------------


# Each scenario prepares tmp_path and returns the arguments, the exit code and the start of the
# one stderr line expected.
Scenario = tuple[tuple[str, ...], int, str]


def _unreachable_registry(tmp_path: Path) -> Scenario:
    return (
        ("pull", "127.0.0.1:1/nothing:here"),
        5,
        "Error: cannot reach registry 127.0.0.1:1: connection refused",
    )


def _store_is_a_file(tmp_path: Path) -> Scenario:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a store")
    return (
        ("pull", "--store", str(a_file), "127.0.0.1:1/nothing:here"),
        7,
        f"Error: store path {a_file} is not a directory",
    )


def _images_in_a_foreign_directory(tmp_path: Path) -> Scenario:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    return (
        ("images", "--store", str(foreign)),
        7,
        f"Error: {foreign} is not an OCI image layout",
    )


def _broken_config_file(tmp_path: Path) -> Scenario:
    config = tmp_path / "fastpull-config.json"
    config.write_text("{nope")
    return (("pull", "127.0.0.1:1/nothing:here"), 2, f"Error: {config} is not valid JSON")


@pytest.mark.parametrize(
    "scenario",
    [_unreachable_registry, _store_is_a_file, _images_in_a_foreign_directory, _broken_config_file],
    ids=lambda scenario: scenario.__name__.strip("_"),
)
def test_failures_are_one_line_with_their_exit_code(
    scenario: Any, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the outcome matters here, not the backoff before it.
    monkeypatch.setattr(RetryPolicy, "delay", lambda self, attempt, retry_after=None: 0.0)
    args, code, message = scenario(tmp_path)

    result = cli(*args)

    assert result.code == code
    assert one_line(result.err).startswith(message)


def test_registry_errors_are_one_line(registry: Any, repo: str, cli: Any) -> None:
    amd = make_image([make_layer(100, seed=410)])
    arm = make_image([make_layer(100, seed=411)], architecture="arm64")
    registry.pusher.push_index(repo, "1", make_index([amd, arm]))

    unknown = cli("pull", f"{registry.host}/{repo}:2")
    wrong_platform = cli("pull", "--platform", "linux/s390x", f"{registry.host}/{repo}:1")

    assert unknown.code == 4
    assert one_line(unknown.err) == (
        f"Error: manifest for {registry.host}/{repo}:2 not found: manifest unknown"
    )
    assert wrong_platform.code == 4
    assert "no matching manifest for linux/s390x" in one_line(wrong_platform.err)


# -- the Python API ----------------------------------------------------------------------------


def test_python_api_reports_what_each_pull_did(
    registry: Any, repo: str, docker_config: Any
) -> None:
    layers = [make_layer({"hello.txt": b"hello\n"}, seed=420), make_layer(40_000, seed=421)]
    image = make_image(layers)
    registry.pusher.push_image(repo, "1", image)
    ref = f"{registry.host}/{repo}:1"

    first = fastpull.pull(ref)
    second = fastpull.pull(ref)

    assert isinstance(first, fastpull.PullResult)
    assert str(first.digest) == image.manifest_digest
    assert first.reference == ref
    assert first.bytes_downloaded == image.config.size + sum(layer.size for layer in layers)
    assert first.seconds > 0
    assert not first.up_to_date
    assert blob(docker_config.store, layers[1].digest).read_bytes() == layers[1].data

    assert second.digest == first.digest
    assert second.bytes_downloaded == 0
    assert second.seconds > 0
    assert second.up_to_date


# -- concurrency -------------------------------------------------------------------------------


def test_two_processes_pull_into_one_store_at_once(
    registry: Any, repo: str, docker_config: Any, tmp_path: Path
) -> None:
    base = make_layer(4 * MiB, seed=430)
    images = [
        make_image([base, make_layer({f"app/{i}.txt": f"image {i}\n".encode()}, seed=440 + i)])
        for i in range(8)
    ]
    refs = []
    for i, image in enumerate(images):
        registry.pusher.push_image(repo, f"t{i}", image)
        refs.append(f"{registry.host}/{repo}:t{i}")
    # Alternate the images between the processes so both start on the shared base layer.
    shares = [refs[0::2], refs[1::2]]

    ready = [tmp_path / f"ready-{i}" for i in range(len(shares))]
    go = tmp_path / "go"

    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _PULL_EACH, str(flag), str(go), *share],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for flag, share in zip(ready, shares, strict=True)
    ]
    deadline = time.monotonic() + 60
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.005)
    go.touch()
    outputs = [process.communicate(timeout=120) for process in processes]

    for process, share, (out, err) in zip(processes, shares, outputs, strict=True):
        assert (process.returncode, err) == (0, ""), err
        assert out.splitlines() == share
    store = docker_config.store
    named = {e["annotations"][REF_NAME_ANNOTATION]: e["digest"] for e in index_entries(store)}
    assert named == {ref: image.manifest_digest for ref, image in zip(refs, images, strict=True)}
    expected = {image.manifest_digest for image in images}
    expected |= {b.digest for image in images for b in image.referenced_blobs()}
    stored = sorted((store / "blobs" / "sha256").iterdir())
    assert {f"sha256:{path.name}" for path in stored} == expected
    for path in stored:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    assert list((store / "ingest").iterdir()) == []
