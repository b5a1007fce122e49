"""Pull benchmark: fastpull against curl, aria2c and skopeo on a real registry on loopback.

Run from the repository root::

    python -m benchmarks.bench_pull [--runs 5] [--scenario direct|capped|slow|tls|faulty|all]
        [--images big|many|small|all] [--tools fastpull,curl,aria2c,skopeo,floor,disk] [--quick]

It starts Debian's ``docker-registry`` on 127.0.0.1 (for the ``tls`` scenario a second one
serving HTTPS; for ``capped`` and ``slow`` nginx in front of it with a per-connection
``limit_rate``), pushes synthetic images whose layers are
cached between harness runs, then runs every tool ``--runs`` times per scenario and image, one
tool at a time, alternating tools in each round. It prints a table of medians, writes every
run's raw numbers with machine information to ``benchmarks/results/pull-<timestamp>.json``,
and draws ``pull-<timestamp>.png`` when matplotlib is installed. See benchmarks/README.md.

The ``faulty`` scenario (only when asked for, not part of ``all``) pulls through the test
suite's fault proxy breaking 30% of blob GETs at random (a reset or a short body part-way,
a 503, a 429), to measure what retries cost; its pure-Python proxy caps throughput, so
compare it with ``faulty --fault-share 0``, not with ``direct``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks.measure import run_measured
from benchmarks.report import (
    RunResult,
    check_targets,
    draw_chart,
    render_table,
    summarize,
    write_json,
)
from benchmarks.synthetic import ImageSpec, build_image, image_specs, largest_layer
from benchmarks.tools import (
    DEFAULT_TOOLS,
    TOOLS,
    Target,
    fastpull_supports_stats,
    invocation,
    missing_tools,
    tool_env,
    tool_version,
)
from tests.support.faultproxy import (
    Action,
    FaultProxy,
    Forward,
    ProxiedRequest,
    Reset,
    Status,
    Truncate,
)
from tests.support.images import Image
from tests.support.netutil import HARNESS_USER_AGENT
from tests.support.nginxproxy import RateCappedProxy
from tests.support.registry import RegistryServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCENARIOS = ("direct", "capped", "slow", "tls")
# Only when asked for by name: not comparable with the others (a Python proxy in the path).
EXTRA_SCENARIOS = ("faulty",)
# Scenarios that pull through nginx, with their per-connection cap.
CAPPED_SCENARIOS = ("capped", "slow")
IMAGES = ("big", "many", "small")
MIB = 1024 * 1024
NGINX = "/usr/sbin/nginx"


@dataclass(frozen=True)
class Options:
    """The parsed command line."""

    runs: int
    scenarios: tuple[str, ...]
    images: tuple[str, ...]
    tools: tuple[str, ...]
    quick: bool
    cap_mbps: float
    fault_share: float
    slow_mibps: float
    fastpull_args: tuple[str, ...]
    cache_dir: Path
    results_dir: Path
    timeout: float
    scratch: Path | None = None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Read the command line; exits with status 2 on bad usage (argparse's convention)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_pull",
        description="Benchmark fastpull against curl, aria2c and skopeo on a loopback registry.",
    )
    parser.add_argument("--runs", type=int, help="runs per tool, scenario and image (5; 2 quick)")
    parser.add_argument("--scenario", choices=(*SCENARIOS, *EXTRA_SCENARIOS, "all"), default="all")
    parser.add_argument("--images", choices=(*IMAGES, "all"), default="all")
    parser.add_argument(
        "--tools",
        default=",".join(DEFAULT_TOOLS),
        help=f"comma-separated subset of {','.join(TOOLS)} (default: all but pyfloor)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small images (64 MiB largest layer) to test the harness",
    )
    parser.add_argument(
        "--cap-mbps",
        type=float,
        default=40.0,
        help="per-connection cap of the capped scenario, in MB/s of 10^6 bytes (40)",
    )
    parser.add_argument(
        "--slow-mibps",
        type=float,
        default=8.0,
        help="per-connection cap of the slow scenario, in MiB/s (8: nginx's limit_rate 8m)",
    )
    parser.add_argument(
        "--fault-share",
        type=float,
        default=0.3,
        help="share of blob GETs the faulty scenario's proxy breaks (0.3)",
    )
    parser.add_argument(
        "--fastpull-args",
        default="",
        help='extra "fastpull pull" options: --fastpull-args="--workers 4 --connections 16"',
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=RESULTS_DIR / "cache",
        help="where built layers are cached between harness runs (benchmarks/results/cache)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where the JSON, the chart and nginx's access log go (benchmarks/results)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds before one run is killed (600)"
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        help="where every tool writes its output (default: the system's temporary directory); "
        "/dev/shm takes the disk out of the comparison",
    )
    ns = parser.parse_args(argv)
    tools = tuple(t.strip() for t in ns.tools.split(",") if t.strip())
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown or not tools:
        parser.error(f"--tools: choose from {','.join(TOOLS)} (got {ns.tools!r})")
    runs = ns.runs if ns.runs is not None else (2 if ns.quick else 5)
    if runs < 1:
        parser.error("--runs must be at least 1")
    if ns.cap_mbps <= 0 or ns.slow_mibps <= 0 or ns.timeout <= 0:
        parser.error("--cap-mbps, --slow-mibps and --timeout must be positive")
    if not 0 <= ns.fault_share < 1:
        parser.error("--fault-share must be at least 0 and below 1")
    return Options(
        runs=runs,
        scenarios=SCENARIOS if ns.scenario == "all" else (ns.scenario,),
        images=IMAGES if ns.images == "all" else (ns.images,),
        tools=tuple(dict.fromkeys(tools)),
        quick=ns.quick,
        cap_mbps=ns.cap_mbps,
        fault_share=ns.fault_share,
        slow_mibps=ns.slow_mibps,
        fastpull_args=tuple(shlex.split(ns.fastpull_args)),
        cache_dir=ns.workdir,
        results_dir=ns.results_dir,
        timeout=ns.timeout,
        scratch=ns.scratch,
    )


def log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every run succeeded, 1 when some failed, 130 on Ctrl-C."""
    options = parse_args(argv)
    missing = missing_tools(options.tools)
    if set(CAPPED_SCENARIOS) & set(options.scenarios) and shutil.which(NGINX) is None:
        missing.append(f"{NGINX} for the capped and slow scenarios (apt-get install nginx-light)")
    if shutil.which("docker-registry") is None:
        missing.append("docker-registry (apt-get install docker-registry)")
    if missing:
        log("missing: " + "; ".join(missing) + " (or leave tools out with --tools / --scenario)")
        return 2
    # SIGTERM unwinds like Ctrl-C, so the servers and any running tool are stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    bench = Bench(options)
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: reporting the runs finished so far")
        bench.report()
        return 130
    bench.report()
    return 1 if any(not r.ok for r in bench.results) else 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class FlakyProxy(FaultProxy):
    """The fault proxy breaking a share of blob GETs at random, the same ones every run
    (seeded): a reset or a short body somewhere in the first 4 MiB, a 503 or a 429."""

    def __init__(self, upstream: str, share: float, seed: int = 12) -> None:
        super().__init__(upstream, max_response_seconds=600.0)
        self.share = share
        self._random = random.Random(seed)

    def _choose(self, request: ProxiedRequest) -> Action:
        if request.method != "GET" or "/blobs/" not in request.path:
            return Forward()
        with self._lock:
            if self._random.random() >= self.share:
                return Forward()
            after = self._random.randrange(4 << 20)
            return self._random.choice(
                [Reset(after), Truncate(after), Status(503, "0"), Status(429, "0")]
            )


