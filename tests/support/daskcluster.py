"""A real Dask cluster on loopback: ``dask scheduler`` and ``dask worker`` processes.

Each process runs in its own session (so a test can ``kill -9`` a worker together with its
nanny and every child), with ``PYTHONPATH`` set to this checkout so that the nodes import the
fastpull under test, and with the dashboard off (it would listen on every interface).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_START_TIMEOUT = 60.0


class DaskUnavailable(RuntimeError):
    """``distributed`` is not installed."""


class DaskCluster:
    """A scheduler and named workers; :meth:`add_worker` and :meth:`kill_worker` change
    the set while it runs."""

    def __init__(self, workers: int = 2, *, env: dict[str, str] | None = None) -> None:
        try:
            import distributed  # noqa: F401
        except ImportError as exc:
            raise DaskUnavailable(str(exc)) from None
        self._initial = workers
        self._tmp = tempfile.TemporaryDirectory(prefix="fastpull-dask-")
        self.workdir = Path(self._tmp.name)
        self.scheduler_file = self.workdir / "scheduler.json"
        self.env = dict(env if env is not None else os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), self.env.get("PYTHONPATH")])
        )
        self._scheduler: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def local_directory(self) -> Path:
        """The base of every worker's local directory (Dask's scratch space; one per
        cluster, so that a worker starting cleans up after the workers that died)."""
        return self.workdir / "space"

    @property
    def address(self) -> str:
        """``tcp://127.0.0.1:PORT`` of the scheduler."""
        return str(json.loads(self.scheduler_file.read_text())["address"])

    def start(self) -> DaskCluster:
        self._scheduler = self._spawn(
            "scheduler",
            [
                *("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"),
                *("--scheduler-file", str(self.scheduler_file)),
            ],
        )
        _wait_for(lambda: self.scheduler_file.exists(), "the Dask scheduler to start")
        for number in range(self._initial):
            self.add_worker(f"w{number + 1}")
        return self

    def add_worker(self, name: str, *, env: dict[str, str] | None = None) -> None:
        """Start worker ``name`` (one process, one thread) and wait until it registered."""
        self.workers[name] = self._spawn(
            name,
            [
                *("worker", "--scheduler-file", str(self.scheduler_file), "--name", name),
                *("--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"),
                *("--local-directory", str(self.local_directory)),
            ],
            env=env,
        )
        _wait_for(lambda: name in self.worker_names(), f"Dask worker {name} to register")

    def worker_names(self) -> set[str]:
        from distributed import Client

        with Client(self.address, timeout=10, set_as_default=False) as client:
            return {str(w["name"]) for w in client.scheduler_info()["workers"].values()}

    def kill_worker(self, name: str) -> set[int]:
        """``kill -9`` worker ``name``, its nanny and every process they started; returns
        the PIDs that were in its session."""
        proc = self.workers.pop(name)
        members = _session_members(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return members

    def stop(self) -> None:
        for proc in [*self.workers.values(), self._scheduler]:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers.values(), self._scheduler]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.workers.clear()
        self._scheduler = None
        self._tmp.cleanup()

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> DaskCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "dask", *args],
                cwd=self.workdir,
                env=env or self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def _session_members(sid: int) -> set[int]:
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    members.add(int(entry.name))
            except OSError:
                continue
    return members


def _wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if condition():  # type: ignore[operator]
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")
