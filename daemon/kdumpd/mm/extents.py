"""Reusable runs (or per-page masks) -> sorted, coalesced half-open PFN extents; pure."""

from __future__ import annotations

from kdumpd.mm import native
from kdumpd.units import Extent

__all__ = ["ExtentBuilder", "mask_runs"]


_NONZERO = native.lut(range(1, 256))


def mask_runs(start_pfn: int, mask: native.ByteBuffer) -> list[tuple[int, int]]:
    """Half-open runs of non-zero bytes in ``mask`` (one byte per page), as absolute pfns."""
    return [(start_pfn + a, start_pfn + b) for a, b in native.runs(mask, _NONZERO)]


class ExtentBuilder:
    """Accumulates runs in pfn order, merging touching ones, with withdrawal of a range."""

    def __init__(self) -> None:
        self._runs: list[list[int]] = []

    def add_mask(self, start_pfn: int, mask: native.ByteBuffer) -> None:
        """Add the pages whose byte in ``mask`` is non-zero."""
        self.add_runs(mask_runs(start_pfn, mask))

    def add_runs(self, runs: list[tuple[int, int]]) -> None:
        """Add half-open pfn runs, sorted, at or after everything added before."""
        for a, b in runs:
            if self._runs and self._runs[-1][1] == a:
                self._runs[-1][1] = b
            elif self._runs and a < self._runs[-1][1]:
                raise ValueError("runs must be added in pfn order")
            else:
                self._runs.append([a, b])

    def withdraw(self, start_pfn: int, end_pfn: int) -> None:
        """Remove ``[start_pfn, end_pfn)`` from what was accumulated (only recent runs move)."""
        keep: list[list[int]] = []
        i = len(self._runs)
        while i > 0 and self._runs[i - 1][1] > start_pfn:
            i -= 1
        for a, b in self._runs[i:]:
            if b <= start_pfn or a >= end_pfn:
                keep.append([a, b])
                continue
            if a < start_pfn:
                keep.append([a, start_pfn])
            if b > end_pfn:
                keep.append([end_pfn, b])
        self._runs[i:] = keep

    def extents(self) -> list[Extent]:
        return [Extent(a, b) for a, b in self._runs]

    @property
    def npages(self) -> int:
        return sum(b - a for a, b in self._runs)
