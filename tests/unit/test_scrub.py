"""Scrubber: bounded steps, full passes that repair what reads never look at, lost blocks
reported not raised, and a background thread that keeps to its rate from above and below."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from tests.unit.test_store_support import (
    block_data,
    good_copies,
    make_store,
    thread_exceptions_fail,
)

from kdumpd.store.scrub import Scrubber
from kdumpd.units import PAGE_SIZE

BS = PAGE_SIZE


@pytest.fixture
def store3(tmp_path):
    store, image = make_store(tmp_path, copies=3, nblocks=512)
    yield store, image
    image.close()


def test_step_respects_its_byte_budget(store3) -> None:
    store, _ = store3
    store.write(0, block_data(1, 10))
    scrub = Scrubber(store, rate_bytes_per_s=1 << 20)
    per_block = 3 * BS
    assert scrub.step(per_block - 1) == 0
    assert scrub.step(3 * per_block + 5) == 3 * per_block
    r = scrub.report()
    assert (r.blocks_checked, r.bytes_read, r.passes) == (3, 3 * per_block, 0)
    assert scrub.step(1 << 40) == 7 * per_block  # the rest of the pass, then it stops
    assert scrub.report().passes == 1
    assert store.stats().scrubbed_blocks == 10


def test_pass_repairs_copies_reads_never_check(store3) -> None:
    store, image = store3
    data = block_data(2, 64)
    store.write(100 * BS, data)
    for b, copy in [(100, 1), (120, 2), (163, 1), (163, 2)]:
        image.flip_bits(store.locate(b)[copy], 3)
    assert store.read(100 * BS, 64 * BS) == data
    assert store.stats().corruptions_detected == 0  # reads use copy 0 only
    scrub = Scrubber(store, rate_bytes_per_s=1 << 20)
    scrub.step(1 << 40)
    r = scrub.report()
    assert (r.passes, r.blocks_checked, r.blocks_repaired, r.blocks_lost) == (1, 64, 3, 0)
    st = store.stats()
    assert (st.corruptions_detected, st.repaired) == (4, 4)
    for b in (100, 120, 163):
        assert good_copies(store, image, b, data[(b - 100) * BS : (b - 99) * BS]) == [True] * 3


def test_lost_block_is_reported_not_raised(store3) -> None:
    store, image = store3
    store.write(0, block_data(3, 4))
    for paddr in store.locate(2):
        image.burst(paddr, 64, b"\xff")
    scrub = Scrubber(store, rate_bytes_per_s=1 << 20)
    scrub.step(1 << 40)
    assert scrub.report().blocks_lost == 1
    assert store.stats().lost_blocks == 1


def test_empty_store_and_trimmed_blocks(store3) -> None:
    store, _ = store3
    scrub = Scrubber(store, rate_bytes_per_s=1 << 20)
    assert scrub.step(1 << 40) == 0
    store.write(0, block_data(4, 3))
    assert scrub.step(3 * BS) == 3 * BS  # block 0
    store.trim(BS, BS)
    assert scrub.step(1 << 40) == 3 * BS  # block 2 only
    assert scrub.report().blocks_checked == 2


def test_background_thread_is_never_faster_than_its_rate(store3) -> None:
    store, _ = store3
    store.write(0, block_data(5, 512))
    rate = 1 << 20  # 1 MiB/s: about 85 blocks of 3 copies per second
    scrub = Scrubber(store, rate_bytes_per_s=rate, tick_s=0.02)
    t0 = time.monotonic()
    with thread_exceptions_fail():
        scrub.start()
        with pytest.raises(RuntimeError):
            scrub.start()
        time.sleep(0.5)
        scrub.stop()
    elapsed = time.monotonic() - t0
    done = scrub.report().bytes_read
    assert done <= rate * elapsed + 2 * rate * 0.02 + 3 * BS


def test_run_reads_what_its_rate_allows(store3) -> None:
    """On a clock that advances one tick per loop, k loops earn ``rate * tick * k`` bytes, and
    the scrubber reads all of them but less than one block (the rest waits for more tokens):
    it keeps to its rate from below too, however loaded the machine is."""
    store, _ = store3
    store.write(0, block_data(5, 512))  # 6 MiB of copies: no pass ends within this test
    rate, tick = 1 << 20, 0.02
    calls = itertools.count()
    scrub = Scrubber(store, rate_bytes_per_s=rate, tick_s=tick,
                     clock=lambda: next(calls) * tick)
    with thread_exceptions_fail():
        scrub.start()
        time.sleep(0.3)
        scrub.stop()
    loops = next(calls) - 1  # the first call only starts the clock
    earned = rate * tick * (loops - 1)  # the last loop's tokens may not have been spent yet
    assert loops > 2
    assert earned - 3 * BS <= scrub.report().bytes_read <= rate * tick * loops
    assert scrub.report().passes == 0


def test_rate_must_be_positive(store3) -> None:
    with pytest.raises(ValueError):
        Scrubber(store3[0], rate_bytes_per_s=0)


def test_run_until_stopped_from_another_thread(store3) -> None:
    store, image = store3
    store.write(0, block_data(6, 8))
    image.flip_bits(store.locate(4)[2], 1)
    scrub = Scrubber(store, rate_bytes_per_s=64 << 20, tick_s=0.01)
    stop = threading.Event()
    with thread_exceptions_fail():
        t = threading.Thread(target=scrub.run, args=(stop,))
        t.start()
        deadline = time.monotonic() + 10
        while store.stats().repaired == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        t.join()
    assert store.stats().repaired == 1
