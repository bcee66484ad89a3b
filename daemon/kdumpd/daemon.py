"""The lifecycle of ``kdumpd serve``: plan -> self-test -> nbdkit -> attach -> READY -> SIGTERM
-> teardown, and ``kdumpd status`` / ``kdumpd stop`` over the run directory.

Everything that can refuse (the plan, the placement, the backend's own checks, the self-test)
runs before nbdkit starts, so a refusal is one line and a non-zero exit before the first write
to old memory. Signals become exceptions (borg-style), so SIGTERM runs the same teardown as any
failure: swapoff/umount, nbd-client -d, stop nbdkit, write the report.

Run directory (mode 0700, default /run/kdumpd)::

    kdumpd.pid    the daemon's pid, flock()ed while it serves (one daemon per directory)
    runconf.json  what the plugin serves (kdumpd.nbd.runconf)
    state.json    pids, socket, device, swap/mount: what ``stop`` must undo
    status.json   the plugin's counters, rewritten atomically every second
    error.json    the plugin's startup failure, if any
    report.json   the post-mortem report (also written to the configured ``report`` path)
    kdumpd.sock   the NBD socket (mode 0600), unless --socket says otherwise
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from kdumpd import __version__
from kdumpd.config import DEFAULT_PATH as DEFAULT_CONFIG_PATH
from kdumpd.config import Config, human_size, load_config
from kdumpd.errors import (
    BackendError,
    ConfigError,
    KdumpdError,
    NotRunningError,
    RefusedError,
    ServeError,
)
from kdumpd.journal import notify, setup_logging
from kdumpd.nbd import server, supervise
from kdumpd.nbd.protect import protect_process
from kdumpd.nbd.runconf import RunConf, atomic_write_json, read_json
from kdumpd.nbd.selftest import run_selftest
from kdumpd.nbd.service import open_backend, process_pss, process_rss, store_capacity
from kdumpd.nbd.sockpath import answers, check_socket_path, remove_if_stale
from kdumpd.oldmem.base import drop_contained, identity_ranges
from kdumpd.oldmem.devmem import DevMem
from kdumpd.oldmem.vmcore_rw import VmcoreRW
from kdumpd.phases import Phases
from kdumpd.plan import Plan
from kdumpd.safeplan import gated_plan, host_facts_here
from kdumpd.store.placement import Placement
from kdumpd.units import Extent, PhysRange, coalesce
from kdumpd.vmcore.core import Vmcore, open_vmcore

__all__ = [
    "Config",
    "Prepared",
    "load_serve_config",
    "plan_for_serve",
    "prepare",
    "read_status",
    "serve",
    "stop",
]

log = logging.getLogger(__name__)

PROC_VMCORE = "/proc/vmcore"


class _Terminate(BaseException):
    """SIGTERM/SIGINT/SIGHUP, raised in the main thread so teardown runs normally."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# -- planning: the one function the safety gate wraps ---------------------------------------


def plan_for_serve(vm: Vmcore, cfg: Config) -> Plan:
    """The plan ``serve`` uses, behind the safety gate (collector and its dump level, hardware
    memory errors, the capture kernel's own ranges, ...): a Plan, or RefusedError naming the
    rule. Every path to old memory plans through here.

    The dump level: an explicit ``dump_level`` (flag, kernel command line or config file)
    stands for ``makedumpfile -d N``; otherwise the gate reads the collector from the kdump
    configuration (default ``makedumpfile -d 31``).
    """
    collector = str(cfg["collector"]) or None
    if cfg.sources.get("dump_level", "default") != "default":
        collector = f"makedumpfile -d {cfg.dump_level}"
    gated = gated_plan(vm, collector=collector, host=host_facts_here(Path(cfg.vmcore)),
                       mce_policy=str(cfg["mce_policy"]))
    return gated.plan


