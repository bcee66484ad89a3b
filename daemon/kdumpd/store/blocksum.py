"""The block checksum (XXH3-64 of each 4 KiB block) and its batch kernels, cffi or Python.

Why XXH3-64 (python-xxhash over Debian's libxxhash): the fastest checksum available here
(``bench/bench_store.py`` prints it next to crc32c and zlib.crc32; Debian's python3-crc32c has
no hardware path), and 64 bits leave a corrupted copy a 2**-64 chance of passing where a 32-bit
CRC leaves 2**-32. It is not cryptographic: it catches devices, not attackers.

The checksum covers content only (no block number, no seed): a copy is right exactly when its
bytes equal the last bytes written, and that is what the checksum decides. Stale bytes left by
a lost write or a reused slot differ from the current ones, so they fail like any corruption.

Checking a 64 KiB or 1 MiB request block by block from Python costs more in interpreter
overhead than in hashing, so batches go to :class:`CffiBlockSums` (one C call per request,
built by ``_build_blocksum.py``) when that module is built, else to :class:`PyBlockSums`.
Both compute the same function; the unit tests run the store on both.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

import xxhash

from kdumpd.units import PAGE_SHIFT, PAGE_SIZE

__all__ = [
    "ZERO_BLOCK",
    "ZERO_CHECKSUM",
    "BlockSums",
    "CffiBlockSums",
    "PyBlockSums",
    "checksum",
    "default_block_sums",
    "load_cffi",
]

log = logging.getLogger(__name__)

# The C function itself, not a wrapper: single blocks call it directly on the hot path.
checksum: Callable[[bytes | bytearray | memoryview], int] = xxhash.xxh3_64_intdigest

ZERO_BLOCK = bytes(PAGE_SIZE)
ZERO_CHECKSUM: int = checksum(ZERO_BLOCK)


class BlockSums(Protocol):
    """Checksums of consecutive 4 KiB blocks of a buffer."""

    name: str

    def first_bad(self, buf: memoryview, expected: memoryview) -> int:
        """Index of the first block of ``buf`` whose checksum differs from ``expected``
        (a ``'Q'`` memoryview, one entry per block), or the block count if all match."""
        ...

    def checksums(self, buf: memoryview) -> list[int]:
        """The checksum of every block of ``buf``."""
        ...


class PyBlockSums:
    """Pure Python: one ``xxh3_64_intdigest`` call per block."""

    name = "python"

    def first_bad(self, buf: memoryview, expected: memoryview) -> int:
        for k, want in enumerate(expected.tolist()):
            if checksum(buf[k << PAGE_SHIFT : (k + 1) << PAGE_SHIFT]) != want:
                return k
        return len(expected)

    def checksums(self, buf: memoryview) -> list[int]:
        return [
            checksum(buf[k << PAGE_SHIFT : (k + 1) << PAGE_SHIFT])
            for k in range(buf.nbytes >> PAGE_SHIFT)
        ]


class CffiBlockSums:
    """One C call per buffer (``kdumpd.store._blocksum``); releases the GIL while hashing."""

    name = "cffi"

    def __init__(self, module: ModuleType) -> None:
        self.ffi: Any = module.ffi
        self.lib: Any = module.lib
        # Self-test against the Python path before trusting it with data.
        probe = bytes(range(256)) * 32
        if self.checksums(memoryview(probe)) != PyBlockSums().checksums(memoryview(probe)):
            raise ImportError("kdumpd.store._blocksum disagrees with python-xxhash")

    def first_bad(self, buf: memoryview, expected: memoryview) -> int:
        n = len(expected)
        if buf.nbytes < n << PAGE_SHIFT:
            raise ValueError("buffer shorter than the checksums given")
        ffi = self.ffi
        return int(
            self.lib.kdumpd_first_bad(
                ffi.from_buffer(buf), n, ffi.from_buffer("uint64_t[]", expected)
            )
        )

    def checksums(self, buf: memoryview) -> list[int]:
        n = buf.nbytes >> PAGE_SHIFT
        ffi = self.ffi
        out = ffi.new("uint64_t[]", n)
        self.lib.kdumpd_checksums(ffi.from_buffer(buf), n, out)
        result: list[int] = ffi.unpack(out, n)
        return result


def load_cffi(path: str | None = None) -> CffiBlockSums | None:
    """The cffi kernels from the installed package, or from the built file ``path``; None if
    unavailable (not built, or built for another interpreter)."""
    try:
        if path is None:
            module = importlib.import_module("kdumpd.store._blocksum")
        else:
            spec = importlib.util.spec_from_file_location("kdumpd.store._blocksum", path)
            if spec is None or spec.loader is None:
                return None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        return CffiBlockSums(module)
    except ImportError as exc:
        log.debug("blocksum: cffi kernels unavailable (%s); using Python", exc)
        return None


def default_block_sums() -> BlockSums:
    """The cffi kernels if built, else the pure Python ones."""
    return load_cffi() or PyBlockSums()
