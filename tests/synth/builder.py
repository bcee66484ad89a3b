"""Build small synthetic x86_64 vmcores: real VMCOREINFO text + crafted page tables and pages.

Real VMs do not easily show 1 GiB leaves, hwpoison inside a free block, offline pages or every
page_type encoding; these builders make them on demand. The machine: RAM from 0 to ``ram``,
kernel image at ``phys_base``, a direct map, a vmemmap, SPARSEMEM_EXTREME mem_section.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

START_KERNEL_MAP = 0xFFFFFFFF80000000
PAGE_OFFSET_4L = 0xFFFF888000000000
PAGE_OFFSET_5L = 0xFF11000000000000
VMEMMAP_4L = 0xFFFFEA0000000000
VMEMMAP_5L = 0xFFD4000000000000
PAGE = 4096
SECTION_BITS = 27

DATA = Path(__file__).resolve().parent.parent / "data"


def template(name: str) -> dict[str, str]:
    """A real kernel's VMCOREINFO (tests/data/vmcoreinfo-NAME.txt) as an ordered dict."""
    out: dict[str, str] = {}
    for line in (DATA / f"vmcoreinfo-{name}.txt").read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def layout_variant(base: str, name: str) -> dict[str, str]:
    """Layouts between the two real templates, made by editing keys as those kernels did."""
    info = template(base)
    if name == "folio-6.3":  # 6.3..6.5: order/dtor are folio fields in page[1]
        del info["OFFSET(page.compound_order)"], info["OFFSET(page.compound_dtor)"]
        info["OFFSET(folio._folio_dtor)"] = "80"
        info["OFFSET(folio._folio_order)"] = "81"
    elif name == "pg_hugetlb-6.6":  # 6.6..6.8: order in _flags_1, hugetlb is a _flags_1 bit
        del info["OFFSET(page.compound_order)"], info["OFFSET(page.compound_dtor)"]
        del info["NUMBER(HUGETLB_PAGE_DTOR)"]
        info["NUMBER(PG_hugetlb)"] = "8"
    elif name == "unaccepted-6.16":
        info["NUMBER(PAGE_UNACCEPTED_MAPCOUNT_VALUE)"] = str(0xF7000000 - (1 << 32))
    return info


@dataclass
class PhysImage:
    """Sparse physical memory: page number -> 4 KiB bytearray."""

    pages: dict[int, bytearray] = field(default_factory=dict)
    next_free: int = 0x100000  # bump allocator for tables and metadata

    def page(self, pfn: int) -> bytearray:
        if pfn not in self.pages:
            self.pages[pfn] = bytearray(PAGE)
        return self.pages[pfn]

    def write(self, paddr: int, data: bytes) -> None:
        while data:
            pfn, off = divmod(paddr, PAGE)
            take = min(len(data), PAGE - off)
            self.page(pfn)[off : off + take] = data[:take]
            paddr += take
            data = data[take:]

    def write_u64(self, paddr: int, value: int) -> None:
        self.write(paddr, struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF))

    def read_u64(self, paddr: int) -> int:
        pfn, off = divmod(paddr, PAGE)
        page = self.pages.get(pfn)
        return 0 if page is None else struct.unpack_from("<Q", page, off)[0]

    def alloc(self, nbytes: int, align: int = PAGE) -> int:
        addr = (self.next_free + align - 1) & ~(align - 1)
        self.next_free = addr + nbytes
        return addr


class PageTables:
    """x86_64 page tables in a PhysImage, 4- or 5-level, with 4 KiB/2 MiB/1 GiB leaves."""

    def __init__(self, mem: PhysImage, five_level: bool, sme_mask: int = 0) -> None:
        self.mem = mem
        self.shifts = [48, 39, 30, 21, 12] if five_level else [39, 30, 21, 12]
        self.sme_mask = sme_mask
        self.root = mem.alloc(PAGE)

    def map(self, vaddr: int, paddr: int, size: int) -> None:
        leaf_shift = {PAGE: 12, 1 << 21: 21, 1 << 30: 30}[size]
        table = self.root
        for shift in self.shifts:
            idx = (vaddr >> shift) & 511
            slot = table + 8 * idx
            if shift == leaf_shift:
                pse = 0x80 if shift in (21, 30) else 0
                self.mem.write_u64(slot, paddr | self.sme_mask | 0x63 | pse)
                return
            entry = self.mem.read_u64(slot)
            if not entry & 1:
                nxt = self.mem.alloc(PAGE)
                self.mem.page(nxt >> 12)
                self.mem.write_u64(slot, nxt | self.sme_mask | 0x63)
                entry = nxt
            table = entry & 0x000FFFFFFFFFF000 & ~self.sme_mask

    def map_range(self, vaddr: int, paddr: int, nbytes: int, size: int) -> None:
        for off in range(0, nbytes, size):
            self.map(vaddr + off, paddr + off, size)


