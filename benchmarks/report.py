"""Turn the harness's runs into medians, a table, target checks, a JSON file and a PNG chart.

Units: MB is 10^6 bytes and GB 10^9 bytes (as network speeds are quoted); CPU is user +
system seconds of the tool's whole process tree per GB of payload; RSS is in MB of 10^6 bytes.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The engine issue's goals, reported but never asserted: (scenario, image, reference tool,
# wanted ratio of fastpull's MB/s to the reference's, "median" or "best" run).
SPEED_TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    ("slow", "big", "aria2c", 3.0, "median"),
    ("capped", "big", "skopeo", 6.0, "median"),
    ("capped", "big", "aria2c", 1.0, "median"),
    ("direct", "big", "skopeo", 2.0, "median"),
    ("direct", "small", "skopeo", 1.0, "best"),
    ("tls", "big", "skopeo", 1.6, "median"),
)
# fastpull's client CPU per GB over the floor row's (curl -o FILE + openssl dgst -sha256), direct.
FLOOR_CPU_TARGET = 1.25
RSS_TARGET_MB = 200.0


@dataclass(frozen=True)
class RunResult:
    """One run of one tool; the measurements are meaningless unless ``ok``."""

    scenario: str
    image: str
    tool: str
    round: int
    position: int
    argv: list[str]
    ok: bool
    error: str | None
    returncode: int | None
    payload_bytes: int
    wall_seconds: float
    cpu_user_seconds: float
    cpu_system_seconds: float
    peak_tree_rss_bytes: int
    hwm_sum_bytes: int
    server_cpu_seconds: float
    stats: dict[str, Any] | None

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / self.wall_seconds / 1e6

    @property
    def cpu_seconds_per_gb(self) -> float:
        return (self.cpu_user_seconds + self.cpu_system_seconds) / (self.payload_bytes / 1e9)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "mb_per_s": self.mb_per_s,
            "cpu_seconds_per_gb": self.cpu_seconds_per_gb,
        }


@dataclass(frozen=True)
class Summary:
    """Medians over the successful runs of one (scenario, image, tool)."""

    scenario: str
    image: str
    tool: str
    runs: int
    ok_runs: int
    payload_bytes: int
    mb_per_s: float | None
    mb_per_s_min: float | None
    mb_per_s_max: float | None
    wall_seconds: float | None
    cpu_seconds_per_gb: float | None
    server_cpu_seconds_per_gb: float | None
    peak_tree_rss_mb: float | None
    hwm_sum_mb: float | None


def summarize(results: Sequence[RunResult]) -> list[Summary]:
    """One :class:`Summary` per (scenario, image, tool), in the order they first ran."""
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.scenario, result.image, result.tool), []).append(result)
    summaries = []
    for (scenario, image, tool), runs in groups.items():
        ok = [r for r in runs if r.ok]
        payload = runs[0].payload_bytes
        speeds = [r.mb_per_s for r in ok]
        summaries.append(
            Summary(
                scenario=scenario,
                image=image,
                tool=tool,
                runs=len(runs),
                ok_runs=len(ok),
                payload_bytes=payload,
                mb_per_s=_median(speeds),
                mb_per_s_min=min(speeds, default=None),
                mb_per_s_max=max(speeds, default=None),
                wall_seconds=_median(r.wall_seconds for r in ok),
                cpu_seconds_per_gb=_median(r.cpu_seconds_per_gb for r in ok),
                server_cpu_seconds_per_gb=_median(
                    r.server_cpu_seconds / (payload / 1e9) for r in ok
                ),
                # A peak is a peak: the highest run, not the median one.
                peak_tree_rss_mb=max((r.peak_tree_rss_bytes / 1e6 for r in ok), default=None),
                hwm_sum_mb=max((r.hwm_sum_bytes / 1e6 for r in ok), default=None),
            )
        )
    return summaries


def _median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class TargetCheck:
    """One of the issue's goals against this run's medians; ``met`` is None without data."""

    scenario: str
    image: str
    description: str
    value: float | None
    wanted: str
    met: bool | None


def check_targets(summaries: Sequence[Summary]) -> list[TargetCheck]:
    """Compare fastpull with the references where both were measured."""
    by_key = {(s.scenario, s.image, s.tool): s for s in summaries}
    checks = []
    for scenario, image, reference, wanted, which in SPEED_TARGETS:
        ours = by_key.get((scenario, image, "fastpull"))
        ref = by_key.get((scenario, image, reference))
        if ours is None or ref is None:
            continue
        if which == "best":
            ratio = _ratio(ours.mb_per_s_max, ref.mb_per_s_max)
        else:
            ratio = _ratio(ours.mb_per_s, ref.mb_per_s)
        checks.append(
            TargetCheck(
                scenario,
                image,
                f"fastpull MB/s / {reference} MB/s ({which})",
                ratio,
                f">= {wanted:g}x",
                None if ratio is None else ratio >= wanted,
            )
        )
    for (scenario, image, tool), ours in by_key.items():
        if tool != "fastpull":
            continue
        floor = by_key.get((scenario, image, "floor"))
        if floor is not None and scenario == "direct":
            ratio = _ratio(ours.cpu_seconds_per_gb, floor.cpu_seconds_per_gb)
            checks.append(
                TargetCheck(
                    scenario,
                    image,
                    "fastpull CPU s/GB / floor CPU s/GB",
                    ratio,
                    f"<= {FLOOR_CPU_TARGET:g}x",
                    None if ratio is None else ratio <= FLOOR_CPU_TARGET,
                )
            )
        skopeo = by_key.get((scenario, image, "skopeo"))
        if skopeo is not None:
            mine, theirs = ours.cpu_seconds_per_gb, skopeo.cpu_seconds_per_gb
            checks.append(
                TargetCheck(
                    scenario,
                    image,
                    "fastpull CPU s/GB",
                    mine,
                    "<= skopeo's" + ("" if theirs is None else f" {theirs:.2f}"),
                    None if mine is None or theirs is None else mine <= theirs,
                )
            )
        for label, rss in (
            ("fastpull peak RSS MB (all processes)", ours.peak_tree_rss_mb),
            ("  upper bound: sum of VmHWM", ours.hwm_sum_mb),
        ):
            checks.append(
                TargetCheck(
                    scenario,
                    image,
                    label,
                    rss,
                    f"< {RSS_TARGET_MB:g}",
                    None if rss is None else rss < RSS_TARGET_MB,
                )
            )
    return checks


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(
    summaries: Sequence[Summary], checks: Sequence[TargetCheck], notes: Sequence[str]
) -> str:
    """The human-readable report: medians per tool, ratios, target checks, footnotes."""
    header = (
        f"{'scenario':<8} {'image':<5} {'tool':<8} {'ok':>5} {'payload':>9} {'MB/s':>8} "
        f"{'best':>8} {'range':>11} {'CPU s/GB':>9} {'x floor':>7} {'srv s/GB':>9} "
        f"{'RSS MB':>7} {'x skopeo':>8} {'x curl':>7} {'x aria2c':>8} {'x disk':>7}"
    )
    lines = [header, "-" * len(header)]
    speed = {(s.scenario, s.image, s.tool): s.mb_per_s for s in summaries}
    floor_cpu = {
        (s.scenario, s.image): s.cpu_seconds_per_gb for s in summaries if s.tool == "floor"
    }
    for s in summaries:
        spread = (
            f"{s.mb_per_s_min:.0f}-{s.mb_per_s_max:.0f}"
            if s.mb_per_s_min is not None and s.mb_per_s_max is not None
            else "-"
        )
        ratios = [
            ""
            if ref == s.tool
            else _fmt(_ratio(s.mb_per_s, speed.get((s.scenario, s.image, ref))), ".2f")
            for ref in ("skopeo", "curl", "aria2c", "disk")
        ]
        cpu_ratio = _ratio(s.cpu_seconds_per_gb, floor_cpu.get((s.scenario, s.image)))
        lines.append(
            f"{s.scenario:<8} {s.image:<5} {s.tool:<8} {f'{s.ok_runs}/{s.runs}':>5} "
            f"{s.payload_bytes / 1e6:>7.0f}MB {_fmt(s.mb_per_s, '.1f'):>8} "
            f"{_fmt(s.mb_per_s_max, '.1f'):>8} {spread:>11} "
            f"{_fmt(s.cpu_seconds_per_gb, '.2f'):>9} {_fmt(cpu_ratio, '.2f'):>7} "
            f"{_fmt(s.server_cpu_seconds_per_gb, '.2f'):>9} "
            f"{_fmt(s.peak_tree_rss_mb, '.0f'):>7} "
            f"{ratios[0]:>8} {ratios[1]:>7} {ratios[2]:>8} {ratios[3]:>7}"
        )
    if checks:
        lines += ["", "Targets (reported, not asserted):"]
        for c in checks:
            verdict = {True: "met", False: "MISSED", None: "no data"}[c.met]
            lines.append(
                f"  {c.scenario:<8} {c.image:<5} {c.description:<38} "
                f"{_fmt(c.value, '.2f'):>8}  wanted {c.wanted:<18} {verdict}"
            )
    lines.append("")
    lines += [textwrap.fill(note, width=100, subsequent_indent="  ") for note in notes]
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` (run records, summaries, machine info) as indented JSON."""
    path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")


