"""Processes by pid: alive or not, what they cost in memory (from /proc), and stopping one.

Light on purpose (``os``, ``signal``, ``time``): the supervisor and the plugin import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

__all__ = ["alive", "process_pss", "process_rss", "stop_process"]

log = logging.getLogger(__name__)


def alive(pid: object) -> bool:
    """True if ``pid`` (any value read from a state file) names a live process; a zombie
    (exited, not yet reaped by its parent) counts as gone."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _kib_field(path: str, field: str) -> int:
    """The ``FIELD:  N kB`` line of a /proc file in bytes (0 if unknown)."""
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def process_rss(pid: int | str = "self", field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/PID/status in bytes (0 if unknown): ``VmRSS``
    (all resident pages), ``RssAnon`` (its own heap and stacks, without file or shared
    mappings such as an image backend's), ``VmLck`` (mlocked)."""
    return _kib_field(f"/proc/{pid}/status", field)


def process_pss(pid: int | str = "self") -> int:
    """Proportional set size of a process in bytes (0 if unknown), from smaps_rollup: what it
    costs with the pages it shares (libpython, libc) split among their users."""
    return _kib_field(f"/proc/{pid}/smaps_rollup", "Pss")


_NOT_OURS = object()


def _reap(pid: int) -> object:
    """The exit status if our child ``pid`` has exited (reaped here), None if it runs,
    ``_NOT_OURS`` if it is no child of this process."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return _NOT_OURS
    return None if got == 0 else os.waitstatus_to_exitcode(status)


def stop_process(pid: int, name: str = "nbdkit", timeout: float = 30.0) -> int | None:
    """SIGTERM ``pid`` and wait for it to go.

    Our child (nbdkit, under the daemon or the supervisor that replaced it): reaped, SIGKILLed
    if it ignores SIGTERM for ``timeout`` seconds, and its exit status returned (negative: the
    signal). Not our child (``kdumpd stop`` cleaning up after a daemon that died): waited for up
    to ``timeout`` seconds and never killed harder; None, as its status is not ours to read.
    """
    status = _reap(pid)
    if status is _NOT_OURS:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        return None
    if isinstance(status, int):
        return status
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _reap(pid)
        if isinstance(status, int):
            return status
        if status is _NOT_OURS:
            return None
        time.sleep(0.05)
    log.error("%s ignored SIGTERM for %.0f s: killing it", name, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _, wstatus = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wstatus)