@dataclass
class Machine:
    """A synthetic crashed machine; call ``page()`` to shape struct pages, then ``write()``."""

    info: dict[str, str]
    ram: int = 256 << 20
    five_level: bool = False
    phys_base: int = 0x1000000
    direct_leaf: int = 1 << 30
    vmemmap_leaf: int = 1 << 21
    sme_mask: int = 0
    mem: PhysImage = field(default_factory=PhysImage)

    def __post_init__(self) -> None:
        self.size_page = int(self.info["SIZE(page)"])
        self.page_offset = PAGE_OFFSET_5L if self.five_level else PAGE_OFFSET_4L
        self.vmemmap = VMEMMAP_5L if self.five_level else VMEMMAP_4L
        # Tables and metadata live inside the kernel image, as init_top_pgt does.
        self.mem.next_free = self.phys_base + (8 << 20)
        self.pt = PageTables(self.mem, self.five_level, self.sme_mask)
        # Kernel image: identity of START_KERNEL_MAP -> phys_base (2 MiB leaves).
        self.pt.map_range(START_KERNEL_MAP, self.phys_base, 16 << 20, 1 << 21)
        # Direct map of all RAM.
        self.pt.map_range(self.page_offset, 0, max(self.ram, self.direct_leaf), self.direct_leaf)
        # struct page array for all RAM, in the middle of RAM, mapped at vmemmap.
        npages = self.ram // PAGE
        memmap_bytes = npages * self.size_page
        memmap_bytes = (memmap_bytes + (1 << 21) - 1) & ~((1 << 21) - 1)
        self.memmap_paddr = 0x4000000  # 64 MiB
        self.pt.map_range(self.vmemmap, self.memmap_paddr, memmap_bytes, self.vmemmap_leaf)
        # mem_section: SPARSEMEM_EXTREME root array + one page of sections (16 bytes each).
        self.sections_paddr = self.mem.alloc(PAGE)
        self.roots_paddr = self.mem.alloc(PAGE)
        self.mem.write_u64(self.roots_paddr, self.page_offset + self.sections_paddr)
        nsections = -(-self.ram // (1 << SECTION_BITS))
        for nr in range(nsections):
            self.set_section(nr, 0xF)  # present | has_mem_map | online | early (boot memory)
        # The VA of SYMBOL(init_top_pgt) must translate through the kernel-image mapping.
        self.init_top_pgt_va = START_KERNEL_MAP + (self.pt.root - self.phys_base)

    def kva(self, paddr: int) -> int:
        """Kernel-image virtual address of a physical address allocated by ``mem.alloc``."""
        return START_KERNEL_MAP + (paddr - self.phys_base)

    def set_log(self, texts: list[str], legacy: bool = False) -> None:
        """Put a printk log holding ``texts`` in memory (lockless ring, or the pre-5.10 one)."""
        self.log_texts = list(texts)
        self.log_legacy = legacy

    def _write_log(self, info: dict[str, str]) -> None:
        texts = getattr(self, "log_texts", ["Kernel panic - not syncing: sysrq triggered crash"])
        for key in [k for k in info if "printk" in k or "prb" in k or k.startswith(
                ("SYMBOL(log_", "SIZE(log", "OFFSET(log", "SIZE(latched", "OFFSET(latched"))]:
            del info[key]
        if getattr(self, "log_legacy", False):
            self._write_legacy_log(info, texts)
        else:
            self._write_lockless_log(info, texts)

    def _write_legacy_log(self, info: dict[str, str], texts: list[str]) -> None:
        size = 1 << 14
        buf = self.mem.alloc(size)
        pos = 0
        for i, text in enumerate(texts):
            raw = text.encode()
            length = (16 + len(raw) + 7) & ~7
            self.mem.write(buf + pos, struct.pack("<QHHBB", i * 1000, length, len(raw), 0, 6))
            self.mem.write(buf + pos + 16, raw)
            pos += length
        var = self.mem.alloc(64)
        self.mem.write_u64(var, self.kva(buf))
        self.mem.write(var + 8, struct.pack("<III", size, 0, pos))
        info.update({
            "SYMBOL(log_buf)": f"{self.kva(var):x}",
            "SYMBOL(log_buf_len)": f"{self.kva(var + 8):x}",
            "SYMBOL(log_first_idx)": f"{self.kva(var + 12):x}",
            "SYMBOL(log_next_idx)": f"{self.kva(var + 16):x}",
            "SIZE(printk_log)": "16", "OFFSET(printk_log.ts_nsec)": "0",
            "OFFSET(printk_log.len)": "8", "OFFSET(printk_log.text_len)": "10",
        })

    def _write_lockless_log(self, info: dict[str, str], texts: list[str]) -> None:
        # Field offsets as in 6.1's VMCOREINFO (tests/data/vmcoreinfo-6.1.txt).
        count_bits, size_bits = 5, 14
        descs = self.mem.alloc(24 << count_bits)
        infos = self.mem.alloc(88 << count_bits)
        data = self.mem.alloc(1 << size_bits)
        rb = self.mem.alloc(88)
        prb = self.mem.alloc(8)
        pos = 0
        for ident, text in enumerate(texts):
            raw = text.encode()
            begin, nxt = pos, (pos + 8 + len(raw) + 7) & ~7
            self.mem.write_u64(data + begin, ident)
            self.mem.write(data + begin + 8, raw)
            d = descs + 24 * ident
            self.mem.write_u64(d, (2 << 62) | ident)  # finalized
            self.mem.write_u64(d + 8, begin)
            self.mem.write_u64(d + 16, nxt)
            rec = infos + 88 * ident
            self.mem.write(rec, struct.pack("<QQH", ident, ident * 1_000_000, len(raw)))
            pos = nxt
        self.mem.write(rb, struct.pack("<IxxxxQQQQ", count_bits, self.kva(descs), self.kva(infos),
                                       len(texts) - 1, 0))
        self.mem.write(rb + 48, struct.pack("<IxxxxQQQ", size_bits, self.kva(data), pos, 0))
        self.mem.write_u64(prb, self.kva(rb))
        keys = {
            "SYMBOL(prb)": f"{self.kva(prb):x}", "SIZE(printk_ringbuffer)": "88",
            "OFFSET(printk_ringbuffer.desc_ring)": "0",
            "OFFSET(printk_ringbuffer.text_data_ring)": "48",
            "OFFSET(prb_desc_ring.count_bits)": "0", "OFFSET(prb_desc_ring.descs)": "8",
            "OFFSET(prb_desc_ring.infos)": "16", "OFFSET(prb_desc_ring.head_id)": "24",
            "OFFSET(prb_desc_ring.tail_id)": "32", "SIZE(prb_desc)": "24",
            "OFFSET(prb_desc.state_var)": "0", "OFFSET(prb_desc.text_blk_lpos)": "8",
            "OFFSET(prb_data_blk_lpos.begin)": "0", "OFFSET(prb_data_blk_lpos.next)": "8",
            "SIZE(printk_info)": "88", "OFFSET(printk_info.seq)": "0",
            "OFFSET(printk_info.ts_nsec)": "8", "OFFSET(printk_info.text_len)": "16",
            "OFFSET(prb_data_ring.size_bits)": "0", "OFFSET(prb_data_ring.data)": "8",
            "OFFSET(atomic_long_t.counter)": "0",
        }
        info.update(keys)

    def set_section(self, nr: int, flags: int) -> None:
        size = int(self.info["SIZE(mem_section)"])
        offset = int(self.info["OFFSET(mem_section.section_mem_map)"])
        self.mem.write_u64(self.sections_paddr + size * nr + offset, self.vmemmap | flags)

    def struct_page(self, pfn: int) -> int:
        return self.memmap_paddr + pfn * self.size_page

    def page(self, pfn: int, **fields: int) -> None:
        """Set struct page fields by VMCOREINFO name: flags, mapping, _mapcount, private,
        compound_head, and any OFFSET(page.X) name."""
        base = self.struct_page(pfn)
        for name, value in fields.items():
            off = int(self.info[f"OFFSET(page.{name})"])
            width = 4 if name in ("_mapcount", "_refcount") else 8
            fmt = "<I" if width == 4 else "<Q"
            self.mem.write(base + off, struct.pack(fmt, value & ((1 << (8 * width)) - 1)))

    def page_byte(self, pfn: int, offset: int, value: int) -> None:
        self.mem.write(self.struct_page(pfn) + offset, bytes([value]))

    def flag(self, name: str) -> int:
        return 1 << int(self.info[f"NUMBER({name})"])

    def set_free_counter(self, free_pages: int) -> None:
        """One online node whose only zone's vm_stat[NR_FREE_PAGES] says ``free_pages``,
        reachable through SYMBOL(node_data) and SYMBOL(node_online_map) as on a real kernel."""
        info = self.info
        pgdat = self.mem.alloc(int(info["SIZE(pglist_data)"]), 64)
        node_data = self.mem.alloc(8 * int(info["LENGTH(node_data)"]), 64)
        online = self.mem.alloc(int(info["SIZE(nodemask_t)"]), 64)
        self.mem.write_u64(node_data, self.kva(pgdat))
        self.mem.write_u64(online, 1)
        self.mem.write(pgdat + int(info["OFFSET(pglist_data.nr_zones)"]), struct.pack("<i", 1))
        zone = pgdat + int(info["OFFSET(pglist_data.node_zones)"])
        stat = zone + int(info["OFFSET(zone.vm_stat)"]) + 8 * int(info["NUMBER(NR_FREE_PAGES)"])
        self.mem.write_u64(stat, free_pages)
        self.node_symbols = {"SYMBOL(node_data)": f"{self.kva(node_data):x}",
                             "SYMBOL(node_online_map)": f"{self.kva(online):x}"}

    def vmcoreinfo(self) -> str:
        info = dict(self.info)
        info.update(getattr(self, "node_symbols", {}))
        self._write_log(info)
        info["SYMBOL(init_top_pgt)"] = f"{self.init_top_pgt_va:x}"
        info["NUMBER(phys_base)"] = str(self.phys_base)
        info["NUMBER(pgtable_l5_enabled)"] = "1" if self.five_level else "0"
        info["NUMBER(sme_mask)"] = str(self.sme_mask)
        info["SYMBOL(mem_section)"] = f"{self.page_offset + self.roots_paddr:x}"
        info["NUMBER(MAX_PHYSMEM_BITS)"] = "52" if self.five_level else "46"
        info["NUMBER(SECTION_SIZE_BITS)"] = str(SECTION_BITS)
        per_root = PAGE // int(info["SIZE(mem_section)"])
        nr_sections = 1 << (int(info["NUMBER(MAX_PHYSMEM_BITS)"]) - SECTION_BITS)
        info["LENGTH(mem_section)"] = str(-(-nr_sections // per_root))
        if "SYMBOL(vmemmap)" in info:
            info["SYMBOL(vmemmap)"] = f"{self.vmemmap:x}"
        return "".join(f"{k}={v}\n" for k, v in info.items())

    def write(self, path: Path, *, ranges: list[tuple[int, int]] | None = None,
              drop_keys: tuple[str, ...] = (), extra_text: str = "",
              offset_shift: int = 0) -> Path:
        """Write an ELF core: one PT_LOAD per RAM range (file offsets deliberately not equal
        to physical addresses), a kernel-text duplicate PT_LOAD, and the VMCOREINFO note."""
        text = self.vmcoreinfo()
        for key in drop_keys:
            text = "".join(line + "\n" for line in text.splitlines() if not line.startswith(key))
        text += extra_text
        return write_elf_core(path, self.mem, ranges or [(0, self.ram)], text.encode(),
                              self.page_offset, self.phys_base, offset_shift)


def _note(name: bytes, n_type: int, desc: bytes) -> bytes:
    name_z = name + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name_z), len(desc), n_type) + pad(name_z) + pad(desc)


def write_elf_core(path: Path, mem: PhysImage, ranges: list[tuple[int, int]], vmcoreinfo: bytes,
                   page_offset: int, phys_base: int, offset_shift: int = 0) -> Path:
    notes = _note(b"CORE", 1, b"\0" * 336) + _note(b"VMCOREINFO", 0, vmcoreinfo)
    loads = [(page_offset + a, a, b - a) for a, b in ranges]
    loads.append((START_KERNEL_MAP, phys_base, 8 << 20))  # kernel text, duplicates RAM
    phnum = 1 + len(loads)
    hdr_end = 64 + 56 * phnum
    note_off = hdr_end
    data_off = (note_off + len(notes) + PAGE - 1) // PAGE * PAGE + offset_shift * PAGE
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, note_off, 0, 0, len(notes), len(notes), 0)]
    file_offsets = []
    cursor = data_off
    for vaddr, paddr, size in loads:
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 7, cursor, vaddr, paddr, size, size, PAGE))
        file_offsets.append((cursor, paddr, size))
        cursor += size
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + b"\0" * 9, 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 64, 0, 0,
    )
    with open(path, "wb") as fh:
        fh.write(ehdr + b"".join(phdrs))
        fh.seek(note_off)
        fh.write(notes)
        for off, paddr, size in file_offsets:
            for pfn, data in mem.pages.items():
                addr = pfn * PAGE
                if paddr <= addr < paddr + size:
                    fh.seek(off + addr - paddr)
                    fh.write(data)
        fh.truncate(cursor)
    return path
