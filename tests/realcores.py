"""Shared access to the real vmcores made by tests/vm, and kdumpd's per-pfn class map of them."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

import kdumpd.plan.pipeline as planmod
from kdumpd.plan.pipeline import Plan, make_plan
from kdumpd.units import PAGE_SHIFT
from kdumpd.vmcore.core import open_vmcore

sys.path.insert(0, str(Path(__file__).resolve().parent / "vm"))
import vmcores  # noqa: E402

NAMES = [spec.name for spec in vmcores.STANDARD]


@cache
def vmcore_dir(name: str) -> Path:
    """The directory of real vmcore ``name``, generated in QEMU if missing or stale."""
    return vmcores.ensure(name)


@cache
def class_map(vmcore: Path) -> tuple[Plan, npt.NDArray[np.uint8]]:
    """The -d 31 plan and every pfn's class, from the same pipeline the CLI runs."""
    captured: dict[int, npt.NDArray[np.uint8]] = {}
    original = planmod.Classifier.classify

    def spy(self, start_pfn, pages, examined=None):  # type: ignore[no-untyped-def]
        res = original(self, start_pfn, pages, examined)
        captured[start_pfn] = np.frombuffer(bytes(res.classes), dtype=np.uint8)
        return res

    planmod.Classifier.classify = spy  # type: ignore[method-assign]
    try:
        with open_vmcore(vmcore) as vm:
            plan = make_plan(vm, 31)
            end = max(r.end_paddr for r in vm.phys.ranges) >> PAGE_SHIFT
    finally:
        planmod.Classifier.classify = original  # type: ignore[method-assign]
    classes = np.zeros(end, dtype=np.uint8)
    for start, arr in captured.items():
        classes[start : start + len(arr)] = arr
    return plan, classes
