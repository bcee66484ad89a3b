"""Dump level + safety rules -> which page classes may be reused, with named reasons.

Pure: it only decides. A class is reusable when the configured dump level excludes it from
the dump anyway (so the dump stays identical) and no safety rule objects. Rules only ever take
classes away; nothing here can widen what the dump level allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdumpd.errors import ConfigError
from kdumpd.mm import native
from kdumpd.mm.classify import PageClass
from kdumpd.mm.pagelayout import OrderSource, PageLayout

__all__ = ["DL_CACHE", "DL_CACHE_PRIVATE", "DL_FREE", "DL_USER", "DL_ZERO", "ReusePolicy"]

DL_ZERO = 1
DL_CACHE = 2
DL_CACHE_PRIVATE = 4
DL_USER = 8
DL_FREE = 16


def excluded_classes(dump_level: int) -> set[PageClass]:
    """Classes makedumpfile ``-d dump_level`` leaves out of the dump.

    Zero pages (bit 1) are detected by content, and a page kdumpd writes is no longer zero, so
    bit 1 never makes a page reusable. Unaccepted pages are excluded by bit 16 but cannot be
    touched at all, so they are not listed.
    """
    if not 0 <= dump_level <= 31:
        raise ConfigError(f"dump level {dump_level} is outside 0..31")
    out: set[PageClass] = set()
    if dump_level & (DL_CACHE | DL_CACHE_PRIVATE):
        out |= {PageClass.CACHE, PageClass.CACHE_TAIL}
    if dump_level & DL_CACHE_PRIVATE:
        out |= {PageClass.CACHE_PRIVATE, PageClass.CACHE_PRIVATE_TAIL}
    if dump_level & DL_USER:
        out |= {PageClass.USER_ANON, PageClass.USER_HUGETLB,
                PageClass.USER_ANON_TAIL, PageClass.USER_HUGETLB_TAIL}
    if dump_level & DL_FREE:
        out.add(PageClass.FREE)
    return out


@dataclass(frozen=True, slots=True)
class ReusePolicy:
    """The reusable classes and the reasons any class was withheld."""

    dump_level: int
    classes: frozenset[PageClass]
    withheld: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        dump_level: int,
        layout: PageLayout,
        extra_withheld: dict[PageClass, str] | None = None,
    ) -> ReusePolicy:
        classes = excluded_classes(dump_level)
        withheld: dict[str, str] = {}
        for klass, why in (extra_withheld or {}).items():
            if klass in classes:
                classes.discard(klass)
                withheld[klass.name.lower()] = why
        untrusted_hugetlb = layout.order_source == OrderSource.FLAGS1_PG_HUGETLB
        if untrusted_hugetlb and PageClass.USER_HUGETLB in classes:
            # makedumpfile issue #21: on 6.6..6.8 PG_hugetlb is set in folio._flags_1 of kernel
            # compound pages that are not hugetlb (the IDT); trust no page that is "user" only
            # because of that bit.
            why = "PG_hugetlb in folio._flags_1 also marks kernel compound pages (6.6-6.8)"
            for klass in (PageClass.USER_HUGETLB, PageClass.USER_HUGETLB_TAIL):
                classes.discard(klass)
                withheld[klass.name.lower()] = why
        return cls(dump_level, frozenset(classes), withheld)

    def reusable_runs(
        self,
        classes: native.ByteBuffer,
        poisoned: native.ByteBuffer,
        usable: tuple[int, int],
    ) -> list[tuple[int, int]]:
        """Half-open index runs of reusable pages: of a reusable class, not poisoned, and
        within ``usable`` = the index range whose pages are in a PT_LOAD's file bytes and in a
        present, online section with a mem_map."""
        n = memoryview(classes).nbytes
        lo, hi = max(usable[0], 0), min(usable[1], n)
        if lo >= hi:
            return []
        return native.runs(classes, native.lut(self.classes), poisoned, lo, hi)
