"""Per-page reusable masks -> sorted, coalesced half-open PFN extents; pure."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kdumpd.units import Extent

__all__ = ["ExtentBuilder", "mask_runs"]


def mask_runs(start_pfn: int, mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """Half-open runs of True in ``mask``, as absolute pfns."""
    if not len(mask):
        return []
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.nonzero(np.diff(padded))[0]
    starts, ends = edges[0::2], edges[1::2]
    return [(start_pfn + int(a), start_pfn + int(b)) for a, b in zip(starts, ends, strict=True)]


class ExtentBuilder:
    """Accumulates runs in pfn order, merging touching ones, with withdrawal of a range."""

    def __init__(self) -> None:
        self._runs: list[list[int]] = []

    def add_mask(self, start_pfn: int, mask: npt.NDArray[np.bool_]) -> None:
        for a, b in mask_runs(start_pfn, mask):
            if self._runs and self._runs[-1][1] == a:
                self._runs[-1][1] = b
            elif self._runs and a < self._runs[-1][1]:
                raise ValueError("masks must be added in pfn order")
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
