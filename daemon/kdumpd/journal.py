"""Logging setup (journald when present, stderr otherwise) and sd_notify: the only systemd import.

systemd-python (Debian's python3-systemd) is optional. Without it, or without a journal
socket, logs go to stderr; without it, or without ``$NOTIFY_SOCKET``, :func:`notify` does
nothing. Library modules never configure logging: the daemon calls :func:`setup_logging` once,
and the nbdkit plugin logs to stderr (nbdkit passes its stderr on).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

__all__ = ["JOURNAL_SOCKET", "journal_present", "notify", "setup_logging"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_FORMAT = "kdumpd: %(levelname)s: %(message)s"


def _systemd_module(name: str) -> Any:
    try:
        if name == "journal":
            from systemd import journal

            return journal
        from systemd import daemon

        return daemon
    except ImportError:
        return None


def journal_present(socket_path: str = JOURNAL_SOCKET) -> bool:
    """True if journald listens here and systemd-python can talk to it."""
    return os.path.exists(socket_path) and _systemd_module("journal") is not None


def setup_logging(
    level: int | str = logging.INFO,
    *,
    use_journal: bool | None = None,
    identifier: str = "kdumpd",
) -> str:
    """Configure the root logger once (replacing earlier handlers); return "journal" or
    "stderr". ``use_journal`` None means: the journal if present."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    if use_journal is None:
        use_journal = journal_present()
    handler: logging.Handler
    where = "stderr"
    if use_journal:
        journal = _systemd_module("journal")
        if journal is not None:
            handler = journal.JournalHandler(SYSLOG_IDENTIFIER=identifier)
            handler.setFormatter(logging.Formatter("%(message)s"))
            where = "journal"
    if where == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return where


def notify(*, ready: bool = False, stopping: bool = False, status: str | None = None,
           mainpid: int | None = None) -> bool:
    """Send READY=1 / STOPPING=1 / STATUS= / MAINPID= to systemd; True if sent.

    Does nothing (False) without ``$NOTIFY_SOCKET`` or without systemd-python.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    daemon = _systemd_module("daemon")
    if daemon is None:
        return False
    lines = []
    if ready:
        lines.append("READY=1")
    if stopping:
        lines.append("STOPPING=1")
    if mainpid is not None:
        lines.append(f"MAINPID={mainpid}")
    if status is not None:
        lines.append("STATUS=" + status.replace("\n", " "))
    if not lines:
        return False
    return bool(daemon.notify("\n".join(lines)))
