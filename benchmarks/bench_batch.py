"""Batch benchmark: ``fastpull pull -f`` against a loop of ``skopeo copy`` and ``skopeo sync``.

Run from the repository root::

    python -m benchmarks.bench_batch [--count 50] [--base-mib 8] [--own-mib 1] [--runs 1]

It starts Debian's ``docker-registry`` on 127.0.0.1, pushes ``--count`` images (repositories
``bench/app0`` ...; tag ``1``) of 10 layers each: 5 base layers every image shares and 5 of
its own, then pulls the whole list with each tool into an empty directory:

- ``fastpull``: ``fastpull pull -f LIST --store DIR`` (one engine run for the batch);
- ``skopeo-loop``: ``for ref in LIST; do skopeo copy docker://$ref oci:DIR:$tag; done`` into
  one shared OCI layout (skopeo skips blobs the layout already has);
- ``skopeo-sync``: ``skopeo sync --src yaml --dest dir`` with the same list;
- ``fastpull-cluster`` (on request, ``--tools``): ``fastpull pull -f LIST --cluster ADDR``
  on a Dask scheduler with two local workers (each a ``dask worker`` process running the
  engine), tasks sized as they would be by default;
- ``fastpull-cluster-per-blob``: the same with every blob a task of its own
  (``FASTPULL_CLUSTER_TASK_BYTES=1``), which shows the cluster's cost per task.

On this two-core machine the cluster rows show overhead, not speed-up: the workers share the
cores the local run has to itself. ``docs/scale.md`` turns the numbers into a model.

Bytes transferred are counted at the registry: the sizes of blob GETs in its access log
during each run (manifests are not counted), next to the unique blob total the images
need. The table shows seconds (median), bytes, and each tool's time as a multiple of
fastpull's. Results go to ``benchmarks/results/batch-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.measure import run_measured
from benchmarks.report import write_json
from benchmarks.synthetic import cached_layer
from benchmarks.tools import tool_env
from tests.support.daskcluster import DaskCluster
from tests.support.images import Image, MiB, make_image
from tests.support.netutil import HARNESS_USER_AGENT
from tests.support.registry import RegistryServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOOLS = ("fastpull", "skopeo-loop", "skopeo-sync", "fastpull-cluster", "fastpull-cluster-per-blob")
DEFAULT_TOOLS = TOOLS[:3]
CLUSTER_TOOLS = frozenset(TOOLS[3:])
BASE_LAYERS = 5
OWN_LAYERS = 5
# A blob GET in the registry's access log: target, status, response bytes, user agent.
_BLOB_GET = re.compile(
    r'"GET (?P<target>/v2/\S+/blobs/\S+) [^"]*" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'"(?:[^"\\]|\\.)*" "(?P<agent>(?:[^"\\]|\\.)*)"'
)


@dataclass(frozen=True)
class Run:
    """One tool's run over the whole list."""

    tool: str
    round: int
    ok: bool
    seconds: float
    blob_gets: int
    blob_bytes: int
    error: str | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_batch", description=__doc__)
    parser.add_argument("--count", type=int, default=50, help="images in the batch (50)")
    parser.add_argument("--base-mib", type=float, default=8, help="size of each base layer (8)")
    parser.add_argument("--own-mib", type=float, default=1, help="size of each own layer (1)")
    parser.add_argument("--runs", type=int, default=1, help="runs per tool (1)")
    parser.add_argument(
        "--tools", default=",".join(DEFAULT_TOOLS), help=f"subset of {','.join(TOOLS)}"
    )
    parser.add_argument("--workdir", type=Path, default=RESULTS_DIR / "cache")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--timeout", type=float, default=1800.0)
    ns = parser.parse_args(argv)
    ns.tools = tuple(t for t in ns.tools.split(",") if t)
    if set(ns.tools) - set(TOOLS) or ns.count < 1 or ns.runs < 1:
        parser.error("bad --tools, --count or --runs")
    return ns


def build_images(count: int, base_mib: float, own_mib: float, cache: Path) -> list[Image]:
    """``count`` images of 5 shared base layers and 5 layers each of their own."""
    cache.mkdir(parents=True, exist_ok=True)
    base = [cached_layer(cache, int(base_mib * MiB), 5000 + i) for i in range(BASE_LAYERS)]
    images = []
    for n in range(count):
        own = [
            cached_layer(cache, int(own_mib * MiB) + n, 6000 + n * OWN_LAYERS + i)
            for i in range(OWN_LAYERS)
        ]
        images.append(make_image([*base, *own]))
    return images


def blob_traffic(registry: RegistryServer, since: int) -> tuple[int, int]:
    """Blob GETs and their response bytes in the registry's log after ``since``."""
    registry.mark()  # waits until every answered request is in the log
    assert registry.log_path is not None
    with registry.log_path.open("rb") as fh:
        fh.seek(since)
        text = fh.read().decode("utf-8", "replace")
    gets = total = 0
    for match in _BLOB_GET.finditer(text):
        if match["agent"].startswith(HARNESS_USER_AGENT) or match["status"] not in ("200", "206"):
            continue
        gets += 1
        total += int(match["bytes"])
    return gets, total