class Bench:
    """One harness run: set-up, the measured runs, and the report."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.results: list[RunResult] = []
        self.images: dict[str, Image] = {}
        self.fastpull_stats = False
        self.scenario_info: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []
        self.machine: dict[str, Any] = {}
        self._runs_started = 0

    def access_log(self, scenario: str) -> Path:
        return self.options.results_dir / f"pull-{self.stamp}-{scenario}-nginx-access.log"

    def rate_bytes(self, scenario: str) -> int:
        """The per-connection cap of a scenario that goes through nginx."""
        if scenario == "slow":
            return int(self.options.slow_mibps * MIB)
        return int(self.options.cap_mbps * 1e6)

    def run(self) -> None:
        """Build and push the images, start the servers, and run every measurement."""
        opts = self.options
        opts.results_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            scratch = Path(
                stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="fastpull-bench-", dir=opts.scratch)
                )
            )
            env = tool_env(scratch)
            self.machine = machine_info(env, opts)
            self.fastpull_stats = "fastpull" in opts.tools and fastpull_supports_stats(env)
            specs = image_specs(quick=opts.quick)
            started = time.monotonic()
            for name in opts.images:
                self.images[name] = build_image(specs[name], opts.cache_dir)
            log(f"layers ready in {time.monotonic() - started:.1f}s (cache: {opts.cache_dir})")

            plain = [s for s in opts.scenarios if s != "tls"]
            registries = {
                tls: self._serve(stack, specs, tls=tls)
                for tls in (False, True)
                if (plain if not tls else "tls" in opts.scenarios)
            }
            ca_path = None
            if True in registries:
                # skopeo reads CAs from a directory of *.crt files.
                ca_path = scratch / "certs" / "ca.crt"
                ca_path.parent.mkdir()
                pem_path = registries[True].ca_pem_path
                assert pem_path is not None
                shutil.copyfile(pem_path, ca_path)

            for scenario in opts.scenarios:
                registry = registries[scenario == "tls"]
                host = registry.host
                if scenario in CAPPED_SCENARIOS:
                    proxy = stack.enter_context(
                        RateCappedProxy(
                            registry.host,
                            rate_bytes=self.rate_bytes(scenario),
                            access_log=self.access_log(scenario),
                            binary=NGINX,
                        )
                    )
                    host = proxy.host
                elif scenario == "faulty":
                    flaky = FlakyProxy(f"http://{registry.host}", opts.fault_share)
                    host = stack.enter_context(flaky).host
                capped = scenario in CAPPED_SCENARIOS
                self.scenario_info[scenario] = {
                    "host": host,
                    "tls": scenario == "tls",
                    "cap_bytes_per_connection": self.rate_bytes(scenario) if capped else None,
                    "fault_share": opts.fault_share if scenario == "faulty" else None,
                }
                for name in opts.images:
                    spec = specs[name]
                    image = self.images[name]
                    target = Target(
                        host=host,
                        repository=spec.repository,
                        tag=spec.tag,
                        blobs=tuple(image.referenced_blobs()),
                        largest=largest_layer(image),
                        ca_path=ca_path if scenario == "tls" else None,
                    )
                    self._check_range(scenario, target)
                    self._measure(scenario, name, target, scratch, env, registry)

    def _serve(
        self, stack: contextlib.ExitStack, specs: dict[str, ImageSpec], *, tls: bool
    ) -> RegistryServer:
        registry = stack.enter_context(RegistryServer(tls=tls))
        started = time.monotonic()
        for name in self.options.images:
            registry.pusher.push_image(specs[name].repository, specs[name].tag, self.images[name])
        # Flush the registry's freshly written blobs now rather than during the first run.
        os.sync()
        log(f"pushed to {registry.url} in {time.monotonic() - started:.1f}s")
        return registry

    def _check_range(self, scenario: str, target: Target) -> None:
        """Warn when Range requests do not come back as 206 (segmented tools would degrade)."""
        conn: http.client.HTTPConnection
        if target.ca_path is None:
            conn = http.client.HTTPConnection(target.host, timeout=30)
        else:
            context = ssl.create_default_context(cafile=str(target.ca_path))
            conn = http.client.HTTPSConnection(target.host, timeout=30, context=context)
        try:
            conn.request(
                "GET",
                target.largest_path,
                headers={"Range": "bytes=0-0", "User-Agent": HARNESS_USER_AGENT},
            )
            response = conn.getresponse()
            response.read()
            status = response.status
        finally:
            conn.close()
        if status != 206:
            warning = f"{scenario}: Range request answered {status}, not 206"
            self.warnings.append(warning)
            log("warning: " + warning)

    def _measure(
        self,
        scenario: str,
        image: str,
        target: Target,
        scratch: Path,
        env: dict[str, str],
        registry: RegistryServer,
    ) -> None:
        opts = self.options
        for round_no in range(opts.runs):
            # Rotating the order each round spreads whatever the previous run left behind
            # (dirty pages, warm caches) evenly over the tools.
            shift = round_no % len(opts.tools)
            order = opts.tools[shift:] + opts.tools[:shift]
            for position, tool in enumerate(order):
                # The machine's page-out daemon evicts cold page cache: every run starts with
                # the registry's blobs in memory and nothing left to write back.
                warm(registry)
                os.sync()
                result = self._run_once(
                    scenario, image, tool, round_no, position, target, scratch, env
                )
                self.results.append(result)
                status = (
                    f"{result.mb_per_s:8.1f} MB/s {result.wall_seconds:7.2f}s "
                    f"cpu {result.cpu_user_seconds + result.cpu_system_seconds:6.2f}s "
                    f"rss {result.peak_tree_rss_bytes / 1e6:5.0f}MB"
                    if result.ok
                    else f"FAILED: {result.error}"
                )
                log(f"[{scenario}/{image}] round {round_no + 1}/{opts.runs} {tool:<8} {status}")

    def _run_once(
        self,
        scenario: str,
        image: str,
        tool: str,
        round_no: int,
        position: int,
        target: Target,
        scratch: Path,
        env: dict[str, str],
    ) -> RunResult:
        self._runs_started += 1
        out_dir = scratch / f"run-{self._runs_started}"
        out_dir.mkdir()
        log_path = scratch / f"run-{self._runs_started}.log"
        call = invocation(
            tool,
            target,
            out_dir,
            fastpull_args=self.options.fastpull_args,
            fastpull_stats=self.fastpull_stats,
        )
        try:
            measured = run_measured(
                call.argv, env=env, log_path=log_path, timeout=self.options.timeout
            )
            if measured.returncode is None:
                error = f"timed out after {self.options.timeout:g}s"
            elif measured.returncode != 0:
                error = f"exit status {measured.returncode}: {_tail(log_path)}"
            else:
                error = call.missing_output()
            stats = None
            if call.stats_path is not None and call.stats_path.exists():
                try:
                    stats = json.loads(call.stats_path.read_text())
                except ValueError as exc:
                    error = error or f"unreadable --stats file: {exc}"
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
            log_path.unlink(missing_ok=True)
            # Write-back of this run's output must not be charged to the next run.
            os.sync()
        return RunResult(
            scenario=scenario,
            image=image,
            tool=tool,
            round=round_no,
            position=position,
            argv=list(call.argv),
            ok=error is None,
            error=error,
            returncode=measured.returncode,
            payload_bytes=call.payload_bytes,
            wall_seconds=measured.wall_seconds,
            cpu_user_seconds=measured.cpu_user_seconds,
            cpu_system_seconds=measured.cpu_system_seconds,
            peak_tree_rss_bytes=measured.peak_tree_rss_bytes,
            hwm_sum_bytes=measured.hwm_sum_bytes,
            server_cpu_seconds=measured.server_cpu_seconds,
            stats=stats,
        )

    def report(self) -> None:
        """Print the table and write the JSON file and the chart for the runs so far."""
        if not self.results:
            log("no runs finished; nothing to report")
            return
        opts = self.options
        summaries = summarize(self.results)
        checks = check_targets(summaries)
        json_path = opts.results_dir / f"pull-{self.stamp}.json"
        chart_path = opts.results_dir / f"pull-{self.stamp}.png"
        write_json(
            json_path,
            {
                "harness": {
                    "stamp": self.stamp,
                    "command": [sys.executable, "-m", "benchmarks.bench_pull", *sys.argv[1:]],
                    "runs": opts.runs,
                    "scenarios": list(opts.scenarios),
                    "images": list(opts.images),
                    "tools": list(opts.tools),
                    "quick": opts.quick,
                    "cap_mbps_per_connection": opts.cap_mbps,
                    "slow_mibps_per_connection": opts.slow_mibps,
                    "fastpull_args": list(opts.fastpull_args),
                    "fastpull_stats": self.fastpull_stats,
                    "timeout_seconds": opts.timeout,
                    "scratch": str(opts.scratch or tempfile.gettempdir()),
                    "units": "MB = 1e6 bytes, GB = 1e9 bytes",
                },
                "machine": self.machine,
                "scenarios": self.scenario_info,
                "images": {
                    name: {
                        "blobs": [
                            {"digest": b.digest, "size": b.size, "media_type": b.media_type}
                            for b in image.referenced_blobs()
                        ],
                        "bytes": sum(b.size for b in image.referenced_blobs()),
                        "largest_layer": largest_layer(image).digest,
                    }
                    for name, image in self.images.items()
                },
                "warnings": self.warnings,
                "summary": summaries,
                "targets": checks,
                "runs": self.results,
            },
        )
        chart_note = draw_chart(
            chart_path,
            summaries,
            f"fastpull pull benchmark {self.stamp} ({self.machine.get('cpu_model', '?')}, "
            f"{self.machine.get('cpus_usable', '?')} CPUs)",
        )
        notes = self._notes()
        print(render_table(summaries, checks, notes))
        print(f"\nJSON:  {json_path}")
        print(f"chart: {chart_note or chart_path}")
        for scenario in CAPPED_SCENARIOS:
            if scenario in self.scenario_info:
                print(f"nginx access log ({scenario}): {self.access_log(scenario)}")

    def _notes(self) -> list[str]:
        opts = self.options
        largest = {name: largest_layer(image).size / 1e6 for name, image in self.images.items()}
        notes = [
            f"MB/s: payload bytes / wall seconds / 10^6, median of {opts.runs} run(s) per row; "
            "tools alternate within each round, their order rotated every round. "
            "best: the fastest run (this VM's noise only slows runs down); range: slowest and "
            "fastest run. Before every run the registry's blob files are read back into the "
            "page cache and the disk is synced.",
            "payload: fastpull and skopeo pull the whole image (config + layers; the manifest "
            "is not counted) and verify every digest; curl and aria2c fetch only the largest "
            "layer ("
            + ", ".join(f"{name} {size:.0f} MB" for name, size in largest.items())
            + ") and do NOT verify its digest.",
            "CPU s/GB: user+system seconds of the tool's whole process tree (wait4 rusage) "
            "per 10^9 payload bytes; srv s/GB: registry + nginx CPU during the run. "
            "x floor: CPU s/GB over the floor row's (curl -o FILE, then openssl dgst -sha256 "
            "FILE, of the largest layer, same scenario).",
            "RSS MB: highest (over runs) peak of the summed VmRSS of the tool's process tree, "
            "sampled every 50 ms; pages shared between processes count once per process. "
            "The JSON also has the sum of every process's VmHWM, an upper bound.",
            "Caches are not dropped: the registry serves blobs from the page cache. Registry, "
            f"nginx, tool and harness share {self.machine.get('cpus_usable', '?')} CPU(s).",
        ]
        if "pyfloor" in opts.tools:
            notes.append(
                "pyfloor: benchmarks/pyfloor.py, the whole image with the least work a CPython "
                "puller does (one pycurl connection per blob, all at once, hashed as it lands, "
                "fsynced as it ends; no command line, store or checks beyond the digests), run by "
                "fastpull's own interpreter: on a small image, fastpull's wall time above this "
                "row is fastpull's own fixed cost (on a big one, one connection per blob is no "
                "floor)."
            )
        if "capped" in opts.scenarios:
            notes.append(
                f"capped: every tool pulls through nginx with limit_rate {opts.cap_mbps:g} MB/s "
                "per connection (per request; HTTP/1.1 carries one request per connection at a "
                "time)."
            )
        if "slow" in opts.scenarios:
            notes.append(
                f"slow: the same with limit_rate {opts.slow_mibps:g} MiB/s per connection, as a "
                "CDN edge or a long lossy path gives each TCP connection."
            )
        if "faulty" in opts.scenarios:
            notes.append(
                f"faulty: every tool pulls through a Python proxy that breaks "
                f"{opts.fault_share:.0%} of blob GETs (reset or short body part-way, 503, 429)."
            )
        if "tls" in opts.scenarios:
            notes.append(
                "tls: straight to a registry serving HTTPS (a trustme CA every tool is told to "
                "trust; skopeo through --src-cert-dir)."
            )
        notes.append(
            f"outputs: written under {opts.scratch or tempfile.gettempdir()}; fastpull fsyncs "
            "every blob, curl and aria2c sync nothing (the disk row: dd, write then fsync)."
        )
        if opts.fastpull_args:
            notes.append(f"fastpull options: {shlex.join(opts.fastpull_args)}")
        if "fastpull" in opts.tools:
            notes.append(self._stats_note())
        load = self.machine.get("load_average_at_start")
        if load is not None:
            notes.append(
                f"load average when the harness started: {load[0]:.2f} (1 min), "
                f"{load[1]:.2f} (5 min); anything else running skews the numbers."
            )
        notes += [f"warning: {w}" for w in self.warnings]
        return notes

    def _stats_note(self) -> str:
        if not self.fastpull_stats:
            return "fastpull --stats: not supported by this fastpull; runs recorded without it."
        per_run = [r.stats for r in self.results if r.tool == "fastpull" and r.stats]
        if not per_run:
            return "fastpull --stats: no stats file was written."
        blobs = [b for stats in per_run for b in stats.get("blobs", [])]
        connections = max((int(b.get("connections") or 0) for b in blobs), default=0)
        retries = sum(int(b.get("retries") or 0) for b in blobs)
        return (
            f"fastpull --stats ({len(per_run)} runs): up to {connections} connections per blob, "
            f"{retries} retries in total."
        )


def warm(registry: RegistryServer) -> None:
    """Read every file the registry stores back into the page cache."""
    assert registry.storage_path is not None
    for path in sorted(registry.storage_path.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                while fh.read(8 * MIB):
                    pass


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return "<no output>"
    return " | ".join(text.strip().splitlines()[-lines:]) or "<no output>"


def machine_info(env: dict[str, str], options: Options) -> dict[str, Any]:
    """What the numbers depend on: CPUs, memory, kernel and the versions of every program."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
                break
    programs = [*options.tools, "docker-registry"]
    if set(CAPPED_SCENARIOS) & set(options.scenarios):
        programs.append("nginx")
    return {
        "cpu_model": cpu_model,
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": mem_total,
        # Other work on the machine skews every number; the load says whether there was any.
        "load_average_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {program: tool_version(program, env) for program in programs},
    }


if __name__ == "__main__":
    sys.exit(main())
