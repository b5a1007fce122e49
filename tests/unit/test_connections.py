"""Tests for fastpull.engine.connections: the controller against a simulated link."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from fastpull.engine.connections import (
    BUSY_SHARE,
    HOLD,
    PROBE_AFTER,
    PROBE_MAX,
    SPARE_GROWTH,
    SPARE_SHARE,
    WARM_UP,
    WINDOW,
    ConnectionController,
    HostConnections,
    machine_idle_seconds,
)
from fastpull.engine.worker import PROGRESS_INTERVAL

TICK = 0.05
MB = 1_000_000


@dataclass
class Link:
    """Each connection gets at most ``per_connection`` bytes/s, all together ``total``."""

    per_connection: float
    total: float

    def rate(self, connections: int) -> float:
        return min(connections * self.per_connection, self.total)


@dataclass
class Machine:
    """A machine of which ``spare`` (a share of all its cores) sits idle, on the simulated
    clock."""

    spare: float
    now: float = 0.0

    def idle_seconds(self) -> float:
        return self.spare * self.now


def _run(
    controller: ConnectionController,
    link: Link,
    seconds: float,
    start: float = 0.0,
    machine: Machine | None = None,
) -> float:
    now = start
    while now < start + seconds:
        now += TICK
        if machine is not None:
            machine.now = now
        active = controller.limit
        controller.observe(now, int(link.rate(active) * TICK), active)
    return now


def test_a_per_connection_cap_gets_connections_up_to_the_ceiling() -> None:
    # 8 MB/s per connection, a 1 GB/s path: 64 connections are worth it.
    controller = ConnectionController(start=16, ceiling=64)

    _run(controller, Link(8 * MB, 1000 * MB), 3.0)

    assert controller.limit == 64


def test_it_stops_where_the_link_stops_adding() -> None:
    # 8 MB/s per connection but 300 MB/s in all: 32 fill it, 64 add nothing.
    controller = ConnectionController(start=16, ceiling=64)

    _run(controller, Link(8 * MB, 300 * MB), 5.0)

    assert controller.limit == 32


def test_without_a_per_connection_cap_it_keeps_the_start() -> None:
    # Loopback: the CPU caps the total at 600 MB/s whatever the connections.
    controller = ConnectionController(start=16, ceiling=64)

    _run(controller, Link(1000 * MB, 600 * MB), 5.0)

    assert controller.limit == 16


def test_a_doubling_that_did_not_pay_is_tried_again_later_and_less_often() -> None:
    controller = ConnectionController(start=16, ceiling=64)
    cpu_bound = Link(1000 * MB, 600 * MB)
    limits: list[tuple[float, int]] = []
    now = 0.0
    while now < 3 * PROBE_AFTER + 2 * PROBE_MAX:
        now = _run(controller, cpu_bound, TICK, start=now)
        limits.append((now, controller.limit))

    probes = [t for (_, before), (t, limit) in itertools.pairwise(limits) if limit > before]
    # The first doubling after the warm-up, then probes further and further apart.
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert len(probes) >= 4
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps))
    assert max(gaps) <= PROBE_MAX + 2 * WINDOW + TICK
    # Each probe lasts one window: the run stays at its start almost all the time.
    assert sum(limit == 16 for _, limit in limits) >= 0.9 * len(limits)


def test_a_link_that_opens_up_later_gets_its_connections() -> None:
    controller = ConnectionController(start=16, ceiling=64)
    # Shared with other traffic at first (more connections add nothing), then free.
    now = _run(controller, Link(8 * MB, 130 * MB), PROBE_AFTER + WINDOW)
    assert controller.limit == 16

    _run(controller, Link(8 * MB, 1000 * MB), PROBE_MAX + 2.0, start=now)
    assert controller.limit == 64


def _lumpy_run(link: Link, seed: int, seconds: float, workers: int = 2) -> list[int]:
    """The controller fed as the engine feeds it: each worker's bytes arrive in one report
    per PROGRESS_INTERVAL (at its own phase, a little late or early), the rate itself
    wobbling by ±15%; returns the limit at every step."""
    rng = random.Random(seed)
    controller = ConnectionController(start=16, ceiling=64)
    step = PROGRESS_INTERVAL / 5
    next_report = [rng.random() * PROGRESS_INTERVAL for _ in range(workers)]
    pending = [0.0] * workers
    limits, now = [], 0.0
    while now < seconds:
        now += step
        rate = link.rate(controller.limit) * rng.uniform(0.85, 1.15)
        arrived = 0
        for w in range(workers):
            pending[w] += rate / workers * step
            if now >= next_report[w]:
                arrived += int(pending[w])
                pending[w] = 0.0
                next_report[w] += PROGRESS_INTERVAL * rng.uniform(0.9, 1.1)
        controller.observe(now, arrived, controller.limit)
        limits.append(controller.limit)
    return limits


def test_lumpy_reports_are_not_mistaken_for_gains() -> None:
    # Loopback: more connections add nothing. Over many runs, a window's rate is exact
    # enough that no run doubles on noise before the first probe is due.
    early = int((WINDOW * 2 + PROBE_AFTER) / (PROGRESS_INTERVAL / 5))
    for seed in range(40):
        limits = _lumpy_run(Link(1000 * MB, 600 * MB), seed, 3 * WINDOW + PROBE_AFTER)
        assert max(limits[int(3 * WINDOW / (PROGRESS_INTERVAL / 5)) : early]) == 16, seed


def test_lumpy_reports_still_reach_the_ceiling_within_four_windows() -> None:
    for seed in range(40):
        limits = _lumpy_run(Link(8 * MB, 1000 * MB), seed, 4 * WINDOW + 0.05)
        assert limits[-1] == 64, seed


def test_the_first_busy_window_is_warm_up_and_judges_nothing() -> None:
    controller = ConnectionController(start=16, ceiling=64)

    _run(controller, Link(8 * MB, 1000 * MB), WINDOW + TICK)

    assert controller.limit == 16


def test_warm_up_starts_when_every_transfer_is_busy_not_before() -> None:
    controller = ConnectionController(start=16, ceiling=64)
    link = Link(8 * MB, 1000 * MB)
    now = 0.0
    while now < 0.15 - TICK / 2:  # the blobs' first requests, answering alone
        now += TICK
        controller.observe(now, int(link.rate(7) * TICK), active=7)
    busy_from = now
    while controller.limit == 16:
        now += TICK
        controller.observe(now, int(link.rate(16) * TICK), active=16)
    # A warm-up window and a judged one, counted from when all 16 were busy.
    assert now - busy_from <= 2 * WINDOW + 2 * TICK
    assert controller.limit == 32


def test_with_cpu_to_spare_growth_is_fourfold_and_starts_at_the_end_of_the_warm_up() -> None:
    link = Link(8 * MB, 1000 * MB)
    idle = Machine(spare=SPARE_SHARE + 0.2)
    eager = ConnectionController(start=4, ceiling=64, idle_clock=idle.idle_seconds)
    busy = Machine(spare=SPARE_SHARE - 0.2)
    judged = ConnectionController(start=4, ceiling=64, idle_clock=busy.idle_seconds)

    _run(eager, link, WARM_UP + TICK, machine=idle)
    _run(judged, link, WARM_UP + TICK, machine=busy)

    assert (eager.limit, judged.limit) == (4 * SPARE_GROWTH, 4)
    # From 4 to the ceiling in one more window with the CPU to spare; twofold steps without.
    _run(eager, link, WINDOW, start=WARM_UP + TICK, machine=idle)
    assert eager.limit == 64
    limits = []
    now = WARM_UP + TICK
    while now < 6 * WINDOW:
        now = _run(judged, link, TICK, start=now, machine=busy)
        limits.append(judged.limit)
    assert sorted(set(limits)) == [4, 8, 16, 32, 64]


def test_where_the_cpu_is_the_limit_no_growth_is_even_tried() -> None:
    # Loopback: more connections add nothing, and the machine is busy.
    busy = Machine(spare=BUSY_SHARE / 2)
    controller = ConnectionController(start=4, ceiling=64, idle_clock=busy.idle_seconds)
    limits = []
    now = 0.0
    while now < 3 * PROBE_AFTER:
        now = _run(controller, Link(1000 * MB, 600 * MB), TICK, start=now, machine=busy)
        limits.append(controller.limit)

    assert set(limits) == {4}


def test_a_fourfold_growth_that_did_not_pay_is_taken_back_whole() -> None:
    # The CPU has room, but the server gives 36 MB/s in all: 16 connections add too little.
    idle = Machine(spare=0.9)
    controller = ConnectionController(start=4, ceiling=64, idle_clock=idle.idle_seconds)

    now = _run(controller, Link(8 * MB, 36 * MB), WINDOW + TICK, machine=idle)
    assert controller.limit == 16
    _run(controller, Link(8 * MB, 36 * MB), WINDOW, start=now, machine=idle)
    assert controller.limit == 4


def test_an_early_growth_that_does_not_pay_is_taken_back() -> None:
    # A fast link on a machine with idle cores: the early growth is tried, judged, undone.
    idle = Machine(spare=0.9)
    controller = ConnectionController(start=16, ceiling=64, idle_clock=idle.idle_seconds)

    _run(controller, Link(1000 * MB, 600 * MB), WINDOW + TICK, machine=idle)
    assert controller.limit == 64
    _run(controller, Link(1000 * MB, 600 * MB), PROBE_AFTER - WINDOW, WINDOW + TICK, idle)
    assert controller.limit == 16


def test_an_unreadable_idle_clock_means_the_judged_ramp() -> None:
    controller = ConnectionController(start=16, ceiling=64, idle_clock=lambda: None)

    _run(controller, Link(8 * MB, 1000 * MB), WINDOW + TICK)

    assert controller.limit == 16


def test_the_machine_idle_clock_reads_this_machine() -> None:
    started = time.monotonic()
    first = machine_idle_seconds()
    time.sleep(0.05)
    second = machine_idle_seconds()
    took = time.monotonic() - started
    # Linux, where the engine runs and CI too: /proc/stat is always there. The machine as a
    # whole cannot idle longer than the time that passed (one clock tick of slack).
    assert first is not None and second is not None
    assert 0 < first <= second <= first + took + 0.011


def test_windows_without_every_transfer_busy_decide_nothing() -> None:
    controller = ConnectionController(start=16, ceiling=64)
    now = 0.0
    for _ in range(200):
        now += TICK
        controller.observe(now, 1 * MB, active=4)  # not enough work to fill 16

    assert controller.limit == 16


def test_a_push_back_halves_and_holds_then_growth_resumes() -> None:
    controller = ConnectionController(start=16, ceiling=64)
    now = _run(controller, Link(8 * MB, 1000 * MB), 3.0)
    assert controller.limit == 64

    controller.pushed_back(now)
    assert controller.limit == 32
    now = _run(controller, Link(8 * MB, 1000 * MB), HOLD - 1.0, start=now)
    assert controller.limit == 32

    _run(controller, Link(8 * MB, 1000 * MB), 3.0, start=now)
    assert controller.limit == 64


def test_pinned_never_moves() -> None:
    controller = ConnectionController(start=16, ceiling=64, pinned=True)

    now = _run(controller, Link(8 * MB, 1000 * MB), 5.0)
    controller.pushed_back(now)

    assert controller.limit == 16


@given(
    st.integers(min_value=1, max_value=256),
    st.integers(min_value=1, max_value=256),
    st.floats(min_value=1e5, max_value=1e9),
    st.floats(min_value=1e6, max_value=1e10),
    st.lists(st.floats(min_value=0.5, max_value=30.0), max_size=3),
)
def test_the_limit_stays_within_floor_and_ceiling(
    start: int, ceiling: int, per_connection: float, total: float, pushbacks: list[float]
) -> None:
    controller = ConnectionController(start=start, ceiling=ceiling)
    link = Link(per_connection, total)
    now = 0.0
    for pause in [*pushbacks, 3.0]:
        now = _run(controller, link, pause, start=now)
        assert controller.floor <= controller.limit <= max(1, ceiling)
        controller.pushed_back(now)
        assert controller.floor <= controller.limit <= max(1, ceiling)


def test_each_host_is_judged_on_its_own_link() -> None:
    ceilings = {"cdn.example": 64, "mirror.lan": 64, "small.example": 8}
    hosts = HostConnections(16, ceilings.__getitem__)
    links = {
        "cdn.example": Link(8 * MB, 1000 * MB),  # per-connection cap: wants many
        "mirror.lan": Link(1000 * MB, 600 * MB),  # fast: more add nothing
        "small.example": Link(8 * MB, 1000 * MB),  # wants many, configured for 8
    }
    now = 0.0
    while now < 5.0:
        now += TICK
        active = {h: hosts[h].limit for h in links}
        received = {h: int(link.rate(active[h]) * TICK) for h, link in links.items()}
        hosts.observe(now, received, active)

    assert {h: hosts[h].limit for h in links} == {
        "cdn.example": 64,
        "mirror.lan": 16,
        "small.example": 8,
    }
    assert hosts.total(["cdn.example", "mirror.lan", "mirror.lan"]) == 80
    hosts["cdn.example"].pushed_back(now)
    assert (hosts["cdn.example"].limit, hosts["mirror.lan"].limit) == (32, 16)


def test_a_pinned_run_pins_the_total_not_each_host() -> None:
    hosts = HostConnections(6, lambda _host: 64, pinned=True)

    assert hosts.total(["a.example", "b.example"]) == 6
    assert hosts["a.example"].limit == 6


def test_rate_per_transfer_is_unknown_until_one_finishes() -> None:
    controller = ConnectionController(start=16, ceiling=64)
    assert controller.per_transfer is None
    controller.transferred(8 * MB, 1.0)
    assert controller.per_transfer == 8 * MB


def test_rate_per_transfer_weighs_bytes_so_tiny_blobs_do_not_pass_for_a_slow_link() -> None:
    controller = ConnectionController(start=16, ceiling=64)
    for _ in range(5):
        controller.transferred(40 * MB, 1.0)
        controller.transferred(1_000, 0.005)  # a config blob: all latency
    rate = controller.per_transfer
    assert rate is not None and 38 * MB < rate <= 40 * MB


def test_rate_per_transfer_follows_a_link_that_changes() -> None:
    controller = ConnectionController(start=16, ceiling=64)
    for _ in range(20):
        controller.transferred(50 * MB, 1.0)
    for _ in range(20):
        controller.transferred(8 * MB, 1.0)
    rate = controller.per_transfer
    assert rate is not None and 8 * MB <= rate < 9 * MB
