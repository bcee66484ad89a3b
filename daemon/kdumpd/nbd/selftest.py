"""The store's self-test, run before the first byte of old memory is written (borg-style).

It builds a tiny store over a scratch image file (never old memory) with the configured number
of copies and checks, in this interpreter, that every path the device depends on works: the
checksum kernels agree, writes read back (aligned and not), a damaged copy is repaired, a block
with every copy damaged fails instead of returning wrong bytes, trim and write-zeroes read as
zeros, the scrubber's verify repairs, the guard refuses writes outside the grant, and a full
pool says ENOSPC. It catches a broken build or environment (a checksum module built for another
interpreter, an xxhash that behaves differently) before anything real happens.

``kdumpd serve`` runs it in the daemon and again inside nbdkit's embedded interpreter.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Callable

from kdumpd.errors import BackendError, IntegrityError, RefusedError, SelfTestError
from kdumpd.oldmem.base import Guarded
from kdumpd.oldmem.image import ImageOldMem
from kdumpd.store.blockstore import BlockCheck, BlockStore
from kdumpd.store.blocksum import PyBlockSums, default_block_sums
from kdumpd.store.placement import Placement
from kdumpd.units import PAGE_SIZE, Extent

__all__ = ["SELFTEST_COUNT", "run_selftest"]

SELFTEST_COUNT = 11
_POOL_GROUPS = 48


def run_selftest(copies: int, workdir: str | None = None) -> int:
    """Run every check; return how many ran (always :data:`SELFTEST_COUNT`) or raise
    :class:`SelfTestError` naming the first that failed."""
    if not 1 <= copies <= 4:
        raise SelfTestError(f"self-test: copies must be 1..4, not {copies}")
    rng = random.Random(0x6B64756D)
    pool = copies * _POOL_GROUPS
    # Extents start past pfn 0 and have a hole, so the mapping is not an identity by accident.
    extents = [Extent(16, 16 + pool // 2), Extent(16 + pool // 2 + 8, 16 + pool + 8)]
    # A private scratch file (tempfile would import shutil and its compressors into nbdkit).
    where = workdir or os.environ.get("TMPDIR") or "/tmp"
    path = os.path.join(where, f"kdumpd-selftest-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise SelfTestError(f"self-test: cannot create its scratch file in {where}: "
                            f"{exc.strerror}") from None
    ran = 0
    store_log = logging.getLogger("kdumpd.store")
    was_level = store_log.level
    store_log.setLevel(logging.CRITICAL + 1)  # the damage below is deliberate: no warnings
    try:
        try:
            img = ImageOldMem.create(path, (16 + pool + 16) * PAGE_SIZE)
        except BackendError as exc:  # a full run directory: said here, not a SIGBUS later
            raise SelfTestError(f"self-test: {exc.strerror or exc}") from None
        stores: list[BlockStore] = []
        try:
            placement = Placement.from_extents(extents, copies, min_distance_bytes=PAGE_SIZE)
            store = BlockStore(img, placement, size_bytes=32 * PAGE_SIZE)
            stores.append(store)
            checks: list[tuple[str, Callable[[], None]]] = [
                ("checksum kernels agree", lambda: _check_sums(rng)),
                ("fresh device reads zeros", lambda: _check_zeros(store)),
                ("aligned round trip", lambda: _check_aligned(store, rng)),
                ("unaligned round trip", lambda: _check_unaligned(store, rng)),
                ("damaged copy repaired", lambda: _check_repair(store, img, rng)),
                ("all copies damaged -> EIO", lambda: _check_lost(store, img, rng)),
                ("trim reads zeros", lambda: _check_trim(store, rng)),
                ("write-zeroes reads zeros", lambda: _check_zero(store, rng)),
                ("scrub repairs", lambda: _check_scrub(store, img, rng)),
                ("guard refuses", lambda: _check_guard(img, extents)),
                ("full pool -> ENOSPC", lambda: _check_full(img, placement, rng)),
            ]
            for name, check in checks:
                try:
                    check()
                except SelfTestError:
                    raise
                except Exception as exc:
                    raise SelfTestError(f"self-test '{name}' failed: {exc!r}") from exc
                ran += 1
        finally:
            for st in stores:
                st.close()
            img.close()
    finally:
        store_log.setLevel(was_level)
        os.unlink(path)
    if ran != SELFTEST_COUNT:
        raise SelfTestError(f"self-test ran {ran} checks, expected {SELFTEST_COUNT}")
    return ran


def _fail(what: str) -> SelfTestError:
    return SelfTestError(f"self-test: {what}")


def _check_sums(rng: random.Random) -> None:
    buf = memoryview(rng.randbytes(8 * PAGE_SIZE))
    fast, slow = default_block_sums(), PyBlockSums()
    if fast.checksums(buf) != slow.checksums(buf):
        raise _fail(f"{fast.name} checksums differ from python-xxhash")


def _check_zeros(store: BlockStore) -> None:
    if store.read(0, store.size_bytes) != bytes(store.size_bytes):
        raise _fail("a fresh device did not read as zeros")


def _check_aligned(store: BlockStore, rng: random.Random) -> None:
    data = rng.randbytes(8 * PAGE_SIZE)
    store.write(0, data)
    if store.read(0, len(data)) != data:
        raise _fail("aligned write did not read back")


def _check_unaligned(store: BlockStore, rng: random.Random) -> None:
    data = rng.randbytes(3 * PAGE_SIZE + 777)
    store.write(9 * PAGE_SIZE + 123, data)
    if store.read(9 * PAGE_SIZE + 123, len(data)) != data:
        raise _fail("unaligned write did not read back")


def _copies_of(store: BlockStore, block: int) -> tuple[int, ...]:
    paddrs = store.locate(block)
    if paddrs is None:
        raise _fail(f"block {block} has no copies after a write")
    return paddrs


def _check_repair(store: BlockStore, img: ImageOldMem, rng: random.Random) -> None:
    data = store.read(PAGE_SIZE, PAGE_SIZE)
    before = store.stats()
    img.flip_bits(_copies_of(store, 1)[0], 3, rng=rng)
    if store.copies == 1:
        try:
            store.read(PAGE_SIZE, PAGE_SIZE)
        except IntegrityError:
            store.write(PAGE_SIZE, data)  # heal it for the checks that follow
            return
        raise _fail("a damaged single copy was returned")
    if store.read(PAGE_SIZE, PAGE_SIZE) != data:
        raise _fail("a damaged copy was returned instead of a good one")
    after = store.stats()
    detected = after.corruptions_detected - before.corruptions_detected
    if after.repaired != before.repaired + 1 or detected < 1:
        raise _fail("a repaired copy was not counted")


def _check_lost(store: BlockStore, img: ImageOldMem, rng: random.Random) -> None:
    for paddr in _copies_of(store, 2):
        img.flip_bits(paddr, 2, rng=rng)
    try:
        store.read(2 * PAGE_SIZE, PAGE_SIZE)
    except IntegrityError:
        pass
    else:
        raise _fail("a block with every copy damaged was returned")
    if store.stats().lost_blocks < 1:
        raise _fail("a lost block was not counted")
    data = rng.randbytes(PAGE_SIZE)
    store.write(2 * PAGE_SIZE, data)  # a whole-block write brings it back
    if store.read(2 * PAGE_SIZE, PAGE_SIZE) != data:
        raise _fail("a rewritten lost block did not read back")


def _check_trim(store: BlockStore, rng: random.Random) -> None:
    store.write(16 * PAGE_SIZE, rng.randbytes(4 * PAGE_SIZE))
    used = store.stats().used_blocks
    store.trim(16 * PAGE_SIZE, 4 * PAGE_SIZE)
    if store.read(16 * PAGE_SIZE, 4 * PAGE_SIZE) != bytes(4 * PAGE_SIZE):
        raise _fail("trimmed blocks did not read as zeros")
    if store.stats().used_blocks != used - 4:
        raise _fail("trim did not free the blocks")


def _check_zero(store: BlockStore, rng: random.Random) -> None:
    store.write(20 * PAGE_SIZE, rng.randbytes(3 * PAGE_SIZE))
    store.zero(20 * PAGE_SIZE + 100, 2 * PAGE_SIZE)
    got = store.read(20 * PAGE_SIZE + 100, 2 * PAGE_SIZE)
    if got != bytes(2 * PAGE_SIZE):
        raise _fail("write-zeroes did not read as zeros")


def _check_scrub(store: BlockStore, img: ImageOldMem, rng: random.Random) -> None:
    data = rng.randbytes(PAGE_SIZE)
    store.write(24 * PAGE_SIZE, data)
    paddrs = _copies_of(store, 24)
    if store.copies == 1:
        if store.verify_block(24) is not BlockCheck.CLEAN:
            raise _fail("scrub found a clean block bad")
        return
    img.flip_bits(paddrs[-1], 1, rng=rng)
    if store.verify_block(24) is not BlockCheck.REPAIRED:
        raise _fail("scrub did not repair a damaged last copy")
    if img.pread(paddrs[-1], PAGE_SIZE) != data:
        raise _fail("scrub's repair did not restore the copy")


def _check_guard(img: ImageOldMem, extents: list[Extent]) -> None:
    guard = Guarded(img, extents)
    try:
        guard.pwrite(0, bytes(PAGE_SIZE))  # pfn 0 is outside every extent
    except RefusedError:
        return
    raise _fail("the guard let a write outside the plan through")


def _check_full(img: ImageOldMem, placement: Placement, rng: random.Random) -> None:
    # A thin device larger than the pool: writes past capacity must fail with ENOSPC.
    store = BlockStore(img, placement, size_bytes=(placement.ngroups + 8) * PAGE_SIZE)
    try:
        cap = store.stats().capacity_bytes
        store.write(0, rng.randbytes(cap))
        try:
            store.write(cap, rng.randbytes(PAGE_SIZE))
        except BackendError as exc:
            if exc.errno != errno.ENOSPC:
                raise _fail(f"a full pool raised errno {exc.errno}, not ENOSPC") from None
            return
        raise _fail("a write past capacity succeeded")
    finally:
        store.close()
