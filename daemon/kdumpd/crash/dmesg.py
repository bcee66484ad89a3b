"""The crashed kernel's log, read from its printk ring buffer through VMCOREINFO alone.

Two formats: the lockless ring buffer (5.10+, ``SYMBOL(prb)``) and the older variable-length
record buffer (``SYMBOL(log_buf)``). Both are read defensively: counts and lengths come from
old memory that may be corrupt, so every loop is bounded and a broken record ends the walk
with an error naming it, never an endless loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kdumpd.errors import LayoutError, TranslationError, VmcoreError
from kdumpd.vmcore.vmcoreinfo import VmcoreInfo
from kdumpd.xlat.vmem import VirtMem

__all__ = ["LogRecord", "read_log"]

_DESC_SV_BITS = 64
_DESC_FLAGS_SHIFT = _DESC_SV_BITS - 2
_DESC_ID_MASK = (1 << _DESC_FLAGS_SHIFT) - 1
_DESC_COMMITTED, _DESC_FINALIZED = 1, 2
_MAX_RECORDS = 1 << 22  # far above any real ring; stops a corrupt head/tail from looping
_MAX_TEXT = 1 << 16


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One log record: sequence number, timestamp in ns and the text."""

    seq: int
    ts_nsec: int
    text: str

    def format(self) -> str:
        secs, nsec = divmod(self.ts_nsec, 1_000_000_000)
        prefix = f"[{secs:5d}.{nsec // 1000:06d}] "
        # Continuation lines of a multi-line record line up under the text, as dmesg does.
        return prefix + self.text.replace("\n", "\n" + " " * len(prefix))


def read_log(info: VmcoreInfo, vm: VirtMem) -> list[LogRecord]:
    """All records still in the ring, oldest first."""
    try:
        if info.has("SYMBOL", "prb"):
            return list(_lockless(info, vm))
        if info.has("SYMBOL", "log_buf"):
            return list(_legacy(info, vm))
    except TranslationError as exc:
        raise VmcoreError(f"printk ring buffer unreadable: {exc}") from None
    raise LayoutError("VMCOREINFO lacks SYMBOL(prb) and SYMBOL(log_buf): no kernel log")


def _lockless(info: VmcoreInfo, vm: VirtMem) -> Iterator[LogRecord]:
    off = info.offset
    counter = off("atomic_long_t.counter")
    rb = vm.u64(info.symbol("prb"))  # SYMBOL(prb) is the address of the pointer
    desc_ring = rb + off("printk_ringbuffer.desc_ring")
    text_ring = rb + off("printk_ringbuffer.text_data_ring")
    count_bits = vm.u32(desc_ring + off("prb_desc_ring.count_bits"))
    size_bits = vm.u32(text_ring + off("prb_data_ring.size_bits"))
    # The kernel sizes the descriptor ring from the text ring (PRB_AVGBITS bytes per record
    # on average), so more descriptor bits than text bits is corruption, and reading such a
    # ring whole could take more memory than a capture kernel has.
    if not (0 < count_bits < size_bits < 32):
        raise VmcoreError(f"printk ring sizes are implausible ({count_bits}, {size_bits} bits)")
    count = 1 << count_bits
    size = 1 << size_bits
    descs = vm.u64(desc_ring + off("prb_desc_ring.descs"))
    infos = vm.u64(desc_ring + off("prb_desc_ring.infos"))
    data = vm.u64(text_ring + off("prb_data_ring.data"))
    head = vm.u64(desc_ring + off("prb_desc_ring.head_id") + counter) & _DESC_ID_MASK
    tail = vm.u64(desc_ring + off("prb_desc_ring.tail_id") + counter) & _DESC_ID_MASK
    size_desc = info.size("prb_desc")
    size_info = info.size("printk_info")
    lpos = off("prb_desc.text_blk_lpos")
    lpos_begin = off("prb_data_blk_lpos.begin")
    lpos_next = off("prb_data_blk_lpos.next")
    # Three bulk reads (descriptors, infos, text) instead of one translation per field.
    desc_blob = vm.read(descs, count * size_desc)
    info_blob = vm.read(infos, count * size_info)
    text_blob = vm.read(data, size)
    o_state = off("prb_desc.state_var") + counter
    o_seq, o_ts = off("printk_info.seq"), off("printk_info.ts_nsec")
    o_len = off("printk_info.text_len")

    def u64(blob: bytes, pos: int) -> int:
        return int.from_bytes(blob[pos : pos + 8], "little")

    ident = tail
    for _ in range(min(count, _MAX_RECORDS)):
        desc = (ident % count) * size_desc
        state_var = u64(desc_blob, desc + o_state)
        state = state_var >> _DESC_FLAGS_SHIFT
        if (state_var & _DESC_ID_MASK) == ident and state in (_DESC_COMMITTED, _DESC_FINALIZED):
            begin = u64(desc_blob, desc + lpos + lpos_begin)
            nxt = u64(desc_blob, desc + lpos + lpos_next)
            if not (begin & 1 and nxt & 1) and begin != nxt:  # data-less records carry no text
                b, n = begin % size, nxt % size
                if b > n:  # wrapped: the text starts at the beginning of the ring
                    b = 0
                b += 8  # skip the block's id word
                rec = (ident % count) * size_info
                text_len = int.from_bytes(info_blob[rec + o_len : rec + o_len + 2], "little")
                text_len = min(text_len, max(0, n - b))
                text = text_blob[b : b + text_len].decode("utf-8", "replace")
                yield LogRecord(u64(info_blob, rec + o_seq), u64(info_blob, rec + o_ts), text)
        if ident == head:
            return
        ident = (ident + 1) & _DESC_ID_MASK
    raise VmcoreError("printk descriptor ring never reached its head: corrupt ring")


