"""The store's fast path: aligned reads, writes and trims done whole in C, off the GIL.

Why: under nbdkit every request is a Python callback, and Python work serialises on the GIL.
In the Python path a 4 KiB read costs ~3 us of interpreter time (table lookups, placement,
guard and backend address arithmetic, a copy, a checksum), and with several nbdkit worker
threads the GIL changes hands on every request, which roughly triples that
(``docs/serve.md``, "Bench figures"). Here the same work is one C call that releases the GIL:
it looks the block up, copies it from the mapped slot, and verifies the checksum on the copy
the caller gets, under a reader-writer lock, so several worker threads copy and hash at once.

Writes place blocks in C too (first writes, and writes after a trim: swap's own pattern, since
the kernel writes clusters into slots it has discarded): C pops groups from the same free
stack and high-water mark (:class:`~kdumpd.store.slot.SlotTable`'s ``state`` and
``free_stack``, shared, not copied), in the same order, so both paths lay blocks out alike.
All-zero blocks and whole-block trims give groups back in C as well.

What stays in Python (:class:`~kdumpd.store.blockstore.BlockStore`), taking the same lock
exclusively through :class:`FastLock`: unaligned requests, partial-block trims and zeroes,
every repair (the C read stops at the first block that fails its checksum and hands the rest to
Python), the scrubber's repairs, and whatever is unusual: a full pool (Python raises ENOSPC),
a free stack that must grow (only Python allocates), lost blocks in the table (only Python
forgets them), groups to give back while some group is retired (only Python filters them), a
slot the backend could not map. C then changes nothing and returns 0, so there is one
implementation of each of those rules.

Preconditions, checked here: the cffi kernels include the fast path, and the backend hands out
*stable* views (``stable_view``, valid until the backend closes) of the placement's extents.
The views are checked against the guard (:class:`~kdumpd.oldmem.base.Guarded`) like any access.
The store's tables (:class:`~kdumpd.store.slot.SlotTable`: ``array('I')`` and ``array('Q')``)
are updated in place and never replaced or resized, so the C side may keep their addresses;
the cffi buffers taken here are exports that would make any resize raise instead.
"""

from __future__ import annotations

import functools
import logging
import weakref
from array import array
from typing import Any

from kdumpd.oldmem.base import Guarded
from kdumpd.store.blocksum import ZERO_CHECKSUM, BlockSums, CffiBlockSums
from kdumpd.store.placement import Placement
from kdumpd.store.slot import SlotTable

__all__ = ["SCRATCH_BLOCKS", "FastLock", "FastPath"]

log = logging.getLogger(__name__)

# Checksums of a request above 64 blocks go to a scratch array shared by writers (filled under
# the exclusive lock; C allocates nothing): 32 MiB, the largest request the plugin advertises.
# Larger writes take the Python path.
SCRATCH_BLOCKS = 8192


class FastLock:
    """The fast path's lock, taken exclusively by the store's Python paths.

    It has :class:`~kdumpd.store.mutex.YieldingMutex`'s interface (``raw.acquire(False)``,
    ``wait()``, a context manager). Blocking happens in C with the GIL released, so a Python
    thread waiting here never holds up a C reader. Releasing it tells the C side what it may do
    on its own: write only while the table has no lost blocks (only Python forgets them), and
    give groups back only while no group is retired (only Python keeps those out of the stack).
    """

    __slots__ = ("_f", "_lib", "_table", "raw")

    def __init__(self, lib: Any, handle: Any, table: SlotTable) -> None:
        self._lib = lib
        self._f = handle
        self._table = table
        self.raw = self

    def acquire(self, blocking: bool = True) -> bool:
        if blocking:
            self._lib.kdumpd_fast_lock(self._f)
            return True
        return bool(self._lib.kdumpd_fast_trylock(self._f))

    def release(self) -> None:
        t = self._table
        self._lib.kdumpd_fast_unlock(self._f, (0 if t.lost else 1) | (0 if t.retired else 2))

    def wait(self) -> None:
        self._lib.kdumpd_fast_lock(self._f)

    def __enter__(self) -> None:
        self._lib.kdumpd_fast_lock(self._f)

    def __exit__(self, *exc: object) -> None:
        self.release()


