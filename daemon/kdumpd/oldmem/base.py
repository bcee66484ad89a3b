"""The old-memory backend contract, physical-to-file mapping, and the write guard.

Every backend reads and writes *physical* addresses of the crashed kernel. A backend is built
from :class:`kdumpd.units.PhysRange` objects (a PT_LOAD seen from the physical side) and maps
each address through them: an address in no range raises, and file offset == address is never
assumed, because fadump and the kexec backup region break it.

:class:`Guarded` wraps any backend and checks every access against the plan's extents before
the backend is touched. It is the last line between a bug and the crashed kernel's memory
being scribbled on the wrong page.

Backends are not thread-safe on their own: :class:`kdumpd.store.blockstore.BlockStore`
serialises every access under its lock.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Protocol, TypeAlias

from kdumpd.errors import BackendError, RefusedError
from kdumpd.units import Extent, PhysRange, coalesce

__all__ = [
    "BytesLike",
    "Guarded",
    "OldMem",
    "RangeMap",
    "drop_contained",
    "identity_ranges",
]

log = logging.getLogger(__name__)

BytesLike: TypeAlias = bytes | bytearray | memoryview


class OldMem(Protocol):
    """Read and write the crashed kernel's memory by physical address.

    ``preadinto`` is the zero-copy read: it fills ``buf`` (a byte-format memoryview) with
    ``buf.nbytes`` bytes starting at ``paddr``. Writes are synchronous: when ``pwrite``
    returns, a read of the same range returns the new bytes (unless a device overwrote them).
    """

    def pread(self, paddr: int, nbytes: int) -> bytes: ...

    def preadinto(self, paddr: int, buf: memoryview) -> None: ...

    def pwrite(self, paddr: int, data: BytesLike) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class RangeMap:
    """Physical address -> file offset through sorted, disjoint :class:`PhysRange` objects."""

    __slots__ = ("_ends", "_offsets", "_starts", "ranges")

    def __init__(self, ranges: Sequence[PhysRange]) -> None:
        rs = sorted(ranges)
        if not rs:
            raise BackendError("no physical ranges given to the backend")
        for prev, cur in zip(rs, rs[1:], strict=False):
            if cur.start_paddr < prev.end_paddr:
                raise BackendError(
                    f"physical ranges overlap at {cur.start_paddr:#x}: pass disjoint RAM "
                    "ranges (see drop_contained)"
                )
        for r in rs:
            if not 0 <= r.start_paddr < r.end_paddr or r.offset < 0:
                raise BackendError(
                    f"invalid physical range [{r.start_paddr:#x}, {r.end_paddr:#x}) "
                    f"at offset {r.offset:#x}"
                )
        self.ranges: tuple[PhysRange, ...] = tuple(rs)
        self._starts = [r.start_paddr for r in rs]
        self._ends = [r.end_paddr for r in rs]
        self._offsets = [r.offset for r in rs]

    def translate(self, paddr: int, nbytes: int) -> int:
        """File offset of ``[paddr, paddr + nbytes)`` if one range holds all of it, else -1."""
        i = bisect_right(self._starts, paddr) - 1
        if i >= 0 and paddr + nbytes <= self._ends[i] and nbytes >= 0:
            return self._offsets[i] + (paddr - self._starts[i])
        return -1

    def iter_pieces(self, paddr: int, nbytes: int) -> Iterator[tuple[int, int]]:
        """Yield ``(file offset, nbytes)`` pieces covering the range; raise on any hole."""
        if paddr < 0 or nbytes < 0:
            raise BackendError(f"negative address or length: {paddr:#x}+{nbytes:#x}")
        end = paddr + nbytes
        while paddr < end:
            i = bisect_right(self._starts, paddr) - 1
            if i < 0 or paddr >= self._ends[i]:
                raise BackendError(f"no physical range maps address {paddr:#x}")
            take = min(end, self._ends[i]) - paddr
            yield self._offsets[i] + (paddr - self._starts[i]), take
            paddr += take

    def file_end(self) -> int:
        """One past the highest file offset any range maps."""
        return max(r.offset + (r.end_paddr - r.start_paddr) for r in self.ranges)


def drop_contained(ranges: Sequence[PhysRange]) -> list[PhysRange]:
    """Drop ranges whose physical span lies inside another range; refuse partial overlaps.

    A vmcore made in ELF mode has a kernel-text PT_LOAD whose physical range duplicates part
    of a RAM PT_LOAD. Writing through one file offset would leave the other stale in an image
    file, so backends take disjoint ranges only; the larger (RAM) range wins.
    """
    rs = sorted(ranges, key=lambda r: (r.start_paddr, -r.end_paddr))
    out: list[PhysRange] = []
    for r in rs:
        if out and r.end_paddr <= out[-1].end_paddr:
            log.debug("dropping PT_LOAD [%#x, %#x) contained in another", r.start_paddr,
                      r.end_paddr)
            continue
        if out and r.start_paddr < out[-1].end_paddr:
            raise BackendError(f"physical ranges partially overlap at {r.start_paddr:#x}")
        out.append(r)
    return out


def identity_ranges(extents: Sequence[Extent]) -> list[PhysRange]:
    """Ranges with file offset == physical address, for ``/dev/mem`` and raw images."""
    return [PhysRange(e.start_paddr, e.end_paddr, e.start_paddr) for e in coalesce(extents)]


class Guarded:
    """Refuse any access outside the granted extents before the backend is touched.

    Extents are coalesced, so an access may span two touching extents. Reads are checked too:
    a read outside the plan cannot hurt the crashed kernel, but it means a bug.
    """

    __slots__ = ("_ends", "_starts", "backend", "extents")

    def __init__(self, backend: OldMem, extents: Sequence[Extent]) -> None:
        exts = coalesce(extents)
        if not exts:
            raise RefusedError("guard: no extents granted (rule: write only inside the plan)")
        self.backend = backend
        self.extents: tuple[Extent, ...] = tuple(exts)
        self._starts = [e.start_paddr for e in exts]
        self._ends = [e.end_paddr for e in exts]

    def covers(self, paddr: int, nbytes: int) -> bool:
        """True if ``[paddr, paddr + nbytes)`` lies inside one granted (coalesced) extent."""
        i = bisect_right(self._starts, paddr) - 1
        return i >= 0 and nbytes >= 0 and paddr + nbytes <= self._ends[i]

    def _refuse(self, what: str, paddr: int, nbytes: int) -> RefusedError:
        return RefusedError(
            f"guard: {what} of {nbytes:#x} bytes at {paddr:#x} lies outside the granted "
            "extents (rule: old memory is touched only inside the plan's extents)"
        )

    def pread(self, paddr: int, nbytes: int) -> bytes:
        if not self.covers(paddr, nbytes):
            raise self._refuse("read", paddr, nbytes)
        return self.backend.pread(paddr, nbytes)

    def preadinto(self, paddr: int, buf: memoryview) -> None:
        i = bisect_right(self._starts, paddr) - 1
        if i < 0 or paddr + buf.nbytes > self._ends[i]:
            raise self._refuse("read", paddr, buf.nbytes)
        self.backend.preadinto(paddr, buf)

    def pwrite(self, paddr: int, data: BytesLike) -> None:
        nbytes = len(data) if not isinstance(data, memoryview) else data.nbytes
        i = bisect_right(self._starts, paddr) - 1
        if i < 0 or paddr + nbytes > self._ends[i]:
            raise self._refuse("write", paddr, nbytes)
        self.backend.pwrite(paddr, data)

    def stable_view(self, paddr: int, nbytes: int) -> memoryview | None:
        """The backend's stable view of ``[paddr, paddr + nbytes)`` (see
        :mod:`kdumpd.store.fastpath`), refused outside the granted extents like any access;
        None if the backend has none."""
        if not self.covers(paddr, nbytes):
            raise self._refuse("mapping", paddr, nbytes)
        view = getattr(self.backend, "stable_view", None)
        return None if view is None else view(paddr, nbytes)

    def flush(self) -> None:
        self.backend.flush()

    def close(self) -> None:
        self.backend.close()
