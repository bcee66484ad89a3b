"""The store's C fast path: what it serves, what it hands back to Python, and that the two
paths agree under threads and corruption. Needs the cffi kernels (gcc, libxxhash-dev)."""

from __future__ import annotations

import ctypes
import functools
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from tests.conftest import require
from tests.unit.test_store_support import block_data, cffi_block_sums, make_store, run_threads

from kdumpd.errors import BackendError, RefusedError
from kdumpd.oldmem.base import Guarded
from kdumpd.oldmem.devmem import DevMem
from kdumpd.oldmem.image import ImageOldMem
from kdumpd.store.blockstore import BlockCheck, BlockStore
from kdumpd.store.fastpath import FastPath
from kdumpd.store.placement import Placement
from kdumpd.units import PAGE_SIZE, Extent, PhysRange

BS = PAGE_SIZE


@pytest.fixture
def sums(tmp_path_factory):
    built = cffi_block_sums(tmp_path_factory)
    require(built is not None, "cffi checksum kernels not buildable (gcc, libxxhash-dev)")
    return built


@pytest.fixture
def fast2(tmp_path, sums):
    store, image = make_store(tmp_path, copies=2, sums=sums, fast=True)
    assert store.fast_path is not None
    yield store, image, store.fast_path
    store.close()
    image.close()


def test_aligned_reads_and_overwrites_are_served_in_c(fast2) -> None:
    store, _, fast = fast2
    store.write(0, block_data(1, 8))  # new blocks: placed by Python
    assert fast.counters() == (0, 0, 0, 0)
    store.write(2 * BS, block_data(2, 3))  # an overwrite: C
    assert store.read(0, 8 * BS) == block_data(1, 2) + block_data(2, 3) + block_data(1, 8)[5 * BS :]
    reads, writes, blocks_read, blocks_written = fast.counters()
    assert (reads, writes, blocks_read, blocks_written) == (1, 1, 8, 3)
    st = store.stats()
    assert (st.reads, st.writes, st.blocks_read, st.blocks_written) == (1, 2, 8, 11)
    # The plugin's one-call forms.
    buf = bytearray(2 * BS)
    assert fast.read_request(2 * BS, memoryview(buf)) and bytes(buf) == block_data(2, 3)[: 2 * BS]
    assert not fast.read_request(BS + 1, memoryview(bytearray(BS)))  # unaligned: Python's
    assert fast.write_request(0, memoryview(block_data(3)))
    assert store.read(0, BS) == block_data(3)


def test_writes_python_must_do_change_nothing_in_c(fast2) -> None:
    store, image, fast = fast2
    assert not fast.write(0, memoryview(block_data(4)))  # unwritten: needs a group
    assert store.locate(0) is None
    store.write(0, block_data(4, 2))
    assert not fast.write(0, memoryview(bytes(BS)))  # zeros free the group: Python
    assert store.read(0, 2 * BS) == block_data(4, 2)
    assert not fast.write(store.nblocks - 1, memoryview(block_data(5, 2)))  # past the end
    assert fast.read(store.nblocks - 1, memoryview(bytearray(2 * BS))) == 0
    # A lost block: overwrites go to Python (which forgets it) until the table is clean.
    for paddr in store.locate(1):
        image.flip_bits(paddr, 3)
    assert store.verify_block(1) is BlockCheck.LOST
    assert not fast.write(0, memoryview(block_data(6)))
    store.write(BS, block_data(7))  # Python rewrites the lost block
    assert store.verify_block(1) is BlockCheck.CLEAN
    assert fast.write(0, memoryview(block_data(6)))
    assert store.read(0, 2 * BS) == block_data(6) + block_data(7)


def test_a_bad_copy_stops_the_c_read_and_python_repairs(fast2) -> None:
    store, image, fast = fast2
    data = block_data(8, 6)
    store.write(0, data)
    image.flip_bits(store.locate(3)[0], 1)
    assert fast.read(0, memoryview(bytearray(6 * BS))) == 3  # blocks 0..2 served, then stop
    assert store.read(0, 6 * BS) == data
    st = store.stats()
    assert (st.corruptions_detected, st.repaired, st.lost_blocks) == (1, 1, 0)
    assert fast.read(0, memoryview(bytearray(6 * BS))) == 6  # repaired in place


