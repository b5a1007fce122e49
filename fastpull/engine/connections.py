"""How many transfers a run keeps open: measured, not guessed (pure but for reading the
machine's idle CPU, :func:`machine_idle_seconds`; the loop feeds it).

Registries behind CDNs, S3 or a long lossy path give each TCP connection a modest share,
so the link wants as many connections as it takes to fill it; on loopback or a fast LAN
the CPU is the limit long before that, and every transfer beyond the few that fill it
costs: each blob has that many chunks in flight beyond what is hashed, and the hashing of
those is left for after the last byte (measured on the 2 GB image, loopback, 2 cores: 16
transfers ended with 0.9-1.4 s of hashing alone, 4 transfers with 0.1-0.35 s).

So the controller starts low (``start``, 4 by default) and grows with what the machine
and the link show. Each time a window of :data:`WINDOW` seconds ran with every allowed
transfer busy (the first such window is a warm-up, :data:`WARM_UP` long, whose rate only
starts the count), the limit grows if the last growth raised the total rate by at least
:data:`GAIN`: fourfold while at least :data:`SPARE_SHARE` of the machine's CPU sat idle
through the window (the link, not the CPU, is the limit then, and a link that caps each
connection at 8 MB/s needs 64 of them soon), twofold while some of it did, and not at all
while less than :data:`BUSY_SHARE` did: the CPU is the limit, and a window's rate on a
busy machine swings by more than a growth could add. The first growth comes at the end of
the warm-up when the CPU had room to spare. A growth that did not pay is taken back and
growth pauses, for :data:`PROBE_AFTER` seconds at first and twice as long after each probe
that gains nothing again (up to :data:`PROBE_MAX`): links change, and one unlucky window
must not cost a whole run its connections. A server that pushes back (429, 503) halves the
limit and holds it there for :data:`HOLD` seconds. The limit stays within ``floor`` and
``ceiling``; a pinned controller (``--connections N``) never moves.

Each registry host gets its own controller (:class:`HostConnections`): a batch that pulls
from a CDN-backed registry and from a LAN mirror at once needs many transfers to the first
and few to the second, and a push-back from one host says nothing about the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

# A window long enough for new connections to get going, short enough to reach 64 from 4
# within about half a second when the CPU has room. Its rate is only as exact as the
# workers' reports are frequent (engine/worker.py's PROGRESS_INTERVAL, 0.025 s): at 0.1 s a
# 0.25 s window is off by up to 40%, enough to mistake noise for a gain.
WINDOW = 0.25
# The warm-up window: its rate is judged by nothing, it only tells whether the CPU has room
# for the first growth, and every moment of it at the start count is slow on a capped link.
WARM_UP = 0.1
# What a growth must add to the total rate to be kept.
GAIN = 1.2
# After a push-back, how long the limit is held before growing may start again.
HOLD = 10.0
# After a growth that did not pay, how long before trying again (doubling each time it
# does not pay again, up to PROBE_MAX).
PROBE_AFTER = 2.0
PROBE_MAX = 32.0
# Share of a window's samples that must have every allowed transfer busy to judge it.
_SATURATED = 0.8
# How much each finished transfer's weight in the rate per transfer fades per newer one.
_DECAY = 0.8
# Share of the machine's CPU idle through a window that makes the next growth fourfold
# (SPARE_GROWTH) instead of twofold, and the first one come at the end of the warm-up.
SPARE_SHARE = 0.5
SPARE_GROWTH = 4
# Share of the machine's CPU idle through a window under which the CPU is the limit.
BUSY_SHARE = 0.2


def machine_idle_seconds() -> float | None:
    """Seconds this machine has spent idle (or waiting on I/O) since boot, as a whole: the
    cores' idle time over their number, so a second of wall time adds at most 1. None where
    ``/proc/stat`` cannot be read."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()
        idle = (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return idle / (os.cpu_count() or 1)


def _growth(idle_share: float | None) -> int:
    """By how much the limit may grow after a window with ``idle_share`` of the machine's
    CPU idle (None: not known): 1 is not at all."""
    if idle_share is None:
        return 2
    if idle_share >= SPARE_SHARE:
        return SPARE_GROWTH
    return 2 if idle_share >= BUSY_SHARE else 1


@dataclass
class ConnectionController:
    """The number of transfers a run may have at once (:attr:`limit`)."""

    start: int
    ceiling: int
    pinned: bool = False
    floor: int = 2
    # The machine's idle seconds so far, as a whole (see machine_idle_seconds; None: not known).
    idle_clock: Callable[[], float | None] | None = None
    limit: int = field(init=False)
    _window_start: float | None = field(default=None, init=False)
    _window_idle: float | None = field(default=None, init=False)
    _window_bytes: int = field(default=0, init=False)
    _samples: int = field(default=0, init=False)
    _busy_samples: int = field(default=0, init=False)
    # The rate before the last growth, while its effect is being judged, and its factor.
    _before: float | None = field(default=None, init=False)
    _grown_from: int = field(default=0, init=False)
    # Growth pauses until then after a doubling that did not pay (see PROBE_AFTER).
    _probe_at: float = field(default=0.0, init=False)
    _probe_pause: float = field(default=PROBE_AFTER, init=False)
    _hold_until: float = field(default=0.0, init=False)
    # The first busy window is the connections' warm-up: its rate says nothing yet.
    _warm: bool = field(default=False, init=False)
    # Bytes and seconds of the transfers finished so far, older ones weighing less.
    _carried: float = field(default=0.0, init=False)
    _took: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.ceiling = max(1, self.ceiling)
        self.floor = min(self.floor, self.ceiling)
        self.limit = max(self.floor, min(self.start, self.ceiling))

    def observe(self, now: float, received: int, active: int) -> None:
        """``received`` bytes arrived since the last call, with ``active`` transfers open."""
        if self.pinned:
            return
        if self._window_start is None or (not self._warm and active < self.limit):
            # Until warm, a window starts only once every allowed transfer is busy: the
            # moments before (blobs' first requests, running alone) are no part of it.
            self._window_start, self._window_bytes = now, 0
            self._samples = self._busy_samples = 0
            self._window_idle = self._idle()
            if active < self.limit:
                return
        self._window_bytes += received
        self._samples += 1
        self._busy_samples += active >= self.limit
        elapsed = now - self._window_start
        if elapsed < (WINDOW if self._warm else WARM_UP):
            return
        saturated = self._busy_samples >= _SATURATED * self._samples
        rate = self._window_bytes / elapsed
        idle_before, idle_now = self._window_idle, self._idle()
        self._window_start, self._window_bytes, self._window_idle = now, 0, idle_now
        self._samples = self._busy_samples = 0
        if saturated and now >= self._hold_until:
            idle = None if idle_before is None or idle_now is None else idle_now - idle_before
            growth = _growth(None if idle is None else idle / elapsed)
            if self._warm:
                self._judge(now, rate, growth)
            elif growth == SPARE_GROWTH:
                self._grow(rate, growth)
            self._warm = True

    def _idle(self) -> float | None:
        return self.idle_clock() if self.idle_clock is not None else None

    def _grow(self, rate: float, factor: int) -> None:
        if self.limit < self.ceiling:
            self._before, self._grown_from = rate, self.limit
            self.limit = min(self.ceiling, self.limit * factor)

    def _judge(self, now: float, rate: float, growth: int) -> None:
        if self._before is not None:
            gained = rate >= self._before * GAIN
            self._before = None
            if not gained:
                self.limit = max(self.floor, self._grown_from)
                self._probe_at = now + self._probe_pause
                self._probe_pause = min(PROBE_MAX, self._probe_pause * 2)
                return
            self._probe_pause = PROBE_AFTER
        if now >= self._probe_at and growth > 1:
            self._grow(rate, growth)

    def transferred(self, size: int, seconds: float) -> None:
        """A transfer carried ``size`` bytes in ``seconds``, from its request to its end."""
        self._carried = self._carried * _DECAY + size
        self._took = self._took * _DECAY + max(seconds, 1e-3)

    @property
    def per_transfer(self) -> float | None:
        """Bytes a second one transfer gets, request to end, over the recent transfers
        (None before the first has finished).

        Measured per finished transfer rather than per window: a window's rate swings with
        how the reports of a busy machine happen to fall, a whole transfer's does not. A
        byte-weighted mean, so a tiny blob's latency does not pass for a slow link.
        """
        return self._carried / self._took if self._took else None

    def pushed_back(self, now: float) -> None:
        """The server asked us to slow down (429, 503): halve the limit and hold it."""
        if self.pinned:
            return
        self.limit = max(self.floor, self.limit // 2)
        self._before = None
        self._probe_at = 0.0
        self._probe_pause = PROBE_AFTER
        self._hold_until = now + HOLD
        self._warm = False
        self._window_start, self._window_bytes = None, 0
        self._samples = self._busy_samples = 0


@dataclass
class HostConnections:
    """One :class:`ConnectionController` per registry host, made when first needed.

    ``ceiling_for(host)`` is that host's ceiling (configurable per registry). A pinned run
    (``--connections N``) pins the whole run, not each host, to ``start`` transfers.
    """

    start: int
    ceiling_for: Callable[[str], int]
    pinned: bool = False
    idle_clock: Callable[[], float | None] | None = None
    _controllers: dict[str, ConnectionController] = field(default_factory=dict, init=False)

    def __getitem__(self, host: str) -> ConnectionController:
        controller = self._controllers.get(host)
        if controller is None:
            ceiling = self.start if self.pinned else self.ceiling_for(host)
            controller = ConnectionController(
                self.start, ceiling, pinned=self.pinned, idle_clock=self.idle_clock
            )
            self._controllers[host] = controller
        return controller

    def total(self, hosts: Iterable[str]) -> int:
        """The most transfers at once across ``hosts`` (those with work left)."""
        if self.pinned:
            return self.start
        return sum(self[host].limit for host in set(hosts))

    def observe(self, now: float, received: Mapping[str, int], active: Mapping[str, int]) -> None:
        """Feed every host's controller what arrived from it, with its open transfers."""
        for host, controller in self._controllers.items():
            controller.observe(now, received.get(host, 0), active.get(host, 0))


__all__ = [
    "BUSY_SHARE",
    "GAIN",
    "HOLD",
    "PROBE_AFTER",
    "PROBE_MAX",
    "SPARE_GROWTH",
    "SPARE_SHARE",
    "WARM_UP",
    "WINDOW",
    "ConnectionController",
    "HostConnections",
    "machine_idle_seconds",
]
