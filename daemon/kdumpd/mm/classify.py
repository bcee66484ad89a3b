"""Page classification in makedumpfile's order (loops in ``classify.c``); no policy, no I/O.

The order of the checks is the specification (makedumpfile ``__exclude_unnecessary_pages``):
compound tail -> buddy free -> unaccepted -> cache -> private cache -> user (anon, hugetlb) ->
hwpoison -> offline -> everything else kept. A head that is excluded covers its whole range
(``1 << order`` pages) and the pages inside are not looked at on their own, exactly as
makedumpfile skips them; ranges that run past the end of a chunk carry over to the next one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from kdumpd.errors import LayoutError
from kdumpd.mm import native
from kdumpd.mm.pagelayout import OrderSource, PageLayout

__all__ = ["ChunkResult", "Classifier", "PageClass", "MDF_CATEGORIES"]


class PageClass(IntEnum):
    """One class per pfn; several map to one makedumpfile category (see MDF_CATEGORIES)."""

    HOLE = 0  # not backed by any PT_LOAD: not in the dump, not ours
    NO_MEMMAP = 1  # section absent or without mem_map: nothing known about the page
    KERNEL = 2
    SLAB = 3
    FREE = 4
    UNACCEPTED = 5
    CACHE = 6
    CACHE_PRIVATE = 7
    USER_ANON = 8
    USER_HUGETLB = 9
    HWPOISON = 10
    OFFLINE = 11
    TAIL = 12  # compound tail whose head was not excluded: kept, like makedumpfile does
    # The pages after the head of an excluded compound folio (a THP, a hugetlb page, a large
    # page-cache folio), apart from the head: excluded with it, but a collector that cannot
    # read the folio's order on this kernel excludes the head alone and dumps these.
    CACHE_TAIL = 13
    CACHE_PRIVATE_TAIL = 14
    USER_ANON_TAIL = 15
    USER_HUGETLB_TAIL = 16


# makedumpfile's "Excluded pages" report lines, and the classes counted on each.
MDF_CATEGORIES: dict[str, tuple[PageClass, ...]] = {
    "cache": (PageClass.CACHE, PageClass.CACHE_TAIL),
    "cache_private": (PageClass.CACHE_PRIVATE, PageClass.CACHE_PRIVATE_TAIL),
    "user": (
        PageClass.USER_ANON, PageClass.USER_HUGETLB,
        PageClass.USER_ANON_TAIL, PageClass.USER_HUGETLB_TAIL,
    ),
    "free": (PageClass.FREE, PageClass.UNACCEPTED),
    "hwpoison": (PageClass.HWPOISON,),
    "offline": (PageClass.OFFLINE,),
    "remaining": (PageClass.KERNEL, PageClass.SLAB, PageClass.TAIL, PageClass.NO_MEMMAP),
}

@dataclass(slots=True)
class ChunkResult:
    """Classes of one chunk plus the safety facts only classification can see."""

    start_pfn: int
    # One PageClass value per page.
    classes: bytearray
    # 1 for pages that lie in an excluded range (buddy block, folio) containing a PG_hwpoison
    # page, and for the PG_hwpoison pages themselves: never reusable, whatever their class.
    poisoned: bytearray
    # Ranges that started in an earlier chunk and turned out to contain a poisoned page here:
    # the caller must withdraw them from what it already planned.
    retract: list[tuple[int, int]] = field(default_factory=list)


_ORDER_SOURCES = {
    OrderSource.FLAGS1_MAPCOUNT: "KDUMPD_ORDER_FLAGS1_MAPCOUNT",
    OrderSource.FLAGS1_PG_HUGETLB: "KDUMPD_ORDER_FLAGS1_PG_HUGETLB",
    OrderSource.FOLIO_FIELDS: "KDUMPD_ORDER_BYTES",
    OrderSource.PAGE_FIELDS: "KDUMPD_ORDER_BYTES",
}


def _check_class_values() -> None:
    """The C side numbers the classes itself; a mismatch would silently misclassify."""
    for c in PageClass:
        if getattr(native.lib, f"KDUMPD_PC_{c.name}") != c.value:
            raise ImportError(f"kdumpd.mm._classify numbers {c.name} differently; rebuild it")


_check_class_values()


def _c_layout(lay: PageLayout) -> Any:
    """PageLayout as the C ``struct kdumpd_layout``."""
    def mask(bit: int | None) -> int:
        return 0 if bit is None else 1 << bit

    def marker(value: int | None) -> int:
        return -1 if value is None else value

    c = native.new_layout()
    c.size_page = lay.size_page
    c.off_flags = lay.off_flags
    c.off_mapping = lay.off_mapping
    c.off_mapcount = lay.off_mapcount
    c.off_private = lay.off_private
    c.off_head = lay.off_compound_head
    c.off_order = lay.off_order or 0
    c.off_dtor = lay.off_dtor or 0
    c.order_source = getattr(native.lib, _ORDER_SOURCES[lay.order_source])
    c.m_lru = mask(lay.pg_lru)
    c.m_private = mask(lay.pg_private)
    c.m_swapcache = mask(lay.pg_swapcache)
    c.m_swapbacked = mask(lay.pg_swapbacked)
    c.m_head = lay.pg_head_mask & 0xFFFFFFFFFFFFFFFF
    c.m_slab = mask(lay.pg_slab)
    c.m_hwpoison = mask(lay.pg_hwpoison)
    c.m_hugetlb = mask(lay.pg_hugetlb)
    c.buddy_value = lay.buddy_value
    c.offline_value = marker(lay.offline_value)
    c.hugetlb_value = marker(lay.hugetlb_value)
    c.slab_value = marker(lay.slab_value)
    c.unaccepted_value = marker(lay.unaccepted_value)
    c.hugetlb_dtor = marker(lay.hugetlb_dtor)
    c.max_buddy_order = lay.max_buddy_order
    return c


class Classifier:
    """Streams chunks of struct pages through makedumpfile's rules, carrying ranges across.

    The per-page work is ``classify.c``; it follows these rules, which are the specification:

    * own class: the first match of compound tail (``compound_head & 1``) -> buddy (page type
      buddy, not slab; an order ``private >= LENGTH(zone.free_area)`` is makedumpfile's
      "Invalid free page order": kept as kernel) -> unaccepted -> cache (PG_lru, or
      PG_swapcache with PG_swapbacked where that exists; not PG_private, not anon) -> private
      cache (same with PG_private) -> user anon (``mapping & 1``, not slab) -> hugetlb head ->
      PG_hwpoison -> offline (page type, not slab) -> slab (PG_slab or page type) -> kernel.
    * a compound head's order and hugetlb marker come from page[1] (``_flags_1 & 0xff`` and
      the head's page type or PG_hugetlb in ``_flags_1`` from 6.6; the order/dtor bytes
      before), never from the last page of a chunk; an order the head's pfn is not aligned to
      is taken as 0. Free pages cover ``1 << private`` pages, unaccepted ones
      ``1 << (LENGTH(zone.free_area) - 1)``.
    * an examined page whose own class is excluded with its range (free, unaccepted, cache,
      private cache, user, hwpoison, offline) and whose range is longer than one page decides
      the class of every page of the range, examined or not; pages inside are not looked at
      on their own, and ranges past the chunk's end carry over to the next chunk. The pages
      after the head of a compound folio (not of a buddy block) get the head's ``*_TAIL``
      class, so a collector that cannot read folio orders can be matched page by page.
    * PG_hwpoison pages, and every page of a range holding one, are poisoned; a carried range
      found poisoned later is retracted from the chunks it covered before.
    """

    def __init__(self, layout: PageLayout) -> None:
        self.layout = layout
        try:
            self._c_layout = _c_layout(layout)
        except OverflowError as exc:  # PageLayout checks each value; this is the backstop
            raise LayoutError(f"a VMCOREINFO value does not fit the classifier: {exc}") \
                from None
        self._carry = native.Carry()

    def classify(
        self,
        start_pfn: int,
        pages: native.ByteBuffer,
        examined: native.ByteBuffer | None = None,
    ) -> ChunkResult:
        """Classify ``pages`` (raw struct pages of pfns ``start_pfn ..``).

        ``examined`` (one byte per page; None: all) is 0 for pfns makedumpfile would skip
        (outside every PT_LOAD): they neither start a range nor get a class of their own, but
        a range may still cover them.
        """
        classes, poisoned, retract = native.classify_chunk(
            self._c_layout, self.layout.size_page, start_pfn, pages, examined, self._carry
        )
        return ChunkResult(start_pfn, classes, poisoned, [retract] if retract else [])

    def check_pages(self, pages: native.ByteBuffer, vaddr0: int, counts: Any) -> None:
        """Add the plausibility counts of ``pages`` (see ``native.check_pages``)."""
        native.check_pages(self._c_layout, self.layout.size_page, pages, vaddr0, counts)

    def skip_to(self, pfn: int) -> None:
        """Tell the classifier a gap was skipped; a carried range ends at the gap."""
        if self._carry.active and self._carry.end_pfn <= pfn:
            self._carry.clear()
