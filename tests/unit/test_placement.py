"""Placement: copies of a block are far apart, never in one 2 MiB window, inside the extents,
distinct, deterministic; small pools are refused with the rule named. Brute force checks the
closed-form distance on random fragmented pools."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdumpd.errors import RefusedError
from kdumpd.store.placement import HUGE_PAGE_SIZE, Placement
from kdumpd.units import PAGE_SHIFT, PAGE_SIZE, Extent

HUGE_PAGES = HUGE_PAGE_SIZE // PAGE_SIZE


@st.composite
def pools(draw, min_pages=0):
    """Sorted disjoint extents: fragmented (1-page extents) to large, holes of any size."""
    n = draw(st.integers(1, 12))
    pfn = draw(st.integers(0, 1 << 20))
    extents = []
    for _ in range(n):
        pfn += draw(st.integers(1, 1 << 16))  # the hole before (>= 1 keeps extents apart)
        size = draw(st.one_of(st.integers(1, 8), st.integers(1, 4096)))
        extents.append(Extent(pfn, pfn + size))
        pfn += size
    total = sum(e.npages for e in extents)
    if total < min_pages:
        extents.append(Extent(pfn + 1, pfn + 1 + min_pages - total))
    return extents


def all_slots(p: Placement) -> list[list[int]]:
    return [[p.slot_pfn(c, g) for c in range(p.copies)] for g in range(p.ngroups)]


def brute_min_distance(p: Placement) -> int:
    return min(
        (slots[c + 1] - slots[c] for slots in all_slots(p) for c in range(p.copies - 1)),
        default=0,
    )


@settings(max_examples=150, deadline=None)
@given(pools(min_pages=4 * HUGE_PAGES), st.integers(1, 4))
def test_copies_far_apart_inside_extents_and_distinct(extents, copies) -> None:
    p = Placement.from_extents(extents, copies)
    slots = all_slots(p)
    flat = [pfn for group in slots for pfn in group]
    assert len(set(flat)) == len(flat) == copies * p.ngroups
    assert all(any(e.start_pfn <= pfn < e.end_pfn for e in extents) for pfn in flat)
    if copies > 1:
        assert p.min_distance_bytes == brute_min_distance(p) << PAGE_SHIFT
        assert p.min_distance_bytes >= HUGE_PAGE_SIZE
        assert p.min_distance_bytes >= p.ngroups * PAGE_SIZE  # holes only add distance
        for group in slots:
            windows = {(pfn << PAGE_SHIFT) // HUGE_PAGE_SIZE for pfn in group}
            assert len(windows) == copies, "two copies of a block in one 2 MiB window"


@settings(max_examples=100, deadline=None)
@given(pools(min_pages=2 * HUGE_PAGES), st.integers(1, 4), st.data())
def test_runs_and_inverse_agree_with_slot_pfn(extents, copies, data) -> None:
    try:
        p = Placement.from_extents(extents, copies)
    except RefusedError:
        return
    copy = data.draw(st.integers(0, copies - 1))
    group = data.draw(st.integers(0, p.ngroups - 1))
    count = data.draw(st.integers(1, p.ngroups - group))
    expect = [p.slot_pfn(copy, g) << PAGE_SHIFT for g in range(group, group + count)]
    got = [paddr + (i << PAGE_SHIFT) for paddr, n in p.iter_runs(copy, group, count)
           for i in range(n)]
    assert got == expect
    for g in (group, group + count - 1):
        paddr = p.slot_paddr(copy, g)
        assert p.locate_paddr(paddr + 123) == (copy, g)
    assert p.group_paddrs(group)[copy] == p.slot_paddr(copy, group)


def test_one_burst_cannot_hit_two_copies() -> None:
    # Every burst shorter than min distance - 4 KiB + 2 bytes touches at most one copy.
    extents = [Extent(0x100, 0x900), Extent(0x10000, 0x10A00), Extent(0x20000, 0x20200)]
    p = Placement.from_extents(extents, 3)
    limit = p.min_distance_bytes - PAGE_SIZE + 1  # longest burst the claim covers
    for group in range(0, p.ngroups, 7):
        paddrs = p.group_paddrs(group)
        for a, b in zip(paddrs, paddrs[1:], strict=False):
            # The burst that comes closest: from the last byte of one copy onwards.
            assert (a + PAGE_SIZE - 1) + limit <= b


def test_bands_split_the_pool_evenly_and_deterministically() -> None:
    extents = [Extent(0x1000, 0x1800), Extent(0x3000, 0x3C01)]  # 2048 + 3073 pages
    p = Placement.from_extents(extents, 2)
    assert p.ngroups == 2560 and p.unused_pages == 1
    assert p.slot_pfn(0, 0) == 0x1000
    assert p.slot_pfn(1, 0) == 0x3000 + 512  # pool index 2560 = 2048 + 512
    assert p.slot_pfn(0, 2047) == 0x17FF
    assert p.slot_pfn(0, 2048) == 0x3000  # band 0 continues across the hole
    assert p == Placement.from_extents(list(reversed(extents)), 2)
    assert "2 copies" in p.describe()


def test_adjacent_groups_are_physically_adjacent_within_an_extent() -> None:
    p = Placement.from_extents([Extent(0, 4096)], 2)
    assert list(p.iter_runs(1, 10, 5)) == [((2048 + 10) << PAGE_SHIFT, 5)]


def test_too_small_pools_are_refused_with_the_rule() -> None:
    with pytest.raises(RefusedError, match="cannot hold 2 copies"):
        Placement.from_extents([Extent(0, 2 * HUGE_PAGES - 1)], 2)
    Placement.from_extents([Extent(0, 2 * HUGE_PAGES)], 2)  # exactly enough
    with pytest.raises(RefusedError, match="rule"):
        Placement.from_extents([Extent(0, 10), Extent(100, 1500)], 3)
    with pytest.raises(RefusedError, match="no old memory"):
        Placement.from_extents([], 1)
    p = Placement.from_extents([Extent(5, 6)], 1)  # one copy: no distance to keep
    assert p.ngroups == 1 and p.min_distance_bytes == 0


@pytest.mark.parametrize("copies", [0, 5, -1])
def test_copies_out_of_range(copies) -> None:
    with pytest.raises(RefusedError, match="copies"):
        Placement.from_extents([Extent(0, 1 << 16)], copies)


def test_larger_minimum_distance_can_be_required() -> None:
    ext = [Extent(0, 8192)]  # 32 MiB
    p = Placement.from_extents(ext, 2, min_distance_bytes=16 << 20)
    assert p.min_distance_bytes == 16 << 20
    with pytest.raises(RefusedError):
        Placement.from_extents(ext, 2, min_distance_bytes=17 << 20)


def test_locate_paddr_outside_slots() -> None:
    p = Placement.from_extents([Extent(0x100, 0x100 + 1025)], 2)  # one unused page at the end
    assert p.locate_paddr(0xFF << PAGE_SHIFT) is None
    assert p.locate_paddr((0x100 + 1024) << PAGE_SHIFT) is None
    assert p.locate_paddr((0x100 + 1023) << PAGE_SHIFT) == (1, 511)
