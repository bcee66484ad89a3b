"""Classification and planning on synthetic vmcores built from real kernels' VMCOREINFO.

Each case crafts struct pages that real guests rarely show (hwpoison inside a free block,
offline pages, gigantic folios across sections, absent sections) and checks the class and
reusability of every interesting pfn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.synth.builder import Machine, layout_variant, template

from kdumpd.mm.classify import PageClass
from kdumpd.plan.pipeline import Plan, make_plan
from kdumpd.vmcore.core import open_vmcore

KERNELS = ["6.1", "6.12"]


def _compound(m: Machine, head: int, order: int, *, anon: bool = False, hugetlb: bool = False,
              lru: bool = False) -> None:
    """A folio of ``1 << order`` pages in the layout of m's kernel."""
    info = m.info
    flags = int(info["NUMBER(PG_head_mask)"])
    if lru:
        flags |= m.flag("PG_lru")
    fields: dict[str, int] = {"flags": flags}
    if anon:
        fields["mapping"] = 0xFFFF888001234561
    if hugetlb and "NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)" in info:
        fields["_mapcount"] = int(info["NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)"])
    m.page(head, **fields)
    head_va = m.vmemmap + head * m.size_page
    for pfn in range(head + 1, head + (1 << order)):
        m.page(pfn, compound_head=head_va | 1)
    if "OFFSET(page.compound_order)" in info:  # 4.16..6.2: fields of page[1]
        m.page_byte(head + 1, int(info["OFFSET(page.compound_order)"]), order)
        dtor = int(info["NUMBER(HUGETLB_PAGE_DTOR)"]) if hugetlb else 3
        m.page_byte(head + 1, int(info["OFFSET(page.compound_dtor)"]), dtor)
    elif "OFFSET(folio._folio_order)" in info:  # 6.3..6.5: folio fields, counted from head
        m.page_byte(head + 1, int(info["OFFSET(folio._folio_order)"]) - m.size_page, order)
        dtor = int(info["NUMBER(HUGETLB_PAGE_DTOR)"]) if hugetlb else 3
        m.page_byte(head + 1, int(info["OFFSET(folio._folio_dtor)"]) - m.size_page, dtor)
    else:  # 6.6+: order in folio._flags_1 (the flags word of page[1])
        flags_1 = order
        if hugetlb and "NUMBER(PG_hugetlb)" in info:
            flags_1 |= 1 << int(info["NUMBER(PG_hugetlb)"])
        m.page(head + 1, flags=flags_1, compound_head=head_va | 1)


