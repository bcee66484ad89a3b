"""The store's metadata: which group holds each block, its checksum, and the free groups.

Everything lives in the daemon's memory; nothing is written to old memory but block data, so
a device scribbling on old memory can damage data (which checksums catch) but never the map.

Per block (dense ``array.array`` tables, indexed by block number)::

    groups[block]     uint32   group holding the block's copies; 0xffffffff = unwritten (zeros)
    checksums[block]  uint64   xxh3-64 of the block's 4096 bytes (of 4096 zeros if unwritten)
                      ------
                      12 bytes per 4 KiB block = 0.29 % of the device size

Why ``array`` and not numpy: the store runs in the kdump kernel's ~100 MiB, where importing
numpy alone costs ~22 MiB per process; the hot loops are in C (the fast path, the batch
checksums) or are per request, and the whole-table scans are memcmps of the group table's bytes
against all-ones (:meth:`SlotTable.written`), as fast as numpy's comparisons were.
The tables are created at their final size and never resized (the C fast path keeps their
addresses; an ``array`` refuses to resize while a buffer is exported, which backs that up).

Free groups: a high-water mark (groups at or above it were never handed out) and an
``array('I')`` stack of groups given back by trim or zero writes: 4 bytes per *freed* group,
so nothing until the first trim, and at worst 4 bytes per ``N * 4 KiB`` of old memory. The
stack has a capacity and a height (``state``): it grows by replacement, never in place, and
only here (``on_grow`` tells the C fast path, which pops and pushes within the capacity).
The allocator's numbers (high-water mark, stack height, used blocks) live in one
``array('Q')``, ``state``, so that the C fast path places blocks with the very same state
and hands them out in the very same order.
Sparse extras, empty while memory behaves: failure counts per slot, retired groups, lost
blocks.

There is no per-block generation number: the checksum covers content, so a stale copy (lost
write, reused slot) fails it like any other corruption, and the store's lock orders writers,
readers and the scrubber, so no reader can see a half-updated block.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Callable

from kdumpd.errors import BackendError
from kdumpd.store.blocksum import ZERO_CHECKSUM

__all__ = ["BYTES_PER_BLOCK", "BYTES_PER_GROUP", "UNWRITTEN", "SlotTable"]

UNWRITTEN = 0xFFFF_FFFF
BYTES_PER_BLOCK = 4 + 8
BYTES_PER_GROUP = 4

# Scans compare the group table's bytes with all-ones (UNWRITTEN) bytes: a window of them with
# one memcmp (``bytes.startswith`` takes a memoryview, so nothing is copied), then halves of the
# first window that differs. A 1 GiB device's table is 1 MiB: ~16 memcmps of 64 KiB.
_WINDOW = 1 << 14  # blocks per memcmp
_ALL_ONES = b"\xff" * (_WINDOW << 2)
_UNWRITTEN_BYTES = b"\xff" * 4
_CLEAR_ROWS = 1024  # blocks reset per slice assignment when freeing a range
_MIN_STACK = 1024  # free-stack capacity at its first growth (4 KiB)
# state[] indices, shared with blocksum.c (KDUMPD_NEXT, KDUMPD_NFREE, KDUMPD_USED)
NEXT, NFREE, USED = 0, 1, 2
# The C fast path reads the tables as uint32_t and uint64_t.
if array("I").itemsize != 4 or array("Q").itemsize != 8:
    raise ImportError("kdumpd.store needs array('I') and array('Q') of 4 and 8 bytes")


class SlotTable:
    """Block -> (group, checksum), the free-group stack, and the fault bookkeeping.

    Freed groups are handed out first, in the order they were released; then never-used groups
    from the high-water mark up. Sequential writes thus get consecutive groups, and sequential
    reads become one backend read per copy per run.
    """

    __slots__ = (
        "_clear_groups",
        "_clear_sums",
        "_free_view",
        "_group_bytes",
        "_group_view",
        "_sum_view",
        "checksums",
        "failures",
        "free_stack",
        "groups",
        "lost",
        "ngroups",
        "on_grow",
        "retired",
        "spare_groups",
        "state",
    )

    def __init__(self, nblocks: int, ngroups: int, *, spare_groups: int) -> None:
        if not 0 <= spare_groups < ngroups:
            raise ValueError(f"spare groups {spare_groups} must be below {ngroups} groups")
        # Built by repetition: one allocation of the final size, no temporary list.
        self.groups = array("I", (UNWRITTEN,)) * nblocks
        # An unwritten block reads as zeros, so it carries the checksum of zeros: a request's
        # checksums then verify in one batch, zero-filled blocks included.
        self.checksums = array("Q", (ZERO_CHECKSUM,)) * nblocks
        # Typed views for slice assignment and zero-copy slices (memoryview slices share the
        # memory; array slices copy), and the raw bytes of the groups for the byte search.
        self._group_view = memoryview(self.groups)
        self._sum_view = memoryview(self.checksums)
        self._group_bytes = self._group_view.cast("B")
        self._clear_groups = memoryview(array("I", (UNWRITTEN,)) * _CLEAR_ROWS)
        self._clear_sums = memoryview(array("Q", (ZERO_CHECKSUM,)) * _CLEAR_ROWS)
        # Freed groups: entries [0, state[NFREE]) in use, the top (last) handed out first.
        self.free_stack = array("I")
        self._free_view = memoryview(self.free_stack)
        self.on_grow: Callable[[array[int]], None] | None = None  # the fast path re-points
        # NEXT: groups at or above it were never handed out; NFREE: the stack's height.
        self.state = array("Q", (0, 0, 0))
        self.ngroups = ngroups
        self.spare_groups = spare_groups
        self.failures: dict[int, int] = {}  # slot (copy * ngroups + group) -> failures seen
        self.retired: set[int] = set()  # groups holding a quarantined slot; never reused
        self.lost: set[int] = set()  # blocks whose every copy failed; reads raise until rewritten

    @property
    def used_blocks(self) -> int:
        """Blocks holding a group."""
        return self.state[USED]

    @used_blocks.setter
    def used_blocks(self, value: int) -> None:
        self.state[USED] = value

    @property
    def free_groups(self) -> int:
        st = self.state
        return st[NFREE] + self.ngroups - st[NEXT]

    @property
    def usable_free_groups(self) -> int:
        """Free groups ordinary writes may take (the spares are kept for relocation)."""
        return max(0, self.free_groups - self.spare_groups)

    def allocate(self, count: int, *, use_spares: bool = False) -> list[int]:
        """Take ``count`` free groups, in hand-out order; raise ENOSPC taking none if short."""
        avail = self.free_groups if use_spares else self.usable_free_groups
        if count > avail:
            raise BackendError(
                errno.ENOSPC,
                f"old-memory pool is full: {count} blocks to place, {avail} free groups",
            )
        st = self.state
        nfree = st[NFREE]
        reuse = min(count, nfree)
        out: list[int] = []
        if reuse:
            taken = self.free_stack[nfree - reuse : nfree]
            st[NFREE] = nfree - reuse
            taken.reverse()
            out = taken.tolist()
        fresh = count - reuse
        if fresh:
            nxt = st[NEXT]
            out.extend(range(nxt, nxt + fresh))
            st[NEXT] = nxt + fresh
        return out

    def release(self, groups: list[int]) -> None:
        """Return groups; the first of ``groups`` is handed out first next time. A retired
        group never goes back (none should come here: only groups blocks hold are released,
        and a block never holds a retired group)."""
        if self.retired:
            groups = [g for g in groups if g not in self.retired]
        k = len(groups)
        nfree = self.state[NFREE]
        if nfree + k > len(self.free_stack):
            self._grow(nfree + k)
        self._free_view[nfree : nfree + k] = array("I", reversed(groups))
        self.state[NFREE] = nfree + k

    def _grow(self, need: int) -> None:
        # A new, larger stack (doubling, at most one entry per group), never a resize: the C
        # fast path holds the old one's address until on_grow hands it the new one.
        old = self.free_stack
        cap = min(self.ngroups, max(need, 2 * len(old), _MIN_STACK))
        new = array("I", bytes(cap << 2))
        height = self.state[NFREE]
        new[:height] = old[:height]
        self.free_stack, self._free_view = new, memoryview(new)
        if self.on_grow is not None:
            self.on_grow(new)

    def retire(self, group: int) -> None:
        """Never hand ``group`` out again (it holds a quarantined slot)."""
        self.retired.add(group)

    def sums_view(self, b0: int, b1: int) -> memoryview:
        """The checksums of blocks ``[b0, b1)`` as a ``'Q'`` memoryview sharing the table's
        memory (no copy; valid while the lock is held)."""
        return self._sum_view[b0:b1]

    def set_run(self, b0: int, groups: list[int], sums: list[int]) -> None:
        """Store the groups and checksums of blocks ``b0, b0 + 1, ...`` (one memcpy each)."""
        b1 = b0 + len(groups)
        self._group_view[b0:b1] = array("I", groups)
        self._sum_view[b0:b1] = array("Q", sums)

    def written(self, b0: int, b1: int) -> int:
        """The first written block in ``[b0, b1)``, or ``b1`` if there is none."""
        raw, ones = self._group_bytes, _ALL_ONES
        while b0 < b1:
            end = min(b0 + _WINDOW, b1)
            if not ones.startswith(raw[b0 << 2 : end << 2]):
                while end - b0 > 1:  # [b0, end) holds a written block; b0 may be it
                    mid = (b0 + end) >> 1
                    if ones.startswith(raw[b0 << 2 : mid << 2]):
                        b0 = mid
                    else:
                        end = mid
                return b0
            b0 = end
        return b1

    def unmap(self, b0: int, b1: int) -> list[int]:
        """Mark blocks ``[b0, b1)`` unwritten (checksum of zeros); return the groups they
        held, in block order. Unwritten stretches cost a byte search, not a Python loop."""
        groups = self.groups
        freed: list[int] = []
        b = self.written(b0, b1)
        while b < b1:
            end = min(b + _CLEAR_ROWS, b1)
            if _UNWRITTEN_BYTES in self._group_bytes[b << 2 : end << 2].tobytes():
                freed += [g for g in groups[b:end] if g != UNWRITTEN]  # mixed (or odd bytes)
            else:
                freed += groups[b:end].tolist()  # all written: no per-block Python
            self._group_view[b:end] = self._clear_groups[: end - b]
            self._sum_view[b:end] = self._clear_sums[: end - b]
            b = self.written(end, b1)
        return freed

    def nbytes(self) -> int:
        """Bytes of daemon memory the tables take now (sparse extras excluded)."""
        return (self._group_view.nbytes + self._sum_view.nbytes
                + len(self.free_stack) * BYTES_PER_GROUP)
