"""Helpers shared by the store, scrub and DMA tests (this module holds no tests).

The image is laid out like a vmcore, not like a raw file: two PT_LOAD-like physical ranges
above 4 GiB with a 64 MiB hole between them, stored at file offsets that are not their
addresses, so every test that goes through the store also checks the p_offset mapping. The
granted extents leave 16 pages at the start of each range outside the plan, so the guard has
something to refuse.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kdumpd.oldmem.image import ImageOldMem
from kdumpd.store.blockstore import BlockStore
from kdumpd.store.blocksum import BlockSums, PyBlockSums, load_cffi
from kdumpd.store.placement import Placement
from kdumpd.units import PAGE_SHIFT, PAGE_SIZE, Extent, PhysRange

BASE_PADDR = 0x1_0000_0000
HOLE = 64 << 20
FILE_OFFSET = 0x3000  # where the first range starts in the file (an ELF header would sit here)
UNGRANTED = 16  # pages at the start of each range that the plan does not grant

_cffi_cache: dict[str, BlockSums | None] = {}


@contextlib.contextmanager
def thread_exceptions_fail() -> Iterator[None]:
    """Fail the test with the first exception any thread raised inside the block (threads the
    code under test starts too, such as the scrubber's). Without this, an exception in a
    thread is printed and dropped, and the test passes."""
    caught: list[BaseException] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            caught.append(args.exc_value)
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
    if caught:
        caught[0].add_note(f"raised in a thread ({len(caught)} thread(s) failed)")
        raise caught[0]


def run_threads(workers: Sequence[Callable[[], object]],
                background: Sequence[Callable[[threading.Event], object]] = ()) -> None:
    """Run each worker in its own thread, and each background function (given a stop Event)
    until the workers are done; then re-raise the first exception any of them raised."""
    stop = threading.Event()
    with thread_exceptions_fail():
        helpers = [threading.Thread(target=fn, args=(stop,)) for fn in background]
        threads = [threading.Thread(target=fn) for fn in workers]
        for t in helpers + threads:
            t.start()
        try:
            for t in threads:
                t.join()
        finally:
            stop.set()
            for t in helpers:
                t.join()


def layout(pool_pages: int) -> tuple[list[PhysRange], list[Extent], int]:
    """Two ranges holding ``pool_pages`` granted pages in all; returns ranges, extents and
    the file size."""
    half = pool_pages // 2
    sizes = [half + UNGRANTED, pool_pages - half + UNGRANTED]
    ranges, extents = [], []
    paddr, offset = BASE_PADDR, FILE_OFFSET
    for npages in sizes:
        nbytes = npages << PAGE_SHIFT
        ranges.append(PhysRange(paddr, paddr + nbytes, offset))
        extents.append(Extent((paddr >> PAGE_SHIFT) + UNGRANTED, (paddr + nbytes) >> PAGE_SHIFT))
        paddr += nbytes + HOLE
        offset += nbytes
    return ranges, extents, offset


def make_image(tmp_path: Path, pool_pages: int) -> tuple[ImageOldMem, list[Extent]]:
    ranges, extents, file_size = layout(pool_pages)
    return ImageOldMem.create(tmp_path / "oldmem.img", file_size, ranges), extents


def make_store(
    tmp_path: Path,
    *,
    copies: int = 2,
    pool_pages: int = 4096,
    nblocks: int = 256,
    sums: BlockSums | None = None,
    **kwargs: Any,
) -> tuple[BlockStore, ImageOldMem]:
    image, extents = make_image(tmp_path, pool_pages)
    placement = Placement.from_extents(extents, copies)
    store = BlockStore(image, placement, size_bytes=nblocks * PAGE_SIZE,
                       block_sums=sums or PyBlockSums(), **kwargs)
    return store, image


def block_data(seed: int, nblocks: int = 1) -> bytes:
    """Content named by a seed: checks need no stored copy."""
    return random.Random(seed).randbytes(nblocks * PAGE_SIZE)


def good_copies(store: BlockStore, image: ImageOldMem, block: int, expected: bytes) -> list[bool]:
    """For each copy of ``block``, whether its raw bytes in the image equal ``expected``."""
    paddrs = store.locate(block)
    assert paddrs is not None, f"block {block} is not written"
    return [image.pread(p, PAGE_SIZE) == expected for p in paddrs]


def cffi_block_sums(tmp_path_factory: pytest.TempPathFactory) -> BlockSums | None:
    """Build the cffi kernels once per session; None if gcc, cffi or xxhash.h is missing."""
    if "sums" not in _cffi_cache:
        _cffi_cache["sums"] = _build_cffi(tmp_path_factory)
    return _cffi_cache["sums"]


def _build_cffi(tmp_path_factory: pytest.TempPathFactory) -> BlockSums | None:
    if shutil.which("gcc") is None or not Path("/usr/include/xxhash.h").exists():
        return None
    try:
        from kdumpd.store._build_blocksum import build

        path = build(str(tmp_path_factory.mktemp("cffi")))
    except Exception:  # cffi.VerificationError, missing compiler pieces: a missing prerequisite
        return None
    return load_cffi(path)
