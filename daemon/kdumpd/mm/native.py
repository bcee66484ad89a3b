"""Typed access to ``kdumpd.mm._classify``, the planner's C loops (``classify.c``).

Why a wrapper: cffi modules carry no types, and the buffers handed to C must be checked for
size here, where a mistake is an exception instead of a read past the end of a buffer.

The extension is imported when this module is (so the initramfs tracer ships it). Without it
kdumpd cannot plan at all: the import fails with one line naming how to build it, because a
pure-Python classifier would be too slow for the capture kernel and a fallback would hide that.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from kdumpd.errors import MissingExtensionError

__all__ = [
    "ByteBuffer", "Carry", "check_pages", "classify_chunk", "count", "is_zero", "lut",
    "new_counts", "new_layout", "runs",
]

ByteBuffer = bytes | bytearray | memoryview

try:
    _mod = importlib.import_module("kdumpd.mm._classify")
except ImportError as _exc:
    raise MissingExtensionError(
        f"the C classifier kdumpd.mm._classify is not built ({_exc}); build it with "
        "scripts/setup-env or: python3 daemon/kdumpd/mm/_build_classify.py"
    ) from None

ffi: Any = _mod.ffi
lib: Any = _mod.lib


def lut(members: Iterable[int]) -> bytes:
    """A 256-entry table, 1 at each member: what ``runs`` tests a byte value against."""
    table = bytearray(256)
    for m in members:
        table[m] = 1
    return bytes(table)


def new_layout() -> Any:
    """A zeroed ``struct kdumpd_layout`` for PageLayout to fill."""
    return ffi.new("struct kdumpd_layout *")


class Carry:
    """A range that ran past the end of a chunk, as the C side keeps it."""

    def __init__(self) -> None:
        self._c: Any = ffi.new("struct kdumpd_carry *")

    @property
    def active(self) -> bool:
        return bool(self._c.active)

    @property
    def end_pfn(self) -> int:
        return int(self._c.end_pfn)

    def clear(self) -> None:
        self._c.active = 0


def classify_chunk(
    layout: Any,
    size_page: int,
    start_pfn: int,
    pages: ByteBuffer,
    examined: ByteBuffer | None,
    carry: Carry,
) -> tuple[bytearray, bytearray, tuple[int, int] | None]:
    """(classes, poisoned 0/1, retracted range or None) of the struct pages in ``pages``."""
    view = memoryview(pages).cast("B")
    if view.nbytes % size_page:
        raise ValueError(f"{view.nbytes} bytes of struct pages is not a multiple of {size_page}")
    n = view.nbytes // size_page
    if n >= 1 << 32:
        raise ValueError("chunk too large")
    if examined is not None and memoryview(examined).nbytes != n:
        raise ValueError("examined must have one byte per page")
    cls = bytearray(n)
    poisoned = bytearray(n)
    retract = ffi.new("uint64_t[2]")
    if n == 0:
        return cls, poisoned, None
    hit = lib.kdumpd_classify(
        layout,
        ffi.from_buffer(view),
        n,
        start_pfn,
        ffi.NULL if examined is None else ffi.from_buffer(examined),
        carry._c,
        ffi.from_buffer(cls),
        ffi.from_buffer(poisoned),
        retract,
    )
    return cls, poisoned, ((int(retract[0]), int(retract[1])) if hit else None)


def runs(
    vals: ByteBuffer, table: bytes, veto: ByteBuffer | None = None,
    lo: int = 0, hi: int | None = None,
) -> list[tuple[int, int]]:
    """Half-open index runs within ``[lo, hi)`` where ``table[vals[i]]`` and not ``veto[i]``."""
    n = memoryview(vals).nbytes
    hi = n if hi is None else hi
    if len(table) != 256 or not 0 <= lo <= hi <= n or n >= 1 << 32:
        raise ValueError("bad runs() arguments")
    if veto is not None and memoryview(veto).nbytes != n:
        raise ValueError("veto must be as long as vals")
    if lo == hi:
        return []
    out = ffi.new("uint32_t[]", hi - lo + 1)
    k = lib.kdumpd_runs(
        ffi.from_buffer(vals), ffi.NULL if veto is None else ffi.from_buffer(veto),
        lo, hi, ffi.from_buffer(table), out,
    )
    flat: list[int] = ffi.unpack(out, 2 * k)
    return list(zip(flat[0::2], flat[1::2], strict=True))


def count(vals: ByteBuffer, counts: Any) -> None:
    """Add the number of each byte value of ``vals`` into ``counts`` (``new_counts()``)."""
    n = memoryview(vals).nbytes
    if n:
        lib.kdumpd_count(ffi.from_buffer(vals), n, counts)


def check_pages(layout: Any, size_page: int, pages: ByteBuffer, vaddr0: int,
                counts: Any) -> None:
    """Add the plausibility counts of ``pages`` (struct pages whose first one is at virtual
    address ``vaddr0``) into ``counts[0..3]``: compound heads, heads whose page[1] does not
    point back, anonymous LRU pages, those without PG_swapbacked."""
    view = memoryview(pages).cast("B")
    if view.nbytes % size_page:
        raise ValueError(f"{view.nbytes} bytes of struct pages is not a multiple of {size_page}")
    if view.nbytes:
        lib.kdumpd_check_pages(layout, ffi.from_buffer(view), view.nbytes // size_page,
                               vaddr0 & 0xFFFFFFFFFFFFFFFF, counts)


def new_counts() -> Any:
    """256 zeroed ``uint64_t`` counters for ``count``."""
    return ffi.new("uint64_t[256]")


def is_zero(buf: ByteBuffer) -> bool:
    """True if every byte of ``buf`` is zero."""
    n = memoryview(buf).nbytes
    return n == 0 or bool(lib.kdumpd_is_zero(ffi.from_buffer(buf), n))
