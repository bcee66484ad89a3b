"""kdumpd.journal: stderr without journald, sd_notify only with $NOTIFY_SOCKET (and
systemd-python)."""

from __future__ import annotations

import logging
import socket

import pytest

from kdumpd import journal


def test_notify_without_socket_does_nothing(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert journal.notify(ready=True, status="x") is False


def test_notify_sends_ready_and_status(monkeypatch, tmp_path) -> None:
    pytest.importorskip("systemd.daemon")
    path = str(tmp_path / "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        assert journal.notify(ready=True, status="serving 1 GiB\n(2 copies)") is True
        msg = srv.recv(4096).decode()
    finally:
        srv.close()
    assert msg.splitlines() == ["READY=1", "STATUS=serving 1 GiB (2 copies)"]
    assert journal.notify() is False  # nothing to say


def test_stderr_when_no_journal(tmp_path, capsys) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        where = journal.setup_logging("info", use_journal=False)
        assert where == "stderr"
        logging.getLogger("kdumpd.test").info("hello %d", 7)
        assert "kdumpd: INFO: hello 7" in capsys.readouterr().err
        assert journal.journal_present(str(tmp_path / "no-socket")) is False
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
