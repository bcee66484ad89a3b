"""SPARSEMEM(_EXTREME) mem_section walk: which sections exist and where their struct pages are.

No classification here: this module answers "is section N present, online and does it have a
mem_map, and at which virtual address does the struct page of pfn P live".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kdumpd.errors import LayoutError, TranslationError
from kdumpd.units import PAGE_SHIFT
from kdumpd.vmcore.vmcoreinfo import VmcoreInfo

__all__ = ["MemSections", "Section"]

SECTION_MARKED_PRESENT = 1 << 0
SECTION_HAS_MEM_MAP = 1 << 1
SECTION_IS_ONLINE = 1 << 2
SECTION_IS_EARLY = 1 << 3
# The flag bits below SECTION_MAP_LAST_BIT grew over time (ZONE_DEVICE taint, vmemmap preinit);
# masking six bits is safe because the encoded mem_map of a vmemmap kernel is the vmemmap base
# itself, aligned far beyond 64 bytes.
SECTION_MAP_MASK = ~((1 << 6) - 1) & 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class Section:
    """One memory section: number, pfn span, state bits and encoded mem_map."""

    nr: int
    start_pfn: int
    end_pfn: int
    raw: int

    @property
    def present(self) -> bool:
        return bool(self.raw & SECTION_MARKED_PRESENT)

    @property
    def has_mem_map(self) -> bool:
        return bool(self.raw & SECTION_HAS_MEM_MAP)

    @property
    def online(self) -> bool:
        return bool(self.raw & SECTION_IS_ONLINE)

    @property
    def early(self) -> bool:
        """Present at boot (SECTION_IS_EARLY, 5.3+); hot-added memory (DIMMs, kmem) is not."""
        return bool(self.raw & SECTION_IS_EARLY)

    @property
    def usable(self) -> bool:
        """Present, online and described by a mem_map: the only sections kdumpd may reuse."""
        return self.present and self.has_mem_map and self.online

    @property
    def coded_mem_map(self) -> int:
        return self.raw & SECTION_MAP_MASK

    def page_vaddr(self, pfn: int, size_page: int) -> int:
        return (self.coded_mem_map + pfn * size_page) & 0xFFFFFFFFFFFFFFFF


class MemSections:
    """The old kernel's mem_section table, read through a translator."""

    def __init__(
        self,
        info: VmcoreInfo,
        read_u64_v: Callable[[int], int],
        paging_physmem_bits: int,
    ) -> None:
        """``paging_physmem_bits`` is the paging mode's physical address width (the
        translator's ``max_physmem_bits``): the fallback for kernels whose VMCOREINFO does not
        export ``NUMBER(MAX_PHYSMEM_BITS)`` (older kernels do not)."""
        self._read = read_u64_v
        self.root_vaddr = info.symbol("mem_section")
        self.size_mem_section = info.size("mem_section")
        self.off_map = info.offset("mem_section.section_mem_map")
        self.section_size_bits = info.number("SECTION_SIZE_BITS")
        self.max_physmem_bits = info.numbers.get("MAX_PHYSMEM_BITS", paging_physmem_bits)
        if not PAGE_SHIFT < self.section_size_bits < self.max_physmem_bits <= 64:
            raise LayoutError(
                f"SECTION_SIZE_BITS={self.section_size_bits} / "
                f"MAX_PHYSMEM_BITS={self.max_physmem_bits} are implausible"
            )
        if not 8 <= self.size_mem_section <= 4096 or self.off_map + 8 > self.size_mem_section:
            raise LayoutError(f"SIZE(mem_section)={self.size_mem_section} is implausible")
        self.pfn_section_shift = self.section_size_bits - PAGE_SHIFT
        self.pages_per_section = 1 << self.pfn_section_shift
        nr_mem_sections = 1 << (self.max_physmem_bits - self.section_size_bits)
        per_root_extreme = (1 << PAGE_SHIFT) // self.size_mem_section
        roots_extreme = -(-nr_mem_sections // per_root_extreme)
        length = info.lengths.get("mem_section")
        if length is None or length == roots_extreme:
            self.extreme = True
            self.sections_per_root = per_root_extreme
            self.nr_roots = roots_extreme
        elif length == nr_mem_sections:
            self.extreme = False
            self.sections_per_root = 1
            self.nr_roots = nr_mem_sections
        else:
            raise LayoutError(
                f"LENGTH(mem_section)={length} matches neither SPARSEMEM "
                f"({nr_mem_sections}) nor SPARSEMEM_EXTREME ({roots_extreme})"
            )
        self.nr_mem_sections = nr_mem_sections
        self._root_cache: dict[int, int] = {}

    def _root(self, root_nr: int) -> int:
        if root_nr not in self._root_cache:
            self._root_cache[root_nr] = self._read(self.root_vaddr + 8 * root_nr)
        return self._root_cache[root_nr]

    def section(self, nr: int) -> Section:
        """Section ``nr``; a NULL root is an absent section.

        A root or entry that does not translate means the page tables or mem_section are
        corrupt: that raises, rather than quietly reading as "no memory here"."""
        start = nr << self.pfn_section_shift
        end = start + self.pages_per_section
        if not 0 <= nr < self.nr_mem_sections:
            return Section(nr, start, end, 0)
        try:
            if self.extreme:
                root = self._root(nr // self.sections_per_root)
                if root == 0:
                    return Section(nr, start, end, 0)
                ms = root + (nr % self.sections_per_root) * self.size_mem_section
            else:
                ms = self.root_vaddr + nr * self.size_mem_section
            raw = self._read(ms + self.off_map)
        except TranslationError as exc:
            raise TranslationError(f"mem_section[{nr}] unreadable: {exc}") from None
        return Section(nr, start, end, raw)

    def iter_sections(self, start_pfn: int, end_pfn: int) -> Iterator[Section]:
        """Sections overlapping ``[start_pfn, end_pfn)``, in order."""
        first = start_pfn >> self.pfn_section_shift
        last = (end_pfn - 1) >> self.pfn_section_shift
        for nr in range(first, last + 1):
            yield self.section(nr)
