"""Where a small pull's time goes: interpreter start, imports, and the pull's own work.

Run from the repository root::

    python -m benchmarks.bench_startup [--runs 15] [--modules 15] [--scratch DIR]

It starts Debian's ``docker-registry`` on 127.0.0.1, pushes the pull benchmark's ``small``
image (layers of 20, 8, 4, 1 and 0.25 MiB) and times, one run at a time with the order rotated
each round, the registry's files read back into the page cache and the disk synced before
each run:

- ``skopeo``, ``pyfloor`` and ``fastpull`` pulling the whole image into a fresh directory,
  exactly as ``bench_pull --images small --scenario direct`` runs them (wall time of the
  process);
- ``python -c pass``: the interpreter's own start-up and exit;
- each side's imports alone (``benchmarks.pyfloor``, and what ``fastpull pull`` imports
  before its first request), timed inside the child around the import statement;
- each side's work alone: the same pull run in a process that has already imported its
  modules, timed inside it from the call to its return.

The table gives each row's best and median in milliseconds (this VM's noise only ever slows
a run), then the breakdown ``whole = start-up + imports + work + exit`` of pyfloor and fastpull
side by side. pyfloor is the least a CPython puller does (see ``benchmarks/pyfloor.py``), so
fastpull's column minus pyfloor's is what fastpull's own code costs, split into importing it
and running it. ``--modules K`` adds the K fastpull-pull imports with the largest own import
time (``python -X importtime``, best of 5). Results go to
``benchmarks/results/startup-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.bench_pull import warm
from benchmarks.report import write_json
from benchmarks.synthetic import build_image, image_specs, largest_layer
from benchmarks.tools import Target, invocation, missing_tools, tool_env, tool_version
from tests.support.registry import RegistryServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

# What ``fastpull pull`` imports before its first request: the CLI at start-up, then, inside
# the command, the batch-file and batch modules (which bring the puller, engine and store).
PULL_IMPORTS = "import fastpull.cli.commands, fastpull.batchfile, fastpull.bulk"
PYFLOOR_IMPORTS = "import benchmarks.pyfloor"
BREAKDOWN_ROWS = (
    "python -c pass",
    "pyfloor",
    "fastpull",
    "pyfloor imports",
    "fastpull imports",
    "pyfloor work",
    "fastpull work",
)

# A child that times ``timed`` after ``setup`` and prints the seconds it took: the imports
# alone (the interpreter's start before them and its teardown after are not theirs), or a
# pull in a process that has imported its modules already.
_TIMED = (
    "import sys, time\n"
    "{setup}\n"
    "started = time.perf_counter()\n"
    "{timed}\n"
    "print(time.perf_counter() - started)\n"
)


@dataclass(frozen=True)
class Row:
    """One thing timed: how to run it in a fresh directory, whether the child reports its
    own seconds (imports and work) or the process's wall time counts (the whole pulls),
    and what a whole pull must have left in that directory (see Invocation)."""

    name: str
    argv: Callable[[Path], list[str]]
    reported: bool = False
    missing_output: Callable[[Path], str | None] | None = None


@dataclass(frozen=True)
class Sample:
    """One run of a row: its milliseconds, or why it failed."""

    row: str
    round: int
    ms: float | None
    error: str | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=15, help="rounds (default 15)")
    parser.add_argument(
        "--modules", type=int, default=0, metavar="K", help="list the K costliest imports"
    )
    parser.add_argument("--scratch", type=Path, default=None, help="where the pulls write")
    parser.add_argument("--workdir", type=Path, default=RESULTS_DIR / "cache")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    options = parser.parse_args(argv)
    if options.runs < 2:
        parser.error("--runs must be at least 2")
    return options


def rows(target: Target) -> list[Row]:
    """Everything timed, in the first round's order."""
    python = sys.executable
    url = f"http://{target.host}/v2/{target.repository}/manifests/{target.tag}"

    def whole(tool: str) -> Row:
        return Row(
            tool,
            lambda out: list(invocation(tool, target, out).argv),
            missing_output=lambda out: invocation(tool, target, out).missing_output(),
        )

    def timed(setup: str, code: Callable[[Path], str]) -> Callable[[Path], list[str]]:
        return lambda out: [python, "-c", _TIMED.format(setup=setup, timed=code(out))]

    def fastpull_call(out: Path) -> str:
        argv = ["pull", "--store", str(out / "store"), target.reference]
        return f"if fastpull.cli.commands.main({argv!r}): sys.exit('the pull failed')"

    def pyfloor_call(out: Path) -> str:
        layout = f"__import__('pathlib').Path({str(out / 'layout')!r})"
        return f"if benchmarks.pyfloor.main({url!r}, {layout}): sys.exit('the pull failed')"

    return [
        whole("skopeo"),
        whole("pyfloor"),
        whole("fastpull"),
        Row("python -c pass", lambda out: [python, "-c", "pass"]),
        Row("pyfloor imports", timed("", lambda out: PYFLOOR_IMPORTS), reported=True),
        Row("fastpull imports", timed("", lambda out: PULL_IMPORTS), reported=True),
        Row("pyfloor work", timed(PYFLOOR_IMPORTS, pyfloor_call), reported=True),
        Row("fastpull work", timed(PULL_IMPORTS, fastpull_call), reported=True),
    ]


