"""The store's C fast path: what it serves, what it hands back to Python, and that the two
paths agree under threads and corruption. Needs the cffi kernels (gcc, libxxhash-dev)."""

from __future__ import annotations

import ctypes
import errno
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


def test_aligned_reads_and_writes_are_served_in_c(fast2) -> None:
    store, _, fast = fast2
    store.write(0, block_data(1, 8))  # new blocks: placed in C
    assert fast.counters() == (0, 1, 0, 8, 0, 0)
    assert store.stats().used_blocks == 8
    store.write(2 * BS, block_data(2, 3))  # an overwrite: C
    assert store.read(0, 8 * BS) == block_data(1, 2) + block_data(2, 3) + block_data(1, 8)[5 * BS :]
    assert fast.counters() == (1, 2, 8, 11, 0, 0)
    st = store.stats()
    assert (st.reads, st.writes, st.blocks_read, st.blocks_written) == (1, 2, 8, 11)
    # The plugin's one-call forms.
    buf = bytearray(2 * BS)
    assert fast.read_request(2 * BS, memoryview(buf)) and bytes(buf) == block_data(2, 3)[: 2 * BS]
    assert not fast.read_request(BS + 1, memoryview(bytearray(BS)))  # unaligned: Python's
    assert fast.write_request(0, memoryview(block_data(3)))
    assert store.read(0, BS) == block_data(3)


def _snapshot(store: BlockStore) -> tuple[bytes, ...]:
    # Everything the allocator and the tables hold (white box: the tests compare paths).
    t = store._t
    return (t.groups.tobytes(), t.checksums.tobytes(), t.state.tobytes(),
            t.free_stack[: t.state[1]].tobytes())


def test_first_writes_and_writes_after_trim_place_blocks_in_c(fast2) -> None:
    """Swap's pattern: write, trim, write again. Groups come back in the order they were
    freed (the first freed first), then never-used ones, exactly as the Python path does."""
    store, _, fast = fast2
    p = store.placement

    def group(b: int) -> int:
        where = store.locate(b)
        assert where is not None
        found = p.locate_paddr(where[0])
        assert found is not None and found[0] == 0
        return found[1]

    store.write(0, block_data(1, 6))
    assert [group(b) for b in range(6)] == [0, 1, 2, 3, 4, 5]
    store.trim(BS, 2 * BS)  # blocks 1, 2: Python (the stack must grow first), then C
    store.trim(4 * BS, BS)
    assert store.locate(1) is None and store.locate(4) is None
    store.write(10 * BS, block_data(2, 4))  # 4 new blocks: 4, then 1, 2, then 6
    assert [group(b) for b in range(10, 14)] == [4, 1, 2, 6]
    assert store.read(0, 14 * BS) == (block_data(1, 6)[:BS] + bytes(2 * BS)
                                      + block_data(1, 6)[3 * BS : 4 * BS] + bytes(BS)
                                      + block_data(1, 6)[5 * BS :] + bytes(4 * BS)
                                      + block_data(2, 4))
    reads, writes, _, blocks_written, trims, _ = fast.counters()
    assert (writes, blocks_written, trims) == (2, 10, 1)
    # An all-zero block in a write gives its group back after the new ones are taken.
    mixed = block_data(3) + block_data(4) + bytes(BS)
    store.write(13 * BS, mixed)  # 13: overwrite, 14 new (group 7), 15 zero (unwritten)
    store.write(11 * BS, bytes(BS) + block_data(5))  # 11 freed (group 1), 12 overwritten
    assert store.locate(11) is None and group(14) == 7
    store.write(20 * BS, block_data(6))
    assert group(20) == 1
    st = store.stats()
    assert st.used_blocks == sum(store.locate(b) is not None for b in range(store.nblocks)) == 8
    assert fast.counters()[1] == 5  # every write above was C's
    # Whole-block write-zeroes and trims in C; partial ones in Python.
    store.zero(0, BS)
    store.trim(3 * BS, 2 * BS)
    assert store.locate(0) is None and store.locate(3) is None
    assert fast.counters()[4:] == (2, 1)
    store.zero(5 * BS + 1, BS)  # partial edges: Python
    assert store.read(5 * BS, BS) == block_data(1, 6)[5 * BS : 5 * BS + 1] + bytes(BS - 1)
    st = store.stats()
    assert (st.trims, st.zeroes, st.used_blocks) == (3, 2, 6)


