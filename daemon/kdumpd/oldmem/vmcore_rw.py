"""Old memory through a writable ``/proc/vmcore`` (the proposed kernel interface).

Stock kernels expose ``/proc/vmcore`` read-only: opening it for writing, or writing to it,
fails (measured in Debian's 6.1 kdump kernel: EIO). The feature is probed, never inferred from
a version: the constructor reads one page of old memory and writes the same bytes back; any
failure or short write raises :class:`~kdumpd.errors.BackendError`. ``/proc/vmcore`` exists
only in a kdump kernel, so this backend needs no separate kdump check.

Physical addresses map to file offsets through the PT_LOADs (``p_offset``), never by identity.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from kdumpd.errors import BackendError
from kdumpd.oldmem.base import BytesLike, RangeMap
from kdumpd.units import PAGE_SIZE, PhysRange

__all__ = ["VmcoreRW"]

_UNSUPPORTED = "writable /proc/vmcore not supported by this kernel"


class VmcoreRW:
    """``pread``/``pwrite`` on ``/proc/vmcore`` at the PT_LOAD offset of each address.

    ``probe_paddr`` must be a page the plan grants: the probe rewrites it with its own bytes.
    """

    def __init__(
        self, ranges: Sequence[PhysRange], *, probe_paddr: int, path: str = "/proc/vmcore"
    ) -> None:
        self._map = RangeMap(ranges)
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(exc.errno, f"{_UNSUPPORTED}: open {path}: {exc.strerror}") from exc
        try:
            self._probe(probe_paddr)
        except BaseException:
            os.close(self._fd)
            raise

    def _probe(self, paddr: int) -> None:
        off = self._map.translate(paddr, PAGE_SIZE)
        if off < 0:
            raise BackendError(f"{_UNSUPPORTED}: probe address {paddr:#x} is in no PT_LOAD")
        try:
            page = os.pread(self._fd, PAGE_SIZE, off)
            if len(page) != PAGE_SIZE:
                raise BackendError(errno.EIO, f"{_UNSUPPORTED}: short read at {paddr:#x}")
            written = os.pwrite(self._fd, page, off)
        except BackendError:
            raise
        except OSError as exc:
            raise BackendError(exc.errno, f"{_UNSUPPORTED}: probe write at {paddr:#x}: "
                               f"{exc.strerror}") from exc
        if written != PAGE_SIZE or os.pread(self._fd, PAGE_SIZE, off) != page:
            msg = f"{_UNSUPPORTED}: probe write at {paddr:#x} did not stick"
            raise BackendError(errno.EIO, msg)

    def pread(self, paddr: int, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        self.preadinto(paddr, memoryview(buf))
        return bytes(buf)

    def preadinto(self, paddr: int, buf: memoryview) -> None:
        pos = 0
        for off, n in self._map.iter_pieces(paddr, buf.nbytes):
            got = os.preadv(self._fd, [buf[pos : pos + n]], off)
            if got != n:
                raise BackendError(errno.EIO, f"short read of {self.path} at {paddr + pos:#x}")
            pos += n

    def pwrite(self, paddr: int, data: BytesLike) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        # Materialised first: a range with a hole raises before any byte is written.
        for off, n in list(self._map.iter_pieces(paddr, src.nbytes)):
            try:
                got = os.pwrite(self._fd, src[pos : pos + n], off)
            except OSError as exc:
                raise BackendError(exc.errno, f"write of {self.path} at {paddr + pos:#x}: "
                                   f"{exc.strerror}") from exc
            if got != n:
                raise BackendError(errno.EIO, f"short write of {self.path} at {paddr + pos:#x}")
            pos += n

    def flush(self) -> None:
        # Writes go straight to old memory in the kernel; there is no cache to write back.
        return None

    def close(self) -> None:
        os.close(self._fd)
