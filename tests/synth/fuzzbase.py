"""Seed vmcores for the fuzzer and their anatomy: where each structure lives in the file.

The fuzzer mutates structures, not just bytes, so it must know the file offsets of the ELF
and program headers, the notes, the VMCOREINFO text, the page-table entries a walk reads, the
mem_section roots and entries, struct pages and the printk ring. The anatomy is found with
kdumpd's own reader on the pristine seed (a seed it cannot read is a bug in the seed), so the
same code serves the synthetic seeds and a real vmcore.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.synth.builder import Machine, layout_variant, template

__all__ = ["SEEDS", "Anatomy", "anatomy", "build_seed", "data_extents"]

PAGE = 4096


def _shape(m: Machine) -> Machine:
    """Pages of every class the classifier tells apart, so mutations start from each."""
    info = m.info
    buddy = int(info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"])
    for head, order in ((0x4000, 10), (0x4400, 3), (0x4410, 0), (0x5000, 9), (0x7FF0, 4)):
        m.page(head, _mapcount=buddy, private=order)
    m.page(0x6000, flags=m.flag("PG_lru"))
    m.page(0x6001, flags=m.flag("PG_lru") | m.flag("PG_private"))
    m.page(0x6002, flags=m.flag("PG_lru"), mapping=m.page_offset + 0xABC001)
    m.page(0x6003, flags=m.flag("PG_hwpoison"))
    m.page(0x6004, flags=m.flag("PG_swapcache") | m.flag("PG_swapbacked"))
    if "NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)" in info:
        m.page(0x6005, _mapcount=int(info["NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)"]))
    if "NUMBER(PG_slab)" in info:
        m.page(0x6006, flags=m.flag("PG_slab"))
    _folio(m, 0x6200, 3)
    _folio(m, 0x6400, 9, anon=True)
    return m


def _folio(m: Machine, head: int, order: int, anon: bool = False) -> None:
    """A compound page of ``1 << order`` pages, its order where m's kernel keeps it."""
    info = m.info
    fields = {"flags": int(info["NUMBER(PG_head_mask)"]) | m.flag("PG_lru")}
    if anon:
        fields["mapping"] = m.page_offset + 0x1234561
    m.page(head, **fields)
    head_va = m.vmemmap + head * m.size_page
    for pfn in range(head + 1, head + (1 << order)):
        m.page(pfn, compound_head=head_va | 1)
    if "OFFSET(page.compound_order)" in info:  # 4.16..6.2: fields of page[1]
        m.page_byte(head + 1, int(info["OFFSET(page.compound_order)"]), order)
        m.page_byte(head + 1, int(info["OFFSET(page.compound_dtor)"]), 3)
    elif "OFFSET(folio._folio_order)" in info:  # 6.3..6.5: folio fields, from the head
        m.page_byte(head + 1, int(info["OFFSET(folio._folio_order)"]) - m.size_page, order)
        m.page_byte(head + 1, int(info["OFFSET(folio._folio_dtor)"]) - m.size_page, 3)
    else:  # 6.6+: the order in folio._flags_1 (the flags word of page[1])
        m.page(head + 1, flags=order, compound_head=head_va | 1)


def _seed(info: dict[str, str], **kw: object) -> Callable[[], Machine]:
    def make() -> Machine:
        return _shape(Machine(dict(info), ram=128 << 20, **kw))  # type: ignore[arg-type]
    return make


def _legacy_log() -> Machine:
    m = _shape(Machine(template("6.1"), ram=128 << 20))
    m.set_log(["Linux version 6.1", "Kernel panic - not syncing: test"], legacy=True)
    return m


SEEDS: dict[str, Callable[[], Machine]] = {
    "6.1": _seed(template("6.1")),
    "6.12": _seed(template("6.12")),
    "6.12-5level": _seed(template("6.12"), five_level=True),
    "6.1-4k-leaves": _seed(template("6.1"), direct_leaf=1 << 21, vmemmap_leaf=PAGE),
    "6.1-sme": _seed(template("6.1"), sme_mask=1 << 47),
    "6.1-legacy-log": _legacy_log,
    "folio-6.3": _seed(layout_variant("6.1", "folio-6.3")),
    "pg_hugetlb-6.6": _seed(layout_variant("6.1", "pg_hugetlb-6.6")),
    "unaccepted-6.16": _seed(layout_variant("6.12", "unaccepted-6.16")),
}


