"""The scrubber: verify every copy of every written block, in the background, at a bounded rate.

Reads alone only check copy 0 (unless it fails), so a copy that a device damaged would stay
damaged until copy 0 failed too. The scrubber walks the written blocks in order with
:meth:`BlockStore.verify_block`, which reads every copy and repairs the bad ones from a good
one, then wraps around. It uses only the store's public API and takes the store's lock one
block at a time, so foreground I/O waits at most one block's verification.

The rate is a token bucket in bytes of old memory read per second (``copies * 4 KiB`` per
block). :meth:`Scrubber.step` does one bounded slice of work and is what tests call;
:meth:`Scrubber.start` runs it in a daemon thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kdumpd.store.blockstore import BlockCheck, BlockStore

__all__ = ["ScrubReport", "Scrubber"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScrubReport:
    """What the scrubber has done since it was created."""

    passes: int  # complete sweeps over the written blocks
    blocks_checked: int
    bytes_read: int
    blocks_repaired: int  # blocks with at least one copy repaired
    blocks_lost: int  # LOST results: a lost block is seen again on every pass


class Scrubber:
    """Rate-limited verify-and-repair sweep over a :class:`BlockStore`."""

    def __init__(
        self,
        store: BlockStore,
        *,
        rate_bytes_per_s: int,
        tick_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError(f"scrub rate must be positive, not {rate_bytes_per_s}")
        self._store = store
        self._rate = rate_bytes_per_s
        self._tick = tick_s
        self._clock = clock
        self._per_block = store.copies * store.block_size
        self._cursor = 0
        self._passes = self._checked = self._bytes = self._repaired = self._lost = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self, max_bytes: int) -> int:
        """Verify blocks from the cursor until ``max_bytes`` of copies would be exceeded, or
        the sweep reaches the end (the cursor then wraps and the pass is counted); return the
        bytes read. From a fresh scrubber, ``step(huge)`` is exactly one full pass."""
        used = 0
        while used + self._per_block <= max_bytes:
            block = self._store.next_written(self._cursor)
            if block is None:
                self._cursor = 0
                self._passes += 1
                break
            self._cursor = block + 1
            result = self._store.verify_block(block)
            if result is BlockCheck.UNWRITTEN:
                continue  # trimmed since next_written looked
            used += self._per_block
            self._checked += 1
            if result is BlockCheck.REPAIRED:
                self._repaired += 1
            elif result is BlockCheck.LOST:
                self._lost += 1
        self._bytes += used
        return used

    def report(self) -> ScrubReport:
        return ScrubReport(self._passes, self._checked, self._bytes, self._repaired, self._lost)

    def run(self, stop: threading.Event) -> None:
        """Scrub until ``stop`` is set, never faster than the rate (token bucket)."""
        budget = 0.0
        cap = max(float(self._per_block), 2 * self._rate * self._tick)
        last = self._clock()
        while not stop.is_set():
            now = self._clock()
            budget = min(cap, budget + (now - last) * self._rate)
            last = now
            if budget >= self._per_block:
                used = self.step(int(budget))
                budget = budget - used if used else 0.0  # idle: do not hoard tokens
            stop.wait(self._tick)

    def start(self) -> threading.Thread:
        """Run :meth:`run` in a daemon thread; :meth:`stop` ends it."""
        if self._thread is not None:
            raise RuntimeError("scrubber already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="kdumpd-scrub",
                                        daemon=True)
        self._thread.start()
        log.info("scrub: started at %d KiB/s", self._rate >> 10)
        return self._thread

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