def measure(row: Row, round_: int, env: dict[str, str], scratch: Path) -> Sample:
    """One run of ``row`` in a fresh directory. Not ``measure.run_measured``: its sampling
    of /proc every 50 ms costs about 1 ms a time, a share of a 100 ms pull, and the rows
    need only the wall time or the child's own report."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    try:
        started = time.perf_counter()
        done = subprocess.run(
            row.argv(out), env=env, cwd=scratch, capture_output=True, text=True, timeout=120
        )
        wall_ms = (time.perf_counter() - started) * 1000
        problem = row.missing_output(out) if row.missing_output and not done.returncode else None
    finally:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return Sample(row.name, round_, None, tail)
    if problem is not None:
        return Sample(row.name, round_, None, problem)
    if row.reported:
        return Sample(row.name, round_, float(done.stdout.split()[-1]) * 1000, None)
    return Sample(row.name, round_, wall_ms, None)


def costliest_imports(env: dict[str, str], scratch: Path, count: int) -> list[tuple[str, float]]:
    """The ``count`` modules of PULL_IMPORTS with the largest own import time, best of 5."""
    best: dict[str, int] = {}
    for _ in range(5):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", PULL_IMPORTS],
            env=env,
            cwd=scratch,
            capture_output=True,
            text=True,
            check=True,
        )
        for line in done.stderr.splitlines():
            fields = line.split("|")
            own = fields[0].rpartition(":")[2].strip()
            if len(fields) == 3 and own.isdigit():  # not the header line
                name = fields[2].strip()
                best[name] = min(best.get(name, int(own)), int(own))
    ranked = sorted(best.items(), key=lambda item: -item[1])[:count]
    return [(name, us / 1000) for name, us in ranked]


def summarize(samples: list[Sample], names: list[str]) -> dict[str, dict[str, float]]:
    table = {}
    for name in names:
        times = sorted(s.ms for s in samples if s.row == name and s.ms is not None)
        if times:
            table[name] = {"best": times[0], "median": statistics.median(times), "n": len(times)}
    return table


def print_report(table: dict[str, dict[str, float]], failures: list[Sample]) -> None:
    print(f"\n{'row':18} {'best ms':>8} {'median':>8} {'runs':>5}")
    for name, stats in table.items():
        print(f"{name:18} {stats['best']:8.1f} {stats['median']:8.1f} {stats['n']:5d}")
    for failed in failures:
        print(f"failed: {failed.row} (round {failed.round}): {failed.error}")
    if not all(name in table for name in BREAKDOWN_ROWS):
        return
    best = {name: stats["best"] for name, stats in table.items()}
    start = best["python -c pass"]
    print(f"\nbest of each, ms          {'pyfloor':>8} {'fastpull':>9} {'difference':>11}")
    sides = {
        side: (start, best[f"{side} imports"], best[f"{side} work"], best[side])
        for side in ("pyfloor", "fastpull")
    }
    labels = ("interpreter start", "imports", "work after imports", "whole pull")
    for i, label in enumerate(labels):
        floor, ours = sides["pyfloor"][i], sides["fastpull"][i]
        print(f"{label:25} {floor:8.1f} {ours:9.1f} {ours - floor:+11.1f}")
    # The whole pull's best run against the parts' best runs: what starting the program
    # (``-m``, a script) and the interpreter's exit add, give or take the noise between runs.
    rest = {side: parts[3] - sum(parts[:3]) for side, parts in sides.items()}
    print(
        f"{'the rest (whole - parts)':25} {rest['pyfloor']:8.1f} {rest['fastpull']:9.1f} "
        f"{rest['fastpull'] - rest['pyfloor']:+11.1f}"
    )
    if "skopeo" in best:
        ours, floor = best["skopeo"] / best["fastpull"], best["skopeo"] / best["pyfloor"]
        print(
            f"\nskopeo {best['skopeo']:.1f} ms: fastpull is {ours:.2f}x skopeo, "
            f"pyfloor {floor:.2f}x (target: fastpull >= 1.0x)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    missing = missing_tools(["skopeo"])
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    options.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    spec = image_specs(quick=False)["small"]
    image = build_image(spec, options.workdir)
    with tempfile.TemporaryDirectory(prefix="fastpull-startup-", dir=options.scratch) as tmp:
        scratch = Path(tmp)
        env = tool_env(scratch)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with RegistryServer() as registry:
            registry.pusher.push_image(spec.repository, spec.tag, image)
            target = Target(
                host=registry.host,
                repository=spec.repository,
                tag=spec.tag,
                blobs=tuple(image.referenced_blobs()),
                largest=largest_layer(image),
            )
            timed = rows(target)
            samples: list[Sample] = []
            for round_ in range(options.runs):
                shift = round_ % len(timed)
                for row in timed[shift:] + timed[:shift]:
                    warm(registry)
                    os.sync()
                    samples.append(measure(row, round_ + 1, env, scratch))
                print(f"round {round_ + 1}/{options.runs} done", file=sys.stderr)
            modules = costliest_imports(env, scratch, options.modules) if options.modules else []
        versions = {tool: tool_version(tool, env) for tool in ("fastpull", "skopeo", "pyfloor")}
    table = summarize(samples, [row.name for row in timed])
    failures = [s for s in samples if s.ms is None]
    print_report(table, failures)
    if modules:
        print(f"\ncostliest imports of `{PULL_IMPORTS}` (own time, best of 5):")
        for name, ms in modules:
            print(f"  {ms:6.2f} ms  {name}")
    path = options.results_dir / f"startup-{stamp}.json"
    write_json(
        path,
        {
            "table_ms": table,
            "samples": [asdict(s) for s in samples],
            "costliest_imports_ms": modules,
            "versions": versions,
            "load_average": os.getloadavg(),
        },
    )
    print(f"\nJSON: {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
