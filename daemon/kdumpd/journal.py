"""Logging setup (journald when present, stderr otherwise) and sd_notify.

Both speak systemd's datagram protocols directly (a few lines each), so kdumpd needs no
systemd-python: in the capture kernel every library is memory taken from the reservation.
Without a journal socket logs go to stderr; without ``$NOTIFY_SOCKET``, :func:`notify` does
nothing. Library modules never configure logging: the daemon calls :func:`setup_logging` once,
and the nbdkit plugin logs to stderr (nbdkit passes its stderr on).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys

__all__ = ["JOURNAL_SOCKET", "JournalHandler", "journal_present", "notify", "setup_logging"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_FORMAT = "kdumpd: %(levelname)s: %(message)s"
# logging level -> syslog priority (journald's PRIORITY=).
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
             (logging.INFO, 6), (logging.NOTSET, 7))


def journal_present(socket_path: str = JOURNAL_SOCKET) -> bool:
    """True if journald listens here."""
    return os.path.exists(socket_path)


def journal_fields(fields: dict[str, str]) -> bytes:
    """journald's native datagram: ``KEY=value`` lines, or ``KEY\\n<le64 size>value\\n`` for
    a value holding a newline."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record to journald with its priority and SYSLOG_IDENTIFIER; a record that
    cannot be sent (journald gone, message too large) goes to stderr instead."""

    def __init__(self, identifier: str, socket_path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            priority = next(p for level, p in _PRIORITY if record.levelno >= level)
            data = journal_fields({"MESSAGE": message, "PRIORITY": str(priority),
                                   "SYSLOG_IDENTIFIER": self.identifier})
            self._sock.sendto(data, self.socket_path)
        except OSError:
            sys.stderr.write(f"{self.identifier}: {record.getMessage()}\n")
        except Exception:  # logging must never raise into the caller
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


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
    if use_journal:
        handler = JournalHandler(identifier)
        handler.setFormatter(logging.Formatter("%(message)s"))
        where = "journal"
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        where = "stderr"
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return where


def notify(*, ready: bool = False, stopping: bool = False, status: str | None = None,
           mainpid: int | None = None) -> bool:
    """Send READY=1 / STOPPING=1 / STATUS= / MAINPID= to systemd; True if sent.

    Does nothing (False) without ``$NOTIFY_SOCKET``; an abstract socket is written ``@name``.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
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
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False
    return True
