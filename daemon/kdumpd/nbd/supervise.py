"""The slim supervisor ``kdumpd serve`` becomes once the device is up.

Planning needs numpy, pyelftools and the whole pipeline: ~42 MiB RSS (26 MiB anonymous) that
would sit idle in the capture kernel while the daemon only waits for SIGTERM. Once nbdkit
serves (and the device is attached and in use), the daemon ``exec``s this module in the same
process: same pid (systemd's MAINPID, ``state.json``), same children (nbdkit stays its child),
the run-directory lock passed on as an inherited descriptor, and only light imports
(``server``, ``runconf``, ``journal``, ``errors``): ~15 MiB RSS, 8 MiB anonymous.

It does what the daemon did from READY on: it watches nbdkit, refreshes systemd's STATUS=,
and on SIGTERM/SIGINT/SIGHUP tears down in order (swapoff/umount, nbd-client -d, stop nbdkit),
then completes the report the daemon wrote at READY with the final counters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from kdumpd.errors import KdumpdError, ServeError
from kdumpd.journal import notify, setup_logging
from kdumpd.nbd import server
from kdumpd.nbd.runconf import atomic_write_json, read_json
from kdumpd.nbd.sockpath import remove_if_stale

__all__ = ["SIGNALS", "exec_argv", "finish_report", "main", "plugin_status", "status_line",
           "teardown", "write_report_files"]

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

log = logging.getLogger(__name__)

_STATUS_EVERY = 5.0
_SIGNALS = SIGNALS


class _Terminate(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


def exec_argv(package_dir: str, run_dir: str, lock_fd: int) -> list[str]:
    """The command line the daemon execs: this interpreter, this package, this module."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from kdumpd.nbd.supervise import main; sys.exit(main(sys.argv[2:]))")
    return [sys.executable, "-c", code, package_dir, run_dir, str(lock_fd)]