def build_seed(name: str, path: Path) -> Path:
    """Write seed ``name`` (deterministic: the same bytes every time) to ``path``."""
    return SEEDS[name]().write(path)


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of a sparse file that hold data (SEEK_DATA/SEEK_HOLE)."""
    out = []
    pos = start
    while pos < end:
        try:
            lo = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if lo >= end:
            break
        hi = min(os.lseek(fd, lo, os.SEEK_HOLE), end)
        out.append((lo, hi))
        pos = hi
    return out


@dataclass
class Anatomy:
    """File offsets of the structures of one seed, and the values mutations draw from."""

    size: int
    phdr_offs: list[int]
    note_off: int  # PT_NOTE file offset
    note_space: int  # bytes from note_off to the next thing in the file
    note_phdr: int  # file offset of the PT_NOTE program header
    notes: list[tuple[bytes, int, bytes]]  # (name with NUL, type, desc)
    vmcoreinfo: bytes
    ptes: list[int] = field(default_factory=list)  # file offsets of page-table entries
    tables: list[int] = field(default_factory=list)  # physical addresses of tables
    sections: list[int] = field(default_factory=list)  # file offsets of mem_section words
    struct_pages: list[int] = field(default_factory=list)  # file offsets of struct pages
    log: list[tuple[int, int]] = field(default_factory=list)  # (file offset, length)
    data_pages: list[int] = field(default_factory=list)  # file offsets of non-zero pages
    ram_end: int = 0
    vmemmap: int = 0
    size_page: int = 64
    page_fields: dict[str, int] = field(default_factory=dict)
    numbers: dict[str, int] = field(default_factory=dict)
    real: bool = False


def _parse_notes(raw: bytes) -> list[tuple[bytes, int, bytes]]:
    out = []
    pos = 0
    while pos + 12 <= len(raw):
        namesz, descsz, ntype = struct.unpack_from("<III", raw, pos)
        pos += 12
        name = raw[pos : pos + namesz]
        pos += (namesz + 3) & ~3
        desc = raw[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        out.append((name, ntype, desc))
    return out


def anatomy(path: Path, *, real: bool = False, rng: random.Random | None = None) -> Anatomy:
    """Find the structures of a vmcore that kdumpd reads cleanly."""
    from kdumpd.mm.memmap import MemSections
    from kdumpd.vmcore.core import open_vmcore
    from kdumpd.xlat.x86_64 import X86_64Translator

    rng = rng or random.Random(0)
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    phoff, = struct.unpack_from("<Q", head, 32)
    phnum, = struct.unpack_from("<H", head, 56)
    phdr_offs = [phoff + 56 * i for i in range(phnum)]
    note_off = note_size = note_phdr = 0
    offsets = []
    for off in phdr_offs:
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", head, off)
        if p_type == 4:
            note_off, note_size, note_phdr = p_offset, p_filesz, off
        elif p_filesz:
            offsets.append(p_offset)
    size = os.path.getsize(path)
    later = [o for o in offsets if o > note_off]
    note_space = (min(later) if later else size) - note_off
    with open(path, "rb") as fh:
        fh.seek(note_off)
        notes = _parse_notes(fh.read(note_size))
    vmcoreinfo = next(d for n, _, d in notes if n.rstrip(b"\0") == b"VMCOREINFO")
    a = Anatomy(size, phdr_offs, note_off, note_space, note_phdr, notes, vmcoreinfo, real=real)
    text = vmcoreinfo.decode("ascii", "replace")
    for line in text.splitlines():
        k, _, v = line.partition("=")
        if k.startswith("OFFSET(page.") and v.lstrip("-").isdigit():
            a.page_fields[k[len("OFFSET(page.") : -1]] = int(v)
        if k.startswith("NUMBER(") and v.lstrip("-").isdigit():
            a.numbers[k[7:-1]] = int(v)
    with open_vmcore(path) as vm:
        phys = vm.phys
        reads: list[int] = []

        def rec(paddr: int) -> int:
            reads.append(paddr)
            return phys.read_u64(paddr)

        xlat = X86_64Translator(vm.info, vm.header.loads, rec)
        a.tables.append(xlat.root_paddr)
        a.ram_end = max(r.end_paddr for r in phys.ranges)
        a.size_page = vm.info.size("page")
        ms_reads: list[int] = []

        def read_v(vaddr: int) -> int:
            pa = xlat.translate(vaddr)
            ms_reads.append(pa)
            return phys.read_u64(pa)

        ms = MemSections(vm.info, read_v, xlat.max_physmem_bits)
        last_pfn = a.ram_end >> 12
        pfns: set[int] = set()
        shaped = [0x4000, 0x4400, 0x4410, 0x5000, 0x6000, 0x6001, 0x6002, 0x6003, 0x6004,
                  0x6005, 0x6006, 0x6200, 0x6201, 0x6207, 0x6400, 0x6401, 0x65FF, 0x7FF0]
        for sec in ms.iter_sections(0, last_pfn):
            if not sec.usable:
                continue
            for pfn in (sec.start_pfn, sec.end_pfn - 1, *shaped,
                        *(rng.randrange(sec.start_pfn, sec.end_pfn) for _ in range(40))):
                if sec.start_pfn <= pfn < min(sec.end_pfn, last_pfn):
                    pfns.add(pfn)
            if len(pfns) > 2000:
                break
        sp_vas = []
        for pfn in sorted(pfns):
            sec = ms.section(pfn >> ms.pfn_section_shift)
            va = sec.page_vaddr(pfn, a.size_page)
            sp_vas.append(va)
            try:
                a.struct_pages.append(phys.offset_of(xlat.translate(va), a.size_page))
            except Exception:  # noqa: BLE001 - a seed's odd corner: just not a target
                continue
        a.vmemmap = min(sp_vas) if sp_vas else 0
        a.sections = sorted({phys.offset_of(pa, 8) for pa in ms_reads})
        # Page-table entries on the walks the planner makes (vmemmap, mem_section, the log).
        targets = sp_vas[:: max(1, len(sp_vas) // 64)] + [ms.root_vaddr]
        for key in ("prb", "log_buf", "init_top_pgt", "mem_section"):
            if vm.info.has("SYMBOL", key):
                targets.append(vm.info.symbol(key))
        for va in targets:
            reads.clear()
            try:
                xlat.walk(va)
            except Exception:  # noqa: BLE001
                pass
            for pa in reads:
                a.ptes.append(phys.offset_of(pa, 8))
                a.tables.append(pa & ~0xFFF)
        a.ptes = sorted(set(a.ptes))
        a.tables = sorted(set(a.tables))
        # The printk ring: prb, its rings' structs, descriptors, infos and text.
        if vm.info.has("SYMBOL", "prb"):
            try:
                prb = xlat.translate(vm.info.symbol("prb"))
                a.log.append((phys.offset_of(prb, 8), 8))
                rb = xlat.translate(phys.read_u64(prb))
                a.log.append((phys.offset_of(rb, 96), 96))
                for off in (8, 16, 56):
                    pa = xlat.translate(phys.read_u64(rb + off))
                    a.log.append((phys.offset_of(pa, 256), 256))
            except Exception:  # noqa: BLE001
                pass
        for key in ("log_buf", "log_buf_len", "log_first_idx", "log_next_idx"):
            if vm.info.has("SYMBOL", key):
                try:
                    pa = xlat.translate(vm.info.symbol(key))
                    a.log.append((phys.offset_of(pa, 8), 8))
                except Exception:  # noqa: BLE001
                    pass
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = []
        for lo, hi in data_extents(fd, note_off + note_space, size):
            pages.extend(range(lo & ~(PAGE - 1), hi, PAGE))
    finally:
        os.close(fd)
    a.data_pages = pages if len(pages) <= 20000 else rng.sample(pages, 20000)
    return a
