"""Where the time to READY goes: named phases, measured on the monotonic clock.

Every second before READY is a second the capture waits, so ``kdumpd serve`` records each step
(interpreter start-up and imports, planning, self-test, nbdkit, attach, mkswap/swapon) and puts
them in its report and status. The first phase, ``startup``, is measured from the process's own
start time in /proc (what the interpreter and the imports cost before ``main`` runs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Phases", "process_age"]


def process_age(pid: int | None = None) -> float | None:
    """Seconds since the process started (``starttime`` in /proc/PID/stat against the boot
    clock), or None where /proc does not say."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5)
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start)
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Ordered ``name -> seconds``; a name measured twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.monotonic()
        age = process_age()
        if age is not None:
            self.seconds["startup"] = round(age, 3)
        self._origin = self._t0 - (age or 0.0)

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 3)

    def total(self) -> float:
        """Seconds from the process's start until now."""
        return round(time.monotonic() - self._origin, 3)

    def to_json(self) -> dict[str, float]:
        return dict(self.seconds)
