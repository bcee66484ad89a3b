"""The run directory: its creation, the one-daemon lock, and ``state.json``.

Run directory (mode 0700, default /run/kdumpd)::

    kdumpd.pid    the daemon's pid, flock()ed while it serves (one daemon per directory)
    runconf.json  what the plugin serves (kdumpd.serve.runconf)
    state.json    pids, socket, device, swap/mount: what teardown must undo (:class:`State`)
    status.json   the plugin's counters, rewritten atomically every second
    error.json    the plugin's startup failure, if any
    report.json   the post-mortem report (also written to the configured ``report`` path)
    kdumpd.sock   the NBD socket (mode 0600), unless --socket says otherwise

Light (no planner, no store): the supervisor imports it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kdumpd import __version__
from kdumpd.errors import ConfigError, KdumpdError, NotRunningError, RefusedError, ServeError
from kdumpd.jsonfile import atomic_write_json, read_json
from kdumpd.nbd.sockpath import remove_if_stale

__all__ = ["PIDFILE", "REPORT", "RUNCONF", "STATE", "STATUS", "State", "make_run_dir",
           "read_state", "release_pidfile", "remove_run_files", "run_dir_lock"]

PIDFILE = "kdumpd.pid"
RUNCONF = "runconf.json"
STATE = "state.json"
STATUS = "status.json"
REPORT = "report.json"


def make_run_dir(run_dir: str) -> None:
    """Create the run directory (mode 0700); a place that cannot be one is a ConfigError."""
    real = os.path.realpath(run_dir)
    for top in ("/proc", "/sys"):
        if real == top or real.startswith(top + "/"):
            raise ConfigError(f"run directory {run_dir}: under {top}, a kernel interface")
    try:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        os.chmod(run_dir, 0o700)
    except FileExistsError:
        raise ConfigError(f"run directory {run_dir}: exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"run directory {run_dir}: {exc.strerror}"
                          + (f" ({exc.filename})" if exc.filename != run_dir else "")) from None


@contextlib.contextmanager
def run_dir_lock(run_dir: str,
                 on_write_error: Callable[[KdumpdError], None] | None = None) -> Iterator[int]:
    """Hold ``kdumpd.pid``'s flock with this process's pid in it, or refuse (exit 6) naming
    the daemon that holds it. Yields the locked descriptor (the supervisor inherits it); on
    exit the pid file is removed while still locked, so no dead pid file is left behind."""
    path = os.path.join(run_dir, PIDFILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"run directory {run_dir}: cannot open {path}: {exc.strerror}") \
            from None
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            other = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise RefusedError(f"another kdumpd (pid {other or '?'}) serves from {run_dir}") \
                from None
        locked = True
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full run directory (ENOSPC) or a failing disk
            err = ServeError(f"run directory {run_dir}: cannot write {path}: {exc.strerror}")
            if on_write_error is not None:  # nobody else's report is there to keep
                on_write_error(err)
            raise err from None
        yield fd
    finally:
        if locked:
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)


def release_pidfile(run_dir: str, lock_fd: int | None) -> None:
    """Remove ``kdumpd.pid``: with ``lock_fd`` (ours, inherited by the supervisor) while its
    lock is still held, then close it; without, only if no process holds the lock (the daemon
    that wrote it is gone)."""
    path = os.path.join(run_dir, PIDFILE)
    if lock_fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.close(lock_fd)
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)  # locked by us: nobody serves from here
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_run_files(run_dir: str, socket: str | None) -> None:
    """Remove what only a serving daemon needs (state.json, runconf.json) and the socket if it
    is stale (never one another server answers on). The report and status stay."""
    for name in (STATE, RUNCONF):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(run_dir, name))
    if socket:
        remove_if_stale(socket)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class State:
    """``state.json``: what is set up (what teardown must undo) and what ``status`` shows.

    Written by the daemon after every step that sets something up, read by the supervisor
    after the exec and by ``status`` and ``stop``. Teardown clears each field as it undoes it.
    """

    socket: str
    use_as: str = "none"
    report: str = ""
    log_level: str = "info"
    started: float = 0.0
    daemon_pid: int | None = None
    nbdkit_pid: int | None = None
    device: str | None = None
    swap_on: bool = False
    mounted: str | None = None
    ready_seconds: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {
            "daemon_pid": self.daemon_pid,
            "nbdkit_pid": self.nbdkit_pid,
            "socket": self.socket,
            "device": self.device,
            "as": self.use_as,
            "swap_on": self.swap_on,
            "mounted": self.mounted,
            "report": self.report,
            "log_level": self.log_level,
            "started": round(self.started, 3),
            "version": self.version,
            "ready_seconds": self.ready_seconds,
            "phases": dict(self.phases),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> State:
        """Tolerant: a missing or mistyped field reads as "not set up"."""
        def text(key: str) -> str | None:
            value = doc.get(key)
            return str(value) if value else None

        return cls(
            socket=str(doc.get("socket") or ""),
            use_as=str(doc.get("as") or "none"),
            report=str(doc.get("report") or ""),
            log_level=str(doc.get("log_level") or "info"),
            started=float(doc.get("started") or 0.0),
            daemon_pid=_int_or_none(doc.get("daemon_pid")),
            nbdkit_pid=_int_or_none(doc.get("nbdkit_pid")),
            device=text("device"),
            swap_on=bool(doc.get("swap_on")),
            mounted=text("mounted"),
            ready_seconds=doc.get("ready_seconds"),
            phases=dict(doc.get("phases") or {}),
            version=str(doc.get("version") or ""),
        )

    def save(self, run_dir: str) -> None:
        atomic_write_json(os.path.join(run_dir, STATE), self.to_json())


def read_state(run_dir: str) -> State:
    """The serving daemon's state, or NotRunningError saying why nothing runs (the last
    report's refusal, if there is one)."""
    path = os.path.join(run_dir, STATE)
    if not os.path.exists(path):
        hint = ""
        report = os.path.join(run_dir, REPORT)
        if os.path.exists(report):
            hint = f" (last report: {report})"
            with contextlib.suppress(KdumpdError):
                last = read_json(report)
                if last.get("state") == "refused":
                    hint = f" (refused: {last.get('reason')})"
        raise NotRunningError(f"kdumpd is not running in {run_dir}{hint}")
    doc = read_json(path)
    try:
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        return State.from_json(doc)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a kdumpd state file: {exc}") from None
