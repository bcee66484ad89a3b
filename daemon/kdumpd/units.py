"""The page size, the half-open extent and the physical range used everywhere, and the one
formatter of byte counts for people.

An :class:`Extent` counts page frames, a :class:`PhysRange` counts physical bytes and the file
offset they are stored at; their properties (``start_paddr``, ``npages``, ``offset_of``)
convert. Imports nothing from kdumpd.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "Extent",
    "PhysRange",
    "coalesce",
    "human_size",
    "iter_pfn_chunks",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


@dataclass(frozen=True, slots=True, order=True)
class Extent:
    """A half-open range of page frames: ``start_pfn`` inclusive, ``end_pfn`` exclusive."""

    start_pfn: int
    end_pfn: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_pfn < self.end_pfn:
            raise ValueError(f"empty or negative extent [{self.start_pfn:#x}, {self.end_pfn:#x})")

    @property
    def npages(self) -> int:
        return self.end_pfn - self.start_pfn

    @property
    def start_paddr(self) -> int:
        return self.start_pfn << PAGE_SHIFT

    @property
    def end_paddr(self) -> int:
        return self.end_pfn << PAGE_SHIFT

    def contains_paddr(self, start_paddr: int, nbytes: int) -> bool:
        """True if the whole byte range lies inside this extent."""
        return self.start_paddr <= start_paddr and start_paddr + nbytes <= self.end_paddr


@dataclass(frozen=True, slots=True, order=True)
class PhysRange:
    """Physical bytes ``[start_paddr, end_paddr)`` stored at file ``offset`` onwards.

    This is a PT_LOAD seen from the old-memory side: backends map a physical address to a file
    offset through these and never assume offset == address (fadump and the kexec backup
    region break that assumption).
    """

    start_paddr: int
    end_paddr: int
    offset: int

    def offset_of(self, paddr: int) -> int:
        return self.offset + (paddr - self.start_paddr)


def coalesce(extents: Iterable[Extent]) -> list[Extent]:
    """Sort and merge touching or overlapping extents; the plan file's canonical form."""
    out: list[Extent] = []
    for ext in sorted(extents):
        if out and ext.start_pfn <= out[-1].end_pfn:
            if ext.end_pfn > out[-1].end_pfn:
                out[-1] = Extent(out[-1].start_pfn, ext.end_pfn)
        else:
            out.append(ext)
    return out


def iter_pfn_chunks(start_pfn: int, end_pfn: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Split ``[start_pfn, end_pfn)`` into bounded chunks so memory never grows with RAM."""
    pfn = start_pfn
    while pfn < end_pfn:
        nxt = min(end_pfn, pfn + chunk)
        yield pfn, nxt
        pfn = nxt


def human_size(nbytes: int) -> str:
    """A byte count for people, in binary units with one decimal: '512 B', '4.0 KiB',
    '331.7 MiB', '1.5 TiB'. Every size kdumpd prints (survey, plan, status, logs) goes through
    here."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