# -- preparation: everything that can refuse, before nbdkit -----------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """The outcome of :func:`prepare`: the plan, and the run configuration written for the
    plugin."""

    plan: Plan
    runconf: RunConf
    runconf_path: str
    capacity_bytes: int
    selftests: int


def _package_dir() -> str:
    import kdumpd

    return os.path.dirname(os.path.dirname(os.path.abspath(kdumpd.__file__)))


def _resolve_backend(cfg: Config) -> str:
    spec = cfg.backend
    if spec.startswith("image:"):
        path = os.path.abspath(spec[len("image:") :])
        if os.path.realpath(path) == os.path.realpath(PROC_VMCORE):
            raise RefusedError("backend image:/proc/vmcore: use --backend vmcore")
        return f"image:{path}"
    if spec == "vmcore":
        if os.path.realpath(cfg.vmcore) != PROC_VMCORE:
            raise RefusedError(
                f"backend vmcore writes into {cfg.vmcore} itself (rule: the vmcore backend is "
                "/proc/vmcore only; use image:FILE for a file)")
        return f"vmcore:{PROC_VMCORE}"
    if spec == "devmem":
        return "devmem"
    # auto: writable /proc/vmcore if this kernel has it, else /dev/mem (which refuses outside
    # a kdump kernel).
    if os.path.realpath(cfg.vmcore) == PROC_VMCORE and os.path.exists(PROC_VMCORE):
        return f"vmcore:{PROC_VMCORE}"
    return "devmem"


def _probe_auto(spec: str, cfg: Config, ranges: tuple[PhysRange, ...], plan: Plan) -> str:
    # "auto" picked vmcore: fall back to devmem if this kernel's /proc/vmcore is read-only.
    if cfg.backend != "auto" or not spec.startswith("vmcore:"):
        return spec
    try:
        VmcoreRW(ranges, probe_paddr=plan.extents[0].start_paddr).close()
        return spec
    except BackendError as exc:
        log.info("backend: %s; using /dev/mem", exc)
        return "devmem"


def prepare(cfg: Config, phases: Phases | None = None) -> Prepared:
    """Plan, self-test, check placement and backend, and write ``runconf.json``.

    Nothing is written to old memory (the vmcore backend's probe rewrites one granted page with
    its own bytes). Every refusal raises here, before nbdkit exists.
    """
    run_dir = cfg.run_dir
    ph = phases or Phases()
    _make_run_dir(run_dir)
    with ph.measure("plan"), open_vmcore(cfg.vmcore) as vm:
        plan = plan_for_serve(vm, cfg)
        ranges = tuple(drop_contained(vm.phys.ranges))
    if not plan.extents:
        raise RefusedError(f"the plan grants no old memory at dump level {plan.dump_level} "
                           "(rule: write only inside the plan)")
    with ph.measure("backend_probe"):
        spec = _probe_auto(_resolve_backend(cfg), cfg, ranges, plan)
        if spec == "devmem":
            plan = _devmem_mappable(plan)
    with ph.measure("selftest"):
        selftests = run_selftest(cfg.copies, run_dir)
    log.info("self-test: %d checks passed", selftests)
    placement = Placement.from_extents(plan.extents, cfg.copies,
                                       min_distance_bytes=int(cfg["min_distance"]))
    capacity = store_capacity(placement)
    if capacity <= 0:
        raise RefusedError(f"the plan's {plan.reusable_bytes} bytes hold no block at "
                           f"{cfg.copies} copies")
    size = cfg.size or capacity
    if cfg.size > capacity and cfg.use_as == "swap":
        raise RefusedError(
            f"size {human_size(cfg.size)} exceeds what old memory holds at {cfg.copies} copies "
            f"({human_size(capacity)}) (rule: swap is never thin: a full pool would fail "
            "swap-out with ENOSPC)")
    if cfg.size and cfg.size > capacity:
        log.warning("size %s exceeds the capacity %s at %d copies: writes past it get ENOSPC",
                    human_size(cfg.size), human_size(capacity), cfg.copies)
    with ph.measure("backend_open"):
        open_backend(spec, ranges, plan.extents).close()  # refusals happen here, before nbdkit
    summary = plan_summary(plan)
    rc = RunConf(
        run_dir=os.path.abspath(run_dir),
        package_dir=_package_dir(),
        backend=spec,
        extents=plan.extents,
        ranges=ranges,
        copies=cfg.copies,
        size_bytes=size,
        min_distance_bytes=int(cfg["min_distance"]),
        scrub_rate=int(cfg["scrub_rate"]),
        status_interval=float(cfg["status_interval"]),
        protect=bool(cfg["protect"]),
        log_level=str(cfg["log_level"]),
        # Locking matters once the kernel's own I/O (swap-out, writeback) depends on nbdkit.
        mlock=str(cfg["mlock"]) if cfg.attach and cfg["protect"] else "off",
        plan_summary=summary,
    )
    path = os.path.join(run_dir, "runconf.json")
    rc.write(path)
    log.info("plan: %s reusable in %d extents at dump level %d; device %s at %d copies "
             "(capacity %s); backend %s", human_size(plan.reusable_bytes), len(plan.extents),
             plan.dump_level, human_size(size), cfg.copies, human_size(capacity), spec)
    return Prepared(plan, rc, path, capacity, selftests)


def _devmem_mappable(plan: Plan) -> Plan:
    """The plan less what /dev/mem will not map (busy iomem resources: see
    :meth:`DevMem.mappable`), so that no slot is ever placed where a write would fail."""
    mem = DevMem(identity_ranges(plan.extents))  # refuses outside a kdump kernel
    try:
        ok = mem.mappable()
    finally:
        mem.close()
    extents = tuple(coalesce(Extent(lo >> 12, hi >> 12) for lo, hi in ok))
    dropped = plan.reusable_pages - sum(e.npages for e in extents)
    if not dropped:
        return plan
    why = (f"{dropped} pages ({human_size(dropped * 4096)}) that /dev/mem refuses to map "
           "(busy iomem resources such as 'RAM buffer')")
    log.info("devmem: left out %s", why)
    if not extents:
        raise RefusedError(f"devmem: the kernel refuses to map any of the plan: {why}")
    return replace(plan, extents=extents, withheld={**plan.withheld, "devmem": why})


def plan_summary(plan: Plan) -> dict[str, Any]:
    return {
        "osrelease": plan.osrelease,
        "dump_level": plan.dump_level,
        "reusable_pages": plan.reusable_pages,
        "reusable_bytes": plan.reusable_bytes,
        "extents": len(plan.extents),
        "extent_list": [f"{e.start_pfn:#x}-{e.end_pfn:#x}" for e in plan.extents],
        "categories": plan.categories,
        "withheld": plan.withheld,
    }


def _make_run_dir(run_dir: str) -> None:
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
def _run_dir_lock(run_dir: str,
                  on_write_error: Callable[[KdumpdError], None] | None = None) -> Iterator[int]:
    """Lock ``run_dir``/kdumpd.pid and write our pid into it. A pid that cannot be written
    (a full run directory) is a ServeError, reported through ``on_write_error`` first: unlike
    a busy directory, nobody else's report is there to keep."""
    path = os.path.join(run_dir, "kdumpd.pid")
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
            if on_write_error is not None:
                on_write_error(err)
            raise err from None
        yield fd
    finally:
        if locked:  # ours: no dead pid file left behind (removed while the lock is held)
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)


