"""Property test: the store against a bytearray model, with corruption injected into the image.

Random writes, reads, trims and write-zeroes (aligned or not, 1 byte to 3 blocks) interleave
with random faults: bit flips in one copy, DMA-like bursts anywhere in the pool, every copy of
a block destroyed, and writes to a slot silently lost. The oracle is the image itself: a copy
is good exactly when its raw bytes equal the model's bytes for its block. Then:

- a read never returns bytes other than the model's;
- it raises IntegrityError exactly when it reaches a block that fails: one with no good copy
  left, or one the store has declared lost whose copy 0 is bad (the model's ``known_lost``);
- a read that found copy 0 bad leaves it good again (repaired, or the block moved) and the
  counters say so; after a scrub every block has all copies good or none, except blocks known
  lost;
- used blocks are exactly the model's non-zero blocks (thin provisioning).

A lost block stays lost until it is rewritten (any write that reaches it, trim or
write-zeroes): the store stops trusting its copies and does not repair it, even when faults
flip its bits back so that a copy matches again. Reads of it still verify copy 0, so they
return the right bytes while copy 0 happens to match, and fail otherwise. The model therefore
records which blocks the store declared lost (the block a failing request stopped at, or a
scrub's LOST), instead of deriving loss from the copies alone.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from tests.conftest import require
from tests.unit.test_store_support import cffi_block_sums, make_store

from kdumpd.errors import IntegrityError
from kdumpd.store.blockstore import BlockCheck
from kdumpd.store.blocksum import BlockSums, PyBlockSums
from kdumpd.units import PAGE_SIZE

BS = PAGE_SIZE
NBLOCKS = 48
SIZE = NBLOCKS * BS
POOL_PAGES = 2048  # 8 MiB: room for 3 copies 2 MiB apart, and many relocations
ZERO = bytes(BS)

# No lambdas: hypothesis describes every drawn strategy, and a lambda's source is slow to find.
OFFSETS = st.one_of(st.sampled_from(range(0, SIZE, BS)), st.integers(0, SIZE - 1))
LENGTHS = st.one_of(st.sampled_from([BS, 2 * BS, 3 * BS]), st.integers(1, 3 * BS + 100))

COUNTERS = ("reads", "writes", "corruptions_detected", "repaired", "quarantined_slots",
            "relocations", "lost_blocks", "scrubbed_blocks")


def make_machine(sums: BlockSums, fast: bool | None) -> type[RuleBasedStateMachine]:
    class StoreModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.tmp = tempfile.mkdtemp(prefix="kdumpd-model-")

        @initialize(copies=st.integers(1, 3))
        def setup(self, copies: int) -> None:
            self.store, self.image = make_store(Path(self.tmp), copies=copies,
                                                pool_pages=POOL_PAGES, nblocks=NBLOCKS, sums=sums,
                                                fast=fast)
            self.copies = copies
            self.model = bytearray(SIZE)
            self.known_lost: set[int] = set()  # declared lost by the store, not yet rewritten
            self.prev = self.store.stats()

        def teardown(self) -> None:
            if hasattr(self, "image"):
                self.store.close()
                self.image.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

        # -- the oracle ------------------------------------------------------------------

        def expected(self, block: int) -> bytes:
            return bytes(self.model[block * BS : (block + 1) * BS])

        def good(self, block: int) -> list[bool] | None:
            paddrs = self.store.locate(block)
            if paddrs is None:
                return None
            want = self.expected(block)
            return [self.image.pread(p, BS) == want for p in paddrs]

        def is_lost(self, block: int) -> bool:
            good = self.good(block)
            return good is not None and not any(good)

        def fails(self, block: int) -> bool:
            # Whether reading the block raises: no good copy left, or declared lost before
            # and copy 0 bad (a lost block is not repaired, even if another copy came back).
            good = self.good(block)
            if good is None:
                return False
            return not good[0] if block in self.known_lost else not any(good)

        def first_failing(self, blocks: range | list[int]) -> int | None:
            # The block, in the order the store reads them, where a request stops.
            return next((b for b in blocks if self.fails(b)), None)

        def rewritten(self, b0: int, b1: int) -> None:
            self.known_lost.difference_update(range(b0, b1))

        def written(self) -> list[int]:
            return [b for b in range(NBLOCKS) if self.store.locate(b) is not None]

        @staticmethod
        def draw_range(data: st.DataObject) -> tuple[int, int]:
            offset = data.draw(OFFSETS, label="offset")
            return offset, min(data.draw(LENGTHS, label="nbytes"), SIZE - offset)

        def edges(self, offset: int, nbytes: int) -> set[int]:
            # Blocks a read-modify-write of [offset, offset + nbytes) must read first.
            out = set()
            if offset % BS:
                out.add(offset // BS)
            if (offset + nbytes) % BS:
                out.add((offset + nbytes) // BS)
            return out

        def rmw(self, offset: int, data: bytes) -> None:
            # One read-modify-write as the store does it: all or nothing. The head edge is
            # read before the tail edge.
            bad = self.first_failing(sorted(self.edges(offset, len(data))))
            if bad is not None:
                with pytest.raises(IntegrityError):
                    self.store.write(offset, data)
                self.known_lost.add(bad)
                raise _Refused
            self.store.write(offset, data)
            self.model[offset : offset + len(data)] = data
            self.rewritten(offset // BS, -(-(offset + len(data)) // BS))

        # -- I/O ---------------------------------------------------------------------------

        @rule(data=st.data(), kind=st.sampled_from(["random", "zeros", "pattern"]))
        def write(self, data: st.DataObject, kind: str) -> None:
            offset, nbytes = self.draw_range(data)
            seed = data.draw(st.integers(0, 1 << 30), label="seed")
            payload = {"random": lambda: random.Random(seed).randbytes(nbytes),
                       "zeros": lambda: bytes(nbytes),
                       "pattern": lambda: bytes([seed & 0xFF]) * nbytes}[kind]()
            try:
                self.rmw(offset, payload)
            except _Refused:
                pass

        @rule(data=st.data())
        def read(self, data: st.DataObject) -> None:
            self.check_read(*self.draw_range(data))

        @rule(data=st.data())
        def read_written_block(self, data: st.DataObject) -> None:
            written = self.written()  # aims reads where the faults are
            if written:
                self.check_read(data.draw(st.sampled_from(written), label="block") * BS, BS)

        def check_read(self, offset: int, nbytes: int) -> None:
            blocks = range(offset // BS, (offset + nbytes - 1) // BS + 1)
            bad = self.first_failing(blocks)
            bad0 = [b for b in blocks if (g := self.good(b)) is not None and not g[0] and any(g)]
            before = self.store.stats()
            if bad is not None:
                with pytest.raises(IntegrityError):
                    self.store.read(offset, nbytes)
                self.known_lost.add(bad)
                return
            assert self.store.read(offset, nbytes) == self.model[offset : offset + nbytes]
            after = self.store.stats()
            for b in bad0:
                assert self.good(b)[0], f"block {b}: copy 0 was not repaired"
            fixed = (after.repaired - before.repaired) + (after.relocations - before.relocations)
            assert after.corruptions_detected - before.corruptions_detected >= len(bad0)
            assert fixed >= len(bad0)

        @rule(data=st.data())
        def trim(self, data: st.DataObject) -> None:
            offset, nbytes = self.draw_range(data)
            self.store.trim(offset, nbytes)
            b0, b1 = -(-offset // BS), (offset + nbytes) // BS
            self.model[b0 * BS : max(b0, b1) * BS] = bytes(max(0, b1 - b0) * BS)
            self.rewritten(b0, b1)

        @rule(data=st.data())
        def zero(self, data: st.DataObject) -> None:
            offset, nbytes = self.draw_range(data)
            end = offset + nbytes
            b0, b1 = -(-offset // BS), end // BS
            edges = self.edges(offset, nbytes)
            if b0 >= b1:
                bad = self.first_failing(sorted(edges))
                if bad is not None:
                    with pytest.raises(IntegrityError):
                        self.store.zero(offset, nbytes)
                    self.known_lost.add(bad)
                    return
                self.store.zero(offset, nbytes)
                self.model[offset:end] = bytes(nbytes)
                self.rewritten(offset // BS, -(-end // BS))
                return
            head_lost = offset % BS and self.fails(offset // BS)
            tail_lost = end % BS and self.fails(end // BS)
            if head_lost or tail_lost:
                with pytest.raises(IntegrityError):
                    self.store.zero(offset, nbytes)
                if head_lost:
                    self.known_lost.add(offset // BS)
                else:
                    self.known_lost.add(end // BS)
                    if offset % BS:  # the head went through before the tail
                        self.model[offset : b0 * BS] = bytes(b0 * BS - offset)
                        self.rewritten(offset // BS, b0)
                return
            self.store.zero(offset, nbytes)
            self.model[offset:end] = bytes(nbytes)
            self.rewritten(offset // BS, -(-end // BS))

        @rule()
        def scrub(self) -> None:
            for b in range(NBLOCKS):
                known = b in self.known_lost
                lost = self.is_lost(b)
                result = self.store.verify_block(b)
                if known or lost:  # a known-lost block stays lost, whatever its copies hold
                    assert result is BlockCheck.LOST, (b, result)
                    self.known_lost.add(b)
                else:
                    assert result is not BlockCheck.LOST, (b, result)
            for b in range(NBLOCKS):
                good = self.good(b)
                assert good is None or all(good) or not any(good) or b in self.known_lost, \
                    (b, good)

        # -- faults: straight into the image, as a device would -------------------------

        @rule(data=st.data(), nbits=st.integers(1, 8))
        def flip(self, data: st.DataObject, nbits: int) -> None:
            written = self.written()
            if written:
                block = data.draw(st.sampled_from(written), label="block")
                copy = data.draw(st.integers(0, self.copies - 1), label="copy")
                self.image.flip_bits(self.store.locate(block)[copy], nbits,
                                     rng=random.Random(data.draw(st.integers(0, 99))))

        @rule(data=st.data(), nbytes=st.integers(1, 64 << 10), seed=st.integers(0, 1 << 20))
        def burst(self, data: st.DataObject, nbytes: int, seed: int) -> None:
            ext = data.draw(st.sampled_from(self.store.placement.extents), label="extent")
            paddr = data.draw(st.integers(ext.start_paddr, ext.end_paddr - 1), label="at")
            pattern = None if seed % 3 else bytes([seed & 0xFF, 0])
            self.image.burst(paddr, min(nbytes, ext.end_paddr - paddr), pattern,
                             rng=random.Random(seed))

        @rule(data=st.data())
        def destroy_every_copy(self, data: st.DataObject) -> None:
            written = self.written()
            if written:
                block = data.draw(st.sampled_from(written), label="block")
                for paddr in self.store.locate(block):
                    self.image.flip_bits(paddr, 1)

        @precondition(lambda self: fast is False)  # the C path's stores cannot be dropped
        @rule(data=st.data())
        def lose_writes(self, data: st.DataObject) -> None:
            written = self.written()
            if written:
                block = data.draw(st.sampled_from(written), label="block")
                copy = data.draw(st.integers(0, self.copies - 1), label="copy")
                paddr = self.store.locate(block)[copy]
                self.image.lose_writes(paddr, paddr + BS)

        @rule()
        def stop_losing_writes(self) -> None:
            self.image.clear_faults()

        # -- invariants ------------------------------------------------------------------

        @invariant()
        def counters_only_grow_and_space_is_thin(self) -> None:
            if not hasattr(self, "store"):
                return
            now = self.store.stats()
            for name in COUNTERS:
                assert getattr(now, name) >= getattr(self.prev, name), name
            self.prev = now
            nonzero = sum(1 for b in range(NBLOCKS) if self.expected(b) != ZERO)
            assert now.used_blocks == nonzero == len(self.written())

    return StoreModel


class _Refused(Exception):
    """The store refused a read-modify-write (IntegrityError), as the model expected."""


@pytest.fixture(params=["python", "cffi", "cffi-fast"])
def sums_fast(request, tmp_path_factory):
    if request.param == "python":
        return PyBlockSums(), False
    built = cffi_block_sums(tmp_path_factory)
    require(built is not None, "cffi checksum kernels not buildable (gcc, libxxhash-dev)")
    return built, request.param == "cffi-fast"


def test_store_matches_model_under_corruption(sums_fast) -> None:
    run_state_machine_as_test(
        make_machine(*sums_fast),
        settings=settings(max_examples=120, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
