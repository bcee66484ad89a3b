"""The slim supervisor ``kdumpd serve`` becomes once the device is up.

Planning needs the vmcore reader, the classifier and the whole pipeline in memory, and it
would sit idle in the capture kernel while the daemon only waits for SIGTERM. Once nbdkit
serves (and the device is attached and in use), the daemon ``exec``s this module in the same
process: same pid (systemd's MAINPID, ``state.json``), same children (nbdkit stays its child),
the run-directory lock passed on as an inherited descriptor, and only light imports (``rundir``,
``report``, ``teardown``, ``signals``, ``nbd.server``, ``journal``, ``errors``).

It does what the daemon did from READY on: it watches nbdkit, refreshes systemd's STATUS=,
and on SIGTERM/SIGINT/SIGHUP (or nbdkit's death) runs the one teardown, completing the report
the daemon wrote at READY with the final counters.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from kdumpd.errors import ServeError
from kdumpd.journal import notify, setup_logging
from kdumpd.serve.procs import process_rss
from kdumpd.serve.report import finish_report, status_line
from kdumpd.serve.rundir import State, read_state, release_pidfile
from kdumpd.serve.signals import SIGNALS, Terminate, defer_signals, raise_on_signals
from kdumpd.serve.teardown import teardown
from kdumpd.units import human_size

__all__ = ["exec_argv", "main"]

log = logging.getLogger(__name__)

_STATUS_EVERY = 5.0


def exec_argv(package_dir: str, run_dir: str, lock_fd: int) -> list[str]:
    """The command line the daemon execs: this interpreter, this package, this module."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from kdumpd.serve.supervise import main; sys.exit(main(sys.argv[2:]))")
    return [sys.executable, "-c", code, package_dir, run_dir, str(lock_fd)]


def _nbdkit_exited(pid: int) -> int | None:
    """nbdkit's exit status if it has exited (reaped here), else None."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _watch(run_dir: str, state: State, pid: int) -> None:
    """Until a signal: raise ServeError if nbdkit exits, refresh STATUS= every 5 s."""
    last = time.monotonic()
    while True:
        time.sleep(0.2)
        exited = _nbdkit_exited(pid)
        if exited is not None:
            state.nbdkit_pid = None
            raise ServeError(f"nbdkit exited unexpectedly with status {exited}")
        if time.monotonic() - last >= _STATUS_EVERY:
            last = time.monotonic()
            notify(status=status_line(run_dir, state))


def main(argv: list[str]) -> int:
    """``RUN_DIR LOCK_FD``: supervise until a signal or nbdkit's death; the exit status."""
    run_dir, lock_fd = argv[0], int(argv[1])
    state = read_state(run_dir)
    setup_logging(state.log_level)
    raise_on_signals()
    pid = state.nbdkit_pid
    if pid is None:
        print(f"kdumpd: ServeError: {run_dir}/state.json names no nbdkit to supervise",
              file=sys.stderr)
        return ServeError.exit_code
    log.info("supervising nbdkit %d (daemon pid %d, %s RSS now)", pid, os.getpid(),
             human_size(process_rss()))
    rc = 0
    failure = ""
    errors: list[str] = []
    # The daemon blocked these signals across exec, so one sent meanwhile is pending now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    try:
        try:
            _watch(run_dir, state, pid)
        except Terminate as stop:
            log.info("%s: stopping", stop)
            notify(stopping=True, status="stopping")
        except ServeError as exc:
            failure = str(exc)
            rc = exc.exit_code
        finally:
            defer_signals()
            errors = teardown(run_dir, state,
                              lambda errs: finish_report(run_dir, state, errs))
    except Terminate:
        errors = teardown(run_dir, state)
    if errors:
        log.error("teardown incomplete: %s", "; ".join(errors))
        rc = rc or ServeError.exit_code
    if failure:
        print(f"kdumpd: ServeError: {failure}", file=sys.stderr)
    # The pid file goes while its lock is still held: a clean stop leaves no dead pid behind.
    release_pidfile(run_dir, lock_fd)
    return rc
