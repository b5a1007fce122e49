"""The worker processes of a run, or, with none, one worker loop run inline.

Workers are fresh interpreters (``worker.command_line``) talking over a socket pair:
libcurl, OpenSSL and threads do not survive ``fork``, and multiprocessing's ``spawn`` would
re-run the caller's main script, which a library must not require to be guarded by
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import TYPE_CHECKING

from fastpull.engine.worker import Command, Fetch, Report, Shutdown, WorkerLoop, command_line
from fastpull.errors import FastpullError

if TYPE_CHECKING:
    import subprocess
    from multiprocessing.connection import Connection


class WorkerPool:
    """``count`` worker processes (``count == 0``: one loop inline) and their load."""

    def __init__(self, count: int) -> None:
        self._inline = WorkerLoop() if count == 0 else None
        self._conns: list[Connection] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(count):
                self._start()
        except BaseException:
            self.close()
            raise
        self.size = max(1, count)
        self.load = [0] * self.size

    def _start(self) -> None:
        # Imported here: a small pull runs inline and never starts a process.
        import subprocess

        mine, theirs = socket.socketpair()
        with theirs:
            proc = subprocess.Popen(
                command_line(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                # Out of the terminal's process group: Ctrl-C is the parent's to handle;
                # workers stop when told, or when the parent's socket closes.
                start_new_session=True,
            )
        self._procs.append(proc)
        # Imported once the worker is on its way: the import takes about as long as the
        # worker's own start-up has to go, and the pull waits for both.
        from multiprocessing.connection import Connection

        self._conns.append(Connection(mine.detach()))

    def has_room(self, total: int, per_worker: int) -> bool:
        """Whether fewer than ``total`` transfers run, and some worker has fewer than
        ``per_worker``."""
        return sum(self.load) < total and min(self.load) < per_worker

    def send(self, worker: int, command: Command) -> None:
        """Hand ``command`` to worker number ``worker``."""
        if self._inline is not None:
            self._inline.submit(command)
        else:
            self._conns[worker].send(command)

    def assign(self, fetch: Fetch) -> int:
        """Start ``fetch`` on the least loaded worker; returns that worker's number."""
        worker = min(range(self.size), key=self.load.__getitem__)
        self.load[worker] += 1
        self.send(worker, fetch)
        return worker

    def released(self, worker: int) -> None:
        """A transfer of ``worker`` ended."""
        self.load[worker] -= 1

    def receive(self, timeout: float) -> list[Report]:
        """What the workers reported within ``timeout`` seconds."""
        if self._inline is not None:
            if not self._inline.busy:
                time.sleep(timeout)  # waiting out a backoff: nothing to drive
            return self._inline.poll(timeout)
        from multiprocessing.connection import Connection, wait

        reports: list[Report] = []
        for conn in wait(self._conns, timeout):
            assert isinstance(conn, Connection)
            try:
                reports.extend(conn.recv())
            except (EOFError, OSError):
                raise FastpullError("a download worker process exited unexpectedly") from None
        return reports

    def close(self) -> None:
        """Stop every worker (killing those that do not exit within a second)."""
        if self._inline is not None:
            self._inline.close()
            return
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(Shutdown())
        import subprocess

        deadline = time.monotonic() + 1.0
        for proc in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns:
            conn.close()