# -- serve ------------------------------------------------------------------------------------


class _Serving:
    """What has been set up so far, so teardown undoes exactly that, in reverse."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.nbdkit: server.Nbdkit | None = None
        self.device: str | None = None
        self.swap_on = False
        self.mounted: str | None = None
        self.prepared: Prepared | None = None
        self.started = time.time()
        self.errors: list[str] = []
        self.phases = Phases()
        self.ready_seconds: float | None = None
        self.failure: KdumpdError | None = None  # why serving stopped early, for the report

    @property
    def state_path(self) -> str:
        return os.path.join(self.cfg.run_dir, "state.json")

    def save_state(self) -> None:
        atomic_write_json(self.state_path, {
            "daemon_pid": os.getpid(),
            "nbdkit_pid": self.nbdkit.pid if self.nbdkit else None,
            "socket": os.path.abspath(self.cfg.socket),
            "device": self.device,
            "as": self.cfg.use_as,
            "swap_on": self.swap_on,
            "mounted": self.mounted,
            "report": self.cfg["report"],
            "log_level": self.cfg["log_level"],
            "started": round(self.started, 3),
            "version": __version__,
            "ready_seconds": self.ready_seconds,
            "phases": self.phases.to_json(),
        })

    def teardown(self) -> None:
        for what, step in (("swapoff", self._swapoff), ("umount", self._umount),
                           ("detach", self._detach), ("nbdkit", self._stop_nbdkit)):
            try:
                step()
            except KdumpdError as exc:
                log.error("teardown %s: %s", what, exc)
                self.errors.append(f"{what}: {exc}")

    def _swapoff(self) -> None:
        if self.swap_on and self.device:
            server.swapoff(self.device)
            self.swap_on = False

    def _umount(self) -> None:
        if self.mounted:
            server.unmount(self.mounted)
            self.mounted = None

    def _detach(self) -> None:
        if self.device:
            server.detach(self.device)
            self.device = None

    def _stop_nbdkit(self) -> None:
        if self.nbdkit is not None:
            rc = self.nbdkit.stop()
            if rc not in (0, None, -signal.SIGTERM):
                self.errors.append(f"nbdkit exited with status {rc}")


def _install_signals() -> dict[int, Any]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminate(signum)

    old: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        old[sig] = signal.signal(sig, handler)
    return old


def _defer_signals() -> None:
    # During teardown a second SIGTERM must not abandon swapoff half-way: note it and go on.
    def note(signum: int, frame: FrameType | None) -> None:
        log.warning("%s during teardown: finishing teardown first", signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, note)


def serve(cfg: Config) -> int:
    """Run ``kdumpd serve`` in the foreground until SIGTERM; the exit status."""
    where = setup_logging(str(cfg["log_level"]))
    log.debug("logging to %s", where)
    _make_run_dir(cfg.run_dir)
    old_handlers = _install_signals()
    try:
        with _run_dir_lock(cfg.run_dir, lambda e: _report_refusal(cfg, e)) as lock_fd:
            # Before planning and before any report: a refused socket must not overwrite
            # the report of the daemon that owns it.
            check_socket_path(os.path.abspath(cfg.socket))
            return _serve_locked(cfg, lock_fd)
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)


def _serve_locked(cfg: Config, lock_fd: int) -> int:
    s = _Serving(cfg)
    rc = 0
    try:
        try:
            try:
                s.prepared = prepare(cfg, s.phases)
            except KdumpdError as exc:
                _report_refusal(cfg, exc)
                raise
            try:
                _start(s)
            except KdumpdError as exc:  # nbdkit, modprobe, attach, swapon: say it in the report
                s.failure = exc
                raise
            _become_supervisor(s, lock_fd)  # only returns if exec failed
        except _Terminate as sig:
            log.info("%s: stopping", sig)
            notify(stopping=True, status="stopping")
        finally:
            _defer_signals()
            s.teardown()
            _finish(s)
    except _Terminate:  # a signal in the few instructions before _defer_signals
        s.teardown()
    if s.errors:
        log.error("teardown incomplete: %s", "; ".join(s.errors))
        rc = ServeError.exit_code
    return rc


def _become_supervisor(s: _Serving, lock_fd: int) -> None:
    """Replace this process (numpy, the planner: ~42 MiB) by the slim supervisor (~15 MiB):
    same pid, nbdkit stays our child, the run-directory lock is inherited. Signals are blocked
    across the exec, so a SIGTERM meanwhile waits for the supervisor's handler."""
    assert s.prepared is not None
    s.save_state()
    argv = supervise.exec_argv(s.prepared.runconf.package_dir, s.cfg.run_dir, lock_fd)
    os.set_inheritable(lock_fd, True)
    signal.pthread_sigmask(signal.SIG_BLOCK, supervise.SIGNALS)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, supervise.SIGNALS)
        raise ServeError(f"cannot exec the supervisor {argv[0]}: {exc.strerror}") from None