class FastPath:
    """C reads, writes and trims over stable views of the placement's extents.

    Build with :meth:`create`, which returns None when the preconditions do not hold.
    """

    __slots__ = ("__weakref__", "_counters", "_ffi", "_free", "_from_buffer", "_keep", "_lib",
                 "_read", "_stack", "_write", "handle", "lock", "mapped_extents")

    def __init__(self, sums: CffiBlockSums, placement: Placement, views: list[memoryview | None],
                 table: SlotTable) -> None:
        ffi, lib = sums.ffi, sums.lib
        self._ffi, self._lib = ffi, lib
        cum = array("Q", placement.pool_offsets())
        ptrs = [ffi.from_buffer(v, require_writable=True) if v is not None else ffi.NULL
                for v in views]
        base = ffi.new("unsigned char *[]", [ffi.cast("unsigned char *", p) for p in ptrs])
        groups = ffi.from_buffer("uint32_t[]", table.groups, require_writable=True)
        sums_arr = ffi.from_buffer("uint64_t[]", table.checksums, require_writable=True)
        state = ffi.from_buffer("uint64_t[]", table.state, require_writable=True)
        scratch = array("Q", bytes(SCRATCH_BLOCKS << 3))
        scratch_arr = ffi.from_buffer("uint64_t[]", scratch, require_writable=True)
        # The cffi buffers keep the views (and so the mappings) and the tables exported until
        # close(): the tables cannot be resized under the C side.
        self._keep: list[Any] = [ptrs, base, cum, groups, sums_arr, state, scratch, scratch_arr]
        handle = lib.kdumpd_fast_new(
            placement.ngroups, placement.copies, len(views),
            ffi.from_buffer("uint64_t[]", cum), base, groups, sums_arr,
            len(table.groups), ZERO_CHECKSUM, state, table.spare_groups, scratch_arr,
            SCRATCH_BLOCKS,
        )
        if handle == ffi.NULL:
            raise MemoryError("kdumpd_fast_new")
        self.handle = handle
        # The free stack is replaced when it grows (slot.py): hand C each new one. The stack's
        # cffi buffer sits in a one-element list the finalizer also sees.
        # (No reference back to this object from the table: a store dropped without close()
        # must be freed by reference counting, which releases the views at once.)
        self._stack: list[Any] = [ffi.NULL]
        set_free = functools.partial(_set_free, lib, ffi, handle, self._stack)
        set_free(table.free_stack)
        table.on_grow = set_free
        # A store dropped without close() still frees the C side and releases the views.
        self._free = weakref.finalize(self, _free, lib, handle, ffi, ptrs, self._stack, table)
        self.lock = FastLock(lib, handle, table)
        self.mapped_extents = sum(v is not None for v in views)
        self._read = lib.kdumpd_fast_read
        self._write = lib.kdumpd_fast_write
        self._from_buffer = ffi.from_buffer
        self._counters = ffi.new("uint64_t[6]")

    @classmethod
    def create(cls, sums: BlockSums, placement: Placement, mem: Guarded,
               table: SlotTable) -> FastPath | None:
        """The fast path, or None (no C kernels, or the backend maps none of the extents)."""
        if not isinstance(sums, CffiBlockSums) or not hasattr(sums.lib, "kdumpd_fast_new"):
            return None
        views = [mem.stable_view(e.start_paddr, e.end_paddr - e.start_paddr)
                 for e in placement.extents]
        if not any(v is not None for v in views):
            return None
        return cls(sums, placement, views, table)

    def read(self, b0: int, mv: memoryview) -> int:
        """Fill ``mv`` with whole blocks from ``b0``; the number of leading blocks served and
        verified (fewer than asked: the rest is the Python path's; 0 out of range)."""
        return int(self._read(self.handle, b0, mv.nbytes >> 12, self._from_buffer(mv)))

    def write(self, b0: int, mv: memoryview) -> bool:
        """Write whole blocks from ``b0`` in every copy, placing and freeing groups as the
        Python path would; False if it changed nothing and the Python path must do it."""
        return bool(self._write(self.handle, b0, mv.nbytes >> 12, self._from_buffer(mv)))

    def trim(self, b0: int, b1: int, *, zero: bool = False) -> bool:
        """Make whole blocks ``[b0, b1)`` unwritten, counted as a trim or a write-zeroes; False
        if it changed nothing and the Python path must do it."""
        return bool(self._lib.kdumpd_fast_trim(self.handle, b0, b1, 1 if zero else 0))

    def read_request(self, offset: int, buf: memoryview) -> bool:
        """nbdkit's pread in one call: True if ``buf`` (byte format) was filled whole here.
        The least Python per request, since every instruction here runs under the GIL."""
        n = len(buf)
        return not (offset | n) & 4095 and \
            self._read(self.handle, offset >> 12, n >> 12, self._from_buffer(buf)) == n >> 12

    def write_request(self, offset: int, buf: memoryview) -> bool:
        """nbdkit's pwrite in one call: True if done here (any aligned write C may do)."""
        n = len(buf)
        return not (offset | n) & 4095 and \
            self._write(self.handle, offset >> 12, n >> 12, self._from_buffer(buf)) == 1

    def verify(self, block: int) -> int:
        """0 unwritten, 1 every copy matches its checksum, -1 ask the Python path."""
        return int(self._lib.kdumpd_fast_verify(self.handle, block))

    def next_written(self, block: int) -> int:
        """The first written block at or after ``block``; the block count if none."""
        return int(self._lib.kdumpd_fast_next_written(self.handle, block))

    def counters(self) -> tuple[int, int, int, int, int, int]:
        """Requests and blocks served here: reads, writes, blocks read, blocks written, trims,
        write-zeroes."""
        self._lib.kdumpd_fast_counters(self.handle, self._counters)
        c = self._counters
        return int(c[0]), int(c[1]), int(c[2]), int(c[3]), int(c[4]), int(c[5])

    def close(self) -> None:
        """Free the C side and drop the views (the backend can then unmap). Idempotent; the
        store must not be used afterwards."""
        self._free()
        self.handle = self._ffi.NULL
        self._keep.clear()


def _set_free(lib: Any, ffi: Any, handle: Any, holder: list[Any], stack: array[int]) -> None:
    # Hand C the free-group stack (at creation, or when SlotTable._grow replaced it), with the
    # exclusive lock held; the previous stack's buffer is released so it can be freed.
    old = holder[0]
    new = ffi.from_buffer("uint32_t[]", stack, require_writable=True) if len(stack) else ffi.NULL
    lib.kdumpd_fast_set_free(handle, new, len(stack))
    holder[0] = new
    if old != ffi.NULL:
        ffi.release(old)


def _free(lib: Any, handle: Any, ffi: Any, ptrs: list[Any], stack: list[Any],
          table: SlotTable) -> None:
    table.on_grow = None
    lib.kdumpd_fast_free(handle)
    for p in ptrs + stack:
        if p != ffi.NULL:
            ffi.release(p)
    stack[0] = ffi.NULL
