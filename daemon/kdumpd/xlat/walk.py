"""A generic multi-level page-table walk over a ``read_u64(paddr)`` callable.

No architecture constants and no files live here: the architecture module describes the levels
and how to decode one entry, as libaddrxlat splits it, so the walk is written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kdumpd.errors import TranslationError

__all__ = ["Level", "walk"]


@dataclass(frozen=True, slots=True)
class Level:
    """One page-table level: its name, the VA shift its index starts at, and index width."""

    name: str
    shift: int
    bits: int = 9
    leaf_ok: bool = False  # a huge-page entry may end the walk here (x86 PSE at PUD/PMD)


DecodeEntry = Callable[[int, Level], tuple[bool, bool, int]]
"""(entry, level) -> (present, is_leaf, physical address of next table or page frame)."""


def walk(
    vaddr: int,
    root_paddr: int,
    levels: Sequence[Level],
    decode: DecodeEntry,
    read_u64: Callable[[int], int],
) -> tuple[int, int]:
    """Translate ``vaddr``; return (paddr, bytes left to the end of the leaf mapping)."""
    table = root_paddr
    for level in levels:
        index = (vaddr >> level.shift) & ((1 << level.bits) - 1)
        try:
            entry = read_u64(table + 8 * index)
        except TranslationError as exc:
            raise TranslationError(
                f"{level.name} table at {table:#x} unreadable while translating {vaddr:#x}: {exc}"
            ) from None
        present, leaf, target = decode(entry, level)
        if not present:
            raise TranslationError(
                f"{level.name} not present: {level.name}[{index}] = {entry:#x} "
                f"translating {vaddr:#x}"
            )
        if leaf or level is levels[-1]:
            if leaf and not level.leaf_ok and level is not levels[-1]:
                raise TranslationError(
                    f"{level.name}[{index}] = {entry:#x} claims a huge page where none is allowed"
                )
            size = 1 << level.shift
            within = vaddr & (size - 1)
            return (target & ~(size - 1)) + within, size - within
        table = target
    raise TranslationError(f"page-table walk of {vaddr:#x} ended without a leaf")
