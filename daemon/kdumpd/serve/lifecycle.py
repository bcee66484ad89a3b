"""The lifecycle of ``kdumpd serve``: prepare -> nbdkit -> attach -> READY -> exec the
supervisor; or, on a refusal, failure or signal before that, teardown.

Everything that can refuse runs in :func:`~kdumpd.serve.prepare.prepare` before nbdkit starts.
From nbdkit on, every step records what it set up in ``state.json``
(:class:`~kdumpd.serve.rundir.State`) so that :func:`~kdumpd.serve.teardown.teardown` undoes
exactly that, whoever runs it. Each step before READY is timed (:class:`~kdumpd.phases.Phases`:
startup, plan, backend probe, self-test, nbdkit, attach, swapon or mkfs) into the log, the
report, the state and the status. At READY the process execs the watcher
(:mod:`kdumpd.serve.watch`, nothing of kdumpd imported) in its place; the watcher execs the
teardown (:mod:`kdumpd.serve.supervise`) when a stop signal comes or nbdkit dies.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from kdumpd.config import Config
from kdumpd.errors import KdumpdError, ServeError
from kdumpd.journal import notify, setup_logging
from kdumpd.nbd import server
from kdumpd.nbd.protect import protect_process
from kdumpd.nbd.sockpath import check_socket_path
from kdumpd.phases import Phases
from kdumpd.serve import watch
from kdumpd.serve.prepare import Prepared, prepare
from kdumpd.serve.report import report_refusal, serving_report, status_line
from kdumpd.serve.rundir import State, make_run_dir, run_dir_lock
from kdumpd.serve.signals import (
    SIGNALS,
    Terminate,
    defer_signals,
    raise_on_signals,
    restore_signals,
)
from kdumpd.serve.teardown import teardown
from kdumpd.units import human_size

__all__ = ["serve"]

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """One serve run: its configuration, what is set up so far (``state``), the timings."""

    cfg: Config
    state: State
    phases: Phases = field(default_factory=Phases)
    prepared: Prepared | None = None
    failure: KdumpdError | None = None  # why serving stopped early, for the report

    def save(self) -> None:
        self.state.phases = self.phases.to_json()
        self.state.save(self.cfg.run_dir)

    def report(self, name: str, errors: list[str]) -> None:
        assert self.prepared is not None
        serving_report(self.cfg, self.prepared, self.state, self.phases, name, errors,
                       self.failure)


def serve(cfg: Config) -> int:
    """Run ``kdumpd serve`` in the foreground until SIGTERM; the exit status."""
    where = setup_logging(str(cfg["log_level"]))
    log.debug("logging to %s", where)
    make_run_dir(cfg.run_dir)
    old_handlers = raise_on_signals()
    try:
        with run_dir_lock(cfg.run_dir, lambda e: report_refusal(cfg, e)) as lock_fd:
            # Before planning and before any report: a refused socket must not overwrite
            # the report of the daemon that owns it.
            check_socket_path(os.path.abspath(cfg.socket))
            return _serve_locked(cfg, lock_fd)
    finally:
        restore_signals(old_handlers)


def _serve_locked(cfg: Config, lock_fd: int) -> int:
    run = _Run(cfg, State(socket=os.path.abspath(cfg.socket), use_as=cfg.use_as,
                          report=str(cfg["report"]), log_level=str(cfg["log_level"]),
                          started=time.time(), daemon_pid=os.getpid()))
    errors: list[str] = []
    try:
        try:
            try:
                run.prepared = prepare(cfg, run.phases)
            except KdumpdError as exc:
                report_refusal(cfg, exc)
                raise
            try:
                _start(run)
            except KdumpdError as exc:  # nbdkit, modprobe, attach, swapon: say it in the report
                run.failure = exc
                raise
            _become_supervisor(run, lock_fd)  # only returns if exec failed
        except Terminate as sig:
            log.info("%s: stopping", sig)
            notify(stopping=True, status="stopping")
        finally:
            defer_signals()
            if run.prepared is not None:  # before that, nothing is set up
                errors = teardown(cfg.run_dir, run.state, lambda errs: run.report(
                    "failed" if run.failure else "stopped", errs))
    except Terminate:  # a signal in the few instructions before defer_signals
        if run.prepared is not None:
            errors = teardown(cfg.run_dir, run.state)
    if errors:
        log.error("teardown incomplete: %s", "; ".join(errors))
        return ServeError.exit_code
    return 0


def _start(run: _Run) -> None:
    """nbdkit, then (if asked) attach and swapon or mkfs/mount, then READY."""
    cfg, state = run.cfg, run.state
    assert run.prepared is not None
    rc = run.prepared.runconf
    protections = protect_process() if cfg["protect"] else {}
    log.debug("daemon protections: %s", protections)
    argv = server.nbdkit_argv(
        runconf=run.prepared.runconf_path, socket=state.socket, nbdkit=str(cfg["nbdkit"]),
        # nbdkit --swap only when asked for (mlock = all): the plugin's on-fault lock costs
        # only resident pages (see kdumpd.nbd.protect).
        swap=rc.mlock == "all", threads=int(cfg["threads"]),
        # Detached, nbdkit goes with the daemon; attached, the kernel's I/O depends on it, so
        # it outlives a killed daemon until `kdumpd stop` tears down in order.
        exit_with_parent=not cfg.attach,
        verbose=cfg["log_level"] == "debug",
    )
    nbdkit = server.Nbdkit(argv, state.socket, rc.status_path, rc.error_path)
    try:
        with run.phases.measure("nbdkit"):
            nbdkit.start()
    finally:
        state.nbdkit_pid = nbdkit.pid if nbdkit.alive() else None
    run.save()
    log.info("nbdkit %d serving %s on %s", state.nbdkit_pid, human_size(rc.size_bytes),
             state.socket)
    if cfg.attach:
        _attach(run)
    state.ready_seconds = run.phases.total()
    run.save()
    log.info("ready in %.2f s: %s", state.ready_seconds,
             ", ".join(f"{k} {v:.2f} s" for k, v in run.phases.seconds.items()))
    run.report("serving", [])
    notify(ready=True, status=status_line(cfg.run_dir, state))


def _attach(run: _Run) -> None:
    cfg, state = run.cfg, run.state
    with run.phases.measure("attach"):
        server.modprobe_nbd()
        device = cfg["device"] if cfg["device"] != "auto" else server.find_free_nbd()
        server.attach(state.socket, device, swap=cfg.use_as == "swap")
    state.device = device
    run.save()
    if cfg.use_as == "swap":
        with run.phases.measure("swapon"):
            server.make_swap(device, int(cfg["swap_priority"]))
        state.swap_on = True
    elif cfg.use_as == "scratch":
        with run.phases.measure("mkfs_mount"):
            server.make_scratch(device, cfg.mount, str(cfg["fstype"]))
        state.mounted = cfg.mount
    run.save()
    log.info("%s attached%s", device, {"swap": " as swap", "scratch": f" on {cfg.mount}"}
             .get(cfg.use_as, ""))


def _become_supervisor(run: _Run, lock_fd: int) -> None:
    """Replace this process (the planner and its imports) by the watcher: same pid, nbdkit
    stays our child, the run-directory lock is inherited. Signals are blocked across the
    exec, so a SIGTERM meanwhile waits for the watcher's handler."""
    assert run.prepared is not None
    run.save()
    if run.state.nbdkit_pid is None:
        raise ServeError("nbdkit is gone at READY")
    argv = watch.argv_for(run.prepared.runconf.package_dir, run.cfg.run_dir, lock_fd,
                          run.state.nbdkit_pid)
    os.set_inheritable(lock_fd, True)
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        raise ServeError(f"cannot exec the supervisor {argv[0]}: {exc.strerror}") from None
