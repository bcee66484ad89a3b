"""Preparing a serve run: configuration -> plan -> backend -> self-test -> ``runconf.json``.

Everything that can refuse (the plan behind the safety gate, the backend's own checks, the
self-test, the capacity) runs here, before nbdkit exists, so a refusal is one line and a
non-zero exit before the first write to old memory. Nothing is written to old memory (the
vmcore backend's probe rewrites one granted page with its own bytes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdumpd.config import Config
from kdumpd.errors import BackendError, RefusedError
from kdumpd.nbd.selftest import run_selftest
from kdumpd.oldmem.backend import open_backend
from kdumpd.oldmem.base import drop_contained, identity_ranges
from kdumpd.oldmem.devmem import DevMem
from kdumpd.oldmem.spec import PROC_VMCORE, BackendSpec, parse_backend, resolve_backend
from kdumpd.oldmem.vmcore_rw import VmcoreRW
from kdumpd.phases import Phases
from kdumpd.plan.gated import gated_plan, host_facts_here
from kdumpd.plan.pipeline import Plan
from kdumpd.serve.runconf import RunConf
from kdumpd.serve.rundir import RUNCONF, make_run_dir
from kdumpd.store.placement import Placement
from kdumpd.units import PAGE_SHIFT, PAGE_SIZE, Extent, PhysRange, coalesce, human_size
from kdumpd.vmcore.core import Vmcore, open_vmcore

__all__ = ["Prepared", "plan_for_serve", "plan_summary", "prepare", "store_capacity"]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class Prepared:
    """The outcome of :func:`prepare`: the plan, and the run configuration written for the
    plugin."""

    plan: Plan
    runconf: RunConf
    runconf_path: str
    capacity_bytes: int
    selftests: int


def store_capacity(placement: Placement) -> int:
    """Bytes a store over ``placement`` can hold (groups less the spares), as BlockStore
    computes it, without allocating a store."""
    ngroups = placement.ngroups
    spares = max(1, min(1024, ngroups // 256)) if ngroups > 1 else 0
    return (ngroups - spares) * PAGE_SIZE


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan as the report and ``runconf.json`` show it."""
    return {
        "osrelease": plan.osrelease,
        "dump_level": plan.dump_level,
        "reusable_pages": plan.reusable_pages,
        "reusable_bytes": plan.reusable_bytes,
        "extents": len(plan.extents),
        "extent_list": [f"{e.start_pfn:#x}-{e.end_pfn:#x}" for e in plan.extents],
        "categories": plan.categories,
        "withheld": plan.withheld_json(),
    }


def _package_dir() -> str:
    import kdumpd

    return os.path.dirname(os.path.dirname(os.path.abspath(kdumpd.__file__)))


def _probe_auto(asked: BackendSpec, spec: BackendSpec, ranges: tuple[PhysRange, ...],
                plan: Plan) -> BackendSpec:
    """``auto`` resolved to the vmcore backend falls back to /dev/mem if this kernel's
    /proc/vmcore is read-only (probed by rewriting one granted page with its own bytes)."""
    if asked.kind != "auto" or spec.kind != "vmcore":
        return spec
    try:
        VmcoreRW(ranges, probe_paddr=plan.extents[0].start_paddr).close()
        return spec
    except BackendError as exc:
        log.info("backend: %s; using /dev/mem", exc)
        return BackendSpec("devmem")


def _devmem_mappable(plan: Plan) -> Plan:
    """The plan less what /dev/mem will not map (busy iomem resources: see
    :meth:`DevMem.mappable`), so that no slot is ever placed where a write would fail."""
    mem = DevMem(identity_ranges(plan.extents))  # refuses outside a kdump kernel
    try:
        ok = mem.mappable()
    finally:
        mem.close()
    extents = tuple(coalesce(Extent(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT) for lo, hi in ok))
    dropped = plan.reusable_pages - sum(e.npages for e in extents)
    if not dropped:
        return plan
    why = (f"{dropped} pages ({human_size(dropped * PAGE_SIZE)}) that /dev/mem refuses to map "
           "(busy iomem resources such as 'RAM buffer')")
    log.info("devmem: left out %s", why)
    if not extents:
        raise RefusedError(f"devmem: the kernel refuses to map any of the plan: {why}")
    return replace(plan, extents=extents, withheld={**plan.withheld, "devmem": why},
                   withheld_pages={**plan.withheld_pages, "devmem": dropped})


def _check_size(cfg: Config, capacity: int) -> int:
    """The device size: the configured one, or the capacity (auto). Swap larger than the
    capacity is refused; anything else larger is thin, with a warning."""
    if cfg.size > capacity and cfg.use_as == "swap":
        raise RefusedError(
            f"size {human_size(cfg.size)} exceeds what old memory holds at {cfg.copies} copies "
            f"({human_size(capacity)}) (rule: swap is never thin: a full pool would fail "
            "swap-out with ENOSPC)")
    if cfg.size and cfg.size > capacity:
        log.warning("size %s exceeds the capacity %s at %d copies: writes past it get ENOSPC",
                    human_size(cfg.size), human_size(capacity), cfg.copies)
    return cfg.size or capacity


def prepare(cfg: Config, phases: Phases | None = None) -> Prepared:
    """Plan, probe the backend, self-test, check the capacity, open the backend once, and
    write ``runconf.json`` into the (created) run directory. Every refusal raises here."""
    run_dir = cfg.run_dir
    ph = phases or Phases()
    make_run_dir(run_dir)
    with ph.measure("plan"), open_vmcore(cfg.vmcore) as vm:
        plan = plan_for_serve(vm, cfg)
        ranges = tuple(drop_contained(vm.phys.ranges))
    if not plan.extents:
        raise RefusedError(f"the plan grants no old memory at dump level {plan.dump_level} "
                           "(rule: write only inside the plan)")
    with ph.measure("backend_probe"):
        asked = parse_backend(cfg.backend)
        spec = resolve_backend(asked, cfg.vmcore, have_proc_vmcore=os.path.exists(PROC_VMCORE))
        spec = _probe_auto(asked, spec, ranges, plan)
        if spec.kind == "devmem":
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
    size = _check_size(cfg, capacity)
    with ph.measure("backend_open"):
        open_backend(str(spec), ranges, plan.extents).close()  # refusals here, before nbdkit
    rc = RunConf(
        run_dir=os.path.abspath(run_dir),
        package_dir=_package_dir(),
        backend=str(spec),
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
        plan_summary=plan_summary(plan),
    )
    path = os.path.join(run_dir, RUNCONF)
    rc.write(path)
    log.info("plan: %s reusable in %d extents at dump level %d; device %s at %d copies "
             "(capacity %s); backend %s", human_size(plan.reusable_bytes), len(plan.extents),
             plan.dump_level, human_size(size), cfg.copies, human_size(capacity), spec)
    return Prepared(plan, rc, path, capacity, selftests)
