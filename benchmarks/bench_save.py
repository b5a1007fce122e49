"""Save benchmark: ``fastpull save`` against ``skopeo copy oci:… docker-archive:…``.

Run from the repository root::

    python -m benchmarks.bench_save [--quick] [--runs 5] [--scratch DIR]

It starts Debian's ``docker-registry`` on 127.0.0.1, pushes the pull benchmark's ``big`` image
(layers of 1 GiB, 512, 256, 64, 8 and 1 MiB; ``--quick``: 64, 16, 4 and 1 MiB), pulls it once
with fastpull into a store (not timed), then writes it as one archive with each tool, one run
at a time, the order rotated each round:

- ``fastpull``: ``fastpull save --store STORE -o FILE REF``, the docker-save (>=25) archive;
- ``skopeo``: ``skopeo copy oci:STORE:REF docker-archive:FILE:REF``, reading the same store;
- ``copy``: ``cat`` of the image's blob files into FILE, the read-and-write reference.

Every output file is checked (it must hold at least the image's bytes), then deleted and
``sync``ed, so one run's write-back is not charged to the next. MB/s is the image's bytes
(config and layers) over the wall time of the whole command, start-up included. Results go
to ``benchmarks/results/save-<timestamp>.json``.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.measure import run_measured
from benchmarks.report import write_json
from benchmarks.synthetic import build_image, image_specs
from benchmarks.tools import tool_env, tool_version
from tests.support.registry import RegistryServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOOLS = ("fastpull", "skopeo", "copy")


@dataclass(frozen=True)
class Run:
    """One tool writing the archive once."""

    tool: str
    round: int
    ok: bool
    seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    output_bytes: int
    error: str | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_save", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small image, to check the harness")
    parser.add_argument("--runs", type=int, help="runs per tool (5; 2 with --quick)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"subset of {','.join(TOOLS)}")
    parser.add_argument("--scratch", type=Path, help="where the archives are written (TMPDIR)")
    parser.add_argument("--workdir", type=Path, default=RESULTS_DIR / "cache")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--timeout", type=float, default=600.0)
    ns = parser.parse_args(argv)
    ns.tools = tuple(t for t in ns.tools.split(",") if t)
    ns.runs = ns.runs or (2 if ns.quick else 5)
    if set(ns.tools) - set(TOOLS) or ns.runs < 1:
        parser.error("bad --tools or --runs")
    return ns


def command(tool: str, store: Path, ref: str, blobs: list[Path], out: Path) -> list[str]:
    """The command line that writes ``ref`` of ``store`` as an archive ``out`` with ``tool``."""
    if tool == "fastpull":
        fastpull = [sys.executable, "-m", "fastpull"]
        return [*fastpull, "save", "--store", str(store), "-o", str(out), ref]
    if tool == "skopeo":
        return ["skopeo", "copy", "-q", f"oci:{store}:{ref}", f"docker-archive:{out}:{ref}"]
    return ["sh", "-c", 'out="$1"; shift; cat "$@" > "$out"', "copy", str(out), *map(str, blobs)]


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    needed = ["docker-registry"] + (["skopeo"] if "skopeo" in opts.tools else [])
    missing = [t for t in needed if shutil.which(t) is None]
    if missing:
        print(f"missing: {', '.join(missing)} (scripts/install-deps.sh)", file=sys.stderr)
        return 2
    spec = image_specs(quick=opts.quick)["big"]
    image = build_image(spec, opts.workdir)
    payload = sum(b.size for b in image.referenced_blobs())
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="fastpull-bench-save-", dir=opts.scratch) as tmp:
        scratch = Path(tmp)
        env = tool_env(scratch)
        store = scratch / "store"
        with RegistryServer() as registry:
            registry.pusher.push_image(spec.repository, spec.tag, image)
            ref = f"{registry.host}/{spec.repository}:{spec.tag}"
            pulled = subprocess.run(
                [sys.executable, "-m", "fastpull", "pull", "-q", "--store", str(store), ref],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if pulled.returncode != 0:
                print(f"pull failed: {pulled.stderr}", file=sys.stderr)
                return 1
        blobs = [store / "blobs" / b.digest.replace(":", "/", 1) for b in image.referenced_blobs()]
        print(f"image: {payload / 1e6:.1f} MB in {len(blobs)} blobs", file=sys.stderr)
        for round_no in range(opts.runs):
            order = (
                opts.tools[round_no % len(opts.tools) :] + opts.tools[: round_no % len(opts.tools)]
            )
            for tool in order:
                out = scratch / f"{tool}.tar"
                measured = run_measured(
                    command(tool, store, ref, blobs, out),
                    env=env,
                    log_path=scratch / "log",
                    timeout=opts.timeout,
                )
                size = out.stat().st_size if out.exists() else 0
                ok = measured.returncode == 0 and size >= payload
                error = None if ok else (scratch / "log").read_text("utf-8", "replace")[-500:]
                runs.append(
                    Run(
                        tool,
                        round_no,
                        ok,
                        measured.wall_seconds,
                        measured.cpu_user_seconds + measured.cpu_system_seconds,
                        measured.peak_tree_rss_bytes,
                        size,
                        error or (None if ok else f"archive of {size} bytes"),
                    )
                )
                print(
                    f"{tool:<9} {measured.wall_seconds:7.2f}s "
                    f"{payload / 1e6 / measured.wall_seconds:8.1f} MB/s "
                    f"{'ok' if ok else 'FAILED: ' + str(runs[-1].error)}",
                    file=sys.stderr,
                )
                out.unlink(missing_ok=True)
                os.sync()
    print(render(runs, opts.tools, payload))
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    path = opts.results_dir / f"save-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(
        path,
        {
            "image": spec.name,
            "quick": opts.quick,
            "payload_bytes": payload,
            "versions": {
                t: tool_version(t, env) for t in ("fastpull", "skopeo") if t in opts.tools
            },
            "load_average": os.getloadavg(),
            "runs": [asdict(r) for r in runs],
        },
    )
    print(f"\nJSON: {path}")
    return 0 if all(r.ok for r in runs) else 1


def render(runs: list[Run], tools: Sequence[str], payload: int) -> str:
    """Median MB/s, CPU seconds per GB and peak RSS per tool, and fastpull against skopeo."""
    rates: dict[str, float] = {}
    lines = [
        f"image: {payload / 1e6:.1f} MB",
        "",
        f"{'tool':<9} {'ok':>5} {'MB/s':>8} {'range':>15} {'CPU s/GB':>9} {'RSS MB':>7}",
    ]
    for tool in tools:
        mine = [r for r in runs if r.tool == tool]
        good = [r for r in mine if r.ok]
        if not good:
            lines.append(f"{tool:<9} {0:>2}/{len(mine):<2}")
            continue
        speeds = [payload / 1e6 / r.seconds for r in good]
        rates[tool] = statistics.median(speeds)
        cpu = statistics.median(r.cpu_seconds for r in good) / (payload / 1e9)
        rss = max(r.peak_rss_bytes for r in good) / 1e6
        lines.append(
            f"{tool:<9} {len(good):>2}/{len(mine):<2} {rates[tool]:8.1f} "
            f"{min(speeds):7.1f}-{max(speeds):<7.1f} {cpu:9.2f} {rss:7.1f}"
        )
    if "fastpull" in rates and "skopeo" in rates:
        lines.append(f"\nfastpull save vs skopeo copy: {rates['fastpull'] / rates['skopeo']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