def _start(s: _Serving) -> None:
    cfg = s.cfg
    assert s.prepared is not None
    attach = cfg.attach
    protections = protect_process() if cfg["protect"] else {}
    log.debug("daemon protections: %s", protections)
    sock = os.path.abspath(cfg.socket)
    argv = server.nbdkit_argv(
        runconf=s.prepared.runconf_path, socket=sock, nbdkit=str(cfg["nbdkit"]),
        # nbdkit --swap only when asked for (mlock = all): the plugin's on-fault lock costs
        # only resident pages (see kdumpd.nbd.protect).
        swap=s.prepared.runconf.mlock == "all", threads=int(cfg["threads"]),
        # Detached, nbdkit goes with the daemon; attached, the kernel's I/O depends on it, so
        # it outlives a killed daemon until `kdumpd stop` tears down in order.
        exit_with_parent=not attach,
        verbose=cfg["log_level"] == "debug",
    )
    s.nbdkit = server.Nbdkit(argv, sock, s.prepared.runconf.status_path,
                             s.prepared.runconf.error_path)
    with s.phases.measure("nbdkit"):
        s.nbdkit.start()
    s.save_state()
    log.info("nbdkit %d serving %s on %s", s.nbdkit.pid,
             human_size(s.prepared.runconf.size_bytes), sock)
    if attach:
        with s.phases.measure("attach"):
            server.modprobe_nbd()
            device = cfg["device"] if cfg["device"] != "auto" else server.find_free_nbd()
            server.attach(sock, device, swap=cfg.use_as == "swap")
        s.device = device
        s.save_state()
        if cfg.use_as == "swap":
            with s.phases.measure("swapon"):
                server.make_swap(device, int(cfg["swap_priority"]))
            s.swap_on = True
        elif cfg.use_as == "scratch":
            with s.phases.measure("mkfs_mount"):
                server.make_scratch(device, cfg.mount, str(cfg["fstype"]))
            s.mounted = cfg.mount
        s.save_state()
        log.info("%s attached%s", device, {"swap": " as swap", "scratch": f" on {cfg.mount}"}
                 .get(cfg.use_as, ""))
    s.ready_seconds = s.phases.total()
    s.save_state()
    log.info("ready in %.2f s: %s", s.ready_seconds,
             ", ".join(f"{k} {v:.2f} s" for k, v in s.phases.seconds.items()))
    write_report(s, "serving")
    notify(ready=True, status=_status_line(s))


