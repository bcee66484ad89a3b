"""DMA-burst tests: random contiguous bursts (4 KiB to 6 MiB) land in old memory while a
workload runs. Placement keeps every pair of copies farther apart than any burst, so:

- with a scrub pass between bursts, no block is ever lost and no read is ever wrong;
- with bursts running concurrently with the workload and a background scrubber, the same;
- with no scrubbing at all, blocks may lose every copy, and then reads raise IntegrityError,
  each one justified by the image (every copy of a touched block really is bad), never wrong.
"""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
from tests.unit.test_store_support import (
    BASE_PADDR,
    block_data,
    make_store,
    thread_exceptions_fail,
)

from kdumpd.errors import IntegrityError
from kdumpd.store.scrub import Scrubber
from kdumpd.units import PAGE_SIZE

BS = PAGE_SIZE
POOL_PAGES = 16384  # 64 MiB in two 32 MiB ranges with a 64 MiB hole between
NBLOCKS = 2048  # an 8 MiB device, filled
MAX_BURST = 6 << 20


def burst_length(rng: random.Random) -> int:
    # Log-uniform from 4 KiB to 6 MiB: small scribbles are common, huge ones happen.
    return int(math.exp(rng.uniform(math.log(BS), math.log(MAX_BURST))))


def burst_anywhere(image, store, rng: random.Random) -> tuple[int, int]:
    # Two bursts in three cover a live copy (the device fills a quarter of the pool, so
    # uniform bursts would mostly miss it); the rest land anywhere over the image's physical
    # span, the hole and the ungranted pages included.
    nbytes = burst_length(rng)
    if rng.random() < 2 / 3:
        slot = rng.choice(store.locate(rng.randrange(NBLOCKS)) or [BASE_PADDR])
        paddr = slot - rng.randrange(nbytes)
    else:
        paddr = rng.randrange(BASE_PADDR - (1 << 20), image.ranges[-1].end_paddr)
    image.burst(paddr, nbytes, None if rng.random() < 0.7 else b"\0", rng=rng)
    return paddr, nbytes


class Workload:
    """Random reads and writes against a model; counts wrong reads and IntegrityErrors."""

    def __init__(self, store, seed: int) -> None:
        self.store = store
        self.rng = random.Random(seed)
        self.model = bytearray(block_data(seed, NBLOCKS))
        store.write(0, self.model)
        self.reads = self.wrong = self.eio = 0
        self.eio_blocks: list[range] = []

    def step(self) -> None:
        rng = self.rng
        b = rng.randrange(NBLOCKS)
        n = min(rng.choice([1, 1, 1, 2, 16]), NBLOCKS - b)
        if rng.random() < 0.2:
            data = block_data(rng.randrange(1 << 30), n)
            self.store.write(b * BS, data)
            self.model[b * BS : (b + n) * BS] = data
            return
        self.reads += 1
        try:
            got = self.store.read(b * BS, n * BS)
        except IntegrityError:
            self.eio += 1
            self.eio_blocks.append(range(b, b + n))
            return
        if got != self.model[b * BS : (b + n) * BS]:
            self.wrong += 1


@pytest.mark.parametrize("copies", [2, 3])
def test_bursts_between_scrubs_never_lose_or_corrupt(tmp_path, copies) -> None:
    store, image = make_store(tmp_path, copies=copies, pool_pages=POOL_PAGES, nblocks=NBLOCKS)
    assert MAX_BURST < store.placement.min_distance_bytes - BS
    work = Workload(store, seed=copies)
    rng = random.Random(100 + copies)
    for _ in range(30):
        burst_anywhere(image, store, rng)
        for _ in range(150):
            work.step()
        Scrubber(store, rate_bytes_per_s=1 << 30).step(1 << 40)  # one full pass
    assert store.read(0, NBLOCKS * BS) == work.model
    st = store.stats()
    assert (work.wrong, work.eio, st.lost_blocks) == (0, 0, 0)
    assert st.corruptions_detected > 0 and st.repaired > 0
    assert st.repaired == st.corruptions_detected  # every bad copy found was rewritten
    image.close()


def test_bursts_concurrent_with_workload_and_scrubber(tmp_path) -> None:
    store, image = make_store(tmp_path, copies=2, pool_pages=POOL_PAGES, nblocks=NBLOCKS)
    work = Workload(store, seed=7)
    scrub = Scrubber(store, rate_bytes_per_s=4 << 30, tick_s=0.002)
    done = threading.Event()

    def burster() -> None:
        try:
            rng = random.Random(8)
            for _ in range(12):
                burst_anywhere(image, store, rng)
                # Next burst only after a whole pass started after this one has finished.
                target = scrub.report().passes + 2
                deadline = time.monotonic() + 60
                while scrub.report().passes < target and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert scrub.report().passes >= target, "the scrubber stopped making passes"
        finally:
            done.set()

    with thread_exceptions_fail():  # the burster's and the scrubber's own thread
        scrub.start()
        t = threading.Thread(target=burster)
        t.start()
        while not done.is_set():
            work.step()
        t.join()
        scrub.stop()
    assert store.read(0, NBLOCKS * BS) == work.model
    st = store.stats()
    assert work.reads > 0
    assert (work.wrong, work.eio, st.lost_blocks) == (0, 0, 0)
    assert st.repaired > 0
    image.close()


def test_unrepaired_bursts_give_eio_only_when_every_copy_is_bad(tmp_path) -> None:
    store, image = make_store(tmp_path, copies=2, pool_pages=POOL_PAGES, nblocks=NBLOCKS)
    work = Workload(store, seed=9)
    rng = random.Random(10)
    for _ in range(40):  # no scrub: damage to copy 1 piles up until copy 0 is hit too
        burst_anywhere(image, store, rng)
        for _ in range(50):
            work.step()
            for blocks in work.eio_blocks:
                assert any(
                    all(image.pread(p, BS) != work.model[b * BS : (b + 1) * BS]
                        for p in store.locate(b))
                    for b in blocks
                ), f"IntegrityError for blocks {blocks} with a good copy left"
            work.eio_blocks.clear()
    st = store.stats()
    assert work.wrong == 0
    assert st.corruptions_detected > 0 and st.repaired > 0
    assert st.lost_blocks > 0 and work.eio > 0  # the scenario did reach data loss
