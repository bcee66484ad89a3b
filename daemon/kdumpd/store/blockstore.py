"""The block store: N checksummed copies of every written 4 KiB block in old memory.

Contract: a read returns the bytes last written, or zeros for a block never written (or
trimmed), or raises :class:`~kdumpd.errors.IntegrityError`. It never returns other bytes.

- **write**: checksum each block, take a free group for each new block (thin provisioning),
  record group and checksum, then write every copy. Metadata is updated *before* the copies, so
  a write that fails half-way leaves copies that fail their checksum, never stale ones that pass.
  An all-zero block is stored as "unwritten" and frees its group.
- **read**: read copy 0 (one backend read per physically contiguous run of blocks), verify
  each block's checksum; a mismatch goes to :class:`~kdumpd.store.repair.Repairer` (other
  copies, repair with read-back, quarantine and relocation, or IntegrityError if none is good).
- **trim / zero**: whole blocks give their group back and read as zeros; write-zeroes writes
  zeros into partial blocks at the edges, trim leaves them alone (trim is advisory).

Fast path: with the cffi kernels and a backend that maps the pool (``stable_view``), aligned
reads and writes (placing blocks too) and whole-block trims run whole in C with the GIL released
(:mod:`kdumpd.store.fastpath`), on the same tables and free-group stack; the lock is then the
fast path's reader-writer lock, which every path below takes exclusively.

Locking: one mutex, held for each request. Everything the store does runs under the GIL (mmap
copies and python-xxhash hold it), so finer locks could not let two requests run at once; they
would only cost more per request. nbdkit's PARALLEL thread model is safe: requests overlap in
nbdkit's C code (socket I/O) and queue only here.

Waiters yield the GIL rather than sleep on the mutex: see :mod:`kdumpd.store.mutex`.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from kdumpd.errors import ConfigError, RefusedError
from kdumpd.oldmem.base import BytesLike, Guarded, OldMem
from kdumpd.store.blocksum import (
    ZERO_BLOCK,
    ZERO_CHECKSUM,
    BlockSums,
    checksum,
    default_block_sums,
)
from kdumpd.store.fastpath import FastLock, FastPath
from kdumpd.store.mutex import YieldingMutex
from kdumpd.store.placement import Placement
from kdumpd.store.repair import Repairer
from kdumpd.store.slot import UNWRITTEN, SlotTable
from kdumpd.units import PAGE_SHIFT, PAGE_SIZE

__all__ = ["BLOCK_SIZE", "BlockCheck", "BlockStore", "StoreStats"]

log = logging.getLogger(__name__)

BLOCK_SIZE = PAGE_SIZE
_SHIFT = PAGE_SHIFT
_MASK = BLOCK_SIZE - 1
_SCAN_CHUNK = 1 << 16  # blocks examined per lock hold when looking for written blocks


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters since the store was opened, and the space figures now."""

    reads: int  # read requests
    writes: int  # write requests
    trims: int
    zeroes: int
    blocks_read: int
    blocks_written: int
    corruptions_detected: int  # copies that failed their checksum (read or scrub)
    repaired: int  # bad copies rewritten from a good one and read back correct
    quarantined_slots: int  # slots taken out of service (their whole group is retired)
    relocations: int  # blocks moved to a fresh group after a quarantine
    lost_blocks: int  # blocks found with every copy bad (reads raise IntegrityError)
    scrubbed_blocks: int  # blocks whose every copy was verified by verify_block
    copies: int
    size_bytes: int  # the device size (may exceed capacity: thin provisioning)
    used_blocks: int  # blocks holding a group
    capacity_bytes: int  # device bytes old memory can hold: groups - spares - retired
    free_bytes: int  # device bytes still placeable: free old memory / copies, spares kept
    metadata_bytes: int  # daemon memory for the tables


class BlockCheck(enum.Enum):
    """Outcome of :meth:`BlockStore.verify_block`."""

    UNWRITTEN = "unwritten"
    CLEAN = "clean"
    REPAIRED = "repaired"
    LOST = "lost"


