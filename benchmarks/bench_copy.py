"""Copy benchmark: registry to registry, ``fastpull copy`` against skopeo.

Run from the repository root::

    python -m benchmarks.bench_copy [--parts big,batch] [--runs 1] [--quick] [--cluster]

It starts two of Debian's ``docker-registry`` on 127.0.0.1: the source, behind nginx capping
every connection at ``--cap-mbps`` (40 MB/s, as ``bench_pull``'s capped scenario), and for
every run a fresh, empty destination. Then:

- ``big``: ``bench_pull``'s big image (layers of 1 GiB down to 1 MiB; ``--quick``: 64 MiB
  down) with ``fastpull copy SRC DEST`` and ``skopeo copy docker://SRC docker://DEST``;
- ``batch``: ``bench_batch``'s images (``--count`` of them, 5 shared base layers and 5 own)
  with ``fastpull copy -f LIST --to DEST/mirror``, ``skopeo sync --src yaml --dest docker``
  and a loop of ``skopeo copy``; with ``--cluster`` also ``fastpull-cluster``: the same
  ``copy -f`` with ``--cluster`` on a ``dask scheduler`` and two ``dask worker`` processes
  started on this machine (so it shows the cluster's overhead, not a speed-up).

fastpull gets a fresh store per run. At the destination, its access log gives the blobs
uploaded (a ``PUT`` answered 201 ends each upload; the bytes are those blobs' sizes, so a
retried upload's lost bytes are not counted) and the blobs mounted (``POST ?mount=``
answered 201), next to the unique blob total. Results go to
``benchmarks/results/copy-<timestamp>.json``. Targets (reported, never asserted): the big
image >= 3x skopeo copy; the batch >= 3x skopeo sync and >= 2x the skopeo copy loop; bytes
uploaded = unique bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote

from benchmarks.bench_batch import build_images
from benchmarks.measure import run_measured
from benchmarks.report import write_json
from benchmarks.synthetic import build_image, image_specs
from benchmarks.tools import tool_env
from tests.support.daskcluster import DaskCluster
from tests.support.images import Image
from tests.support.nginxproxy import RateCappedProxy
from tests.support.registry import LoggedRequest, RegistryServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PARTS = {"big": ("fastpull", "skopeo-copy"), "batch": ("fastpull", "skopeo-sync", "skopeo-loop")}
TARGETS = {
    ("big", "skopeo-copy"): 3.0,
    ("batch", "skopeo-sync"): 3.0,
    ("batch", "skopeo-loop"): 2.0,
}
# --preserve-digests: without it skopeo gzips the uncompressed layers on their way to a
# registry, which is more work and other digests (the images would not be the same).
_SKOPEO_TLS = ("--src-tls-verify=false", "--dest-tls-verify=false", "--preserve-digests")


@dataclass(frozen=True)
class Run:
    """One tool's run of one part."""

    part: str
    tool: str
    round: int
    ok: bool
    seconds: float
    blobs_uploaded: int
    bytes_uploaded: int
    blobs_mounted: int
    error: str | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_copy", description=__doc__)
    parser.add_argument("--parts", default="big,batch", help="big, batch or both (big,batch)")
    parser.add_argument("--runs", type=int, default=1, help="runs per tool and part (1)")
    parser.add_argument("--quick", action="store_true", help="a small big image (64 MiB max)")
    parser.add_argument("--count", type=int, default=50, help="images in the batch (50)")
    parser.add_argument("--base-mib", type=float, default=8, help="batch base layer size (8)")
    parser.add_argument("--own-mib", type=float, default=1, help="batch own layer size (1)")
    parser.add_argument("--cap-mbps", type=float, default=40, help="per-connection cap, MB/s")
    parser.add_argument("--fastpull-args", default="", help="extra fastpull copy options")
    parser.add_argument(
        "--cluster", action="store_true", help="add copy -f --cluster on 2 local Dask workers"
    )
    parser.add_argument("--workdir", type=Path, default=RESULTS_DIR / "cache")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--timeout", type=float, default=1800.0)
    ns = parser.parse_args(argv)
    ns.parts = tuple(p for p in ns.parts.split(",") if p)
    if set(ns.parts) - set(PARTS) or not ns.parts or ns.runs < 1 or ns.count < 1:
        parser.error("bad --parts, --runs or --count")
    return ns


