"""Ctrl-C and SIGTERM, turned into a flag that the transfer loops poll.

A signal handler that raises would fire inside a libcurl callback, where pycurl swallows
the exception; so the handler only records the signal, and the loops (which wake at
least every 0.2 s) raise :class:`~fastpull.errors.Interrupted` at a safe point. Data
committed stays; nothing half-written reaches ``blobs/`` or ``index.json``.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from fastpull.errors import Interrupted

_received: int | None = None
_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _handler(signum: int, _frame: FrameType | None) -> None:
    global _received
    _received = signum


def pause(seconds: float, sleep: Callable[[float], None] = time.sleep) -> None:
    """Sleep ``seconds`` in slices, so that a stop requested meanwhile (Ctrl-C during a
    backoff) is raised at once rather than after the whole wait."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        check()
        sleep(min(left, 0.2))
    check()


def request(signum: int = signal.SIGINT) -> None:
    """Stop the loops as if ``signum`` had arrived: how a cluster task is told to stop by a
    thread that watches for the client's request."""
    global _received
    _received = signum


def clear() -> None:
    """Forget a stop request (a cluster worker goes on with its next task)."""
    global _received
    _received = None


def check() -> None:
    """Raise Interrupted if a stop was requested since the handlers were installed."""
    if _received is not None:
        name = "interrupted" if _received == signal.SIGINT else "terminated"
        raise Interrupted(
            f"{name}; completed blobs stay in the store, partial downloads resume next time",
            exit_code=_EXIT_CODES.get(_received, 130),
        )


@contextmanager
def handled(*, ignore_after_stop: bool = False) -> Iterator[None]:
    """Install the flag-setting handlers (main thread only; elsewhere a no-op).

    With ``ignore_after_stop`` (a command line about to exit), once a stop was requested
    further SIGINT/SIGTERM are ignored instead of the old handlers coming back, so that a
    second Ctrl-C during the last cleanup and message cannot end in a traceback.
    """
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    previous = {sig: signal.signal(sig, _handler) for sig in _EXIT_CODES}
    try:
        yield
    finally:
        stopped = _received is not None
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_IGN if stopped and ignore_after_stop else old)
        _received = None
