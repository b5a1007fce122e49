"""What a user can get wrong: option values, references, config files, docker's config.json,
credential helpers, the store. Each is one ``Error:`` line on stderr, no traceback, nothing on
stdout, and the exit code of the README's table (2 usage and config, 3 credentials, 7 store).

``test_cli.py`` holds the first of these (platform, CA file, login flags, unknown commands);
nothing here needs a registry: every mistake is caught before fastpull goes on the network
(the registry named, 127.0.0.1:1, refuses connections, which would be exit 5).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import CliResult, one_line

NOWHERE = "127.0.0.1:1/app:1"


def _one_line(result: CliResult) -> str:
    assert result.out == ""
    return one_line(result.err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--connections", "abc"), "Error: Invalid value for '--connections'"),
        (("--connections", "257"), "Error: Invalid value for '--connections'"),
        (("--max-connections", "0"), "Error: Invalid value for '--max-connections'"),
        (("--workers", "-1"), "Error: Invalid value for '--workers'"),
        (("--workers", "17"), "Error: Invalid value for '--workers'"),
        (("--stall-timeout", "0"), "Error: Invalid value for '--stall-timeout'"),
        (("--stall-timeout", "1.5"), "Error: Invalid value for '--stall-timeout'"),
        (("--platform", ""), "Error: invalid platform list ''"),
        (("--platform", "linux/"), "Error: invalid platform 'linux/'"),
        (("--platform", "linux/amd64/v8/x"), "Error: invalid platform"),
        (("--insecure-registry", "a b"), "Error: invalid insecure registry 'a b'"),
        (("--insecure-registry", ""), "Error: invalid insecure registry ''"),
        (("--stats", "."), "Error: Invalid value for '--stats'"),
        # Found before anything is pulled (NOWHERE would fail later, with exit 5).
        (("--stats", "/no/such/dir/stats.json"), "Error: --stats /no/such/dir/stats.json"),
        (("--ca-cert", "."), "Error: Invalid value for '--ca-cert'"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else None,
)
def test_wrong_option_values_are_usage_errors(
    args: tuple[str, ...], message: str, cli: Callable[..., CliResult]
) -> None:
    result = cli("pull", *args, NOWHERE)

    assert result.code == 2
    assert _one_line(result).startswith(message)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("", "reference is empty"),
        ("a" * 300, "must not be longer than 255 characters"),
        ("app@sha256:abc", "invalid digest"),
        ("app@sha256:../../etc/passwd", "invalid"),
        ("app@md5:" + "0" * 32, "unsupported digest algorithm 'md5'"),
        ("App", "must be lowercase"),
        ("app:" + "t" * 200, "invalid reference format"),
        ("app:tag with space", "invalid reference format"),
    ],
    ids=["empty", "long", "short-digest", "traversing-digest", "md5", "upper", "long-tag", "space"],
)
def test_invalid_references_are_usage_errors(
    reference: str, message: str, cli: Callable[..., CliResult]
) -> None:
    result = cli("pull", reference)

    assert result.code == 2
    line = _one_line(result)
    assert line.startswith("Error: invalid reference format")
    assert message in line


# Each scenario prepares tmp_path (and the environment) and returns the pull arguments, the
# exit code and a fragment of the one error line.
Scenario = Callable[[Path, pytest.MonkeyPatch, Any], tuple[tuple[str, ...], int, str]]


def _store_of_another_format(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    other = tmp / "other-layout"
    other.mkdir()
    (other / "oci-layout").write_text('{"imageLayoutVersion": "9.0.0"}')
    return ("--store", str(other), NOWHERE), 7, "not an OCI image layout"


def _store_with_foreign_files(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    foreign = tmp / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    return ("--store", str(foreign), NOWHERE), 7, "not an OCI image layout"


def _store_inside_a_file(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    (tmp / "a-file").write_text("x")
    return ("--store", str(tmp / "a-file" / "store"), NOWHERE), 7, "Not a directory"


def _store_with_broken_index(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    store = tmp / "broken"
    store.mkdir()
    (store / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (store / "index.json").write_text("{")
    return ("--store", str(store), NOWHERE), 7, "index.json is not valid JSON"


def _fastpull_config_is_a_directory(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    (tmp / "config-dir").mkdir()
    env.setenv("FASTPULL_CONFIG", str(tmp / "config-dir"))
    return (NOWHERE,), 2, "cannot read"


def _fastpull_config_with_a_wrong_value(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    (tmp / "fp.json").write_text('{"connections": "many"}')
    env.setenv("FASTPULL_CONFIG", str(tmp / "fp.json"))
    return (NOWHERE,), 2, "connections must be an integer from 1 to 256"


def _fastpull_config_with_an_unknown_key(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    (tmp / "fp.json").write_text('{"conections": 4}')
    env.setenv("FASTPULL_CONFIG", str(tmp / "fp.json"))
    return (NOWHERE,), 2, "unknown setting(s) conections"


def _docker_config_not_json(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    docker.config_file.write_text('{"auths": ')
    return (NOWHERE,), 2, str(docker.config_file)


def _docker_config_is_a_directory(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    docker.config_file.mkdir()
    return (NOWHERE,), 2, "cannot read"


def _docker_config_auth_not_base64(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    docker.write({"auths": {"127.0.0.1:1": {"auth": "%%%"}}})
    return (NOWHERE,), 2, "is not base64 of 'user:password'"


def _docker_auth_config_env_broken(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    env.setenv("DOCKER_AUTH_CONFIG", "[")
    return (NOWHERE,), 2, "DOCKER_AUTH_CONFIG"


def _helper_name_is_a_path(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    docker.write({"credHelpers": {"127.0.0.1:1": "../../bin/sh"}})
    return (NOWHERE,), 2, "invalid credential helper"


def _helper(tmp: Path, env: pytest.MonkeyPatch, script: str) -> None:
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    helper = bindir / "docker-credential-fpbad"
    helper.write_text("#!/bin/sh\n" + script)
    helper.chmod(0o755)
    env.setenv("PATH", f"{bindir}:/usr/bin:/bin")


def _helper_missing(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    docker.write({"credsStore": "fpbad"})
    env.setenv("PATH", str(tmp / "empty-bin"))
    return (NOWHERE,), 3, "docker-credential-fpbad not found"


def _helper_fails(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    _helper(tmp, env, 'echo "keychain is locked" >&2\nexit 1\n')
    docker.write({"credsStore": "fpbad"})
    return (NOWHERE,), 3, "keychain is locked"


def _helper_prints_garbage(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    _helper(tmp, env, "echo '<html>'\n")
    docker.write({"credHelpers": {"127.0.0.1:1": "fpbad"}})
    return (NOWHERE,), 3, "docker-credential-fpbad"


def _batch_file_missing(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    return ("-f", str(tmp / "no-such-list.txt")), 2, "cannot read batch file"


def _batch_file_is_a_directory(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    return ("-f", str(tmp)), 2, "cannot read batch file"


def _batch_file_not_text(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    binary = tmp / "images.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    return ("-f", str(binary)), 2, "not UTF-8 text"


def _batch_file_bad_json(tmp: Path, env: pytest.MonkeyPatch, docker: Any) -> Any:
    listing = tmp / "images.json"
    listing.write_text('{"images": [\n  "app:1",\n  {"image": "app:2", "platfroms": "all"}\n]}\n')
    return ("-f", str(listing)), 2, "platfroms"


@pytest.mark.parametrize(
    "scenario",
    [
        _batch_file_missing,
        _batch_file_is_a_directory,
        _batch_file_not_text,
        _batch_file_bad_json,
        _store_of_another_format,
        _store_with_foreign_files,
        _store_inside_a_file,
        _store_with_broken_index,
        _fastpull_config_is_a_directory,
        _fastpull_config_with_a_wrong_value,
        _fastpull_config_with_an_unknown_key,
        _docker_config_not_json,
        _docker_config_is_a_directory,
        _docker_config_auth_not_base64,
        _docker_auth_config_env_broken,
        _helper_name_is_a_path,
        _helper_missing,
        _helper_fails,
        _helper_prints_garbage,
    ],
    ids=lambda scenario: scenario.__name__.strip("_"),
)
def test_unusable_files_and_helpers_are_one_line_errors(
    scenario: Scenario,
    cli: Callable[..., CliResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    docker_config: Any,
) -> None:
    args, code, fragment = scenario(tmp_path, monkeypatch, docker_config)

    result = cli("pull", *args)

    assert result.code == code, result.err
    assert fragment in _one_line(result)


@pytest.mark.parametrize("scenario", [_batch_file_missing, _batch_file_is_a_directory])
def test_copy_reads_batch_files_as_pull_does(
    scenario: Scenario,
    cli: Callable[..., CliResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    docker_config: Any,
) -> None:
    args, code, fragment = scenario(tmp_path, monkeypatch, docker_config)

    result = cli("copy", *args, "--to", "127.0.0.1:1/mirror")

    assert result.code == code, result.err
    assert fragment in _one_line(result)


def test_helper_secrets_stay_out_of_its_error(
    cli: Callable[..., CliResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    docker_config: Any,
) -> None:
    # A helper that prints its secret and then fails must not have it echoed back.
    secret = "helper-secret-" + base64.b64encode(b"do not print").decode()
    reply = json.dumps({"ServerURL": "x", "Username": "u", "Secret": secret})
    _helper(tmp_path, monkeypatch, f"echo '{reply}' >&2\necho '{reply}'\nexit 3\n")
    docker_config.write({"credsStore": "fpbad"})

    result = cli("pull", NOWHERE)

    assert result.code == 3
    assert secret not in result.err + result.out


@pytest.mark.parametrize(
    "args", [(), ("-u", "me"), ("-u", "me", "-p", "")], ids=["nothing", "no-password", "empty"]
)
def test_login_without_a_terminal_does_not_prompt(
    args: tuple[str, ...], cli: Callable[..., CliResult]
) -> None:
    result = cli("login", *args, "127.0.0.1:1")

    assert result.code == 2
    assert "standard input is not a terminal" in _one_line(result)