def uploads(requests: list[LoggedRequest], dest: RegistryServer) -> tuple[int, int, int]:
    """Blobs uploaded, their bytes (as the destination stores them), and blobs mounted,
    from the destination's access log."""
    done = [
        unquote(r.path.split("digest=", 1)[1].split("&", 1)[0])
        for r in requests
        if r.method == "PUT" and r.status == 201 and "/blobs/uploads/" in r.path
    ]
    mounted = sum(
        1 for r in requests if r.method == "POST" and "mount=" in r.path and r.status == 201
    )
    return len(done), sum(dest.blob_data_path(d).stat().st_size for d in done), mounted


def commands(
    part: str,
    tool: str,
    refs: list[str],
    src: str,
    dest: str,
    out: Path,
    extra: list[str],
    cluster: str | None = None,
) -> list[str]:
    """The command line that copies every ref (``src/...``) with ``tool`` to ``dest``
    (``fastpull-cluster``: on the Dask scheduler at ``cluster``)."""
    fastpull = [sys.executable, "-m", "fastpull", "copy", "-q", "--store", str(out), *extra]
    paths = [ref.split("/", 1)[1] for ref in refs]
    if part == "big":
        if tool == "fastpull":
            return [*fastpull, refs[0], f"{dest}/{paths[0]}"]
        return [
            "skopeo",
            "copy",
            "-q",
            *_SKOPEO_TLS,
            f"docker://{refs[0]}",
            f"docker://{dest}/{paths[0]}",
        ]
    if tool in ("fastpull", "fastpull-cluster"):
        listing = out.parent / f"{out.name}-list.txt"
        listing.write_text("\n".join(refs) + "\n")
        on = ["--cluster", cluster] if tool == "fastpull-cluster" and cluster else []
        return [*fastpull, "-f", str(listing), "--to", f"{dest}/mirror", *on]
    if tool == "skopeo-loop":
        script = "\n".join(
            f"skopeo copy -q {' '.join(_SKOPEO_TLS)} docker://{ref} "
            f"docker://{dest}/mirror/{path} || exit 1"
            for ref, path in zip(refs, paths, strict=True)
        )
        return ["sh", "-c", script]
    images: dict[str, list[str]] = {}
    for path in paths:
        repository, tag = path.rsplit(":", 1)
        images.setdefault(repository, []).append(tag)
    config = out.parent / f"{out.name}-sync.yaml"
    config.write_text(json.dumps({src: {"tls-verify": False, "images": images}}))
    return [
        "skopeo", "sync", "--src", "yaml", "--dest", "docker", "--dest-tls-verify=false",
        "--preserve-digests",
        str(config), f"{dest}/mirror",
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    missing = [t for t in ("docker-registry", "skopeo", "nginx") if shutil.which(t) is None]
    if missing and not (missing == ["nginx"] and Path("/usr/sbin/nginx").exists()):
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    images: dict[str, list[Image]] = {}
    if "big" in opts.parts:
        images["big"] = [build_image(image_specs(quick=opts.quick)["big"], opts.workdir)]
    if "batch" in opts.parts:
        images["batch"] = build_images(opts.count, opts.base_mib, opts.own_mib, opts.workdir)
    runs: list[Run] = []
    unique: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="fastpull-bench-copy-") as tmp:
        scratch = Path(tmp)
        env = tool_env(scratch)
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(RegistryServer())
            capped = stack.enter_context(
                RateCappedProxy(
                    source.host,
                    rate_bytes=int(opts.cap_mbps * 1e6),
                    access_log=scratch / "nginx-access.log",
                )
            )
            cluster = stack.enter_context(DaskCluster(2)).address if opts.cluster else None
            for part, part_images in images.items():
                refs = []
                for n, image in enumerate(part_images):
                    repository = "bench/big" if part == "big" else f"bench/app{n}"
                    source.pusher.push_image(repository, "1", image)
                    refs.append(f"{capped.host}/{repository}:1")
                sizes = {b.digest: b.size for i in part_images for b in i.referenced_blobs()}
                unique[part] = sizes
                for round_no in range(opts.runs):
                    for tool in tools(part, opts.cluster):
                        runs.append(
                            _one_run(
                                part, tool, round_no, refs, capped.host, scratch, env, opts, cluster
                            )
                        )
    print(render(runs, unique))
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    path = opts.results_dir / f"copy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(
        path,
        {
            "cap_mbps": opts.cap_mbps,
            "quick": opts.quick,
            "count": opts.count,
            "unique_bytes": {part: sum(s.values()) for part, s in unique.items()},
            "unique_blobs": {part: len(s) for part, s in unique.items()},
            "runs": [asdict(r) for r in runs],
        },
    )
    print(f"\nJSON: {path}")
    return 0 if all(r.ok for r in runs) else 1


