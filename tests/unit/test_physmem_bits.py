"""The physical address width that sizes mem_section comes from the vmcore: VMCOREINFO's
NUMBER(MAX_PHYSMEM_BITS) when the kernel exports it, the paging mode's width when it does not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kdumpd.errors import LayoutError
from kdumpd.mm.memmap import MemSections
from kdumpd.plan.pipeline import make_plan
from kdumpd.vmcore.core import open_vmcore
from kdumpd.xlat import make_translator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "synth"))
from builder import SECTION_BITS, Machine, template  # noqa: E402

_PER_ROOT = 4096 // int(template("6.12")["SIZE(mem_section)"])  # sections per extreme root


def _roots(bits: int) -> int:
    return -(-(1 << (bits - SECTION_BITS)) // _PER_ROOT)


def _core(tmp_path: Path, five_level: bool, exported: int | None) -> Path:
    """A 6.12 machine whose VMCOREINFO exports MAX_PHYSMEM_BITS=``exported`` (None: not at
    all) and whose LENGTH(mem_section) is sized by the width the kernel really used."""
    m = Machine(template("6.12"), ram=128 << 20, five_level=five_level)
    buddy = int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"])
    m.page(0x6000, _mapcount=buddy, private=9)  # one free order-9 block: 512 reusable pages
    used = exported if exported is not None else (52 if five_level else 46)
    extra = f"LENGTH(mem_section)={_roots(used)}\n"
    if exported is not None:
        extra += f"NUMBER(MAX_PHYSMEM_BITS)={exported}\n"
    return m.write(tmp_path / "core", drop_keys=("NUMBER(MAX_PHYSMEM_BITS)", "LENGTH(mem_section)"),
                   extra_text=extra)


def _bits(path: Path) -> int:
    with open_vmcore(path) as vm:
        xlat = make_translator(vm.header.arch, vm.info, vm.header.loads, vm.phys.read_u64)
        return MemSections(vm.info, lambda va: vm.phys.read_u64(xlat.translate(va)),
                           xlat.max_physmem_bits).max_physmem_bits


@pytest.mark.parametrize("five_level", [False, True])
def test_an_exported_width_wins_over_the_paging_mode(tmp_path: Path, five_level: bool) -> None:
    """A kernel built with a narrower MAX_PHYSMEM_BITS (44) than its paging mode allows: the
    exported value sizes mem_section; the paging mode's would not match LENGTH(mem_section)."""
    core = _core(tmp_path, five_level, 44)
    assert _bits(core) == 44
    with open_vmcore(core) as vm:
        assert make_plan(vm, 31).reusable_pages == 512


@pytest.mark.parametrize(("five_level", "expected"), [(False, 46), (True, 52)])
def test_without_the_number_the_paging_mode_decides(tmp_path: Path, five_level: bool,
                                                    expected: int) -> None:
    core = _core(tmp_path, five_level, None)
    assert _bits(core) == expected
    with open_vmcore(core) as vm:
        plan = make_plan(vm, 31)
    assert plan.features["paging_levels"] == (5 if five_level else 4)
    assert plan.reusable_pages == 512


def test_a_width_that_disagrees_with_mem_section_is_refused(tmp_path: Path) -> None:
    """The width is checked against LENGTH(mem_section), so a wrong source cannot go unseen."""
    m = Machine(template("6.12"), ram=128 << 20)
    core = m.write(tmp_path / "core", drop_keys=("NUMBER(MAX_PHYSMEM_BITS)",),
                   extra_text="NUMBER(MAX_PHYSMEM_BITS)=44\n")
    with open_vmcore(core) as vm, pytest.raises(LayoutError, match="LENGTH\\(mem_section\\)"):
        make_plan(vm, 31)
