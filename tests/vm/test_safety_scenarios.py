"""Each safety rule on a real crash in which the hazard really happened (tests/vm SAFETY set).

The guest recorded the hazard itself (kpageflags, its own logs, QEMU's monitor), so these
checks do not depend on kdumpd's reading of the vmcore being right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.realcores import class_map, vmcore_dir, vmcores

from kdumpd.cli import main
from kdumpd.errors import RefusedError
from kdumpd.mm.classify import PageClass
from kdumpd.plan.gated import gated_plan
from kdumpd.plan.pipeline import Plan
from kdumpd.safety.hostfacts import parse_host_facts
from kdumpd.units import PAGE_SHIFT
from kdumpd.vmcore.core import open_vmcore


def _plan(name: str, **kw: object) -> Plan:
    with open_vmcore(vmcore_dir(name) / "vmcore") as vm:
        return gated_plan(vm, collector="makedumpfile -l -d 31", **kw).plan  # type: ignore[arg-type]


def _mask(plan: Plan, end_pfn: int) -> np.ndarray:
    mask = np.zeros(end_pfn, dtype=bool)
    for ext in plan.extents:
        mask[ext.start_pfn : min(ext.end_pfn, end_pfn)] = True
    return mask


def test_fatal_machine_check_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = vmcore_dir("mce-6.1")
    hz = vmcores.hazard(d)
    with open_vmcore(d / "vmcore") as vm, pytest.raises(RefusedError, match="rule 1"):
        gated_plan(vm, collector="makedumpfile -l -d 31")
    out = tmp_path / "extents"
    rc = main(["plan", str(d / "vmcore"), "--collector", "makedumpfile -l -d 31",
               "--extents", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == RefusedError.exit_code and not out.exists()
    assert len(err) == 1 and "Hardware Error" in err[0]
    # policy "exclude-range": the reported address's 2 MiB stays untouched, the rest is planned
    plan = _plan("mce-6.1", mce_policy="exclude-range")
    mask = _mask(plan, 1 << 20)
    pfn = hz["addr"] >> PAGE_SHIFT
    assert not mask[pfn & ~511 : (pfn & ~511) + 512].any()
    assert plan.reusable_pages > 0
    # the evidence line is the one the guest logged
    # (the address differs per capture: take it from the ground truth, not a literal)
    assert any(f"ADDR {hz['addr']:x} " in line for line in hz["hardware_error_lines"])


def test_hwpoison_pages_and_their_folios_are_never_planned() -> None:
    """Poisoned frames are never planned, whatever class their neighbours have.

    The kernel isolates a poisoned page before the crash: it splits a free buddy block around
    it (take_page_off_buddy) and splits a THP (memory_failure), so at the crash neighbours are
    ordinary free or anonymous pages and may be planned. The still-merged cases (poison inside
    a free block or a folio, which makedumpfile never looks for) are forced in
    tests/unit/test_synth_classify.py.
    """
    d = vmcore_dir("hwpoison-6.1")
    plan = _plan("hwpoison-6.1")
    _, classes = class_map(d / "vmcore")
    mask = _mask(plan, 1 << 20)
    poisoned = vmcores.hwpoison_pfns(d)
    assert len(poisoned) >= 4
    for pfn in poisoned:
        assert not mask[pfn], f"hwpoison pfn {pfn:#x} is planned"
    kinds = {t["pfn"]: t["kind"] for t in vmcores.hazard(d)["targets"]}
    split = [p for p, k in kinds.items() if k == "free"]
    assert split and all(classes[p] == PageClass.HWPOISON for p in split)
    assert any(k == "thp" for k in kinds.values())
    assert plan.categories["hwpoison"] and plan.categories["hwpoison"] >= 1


def test_ballooned_pages_are_never_planned() -> None:
    d = vmcore_dir("balloon-6.1")
    plan = _plan("balloon-6.1")
    mask = _mask(plan, 1 << 20)
    runs = vmcores.offline_pfn_runs(d)
    total = sum(count for _, count in runs)
    assert total == vmcores.hazard(d)["offline_pages"] == plan.categories["offline"]
    for first, count in runs:
        assert not mask[first : first + count].any()


def test_hot_removed_memory_is_never_planned() -> None:
    d = vmcore_dir("hotplug-6.1")
    hz = vmcores.hazard(d)
    plan = _plan("hotplug-6.1")
    start, end = hz["removed"][0] >> PAGE_SHIFT, hz["offline"][1] >> PAGE_SHIFT
    mask = _mask(plan, end + 1)
    # the stale PT_LOADs are still in the vmcore...
    with open_vmcore(d / "vmcore") as vm:
        assert any(r.start_paddr <= hz["removed"][0] < r.end_paddr for r in vm.phys.ranges)
    # ...but neither the removed nor the offlined DIMM is planned
    assert not mask[start:end].any()
    assert plan.reusable_pages > 0


def test_persistent_memory_is_never_planned() -> None:
    d = vmcore_dir("pmem-kmem-6.1")
    hz = vmcores.hazard(d)
    # What the capture kernel sees: its iomem (no NVDIMM driver there, so no pmem line) and
    # the firmware's NFIT table, which it reads from /sys/firmware/acpi/tables.
    nfit = sorted(d.glob("nfit.kdump*.bin"))
    assert nfit, "the scenario did not record the capture kernel's NFIT table"
    host = parse_host_facts((d / "iomem.kdump").read_text(), (d / "cmdline.kdump").read_text(),
                            nfit_tables=[p.read_bytes() for p in nfit])
    plan = _plan("pmem-kmem-6.1", host=host)
    (lo, hi), = ((a >> PAGE_SHIFT, b >> PAGE_SHIFT) for a, b in hz["pmem"])
    assert not _mask(plan, hi + 1)[lo:hi].any()
    # a host without the table (known to have none) would have had the kmem range planned:
    # the rule is what stops it...
    bare = _plan("pmem-kmem-6.1", host=parse_host_facts("", "", nfit_tables=[]))
    assert _mask(bare, hi + 1)[lo:hi].any()
    # ...and when the table is unknown (offline), the hot-added sections are withheld
    unknown = _plan("pmem-kmem-6.1", host=parse_host_facts("", ""))
    assert not _mask(unknown, hi + 1)[lo:hi].any()
