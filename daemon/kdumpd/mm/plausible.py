"""Plausibility checks a wrong struct page layout cannot pass; kdumpd writes into what it
classifies, so a VMCOREINFO that lies (``OFFSET(page.flags)=9``) must stop it, not only
skew a report.

Three witnesses that do not depend on the classifier being right:

* the kernel's own image: the first pages of the kernel-text PT_LOAD are the kernel's text,
  reserved since boot, so each must classify as a kernel page (not free, cache, user, a
  tail, hwpoison...). The zero page would be another, but VMCOREINFO does not export it.
* compound pages: every PG_head page's page[1] must be a tail whose compound_head points
  back at that head. A wrong flags or compound_head offset makes most "heads" fail.
* anonymous pages: an anonymous page on the LRU is swap-backed (only pages freed lazily with
  MADV_FREE are not); a wrong mapping offset takes file pages for anonymous ones.
* the kernel's free page counter (zone vm_stat NR_FREE_PAGES, see ``zones.py``): the pages
  classified free must add up to it, where VMCOREINFO lets kdumpd read it.

Pure: the caller (the planner) gathers the evidence while it classifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdumpd.errors import LayoutError
from kdumpd.mm.classify import PageClass
from kdumpd.mm.pagelayout import PageLayout

__all__ = ["KERNEL_PROBE_PAGES", "Evidence", "check"]

# The first 1 MiB of the kernel image is text on every x86_64 kernel (head code, then
# .text); the rest of the image PT_LOAD also holds init memory freed after boot.
KERNEL_PROBE_PAGES = 256
# A head whose page[1] does not point back can be one being split or prepared at the moment
# of the crash; a handful is tolerated, a wrong layout gives far more.
_BAD_HEADS_FLOOR = 16
# MADV_FREE'd anonymous pages are not swap-backed; a workload may hold some, a wrong mapping
# offset gives about half (the odd page.index values).
_BAD_ANON_FLOOR = 1024
# NR_FREE_PAGES may lag the buddy lists by the per-cpu deltas not yet folded.
_FREE_FLOOR_PAGES = 4096
_FREE_FRACTION = 0.05


@dataclass(slots=True)
class Evidence:
    """What the planner saw while classifying."""

    kernel_pages: dict[int, int] = field(default_factory=dict)  # pfn -> class
    heads: int = 0
    bad_heads: int = 0
    anon_lru: int = 0
    anon_not_swapbacked: int = 0
    free_pages: int = 0  # classified free (buddy and unaccepted)
    free_counter: int | None = None  # the kernel's own NR_FREE_PAGES, when readable

    def summary(self) -> dict[str, int | None]:
        return {
            "kernel_pages_checked": len(self.kernel_pages),
            "compound_heads": self.heads,
            "compound_heads_inconsistent": self.bad_heads,
            "anon_lru_pages": self.anon_lru,
            "anon_lru_not_swapbacked": self.anon_not_swapbacked,
            "free_pages_classified": self.free_pages,
            "free_pages_counter": self.free_counter,
        }


def check(ev: Evidence, layout: PageLayout) -> None:
    """Raise LayoutError (one line) if the evidence contradicts the layout."""
    fields = (f"OFFSET(page.flags)={layout.off_flags}, OFFSET(page._mapcount)="
              f"{layout.off_mapcount}, OFFSET(page.mapping)={layout.off_mapping}, "
              f"OFFSET(page.compound_head)={layout.off_compound_head}")
    for pfn, cls in sorted(ev.kernel_pages.items()):
        if cls != PageClass.KERNEL:
            _fail(fields, f"the kernel's own text at pfn {pfn:#x} classifies as "
                          f"{PageClass(cls).name.lower()}, not as a kernel page")
    if ev.bad_heads > max(_BAD_HEADS_FLOOR, ev.heads // 100):
        _fail(fields, f"{ev.bad_heads} of {ev.heads} compound heads have no tail pointing "
                      "back at them")
    if ev.anon_not_swapbacked > max(_BAD_ANON_FLOOR, ev.anon_lru // 4):
        _fail(fields, f"{ev.anon_not_swapbacked} of {ev.anon_lru} anonymous pages on the LRU "
                      "are not swap-backed")
    if ev.free_counter is not None:
        slack = max(_FREE_FLOOR_PAGES, int(ev.free_counter * _FREE_FRACTION))
        if abs(ev.free_pages - ev.free_counter) > slack:
            _fail(fields, f"{ev.free_pages} pages classify as free but the kernel counted "
                          f"{ev.free_counter} (zone NR_FREE_PAGES)")


def _fail(fields: str, why: str) -> None:
    raise LayoutError(f"implausible struct page layout ({fields}): {why}; "
                      "refusing to trust this VMCOREINFO")
