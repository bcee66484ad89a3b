"""A model of the C classifier: the numpy implementation kdumpd had before ``classify.c``.

Tests only (numpy is fine here): the randomised differential test runs both on the same
struct pages, chunk after chunk, and demands identical classes, poisoned pages and
retractions. It reads struct pages through a numpy dtype built from PageLayout's offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kdumpd.mm.classify import PageClass
from kdumpd.mm.pagelayout import OrderSource, PageLayout

_RANGE_CLASSES = frozenset(
    {
        PageClass.FREE, PageClass.UNACCEPTED, PageClass.CACHE, PageClass.CACHE_PRIVATE,
        PageClass.USER_ANON, PageClass.USER_HUGETLB, PageClass.HWPOISON, PageClass.OFFLINE,
    }
)
# The class of the pages after the head of a compound range (buddy blocks keep theirs).
_TAIL_OF = {
    PageClass.CACHE: PageClass.CACHE_TAIL,
    PageClass.CACHE_PRIVATE: PageClass.CACHE_PRIVATE_TAIL,
    PageClass.USER_ANON: PageClass.USER_ANON_TAIL,
    PageClass.USER_HUGETLB: PageClass.USER_HUGETLB_TAIL,
}
_RANGE_LUT = np.zeros(256, dtype=bool)
for _c in _RANGE_CLASSES:
    _RANGE_LUT[_c] = True


def page_dtype(lay: PageLayout) -> np.dtype[np.void]:
    """The struct page fields the classifier reads, as a numpy structured dtype."""
    fields: dict[str, tuple[str, int]] = {
        "flags": ("<u8", lay.off_flags),
        "mapping": ("<u8", lay.off_mapping),
        "_mapcount": ("<u4", lay.off_mapcount),
        "private": ("<u8", lay.off_private),
        "compound_head": ("<u8", lay.off_compound_head),
    }
    if lay.off_order is not None and lay.off_dtor is not None:
        fields["order_byte"] = ("<u1", lay.off_order)
        fields["dtor_byte"] = ("<u1", lay.off_dtor)
    return np.dtype(
        {
            "names": list(fields),
            "formats": [f for f, _ in fields.values()],
            "offsets": [o for _, o in fields.values()],
            "itemsize": lay.size_page,
        }
    )


@dataclass(slots=True)
class _Carry:
    cls: int
    start_pfn: int
    end_pfn: int
    poisoned: bool


def _bit(values: npt.NDArray[np.uint64], bit: int | None) -> npt.NDArray[np.bool_]:
    if bit is None:
        return np.zeros(values.shape, dtype=bool)
    result: npt.NDArray[np.bool_] = (values & np.uint64(1 << bit)) != 0
    return result


class RefClassifier:
    """The numpy classifier kdumpd used before classify.c, kept here as a model of it."""

    def __init__(self, layout: PageLayout) -> None:
        self.layout = layout
        self.dtype = page_dtype(layout)
        self._carry: _Carry | None = None

    def own_classes(
        self, start_pfn: int, pages: npt.NDArray[np.void]
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Each page's class as if evaluated on its own, its range length, and PG_hwpoison."""
        lay = self.layout
        n = len(pages)
        # One gather per field into a contiguous array: every test below then runs on
        # contiguous memory instead of a 64-byte stride.
        flags = np.ascontiguousarray(pages["flags"], dtype=np.uint64)
        mapcount = np.ascontiguousarray(pages["_mapcount"], dtype=np.uint32)
        mapping = np.ascontiguousarray(pages["mapping"], dtype=np.uint64)
        private = np.ascontiguousarray(pages["private"], dtype=np.uint64)
        tail = (np.ascontiguousarray(pages["compound_head"], dtype=np.uint64) & np.uint64(1)) != 0

        slab = _bit(flags, lay.pg_slab)
        if lay.slab_value is not None:
            slab |= mapcount == np.uint32(lay.slab_value)
        buddy = ~slab & (mapcount == np.uint32(lay.buddy_value))
        unaccepted = (
            mapcount == np.uint32(lay.unaccepted_value)
            if lay.unaccepted_value is not None
            else np.zeros(n, dtype=bool)
        )
        swapcache = _bit(flags, lay.pg_swapcache)
        if lay.pg_swapbacked is not None:
            swapcache &= _bit(flags, lay.pg_swapbacked)
        cache = _bit(flags, lay.pg_lru) | swapcache
        priv = _bit(flags, lay.pg_private)
        anon = ((mapping & np.uint64(1)) != 0) & ~slab
        hwpoison = _bit(flags, lay.pg_hwpoison)
        offline = (
            ~slab & (mapcount == np.uint32(lay.offline_value))
            if lay.offline_value is not None
            else np.zeros(n, dtype=bool)
        )

        # Compound heads: order and hugetlb marker come from page[1]. A head is aligned to its
        # order, so page[1] of a head is always inside the same section-aligned chunk.
        head = (flags & np.uint64(lay.pg_head_mask)) != 0
        head[-1:] = False
        order = np.zeros(n, dtype=np.int64)
        hugetlb = np.zeros(n, dtype=bool)
        idx = np.nonzero(head)[0]
        if len(idx):
            nxt = pages[idx + 1]
            if lay.order_source in (OrderSource.FLAGS1_MAPCOUNT, OrderSource.FLAGS1_PG_HUGETLB):
                flags1 = nxt["flags"].astype(np.uint64)
                head_order = (flags1 & np.uint64(0xFF)).astype(np.int64)
                if lay.order_source == OrderSource.FLAGS1_MAPCOUNT:
                    assert lay.hugetlb_value is not None
                    hugetlb[idx] = mapcount[idx] == np.uint32(lay.hugetlb_value)
                else:
                    hugetlb[idx] = _bit(flags1, lay.pg_hugetlb)
            else:
                head_order = nxt["order_byte"].astype(np.int64)
                hugetlb[idx] = nxt["dtor_byte"].astype(np.int64) == lay.hugetlb_dtor
            pfns = idx.astype(np.int64) + start_pfn
            align_mask = (np.int64(1) << np.minimum(head_order, 62)) - 1
            valid = (head_order < 64) & ((pfns & align_mask) == 0)
            order[idx] = np.where(valid, head_order, 0)
        nr = np.left_shift(np.int64(1), order)

        cls = np.full(n, PageClass.KERNEL, dtype=np.uint8)
        # np.select takes the first true condition: the list order is makedumpfile's chain.
        buddy_order = private.astype(np.int64, copy=False)
        bad_buddy = buddy & (private >= np.uint64(lay.max_buddy_order))
        conds = [
            tail,
            bad_buddy,
            buddy,
            unaccepted,
            cache & ~priv & ~anon,
            cache & ~anon,
            anon,
            hugetlb,
            hwpoison,
            offline,
            slab,
        ]
        choices = [
            PageClass.TAIL,
            PageClass.KERNEL,  # makedumpfile warns "Invalid free page order" and keeps it
            PageClass.FREE,
            PageClass.UNACCEPTED,
            PageClass.CACHE,
            PageClass.CACHE_PRIVATE,
            PageClass.USER_ANON,
            PageClass.USER_HUGETLB,
            PageClass.HWPOISON,
            PageClass.OFFLINE,
            PageClass.SLAB,
        ]
        cls = np.select(conds, [np.uint8(c) for c in choices], default=np.uint8(PageClass.KERNEL))
        cls = cls.astype(np.uint8)
        is_free = cls == PageClass.FREE
        nr = np.where(is_free, np.left_shift(np.int64(1), np.where(is_free, buddy_order, 0)), nr)
        nr = np.where(
            cls == PageClass.UNACCEPTED, np.int64(1) << np.int64(lay.max_buddy_order - 1), nr
        )
        return cls, nr, hwpoison

    def classify(
        self,
        start_pfn: int,
        pages: npt.NDArray[np.void],
        examined: npt.NDArray[np.bool_],
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_], list[tuple[int, int]]]:
        """Classify ``pages`` (struct pages of pfns ``start_pfn ..``).

        ``examined`` is False for pfns makedumpfile would skip (outside every PT_LOAD): they
        neither start a range nor get a class of their own, but a range may still cover them.
        """
        n = len(pages)
        end_pfn = start_pfn + n
        own, nr, hwpoison = self.own_classes(start_pfn, pages)
        own = np.where(examined, own, np.uint8(PageClass.HOLE)).astype(np.uint8)
        cls = own.copy()
        poisoned = hwpoison.copy()
        retract: list[tuple[int, int]] = []
        covered_until = 0  # index in this chunk before which a range has already decided

        carry = self._carry
        self._carry = None
        if carry is not None:
            upto = min(carry.end_pfn, end_pfn) - start_pfn
            cls[:upto] = carry.cls
            hit = bool(hwpoison[:upto].any())
            if hit and not carry.poisoned:
                retract.append((carry.start_pfn, start_pfn))
            carry.poisoned |= hit
            if carry.poisoned:
                poisoned[:upto] = True
            covered_until = upto
            if carry.end_pfn > end_pfn:
                self._carry = carry

        starts = np.nonzero((nr > 1) & _RANGE_LUT[own] & examined)[0]
        csum = np.concatenate(([0], np.cumsum(hwpoison, dtype=np.int64)))
        for i in starts.tolist():
            if i < covered_until:
                continue
            length = int(nr[i])
            stop = min(i + length, n)
            cls[i:stop] = own[i]
            tail_cls = int(_TAIL_OF.get(PageClass(int(own[i])), own[i]))
            cls[i + 1 : stop] = tail_cls
            bad = bool(csum[stop] - csum[i])
            if bad:
                poisoned[i:stop] = True
            covered_until = stop
            if i + length > n:
                self._carry = _Carry(tail_cls, start_pfn + i, start_pfn + i + length, bad)
        return cls, poisoned, retract

    def skip_to(self, pfn: int) -> None:
        if self._carry is not None and self._carry.end_pfn <= pfn:
            self._carry = None
