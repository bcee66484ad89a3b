"""The store's metadata: which group holds each block, its checksum, and the free groups.

Everything lives in the daemon's memory; nothing is written to old memory but block data, so
a device scribbling on old memory can damage data (which checksums catch) but never the map.

Per block (dense numpy arrays, indexed by block number)::

    groups[block]     uint32   group holding the block's copies; 0xffffffff = unwritten (zeros)
    checksums[block]  uint64   xxh3-64 of the block's 4096 bytes (of 4096 zeros if unwritten)
                      ------
                      12 bytes per 4 KiB block = 0.29 % of the device size

Free groups: a high-water mark (groups at or above it were never handed out) and an
``array('I')`` stack of groups given back by trim or zero writes: 4 bytes per *freed* group,
so nothing until the first trim, and at worst 4 bytes per ``N * 4 KiB`` of old memory.
Sparse extras, empty while memory behaves: failure counts per slot, retired groups, lost
blocks.

There is no per-block generation number: the checksum covers content, so a stale copy (lost
write, reused slot) fails it like any other corruption, and the store's lock orders writers,
readers and the scrubber, so no reader can see a half-updated block.
"""

from __future__ import annotations

import errno
from array import array

import numpy as np
import numpy.typing as npt

from kdumpd.errors import BackendError
from kdumpd.store.blocksum import ZERO_CHECKSUM

__all__ = ["BYTES_PER_BLOCK", "BYTES_PER_GROUP", "UNWRITTEN", "SlotTable"]

UNWRITTEN = 0xFFFF_FFFF
BYTES_PER_BLOCK = 4 + 8
BYTES_PER_GROUP = 4


class SlotTable:
    """Block -> (group, checksum), the free-group stack, and the fault bookkeeping.

    Freed groups are handed out first, in the order they were released; then never-used groups
    from the high-water mark up. Sequential writes thus get consecutive groups, and sequential
    reads become one backend read per copy per run.
    """

    __slots__ = (
        "_free",
        "_next",
        "checksums",
        "failures",
        "groups",
        "lost",
        "ngroups",
        "retired",
        "spare_groups",
        "used_blocks",
    )

    def __init__(self, nblocks: int, ngroups: int, *, spare_groups: int) -> None:
        if not 0 <= spare_groups < ngroups:
            raise ValueError(f"spare groups {spare_groups} must be below {ngroups} groups")
        self.groups: npt.NDArray[np.uint32] = np.full(nblocks, UNWRITTEN, dtype=np.uint32)
        # An unwritten block reads as zeros, so it carries the checksum of zeros: a request's
        # checksums then verify in one batch, zero-filled blocks included.
        self.checksums: npt.NDArray[np.uint64] = np.full(nblocks, ZERO_CHECKSUM, dtype=np.uint64)
        self._free = array("I")  # freed groups, top of stack handed out first
        self._next = 0  # groups >= _next were never handed out
        self.ngroups = ngroups
        self.spare_groups = spare_groups
        self.used_blocks = 0
        self.failures: dict[int, int] = {}  # slot (copy * ngroups + group) -> failures seen
        self.retired: set[int] = set()  # groups holding a quarantined slot; never reused
        self.lost: set[int] = set()  # blocks whose every copy failed; reads raise until rewritten

    @property
    def free_groups(self) -> int:
        return len(self._free) + self.ngroups - self._next

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
        reuse = min(count, len(self._free))
        out: list[int] = []
        if reuse:
            taken = self._free[-reuse:]
            del self._free[-reuse:]
            taken.reverse()
            out = taken.tolist()
        fresh = count - reuse
        if fresh:
            out.extend(range(self._next, self._next + fresh))
            self._next += fresh
        return out

    def release(self, groups: list[int]) -> None:
        """Return groups; the first of ``groups`` is handed out first next time."""
        self._free.extend(reversed(groups))

    def retire(self, group: int) -> None:
        """Never hand ``group`` out again (it holds a quarantined slot)."""
        self.retired.add(group)

    def nbytes(self) -> int:
        """Bytes of daemon memory the tables take now (sparse extras excluded)."""
        return int(self.groups.nbytes + self.checksums.nbytes) + len(self._free) * BYTES_PER_GROUP
