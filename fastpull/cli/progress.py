"""Pull events rendered for people and programs: docker's lines, live bars, JSON.

- :class:`LineRenderer`: what ``docker pull`` prints when its output is not a terminal.
- :class:`TerminalRenderer`: the same lines redrawn in place, with progress bars.
- :class:`JSONRenderer`: one JSON object per event (``--json``).
- :class:`QuietRenderer`: only the image reference at the end (``-q``).

For a batch (``pull -f``): :class:`BatchLineRenderer` prints one line per image as it is
stored or fails, :class:`BatchTerminalRenderer` adds an overall bar (images, bytes, rate,
ETA) redrawn under those lines, and :func:`summary_table` is the table printed at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import orjson

from fastpull import events

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")
Clock = Callable[[], float]


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
        elif isinstance(event, events.PushStarted):
            self._print(f"The push refers to repository [{event.repository}]")
        elif isinstance(event, events.PushFinished):
            self._print(f"{event.tag}: digest: {event.digest} size: {event.size}")

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
            moving = event.state in (events.DOWNLOADING, events.PUSHING)
            if moving and event.total:
                text = f"{event.state} {progress_bar(event.current, event.total)}"
            self._lines[key] = f"{key}: {text}"
            now = time.monotonic()
            if not moving or now - self._last_draw >= 0.1:
                self._redraw()
                self._last_draw = now
            return
        if isinstance(event, events.PullFinished | events.PushFinished):
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
        elif isinstance(event, events.PullFinished):
            record = {
                "event": "pull-finished",
                "reference": event.reference,
                "digest": str(event.digest),
                "status": "up-to-date" if event.up_to_date else "downloaded",
            }
        elif isinstance(event, events.PushStarted):
            record = {"event": "push-started", "repository": event.repository}
        elif isinstance(event, events.PushFinished):
            record = {
                "event": "push-finished",
                "reference": event.reference,
                "tag": event.tag,
                "digest": str(event.digest),
                "size": event.size,
            }
        elif isinstance(event, events.BatchPlanned):
            record = {
                "event": "batch-planned",
                "images": event.images,
                "blobs": event.blobs,
                "bytes": event.bytes_total,
            }
        elif isinstance(event, events.ImageDone):
            record = {
                "event": "image-done",
                "reference": event.reference,
                "status": event.status,
                "new_bytes": event.new_bytes,
                "reused_bytes": event.reused_bytes,
                "seconds": round(event.seconds, 3),
                "error": event.error or None,
            }
        elif isinstance(event, events.BatchFinished):
            record = {
                "event": "batch-finished",
                "images": event.images,
                "failed": event.failed,
                "bytes": event.bytes_downloaded,
                "seconds": round(event.seconds, 3),
            }
        else:
            return  # BlobHashed: for programs, not a line of output
        self.out.write(orjson.dumps(record).decode() + "\n")
        self.out.flush()


class QuietRenderer:
    """``-q``: only the full reference of each pulled image."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.PullFinished | events.PushFinished) or (
            isinstance(event, events.ImageDone) and event.status in _STORED
        ):
            self.out.write(event.reference + "\n")
            self.out.flush()


_STORED = (events.DOWNLOADED, events.UP_TO_DATE, events.COPIED)


def _done_line(event: events.ImageDone) -> str:
    if event.status in _STORED:
        return (
            f"{event.reference}: {event.status} (new {human_size(event.new_bytes)}, "
            f"reused {human_size(event.reused_bytes)}, {event.seconds:.1f}s)"
        )
    return f"{event.reference}: {event.status}: {event.error}"


class BatchLineRenderer:
    """A batch without a terminal: the plan, then one line per image as it ends."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.BatchPlanned):
            self._print(
                f"Pulling {event.images} images: {event.blobs} blobs to download "
                f"({human_size(event.bytes_total)})"
            )
        elif isinstance(event, events.ImageDone):
            self._print(_done_line(event))

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


class BatchTerminalRenderer(BatchLineRenderer):
    """A batch on a terminal: the per-image lines scroll above one overall bar
    (``[===>  ] 12/50 images  1.2GB/3.4GB  45.6MB/s  ETA 30s``), redrawn at most 10 times/s."""

    def __init__(self, out: TextIO | None = None, clock: Clock = time.monotonic) -> None:
        super().__init__(out)
        self._clock = clock
        self._images = 0
        self._done = 0
        self._bytes_total = 0
        self._received: dict[str, int] = {}
        self._started: float | None = None
        self._last_draw = 0.0
        self._bar_shown = False

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.BatchPlanned):
            self._images += event.images
            self._bytes_total += event.bytes_total
            if self._started is None:
                self._started = self._clock()
            self._print_above(
                f"Pulling {event.images} images: {event.blobs} blobs to download "
                f"({human_size(event.bytes_total)})"
            )
        elif isinstance(event, events.ImageDone):
            self._done += 1
            if self._started is None:
                self._images += 1  # failed before the plan: not counted in it
            self._print_above(_done_line(event))
        elif isinstance(event, events.LayerEvent):
            key = str(event.digest)
            if event.state in (events.DOWNLOADING, events.VERIFYING, events.DOWNLOAD_COMPLETE):
                self._received[key] = max(self._received.get(key, 0), event.current)
            now = self._clock()
            if now - self._last_draw >= 0.1:
                self._last_draw = now
                self._draw()
        elif isinstance(event, events.BatchFinished):
            self._draw()
            self.out.write("\n")
            self.out.flush()
            self._bar_shown = False

    def bar(self) -> str:
        """The overall bar as it is now."""
        done = sum(self._received.values())
        elapsed = self._clock() - self._started if self._started is not None else 0.0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = max(0, self._bytes_total - done)
        eta = f"ETA {left / rate:.0f}s" if rate > 0 and left else ""
        images = f"{self._done}/{self._images} images"
        return (
            f"{progress_bar(done, self._bytes_total, 30)} {images}  "
            f"{human_size(rate)}/s  {eta}".rstrip()
        )

    def _print_above(self, line: str) -> None:
        clear = "\r\x1b[2K" if self._bar_shown else ""
        self.out.write(f"{clear}{line}\n")
        self._bar_shown = False
        self._draw()

    def _draw(self) -> None:
        if self._started is None:
            return
        self.out.write(f"\r\x1b[2K{self.bar()}")
        self.out.flush()
        self._bar_shown = True


def summary_table(rows: Sequence[events.ImageDone]) -> list[str]:
    """The end-of-batch table: image, status, new bytes, reused bytes, seconds."""
    table = [("IMAGE", "STATUS", "NEW", "REUSED", "SECONDS")]
    for row in rows:
        table.append(
            (
                row.reference,
                row.status,
                human_size(row.new_bytes),
                human_size(row.reused_bytes),
                f"{row.seconds:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    return ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]


def renderer_for(
    *, quiet: bool, json_output: bool, out: TextIO | None = None, batch: bool = False
) -> events.Listener:
    """The renderer the CLI options, the kind of pull and the terminal call for."""
    stream = out or sys.stdout
    if json_output:
        return JSONRenderer(stream)
    if quiet:
        return QuietRenderer(stream)
    if batch:
        return BatchTerminalRenderer(stream) if stream.isatty() else BatchLineRenderer(stream)
    if stream.isatty():
        return TerminalRenderer(stream)
    return LineRenderer(stream)
