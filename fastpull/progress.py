"""Pull events rendered for people and programs: docker's lines, live bars, JSON.

- :class:`LineRenderer`: what ``docker pull`` prints when its output is not a terminal.
- :class:`TerminalRenderer`: the same lines redrawn in place, with progress bars.
- :class:`JSONRenderer`: one JSON object per event (``--json``).
- :class:`QuietRenderer`: only the image reference at the end (``-q``).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import orjson

from . import events

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def human_size(size: float) -> str:
    """Decimal sizes with 3 significant digits, as docker prints them (``45.6MB``)."""
    unit = 0
    while size >= 1000 and unit < len(_UNITS) - 1:
        size /= 1000
        unit += 1
    return f"{size:.3g}{_UNITS[unit]}"


def progress_bar(current: int, total: int, width: int = 50) -> str:
    """``[=====>      ] 12.3MB/45.6MB``, docker's bar (``width`` + 1 characters inside)."""
    if total <= 0:
        return human_size(current)
    filled = max(0, min(width, int(width * current / total)))
    bar = "=" * filled + ">" + " " * (width - filled)
    return f"[{bar}] {human_size(current)}/{human_size(total)}"


class LineRenderer:
    """Plain lines, one per state change (no per-chunk progress)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self._last: dict[str, str] = {}

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.PullStarted):
            if event.default_tag:
                self._print("Using default tag: latest")
            self._print(f"{event.tag_or_digest}: Pulling from {event.repository}")
        elif isinstance(event, events.LayerEvent):
            key = event.digest.short
            if self._last.get(key) == event.state:
                return
            self._last[key] = event.state
            self._print(f"{key}: {event.state}")
        elif isinstance(event, events.PullFinished):
            self._finish(event)

    def _finish(self, event: events.PullFinished) -> None:
        self._print(f"Digest: {event.digest}")
        if event.up_to_date:
            self._print(f"Status: Image is up to date for {event.familiar}")
        else:
            self._print(f"Status: Downloaded newer image for {event.familiar}")
        self._print(event.reference)

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


class TerminalRenderer(LineRenderer):
    """Docker's live display: one line per layer, redrawn in place at most 10 times/s."""

    def __init__(self, out: TextIO | None = None) -> None:
        super().__init__(out)
        self._order: list[str] = []
        self._lines: dict[str, str] = {}
        self._drawn = 0
        self._last_draw = 0.0

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.LayerEvent):
            key = event.digest.short
            if key not in self._lines:
                self._order.append(key)
            text = event.state
            if event.state == events.DOWNLOADING and event.total:
                text = f"{event.state} {progress_bar(event.current, event.total)}"
            self._lines[key] = f"{key}: {text}"
            now = time.monotonic()
            if event.state != events.DOWNLOADING or now - self._last_draw >= 0.1:
                self._redraw()
                self._last_draw = now
            return
        if isinstance(event, events.PullFinished):
            self._redraw()
            self._order.clear()
            self._lines.clear()
            self._drawn = 0
        super().__call__(event)

    def _redraw(self) -> None:
        up = f"\x1b[{self._drawn}A" if self._drawn else ""
        body = "".join(f"\x1b[2K{self._lines[k]}\n" for k in self._order)
        self.out.write(up + body)
        self.out.flush()
        self._drawn = len(self._order)


class JSONRenderer:
    """One JSON object per line; stable keys for scripts."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def __call__(self, event: events.Event) -> None:
        record: dict[str, object]
        if isinstance(event, events.PullStarted):
            record = {
                "event": "pull-started",
                "reference": event.reference,
                "tag": event.tag_or_digest,
                "repository": event.repository,
                "default_tag": event.default_tag,
            }
        elif isinstance(event, events.LayerEvent):
            record = {
                "event": "layer",
                "id": event.digest.short,
                "digest": str(event.digest),
                "status": event.state,
                "current": event.current,
                "total": event.total,
            }
        else:
            record = {
                "event": "pull-finished",
                "reference": event.reference,
                "digest": str(event.digest),
                "status": "up-to-date" if event.up_to_date else "downloaded",
            }
        self.out.write(orjson.dumps(record).decode() + "\n")
        self.out.flush()


class QuietRenderer:
    """``-q``: only the full reference of each pulled image."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.PullFinished):
            self.out.write(event.reference + "\n")
            self.out.flush()


def renderer_for(*, quiet: bool, json_output: bool, out: TextIO | None = None) -> events.Listener:
    """The renderer the CLI options and the terminal call for."""
    stream = out or sys.stdout
    if json_output:
        return JSONRenderer(stream)
    if quiet:
        return QuietRenderer(stream)
    if stream.isatty():
        return TerminalRenderer(stream)
    return LineRenderer(stream)