def tools(part: str, cluster: bool) -> tuple[str, ...]:
    """The tools that run ``part``: the cluster row only on request, for the batch."""
    return PARTS[part] + (("fastpull-cluster",) if cluster and part == "batch" else ())


def _one_run(
    part: str,
    tool: str,
    round_no: int,
    refs: list[str],
    src: str,
    scratch: Path,
    env: dict[str, str],
    opts: argparse.Namespace,
    cluster: str | None = None,
) -> Run:
    """One tool copying one part into a fresh destination registry."""
    out = scratch / f"{part}-{tool}-{round_no}"
    out.mkdir()
    log = scratch / "log"
    with RegistryServer() as dest:
        argv = commands(part, tool, refs, src, dest.host, out, opts.fastpull_args.split(), cluster)
        since = dest.mark()
        measured = run_measured(argv, env=env, log_path=log, timeout=opts.timeout)
        blobs, sent, mounted = uploads(dest.requests(since), dest)
    shutil.rmtree(out, ignore_errors=True)
    ok = measured.returncode == 0
    error = None if ok else log.read_text("utf-8", "replace")[-500:]
    print(
        f"{part:<6} {tool:<16} {measured.wall_seconds:8.2f}s {blobs:5d} blobs up "
        f"{sent / 1e6:9.1f} MB {mounted:4d} mounted {'ok' if ok else 'FAILED: ' + str(error)}",
        file=sys.stderr,
    )
    return Run(part, tool, round_no, ok, measured.wall_seconds, blobs, sent, mounted, error)


def render(runs: list[Run], unique: dict[str, dict[str, int]]) -> str:
    """Per part: median seconds, uploads against the unique total, time against fastpull."""
    lines = []
    for part, sizes in unique.items():
        total = sum(sizes.values())
        lines += [
            f"\n{part}: {len(sizes)} unique blobs, {total / 1e6:.1f} MB",
            f"{'tool':<16} {'ok':>5} {'seconds':>8} {'MB up':>8} {'/ unique':>9} "
            f"{'mounted':>8} {'x fastpull':>11}",
        ]
        ran = tuple(dict.fromkeys(r.tool for r in runs if r.part == part))
        medians = {}
        for tool in ran:
            good = [r for r in runs if r.part == part and r.tool == tool and r.ok]
            if good:
                medians[tool] = statistics.median(r.seconds for r in good)
        base = medians.get("fastpull")
        for tool in ran:
            mine = [r for r in runs if r.part == part and r.tool == tool]
            good = [r for r in mine if r.ok]
            sent = statistics.median(r.bytes_uploaded for r in good) if good else 0
            mounted = statistics.median(r.blobs_mounted for r in good) if good else 0
            seconds = medians.get(tool)
            ratio = f"{seconds / base:.2f}" if seconds and base else "-"
            lines.append(
                f"{tool:<16} {len(good):>2}/{len(mine):<2} "
                f"{seconds if seconds is not None else float('nan'):8.2f} {sent / 1e6:8.1f} "
                f"{sent / total if total else 0:9.2f} {mounted:8.0f} {ratio:>11}"
            )
        for (target_part, tool), factor in TARGETS.items():
            if target_part == part and base and tool in medians:
                speedup = medians[tool] / base
                verdict = "met" if speedup >= factor else "NOT met"
                lines.append(
                    f"fastpull vs {tool}: {speedup:.1f}x (target >= {factor:g}x: {verdict})"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