def commands(
    tool: str, refs: list[str], host: str, out: Path, scratch: Path, cluster: str | None = None
) -> list[str]:
    """The command line that pulls every ref with ``tool`` into ``out``."""
    if tool == "fastpull" or tool in CLUSTER_TOOLS:
        listing = scratch / "list.txt"
        listing.write_text("\n".join(refs) + "\n")
        argv = [sys.executable, "-m", "fastpull", "pull", "-q", "--store", str(out / "store")]
        argv += ["-f", str(listing)]
        if tool in CLUSTER_TOOLS:
            assert cluster is not None
            argv += ["--cluster", cluster]
        return argv
    if tool == "skopeo-loop":
        script = "\n".join(
            "skopeo copy -q --src-tls-verify=false --dest-oci-accept-uncompressed-layers "
            f"docker://{ref} oci:{out / 'layout'}:{ref.split('/', 1)[1].replace('/', '-')}"
            " || exit 1"
            for ref in refs
        )
        return ["sh", "-c", script]
    config = scratch / "sync.yaml"
    images: dict[str, list[str]] = {}
    for ref in refs:
        repository, tag = ref.split("/", 1)[1].rsplit(":", 1)
        images.setdefault(repository, []).append(tag)
    config.write_text(json.dumps({host: {"tls-verify": False, "images": images}}))
    return ["skopeo", "sync", "--src", "yaml", "--dest", "dir", str(config), str(out)]


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    missing = [t for t in ("docker-registry", "skopeo") if shutil.which(t) is None]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    images = build_images(opts.count, opts.base_mib, opts.own_mib, opts.workdir)
    unique = {b.digest: b.size for image in images for b in image.referenced_blobs()}
    naive = sum(b.size for image in images for b in image.referenced_blobs())
    print(f"layers ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="fastpull-bench-batch-") as tmp:
        scratch = Path(tmp)
        env = tool_env(scratch)
        with contextlib.ExitStack() as stack:
            registry = stack.enter_context(RegistryServer())
            cluster = None
            if CLUSTER_TOOLS & set(opts.tools):
                cluster = stack.enter_context(DaskCluster(2)).address
            refs = []
            for n, image in enumerate(images):
                registry.pusher.push_image(f"bench/app{n}", "1", image)
                refs.append(f"{registry.host}/bench/app{n}:1")
            for round_no in range(opts.runs):
                for tool in opts.tools:
                    out = scratch / f"{tool}-{round_no}"
                    out.mkdir()
                    argv = commands(tool, refs, registry.host, out, scratch, cluster)
                    since = registry.mark()
                    run_env = dict(env)
                    if tool == "fastpull-cluster-per-blob":
                        run_env["FASTPULL_CLUSTER_TASK_BYTES"] = "1"
                    measured = run_measured(
                        argv, env=run_env, log_path=scratch / "log", timeout=opts.timeout
                    )
                    gets, got = blob_traffic(registry, since)
                    ok = measured.returncode == 0
                    error = None
                    if not ok:
                        error = (scratch / "log").read_text("utf-8", "replace")[-500:]
                    runs.append(Run(tool, round_no, ok, measured.wall_seconds, gets, got, error))
                    print(
                        f"{tool:<25} {measured.wall_seconds:7.2f}s {gets:5d} GETs "
                        f"{got / 1e6:9.1f} MB {'ok' if ok else 'FAILED: ' + str(error)}",
                        file=sys.stderr,
                    )
                    shutil.rmtree(out, ignore_errors=True)
    print(render(runs, opts, len(unique), sum(unique.values()), naive))
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    path = opts.results_dir / f"batch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(
        path,
        {
            "count": opts.count,
            "base_mib": opts.base_mib,
            "own_mib": opts.own_mib,
            "unique_blobs": len(unique),
            "unique_bytes": sum(unique.values()),
            "bytes_without_dedup": naive,
            "runs": [asdict(r) for r in runs],
        },
    )
    print(f"\nJSON: {path}")
    return 0 if all(r.ok for r in runs) else 1


def render(runs: list[Run], opts: argparse.Namespace, blobs: int, unique: int, naive: int) -> str:
    """The table: median seconds, blob traffic, and time relative to fastpull."""
    medians = {
        tool: statistics.median(r.seconds for r in runs if r.tool == tool and r.ok)
        for tool in opts.tools
        if any(r.tool == tool and r.ok for r in runs)
    }
    base = medians.get("fastpull")
    lines = [
        f"{opts.count} images x 10 layers ({BASE_LAYERS} shared of {opts.base_mib:g} MiB, "
        f"{OWN_LAYERS} own of ~{opts.own_mib:g} MiB); {blobs} unique blobs, "
        f"{unique / 1e6:.1f} MB unique, {naive / 1e6:.1f} MB without dedup",
        "",
        f"{'tool':<25} {'ok':>5} {'seconds':>8} {'blob GETs':>10} {'MB moved':>9} "
        f"{'/ unique':>9} {'x fastpull':>11}",
    ]
    for tool in opts.tools:
        mine = [r for r in runs if r.tool == tool]
        good = [r for r in mine if r.ok]
        seconds = medians.get(tool)
        moved = statistics.median(r.blob_bytes for r in good) if good else 0
        gets = statistics.median(r.blob_gets for r in good) if good else 0
        ratio = f"{seconds / base:.2f}" if seconds and base else "-"
        lines.append(
            f"{tool:<25} {len(good):>2}/{len(mine):<2} "
            f"{seconds if seconds is not None else float('nan'):8.2f} {gets:>10.0f} "
            f"{moved / 1e6:9.1f} {moved / unique:9.2f} {ratio:>11}"
        )
    if base and "skopeo-sync" in medians:
        lines.append(
            f"\nfastpull vs skopeo sync: {medians['skopeo-sync'] / base:.1f}x faster (target >= 3x)"
        )
    per_blob = medians.get("fastpull-cluster-per-blob")
    if base and per_blob:
        lines.append(
            f"cluster cost per task: {(per_blob - base) / blobs * 1000:.1f} ms "
            f"((per-blob cluster run - local run) / {blobs} tasks)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