def _finish(s: _Serving) -> None:
    if s.prepared is None:
        return
    write_report(s, "failed" if s.failure else "stopped")
    for name in ("state.json", "runconf.json"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(s.cfg.run_dir, name))
    remove_if_stale(os.path.abspath(s.cfg.socket))


def _status_line(s: _Serving) -> str:
    return supervise.status_line(s.cfg.run_dir, {
        "device": s.device, "socket": os.path.abspath(s.cfg.socket), "as": s.cfg.use_as,
        "mounted": s.mounted})


# -- report -----------------------------------------------------------------------------------


def _report_refusal(cfg: Config, exc: KdumpdError) -> None:
    """A refusal leaves a report too, so the post-mortem says why old memory was not used."""
    doc = {
        "kdumpd": __version__,
        "state": "refused",
        "time": round(time.time(), 3),
        "error": type(exc).__name__,
        "reason": str(exc),
        "config": cfg.to_json(),
    }
    supervise.write_report_files(cfg.run_dir, cfg["report"], doc)


def write_report(s: _Serving, state: str) -> list[str]:
    """Write the JSON report to the run directory and to the configured ``report`` path;
    return the paths written."""
    assert s.prepared is not None
    st = supervise.plugin_status(s.cfg.run_dir)
    doc = {
        "kdumpd": __version__,
        "state": state,
        "started": round(s.started, 3),
        "time": round(time.time(), 3),
        "plan": s.prepared.runconf.plan_summary,
        "backend": s.prepared.runconf.backend,
        "copies": s.cfg.copies,
        "size_bytes": s.prepared.runconf.size_bytes,
        "capacity_bytes": st.get("capacity_bytes", s.prepared.capacity_bytes),
        "used_bytes": st.get("used_bytes", 0),
        "device": s.device,
        "as": s.cfg.use_as,
        "integrity": st.get("integrity", {}),
        "requests": st.get("requests", {}),
        "scrub": st.get("scrub", {}),
        "repairs": st.get("events", []),
        "protections": st.get("protections", {}),
        "selftests": s.prepared.selftests,
        "ready_seconds": s.ready_seconds,
        "phases": s.phases.to_json(),
        "config": s.cfg.to_json(),
        "teardown_errors": s.errors,
    }
    if s.failure is not None:
        doc.update(error=type(s.failure).__name__, reason=str(s.failure))
    return supervise.write_report_files(s.cfg.run_dir, s.cfg["report"], doc)


