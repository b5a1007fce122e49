"""The worker processes of a run, and one worker loop run inline (the only one without
processes, the first one while they start).

Workers are fresh interpreters (``worker.command_line``) talking over a socket pair:
libcurl, OpenSSL and threads do not survive ``fork``, and multiprocessing's ``spawn`` would
re-run the caller's main script, which a library must not require to be guarded by
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING

from fastpull.engine.worker import Command, Fetch, Report, Shutdown, WorkerLoop, command_line
from fastpull.errors import FastpullError

if TYPE_CHECKING:
    import subprocess
    from multiprocessing.connection import Connection

# How long the inline transfers are driven at a time while workers are watched too.
_INLINE_TURN = 0.005


class WorkerPool:
    """``count`` worker processes and their load, or with ``count == 0`` one loop inline.

    A worker process takes about a tenth of a second to start (a fresh interpreter and its
    imports), while the blobs are claimed and the first requests could already run. Until
    one of them says it is ready, transfers run on a loop inline, in this process; from then
    on new transfers go to the ready workers, and those inline finish where they are. Each
    transfer is on one slot (:meth:`assign` says which) for its whole life: commands about
    it go to that slot, and :meth:`released` frees it there.
    """

    def __init__(self, count: int) -> None:
        self._inline = WorkerLoop()
        self._conns: list[Connection] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._ready: list[bool] = []
        try:
            for _ in range(count):
                self._start()
        except BaseException:
            self.close()
            raise
        # The inline loop's slot: the only one without workers, the one after theirs with.
        self.inline = count
        self.load = [0] * (count + 1)

    def _start(self) -> None:
        # Imported here: a small pull runs inline and never starts a process.
        import socket
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
        self._ready.append(False)

    @property
    def starting(self) -> bool:
        """Whether this pool has workers and none of them is ready yet."""
        return bool(self._procs) and not any(self._ready)

    def _slots(self) -> list[int]:
        """The slots new transfers may go to."""
        ready = [w for w, up in enumerate(self._ready) if up]
        return ready or [self.inline]

    def has_room(self, total: int) -> bool:
        """Whether fewer than ``total`` transfers run, and a slot new transfers may go to has
        fewer than its share of them."""
        slots = self._slots()
        share = math.ceil(total / len(slots))
        return sum(self.load) < total and min(self.load[w] for w in slots) < share

    def send(self, worker: int, command: Command) -> None:
        """Hand ``command`` to the transfers of slot ``worker``."""
        if worker == self.inline:
            self._inline.submit(command)
        else:
            self._conns[worker].send(command)

    def assign(self, fetch: Fetch) -> int:
        """Start ``fetch`` on the least loaded slot it may go to; returns that slot."""
        worker = min(self._slots(), key=self.load.__getitem__)
        self.load[worker] += 1
        self.send(worker, fetch)
        return worker

    def released(self, worker: int) -> None:
        """A transfer of slot ``worker`` ended."""
        self.load[worker] -= 1

    def receive(self, timeout: float) -> list[Report]:
        """What the transfers reported within ``timeout`` seconds."""
        if not self._conns:
            if self._inline.quiet:
                time.sleep(timeout)  # waiting out a backoff: nothing to drive
            return self._inline.poll(timeout)
        if self._inline.quiet:
            return self._from_workers(timeout)
        # Both to watch: the inline transfers in short turns, the workers in between.
        deadline = time.monotonic() + timeout
        while True:
            turn = min(_INLINE_TURN, max(0.0, deadline - time.monotonic()))
            reports = self._inline.poll(turn) + self._from_workers(0.0)
            if reports or not self._inline.busy or time.monotonic() >= deadline:
                return reports

    def _from_workers(self, timeout: float) -> list[Report]:
        from multiprocessing.connection import Connection, wait

        reports: list[Report] = []
        for conn in wait(self._conns, timeout):
            assert isinstance(conn, Connection)
            try:
                reports.extend(conn.recv())
            except (EOFError, OSError):
                raise FastpullError("a download worker process exited unexpectedly") from None
            self._ready[self._conns.index(conn)] = True
        return reports

    def close(self) -> None:
        """Stop every transfer, and every worker (killing those that do not exit within a
        second)."""
        self._inline.close()
        if not self._procs:
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