def test_scrub_checks_in_c_and_repairs_in_python(fast2) -> None:
    store, image, fast = fast2
    store.write(5 * BS, block_data(9, 2))
    assert fast.next_written(0) == 5 and store.next_written(7) is None
    assert fast.verify(0) == 0 and fast.verify(5) == 1
    assert store.verify_block(5) is BlockCheck.CLEAN
    image.flip_bits(store.locate(6)[1], 2)
    assert fast.verify(6) == -1
    assert store.verify_block(6) is BlockCheck.REPAIRED
    assert fast.verify(6) == 1
    assert store.stats().scrubbed_blocks == 2


class _HalfMapped(ImageOldMem):
    """An image that maps only extents starting at or above ``threshold`` for the fast path."""

    threshold = 0

    def stable_view(self, paddr: int, nbytes: int) -> memoryview | None:
        return super().stable_view(paddr, nbytes) if paddr >= self.threshold else None


def test_unmapped_extents_stay_on_the_python_path(tmp_path, sums) -> None:
    pages = 512
    ranges = [PhysRange(0x100000, 0x100000 + pages * BS, 0),
              PhysRange(0x400000, 0x400000 + pages * BS, pages * BS)]
    extents = [Extent(r.start_paddr >> 12, r.end_paddr >> 12) for r in ranges]
    image = _HalfMapped.create(tmp_path / "img", 2 * pages * BS, ranges)
    image.threshold = 0x400000
    placement = Placement.from_extents(extents, 2, min_distance_bytes=BS)
    store = BlockStore(image, placement, size_bytes=256 * BS, block_sums=sums, fast=True)
    fast = store.fast_path
    assert fast is not None and fast.mapped_extents == 1
    data = block_data(10, 256)
    store.write(0, data)  # copy 0 of every group is in the unmapped first extent
    store.write(0, data)
    assert store.read(0, len(data)) == data
    assert fast.counters() == (0, 0, 0, 0)  # every slot of copy 0 is unmapped: all Python
    assert fast.verify(0) == -1 and store.verify_block(0) is BlockCheck.CLEAN
    store.close()
    image.close()


def test_views_are_guarded_and_outlive_nothing(tmp_path, sums) -> None:
    store, image = make_store(tmp_path, copies=2, sums=sums, fast=True)
    extent = store.placement.extents[0]
    with pytest.raises(RefusedError, match="outside the granted"):
        Guarded(image, [extent]).stable_view(extent.end_paddr, BS)
    with pytest.raises(BackendError, match="close the store first"):
        image.close()
    with pytest.raises(BackendError, match="fast=False"):
        image.lose_writes(extent.start_paddr, extent.start_paddr + BS)
    fast = store.fast_path
    assert fast is not None
    store.close()
    store.close()  # idempotent
    # A late call (the plugin keeps the bound methods) serves nothing and touches nothing.
    assert not fast.read_request(0, memoryview(bytearray(BS)))
    assert not fast.write_request(0, memoryview(block_data(1)))
    assert fast.verify(0) == -1 and fast.counters() == (0, 0, 0, 0)
    image.close()


def test_no_fast_path_without_views_or_c_kernels(tmp_path, sums) -> None:
    from kdumpd.store.blocksum import PyBlockSums

    store, image = make_store(tmp_path, copies=2, sums=PyBlockSums())
    assert store.fast_path is None
    store.close()
    image.close()
    ro = ImageOldMem(image.path, writable=False)
    placement = store.placement
    assert FastPath.create(sums, placement, Guarded(ro, placement.extents), None) is None  # type: ignore[arg-type]
    ro.close()