# -- status and stop --------------------------------------------------------------------------


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _read_state(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, "state.json")
    if not os.path.exists(path):
        hint = ""
        report = os.path.join(run_dir, "report.json")
        if os.path.exists(report):
            hint = f" (last report: {report})"
            with contextlib.suppress(KdumpdError):
                last = read_json(report)
                if last.get("state") == "refused":
                    hint = f" (refused: {last.get('reason')})"
        raise NotRunningError(f"kdumpd is not running in {run_dir}{hint}")
    doc: dict[str, Any] = read_json(path)
    return doc


def read_status(run_dir: str) -> dict[str, Any]:
    """The running daemon's status: capacity, used, copies, integrity counters, processes."""
    state = _read_state(run_dir)
    st = supervise.plugin_status(run_dir)
    daemon_up = _alive(state.get("daemon_pid"))
    nbdkit_up = _alive(state.get("nbdkit_pid"))
    if not daemon_up and not nbdkit_up:
        raise NotRunningError(f"kdumpd is not running in {run_dir} (stale state: "
                              f"`kdumpd stop --run-dir {run_dir}` cleans up)")
    age = time.time() - float(st.get("time", 0) or 0)
    integ = st.get("integrity", {})
    # The pids alone do not prove it serves: the socket could have been removed or taken.
    sock = state.get("socket")
    sock_ok = bool(sock) and nbdkit_up and answers(str(sock))
    state_name = st.get("state", "starting")
    if state_name == "serving" and not sock_ok:
        state_name = "not answering on its socket"
    return {
        "running": daemon_up and nbdkit_up and st.get("state") == "serving" and sock_ok,
        "state": state_name,
        "socket_answers": sock_ok,
        "status_age_s": round(age, 1),
        "daemon_pid": state.get("daemon_pid"),
        "nbdkit_pid": state.get("nbdkit_pid"),
        "socket": state.get("socket"),
        "device": state.get("device"),
        "as": state.get("as"),
        "mounted": state.get("mounted"),
        "backend": st.get("backend"),
        "copies": st.get("copies"),
        "size_bytes": st.get("size_bytes"),
        "capacity_bytes": st.get("capacity_bytes"),
        "used_bytes": st.get("used_bytes"),
        "free_bytes": st.get("free_bytes"),
        "integrity": {k: integ.get(k, 0) for k in
                      ("detected", "repaired", "quarantined", "lost", "relocated",
                       "scrubbed_blocks")},
        "requests": st.get("requests", {}),
        "scrub": st.get("scrub", {}),
        "rss_bytes": {
            "daemon": process_rss(state["daemon_pid"]) if daemon_up else 0,
            "nbdkit": process_rss(state["nbdkit_pid"]) if nbdkit_up else 0,
        },
        "pss_bytes": {
            "daemon": process_pss(state["daemon_pid"]) if daemon_up else 0,
            "nbdkit": process_pss(state["nbdkit_pid"]) if nbdkit_up else 0,
        },
        "ready_seconds": state.get("ready_seconds"),
        "phases": state.get("phases", {}),
        "rss_anon_bytes": {
            "daemon": process_rss(state["daemon_pid"], "RssAnon") if daemon_up else 0,
            "nbdkit": process_rss(state["nbdkit_pid"], "RssAnon") if nbdkit_up else 0,
        },
        "locked_bytes": st.get("locked_bytes", 0),
        "protections": st.get("protections", {}),
    }


