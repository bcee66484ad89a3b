"""Read-only access to the crashed kernel's physical memory through the vmcore's PT_LOADs.

The whole file is mapped read-only once; physical addresses are mapped to file offsets through
the PT_LOAD table (never offset == address). Reads of bytes that no PT_LOAD holds raise, so a
bad pointer in the old kernel's data can never be silently read as something else.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from collections.abc import Sequence

from kdumpd.errors import TranslationError
from kdumpd.units import PhysRange

__all__ = ["PhysMem"]

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class PhysMem:
    """Physical-address reads over a mapped vmcore (or any buffer laid out like one)."""

    def __init__(
        self,
        buf: mmap.mmap | bytes | bytearray,
        ranges: Sequence[PhysRange],
        fileno: int | None = None,
    ) -> None:
        self._buf = buf
        self._fd = fileno
        self._view = memoryview(buf)
        self.ranges: tuple[PhysRange, ...] = tuple(sorted(ranges))
        self._starts = [r.start_paddr for r in self.ranges]

    @classmethod
    def open(cls, fileno: int, file_size: int, ranges: Sequence[PhysRange]) -> PhysMem:
        mm = mmap.mmap(fileno, file_size, mmap.MAP_SHARED, mmap.PROT_READ)
        return cls(mm, ranges, os.dup(fileno))

    def close(self) -> None:
        self._view.release()
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def range_of(self, paddr: int) -> PhysRange | None:
        idx = bisect.bisect_right(self._starts, paddr) - 1
        if idx >= 0 and paddr < self.ranges[idx].end_paddr:
            return self.ranges[idx]
        return None

    def contains(self, paddr: int, nbytes: int) -> bool:
        rng = self.range_of(paddr)
        return rng is not None and paddr + nbytes <= rng.end_paddr

    def offset_of(self, paddr: int, nbytes: int) -> int:
        """File offset of ``nbytes`` at ``paddr``; the bytes must lie in one PT_LOAD."""
        rng = self.range_of(paddr)
        if rng is None or paddr + nbytes > rng.end_paddr:
            raise TranslationError(
                f"physical address {paddr:#x} (+{nbytes:#x}) is not in any PT_LOAD of the vmcore"
            )
        return rng.offset_of(paddr)

    def read_u64(self, paddr: int) -> int:
        value: int = _U64.unpack_from(self._view, self.offset_of(paddr, 8))[0]
        return value

    def read_u32(self, paddr: int) -> int:
        value: int = _U32.unpack_from(self._view, self.offset_of(paddr, 4))[0]
        return value

    def view(self, paddr: int, nbytes: int) -> memoryview:
        """A zero-copy view of ``nbytes`` at ``paddr`` (within one PT_LOAD); release it soon."""
        offset = self.offset_of(paddr, nbytes)
        return self._view[offset : offset + nbytes]

    def read(self, paddr: int, nbytes: int) -> bytes:
        """Copy bytes that may span several adjacent PT_LOADs."""
        out = bytearray()
        while nbytes > 0:
            rng = self.range_of(paddr)
            if rng is None:
                raise TranslationError(f"physical address {paddr:#x} is not in any PT_LOAD")
            take = min(nbytes, rng.end_paddr - paddr)
            offset = rng.offset_of(paddr)
            out += self._view[offset : offset + take]
            paddr += take
            nbytes -= take
        return bytes(out)

    def readinto(self, paddr: int, out: memoryview) -> None:
        """Fill ``out`` from ``paddr`` (within one PT_LOAD) with one pread.

        Bulk reads (struct page arrays) go through pread into a reused buffer rather than the
        mapping: one copy instead of hundreds of page faults, and nothing stays mapped in RSS.
        """
        offset = self.offset_of(paddr, len(out))
        if self._fd is None:
            out[:] = self._view[offset : offset + len(out)]
            return
        got = os.preadv(self._fd, [out], offset)
        if got != len(out):
            raise TranslationError(f"short read of {len(out)} bytes at physical {paddr:#x}")

    def release(self, paddr: int, nbytes: int) -> None:
        """Drop mapped pages from our RSS once a chunk is done (keeps memory flat on big hosts)."""
        if not isinstance(self._buf, mmap.mmap):
            return
        rng = self.range_of(paddr)
        if rng is None:
            return
        start = rng.offset_of(paddr) & ~(mmap.PAGESIZE - 1)
        end = min(rng.offset_of(paddr) + nbytes, len(self._buf))
        if end > start:
            try:
                self._buf.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass  # advisory only
