"""Nothing in the directory a user runs fastpull from is executed: not by the download
worker processes, not as a credential helper.

Users pull from inside cloned repositories and download folders. A ``pycurl.py``, a
``fastpull/`` folder or a ``docker-credential-*`` script there must not run, while the
installed fastpull keeps working.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fastpull.engine.worker import command_line, import_roots
from tests.integration.conftest import console_script, index_entries
from tests.support.images import MiB, make_image, make_layer

# Each planted module records that it ran, then breaks the import it shadows.
_PLANTED = "open({marker!r}, 'a').write({name!r} + '\\n'); raise SystemExit('planted {name} ran')\n"
_SHADOWED = ("pycurl", "xxhash", "orjson", "blake3", "click", "select", "socket")


def _plant(directory: Path, marker: Path) -> None:
    for name in _SHADOWED:
        (directory / f"{name}.py").write_text(_PLANTED.format(marker=str(marker), name=name))
    package = directory / "fastpull"
    package.mkdir()
    (package / "__init__.py").write_text(_PLANTED.format(marker=str(marker), name="fastpull"))
    engine = package / "engine"
    engine.mkdir()
    (engine / "__init__.py").write_text(_PLANTED.format(marker=str(marker), name="engine"))


def test_workers_never_import_from_the_current_directory(
    registry: Any, repo: str, tmp_path: Path
) -> None:
    registry.pusher.push_image(repo, "1", make_image([make_layer(3 * MiB, seed=41)]))
    hostile = tmp_path / "clone"
    hostile.mkdir()
    marker = tmp_path / "ran.txt"
    _plant(hostile, marker)
    store = tmp_path / "store"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)

    # ``--workers 2`` starts worker processes even for a small image.
    done = subprocess.run(
        [
            console_script(),
            "pull",
            "--workers",
            "2",
            "--store",
            str(store),
            registry.host + f"/{repo}:1",
        ],
        cwd=hostile,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert not marker.exists(), marker.read_text()
    assert done.returncode == 0, done.stderr
    assert len(index_entries(store)) == 1


def test_a_worker_ignores_pythonpath_and_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hostile = tmp_path / "downloads"
    hostile.mkdir()
    marker = tmp_path / "ran.txt"
    _plant(hostile, marker)
    monkeypatch.chdir(hostile)
    monkeypatch.setenv("PYTHONPATH", str(hostile))
    monkeypatch.setenv("PYTHONSTARTUP", str(hostile / "pycurl.py"))

    # The worker's own command line, asked only to import what a worker imports.
    argv = command_line(0)
    probe = (
        "import fastpull.engine.worker, pycurl, xxhash, orjson, blake3; print(fastpull.__file__)"
    )
    argv[argv.index("-c") + 1] = "import sys; sys.path[:0] = sys.argv[2:]; " + probe
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    assert not marker.exists(), marker.read_text()
    assert done.returncode == 0, done.stderr
    loaded_from = Path(done.stdout.strip()).resolve()
    assert hostile not in loaded_from.parents
    assert loaded_from.parents[1] == Path(import_roots()[0])


def test_the_worker_finds_fastpull_and_its_dependencies_where_this_process_did() -> None:
    import pycurl

    import fastpull

    roots = import_roots()

    assert roots[0] == str(Path(fastpull.__file__).resolve().parents[1])
    assert any(Path(pycurl.__file__).resolve().is_relative_to(root) for root in roots[1:])
    assert len(roots) == len(set(roots))
    assert command_line(7)[:2] == [sys.executable, "-I"]
    assert command_line(7)[-len(roots) :] == roots


def test_a_credential_helper_is_not_run_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastpull.errors import CredentialError
    from fastpull.registry.credentials import CredentialStore

    hostile = tmp_path / "clone"
    hostile.mkdir()
    marker = tmp_path / "ran.txt"
    helper = hostile / "docker-credential-evil"
    helper.write_text(f"#!/bin/sh\necho ran > {marker}\n")
    helper.chmod(0o755)
    config = tmp_path / "config.json"
    config.write_text('{"credsStore": "evil"}')
    monkeypatch.chdir(hostile)
    # "." and an empty entry both mean the current directory to a shell's lookup.
    monkeypatch.setenv("PATH", os.pathsep.join([".", "", os.environ.get("PATH", "")]))

    with pytest.raises(CredentialError, match="docker-credential-evil not found in PATH"):
        CredentialStore(config).get("registry.example:5000")

    assert not marker.exists()
