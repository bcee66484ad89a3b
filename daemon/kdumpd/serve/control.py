"""``kdumpd status`` and ``kdumpd stop``: the control commands, over the run directory.

Both read ``state.json`` (:class:`~kdumpd.serve.rundir.State`); status adds the plugin's
``status.json`` and asks the socket whether a server answers; stop signals the daemon, or, if
it died without its teardown, runs the same :func:`~kdumpd.serve.teardown.teardown` itself.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from kdumpd.errors import NotRunningError, ServeError
from kdumpd.nbd.sockpath import answers
from kdumpd.serve.procs import alive, process_pss, process_rss
from kdumpd.serve.report import plugin_status
from kdumpd.serve.rundir import read_state, release_pidfile
from kdumpd.serve.teardown import teardown

__all__ = ["read_status", "stop"]


def read_status(run_dir: str) -> dict[str, Any]:
    """The running daemon's status: capacity, used, copies, integrity counters, processes."""
    state = read_state(run_dir)
    st = plugin_status(run_dir)
    daemon_up = alive(state.daemon_pid)
    nbdkit_up = alive(state.nbdkit_pid)
    if not daemon_up and not nbdkit_up:
        raise NotRunningError(f"kdumpd is not running in {run_dir} (stale state: "
                              f"`kdumpd stop --run-dir {run_dir}` cleans up)")
    age = time.time() - float(st.get("time", 0) or 0)
    integ = st.get("integrity", {})
    # The pids alone do not prove it serves: the socket could have been removed or taken.
    sock_ok = bool(state.socket) and nbdkit_up and answers(state.socket)
    state_name = st.get("state", "starting")
    if state_name == "serving" and not sock_ok:
        state_name = "not answering on its socket"
    pids = {"daemon": state.daemon_pid if daemon_up else None,
            "nbdkit": state.nbdkit_pid if nbdkit_up else None}

    def per_process(figure: Any) -> dict[str, int]:
        return {name: figure(pid) if pid else 0 for name, pid in pids.items()}

    return {
        "running": daemon_up and nbdkit_up and st.get("state") == "serving" and sock_ok,
        "state": state_name,
        "socket_answers": sock_ok,
        "status_age_s": round(age, 1),
        "daemon_pid": state.daemon_pid,
        "nbdkit_pid": state.nbdkit_pid,
        "socket": state.socket or None,
        "device": state.device,
        "as": state.use_as,
        "mounted": state.mounted,
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
        "rss_bytes": per_process(process_rss),
        "pss_bytes": per_process(process_pss),
        "ready_seconds": state.ready_seconds,
        "phases": state.phases,
        "rss_anon_bytes": per_process(lambda pid: process_rss(pid, "RssAnon")),
        "locked_bytes": st.get("locked_bytes", 0),
        "protections": st.get("protections", {}),
    }


def stop(run_dir: str, timeout: float = 600.0) -> str:
    """Stop the daemon (SIGTERM; it tears down itself) and wait; if the daemon is gone but
    left state behind, tear down here. Returns a one-line summary."""
    state = read_state(run_dir)
    pid = state.daemon_pid
    if pid is not None and alive(pid) and pid != os.getpid():
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid):
            if time.monotonic() > deadline:
                raise ServeError(f"kdumpd (pid {pid}) did not stop in {timeout:.0f} s")
            time.sleep(0.05)
        return f"stopped kdumpd (pid {pid})"
    # The daemon died without its teardown: undo what state.json says is set up.
    errors = teardown(run_dir, state)
    release_pidfile(run_dir, None)
    if errors:
        raise ServeError("stale kdumpd cleaned up with errors: " + "; ".join(errors))
    return f"cleaned up after kdumpd (pid {pid}), which had died"