def test_devmem_pins_extents_within_its_budget(tmp_path, monkeypatch) -> None:
    from tests.unit.test_oldmem_devmem import fake_devmem, fake_proc

    ranges = [PhysRange(0x1000000, 0x1400000, 0x1000000),
              PhysRange(0x2000000, 0x2400000, 0x2000000)]
    mem = DevMem(ranges, proc_root=fake_proc(tmp_path), dev_path=fake_devmem(tmp_path),
                 pin_bytes=0x500000)
    first = mem.stable_view(0x1000000, 0x400000)
    assert first is not None and first.nbytes == 0x400000
    assert mem.stable_view(0x2000000, 0x400000) is None  # past the budget: windowed path
    assert mem.stable_view(0x13FF000, 0x2000) is None  # across a range end
    first[:4] = b"kdmp"  # the view and the windowed path see the same memory
    assert mem.pread(0x1000000, 4) == b"kdmp"
    import kdumpd.oldmem.devmem as devmem_mod

    def refuse(*args: object, **kw: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as m:  # the kernel refusing a busy resource: said at once
        m.setattr(devmem_mod.mmap, "mmap", refuse)
        with pytest.raises(BackendError, match=r"cannot map \[0x2000000.*not permitted"):
            mem.stable_view(0x2000000, 0x1000)
    held = (ctypes.c_char * 4).from_buffer(first)  # an export, as the fast path's cffi buffer
    with pytest.raises(BackendError, match="close the store first"):
        mem.close()
    del held
    mem.close()


def test_threads_mixing_both_paths_under_corruption_never_see_wrong_data(tmp_path, sums) -> None:
    """Four workers on disjoint blocks mix C and Python requests (aligned, unaligned, new,
    zero, trim) while a scrubber verifies and a fifth thread keeps damaging copy 1; every
    read must return the model's bytes."""
    store, image = make_store(tmp_path, copies=2, pool_pages=8192, nblocks=1024, sums=sums,
                              fast=True)
    fast = store.fast_path
    assert fast is not None
    def worker(wid: int) -> None:
        rng = random.Random(wid)
        base = wid * 256
        model = bytearray(256 * BS)
        for i in range(400):
            b = rng.randrange(252)
            n = rng.randint(1, 4)
            op = rng.random()
            if op < 0.35:
                data = block_data(wid * 100000 + i, n)
                if not fast.write_request((base + b) * BS, memoryview(data)):
                    store.write((base + b) * BS, data)
                model[b * BS : (b + n) * BS] = data
            elif op < 0.45:
                off, data = rng.randrange(n * BS), rng.randbytes(rng.randint(1, 3000))
                store.write((base + b) * BS + off, data)
                model[b * BS + off : b * BS + off + len(data)] = data
            elif op < 0.5:
                store.trim((base + b) * BS, n * BS)
                model[b * BS : (b + n) * BS] = bytes(n * BS)
            else:
                buf = bytearray(n * BS)
                if not fast.read_request((base + b) * BS, memoryview(buf)):
                    store.readinto((base + b) * BS, buf)
                assert buf == model[b * BS : (b + n) * BS], f"worker {wid} block {base + b}"

    def scrubber(stop: threading.Event) -> None:
        b = 0
        while not stop.is_set():
            nxt = store.next_written(b)
            b = 0 if nxt is None else nxt
            store.verify_block(b)
            b = (b + 1) % store.nblocks

    def damage(stop: threading.Event) -> None:
        rng = random.Random(99)
        while not stop.is_set():
            b = rng.randrange(1024)
            where = store.locate(b)
            if where is not None:
                image.flip_bits(where[1], 1, rng=rng)  # copy 1 only: always repairable

    run_threads([functools.partial(worker, w) for w in range(4)], [scrubber, damage])
    for b in range(store.nblocks):  # every copy of every block holds the last write
        assert store.verify_block(b) is not BlockCheck.LOST
    st = store.stats()
    assert st.lost_blocks == 0
    reads, writes, _, _ = fast.counters()
    assert reads > 0 and writes > 0
    store.close()
    image.close()


def test_blocksum_c_compiles_on_its_own_without_warnings(tmp_path: Path) -> None:
    """The store's C kernels are a plain C file: gcc checks it alone, warnings as errors."""
    src = Path(__file__).resolve().parents[2] / "daemon" / "kdumpd" / "store" / "blocksum.c"
    require(shutil.which("gcc") is not None and Path("/usr/include/xxhash.h").exists(),
            "gcc or xxhash.h missing")
    r = subprocess.run(["gcc", "-fsyntax-only", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
                        "-Wno-unused-function", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
