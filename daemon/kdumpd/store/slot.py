"""The store's metadata: which group holds each block, its checksum, and the free groups.

Everything lives in the daemon's memory; nothing is written to old memory but block data, so
a device scribbling on old memory can damage data (which checksums catch) but never the map.

Per block (dense numpy arrays, indexed by block number)::

    groups[block]     uint32   group holding the block's copies; 0xffffffff = unwritten (zeros)
    checksums[block]  uint64   xxh3-64 of the block's 4096 bytes (of 4096 zeros if unwritten)
                      ------
                      12 bytes per 4 KiB block = 0.29 % of the device size

Per pool group: ``free``, an ``array('I')`` stack of free group numbers (4 bytes per group, so
4 bytes per ``N * 4 KiB`` of old memory). Sparse extras, empty while memory behaves: failure
counts per slot, retired groups, lost blocks.

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

    Free groups are handed out lowest first at the start, and a released run is handed out
    again in the order it was released, so sequential writes get consecutive groups and
    sequential reads become one backend read per copy per run.
    """

    __slots__ = (
        "_free",
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
        free = array("I")
        if free.itemsize != 4:  # pragma: no cover - every Linux ABI kdumpd targets has 4
            free = array("L")
        free.frombytes(np.arange(ngroups - 1, -1, -1, dtype=f"u{free.itemsize}").tobytes())
        self._free = free
        self.ngroups = ngroups
        self.spare_groups = spare_groups
        self.used_blocks = 0
        self.failures: dict[int, int] = {}  # slot (copy * ngroups + group) -> failures seen
        self.retired: set[int] = set()  # groups holding a quarantined slot; never reused
        self.lost: set[int] = set()  # blocks whose every copy failed; reads raise until rewritten

    @property
    def free_groups(self) -> int:
        return len(self._free)

    @property
    def usable_free_groups(self) -> int:
        """Free groups ordinary writes may take (the spares are kept for relocation)."""
        return max(0, len(self._free) - self.spare_groups)

    def allocate(self, count: int, *, use_spares: bool = False) -> list[int]:
        """Take ``count`` free groups, in hand-out order; raise ENOSPC taking none if short."""
        avail = len(self._free) if use_spares else self.usable_free_groups
        if count > avail:
            raise BackendError(
                errno.ENOSPC,
                f"old-memory pool is full: {count} blocks to place, {avail} free groups",
            )
        if count == 0:
            return []
        out = self._free[-count:]
        del self._free[-count:]
        out.reverse()
        return out.tolist()

    def release(self, groups: list[int]) -> None:
        """Return groups; the first of ``groups`` is handed out first next time."""
        self._free.extend(reversed(groups))

    def retire(self, group: int) -> None:
        """Never hand ``group`` out again (it holds a quarantined slot)."""
        self.retired.add(group)

    def nbytes(self) -> int:
        """Bytes of daemon memory the dense tables take (sparse extras excluded)."""
        return int(self.groups.nbytes + self.checksums.nbytes) + self.ngroups * BYTES_PER_GROUP