def _legacy(info: VmcoreInfo, vm: VirtMem) -> Iterator[LogRecord]:
    buf = vm.u64(info.symbol("log_buf"))
    buf_len = vm.u32(info.symbol("log_buf_len"))
    first = vm.u32(info.symbol("log_first_idx"))
    nxt = vm.u32(info.symbol("log_next_idx"))
    if info.has("SIZE", "printk_log"):
        struct_name = "printk_log"
    else:
        struct_name = "log"
    hdr = info.size(struct_name)
    o_ts = info.offset(f"{struct_name}.ts_nsec")
    o_len = info.offset(f"{struct_name}.len")
    o_text_len = info.offset(f"{struct_name}.text_len")
    if not 0 < buf_len <= 1 << 30 or first >= buf_len or nxt >= buf_len:
        raise VmcoreError("legacy printk buffer indices are implausible")
    if hdr <= 0:
        raise VmcoreError(f"SIZE({struct_name})={hdr} is implausible")
    blob = vm.read(buf, buf_len)
    idx, seq, wrapped = first, 0, False
    # Every record is at least a header long and the buffer wraps at most once between the
    # first and the next index: a corrupt length or wrap marker cannot make this loop long.
    for _ in range(min(_MAX_RECORDS, 2 * buf_len // hdr + 2)):
        if idx == nxt:
            return
        if idx + hdr > buf_len:
            raise VmcoreError(f"legacy printk record at {idx:#x} overruns the buffer")
        length = int.from_bytes(blob[idx + o_len : idx + o_len + 2], "little")
        if length == 0:  # wrap marker
            if wrapped:
                raise VmcoreError(f"legacy printk buffer wraps twice (at {idx:#x}): corrupt")
            idx, wrapped = 0, True
            continue
        if length < hdr:
            raise VmcoreError(f"legacy printk record at {idx:#x} is {length} bytes, shorter "
                              f"than its {hdr}-byte header: corrupt")
        text_len = int.from_bytes(blob[idx + o_text_len : idx + o_text_len + 2], "little")
        ts = int.from_bytes(blob[idx + o_ts : idx + o_ts + 8], "little")
        text = blob[idx + hdr : idx + hdr + min(text_len, _MAX_TEXT)]
        yield LogRecord(seq, ts, text.decode("utf-8", "replace"))
        seq += 1
        idx += length
        if idx >= buf_len:
            raise VmcoreError("legacy printk record length runs past the buffer")
    raise VmcoreError("legacy printk buffer never reached log_next_idx: corrupt")
