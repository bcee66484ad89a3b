"""The post-mortem report and the one-line status: what a serve run did, for people and tools.

The report is JSON, written to ``RUN_DIR/report.json`` and to the configured ``report`` path
(next to the dump): at a refusal (why old memory was not used), at READY (state ``serving``),
and at teardown (state ``stopped``, with the final counters from the plugin's
``status.json``). A report that cannot be written is logged, never raised: it must not stop a
teardown. Light (no planner, no store): the supervisor imports it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from kdumpd import __version__
from kdumpd.errors import KdumpdError
from kdumpd.jsonfile import atomic_write_json, read_json
from kdumpd.serve.rundir import REPORT, STATUS, State
from kdumpd.units import human_size

if TYPE_CHECKING:
    from kdumpd.config import Config
    from kdumpd.phases import Phases
    from kdumpd.serve.prepare import Prepared

__all__ = ["finish_report", "plugin_status", "report_refusal", "serving_report", "status_line",
           "write_report_files"]

log = logging.getLogger(__name__)


def plugin_status(run_dir: str) -> dict[str, Any]:
    """The plugin's ``status.json``, or {} if it has not written one (or it is unreadable)."""
    try:
        doc = read_json(os.path.join(run_dir, STATUS))
    except KdumpdError:
        return {}
    return doc if isinstance(doc, dict) else {}


def status_line(run_dir: str, state: State) -> str:
    """systemd's STATUS= line: size, copies, where, use, repairs and losses."""
    st = plugin_status(run_dir)
    where = state.device or state.socket
    use = {"swap": " as swap", "scratch": f" on {state.mounted}"}.get(state.use_as, "")
    integ = st.get("integrity", {})
    return (f"serving {human_size(int(st.get('size_bytes', 0)))} ({st.get('copies', '?')} "
            f"copies) on {where}{use}; used {human_size(int(st.get('used_bytes', 0)))}; "
            f"repaired {integ.get('repaired', 0)}, lost {integ.get('lost', 0)}")


def write_report_files(run_dir: str, report: object, doc: dict[str, Any]) -> list[str]:
    """Write ``doc`` as ``RUN_DIR/report.json`` and, if ``report`` (the configured path) is
    set, there too, where the dump is saved; return the paths written. A path that cannot be
    written is logged, not raised: the report must never stop a teardown."""
    written = []
    targets = [os.path.join(run_dir, REPORT)]
    if report:
        targets.append(str(report))
    for path in targets:
        try:
            atomic_write_json(path, doc, mode=0o644)
            written.append(path)
        except OSError as exc:
            log.warning("cannot write report %s: %s", path, exc.strerror)
    return written


def report_refusal(cfg: Config, exc: KdumpdError) -> None:
    """A refusal leaves a report too, so the post-mortem says why old memory was not used."""
    doc = {
        "kdumpd": __version__,
        "state": "refused",
        "time": round(time.time(), 3),
        "error": type(exc).__name__,
        "reason": str(exc),
        "config": cfg.to_json(),
    }
    write_report_files(cfg.run_dir, cfg["report"], doc)


def serving_report(cfg: Config, prepared: Prepared, state: State, phases: Phases,
                   name: str, errors: list[str],
                   failure: KdumpdError | None = None) -> list[str]:
    """Write the whole report (``name``: serving or stopped) from the daemon's own objects;
    return the paths written."""
    st = plugin_status(cfg.run_dir)
    doc = {
        "kdumpd": __version__,
        "state": name,
        "started": round(state.started, 3),
        "time": round(time.time(), 3),
        "plan": prepared.runconf.plan_summary,
        "backend": prepared.runconf.backend,
        "copies": cfg.copies,
        "size_bytes": prepared.runconf.size_bytes,
        "capacity_bytes": st.get("capacity_bytes", prepared.capacity_bytes),
        "used_bytes": st.get("used_bytes", 0),
        "device": state.device,
        "as": cfg.use_as,
        "integrity": st.get("integrity", {}),
        "requests": st.get("requests", {}),
        "scrub": st.get("scrub", {}),
        "repairs": st.get("events", []),
        "protections": st.get("protections", {}),
        "selftests": prepared.selftests,
        "ready_seconds": state.ready_seconds,
        "phases": phases.to_json(),
        "config": cfg.to_json(),
        "teardown_errors": errors,
    }
    if failure is not None:
        doc.update(error=type(failure).__name__, reason=str(failure))
    return write_report_files(cfg.run_dir, cfg["report"], doc)


def finish_report(run_dir: str, state: State, errors: list[str], failure: str = "") -> None:
    """Complete the READY report with the final status and write it to both places (the
    supervisor's report: it has no planner objects, only the files). A ``failure`` (nbdkit
    died) makes the state "failed" with its reason, so the post-mortem says why the device
    went away."""
    try:
        doc: dict[str, Any] = read_json(os.path.join(run_dir, REPORT))
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
    write_report_files(run_dir, state.report, doc)
