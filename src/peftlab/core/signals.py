"""Stopping on SIGTERM and SIGINT: one line and a resumable state, never a traceback or a half-written file.

A scheduler, a container stop or Ctrl-C asks a run or a study to stop. Inside `stop_on_signals()` either signal
raises `Stopped`, a `PeftlabError` whose exit code is 128 + the signal number (143 for SIGTERM, 130 for SIGINT, what
a shell reports for a process the signal killed), so the CLI prints one line. Every file write is atomic
(`core.files`), so the exception can land anywhere outside a `stop_deferred()` block.

Inside `stop_deferred()` (the training loop) a signal is only noted: the loop checks `stop_pending()` between
steps, saves a checkpoint there and raises `Stopped` itself, so the next `--resume` continues from that very step.
A second signal while one is pending changes nothing; SIGKILL is the way to stop without a checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from peftlab.core.errors import PeftlabError

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state = {"defer": 0, "pending": None}


class Stopped(PeftlabError):
    """SIGTERM or SIGINT stopped the command; the exit code is 128 + the signal number."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        super().__init__(message or f"stopped by {signal_name(signum)}")
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _handler(signum: int, frame) -> None:
    if _state["defer"]:
        _state["pending"] = _state["pending"] or signum  # the first signal names the stop
        return
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Stopped` in this block (the handlers before it come back after it).

    Only the main thread can set handlers; elsewhere (a server's worker thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def stop_deferred() -> Iterator[None]:
    """A signal in this block is noted, not raised; leaving the block raises it if nobody did."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
    signum = stop_pending()
    if signum is not None and not _state["defer"]:
        _state["pending"] = None
        raise Stopped(signum)


def stop_pending() -> int | None:
    """The signal that asked for a stop inside `stop_deferred()`, or None."""
    return _state["pending"]


def take_stop() -> int | None:
    """The pending signal, cleared: for the code that now stops because of it."""
    signum, _state["pending"] = _state["pending"], None
    return signum
