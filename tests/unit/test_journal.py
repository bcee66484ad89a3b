"""kdumpd.journal speaks systemd's notify and journald datagram protocols itself: stderr without
journald, sd_notify only with $NOTIFY_SOCKET (a path or an abstract @name)."""

from __future__ import annotations

import logging
import socket

from kdumpd import journal


def test_notify_without_socket_does_nothing(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert journal.notify(ready=True, status="x") is False


def test_notify_sends_ready_and_status(monkeypatch, tmp_path) -> None:
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


def test_notify_abstract_socket(monkeypatch) -> None:
    name = f"kdumpd-test-{id(monkeypatch)}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind("\0" + name)
    srv.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert journal.notify(stopping=True, mainpid=42) is True
        assert srv.recv(4096).decode().splitlines() == ["STOPPING=1", "MAINPID=42"]
    finally:
        srv.close()


def test_journal_datagrams(tmp_path) -> None:
    """Each record is one native-protocol datagram; a multi-line message uses the sized form."""
    path = str(tmp_path / "journal")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(5)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        journal.setup_logging("info", use_journal=False)  # reset, then our handler alone
        handler = journal.JournalHandler("kdumpd-test", socket_path=path)
        root.handlers[:] = [handler]
        logging.getLogger("kdumpd.test").warning("one line %d", 1)
        logging.getLogger("kdumpd.test").error("two\nlines")
        first, second = srv.recv(65536), srv.recv(65536)
        handler.close()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        srv.close()
    assert first.split(b"\n")[:3] == [b"MESSAGE=one line 1", b"PRIORITY=4",
                                       b"SYSLOG_IDENTIFIER=kdumpd-test"]
    size = len(b"two\nlines")
    assert second.startswith(b"MESSAGE\n" + size.to_bytes(8, "little") + b"two\nlines\n")
    assert b"PRIORITY=3\n" in second


def test_journal_gone_falls_back_to_stderr(tmp_path, capsys) -> None:
    handler = journal.JournalHandler("kdumpd-test", socket_path=str(tmp_path / "none"))
    handler.emit(logging.makeLogRecord({"msg": "lost?", "levelno": logging.INFO}))
    handler.close()
    assert "kdumpd-test: lost?" in capsys.readouterr().err