def _human(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def plugin_status(run_dir: str) -> dict[str, Any]:
    """The plugin's ``status.json``, or {} if it has not written one (or it is unreadable)."""
    try:
        doc: dict[str, Any] = read_json(os.path.join(run_dir, "status.json"))
        return doc
    except KdumpdError:
        return {}


def status_line(run_dir: str, state: dict[str, Any]) -> str:
    st = plugin_status(run_dir)
    where = state.get("device") or state.get("socket")
    use = {"swap": " as swap", "scratch": f" on {state.get('mounted')}"}.get(
        str(state.get("as")), "")
    integ = st.get("integrity", {})
    return (f"serving {_human(int(st.get('size_bytes', 0)))} ({st.get('copies', '?')} copies) "
            f"on {where}{use}; used {_human(int(st.get('used_bytes', 0)))}; repaired "
            f"{integ.get('repaired', 0)}, lost {integ.get('lost', 0)}")


def _nbdkit_exited(pid: int) -> int | None:
    """nbdkit's exit status if it has exited (reaped here), else None."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _stop_nbdkit(pid: int, timeout: float = 30.0) -> int:
    if (rc := _nbdkit_exited(pid)) is not None:
        return rc
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (rc := _nbdkit_exited(pid)) is not None:
            return rc
        time.sleep(0.05)
    log.error("nbdkit ignored SIGTERM for %.0f s: killing it", timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def teardown(run_dir: str, state: dict[str, Any]) -> list[str]:
    """Undo what ``state`` says is set up, in order; return the steps that failed."""
    errors: list[str] = []
    steps: list[tuple[str, Callable[[], None]]] = []
    device = state.get("device")
    if state.get("swap_on") and device:
        steps.append(("swapoff", lambda: server.swapoff(device)))
    if state.get("mounted"):
        steps.append(("umount", lambda: server.unmount(state["mounted"])))
    if device:
        steps.append(("detach", lambda: server.detach(device)))
    for what, step in steps:
        try:
            step()
        except KdumpdError as exc:
            log.error("teardown %s: %s", what, exc)
            errors.append(f"{what}: {exc}")
    pid = state.get("nbdkit_pid")
    if isinstance(pid, int):
        rc = _stop_nbdkit(pid)
        if rc not in (0, -1, -signal.SIGTERM):
            errors.append(f"nbdkit exited with status {rc}")
    return errors


def finish_report(run_dir: str, state: dict[str, Any], errors: list[str],
                  failure: str = "") -> None:
    """Complete the READY report with the final status and write it to both places; a
    ``failure`` (nbdkit died) makes the state "failed" with the ServeError's reason, so the
    post-mortem says why the device went away."""
    try:
        doc: dict[str, Any] = read_json(os.path.join(run_dir, "report.json"))
    except KdumpdError as exc:
        log.error("no report to complete: %s", exc)
        return
    st = plugin_status(run_dir)
    if failure:
        doc.update(error="ServeError", reason=failure)
    doc.update(
        state="failed" if failure else "stopped",
        time=round(time.time(), 3),
        used_bytes=st.get("used_bytes", doc.get("used_bytes", 0)),
        capacity_bytes=st.get("capacity_bytes", doc.get("capacity_bytes")),
        integrity=st.get("integrity", doc.get("integrity", {})),
        requests=st.get("requests", doc.get("requests", {})),
        scrub=st.get("scrub", doc.get("scrub", {})),
        repairs=st.get("events", doc.get("repairs", [])),
        protections=st.get("protections", doc.get("protections", {})),
        teardown_errors=errors,
    )
    write_report_files(run_dir, state.get("report"), doc)


def write_report_files(run_dir: str, report: object, doc: dict[str, Any]) -> list[str]:
    """Write ``doc`` as ``RUN_DIR/report.json`` and, if ``report`` (the configured path) is
    set, there too, where the dump is saved; return the paths written. A path that cannot be
    written is logged, not raised: the report must never stop a teardown."""
    written = []
    targets = [os.path.join(run_dir, "report.json")]
    if report:
        targets.append(str(report))
    for path in targets:
        try:
            atomic_write_json(path, doc, mode=0o644)
            written.append(path)
        except OSError as exc:
            log.warning("cannot write report %s: %s", path, exc.strerror)
    return written


def _cleanup_files(run_dir: str, state: dict[str, Any]) -> None:
    for name in ("state.json", "runconf.json"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(run_dir, name))
    if state.get("socket"):
        remove_if_stale(str(state["socket"]))  # never a socket another server answers on


def main(argv: list[str]) -> int:
    run_dir, lock_fd = argv[0], int(argv[1])
    state: dict[str, Any] = read_json(os.path.join(run_dir, "state.json"))
    setup_logging(str(state.get("log_level", "info")))

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminate(signum)

    for sig in _SIGNALS:
        signal.signal(sig, handler)
    pid = int(state["nbdkit_pid"])
    log.info("supervising nbdkit %d (daemon pid %d, %s RSS now)", pid, os.getpid(),
             _rss_text())
    rc = 0
    failure = ""
    errors: list[str] = []
    # The daemon blocked these signals across exec, so one sent meanwhile is pending now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    try:
        try:
            last = time.monotonic()
            while True:
                time.sleep(0.2)
                exited = _nbdkit_exited(pid)
                if exited is not None:
                    state["nbdkit_pid"] = None
                    raise ServeError(f"nbdkit exited unexpectedly with status {exited}")
                if time.monotonic() - last >= _STATUS_EVERY:
                    last = time.monotonic()
                    notify(status=status_line(run_dir, state))
        except _Terminate as stop:
            log.info("%s: stopping", stop)
            notify(stopping=True, status="stopping")
        except ServeError as exc:
            failure = str(exc)
            rc = exc.exit_code
        finally:
            for signum in _SIGNALS:
                signal.signal(signum, _note_signal)
            errors = teardown(run_dir, state)
            finish_report(run_dir, state, errors, failure)
            _cleanup_files(run_dir, state)
    except _Terminate:
        errors = teardown(run_dir, state)
    if errors:
        log.error("teardown incomplete: %s", "; ".join(errors))
        rc = rc or ServeError.exit_code
    if failure:
        print(f"kdumpd: ServeError: {failure}", file=sys.stderr)
    # The pid file goes while its lock is still held: a clean stop leaves no dead pid behind.
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(run_dir, "kdumpd.pid"))
    with contextlib.suppress(OSError):
        os.close(lock_fd)
    return rc


def _note_signal(signum: int, frame: FrameType | None) -> None:
    log.warning("%s during teardown: finishing teardown first", signal.Signals(signum).name)


def _rss_text() -> str:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return _human(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    return "?"

