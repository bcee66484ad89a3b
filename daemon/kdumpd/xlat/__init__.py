"""Virtual-to-physical translation of the crashed kernel's addresses.

``walk`` is the generic N-level walker over a ``read_u64`` callable; each architecture is one
module that supplies its paging format and fast paths (``x86_64``). Adding arm64 is one more
module with the same ``Translator`` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from kdumpd.errors import LayoutError

if TYPE_CHECKING:
    from kdumpd.vmcore.elf import LoadSegment
    from kdumpd.vmcore.vmcoreinfo import VmcoreInfo

__all__ = ["Translator", "make_translator"]


class Translator(Protocol):
    """Translate a crashed-kernel virtual address; raise TranslationError if it does not map.

    It also names the paging mode it walks: ``paging_levels``, and ``max_physmem_bits``, the
    physical address width the kernel assumes in that mode (what sizes mem_section when
    VMCOREINFO does not export ``NUMBER(MAX_PHYSMEM_BITS)``).
    """

    paging_levels: int
    max_physmem_bits: int

    def translate(self, vaddr: int) -> int: ...

    def translate_leaf(self, vaddr: int) -> tuple[int, int]:
        """Physical address of ``vaddr`` and how many bytes from it stay physically contiguous
        (to the end of the mapping leaf), so callers can move through a range leaf by leaf."""
        ...


def make_translator(
    arch: str,
    info: VmcoreInfo,
    loads: Sequence[LoadSegment],
    read_u64: Callable[[int], int],
) -> Translator:
    """The translator for ``arch``; other architectures are refused by name."""
    if arch == "x86_64":
        from kdumpd.xlat.x86_64 import X86_64Translator

        return X86_64Translator(info, loads, read_u64)
    raise LayoutError(f"address translation for {arch} is not implemented")
