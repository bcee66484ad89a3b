"""Old memory through ``/dev/mem``, mapped in bounded windows; refuses outside a kdump kernel.

Inside the kdump kernel the crashed kernel's RAM is not "System RAM" in ``/proc/iomem``, so a
stock kernel with ``CONFIG_STRICT_DEVMEM`` lets root map it (measured: read and write of old RAM
work in Debian's 6.1 kdump kernel). On a live system the same writes would corrupt the running
kernel, so the constructor refuses unless both kdump facts hold:

- ``/proc/vmcore`` exists (only a kernel booted by ``kexec -p`` with an ELF core header has it);
- the kernel command line carries ``elfcorehdr=`` (kexec-tools passes it to the capture kernel).

There is deliberately no override: no flag, no environment variable. Tests point
``proc_root`` and ``dev_path`` at fakes through constructor parameters only.

It also refuses ranges that overlap the running kernel's own System RAM (read from
``/proc/iomem``), and it never maps outside the ranges it was given: ``mmap`` of ``/dev/mem``
fills page tables for the whole window at once (``remap_pfn_range``), so windows are bounded
(``window_bytes``) and few (``max_windows``, least recently used evicted).

:meth:`DevMem.mappable` finds what the kernel lets it map: besides System RAM, x86's
``devmem_is_allowed`` refuses busy iomem resources (``CONFIG_IO_STRICT_DEVMEM``), and in a
kdump kernel old RAM can sit under one, such as the "RAM buffer" e820 inserts above the last
RAM page below 4 GiB. ``/proc/iomem`` does not show which resources are busy, so it probes:
the daemon drops what cannot be mapped from the plan before anything is placed there.

:meth:`DevMem.stable_view` pins whole extents for the store's C fast path, up to
``pin_bytes`` in all (default 4 GiB: 8 MiB of page tables at 8 bytes per 4 KiB page); extents
past the budget stay on the windowed path.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections import OrderedDict
from collections.abc import Sequence

from kdumpd.cmdline import iter_cmdline_params
from kdumpd.errors import BackendError, RefusedError
from kdumpd.oldmem.base import BytesLike, RangeMap
from kdumpd.units import PAGE_SIZE, PhysRange

__all__ = [
    "DevMem",
    "is_kdump_kernel",
    "iter_cmdline_params",
    "read_kdump_facts",
    "system_ram_ranges",
]

log = logging.getLogger(__name__)

_KDUMP_RULE = (
    "rule: /dev/mem is written only inside a kdump kernel "
    "(/proc/vmcore present and elfcorehdr= on the kernel command line)"
)


def is_kdump_kernel(proc_cmdline: str, vmcore_exists: bool) -> bool:
    """True only if ``/proc/vmcore`` exists and the kernel itself got a non-empty
    ``elfcorehdr=``. Pure: the caller reads the facts."""
    if not vmcore_exists:
        return False
    return any(name == "elfcorehdr" and value for name, value in iter_cmdline_params(proc_cmdline))


def read_kdump_facts(proc_root: str = "/proc") -> tuple[str, bool]:
    """Read ``(cmdline, vmcore exists)`` from ``proc_root``; unreadable cmdline reads as ''."""
    try:
        with open(os.path.join(proc_root, "cmdline"), "rb") as f:
            cmdline = f.read().decode("utf-8", "replace").replace("\0", " ")
    except OSError:
        cmdline = ""
    return cmdline, os.path.exists(os.path.join(proc_root, "vmcore"))


def system_ram_ranges(iomem_text: str) -> list[tuple[int, int]]:
    """Top-level ``System RAM`` entries of ``/proc/iomem`` as half-open ``(start, end)``."""
    out: list[tuple[int, int]] = []
    for line in iomem_text.splitlines():
        if line.startswith(" ") or ":" not in line:
            continue  # nested entries (kernel code, crashkernel...) sit inside a parent
        span, _, name = line.partition(":")
        if name.strip() != "System RAM":
            continue
        lo, _, hi = span.strip().partition("-")
        out.append((int(lo, 16), int(hi, 16) + 1))
    return out


class DevMem:
    """``/dev/mem`` backend; ranges are physical (file offset must equal the address)."""

    def __init__(
        self,
        ranges: Sequence[PhysRange],
        *,
        dev_path: str = "/dev/mem",
        proc_root: str = "/proc",
        window_bytes: int = 32 << 20,
        max_windows: int = 32,
        pin_bytes: int = 4 << 30,
    ) -> None:
        cmdline, vmcore = read_kdump_facts(proc_root)
        if not is_kdump_kernel(cmdline, vmcore):
            why = "no /proc/vmcore" if not vmcore else "no elfcorehdr= on the command line"
            raise RefusedError(f"devmem: not a kdump kernel ({why}); {_KDUMP_RULE}")
        self._map = RangeMap(ranges)
        for r in self._map.ranges:
            if r.offset != r.start_paddr:
                raise BackendError(
                    f"devmem: range at {r.start_paddr:#x} has file offset {r.offset:#x}; "
                    "/dev/mem offsets are physical addresses (use identity_ranges)"
                )
        self._refuse_live_ram(proc_root)
        if window_bytes < PAGE_SIZE or window_bytes & (window_bytes - 1) or max_windows < 1:
            raise BackendError("devmem: window_bytes must be a power of two >= 4096")
        self._wshift = window_bytes.bit_length() - 1
        self._max_windows = max_windows
        self._windows: OrderedDict[int, tuple[mmap.mmap, memoryview, int, int]] = OrderedDict()
        self._pinned: list[tuple[mmap.mmap, memoryview]] = []
        self._pin_left = pin_bytes
        try:
            # No O_SYNC: O_SYNC makes x86 map the pages uncached, which is orders of magnitude
            # slower; coherence with devices is not ours to keep (checksums catch DMA).
            self._fd = os.open(dev_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            msg = f"devmem: cannot open {dev_path}: {exc.strerror}"
            raise BackendError(exc.errno, msg) from exc
        self.dev_path = dev_path

    def _refuse_live_ram(self, proc_root: str) -> None:
        path = os.path.join(proc_root, "iomem")
        try:
            with open(path) as f:
                ram = system_ram_ranges(f.read())
        except OSError as exc:
            msg = f"devmem: cannot read {path} ({exc.strerror}); {_KDUMP_RULE}"
            raise RefusedError(msg) from exc
        if not ram or all(hi - lo <= 1 and lo == 0 for lo, hi in ram):
            raise RefusedError(f"devmem: {path} shows no System RAM addresses (not root?)")
        for r in self._map.ranges:
            for lo, hi in ram:
                if r.start_paddr < hi and lo < r.end_paddr:
                    raise RefusedError(
                        f"devmem: range [{r.start_paddr:#x}, {r.end_paddr:#x}) overlaps the "
                        f"running kernel's System RAM [{lo:#x}, {hi:#x}) (rule: never touch "
                        "the capture kernel's own memory)"
                    )

    def _window(self, paddr: int) -> tuple[memoryview, int, int]:
        # The window holding paddr, clipped to its range so nothing unplanned is ever mapped.
        key = paddr >> self._wshift
        hit = self._windows.get(key)
        if hit is not None and hit[2] <= paddr < hit[3]:
            self._windows.move_to_end(key)
            return hit[1], hit[2], hit[3]
        if hit is not None:
            self._evict(key)
        off = self._map.translate(paddr, 1)
        if off < 0:
            raise BackendError(f"devmem: no range maps address {paddr:#x}")
        rng = next(r for r in self._map.ranges if r.start_paddr <= paddr < r.end_paddr)
        lo = max(rng.start_paddr, key << self._wshift)
        hi = min(rng.end_paddr, (key + 1) << self._wshift)
        mm = mmap.mmap(self._fd, hi - lo, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=lo)
        mv = memoryview(mm)
        self._windows[key] = (mm, mv, lo, hi)
        while len(self._windows) > self._max_windows:
            self._evict(next(iter(self._windows)))
        return mv, lo, hi

    def _evict(self, key: int) -> None:
        mm, mv, _, _ = self._windows.pop(key)
        mv.release()
        mm.close()

    def pread(self, paddr: int, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        self.preadinto(paddr, memoryview(buf))
        return bytes(buf)

    def preadinto(self, paddr: int, buf: memoryview) -> None:
        pos, nbytes = 0, buf.nbytes
        while pos < nbytes:
            mv, lo, hi = self._window(paddr + pos)
            take = min(nbytes - pos, hi - (paddr + pos))
            start = paddr + pos - lo
            buf[pos : pos + take] = mv[start : start + take]
            pos += take

    def pwrite(self, paddr: int, data: BytesLike) -> None:
        src = memoryview(data).cast("B")
        pos, nbytes = 0, src.nbytes
        if self._map.translate(paddr, nbytes) < 0:
            for _ in self._map.iter_pieces(paddr, nbytes):  # raises on a hole, before writing
                pass
        while pos < nbytes:
            mv, lo, hi = self._window(paddr + pos)
            take = min(nbytes - pos, hi - (paddr + pos))
            start = paddr + pos - lo
            mv[start : start + take] = src[pos : pos + take]
            pos += take

    def mappable(self, chunk_bytes: int = 64 << 20) -> list[tuple[int, int]]:
        """The parts of this backend's ranges that ``mmap`` of /dev/mem accepts, as half-open
        physical ranges. Probed in chunks (a mapping fills all its page tables at once) and
        bisected to the page where the kernel refuses (EPERM); other errors raise."""
        out: list[tuple[int, int]] = []

        def probe(lo: int, hi: int) -> None:
            try:
                mm = mmap.mmap(self._fd, hi - lo, mmap.MAP_SHARED, mmap.PROT_READ, offset=lo)
            except PermissionError:
                if hi - lo <= PAGE_SIZE:
                    return
                mid = lo + (((hi - lo) >> 1) & ~(PAGE_SIZE - 1))
                probe(lo, mid)
                probe(mid, hi)
                return
            except OSError as exc:
                raise BackendError(exc.errno, f"devmem: cannot map [{lo:#x}, {hi:#x}): "
                                              f"{exc.strerror}") from exc
            mm.close()
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))

        for r in self._map.ranges:
            for lo in range(r.start_paddr, r.end_paddr, chunk_bytes):
                probe(lo, min(lo + chunk_bytes, r.end_paddr))
        return out

    def stable_view(self, paddr: int, nbytes: int) -> memoryview | None:
        """A mapping of ``[paddr, paddr + nbytes)`` kept until :meth:`close`, or None past the
        pin budget or across a range boundary (the caller then uses pread/pwrite)."""
        if nbytes <= 0 or nbytes > self._pin_left or paddr & (PAGE_SIZE - 1) or \
                self._map.translate(paddr, nbytes) < 0:
            return None
        try:
            mm = mmap.mmap(self._fd, nbytes, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE, offset=paddr)
        except OSError as exc:
            # Refuse at start, not at the first write there: the plan should have left out
            # what the kernel will not map (see mappable).
            raise BackendError(exc.errno, f"devmem: cannot map [{paddr:#x}, "
                                          f"{paddr + nbytes:#x}): {exc.strerror} (not probed "
                                          "with mappable()?)") from exc
        view = memoryview(mm)
        self._pinned.append((mm, view))
        self._pin_left -= nbytes
        return view

    def flush(self) -> None:
        # Stores through the mapping land in RAM (cached, coherent): nothing to write back.
        # msync() would even fail, since /dev/mem has no fsync (EINVAL).
        return None

    def close(self) -> None:
        for key in list(self._windows):
            self._evict(key)
        for mm, view in self._pinned:
            try:
                view.release()
                mm.close()
            except BufferError:
                raise BackendError("devmem: a store still maps it (close the store first)") \
                    from None
        self._pinned.clear()
        os.close(self._fd)
