"""Reads of the crashed kernel's virtual memory: translate page by page, read physically."""

from __future__ import annotations

import struct

from kdumpd.vmcore.physmem import PhysMem
from kdumpd.xlat import Translator

__all__ = ["VirtMem"]


class VirtMem:
    """``read(vaddr, n)`` over a translator and the vmcore's physical memory."""

    def __init__(self, xlat: Translator, phys: PhysMem) -> None:
        self.xlat = xlat
        self.phys = phys

    def read(self, vaddr: int, nbytes: int) -> bytes:
        out = bytearray()
        while nbytes > 0:
            paddr, contiguous = self.xlat.translate_leaf(vaddr)
            # Whole leaf mappings at a time: a page at a time, a corrupt length that still
            # translates (a legacy log_buf_len of 1 GiB) took seconds per read.
            take = min(nbytes, contiguous if contiguous > 0 else 4096 - (vaddr & 0xFFF))
            out += self.phys.read(paddr, take)
            vaddr += take
            nbytes -= take
        return bytes(out)

    def u64(self, vaddr: int) -> int:
        value: int = struct.unpack("<Q", self.read(vaddr, 8))[0]
        return value

    def u32(self, vaddr: int) -> int:
        value: int = struct.unpack("<I", self.read(vaddr, 4))[0]
        return value

    def u16(self, vaddr: int) -> int:
        value: int = struct.unpack("<H", self.read(vaddr, 2))[0]
        return value
