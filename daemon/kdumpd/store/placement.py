"""Where the copies of a block live: N bands over the pool, one copy per band. Pure arithmetic.

The pool is the plan's extents (sorted, coalesced PFN ranges) numbered by *pool index*: page 0
is the first page of the first extent, and the numbering runs on through every extent, skipping
the holes between them. With ``P`` pool pages and ``N`` copies, each band holds
``G = P // N`` pages (the ``P mod N`` leftover pages at the end are unused)::

    pool index  0          G          2G         3G=NG    P
                | band 0   | band 1   | band 2   |unused|
    group g  -> copy 0 at g, copy 1 at G + g, copy 2 at 2G + g

A *group* ``g`` (0 <= g < G) is the set of ``N`` slots ``{c*G + g}``; a written block owns one
whole group. Since holes only add distance, two slots ``G`` pool pages apart are at least
``G * 4 KiB`` apart physically, so every pair of copies of every block is at least
``min_distance_bytes`` apart (computed exactly; at least ``G`` pages; 0 for one copy), and:

- a contiguous burst shorter than ``min_distance_bytes - 4 KiB + 2`` bytes can touch at most
  one copy of any block;
- no 2 MiB-aligned window holds two copies of a block, because the constructor refuses pools
  where ``G * 4 KiB < min_distance_bytes`` (default 2 MiB) and two addresses 2 MiB or more apart
  never share a 2 MiB-aligned window.

The mapping is a pure function of (extents, copies): deterministic, no seed, no state.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kdumpd.errors import RefusedError
from kdumpd.units import PAGE_SHIFT, PAGE_SIZE, Extent, coalesce

__all__ = ["HUGE_PAGE_SIZE", "MAX_COPIES", "Placement"]

HUGE_PAGE_SIZE = 2 << 20
MAX_COPIES = 4
_MAX_GROUPS = 0xFFFF_FFFF  # group numbers are uint32 with 0xffffffff reserved for "none"


@dataclass(frozen=True, slots=True)
class Placement:
    """Band placement over ``extents`` for ``copies`` copies; build with :meth:`from_extents`."""

    extents: tuple[Extent, ...]
    copies: int
    ngroups: int
    min_distance_bytes: int
    _cum: tuple[int, ...]  # pool index of each extent's first page, then the pool size
    _start_pfns: tuple[int, ...]

    @classmethod
    def from_extents(
        cls,
        extents: Sequence[Extent],
        copies: int = 2,
        *,
        min_distance_bytes: int = HUGE_PAGE_SIZE,
    ) -> Placement:
        """Lay out ``copies`` bands over the coalesced extents.

        Raises :class:`RefusedError` naming the rule if the pool cannot keep every pair of
        copies ``min_distance_bytes`` apart (too small), or has no pages at all.
        """
        if not 1 <= copies <= MAX_COPIES:
            raise RefusedError(f"placement: copies must be 1..{MAX_COPIES}, not {copies}")
        exts = tuple(coalesce(extents))
        if not exts:
            raise RefusedError("placement: the plan grants no old memory")
        cum = [0]
        for e in exts:
            cum.append(cum[-1] + e.npages)
        pool = cum[-1]
        ngroups = min(pool // copies, _MAX_GROUPS)
        need = max(1, -(-min_distance_bytes // PAGE_SIZE))
        if ngroups == 0 or (copies > 1 and ngroups < need):
            raise RefusedError(
                f"placement: a pool of {pool} pages cannot hold {copies} copies "
                f"{min_distance_bytes:#x} bytes apart (needs >= {copies * need} pages; rule: "
                "no two copies of a block within one DMA-sized window)"
            )
        starts = tuple(e.start_pfn for e in exts)
        dist = _min_distance_pages(tuple(cum), starts, ngroups, copies) << PAGE_SHIFT
        if copies > 1 and dist < min_distance_bytes:  # cannot happen; holes only add distance
            raise RefusedError(f"placement: copies only {dist:#x} bytes apart")
        return cls(exts, copies, ngroups, dist, tuple(cum), starts)

    @property
    def pool_pages(self) -> int:
        return self._cum[-1]

    @property
    def unused_pages(self) -> int:
        """Pages after the last band, fewer than ``copies``."""
        return self.pool_pages - self.copies * self.ngroups

    def slot_pfn(self, copy: int, group: int) -> int:
        """PFN of copy ``copy`` of group ``group``."""
        idx = copy * self.ngroups + group
        i = bisect_right(self._cum, idx) - 1
        return self._start_pfns[i] + idx - self._cum[i]

    def pool_offsets(self) -> tuple[int, ...]:
        """Pool index (= slot index ``copy * ngroups + group``) of each extent's first page,
        then the pool size: the table the C fast path searches."""
        return self._cum

    def slot_paddr(self, copy: int, group: int) -> int:
        idx = copy * self.ngroups + group
        cum = self._cum
        i = bisect_right(cum, idx) - 1
        return (self._start_pfns[i] + idx - cum[i]) << PAGE_SHIFT

    def group_paddrs(self, group: int) -> tuple[int, ...]:
        """Physical addresses of every copy of ``group``, copy 0 first."""
        return tuple(self.slot_paddr(c, group) for c in range(self.copies))

    def iter_runs(self, copy: int, group: int, ngroups: int) -> Iterator[tuple[int, int]]:
        """Physically contiguous ``(paddr, npages)`` runs holding copy ``copy`` of groups
        ``[group, group + ngroups)``; a run breaks only where an extent ends."""
        cum, starts = self._cum, self._start_pfns
        idx = copy * self.ngroups + group
        while ngroups > 0:
            i = bisect_right(cum, idx) - 1
            take = min(ngroups, cum[i + 1] - idx)
            yield (starts[i] + idx - cum[i]) << PAGE_SHIFT, take
            idx += take
            ngroups -= take

    def locate_paddr(self, paddr: int) -> tuple[int, int] | None:
        """``(copy, group)`` of the slot holding ``paddr``, or None if no slot does."""
        pfn = paddr >> PAGE_SHIFT
        i = bisect_right(self._start_pfns, pfn) - 1
        if i < 0 or pfn >= self.extents[i].end_pfn:
            return None
        idx = self._cum[i] + pfn - self._start_pfns[i]
        copy, group = divmod(idx, self.ngroups)
        return (copy, group) if copy < self.copies else None

    def describe(self) -> str:
        """One line for the INFO log."""
        return (
            f"{self.copies} copies x {self.ngroups} groups over {len(self.extents)} extents "
            f"({self.pool_pages} pages, {self.unused_pages} unused); copies >= "
            f"{self.min_distance_bytes >> 20} MiB apart"
        )


def _min_distance_pages(
    cum: tuple[int, ...], starts: tuple[int, ...], ngroups: int, copies: int
) -> int:
    # Exact minimum, over all groups and adjacent copy pairs, of pfn(c+1, g) - pfn(c, g).
    # Both pfns grow by one per group except where a slot enters a new extent, so the gap is
    # constant between those breakpoints: evaluating at every breakpoint gives the minimum.
    # (Copies c and c+2 are farther apart than c and c+1, so adjacent pairs suffice.)
    if copies == 1:
        return 0  # one copy: no pair to keep apart

    def pfn(idx: int) -> int:
        i = bisect_right(cum, idx) - 1
        return starts[i] + idx - cum[i]

    best = -1
    for c in range(copies - 1):
        lo, hi = c * ngroups, (c + 1) * ngroups
        points = {0}
        for k in cum[:-1]:
            for base in (lo, hi):
                if 0 <= k - base < ngroups:
                    points.add(k - base)
        for g in points:
            d = pfn(hi + g) - pfn(lo + g)
            if best < 0 or d < best:
                best = d
    return best
