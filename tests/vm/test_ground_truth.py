"""kdumpd against what the crashed guest itself said about its pages, just before the crash.

The guest recorded the physical frames of its anonymous, THP and hugetlb workload (from
/proc/self/pagemap) and the whole of /proc/kpageflags. This oracle is independent of
makedumpfile, which matters on 6.12 where Debian's makedumpfile is wrong. The snapshot is taken
about a second before the crash, so a little drift is allowed in the flag comparisons; the
workload pages themselves do not move and must match exactly.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from tests.realcores import NAMES, class_map, vmcore_dir, vmcores

from kdumpd.mm.classify import PageClass
from kdumpd.plan.pipeline import Plan
from kdumpd.vmcore.core import open_vmcore

P = PageClass
# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF_LRU, KPF_SLAB, KPF_BUDDY, KPF_ANON, KPF_HUGE = 5, 7, 10, 12, 17
DRIFT = 0.99


@cache
def _data(name: str) -> tuple[Path, Plan, npt.NDArray[np.uint8], npt.NDArray[np.uint64]]:
    directory = vmcore_dir(name)
    plan, classes = class_map(directory / "vmcore")
    kpf = np.frombuffer((directory / "kpageflags").read_bytes(), dtype=np.uint64)
    n = min(len(kpf), len(classes))
    return directory, plan, classes[:n], kpf[:n]


@pytest.fixture(params=NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# Pages inside an excluded folio have their own classes (the head's, as a tail): they are
# the same kind of memory as the head.
USER = [P.USER_ANON, P.USER_HUGETLB, P.USER_ANON_TAIL, P.USER_HUGETLB_TAIL]
CACHE = [P.CACHE, P.CACHE_PRIVATE, P.CACHE_TAIL, P.CACHE_PRIVATE_TAIL]


def _agree(classes: np.ndarray, mask: np.ndarray, allowed: list[PageClass]) -> float:
    total = int(mask.sum())
    assert total > 0
    return float(np.isin(classes[mask], allowed).sum()) / total


def test_workload_pages_are_user_and_intact(name: str) -> None:
    directory, plan, classes, _ = _data(name)
    reusable = np.zeros(len(classes), dtype=bool)
    for ext in plan.extents:
        reusable[ext.start_pfn : ext.end_pfn] = True
    count = 0
    with open_vmcore(directory / "vmcore") as vm:
        for run in vmcores.workload_pfns(directory):
            for k in range(run.count):
                pfn = run.first_pfn + k
                expected = vmcores.workload_page(run.region, run.first_index + k)
                assert vm.phys.read(pfn << 12, 4096) == expected, f"pfn {pfn:#x}"
                assert classes[pfn] in USER, f"pfn {pfn:#x}"
                assert reusable[pfn], f"pfn {pfn:#x} of user data is not planned at -d 31"
                count += 1
    assert count >= 51200


def test_classes_agree_with_kpageflags(name: str) -> None:
    _, _, classes, kpf = _data(name)

    def bit(b: int) -> np.ndarray:
        return (kpf & np.uint64(1 << b)) != 0

    assert _agree(classes, bit(KPF_BUDDY), [P.FREE]) >= DRIFT
    assert _agree(classes, bit(KPF_SLAB), [P.SLAB, P.TAIL]) >= DRIFT
    assert _agree(classes, bit(KPF_ANON) & ~bit(KPF_SLAB), USER) >= DRIFT
    assert _agree(classes, bit(KPF_HUGE), USER) >= DRIFT
    assert _agree(classes, bit(KPF_LRU) & ~bit(KPF_ANON), CACHE) >= DRIFT
    # and the other way round: nothing the guest saw as slab is ever planned for reuse
    assert not np.isin(classes[bit(KPF_SLAB)], [P.FREE, *CACHE, *USER]).any()
