"""Run one command and measure its wall time, CPU time and memory as a whole process tree.

- Wall time ends when the direct child exits; a pidfd wakes us at that moment, so the figure
  is not rounded up to the sampling interval.
- CPU time is user + system from ``wait4``'s rusage of the direct child, which on Linux
  includes every descendant the child (or its descendants) waited for: fastpull's workers and
  skopeo's threads are all in it.
- Peak RSS is the largest *sum* of ``VmRSS`` over the child and all its descendants, sampled
  every ``sample_interval`` seconds from ``/proc``. Pages shared between processes (libraries,
  copy-on-write after fork) count once per process, so the sum errs high; a spike shorter than
  the interval can be missed. The sum of every process's highest ``VmHWM`` (its own exact
  high-water mark) is recorded next to it: an upper bound that misses no spike of a process
  seen at least once.
  (rusage's ``ru_maxrss`` is no help: a child inherits the harness's high-water mark through
  fork/vfork and keeps it across exec.)
- Server CPU is the CPU time the harness's other children (registry, nginx) used during the
  run, read from ``/proc/<pid>/stat`` before and after.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measurement:
    """What one run of one command cost; ``returncode`` is None when it was killed on timeout."""

    returncode: int | None
    wall_seconds: float
    cpu_user_seconds: float
    cpu_system_seconds: float
    peak_tree_rss_bytes: int
    hwm_sum_bytes: int
    server_cpu_seconds: float

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_user_seconds + self.cpu_system_seconds


@dataclass(frozen=True)
class _Proc:
    ppid: int
    cpu_ticks: int


def _process_table() -> dict[int, _Proc]:
    """Every visible process's parent and CPU ticks, from ``/proc/<pid>/stat`` (a scan of
    one small file per process takes about a millisecond)."""
    table: dict[int, _Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue  # exited between the listing and the read
        # The command name may contain spaces and parentheses; the fields start after the last ')'.
        fields = raw[raw.rindex(b")") + 2 :].split()
        table[int(entry.name)] = _Proc(
            ppid=int(fields[1]), cpu_ticks=int(fields[11]) + int(fields[12])
        )
    return table


def _memory(pid: int) -> tuple[int, int] | None:
    """``(VmRSS, VmHWM)`` in bytes, or None once the process is gone (or a zombie)."""
    values: dict[bytes, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                key, _, rest = line.partition(b":")
                if key in (b"VmRSS", b"VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        return None
    if len(values) < 2:
        return None
    return values[b"VmRSS"], values[b"VmHWM"]


def _descendants(table: Mapping[int, _Proc], root: int) -> list[int]:
    """``root`` and every process below it that is still in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        if pid in table:
            found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


def _server_ticks() -> int:
    """CPU ticks of this process's descendants: between runs, only the servers it started."""
    table = _process_table()
    return sum(
        table[pid].cpu_ticks for pid in _descendants(table, os.getpid()) if pid != os.getpid()
    )


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    timeout: float,
    sample_interval: float = 0.05,
) -> Measurement:
    """Run ``argv`` to completion (or kill it after ``timeout`` seconds) and measure it.

    The command gets its own session, so the timeout (or a Ctrl-C of the harness) can kill
    its whole process group, workers included. Its output goes to ``log_path``.
    """
    server_ticks_before = _server_ticks()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
    started = time.perf_counter()
    peak_rss = 0
    high_water: dict[int, int] = {}
    timed_out = False
    try:
        pidfd = os.pidfd_open(proc.pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while True:
                tree_rss = 0
                for pid in _descendants(_process_table(), proc.pid):
                    memory = _memory(pid)
                    if memory is not None:
                        tree_rss += memory[0]
                        # max(): a process that execs starts a new, lower high-water mark.
                        high_water[pid] = max(high_water.get(pid, 0), memory[1])
                peak_rss = max(peak_rss, tree_rss)
                if poller.poll(sample_interval * 1000):
                    break
                if time.perf_counter() - started > timeout:
                    timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    poller.poll()
                    break
        finally:
            os.close(pidfd)
        wall = time.perf_counter() - started
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        # Ctrl-C (or a harness bug) must not leave a multi-process download running.
        _kill_group(proc)
        raise
    # wait4 reaped the child behind Popen's back; tell Popen so it does not try again.
    proc.returncode = os.waitstatus_to_exitcode(status)
    if not timed_out:
        # Workers that outlived their parent would skew the next run; they should not exist.
        _kill_group(proc)
    return Measurement(
        returncode=None if timed_out else proc.returncode,
        wall_seconds=wall,
        cpu_user_seconds=usage.ru_utime,
        cpu_system_seconds=usage.ru_stime,
        peak_tree_rss_bytes=peak_rss,
        hwm_sum_bytes=sum(high_water.values()),
        server_cpu_seconds=(_server_ticks() - server_ticks_before) / _CLOCK_TICKS,
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if proc.returncode is None:
        proc.wait()
