"""The teardown ``kdumpd serve`` ends with, exec'd by the watcher (:mod:`kdumpd.serve.watch`).

The watcher waits with nothing of kdumpd imported; when a stop signal comes or nbdkit dies it
execs this module in the same process (same pid, nbdkit's parent, the run-directory lock
inherited, the stop signals still blocked), which imports what the one teardown needs
(``rundir``, ``report``, ``teardown``, ``nbd.server``, ``journal``), runs it in order
(swapoff/umount, nbd-client -d, stop nbdkit) and completes the report written at READY with
the final counters.
"""

from __future__ import annotations

import logging
import sys

from kdumpd.errors import ServeError
from kdumpd.journal import notify, setup_logging
from kdumpd.serve.report import finish_report
from kdumpd.serve.rundir import read_state, release_pidfile
from kdumpd.serve.teardown import teardown

__all__ = ["main"]

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """``RUN_DIR LOCK_FD REASON``: tear down after the watcher saw REASON (``signal:NAME`` or
    ``nbdkit:STATUS``); the exit status."""
    run_dir, lock_fd, reason = argv[0], int(argv[1]), argv[2]
    state = read_state(run_dir)
    setup_logging(state.log_level)
    rc = 0
    failure = ""
    errors: list[str] = []
    kind, _, detail = reason.partition(":")
    if kind == "nbdkit":
        state.nbdkit_pid = None  # reaped by the watcher
        failure = f"nbdkit exited unexpectedly with status {detail}"
        rc = ServeError.exit_code
    else:
        log.info("%s: stopping", detail or reason)
        notify(stopping=True, status="stopping")
    # The stop signals stay blocked: the teardown runs to its end (a second SIGTERM waits).
    errors = teardown(run_dir, state, lambda errs: finish_report(run_dir, state, errs, failure))
    if errors:
        log.error("teardown incomplete: %s", "; ".join(errors))
        rc = rc or ServeError.exit_code
    if failure:
        print(f"kdumpd: ServeError: {failure}", file=sys.stderr)
    # The pid file goes while its lock is still held: a clean stop leaves no dead pid behind.
    release_pidfile(run_dir, lock_fd)
    return rc