def _jsonable(value: object) -> object:
    if isinstance(value, (Summary, TargetCheck)):
        return asdict(value)
    if isinstance(value, RunResult):
        return value.to_json()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def draw_chart(path: Path, summaries: Sequence[Summary], title: str) -> str | None:
    """Bar charts of MB/s, CPU s/GB and peak RSS per tool, one column per scenario × image.

    Returns why no chart was drawn (matplotlib missing), or None once ``path`` is written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -r benchmarks/requirements.txt)"
    groups = list(dict.fromkeys((s.scenario, s.image) for s in summaries))
    tools = list(dict.fromkeys(s.tool for s in summaries))
    by_key = {(s.scenario, s.image, s.tool): s for s in summaries}
    metrics = (
        ("mb_per_s", "MB/s (median)"),
        ("cpu_seconds_per_gb", "CPU s/GB (median)"),
        ("peak_tree_rss_mb", "peak RSS MB"),
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(
        len(metrics),
        len(groups),
        figsize=(3.6 * len(groups) + 1, 8.5),
        squeeze=False,
    )
    for col, (scenario, image) in enumerate(groups):
        for row, (field, label) in enumerate(metrics):
            ax = axes[row][col]
            values = [
                getattr(by_key[(scenario, image, t)], field) or 0.0
                if (scenario, image, t) in by_key
                else 0.0
                for t in tools
            ]
            bars = ax.bar(tools, values, color=[colors[i % len(colors)] for i in range(len(tools))])
            ax.bar_label(bars, fmt="%.0f" if field != "cpu_seconds_per_gb" else "%.2f", fontsize=8)
            ax.tick_params(axis="x", labelsize=8, rotation=30)
            ax.margins(y=0.15)
            if row == 0:
                ax.set_title(f"{scenario} / {image}", fontsize=10)
            if col == 0:
                ax.set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
