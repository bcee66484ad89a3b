"""BlockStore: round trips, thin provisioning and honest capacity, verify-on-read with repair,
lost blocks as IntegrityError, quarantine and relocation, and the guard underneath.

Every test that touches data runs on both checksum kernels (pure Python and cffi), so the
fallback the daemon may ship with is exercised as much as the fast path.
"""

from __future__ import annotations

import errno
import functools
import random
import sys
import threading
import time

import pytest
from tests.conftest import require
from tests.unit.test_store_support import (
    block_data,
    cffi_block_sums,
    good_copies,
    make_image,
    make_store,
    run_threads,
)

from kdumpd.errors import BackendError, ConfigError, IntegrityError, RefusedError
from kdumpd.oldmem.base import Guarded
from kdumpd.store.blockstore import BlockCheck, BlockStore
from kdumpd.store.blocksum import ZERO_CHECKSUM, PyBlockSums
from kdumpd.store.mutex import YieldingMutex
from kdumpd.store.placement import Placement
from kdumpd.store.slot import BYTES_PER_BLOCK, UNWRITTEN, SlotTable
from kdumpd.units import PAGE_SIZE

BS = PAGE_SIZE


@pytest.fixture(params=["python", "cffi"])
def sums(request, tmp_path_factory):
    if request.param == "python":
        return PyBlockSums()
    built = cffi_block_sums(tmp_path_factory)
    require(built is not None, "cffi checksum kernels not buildable (gcc, libxxhash-dev)")
    return built


@pytest.fixture
def store2(tmp_path, sums):
    store, image = make_store(tmp_path, copies=2, sums=sums)
    yield store, image
    store.close()
    image.close()


# -- data paths ----------------------------------------------------------------------------


def test_round_trip_aligned_and_unaligned(store2) -> None:
    store, _ = store2
    data = block_data(1, 40)
    store.write(0, data)
    assert store.read(0, len(data)) == data
    assert store.read(BS + 17, 3 * BS) == data[BS + 17 : 4 * BS + 17]
    patch = b"\xee" * 5000
    store.write(10 * BS - 100, patch)  # straddles blocks 9..11, partial at both ends
    expect = bytearray(data)
    expect[10 * BS - 100 : 10 * BS - 100 + len(patch)] = patch
    assert store.read(0, len(data)) == expect
    store.write(3, b"abc")  # inside one block
    expect[3:6] = b"abc"
    assert store.read(0, 64) == expect[:64]
    buf = bytearray(2 * BS)
    store.readinto(5 * BS, memoryview(buf))
    assert buf == expect[5 * BS : 7 * BS]


def test_unwritten_reads_zeros_and_uses_no_old_memory(store2) -> None:
    store, _ = store2
    free0 = store.stats().free_bytes
    assert store.read(0, 256 * BS) == bytes(256 * BS)
    store.write(7 * BS, block_data(2))
    assert store.read(6 * BS, 3 * BS) == bytes(BS) + block_data(2) + bytes(BS)
    st = store.stats()
    assert st.used_blocks == 1 and st.free_bytes == free0 - BS
    assert store.locate(6) is None and store.locate(7) is not None


def test_zero_blocks_written_are_freed(store2) -> None:
    store, _ = store2
    store.write(0, block_data(3, 4))
    store.write(BS, bytes(2 * BS))  # whole zero blocks: stored as holes
    assert store.stats().used_blocks == 2
    assert store.read(0, 4 * BS) == block_data(3) + bytes(2 * BS) + block_data(3, 4)[3 * BS :]
    store.write(0, bytes(BS))  # single-block path too
    assert store.stats().used_blocks == 1 and store.locate(0) is None


def test_trim_frees_whole_blocks_only(store2) -> None:
    store, _ = store2
    data = block_data(4, 8)
    store.write(0, data)
    store.trim(BS + 1, 3 * BS)  # whole blocks 2 and 3; partial 1 and 4 stay
    assert store.stats().used_blocks == 6
    assert store.read(0, 8 * BS) == data[: 2 * BS] + bytes(2 * BS) + data[4 * BS :]
    store.trim(0, 0)
    assert store.stats().trims == 2


