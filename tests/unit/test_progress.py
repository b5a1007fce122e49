"""Docker-style output: sizes, bars and the lines a pull prints."""

from __future__ import annotations

import io

import orjson

from fastpull import events
from fastpull.cli.progress import (
    BatchLineRenderer,
    BatchTerminalRenderer,
    JSONRenderer,
    LineRenderer,
    QuietRenderer,
    human_size,
    progress_bar,
    summary_table,
)
from fastpull.types import Digest

D = Digest("sha256", "ab" * 32)


def test_human_size_matches_docker() -> None:
    assert human_size(0) == "0B"
    assert human_size(999) == "999B"
    assert human_size(2048) == "2.05kB"
    assert human_size(45_600_000) == "45.6MB"
    assert human_size(1_230_000_000) == "1.23GB"


def test_progress_bar() -> None:
    assert progress_bar(0, 100, width=10) == "[>          ] 0B/100B"
    assert progress_bar(50, 100, width=10) == "[=====>     ] 50B/100B"
    assert progress_bar(100, 100, width=10) == "[==========>] 100B/100B"


def _run(renderer: object, out: io.StringIO) -> str:
    for event in [
        events.PullStarted("docker.io/library/debian:latest", "latest", "library/debian", True),
        events.LayerEvent(D, events.PULLING),
        events.LayerEvent(D, events.DOWNLOADING, 0, 10),
        events.LayerEvent(D, events.DOWNLOADING, 5, 10),
        events.LayerEvent(D, events.VERIFYING, 10, 10),
        events.LayerEvent(D, events.PULL_COMPLETE, 10, 10),
        events.PullFinished("docker.io/library/debian:latest", "debian:latest", D, False),
    ]:
        renderer(event)  # type: ignore[operator]
    return out.getvalue()


def test_line_renderer_prints_docker_lines() -> None:
    out = io.StringIO()
    assert _run(LineRenderer(out), out).splitlines() == [
        "Using default tag: latest",
        "latest: Pulling from library/debian",
        "abababababab: Pulling fs layer",
        "abababababab: Downloading",
        "abababababab: Verifying Checksum",
        "abababababab: Pull complete",
        f"Digest: {D}",
        "Status: Downloaded newer image for debian:latest",
        "docker.io/library/debian:latest",
    ]


def test_json_and_quiet_renderers() -> None:
    out = io.StringIO()
    records = [orjson.loads(line) for line in _run(JSONRenderer(out), out).splitlines()]
    assert records[0]["event"] == "pull-started"
    assert records[-1] == {
        "event": "pull-finished",
        "reference": "docker.io/library/debian:latest",
        "digest": str(D),
        "status": "downloaded",
    }
    assert {r["status"] for r in records if r["event"] == "layer"} >= {"Downloading"}
    quiet = io.StringIO()
    assert _run(QuietRenderer(quiet), quiet) == "docker.io/library/debian:latest\n"


# -- batches -----------------------------------------------------------------------------------

_DONE = events.ImageDone("r/a:1", events.DOWNLOADED, 2_000_000, 500_000, 1.25)
_FAILED = events.ImageDone("r/b:1", events.FAILED, error="manifest unknown")


def test_batch_lines_say_what_became_of_each_image() -> None:
    out = io.StringIO()
    render = BatchLineRenderer(out)
    for event in (
        events.BatchPlanned(2, 3, 4_500_000),
        events.LayerEvent(D, events.DOWNLOADING, 10, 100),
        _DONE,
        _FAILED,
    ):
        render(event)
    assert out.getvalue().splitlines() == [
        "Pulling 2 images: 3 blobs to download (4.5MB)",
        "r/a:1: downloaded (new 2MB, reused 500kB, 1.2s)",
        "r/b:1: failed: manifest unknown",
    ]


def test_batch_bar_counts_images_bytes_rate_and_eta() -> None:
    now = [100.0]
    out = io.StringIO()
    render = BatchTerminalRenderer(out, clock=lambda: now[0])
    render(events.BatchPlanned(4, 2, 1000))
    now[0] = 102.0
    render(events.LayerEvent(D, events.DOWNLOADING, 400, 600))
    render(_DONE)
    bar = render.bar()
    assert "1/4 images" in bar
    assert "400B/1kB" in bar
    assert "200B/s" in bar
    assert bar.endswith("ETA 3s")
    assert "r/a:1: downloaded" in out.getvalue()


def test_batch_json_events() -> None:
    out = io.StringIO()
    render = JSONRenderer(out)
    render(events.BatchPlanned(2, 3, 10))
    render(_FAILED)
    render(events.BatchFinished(2, 1, 10, 0.5))
    records = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["batch-planned", "image-done", "batch-finished"]
    assert records[1]["error"] == "manifest unknown"
    assert records[2]["failed"] == 1


def test_quiet_batch_prints_only_stored_images() -> None:
    out = io.StringIO()
    render = QuietRenderer(out)
    render(_DONE)
    render(_FAILED)
    assert out.getvalue() == "r/a:1\n"


def test_summary_table_columns() -> None:
    lines = summary_table([_DONE, _FAILED])
    assert lines[0].split() == ["IMAGE", "STATUS", "NEW", "REUSED", "SECONDS"]
    assert lines[1].split() == ["r/a:1", "downloaded", "2MB", "500kB", "1.2"]
    assert lines[2].split() == ["r/b:1", "failed", "0B", "0B", "0.0"]