def test_writes_python_must_do_change_nothing_in_c(fast2) -> None:
    store, image, fast = fast2
    assert not fast.write(store.nblocks - 1, memoryview(block_data(5, 2)))  # past the end
    assert fast.read(store.nblocks - 1, memoryview(bytearray(2 * BS))) == 0
    assert not fast.trim(store.nblocks - 1, store.nblocks + 1)
    store.write(0, block_data(4, 2))
    # The first trim: the free stack has no room yet; only Python allocates it.
    before = _snapshot(store)
    assert not fast.trim(0, 1) and not fast.write(0, memoryview(bytes(BS)))
    assert _snapshot(store) == before
    store.trim(0, BS)  # Python grows the stack; C may free from now on
    assert fast.write(0, memoryview(block_data(4))) and fast.write(0, memoryview(bytes(BS)))
    assert store.locate(0) is None
    store.write(0, block_data(4))
    # A lost block: every write goes to Python (which forgets it) until the table is clean.
    for paddr in store.locate(1):
        image.flip_bits(paddr, 3)
    assert store.verify_block(1) is BlockCheck.LOST
    before = _snapshot(store)
    assert not fast.write(0, memoryview(block_data(6)))
    assert not fast.write(5, memoryview(block_data(6)))  # a first write too
    assert not fast.trim(0, 1)
    assert _snapshot(store) == before
    store.write(BS, block_data(7))  # Python rewrites the lost block
    assert store.verify_block(1) is BlockCheck.CLEAN
    assert fast.write(0, memoryview(block_data(6)))
    assert store.read(0, 2 * BS) == block_data(6) + block_data(7)


def test_a_full_pool_raises_enospc_as_before(tmp_path, sums) -> None:
    """1100 pool pages, 2 copies: 550 groups, 2 kept spare; the 549th block does not fit."""
    for fast in (True, False):
        (tmp_path / str(fast)).mkdir()
        store, image = make_store(tmp_path / str(fast), copies=2, pool_pages=1100, nblocks=600,
                                  sums=sums, fast=fast)
        store.write(0, block_data(1, 540))
        before = _snapshot(store)
        with pytest.raises(BackendError) as exc:
            store.write(540 * BS, block_data(2, 9))  # 8 groups left: nothing is written
        assert exc.value.errno == errno.ENOSPC and _snapshot(store) == before
        store.write(540 * BS, block_data(2, 8))
        assert store.stats().free_bytes == 0
        with pytest.raises(BackendError):
            store.write(548 * BS, block_data(3))
        store.write(0, block_data(4))  # an overwrite needs no group
        store.trim(10 * BS, 2 * BS)
        store.write(590 * BS, block_data(5, 2))  # takes the two freed groups
        assert store.read(590 * BS, 2 * BS) == block_data(5, 2)
        if fast:
            assert store.fast_path is not None and store.fast_path.counters()[1] >= 3
        store.close()
        image.close()


def test_retired_groups_are_never_reused(tmp_path, sums) -> None:
    """A quarantined group is retired; while any is, C gives no group back (Python does and
    filters), but it still places first writes from the stack, which never holds one."""
    store, image = make_store(tmp_path, copies=2, sums=sums, fast=True, quarantine_after=1)
    fast = store.fast_path
    assert fast is not None
    p = store.placement
    store.write(0, block_data(1, 4))
    store.trim(3 * BS, BS)  # the stack exists
    old = store.locate(1)
    assert old is not None
    image.flip_bits(old[0], 2)
    assert store.read(BS, BS) == block_data(1, 4)[BS : 2 * BS]  # repaired, then moved
    assert store.stats().relocations == 1
    retired = p.locate_paddr(old[0])
    assert retired is not None
    writes, trims = fast.counters()[1], fast.counters()[4]
    for rnd in range(3):  # free everything and place again, several times over
        store.trim(0, store.nblocks * BS)
        store.write(0, block_data(10 + rnd, 64))
        store.write(100 * BS, bytes(BS) + block_data(20 + rnd))
        for b in list(range(64)) + [101]:
            where = store.locate(b)
            assert where is not None and p.locate_paddr(where[0])[1] != retired[1]
    assert fast.counters()[4] == trims  # every trim went to Python
    assert fast.counters()[1] > writes  # first writes stayed in C
    assert store.read(0, 64 * BS) == block_data(12, 64)
    store.close()
    image.close()


