"""Docker-style output: sizes, bars and the lines a pull prints."""

from __future__ import annotations

import io

import orjson

from fastpull import events
from fastpull.progress import JSONRenderer, LineRenderer, QuietRenderer, human_size, progress_bar
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
