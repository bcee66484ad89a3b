"""Real vmcores with one struct page offset of their VMCOREINFO falsified are refused (exit 4).

Issue 15: with ``OFFSET(page.flags)=9`` a 6.1 vmcore surveyed "fine" (106,346 reusable pages,
12 "hwpoison" pages), and makedumpfile accepts it too. A copy of the vmcore gets the lie
written into its VMCOREINFO note (same length, so nothing else moves); each plausibility check
of ``kdumpd.mm.plausible`` must catch at least one lie, and the true layout must pass them all.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdumpd.cli import main
from kdumpd.plan.pipeline import make_plan
from kdumpd.vmcore.core import open_vmcore
from tests.realcores import NAMES, vmcore_dir

REAL = [n for n in NAMES if n in ("6.1-1g-kaslr", "6.12-1g-kaslr")]

# (the true line, the lie, the check that must catch it)
LIES = [
    ("OFFSET(page.flags)=0", "OFFSET(page.flags)=9", "the kernel's own text"),
    ("OFFSET(page._mapcount)=48", "OFFSET(page._mapcount)=52", "classify as free"),
    ("OFFSET(page.private)=40", "OFFSET(page.private)=32", "classify as free"),
    ("OFFSET(page.compound_head)=8", "OFFSET(page.compound_head)=0", "compound heads"),
    ("OFFSET(page.mapping)=24", "OFFSET(page.mapping)=32", "not swap-backed"),
]


@pytest.fixture(scope="module", params=REAL)
def copy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Path]:
    dst = tmp_path_factory.mktemp("lie") / "vmcore"
    shutil.copyfile(vmcore_dir(request.param) / "vmcore", dst)
    yield dst
    dst.unlink()


def _patch(path: Path, old: str, new: str) -> None:
    assert len(old) == len(new)
    with open(path, "r+b") as fh:
        head = fh.read(1 << 20)
        at = head.index(old.encode())
        fh.seek(at)
        fh.write(new.encode())


def test_the_true_layout_passes(copy: Path) -> None:
    with open_vmcore(copy) as vm:
        ev = make_plan(vm, 31).features["plausibility"]
    assert ev["kernel_pages_checked"] == 256
    assert ev["compound_heads"] > 100 and ev["compound_heads_inconsistent"] == 0
    assert ev["anon_lru_pages"] > 1000 and ev["anon_lru_not_swapbacked"] == 0
    # The crash path folds the per-cpu deltas: the kernel's count is exact.
    assert ev["free_pages_classified"] == ev["free_pages_counter"] > 0


@pytest.mark.parametrize(("true", "lie", "why"), LIES)
def test_a_falsified_offset_is_refused(copy: Path, capsys: pytest.CaptureFixture[str],
                                       true: str, lie: str, why: str) -> None:
    _patch(copy, true, lie)
    try:
        rc = main(["survey", str(copy)])
    finally:
        _patch(copy, lie, true)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 4
    assert len(err) == 1 and err[0].startswith("kdumpd: LayoutError: implausible"), err
    assert why in err[0], err
