"""Plausibility checks: a VMCOREINFO whose struct page layout is wrong is refused (exit 4).

Synthetic vmcores whose struct pages look like a real kernel's (the kernel image reserved,
compound folios, a free counter in the zone) and a VMCOREINFO that lies about one offset,
as in issue 15 (``OFFSET(page.flags)=9``). The same checks run against real vmcores with a
patched VMCOREINFO in ``tests/oracle/test_plausible_real.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.synth.builder import Machine, template

from kdumpd.cli import main
from kdumpd.errors import LayoutError
from kdumpd.mm.classify import PageClass
from kdumpd.mm.pagelayout import PageLayout
from kdumpd.mm.plausible import Evidence, check
from kdumpd.plan.pipeline import make_plan
from kdumpd.vmcore.core import open_vmcore
from kdumpd.vmcore.vmcoreinfo import parse_vmcoreinfo

KERNELS = ["6.1", "6.12"]
BUDDY_PAGES = 16 * 512


def _machine(kernel: str, folios: int = 40) -> Machine:
    """Free blocks, THPs and a kernel image whose struct pages look like a booted kernel's:
    reserved, refcount 1, no mapcount, lru an empty list (pointing at itself)."""
    m = Machine(template(kernel))
    buddy = int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"])
    for k in range(16):
        m.page(0x8000 + 512 * k, _mapcount=buddy, private=9)
    head_mask = int(m.info["NUMBER(PG_head_mask)"])
    for k in range(folios):
        head = 0xA000 + 2 * k
        va = m.vmemmap + head * m.size_page
        m.page(head, flags=head_mask | m.flag("PG_lru") | m.flag("PG_swapbacked"),
               mapping=0xFFFF888001234561)
        m.page(head + 1, compound_head=va | 1, flags=1)  # order 1 in _flags_1 (6.6+)
        if "OFFSET(page.compound_order)" in m.info:
            m.page_byte(head + 1, int(m.info["OFFSET(page.compound_order)"]), 1)
    text = m.phys_base >> 12
    for pfn in range(text, text + 512):
        lru = m.vmemmap + pfn * m.size_page + int(m.info["OFFSET(page.lru)"])
        m.page(pfn, flags=1 << 12, lru=lru, _refcount=1, _mapcount=0xFFFFFFFF)
        m.page_byte(pfn, int(m.info["OFFSET(page.lru)"]) + 8, lru & 0xFF)  # lru.prev
    return m


def _write(m: Machine, path: Path, **patch: int) -> Path:
    text = "".join(f"OFFSET(page.{k})={v}\n" for k, v in patch.items())
    drop = tuple(f"OFFSET(page.{k})=" for k in patch)
    return m.write(path, drop_keys=drop, extra_text=text)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_true_layout_passes_with_its_evidence(tmp_path: Path, kernel: str) -> None:
    m = _machine(kernel)
    m.set_free_counter(BUDDY_PAGES)
    with open_vmcore(_write(m, tmp_path / "v")) as vm:
        plan = make_plan(vm, 31)
    ev = plan.features["plausibility"]
    assert ev["kernel_pages_checked"] == 256
    assert ev["compound_heads"] == 40 and ev["compound_heads_inconsistent"] == 0
    assert ev["free_pages_classified"] == ev["free_pages_counter"] == BUDDY_PAGES
    assert ev["anon_lru_pages"] == 40 and ev["anon_lru_not_swapbacked"] == 0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("patch", "why"), [
    ({"flags": 9}, "the kernel's own text"),       # issue 15's VMCOREINFO
    ({"compound_head": 16}, "compound heads"),
    ({"_mapcount": 52}, "classify as free"),
    ({"private": 32}, "classify as free"),
])
def test_a_wrong_offset_is_refused_with_exit_4(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kernel: str,
        patch: dict[str, int], why: str) -> None:
    m = _machine(kernel)
    m.set_free_counter(BUDDY_PAGES)
    path = _write(m, tmp_path / "v", **patch)
    assert main(["survey", str(path)]) == LayoutError.exit_code == 4
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("kdumpd: LayoutError: implausible struct page layout"), err
    assert why in err[0], err


def test_free_counter_is_compared_when_the_vmcore_has_it(tmp_path: Path) -> None:
    m = _machine("6.12")
    m.set_free_counter(BUDDY_PAGES + 50_000)  # the kernel counted far more free pages
    with open_vmcore(_write(m, tmp_path / "v")) as vm, pytest.raises(LayoutError, match="zone"):
        make_plan(vm, 31)
    m.set_free_counter(BUDDY_PAGES + 300)  # per-cpu drift: tolerated
    with open_vmcore(_write(m, tmp_path / "w")) as vm:
        assert make_plan(vm, 31).features["plausibility"]["free_pages_counter"] == 8492


def test_no_counter_in_the_vmcore_is_not_a_failure(tmp_path: Path) -> None:
    with open_vmcore(_write(_machine("6.1"), tmp_path / "v")) as vm:
        assert make_plan(vm, 31).features["plausibility"]["free_pages_counter"] is None


def test_check_rules() -> None:
    text = (Path(__file__).resolve().parents[1] / "data" / "vmcoreinfo-6.12.txt").read_bytes()
    lay = PageLayout.from_vmcoreinfo(parse_vmcoreinfo(text))
    check(Evidence({0x1000: PageClass.KERNEL}, heads=1000, bad_heads=10), lay)
    with pytest.raises(LayoutError, match="classifies as tail"):
        check(Evidence({0x1000: PageClass.TAIL}), lay)
    with pytest.raises(LayoutError, match="17 of 100 compound heads"):
        check(Evidence(heads=100, bad_heads=17), lay)
    check(Evidence(anon_lru=100_000, anon_not_swapbacked=20_000), lay)  # MADV_FREE'd
    with pytest.raises(LayoutError, match="not swap-backed"):
        check(Evidence(anon_lru=100_000, anon_not_swapbacked=30_000), lay)
