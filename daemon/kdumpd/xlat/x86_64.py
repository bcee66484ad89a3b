"""x86_64 paging: 4- and 5-level tables, 2 MiB/1 GiB leaves, SME mask, KASLR, direct map.

Everything comes from VMCOREINFO and the PT_LOAD table: ``SYMBOL(init_top_pgt)`` and
``NUMBER(phys_base)`` locate the root table (both already carry the KASLR slide),
``NUMBER(pgtable_l5_enabled)`` picks the depth and ``NUMBER(sme_mask)`` is stripped from every
entry. The direct-map base is learned from the RAM PT_LOADs (``p_vaddr - p_paddr``) and checked
once against a real walk before it is trusted as a fast path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from kdumpd.errors import LayoutError, TranslationError
from kdumpd.vmcore.elf import LoadSegment
from kdumpd.vmcore.vmcoreinfo import VmcoreInfo
from kdumpd.xlat.walk import Level, walk

__all__ = ["START_KERNEL_MAP", "X86_64Translator"]

log = logging.getLogger(__name__)

START_KERNEL_MAP = 0xFFFFFFFF80000000
_PRESENT = 0x1
_PSE = 0x80
_ENTRY_MASK = 0x000FFFFFFFFFF000  # physical address bits 12..51
_DEFAULT_KERNEL_IMAGE_SIZE = 1 << 30

_LEVELS_4 = (
    Level("PGD", 39),
    Level("PUD", 30, leaf_ok=True),
    Level("PMD", 21, leaf_ok=True),
    Level("PTE", 12),
)
_LEVELS_5 = (Level("PGD", 48), Level("P4D", 39), *_LEVELS_4[1:])


class X86_64Translator:
    """Translate crashed-kernel virtual addresses on x86_64."""

    def __init__(
        self, info: VmcoreInfo, loads: Sequence[LoadSegment], read_u64: Callable[[int], int]
    ) -> None:
        self._read_u64 = read_u64
        if info.has("SYMBOL", "init_top_pgt"):
            top = info.symbol("init_top_pgt")
        elif info.has("SYMBOL", "init_level4_pgt"):
            top = info.symbol("init_level4_pgt")
        else:
            raise LayoutError("VMCOREINFO lacks SYMBOL(init_top_pgt)")
        # Since Linux kernel commit 401721ecd1dc ("kexec: export the value of phys_base
        # instead of symbol address") (in v4.10), phys_base is a NUMBER.
        self.phys_base = info.number("phys_base")
        # Kernels before 5-level paging support (v4.17) do not export the key: 4 levels.
        self.five_level = bool(info.numbers.get("pgtable_l5_enabled", 0))
        self.levels = _LEVELS_5 if self.five_level else _LEVELS_4
        self.paging_levels = len(self.levels)
        # The kernel's MAX_PHYSMEM_BITS on x86_64 follows the paging mode: 52 bits with 5-level
        # tables, 46 with 4-level; the planner uses it only when VMCOREINFO does not export it.
        self.max_physmem_bits = 52 if self.five_level else 46
        sme_mask = info.numbers.get("sme_mask", 0)
        self.entry_mask = _ENTRY_MASK & ~sme_mask
        self.kernel_image_size = info.numbers.get("KERNEL_IMAGE_SIZE", _DEFAULT_KERNEL_IMAGE_SIZE)
        self.root_paddr = self._kernel_image_pa(top)
        self.va_bits = 57 if self.five_level else 48
        # The direct map covers RAM only: [page_offset, page_offset + end of RAM). Beyond that
        # lie vmalloc and vmemmap, which must be walked (KASLR may place them anywhere above).
        self.direct_map_bytes = max((s.p_paddr + s.p_memsz for s in loads), default=0)
        self.page_offset = self._learn_page_offset(loads)

    def _kernel_image_pa(self, vaddr: int) -> int:
        return vaddr - START_KERNEL_MAP + self.phys_base

    def _decode(self, entry: int, level: Level) -> tuple[bool, bool, int]:
        present = bool(entry & _PRESENT)
        leaf = level.leaf_ok and bool(entry & _PSE)
        return present, leaf, entry & self.entry_mask

    def _is_canonical(self, vaddr: int) -> bool:
        top = vaddr >> (self.va_bits - 1)
        return top == 0 or top == (1 << (64 - self.va_bits + 1)) - 1

    def walk(self, vaddr: int) -> tuple[int, int]:
        if not self._is_canonical(vaddr):
            raise TranslationError(f"{vaddr:#x} is not a canonical {self.va_bits}-bit address")
        return walk(vaddr, self.root_paddr, self.levels, self._decode, self._read_u64)

    def translate_leaf(self, vaddr: int) -> tuple[int, int]:
        if START_KERNEL_MAP <= vaddr < START_KERNEL_MAP + self.kernel_image_size:
            return self._kernel_image_pa(vaddr), START_KERNEL_MAP + self.kernel_image_size - vaddr
        if self.page_offset is not None:
            paddr = vaddr - self.page_offset
            if 0 <= paddr < self.direct_map_bytes:
                return paddr, self.direct_map_bytes - paddr
        return self.walk(vaddr)

    def translate(self, vaddr: int) -> int:
        return self.translate_leaf(vaddr)[0]

    def _learn_page_offset(self, loads: Sequence[LoadSegment]) -> int | None:
        """The direct-map base, if the RAM PT_LOADs agree on one and a walk confirms it."""
        candidates = {
            s.p_vaddr - s.p_paddr
            for s in loads
            if s.p_vaddr and s.p_vaddr < START_KERNEL_MAP and s.p_filesz
        }
        if len(candidates) != 1:
            log.debug("no single direct-map base in PT_LOADs: %s", sorted(candidates))
            return None
        page_offset = candidates.pop()
        probe = next(s for s in loads if s.p_vaddr and s.p_vaddr < START_KERNEL_MAP and s.p_filesz)
        try:
            walked = self.walk(probe.p_vaddr)[0]
        except TranslationError as exc:
            log.debug("direct-map base %#x not confirmed by a walk: %s", page_offset, exc)
            return None
        if walked != probe.p_paddr:
            log.warning(
                "PT_LOAD direct-map base %#x disagrees with the page tables (%#x -> %#x); "
                "walking every address instead", page_offset, probe.p_vaddr, walked,
            )
            return None
        return page_offset