def _buddy(m: Machine, head: int, order: int) -> None:
    m.page(head, _mapcount=int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"]), private=order)


def _build(tmp_path: Path, kernel: str, **kw: object) -> tuple[Machine, Path]:
    info = template(kernel) if kernel in KERNELS else layout_variant("6.1", kernel)
    m = Machine(info, **kw)  # type: ignore[arg-type]
    # pfn 0x8000..: a zoo of page kinds
    _buddy(m, 0x8000, 3)                                  # free, order 3
    _buddy(m, 0x8008, 3)                                  # free, but an inner page is poisoned
    m.page(0x800A, flags=m.flag("PG_hwpoison"))
    m.page(0x8010, flags=m.flag("PG_lru"))                # clean page cache
    m.page(0x8011, flags=m.flag("PG_lru") | m.flag("PG_private"))  # cache with buffers
    m.page(0x8012, flags=m.flag("PG_lru"), mapping=0xFFFF888000ABC001)  # anon on LRU = user
    m.page(0x8013, _mapcount=int(m.info["NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)"]))  # offline
    m.page(0x8014, flags=m.flag("PG_hwpoison"))           # lone hwpoison
    if "NUMBER(PG_slab)" in m.info:
        m.page(0x8015, flags=m.flag("PG_slab"), mapping=0xFFFF888000ABC001)
    else:
        m.page(0x8015, _mapcount=int(m.info["NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)"]),
               mapping=0xFFFF888000ABC001)
    # swapcache alias: PG_swapcache without PG_swapbacked is PG_owner_priv_1, not cache
    m.page(0x8016, flags=m.flag("PG_swapcache"))
    m.page(0x8017, flags=m.flag("PG_swapcache") | m.flag("PG_swapbacked"))
    _compound(m, 0x8200, 9, anon=True, lru=True)        # THP
    _compound(m, 0x8400, 9, hugetlb=True)                 # hugetlb 2 MiB
    _compound(m, 0x8600, 9)                               # kernel compound page: kept
    _buddy(m, 0x8A00, 0xFF)                                # corrupt order: kept
    path = m.write(tmp_path / f"vmcore-{kernel}", offset_shift=3)
    return m, path


def _classes(path: Path) -> tuple[Plan, dict[int, int]]:
    import kdumpd.plan.pipeline as planmod

    seen: dict[int, int] = {}
    original = planmod.Classifier.classify

    def spy(self, start_pfn, pages, examined=None):  # type: ignore[no-untyped-def]
        res = original(self, start_pfn, pages, examined)
        for i, c in enumerate(res.classes):
            seen[start_pfn + i] = c
        return res

    planmod.Classifier.classify = spy  # type: ignore[method-assign]
    try:
        with open_vmcore(path) as vm:
            plan = make_plan(vm, 31)
    finally:
        planmod.Classifier.classify = original  # type: ignore[method-assign]
    return plan, seen


def _reusable(plan: Plan) -> np.ndarray:
    out = np.zeros(1 << 17, dtype=bool)
    for e in plan.extents:
        out[e.start_pfn : e.end_pfn] = True
    return out


@pytest.mark.parametrize("kernel", [*KERNELS, "folio-6.3", "pg_hugetlb-6.6", "unaccepted-6.16"])
@pytest.mark.parametrize("five_level", [False, True])
def test_zoo_classes_and_reuse(tmp_path: Path, kernel: str, five_level: bool) -> None:
    _, path = _build(tmp_path, kernel, five_level=five_level)
    plan, cls = _classes(path)
    reuse = _reusable(plan)
    P = PageClass
    expect = {
        0x8000: P.FREE, 0x8007: P.FREE, 0x8008: P.FREE, 0x800A: P.FREE, 0x800F: P.FREE,
        0x8010: P.CACHE, 0x8011: P.CACHE_PRIVATE, 0x8012: P.USER_ANON, 0x8013: P.OFFLINE,
        0x8014: P.HWPOISON, 0x8015: P.SLAB, 0x8016: P.KERNEL, 0x8017: P.CACHE,
        0x8200: P.USER_ANON, 0x8201: P.USER_ANON_TAIL, 0x83FF: P.USER_ANON_TAIL,
        0x8400: P.USER_HUGETLB, 0x8401: P.USER_HUGETLB_TAIL, 0x85FF: P.USER_HUGETLB_TAIL,
        0x8600: P.KERNEL, 0x8601: P.TAIL, 0x87FF: P.TAIL,
        0x8A00: P.KERNEL, 0x100: P.KERNEL,
    }
    got = {pfn: PageClass(cls[pfn]) for pfn in expect}
    assert got == expect
    if kernel == "pg_hugetlb-6.6":
        # makedumpfile issue #21: on 6.6..6.8 PG_hugetlb also marks kernel pages; withheld
        assert not reuse[0x8400:0x8600].any()
        assert {"user_hugetlb", "user_hugetlb_tail"} <= set(plan.withheld)
        reuse[0x8400:0x8600] = True  # the rest of the checks are the same
    # reusable at -d 31: free (not the poisoned block), cache, user; never hwpoison/offline/
    # slab/kernel/tails of kernel folios
    assert reuse[0x8000:0x8008].all()
    assert not reuse[0x8008:0x8010].any(), "a free block with a poisoned page must be withheld"
    assert reuse[0x8010] and reuse[0x8011] and reuse[0x8012] and reuse[0x8017]
    assert not reuse[[0x8013, 0x8014, 0x8015, 0x8016, 0x8600, 0x8601, 0x8A00]].any()
    assert reuse[0x8200:0x8600].all()
    assert plan.categories["hwpoison"] == 1 and plan.categories["offline"] == 1


@pytest.mark.parametrize("kernel", KERNELS)
def test_dump_levels_select_classes(tmp_path: Path, kernel: str) -> None:
    _, path = _build(tmp_path, kernel)
    with open_vmcore(path) as vm:
        by_level = {lvl: _reusable(make_plan(vm, lvl)) for lvl in (0, 1, 2, 4, 8, 16)}
    assert not by_level[0].any() and not by_level[1].any(), "zero bit never makes pages reusable"
    assert by_level[2][0x8010] and not by_level[2][0x8011]
    assert by_level[4][0x8010] and by_level[4][0x8011]
    assert by_level[8][0x8012] and by_level[8][0x8200] and not by_level[8][0x8010]
    assert by_level[16][0x8000] and not by_level[16][0x8012]


@pytest.mark.parametrize("kernel", KERNELS)
def test_gigantic_folio_across_sections_and_late_poison(tmp_path: Path, kernel: str) -> None:
    m = Machine(template(kernel), ram=512 << 20)
    _compound(m, 0x10000, 16, anon=True)  # 256 MiB folio spans sections 2..3 (128 MiB each)
    path = m.write(tmp_path / "a")
    plan, cls = _classes(path)
    assert PageClass(cls[0x10000]) == PageClass.USER_ANON
    assert PageClass(cls[0x1FFFF]) == PageClass.USER_ANON_TAIL
    assert _reusable(plan)[0x10000:0x20000].all()
    m.page(0x1F000, compound_head=(m.vmemmap + 0x10000 * m.size_page) | 1,
           flags=m.flag("PG_hwpoison"))
    plan, _ = _classes(m.write(tmp_path / "b"))
    assert not _reusable(plan)[0x10000:0x20000].any(), "poison in a later section withdraws all"


def test_absent_and_offline_sections_are_not_reused(tmp_path: Path) -> None:
    m = Machine(template("6.1"))
    _buddy(m, 0x2000, 10)  # not in the kernel image (pfn 0x1000..)
    _buddy(m, 0x9000, 10)
    _buddy(m, 0x9800, 10)
    m.set_section(0, 0x3)  # present + mem_map, but not online
    path = m.write(tmp_path / "v", ranges=[(0, 0x9900000), (0x9A00000, 256 << 20)])
    with open_vmcore(path) as vm:
        plan = make_plan(vm, 31)
    reuse = _reusable(plan)
    assert not reuse[0x2000:0x2400].any(), "section 0 is not online"
    assert reuse[0x9000:0x9400].all()
    assert reuse[0x9800:0x9900].all() and reuse[0x9A00:0x9C00].all()
    assert not reuse[0x9900:0x9A00].any(), "outside every PT_LOAD"
    m.set_section(1, 0x0)  # absent: no struct pages to trust
    with open_vmcore(m.write(tmp_path / "w")) as vm:
        plan = make_plan(vm, 31)
    assert not _reusable(plan)[0x8000:0x10000].any()
    assert plan.class_pages["no_memmap"] == 0x8000


@pytest.mark.parametrize("leaf", [4096, 1 << 21])
def test_vmemmap_leaf_sizes_and_sme_mask(tmp_path: Path, leaf: int) -> None:
    m = Machine(template("6.12"), vmemmap_leaf=leaf, direct_leaf=1 << 21,
                sme_mask=1 << 47, phys_base=0x2000000)
    _buddy(m, 0x8000, 4)
    plan, cls = _classes(m.write(tmp_path / "v"))
    assert PageClass(cls[0x800F]) == PageClass.FREE
    assert _reusable(plan)[0x8000:0x8010].all()


def test_unaccepted_pages_are_free_but_never_reused(tmp_path: Path) -> None:
    m = Machine(layout_variant("6.1", "unaccepted-6.16"))
    m.page(0x8000, _mapcount=0xF7000000)  # a MAX_PAGE_ORDER block of unaccepted memory
    plan, cls = _classes(m.write(tmp_path / "u"))
    assert PageClass(cls[0x8000]) == PageClass.UNACCEPTED
    assert PageClass(cls[0x83FF]) == PageClass.UNACCEPTED  # 1 << (11 - 1) pages
    assert PageClass(cls[0x8400]) == PageClass.KERNEL
    assert plan.categories["free"] == 1024
    assert not _reusable(plan)[0x8000:0x8400].any()
