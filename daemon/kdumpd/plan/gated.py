"""Planning behind the safety gate: the only way the daemon gets a plan it may write into.

Gathers the facts (the crash log and notes, the collector and its version, the capture
kernel's own memory), asks the gate, and plans with what the gate leaves. Any refusal raises
RefusedError before a plan exists, so nothing can be written.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kdumpd.crash.facts import CrashFacts, crash_facts
from kdumpd.crash.log import read_crash_log
from kdumpd.errors import ConfigError, KdumpdError, RefusedError
from kdumpd.mm.pagelayout import PageLayout
from kdumpd.plan.pipeline import Plan, Progress, make_plan
from kdumpd.safety.collector import parse_collector
from kdumpd.safety.gate import Decision, decide
from kdumpd.safety.hostfacts import HostFacts, parse_host_facts
from kdumpd.safety.kdumpconf import CollectorSource, discover
from kdumpd.vmcore.core import Vmcore

__all__ = ["DEFAULT_COLLECTOR", "GatedPlan", "collector_version", "gated_plan",
           "host_facts_here"]

log = logging.getLogger(__name__)
DEFAULT_COLLECTOR = "makedumpfile -d 31"


@dataclass(frozen=True, slots=True)
class GatedPlan:
    plan: Plan
    decision: Decision
    crash: CrashFacts


def collector_version(program: str = "makedumpfile") -> str | None:
    """The version ("1.7.2") of the makedumpfile the collector line names: ``program`` is its
    argv[0], a path (asked directly) or a bare name (looked up on PATH, as the shell running
    the collector would); None if there is no such program or it says no version."""
    path = program if "/" in program else shutil.which(program)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version\s+(\d+(?:\.\d+)+)", out.stdout + out.stderr)
    return m.group(1) if m else None


def host_facts_here(vmcore: Path) -> HostFacts | None:
    """The capture kernel's iomem/cmdline facts when planning the live /proc/vmcore."""
    if vmcore.resolve() != Path("/proc/vmcore"):
        return None
    iomem = Path("/proc/iomem").read_text(errors="replace")
    cmdline = Path("/proc/cmdline").read_text(errors="replace")
    tables = [p.read_bytes() for p in sorted(Path("/sys/firmware/acpi/tables").glob("NFIT*"))]
    try:
        return parse_host_facts(iomem, cmdline, nfit_tables=tables)
    except ValueError as exc:
        raise RefusedError(f"rules 4 and 8 (persistent memory, the capture kernel's own RAM) "
                           f"cannot be checked: {exc}") from None


def gated_plan(
    vm: Vmcore,
    *,
    collector: str | None = None,
    host: HostFacts | None = None,
    mce_policy: str = "refuse",
    config_root: str = "/",
    count_zero: bool = False,
    progress: Progress | None = None,
) -> GatedPlan:
    """Plan ``vm`` behind every safety rule; raise RefusedError naming the rule if refused."""
    if collector is not None:
        source = CollectorSource(collector, "--collector")
    else:
        source = discover(config_root) or CollectorSource(
            DEFAULT_COLLECTOR, "default (no kdump configuration found)")
    try:
        parsed = parse_collector(source.cmdline)
    except ConfigError as exc:  # name the file (or flag) the collector line came from
        raise ConfigError(f"{source.source}: {exc}") from None
    version = collector_version(parsed.program) if parsed.kind == "makedumpfile" else None
    layout = PageLayout.from_vmcoreinfo(vm.info)
    try:
        records = read_crash_log(vm)
    except KdumpdError as exc:
        raise RefusedError(
            f"rule 1 (hardware memory error) cannot be checked: the crashed kernel's log is "
            f"unreadable ({exc})") from None
    facts = crash_facts(records, vm.header.notes)
    decision = decide(
        collector=parsed, collector_source=source.source, collector_version=version,
        layout=layout, crash=facts, host=host, mce_policy=mce_policy,
    )
    for rule in decision.rules:
        log.info("safety: %s", rule)
    if decision.refusal:
        raise RefusedError(decision.refusal)
    plan = make_plan(
        vm, decision.dump_level,
        withheld=decision.withheld,
        forbidden=[(r.start_paddr, r.end_paddr, r.key) for r in decision.forbidden],
        min_run_pages=decision.min_run_pages,
        withhold_hotplugged=decision.withhold_hotplugged,
        count_zero=count_zero,
        progress=progress,
    )
    plan.features["safety_rules"] = list(decision.rules)
    plan.features["collector_version"] = version
    return GatedPlan(plan, decision, facts)
