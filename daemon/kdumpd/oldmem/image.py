"""A file-backed old-memory backend with fault injection, for tests, dry runs and experiments.

The file is a vmcore or a raw image, mapped whole with ``mmap``; physical addresses go through
the :class:`~kdumpd.units.PhysRange` list (for a raw file: one range with offset == address).

Fault injection plays the part of a device that still DMAs into old memory: it writes straight
into the mapping and bypasses any :class:`~kdumpd.oldmem.base.Guarded` wrapper.

- :meth:`ImageOldMem.flip_bits` flips distinct random bits (always changes the content);
- :meth:`ImageOldMem.burst` overwrites a contiguous physical range (random or a pattern);
- :meth:`ImageOldMem.lose_writes` makes later writes to a range vanish silently.
"""

from __future__ import annotations

import mmap
import os
import random
from collections.abc import Sequence

from kdumpd.errors import BackendError
from kdumpd.oldmem.base import BytesLike, RangeMap
from kdumpd.units import PAGE_SIZE, PhysRange

__all__ = ["ImageOldMem"]


class ImageOldMem:
    """Old memory backed by a file mapped with ``mmap`` (shared, so writes reach the file)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        ranges: Sequence[PhysRange] | None = None,
        *,
        writable: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            raise BackendError(exc.errno, f"cannot open image {self.path}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise BackendError(f"image {self.path} is empty")
            if ranges is None:
                ranges = [PhysRange(0, size, 0)]
            self._map = RangeMap(ranges)
            if self._map.file_end() > size:
                raise BackendError(
                    f"image {self.path} is {size:#x} bytes but its ranges reach "
                    f"{self._map.file_end():#x}"
                )
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._mm = mmap.mmap(fd, size, access=access)
        finally:
            os.close(fd)
        self._mv = memoryview(self._mm)
        self._views: list[memoryview] = []
        self._lost: list[tuple[int, int]] = []
        self.writable = writable

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        size_bytes: int,
        ranges: Sequence[PhysRange] | None = None,
    ) -> ImageOldMem:
        """Create a zero-filled file of ``size_bytes`` with its blocks allocated, and open it
        writable. Allocated, because a write through the mapping into a hole of a full
        filesystem is a SIGBUS that kills the process; this way a full disk is a BackendError
        here."""
        try:
            with open(path, "wb") as f:
                f.truncate(size_bytes)
                if size_bytes:
                    os.posix_fallocate(f.fileno(), 0, size_bytes)
        except OSError as exc:
            raise BackendError(exc.errno, f"cannot create image {path} of {size_bytes} bytes: "
                                          f"{exc.strerror}") from None
        return cls(path, ranges)

    @property
    def ranges(self) -> tuple[PhysRange, ...]:
        return self._map.ranges

    # -- the OldMem contract -------------------------------------------------------------

    def pread(self, paddr: int, nbytes: int) -> bytes:
        off = self._map.translate(paddr, nbytes)
        if off >= 0:
            return self._mm[off : off + nbytes]
        return b"".join(self._mm[o : o + n] for o, n in self._map.iter_pieces(paddr, nbytes))

    def preadinto(self, paddr: int, buf: memoryview) -> None:
        nbytes = buf.nbytes
        off = self._map.translate(paddr, nbytes)
        if off >= 0:
            buf[:] = self._mv[off : off + nbytes]
            return
        pos = 0
        for o, n in self._map.iter_pieces(paddr, nbytes):
            buf[pos : pos + n] = self._mv[o : o + n]
            pos += n

    def pwrite(self, paddr: int, data: BytesLike) -> None:
        if not self.writable:
            raise BackendError(f"image {self.path} is open read-only")
        if self._lost:
            self._pwrite_lossy(paddr, memoryview(data).cast("B"))
            return
        nbytes = len(data) if not isinstance(data, memoryview) else data.nbytes
        off = self._map.translate(paddr, nbytes)
        if off >= 0:
            self._mv[off : off + nbytes] = data
            return
        self._raw_write(paddr, memoryview(data).cast("B"))

    def stable_view(self, paddr: int, nbytes: int) -> memoryview | None:
        """A view of the mapping over ``[paddr, paddr + nbytes)``, valid until :meth:`close`
        (the store's C fast path writes through it); None if the range is not contiguous in
        the file or the image is read-only."""
        off = self._map.translate(paddr, nbytes)
        if off < 0 or not self.writable:
            return None
        view = self._mv[off : off + nbytes]
        self._views.append(view)
        return view

    def flush(self) -> None:
        if self.writable:
            self._mm.flush()

    def close(self) -> None:
        try:
            for view in self._views:
                view.release()
            self._mv.release()
            self._mm.close()
        except BufferError:
            raise BackendError(f"image {self.path}: a store still maps it (close the store "
                               "first)") from None
        self._views.clear()

    # -- fault injection: writes straight into the mapping, like a device would -----------

    def _raw_write(self, paddr: int, data: memoryview) -> None:
        pos = 0
        # Materialised first: a range with a hole raises before any byte is written.
        for o, n in list(self._map.iter_pieces(paddr, data.nbytes)):
            self._mv[o : o + n] = data[pos : pos + n]
            pos += n

    def _pwrite_lossy(self, paddr: int, data: memoryview) -> None:
        # Write only the parts of [paddr, end) outside every lost range.
        end = paddr + data.nbytes
        cuts = sorted((max(s, paddr), min(e, end)) for s, e in self._lost if s < end and e > paddr)
        pos = paddr
        for s, e in cuts:
            if s > pos:
                self._raw_write(pos, data[pos - paddr : s - paddr])
            pos = max(pos, e)
        if pos < end:
            self._raw_write(pos, data[pos - paddr :])

    def flip_bits(
        self, paddr: int, nbits: int = 1, *, span: int = PAGE_SIZE, rng: random.Random | None = None
    ) -> list[int]:
        """Flip ``nbits`` distinct random bits in ``[paddr, paddr + span)``; return their
        bit offsets from ``paddr``. Distinct bits guarantee the bytes change."""
        rng = rng or random.Random()
        bits = rng.sample(range(span * 8), nbits)
        for bit in bits:
            byte_paddr = paddr + bit // 8
            cur = self.pread(byte_paddr, 1)[0]
            self._raw_write(byte_paddr, memoryview(bytes([cur ^ (1 << (bit % 8))])))
        return bits

    def burst(
        self,
        paddr: int,
        nbytes: int,
        pattern: bytes | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        """Overwrite ``[paddr, paddr + nbytes)`` as a DMA would: with ``pattern`` repeated, or
        with random bytes. Parts of the burst that fall outside every range are skipped."""
        if pattern is None:
            data = (rng or random.Random()).randbytes(nbytes)
        else:
            if not pattern:
                raise ValueError("empty burst pattern")
            data = (pattern * (nbytes // len(pattern) + 1))[:nbytes]
        mv = memoryview(data)
        for r in self._map.ranges:
            s, e = max(r.start_paddr, paddr), min(r.end_paddr, paddr + nbytes)
            if s < e:
                self._raw_write(s, mv[s - paddr : e - paddr])

    def lose_writes(self, start_paddr: int, end_paddr: int) -> None:
        """From now on, silently drop the bytes of any write that fall in ``[start, end)``."""
        if not start_paddr < end_paddr:
            raise ValueError(f"empty lost-write range [{start_paddr:#x}, {end_paddr:#x})")
        if self._views:
            # Writes through a stable view are plain stores: nothing could drop them.
            raise BackendError("lost writes cannot be injected once stable views are out "
                               "(build the store with fast=False)")
        self._lost.append((start_paddr, end_paddr))

    def clear_faults(self) -> None:
        """Stop dropping writes (bits already flipped stay flipped)."""
        self._lost.clear()
