"""Teardown: the one function every exit path of a serve run uses.

Whether the daemon stops before READY (a failure after nbdkit started, a signal), the
supervisor stops after it (SIGTERM, nbdkit died), or ``kdumpd stop`` cleans up after a daemon
that was killed, the same :func:`teardown` undoes what :class:`~kdumpd.serve.rundir.State`
says is set up, in order: swapoff or umount (the kernel stops using the device), nbd-client -d
(it lets go of the socket), stop nbdkit (the store flushes and writes its last status); then
the caller's report, then state.json, runconf.json and a stale socket go. Light: the
supervisor imports it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from kdumpd.errors import KdumpdError
from kdumpd.nbd import server
from kdumpd.serve.procs import stop_process
from kdumpd.serve.rundir import State, remove_run_files

__all__ = ["teardown"]


def _swapoff(state: State) -> None:
    if state.swap_on and state.device:
        server.swapoff(state.device)
        state.swap_on = False


def _umount(state: State) -> None:
    if state.mounted:
        server.unmount(state.mounted)
        state.mounted = None


def _detach(state: State) -> None:
    if state.device:
        server.detach(state.device)
        state.device = None


def _stop_nbdkit(state: State) -> None:
    if state.nbdkit_pid is not None:
        rc = stop_process(state.nbdkit_pid, "nbdkit")
        state.nbdkit_pid = None
        if rc not in (0, None, -signal.SIGTERM):
            raise KdumpdError(f"nbdkit exited with status {rc}")


_STEPS = (("swapoff", _swapoff), ("umount", _umount), ("detach", _detach),
          ("nbdkit", _stop_nbdkit))


def teardown(run_dir: str, state: State,
             report: Callable[[list[str]], object] | None = None) -> list[str]:
    """Undo what ``state`` says is set up, then call ``report`` with the steps that failed,
    then remove the run files; return the failures ("swapoff: ...", "nbdkit exited with
    status N").

    Every step runs even if an earlier one failed, and each clears its part of ``state`` once
    done, so a second call (a signal arrived part-way) redoes only what is still set up.
    """
    errors: list[str] = []
    for what, step in _STEPS:
        try:
            step(state)
        except KdumpdError as exc:
            errors.append(str(exc) if what == "nbdkit" else f"{what}: {exc}")
    if report is not None:
        report(errors)
    remove_run_files(run_dir, state.socket)
    return errors