def test_both_paths_lay_blocks_out_alike(tmp_path, sums) -> None:
    """The same requests on a C store and a Python-only store leave the same tables, the
    same free stack and the same bytes in old memory, ENOSPC included."""
    from kdumpd.store.blocksum import PyBlockSums

    for seed in range(4):
        for kind in ("c", "py"):
            (tmp_path / f"{seed}{kind}").mkdir()
        stores = [make_store(tmp_path / f"{seed}{kind}", copies=2, pool_pages=1100,
                             nblocks=700, sums=s, fast=kind == "c")
                  for kind, s in (("c", sums), ("py", PyBlockSums()))]
        rng = random.Random(seed)
        for i in range(400):
            b, n = rng.randrange(696), rng.choice([1, 1, 2, 4])
            op = rng.random()
            if op < 0.5:  # aligned writes, now and then with zero blocks in them
                data = b"".join(bytes(BS) if rng.random() < 0.1 else block_data(i * 8 + k)
                                for k in range(n))
                req = ("write", b * BS, data)
            elif op < 0.6:
                req = ("write", b * BS + rng.randrange(BS), rng.randbytes(rng.randint(1, 5000)))
            elif op < 0.8:
                off = b * BS + (rng.randrange(BS) if rng.random() < 0.2 else 0)
                req = ("trim", off, n * BS)
            else:
                req = ("zero", b * BS, n * BS + (rng.randrange(BS) if rng.random() < 0.2 else 0))
            outcomes = []
            for store, _ in stores:
                try:
                    getattr(store, req[0])(*req[1:])
                    outcomes.append("ok")
                except BackendError as exc:
                    outcomes.append(f"errno {exc.errno}")
            assert outcomes[0] == outcomes[1], (seed, i, req[0], outcomes)
            assert _snapshot(stores[0][0]) == _snapshot(stores[1][0]), (seed, i, req[0])
        (cs, ci), (ps, pi) = stores
        assert cs.stats().used_blocks == ps.stats().used_blocks > 0
        assert Path(ci.path).read_bytes() == Path(pi.path).read_bytes()
        fast = cs.fast_path
        assert fast is not None
        _, writes, _, _, trims, zeroes = fast.counters()
        assert writes > 100 and trims > 20 and zeroes > 10, fast.counters()
        for store, image in stores:
            store.close()
            image.close()


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
    assert fast.counters() == (0,) * 6  # every slot of copy 0 is unmapped: all Python
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
    assert fast.verify(0) == -1 and fast.counters() == (0,) * 6
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
    """Four workers on disjoint blocks mix C and Python requests (first writes, overwrites,
    unaligned writes, zero blocks, trims, write-zeroes, reads) while a scrubber verifies and a
    sixth thread keeps damaging copy 1 (slots get quarantined, groups retired); every read must
    return the model's bytes, and an exception in any thread fails the test."""
    store, image = make_store(tmp_path, copies=2, pool_pages=8192, nblocks=1024, sums=sums,
                              fast=True)
    fast = store.fast_path
    assert fast is not None
    errors: list[BaseException] = []
    first_in_c = [0] * 4

    def worker(wid: int) -> None:
        try:
            rng = random.Random(wid)
            base = wid * 256
            model = bytearray(256 * BS)
            for i in range(500):
                b = rng.randrange(252)
                n = rng.randint(1, 4)
                op = rng.random()
                off = (base + b) * BS
                if op < 0.4:
                    data = bytearray(block_data(wid * 100000 + i, n))
                    if rng.random() < 0.1:
                        data[:BS] = bytes(BS)  # a zero block gives its group back
                    fresh = not any(model[b * BS : (b + n) * BS])
                    if fast.write_request(off, memoryview(data)):
                        first_in_c[wid] += fresh
                    else:
                        store.write(off, data)
                    model[b * BS : (b + n) * BS] = data
                elif op < 0.48:
                    at, data = rng.randrange(n * BS), rng.randbytes(rng.randint(1, 3000))
                    store.write(off + at, data)
                    model[b * BS + at : b * BS + at + len(data)] = data
                elif op < 0.6:
                    store.trim(off, n * BS)
                    model[b * BS : (b + n) * BS] = bytes(n * BS)
                elif op < 0.65:
                    at = rng.randrange(BS) if rng.random() < 0.3 else 0
                    store.zero(off + at, n * BS - at)
                    model[b * BS + at : (b + n) * BS] = bytes(n * BS - at)
                else:
                    buf = bytearray(n * BS)
                    if not fast.read_request(off, memoryview(buf)):
                        store.readinto(off, buf)
                    assert buf == model[b * BS : (b + n) * BS], f"worker {wid} block {base + b}"
            buf = bytearray(256 * BS)
            store.readinto(base * BS, buf)
            assert buf == model, f"worker {wid}: final read"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def scrubber(stop: threading.Event) -> None:
        try:
            b = 0
            while not stop.is_set():
                nxt = store.next_written(b)
                b = 0 if nxt is None else nxt
                store.verify_block(b)
                b = (b + 1) % store.nblocks
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def damage(stop: threading.Event) -> None:
        try:
            rng = random.Random(99)
            while not stop.is_set():
                b = rng.randrange(1024)
                where = store.locate(b)
                if where is not None:
                    image.flip_bits(where[1], 1, rng=rng)  # copy 1 only: always repairable
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    run_threads([functools.partial(worker, w) for w in range(4)], [scrubber, damage])
    assert not errors, errors[0]
    for b in range(store.nblocks):  # every copy of every block holds the last write
        assert store.verify_block(b) is not BlockCheck.LOST
    st = store.stats()
    assert st.lost_blocks == 0
    assert st.used_blocks == sum(store.locate(b) is not None for b in range(store.nblocks))
    reads, writes, _, _, trims, _ = fast.counters()
    assert reads > 0 and writes > 0 and sum(first_in_c) > 0
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
