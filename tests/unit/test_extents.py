"""Extents: mask runs are half-open, the builder merges across chunk boundaries and withdraws
ranges exactly, and coalesce() and Extent() keep extents sorted, merged and non-empty."""

from __future__ import annotations

import pytest

from kdumpd.mm.extents import ExtentBuilder, mask_runs
from kdumpd.units import Extent, coalesce


def test_mask_runs_half_open() -> None:
    mask = bytes([0, 1, 1, 0, 1, 0, 0, 1])
    assert mask_runs(100, mask) == [(101, 103), (104, 105), (107, 108)]
    assert mask_runs(0, bytes([1, 1])) == [(0, 2)]
    assert mask_runs(0, b"") == []


def test_builder_merges_across_chunks_and_withdraws() -> None:
    b = ExtentBuilder()
    b.add_mask(0, bytes([0, 1, 1, 1]))
    b.add_mask(4, bytearray([1, 1, 0, 1]))
    assert b.extents() == [Extent(1, 6), Extent(7, 8)]
    b.withdraw(2, 4)
    assert b.extents() == [Extent(1, 2), Extent(4, 6), Extent(7, 8)]
    assert b.npages == 4


def test_coalesce_and_extent_validation() -> None:
    assert coalesce([Extent(5, 9), Extent(0, 2), Extent(2, 3), Extent(8, 12)]) == [
        Extent(0, 3), Extent(5, 12)]
    with pytest.raises(ValueError):
        Extent(3, 3)