def _remove_dead_pidfile(run_dir: str) -> None:
    """Remove kdumpd.pid if no process holds its lock (the daemon that wrote it is gone)."""
    path = os.path.join(run_dir, "kdumpd.pid")
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


def stop(run_dir: str, timeout: float = 600.0) -> str:
    """Stop the daemon (SIGTERM; it tears down itself) and wait; if the daemon is gone but
    left state behind, undo it here. Returns a one-line summary."""
    state = _read_state(run_dir)
    pid = state.get("daemon_pid")
    if isinstance(pid, int) and _alive(pid) and pid != os.getpid():
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise ServeError(f"kdumpd (pid {pid}) did not stop in {timeout:.0f} s")
            time.sleep(0.05)
        return f"stopped kdumpd (pid {pid})"
    # The daemon died without its teardown: undo what state.json says is set up.
    errors = []
    steps: list[tuple[str, Any]] = []
    if state.get("swap_on") and state.get("device"):
        steps.append(("swapoff", lambda: server.swapoff(state["device"])))
    if state.get("mounted"):
        steps.append(("umount", lambda: server.unmount(state["mounted"])))
    if state.get("device"):
        steps.append(("detach", lambda: server.detach(state["device"])))
    for what, step in steps:
        try:
            step()
        except KdumpdError as exc:
            errors.append(f"{what}: {exc}")
    npid = state.get("nbdkit_pid")
    if isinstance(npid, int) and _alive(npid):
        os.kill(npid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(npid) and time.monotonic() < deadline:
            time.sleep(0.05)
    for name in ("state.json", "runconf.json"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(run_dir, name))
    if state.get("socket"):
        remove_if_stale(str(state["socket"]))
    _remove_dead_pidfile(run_dir)
    if errors:
        raise ServeError("stale kdumpd cleaned up with errors: " + "; ".join(errors))
    return f"cleaned up after kdumpd (pid {pid}), which had died"



def load_serve_config(
    flags: dict[str, str],
    *,
    config_path: str | None = None,
    cmdline_path: str | None = None,
) -> Config:
    """The configuration for serve/status/stop: defaults < config file < kernel command line <
    flags. An explicit ``config_path`` or ``cmdline_path`` must exist and be readable (a file
    the user named that is missing is a mistake, not "no settings"); the defaults
    (/etc/kdumpd.conf, /proc/cmdline) may be absent."""
    cmdline: str | None = None
    if cmdline_path is not None:
        try:
            with open(cmdline_path, "rb") as fh:
                cmdline = fh.read().decode("utf-8", "replace").replace("\0", " ")
        except OSError as exc:
            raise ConfigError(f"kernel command line file {cmdline_path}: "
                              f"{exc.strerror}") from None
    return load_config(
        flags,
        path=config_path or DEFAULT_CONFIG_PATH,
        path_required=config_path is not None,
        cmdline=cmdline,
    )
