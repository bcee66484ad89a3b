"""What happens when a copy fails its checksum: repair, quarantine, relocation, loss.

- **recover** (read path): copy 0 failed; read the other copies until one verifies, then
  repair the bad ones from it. If none verifies, the block is lost: IntegrityError.
- **fix**: rewrite each bad copy from the good bytes and *read it back*; ``repaired`` counts
  only repairs that verify.
- **quarantine**: a slot whose repair did not verify (a lost write, a stuck device), or that
  has failed ``quarantine_after`` times, takes its whole group out of service. The block moves
  to a fresh group (spares allowed), every copy written and verified; a target that does not
  verify is retired too and the next is tried.
- **loss**: counted once per block; later reads of the block fail fast until it is rewritten
  or trimmed.

The caller (:class:`~kdumpd.store.blockstore.BlockStore`) holds its mutex around every call.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kdumpd.errors import BackendError, IntegrityError
from kdumpd.oldmem.base import Guarded
from kdumpd.store.blocksum import checksum
from kdumpd.store.placement import Placement
from kdumpd.store.slot import SlotTable
from kdumpd.units import PAGE_SHIFT, PAGE_SIZE

__all__ = ["Repairer"]

log = logging.getLogger(__name__)

_RELOCATION_ATTEMPTS = 4


class _RateLimitedWarning:
    # At most one WARNING per interval; the next one says how many were dropped.
    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._dropped = 0

    def __call__(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._dropped += 1
            return
        if self._dropped:
            msg += " (%d similar messages dropped)"
            args += (self._dropped,)
            self._dropped = 0
        self._next = now + self._interval
        log.warning(msg, *args)


class Repairer:
    """Repair and quarantine policy over one store's backend, placement and tables."""

    def __init__(
        self, mem: Guarded, placement: Placement, table: SlotTable, *, quarantine_after: int
    ) -> None:
        self._mem = mem
        self._p = placement
        self._t = table
        self._n = placement.copies
        self._quarantine_after = quarantine_after
        self._check = memoryview(bytearray(PAGE_SIZE))  # read-back after a write
        self._warn = _RateLimitedWarning()
        self.corrupt = 0  # copies that failed their checksum
        self.repaired = 0  # copies rewritten and verified
        self.quarantined = 0  # slots taken out of service
        self.relocations = 0  # blocks moved to a fresh group
        self.lost = 0  # blocks found with every copy bad

    def note_bad(self, block: int, copy: int, group: int) -> None:
        """Count a copy that failed its checksum against its slot."""
        self.corrupt += 1
        slot = copy * self._p.ngroups + group
        self._t.failures[slot] = self._t.failures.get(slot, 0) + 1
        self._warn("store: block %d copy %d at %#x failed its checksum", block, copy,
                   self._p.slot_paddr(copy, group))

    def mark_lost(self, block: int) -> None:
        if block not in self._t.lost:
            self._t.lost.add(block)
            self.lost += 1
            log.error("store: block %d (offset %#x) lost: all %d copies failed their checksum",
                      block, block << PAGE_SHIFT, self._n)

    def lost_error(self, block: int) -> IntegrityError:
        return IntegrityError(
            f"block {block} (offset {block << PAGE_SHIFT:#x}): all {self._n} copies failed "
            "their checksum"
        )

    def recover(self, block: int, group: int, blk: memoryview) -> None:
        """Copy 0 of ``block`` failed and sits in ``blk``: fill ``blk`` from a good copy and
        repair the bad ones, or raise IntegrityError if no copy is good."""
        if block in self._t.lost:  # known lost: no copy can have come back
            raise self.lost_error(block)
        expected = self._t.checksums[block]
        self.note_bad(block, 0, group)
        bad = [0]
        for c in range(1, self._n):
            self._mem.preadinto(self._p.slot_paddr(c, group), blk)
            if checksum(blk) == expected:
                self.fix(block, group, bad, blk, expected)
                return
            bad.append(c)
            self.note_bad(block, c, group)
        self.mark_lost(block)
        raise self.lost_error(block)

    def fix(self, block: int, group: int, bad: list[int], good: memoryview, expected: int) -> None:
        """Rewrite each bad copy from ``good`` and read it back; move the block if a repair
        did not stick or a slot has failed too often."""
        move = False
        for c in bad:
            paddr = self._p.slot_paddr(c, group)
            self._mem.pwrite(paddr, good)
            self._mem.preadinto(paddr, self._check)
            if checksum(self._check) == expected:
                self.repaired += 1
                slot = c * self._p.ngroups + group
                if self._t.failures.get(slot, 0) >= self._quarantine_after:
                    move = True
            else:
                move = True
                log.warning("store: repair of block %d copy %d at %#x did not stick", block, c,
                            paddr)
        if move:
            self._relocate(block, group, good, expected)

    def _retire(self, group: int) -> None:
        t, ngroups = self._t, self._p.ngroups
        t.retire(group)
        bad = sum(1 for c in range(self._n) if t.failures.get(c * ngroups + group))
        self.quarantined += max(1, bad)

    def _relocate(self, block: int, group: int, good: memoryview, expected: int) -> None:
        # Move block to a fresh group (spares allowed), verified; retire the old group.
        for _ in range(_RELOCATION_ATTEMPTS):
            try:
                (new,) = self._t.allocate(1, use_spares=True)
            except BackendError:
                log.error("store: no spare group to move block %d off a failing slot", block)
                return
            ok = True
            for c in range(self._n):
                paddr = self._p.slot_paddr(c, new)
                self._mem.pwrite(paddr, good)
                self._mem.preadinto(paddr, self._check)
                if checksum(self._check) != expected:
                    ok = False
                    self.note_bad(block, c, new)
            if ok:
                self._t.groups[block] = new
                self._retire(group)
                self.relocations += 1
                log.warning("store: block %d moved from group %d to %d; old group quarantined",
                            block, group, new)
                return
            self._retire(new)
        log.error("store: could not move block %d to a group that holds data", block)