def test_zero_writes_partial_edges_and_frees_the_middle(store2) -> None:
    store, _ = store2
    data = bytearray(block_data(5, 8))
    store.write(0, data)
    store.zero(BS + 100, 3 * BS)  # partial 1, whole 2 and 3, partial 4
    data[BS + 100 : 4 * BS + 100] = bytes(3 * BS)
    assert store.read(0, 8 * BS) == data
    assert store.locate(2) is None and store.locate(3) is None and store.locate(1) is not None
    store.zero(6 * BS + 5, 10)  # inside one block
    data[6 * BS + 5 : 6 * BS + 15] = bytes(10)
    assert store.read(0, 8 * BS) == data


def test_groups_are_reused_in_order_after_trim(store2) -> None:
    store, _ = store2
    store.write(0, block_data(6, 16))
    first = [store.locate(b)[0] for b in range(16)]
    assert all(b - a == BS for a, b in zip(first, first[1:], strict=False))  # one run per copy
    store.trim(0, 16 * BS)
    store.write(32 * BS, block_data(7, 16))
    assert [store.locate(32 + b)[0] for b in range(16)] == first


def test_capacity_is_free_old_memory_over_copies(tmp_path) -> None:
    for copies in (1, 2, 3):
        (tmp_path / str(copies)).mkdir()
        store, image = make_store(tmp_path / str(copies), copies=copies, pool_pages=3072,
                                  nblocks=4096)
        st = store.stats()
        groups = 3072 // copies
        spares = max(1, min(1024, groups // 256))
        assert st.capacity_bytes == (groups - spares) * BS
        assert st.free_bytes == st.capacity_bytes  # thin: nothing placed yet
        assert st.size_bytes == 4096 * BS > st.capacity_bytes  # the device may exceed it
        store.close()
        image.close()


def test_full_pool_raises_enospc_and_writes_nothing(tmp_path, sums) -> None:
    store, image = make_store(tmp_path, copies=2, pool_pages=2048, nblocks=2048, sums=sums)
    free_blocks = store.stats().free_bytes // BS
    store.write(0, block_data(8, free_blocks - 2))
    before = store.stats()
    with pytest.raises(BackendError) as exc:
        store.write((free_blocks - 2) * BS, block_data(9, 3))
    assert exc.value.errno == errno.ENOSPC
    after = store.stats()
    assert after.used_blocks == before.used_blocks and after.free_bytes == 2 * BS
    assert store.read((free_blocks - 2) * BS, 3 * BS) == bytes(3 * BS)
    store.write((free_blocks - 2) * BS, block_data(9, 2))  # what fits still fits
    store.close()
    image.close()


def test_metadata_is_compact(store2) -> None:
    store, _ = store2
    assert BYTES_PER_BLOCK == 12 and BYTES_PER_BLOCK / BS < 0.003
    assert store.stats().metadata_bytes == 256 * BYTES_PER_BLOCK  # nothing per pool group
    store.write(0, block_data(23, 100))
    assert store.stats().metadata_bytes == 256 * BYTES_PER_BLOCK
    store.trim(0, 40 * BS)  # freed groups are remembered: 4 bytes each, in a stack that
    extra = store.stats().metadata_bytes - 256 * BYTES_PER_BLOCK  # grows by doubling from 4 KiB
    assert 40 * 4 <= extra <= 4096
    store.trim(0, 100 * BS)
    assert store.stats().metadata_bytes - 256 * BYTES_PER_BLOCK == extra  # room for 100


def test_config_errors(tmp_path) -> None:
    image, extents = make_image(tmp_path, 2048)
    p = Placement.from_extents(extents, 2)
    with pytest.raises(ConfigError, match="block size"):
        BlockStore(image, p, size_bytes=1 << 20, block_size=512)
    with pytest.raises(ConfigError, match="copies"):
        BlockStore(image, p, size_bytes=1 << 20, copies=3)
    with pytest.raises(ConfigError, match="multiple"):
        BlockStore(image, p, size_bytes=1000)
    with pytest.raises(ValueError, match="outside"):
        BlockStore(image, p, size_bytes=1 << 20).read((1 << 20) - 1, 2)
    image.close()


def test_guard_wraps_the_backend(tmp_path) -> None:
    image, extents = make_image(tmp_path, 2048)
    p = Placement.from_extents(extents, 2)
    narrow = Guarded(image, extents[:1])  # a guard that grants less than the placement uses
    with pytest.raises(RefusedError, match="outside the guard"):
        BlockStore(narrow, p, size_bytes=1 << 20)
    store = BlockStore(Guarded(image, extents), p, size_bytes=1 << 20)
    store.write(0, block_data(10))
    assert store.read(0, BS) == block_data(10)
    store.close()
    image.close()


# -- corruption, repair, loss --------------------------------------------------------------


def test_corrupt_copy0_is_detected_repaired_and_counted(store2) -> None:
    store, image = store2
    data = block_data(11, 8)
    store.write(0, data)
    paddrs = store.locate(3)
    image.flip_bits(paddrs[0], 1, rng=random.Random(0))
    assert good_copies(store, image, 3, data[3 * BS : 4 * BS]) == [False, True]
    assert store.read(0, 8 * BS) == data  # multi-block path
    st = store.stats()
    assert (st.corruptions_detected, st.repaired, st.lost_blocks) == (1, 1, 0)
    assert good_copies(store, image, 3, data[3 * BS : 4 * BS]) == [True, True]
    image.burst(store.locate(5)[0], BS, b"\0\1")
    assert store.read(5 * BS, BS) == data[5 * BS : 6 * BS]  # single-block path
    assert store.stats().repaired == 2


def test_reads_use_copy0_and_scrub_repairs_the_rest(store2) -> None:
    store, image = store2
    store.write(0, block_data(12))
    image.flip_bits(store.locate(0)[1], 3)
    assert store.read(0, BS) == block_data(12)
    assert store.stats().corruptions_detected == 0  # copy 1 was not read
    assert store.verify_block(0) is BlockCheck.REPAIRED
    assert store.verify_block(0) is BlockCheck.CLEAN
    assert store.verify_block(1) is BlockCheck.UNWRITTEN
    st = store.stats()
    assert (st.corruptions_detected, st.repaired, st.scrubbed_blocks) == (1, 1, 2)


def test_every_bad_copy_is_repaired_from_the_last_good_one(tmp_path, sums) -> None:
    store, image = make_store(tmp_path, copies=3, sums=sums)
    data = block_data(22, 2)
    store.write(0, data)
    for copy in (0, 1):
        image.flip_bits(store.locate(1)[copy], 4)
    assert store.read(0, 2 * BS) == data  # copy 2 is the only good one
    assert good_copies(store, image, 1, data[BS:]) == [True, True, True]
    for copy in (1, 2):
        image.burst(store.locate(0)[copy] + 8, 100)
    assert store.verify_block(0) is BlockCheck.REPAIRED  # copy 0 good, 1 and 2 not
    assert good_copies(store, image, 0, data[:BS]) == [True, True, True]
    st = store.stats()
    assert (st.corruptions_detected, st.repaired, st.lost_blocks) == (4, 4, 0)
    store.close()
    image.close()


def test_all_copies_bad_raises_integrity_error_never_data(tmp_path, sums) -> None:
    store, image = make_store(tmp_path, copies=3, sums=sums)
    data = block_data(13, 4)
    store.write(0, data)
    for paddr in store.locate(2):
        image.flip_bits(paddr, 1)
    with pytest.raises(IntegrityError, match="block 2"):
        store.read(0, 4 * BS)
    with pytest.raises(IntegrityError):
        store.read(2 * BS + 10, 10)
    with pytest.raises(IntegrityError):
        store.write(2 * BS + 1, b"x")  # read-modify-write needs the rest of the block
    assert store.read(0, 2 * BS) == data[: 2 * BS]  # the neighbours are fine
    st = store.stats()
    assert st.lost_blocks == 1  # counted once
    assert st.corruptions_detected == 3  # found by the first read; later reads fail fast
    assert store.verify_block(2) is BlockCheck.LOST
    assert store.stats().lost_blocks == 1
    store.write(2 * BS, block_data(14))  # a whole-block write brings it back
    assert store.read(2 * BS, BS) == block_data(14)
    for paddr in store.locate(2):
        image.flip_bits(paddr, 1)
    store.trim(2 * BS, BS)  # so does a trim: it reads as zeros
    assert store.read(2 * BS, BS) == bytes(BS)
    store.close()
    image.close()


@pytest.mark.parametrize("fast", [False, None])
def test_a_lost_block_stays_lost_until_rewritten(tmp_path, sums, fast) -> None:
    """Both copies corrupted, the block declared lost, then the faults undone (the same bits
    flipped back): the store no longer trusts or repairs it. Reads still verify copy 0, so
    they return the right bytes while copy 0 matches and fail while it does not; a scrub keeps
    saying LOST; a write brings it back. (The case the model test once got wrong.)"""
    store, image = make_store(tmp_path, copies=2, sums=sums, fast=fast)
    data = block_data(30, 2)
    store.write(0, data)
    where = store.locate(1)
    assert where is not None
    flipped = [image.flip_bits(p, 1)[0] for p in where]
    assert store.verify_block(1) is BlockCheck.LOST
    for paddr, bit in zip(where, flipped, strict=True):  # undo: both copies match again
        at = paddr + bit // 8
        image._raw_write(at, memoryview(bytes([image.pread(at, 1)[0] ^ (1 << (bit % 8))])))
    assert good_copies(store, image, 1, data[BS:]) == [True, True]
    assert store.verify_block(1) is BlockCheck.LOST  # still lost: not trusted, not repaired
    assert store.read(0, 2 * BS) == data  # copy 0 verifies: the right bytes
    image.flip_bits(where[0], 1)
    with pytest.raises(IntegrityError):  # copy 0 bad: no repair from copy 1, though it is good
        store.read(BS, BS)
    with pytest.raises(IntegrityError):  # a read-modify-write needs the rest of the block
        store.write(BS + 5, b"x")
    assert good_copies(store, image, 1, data[BS:]) == [False, True]
    assert store.stats().lost_blocks == 1
    store.write(BS, block_data(31))  # a whole-block write brings it back
    assert store.verify_block(1) is BlockCheck.CLEAN
    assert store.read(0, 2 * BS) == data[:BS] + block_data(31)
    store.close()
    image.close()


def test_single_copy_has_no_second_chance(tmp_path, sums) -> None:
    store, image = make_store(tmp_path, copies=1, sums=sums)
    store.write(0, block_data(15))
    image.flip_bits(store.locate(0)[0], 1)
    with pytest.raises(IntegrityError):
        store.read(0, BS)
    assert store.stats().lost_blocks == 1
    store.close()
    image.close()


def test_slot_that_keeps_failing_is_quarantined_and_block_moved(tmp_path, sums) -> None:
    store, image = make_store(tmp_path, copies=2, sums=sums, quarantine_after=3)
    data = block_data(16)
    store.write(0, data)
    old = store.locate(0)
    cap0 = store.stats().capacity_bytes
    for i in range(3):
        image.flip_bits(old[0], 1)
        assert store.read(0, BS) == data
        assert store.stats().repaired == i + 1
    new = store.locate(0)
    assert new != old
    st = store.stats()
    assert (st.quarantined_slots, st.relocations) == (1, 1)
    assert st.capacity_bytes == cap0 - BS  # the retired group is gone from the capacity
    assert good_copies(store, image, 0, data) == [True, True]
    store.trim(0, BS)
    store.write(0, data)  # the retired group is never handed out again
    assert store.locate(0)[0] != old[0]
    store.close()
    image.close()


def test_repair_that_does_not_stick_quarantines_at_once(tmp_path, sums) -> None:
    store, image = make_store(tmp_path, copies=2, sums=sums, fast=False)
    data = block_data(17, 2)
    store.write(0, data)
    bad = store.locate(1)[0]
    image.lose_writes(bad, bad + BS)  # writes to that page vanish, like a stuck device
    image.flip_bits(bad, 2)
    assert store.read(0, 2 * BS) == data
    st = store.stats()
    assert (st.repaired, st.quarantined_slots, st.relocations) == (0, 1, 1)
    assert store.locate(1)[0] != bad
    assert good_copies(store, image, 1, data[BS:]) == [True, True]


def test_relocation_skips_a_target_that_does_not_hold_data(tmp_path, sums) -> None:
    store, image = make_store(tmp_path, copies=2, sums=sums, fast=False)
    data = block_data(20)
    store.write(0, data)
    old = store.locate(0)
    # Groups are handed out lowest first: the next free group is 1. Make it unwritable.
    target = store.placement.slot_paddr(1, 1)
    image.lose_writes(target, target + BS)
    image.lose_writes(old[0], old[0] + BS)
    image.flip_bits(old[0], 1)
    assert store.read(0, BS) == data
    st = store.stats()
    assert (st.relocations, st.quarantined_slots) == (1, 2)
    assert store.locate(0) == store.placement.group_paddrs(2)
    store.write(BS, block_data(21, 4))  # neither retired group comes back
    used = {store.locate(b)[0] for b in range(1, 5)}
    assert used.isdisjoint({old[0], store.placement.slot_paddr(0, 1)})
    assert good_copies(store, image, 0, data) == [True, True]


def test_lost_write_on_one_copy_is_caught_on_read(tmp_path, sums) -> None:
    store, image = make_store(tmp_path, copies=2, sums=sums, fast=False)
    store.write(0, block_data(18))
    slot = store.locate(0)[0]
    image.lose_writes(slot, slot + BS)
    store.write(0, block_data(19))  # copy 0 keeps the old bytes: stale, not new
    assert good_copies(store, image, 0, block_data(19)) == [False, True]
    assert store.read(0, BS) == block_data(19)
    assert store.stats().relocations == 1


def test_concurrent_readers_writers_and_scrub(tmp_path, sums) -> None:
    store, image = make_store(tmp_path, copies=2, pool_pages=8192, nblocks=1024, sums=sums)

    def worker(wid: int) -> None:
        rng = random.Random(wid)
        base = wid * 256
        model = {}
        for i in range(300):
            b = base + rng.randrange(256)
            n = rng.randint(1, min(4, base + 256 - b))
            if rng.random() < 0.5:
                store.write(b * BS, block_data(wid * 10000 + i, n))
                for k in range(n):
                    model[b + k] = block_data(wid * 10000 + i, n)[k * BS : (k + 1) * BS]
            else:
                got = store.read(b * BS, n * BS)
                for k in range(n):
                    assert got[k * BS : (k + 1) * BS] == model.get(b + k, bytes(BS))

    def scrubber(stop: threading.Event) -> None:
        while not stop.is_set():
            for b in range(0, 1024, 3):
                store.verify_block(b)

    run_threads([functools.partial(worker, w) for w in range(4)], [scrubber])
    st = store.stats()
    assert st.corruptions_detected == 0 and st.lost_blocks == 0
    store.close()
    image.close()


def test_slot_table_hands_out_freed_groups_first_then_fresh() -> None:
    t = SlotTable(8, 10, spare_groups=2)
    assert t.allocate(3) == [0, 1, 2]
    t.release([1, 2])
    assert t.free_groups == 9 and t.usable_free_groups == 7
    assert t.allocate(3) == [1, 2, 3]
    with pytest.raises(BackendError) as exc:
        t.allocate(5)  # 6 free, 2 of them spares
    assert exc.value.errno == errno.ENOSPC and t.free_groups == 6
    assert t.allocate(6, use_spares=True) == [4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError):
        SlotTable(8, 2, spare_groups=2)



def test_slot_table_scans_and_unmaps_by_bytes_at_block_granularity() -> None:
    """Group numbers with 0xff bytes in every position: the byte search must still land on
    the block holding them, and unmapping must free exactly the written blocks in order."""
    t = SlotTable(5000, 16, spare_groups=0)
    odd = {7: 0xFFFFFF00, 1030: 0x00FFFFFF, 1031: 0xFF00FFFF, 2047: 0, 4999: 0xFFFFFFFE}
    for block, group in odd.items():
        t.groups[block] = group
        t.checksums[block] = block
    assert t.written(0, 5000) == 7 and t.written(8, 5000) == 1030
    assert t.written(1032, 2047) == 2047 and t.written(2048, 4999) == 4999
    assert t.written(0, 7) == 7 and t.written(4999, 5000) == 4999 and t.written(5000, 5000) == 5000
    assert t.unmap(8, 4999) == [0x00FFFFFF, 0xFF00FFFF, 0]
    assert [t.groups[b] for b in (7, 1030, 1031, 2047, 4999)] == [
        0xFFFFFF00, UNWRITTEN, UNWRITTEN, UNWRITTEN, 0xFFFFFFFE]
    assert t.checksums[1030] == ZERO_CHECKSUM and t.checksums[7] == 7
    assert t.unmap(0, 5000) == [0xFFFFFF00, 0xFFFFFFFE] and t.written(0, 5000) == 5000
    assert t.nbytes() == 5000 * BYTES_PER_BLOCK


def test_yielding_mutex_excludes_under_forced_gil_switches() -> None:
    m = YieldingMutex()
    state = {"inside": 0, "max_inside": 0, "n": 0}
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows

    def worker() -> None:
        for _ in range(2000):
            with m:
                state["inside"] += 1
                state["max_inside"] = max(state["max_inside"], state["inside"])
                n = state["n"]
                if n % 97 == 0:
                    time.sleep(0)  # give the GIL away while holding the mutex
                state["n"] = n + 1
                state["inside"] -= 1

    try:
        run_threads([worker] * 4)
    finally:
        sys.setswitchinterval(old)
    assert state["n"] == 8000 and state["max_inside"] == 1
