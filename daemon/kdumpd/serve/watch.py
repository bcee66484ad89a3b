"""What ``kdumpd serve`` is while it serves: a watcher that imports nothing of kdumpd.

Between READY and the end of the capture the daemon only waits, and every MiB it holds is taken
from the capture it serves. So after READY the daemon ``exec``s this module: the interpreter
with the standard library's ``os`` and ``signal`` only (measured: ~3.5 MiB PSS, against ~9.6
MiB for a supervisor holding the teardown and report code; no STATUS= refreshes, `kdumpd
status` reads the counters). Same pid (systemd's MAINPID,
``state.json``), same children (nbdkit stays its child), the run-directory lock inherited.

It waits for a stop signal or for nbdkit's exit, then ``exec``s :mod:`kdumpd.serve.supervise`,
which imports what the teardown needs and does it, with the reason as its last argument
(``signal:SIGTERM`` or ``nbdkit:STATUS``). The stop signals stay blocked across both execs,
so one sent in between is delivered once a handler is in place, never lost.
"""

from __future__ import annotations

import os
import signal
import sys
import time

__all__ = ["argv_for", "main"]

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_TEARDOWN = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "from kdumpd.serve.supervise import main; sys.exit(main(sys.argv[2:]))")
_WATCH = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from kdumpd.serve.watch import main; sys.exit(main(sys.argv[2:]))")


def argv_for(package_dir: str, run_dir: str, lock_fd: int, nbdkit_pid: int) -> list[str]:
    """The command line the daemon execs at READY: this interpreter, this module."""
    return [sys.executable, "-S", "-c", _WATCH, package_dir, run_dir, str(lock_fd),
            str(nbdkit_pid)]


def _rss_kib() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _nbdkit_exit(pid: int) -> int | None:
    """nbdkit's exit status once it has exited (reaped here), else None."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def wait_for_stop(pid: int, poll: float = 0.2) -> str:
    """Block until a stop signal (``signal:NAME``) or nbdkit's exit (``nbdkit:STATUS``)."""
    got: list[int] = []

    def note(signum: int, frame: object) -> None:
        got.append(signum)

    for sig in SIGNALS:
        signal.signal(sig, note)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    try:
        while not got:
            status = _nbdkit_exit(pid)
            if status is not None:
                return f"nbdkit:{status}"
            time.sleep(poll)  # a signal runs its handler here; the loop then ends
    finally:
        # Blocked again before the exec: a second signal waits for the teardown's handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    return f"signal:{signal.Signals(got[0]).name}"


def main(argv: list[str]) -> int:
    """``PACKAGE_DIR RUN_DIR LOCK_FD NBDKIT_PID`` (the package dir comes first in sys.argv,
    before this list): wait, then exec the teardown."""
    run_dir, lock_fd, pid = argv[0], argv[1], int(argv[2])
    sys.stderr.write(f"kdumpd: INFO: watching nbdkit {pid} (daemon pid {os.getpid()}, "
                     f"{_rss_kib()} KiB RSS now)\n")
    sys.stderr.flush()
    reason = wait_for_stop(pid)
    package_dir = sys.path[0]
    os.execv(sys.executable, [sys.executable, "-c", _TEARDOWN, package_dir, run_dir, lock_fd,
                              reason])
    return 1  # not reached