def _iter_runs(groups: list[int]) -> list[tuple[int, int]]:
    # Split a request's groups into maximal runs [i, j) of consecutive groups, or of
    # unwritten blocks. A request written in one go is one run: checked with one list
    # comparison (in C) before falling back to the element loop.
    n = len(groups)
    first = groups[0]
    if first != UNWRITTEN and groups == list(range(first, first + n)):
        return [(0, n)]
    runs = []
    i = 0
    while i < n:
        group = groups[i]
        j = i + 1
        if group == UNWRITTEN:
            while j < n and groups[j] == UNWRITTEN:
                j += 1
        else:
            while j < n and groups[j] == group + j - i:
                j += 1
        runs.append((i, j))
        i = j
    return runs


def _is_zero(blk: memoryview) -> bool:
    # bytes == bytes is a memcmp; memoryview == bytes compares element by element (25x slower).
    return blk.tobytes() == ZERO_BLOCK


class BlockStore:
    """A thin-provisioned block device of ``size_bytes`` over old memory, ``copies`` deep.

    ``backend`` is wrapped in :class:`~kdumpd.oldmem.base.Guarded` over the placement's
    extents unless it is already guarded (then every placement extent must lie inside it).
    ``fast``: None takes the C fast path when it is available, False never (fault injection
    that must see every write), True requires it.
    """

    def __init__(
        self,
        backend: OldMem,
        placement: Placement,
        *,
        size_bytes: int,
        copies: int | None = None,
        block_size: int = BLOCK_SIZE,
        quarantine_after: int = 3,
        spare_groups: int | None = None,
        block_sums: BlockSums | None = None,
        fast: bool | None = None,
    ) -> None:
        if block_size != BLOCK_SIZE:
            raise ConfigError(f"block size must be {BLOCK_SIZE} (swap's unit), not {block_size}")
        if copies is not None and copies != placement.copies:
            raise ConfigError(f"copies={copies} but the placement has {placement.copies}")
        if size_bytes <= 0 or size_bytes & _MASK or size_bytes >> _SHIFT > UNWRITTEN:
            raise ConfigError(f"device size {size_bytes} is not a positive multiple of 4096")
        if quarantine_after < 1:
            raise ConfigError(f"quarantine_after must be >= 1, not {quarantine_after}")
        if isinstance(backend, Guarded):
            for e in placement.extents:
                if not backend.covers(e.start_paddr, e.end_paddr - e.start_paddr):
                    raise RefusedError(
                        f"store: placement extent [{e.start_paddr:#x}, {e.end_paddr:#x}) is "
                        "outside the guard's extents (rule: old memory only inside the plan)"
                    )
            self._mem: Guarded = backend
        else:
            self._mem = Guarded(backend, placement.extents)
        ngroups = placement.ngroups
        if spare_groups is None:
            spare_groups = max(1, min(1024, ngroups // 256)) if ngroups > 1 else 0
        self._p = placement
        self._n = placement.copies
        self._sums = block_sums or default_block_sums()
        self._t = SlotTable(size_bytes >> _SHIFT, ngroups, spare_groups=spare_groups)
        self.size_bytes = size_bytes
        self.nblocks = size_bytes >> _SHIFT
        self._fast = (FastPath.create(self._sums, placement, self._mem, self._t)
                      if fast is not False else None)
        if fast and self._fast is None:
            raise ConfigError("store: the C fast path is not available (cffi kernels not "
                              "built, or the backend maps none of the pool)")
        self._lock: YieldingMutex | FastLock = (
            self._fast.lock if self._fast is not None else YieldingMutex())
        self._fixer = Repairer(self._mem, placement, self._t, quarantine_after=quarantine_after)
        self._copybufs = [memoryview(bytearray(BLOCK_SIZE)) for _ in range(self._n)]
        self._reads = self._writes = self._trims = self._zeroes = 0
        self._blocks_read = self._blocks_written = self._scrubbed = 0
        log.info("store: %d MiB device, %s, %d spare groups, metadata %d KiB, %s checksums, %s",
                 size_bytes >> 20, placement.describe(), spare_groups, self._t.nbytes() >> 10,
                 self._sums.name,
                 f"C fast path over {self._fast.mapped_extents}/{len(placement.extents)} extents"
                 if self._fast is not None else "Python path")

    # -- public API ------------------------------------------------------------------------

    @property
    def copies(self) -> int:
        return self._n

    @property
    def block_size(self) -> int:
        return BLOCK_SIZE

    @property
    def placement(self) -> Placement:
        return self._p

    @property
    def fast_path(self) -> FastPath | None:
        """The C fast path, for callers (the nbdkit plugin) that try it before the methods
        below; None when the store runs in Python only."""
        return self._fast

    def read(self, offset: int, nbytes: int) -> bytes:
        """The ``nbytes`` at ``offset``; see :meth:`readinto` for the zero-copy form."""
        buf = bytearray(nbytes)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` with the device bytes at ``offset``; IntegrityError if a block is lost."""
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        nbytes = mv.nbytes
        self._check_range(offset, nbytes)
        if nbytes == 0:
            return
        fast = self._fast
        if fast is not None and not (offset | nbytes) & _MASK:
            done = fast.read(offset >> _SHIFT, mv)
            if done << _SHIFT == nbytes:
                return
            # The rest (a copy that failed its checksum, an unmapped slot) goes to Python.
            offset += done << _SHIFT
            nbytes -= done << _SHIFT
            mv = mv[done << _SHIFT :]
        raw = self._lock.raw
        if not raw.acquire(False):
            self._lock.wait()
        try:
            self._reads += 1
            if not (offset | nbytes) & _MASK:
                self._read_blocks(offset >> _SHIFT, mv)
                return
            b0, b1 = offset >> _SHIFT, (offset + nbytes + _MASK) >> _SHIFT
            tmp = memoryview(bytearray((b1 - b0) << _SHIFT))
            self._read_blocks(b0, tmp)
            start = offset - (b0 << _SHIFT)
            mv[:] = tmp[start : start + nbytes]
        finally:
            raw.release()

    def write(self, offset: int, data: BytesLike) -> None:
        """Write ``data`` at ``offset`` into every copy; partial blocks are read-modify-write
        (IntegrityError if the rest of such a block is lost); ENOSPC if the pool is full."""
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        nbytes = mv.nbytes
        self._check_range(offset, nbytes)
        if nbytes == 0:
            return
        fast = self._fast
        if fast is not None and not (offset | nbytes) & _MASK and fast.write(offset >> _SHIFT, mv):
            return
        raw = self._lock.raw
        if not raw.acquire(False):
            self._lock.wait()
        try:
            self._writes += 1
            if not (offset | nbytes) & _MASK:
                self._write_blocks(offset >> _SHIFT, mv)
            else:
                self._write_unaligned(offset, mv)
        finally:
            raw.release()

    def trim(self, offset: int, nbytes: int) -> None:
        """Free the whole blocks inside the range (they read as zeros); partial blocks stay."""
        self._check_range(offset, nbytes)
        b0, b1 = (offset + _MASK) >> _SHIFT, (offset + nbytes) >> _SHIFT
        fast = self._fast
        if fast is not None and b0 < b1 and fast.trim(b0, b1):
            return
        with self._lock:
            self._trims += 1
            if b0 < b1:
                self._free_blocks(b0, b1)

    def zero(self, offset: int, nbytes: int) -> None:
        """Make the range read as zeros: whole blocks are freed, partial ones get zeros."""
        self._check_range(offset, nbytes)
        end = offset + nbytes
        b0, b1 = (offset + _MASK) >> _SHIFT, end >> _SHIFT
        fast = self._fast
        if fast is not None and not (offset | end) & _MASK and b0 < b1 \
                and fast.trim(b0, b1, zero=True):
            return
        with self._lock:
            self._zeroes += 1
            if b0 >= b1:  # the range lies inside one block
                if nbytes:
                    self._write_unaligned(offset, memoryview(bytes(nbytes)))
                return
            if offset < b0 << _SHIFT:
                self._write_unaligned(offset, memoryview(bytes((b0 << _SHIFT) - offset)))
            if end > b1 << _SHIFT:
                self._write_unaligned(b1 << _SHIFT, memoryview(bytes(end - (b1 << _SHIFT))))
            self._free_blocks(b0, b1)

    def flush(self) -> None:
        with self._lock:
            self._mem.flush()

    def close(self) -> None:
        """Let go of the backend's mappings (call before closing the backend); the store is
        unusable afterwards. Idempotent."""
        fast = self._fast
        if fast is not None:
            with self._lock:
                # No request is in flight past this point; later calls (there should be none)
                # take the Python path under a lock of their own.
                self._fast = None
                self._lock = YieldingMutex()
            fast.close()

    def verify_block(self, block: int) -> BlockCheck:
        """Verify every copy of ``block`` and repair the bad ones (the scrubber's primitive).

        Never raises for a lost block: it is counted once and reported as ``LOST`` on every
        call until the block is rewritten or trimmed.
        """
        if not 0 <= block < self.nblocks:
            raise ValueError(f"block {block} outside the device (0..{self.nblocks - 1})")
        if self._fast is not None:
            r = self._fast.verify(block)  # every copy hashed in place, in C
            if r == 0:
                return BlockCheck.UNWRITTEN
            if r == 1:
                self._scrubbed += 1  # one scrubber thread calls this
                return BlockCheck.CLEAN
        with self._lock:
            t = self._t
            group = t.groups[block]
            if group == UNWRITTEN:
                return BlockCheck.UNWRITTEN
            if block in t.lost:
                return BlockCheck.LOST
            expected = t.checksums[block]
            good: memoryview | None = None
            bad: list[int] = []
            for c in range(self._n):
                buf = self._copybufs[c]
                self._mem.preadinto(self._p.slot_paddr(c, group), buf)
                if checksum(buf) == expected:
                    if good is None:
                        good = buf
                else:
                    bad.append(c)
                    self._fixer.note_bad(block, c, group)
            self._scrubbed += 1
            if good is None:
                self._fixer.mark_lost(block)
                return BlockCheck.LOST
            if not bad:
                return BlockCheck.CLEAN
            self._fixer.fix(block, group, bad, good, expected)
            return BlockCheck.REPAIRED

    def next_written(self, block: int) -> int | None:
        """The first written block at or after ``block``, or None."""
        if self._fast is not None:
            b = self._fast.next_written(block)
            return b if b < self.nblocks else None
        t = self._t
        while block < self.nblocks:
            end = min(block + _SCAN_CHUNK, self.nblocks)
            with self._lock:
                found = t.written(block, end)
            if found < end:
                return found
            block = end
        return None

    def locate(self, block: int) -> tuple[int, ...] | None:
        """Physical addresses of the copies of ``block`` (copy 0 first); None if unwritten."""
        with self._lock:
            group = self._t.groups[block]
            return None if group == UNWRITTEN else self._p.group_paddrs(group)

    def stats(self) -> StoreStats:
        with self._lock:
            t = self._t
            capacity = self._p.ngroups - t.spare_groups - len(t.retired)
            reads, writes, blocks_read, blocks_written, trims, zeroes = (
                self._fast.counters() if self._fast is not None else (0, 0, 0, 0, 0, 0))
            return StoreStats(
                reads=self._reads + reads,
                writes=self._writes + writes,
                trims=self._trims + trims,
                zeroes=self._zeroes + zeroes,
                blocks_read=self._blocks_read + blocks_read,
                blocks_written=self._blocks_written + blocks_written,
                corruptions_detected=self._fixer.corrupt,
                repaired=self._fixer.repaired,
                quarantined_slots=self._fixer.quarantined,
                relocations=self._fixer.relocations,
                lost_blocks=self._fixer.lost,
                scrubbed_blocks=self._scrubbed,
                copies=self._n,
                size_bytes=self.size_bytes,
                used_blocks=t.used_blocks,
                capacity_bytes=max(0, capacity) << _SHIFT,
                free_bytes=t.usable_free_groups << _SHIFT,
                metadata_bytes=t.nbytes(),
            )

    # -- internals; the lock is held -------------------------------------------------------

    def _check_range(self, offset: int, nbytes: int) -> None:
        # nbdkit bounds-checks requests before the plugin sees them; this catches callers that
        # do not go through nbdkit.
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size_bytes:
            raise ValueError(f"range {offset:#x}+{nbytes:#x} outside the {self.size_bytes:#x}-byte "
                             "device")

    def _read_blocks(self, b0: int, mv: memoryview) -> None:
        # Fill mv (whole blocks from b0) from copy 0, verifying every block.
        t, mem, p = self._t, self._mem, self._p
        n = mv.nbytes >> _SHIFT
        self._blocks_read += n
        if n == 1:
            group = t.groups[b0]
            if group == UNWRITTEN:
                mv[:] = ZERO_BLOCK
                return
            mem.preadinto(p.slot_paddr(0, group), mv)
            if checksum(mv) != t.checksums[b0]:
                self._fixer.recover(b0, group, mv)
            return
        groups = t.groups[b0 : b0 + n].tolist()
        for i, j in _iter_runs(groups):
            group = groups[i]
            if group == UNWRITTEN:
                mv[i << _SHIFT : j << _SHIFT] = bytes((j - i) << _SHIFT)
                continue
            pos = i << _SHIFT
            for paddr, npages in p.iter_runs(0, group, j - i):
                end = pos + (npages << _SHIFT)
                mem.preadinto(paddr, mv[pos:end])
                pos = end
        # Unwritten blocks hold zeros and carry the checksum of zeros: one batch checks all.
        expected = t.sums_view(b0, b0 + n)
        k = self._sums.first_bad(mv, expected)
        while k < n:
            self._fixer.recover(b0 + k, groups[k], mv[k << _SHIFT : (k + 1) << _SHIFT])
            k += 1
            k += self._sums.first_bad(mv[k << _SHIFT :], expected[k:])

    def _write_unaligned(self, offset: int, mv: memoryview) -> None:
        # Read-modify-write of the blocks the range touches; only edge blocks are read.
        nbytes = mv.nbytes
        b0, b1 = offset >> _SHIFT, (offset + nbytes + _MASK) >> _SHIFT
        tmp = memoryview(bytearray((b1 - b0) << _SHIFT))
        start = offset - (b0 << _SHIFT)
        if start:
            self._read_blocks(b0, tmp[:BLOCK_SIZE])
        if (offset + nbytes) & _MASK and not (b1 - 1 == b0 and start):
            self._read_blocks(b1 - 1, tmp[-BLOCK_SIZE:])
        tmp[start : start + nbytes] = mv
        self._write_blocks(b0, tmp)

    def _write_blocks(self, b0: int, mv: memoryview) -> None:
        # Write whole blocks from b0: metadata first, then every copy.
        t, mem, p, ncopies = self._t, self._mem, self._p, self._n
        n = mv.nbytes >> _SHIFT
        self._blocks_written += n
        if n == 1:
            csum = checksum(mv)
            if csum == ZERO_CHECKSUM and _is_zero(mv):
                self._free_blocks(b0, b0 + 1)
                return
            group = t.groups[b0]
            if group == UNWRITTEN:
                group = t.allocate(1)[0]
                t.groups[b0] = group
                t.used_blocks += 1
            t.checksums[b0] = csum
            if t.lost:
                t.lost.discard(b0)
            for c in range(ncopies):
                mem.pwrite(p.slot_paddr(c, group), mv)
            return
        sums = self._sums.checksums(mv)
        groups = t.groups[b0 : b0 + n].tolist()
        freed: list[int] = []
        fresh: list[int] = []
        for k in range(n):
            if sums[k] == ZERO_CHECKSUM and _is_zero(mv[k << _SHIFT : (k + 1) << _SHIFT]):
                if groups[k] != UNWRITTEN:
                    freed.append(groups[k])
                    groups[k] = UNWRITTEN
            elif groups[k] == UNWRITTEN:
                fresh.append(k)
        if fresh:
            for k, group in zip(fresh, t.allocate(len(fresh)), strict=True):
                groups[k] = group
        t.set_run(b0, groups, sums)
        t.used_blocks += len(fresh) - len(freed)
        if freed:
            t.release(freed)
        if t.lost:
            t.lost.difference_update(range(b0, b0 + n))
        for i, j in _iter_runs(groups):
            group = groups[i]
            if group == UNWRITTEN:
                continue
            for c in range(ncopies):
                pos = i << _SHIFT
                for paddr, npages in p.iter_runs(c, group, j - i):
                    end = pos + (npages << _SHIFT)
                    mem.pwrite(paddr, mv[pos:end])
                    pos = end

    def _free_blocks(self, b0: int, b1: int) -> None:
        # Unmap whole blocks [b0, b1); their groups go back to be reused in the same order.
        t = self._t
        freed = t.unmap(b0, b1)
        if freed:
            t.used_blocks -= len(freed)
            t.release(freed)
        if t.lost:
            t.lost.difference_update(range(b0, b1))
