"""Signals as exceptions (borg-style), so SIGTERM runs the same teardown as any failure.

SIGTERM, SIGINT and SIGHUP raise :class:`Terminate` in the main thread while serving; during
teardown a second one is logged and ignored, so swapoff is never abandoned half-way. The
daemon and the supervisor it execs both use this.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

__all__ = ["SIGNALS", "Terminate", "defer_signals", "raise_on_signals", "restore_signals"]

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

log = logging.getLogger(__name__)


class Terminate(BaseException):
    """SIGTERM/SIGINT/SIGHUP, raised in the main thread so teardown runs normally."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Terminate(signum)


def _note(signum: int, frame: FrameType | None) -> None:
    log.warning("%s during teardown: finishing teardown first", signal.Signals(signum).name)


def raise_on_signals() -> dict[int, Any]:
    """Make each of :data:`SIGNALS` raise :class:`Terminate`; the handlers replaced."""
    return {sig: signal.signal(sig, _raise) for sig in SIGNALS}


def defer_signals() -> None:
    """From here on (teardown), a signal is noted, not raised."""
    for sig in SIGNALS:
        signal.signal(sig, _note)


def restore_signals(old: dict[int, Any]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)
