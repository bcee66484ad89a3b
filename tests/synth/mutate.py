"""Structure-aware vmcore mutations: an input is a seed name plus patches (file offset, bytes)
and perhaps a shorter length, so a worker applies and undoes it in place and a finding is
reproduced from a few hundred bytes of JSON.

Each mutator aims at one structure the reader trusts (see tests/synth/fuzzbase.Anatomy) and
draws values that reach past the first check: a page-table entry pointing back at its own table
or past the end of RAM, a buddy order of 63, a compound_head into nowhere, a VMCOREINFO number
of 2**64, as well as plain byte flips.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.synth.fuzzbase import Anatomy

__all__ = ["MUTATORS", "Input", "mutate"]

Patch = tuple[int, bytes]
M64 = (1 << 64) - 1


@dataclass
class Input:
    seed: str
    patches: list[Patch] = field(default_factory=list)
    truncate: int | None = None
    what: list[str] = field(default_factory=list)
    prepare: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "patches": [[o, b.hex()] for o, b in self.patches],
                "truncate": self.truncate, "what": self.what, "prepare": self.prepare}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Input:
        return cls(doc["seed"], [(int(o), bytes.fromhex(h)) for o, h in doc["patches"]],
                   doc.get("truncate"), list(doc.get("what", [])), bool(doc.get("prepare")))


def _u(value: int, width: int) -> bytes:
    return (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def _interesting(rng: random.Random, orig: int, width: int, a: Anatomy) -> int:
    bits = 8 * width
    choices: list[Callable[[], int]] = [
        lambda: 0, lambda: 1, lambda: (1 << bits) - 1, lambda: 1 << (bits - 1),
        lambda: (1 << (bits - 1)) - 1, lambda: orig ^ (1 << rng.randrange(bits)),
        lambda: orig + rng.randint(-4096, 4096), lambda: rng.getrandbits(bits),
        lambda: orig * 2, lambda: orig // 2, lambda: a.size,
        lambda: a.size + rng.randrange(1 << 20),
        lambda: a.ram_end, lambda: a.ram_end + PAGE * rng.randrange(1, 1 << 16),
        lambda: 1 << rng.randrange(bits), lambda: orig & ~0xFFF, lambda: rng.randrange(64),
    ]
    return rng.choice(choices)()


PAGE = 4096


def _read(data: Callable[[int, int], bytes], off: int, width: int) -> int:
    return int.from_bytes(data(off, width), "little")


Reader = Callable[[int, int], bytes]


def m_header_bytes(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    end = a.note_off + min(a.note_space, 0x3000)
    for _ in range(rng.randint(1, 8)):
        off = rng.randrange(end)
        inp.patches.append((off, bytes([rng.randrange(256)])))
    inp.what.append("header bytes")


_EHDR = [("e_ident.class", 4, 1), ("e_ident.data", 5, 1), ("e_ident.version", 6, 1),
         ("e_type", 16, 2), ("e_machine", 18, 2), ("e_version", 20, 4), ("e_phoff", 32, 8),
         ("e_shoff", 40, 8), ("e_ehsize", 52, 2), ("e_phentsize", 54, 2), ("e_phnum", 56, 2),
         ("e_shnum", 60, 2)]
_PHDR = [("p_type", 0, 4), ("p_flags", 4, 4), ("p_offset", 8, 8), ("p_vaddr", 16, 8),
         ("p_paddr", 24, 8), ("p_filesz", 32, 8), ("p_memsz", 40, 8), ("p_align", 48, 8)]


def m_ehdr(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    name, off, width = rng.choice(_EHDR)
    inp.patches.append((off, _u(_interesting(rng, _read(rd, off, width), width, a), width)))
    inp.what.append(f"ELF {name}")


def m_phdr(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    i = rng.randrange(len(a.phdr_offs))
    name, off, width = rng.choice(_PHDR)
    where = a.phdr_offs[i] + off
    orig = _read(rd, where, width)
    if name == "p_type" and rng.random() < 0.5:
        value = rng.choice([0, 1, 2, 4, 6, 0x6474E550])
    elif name in ("p_offset", "p_paddr", "p_vaddr") and rng.random() < 0.4:
        other = a.phdr_offs[rng.randrange(len(a.phdr_offs))] + off
        value = _read(rd, other, 8) + rng.choice([0, PAGE, -PAGE, 1])  # overlap a neighbour
    else:
        value = _interesting(rng, orig, width, a)
    inp.patches.append((where, _u(value, width)))
    inp.what.append(f"phdr[{i}].{name}")


def _notes_bytes(notes: list[tuple[bytes, int, bytes]]) -> bytes:
    out = b""
    for name, ntype, desc in notes:
        out += struct.pack("<III", len(name), len(desc), ntype)
        out += name + b"\0" * (-len(name) % 4) + desc + b"\0" * (-len(desc) % 4)
    return out


def m_note_header(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    i = rng.randrange(len(a.notes))
    off = a.note_off + len(_notes_bytes(a.notes[:i])) + 4 * rng.randrange(3)
    width = 4
    inp.patches.append((off, _u(_interesting(rng, _read(rd, off, 4), width, a), width)))
    inp.what.append(f"note[{i}] header")


_DEC = ["0", "1", "-1", "4096", "65536", str(1 << 32), str(1 << 63), str(1 << 64), "9" * 100,
        "x", "", " 5", "0x10", "1.5", "+3", "\u0663", "-0", "52", "57", "64", "27", "12"]
_HEX = ["0", "ffffffffffffffff", "fffffffffffff000", "1", "zz", "", "-1", "1" * 40,
        "ffff800000000000", "0x10", "ffffea0000000000", "ffff888000000000"]


def _new_value(rng: random.Random, key: str, value: str) -> str:
    if key.startswith("SYMBOL(") or key == "KERNELOFFSET":
        try:
            v = int(value, 16)
            return rng.choice([f"{v ^ (1 << rng.randrange(64)):x}", f"{v + PAGE:x}",
                               f"{v - PAGE:x}", f"{(v + rng.randrange(-64, 64)) & M64:x}",
                               rng.choice(_HEX)])
        except ValueError:
            return rng.choice(_HEX)
    try:
        v = int(value)
        return rng.choice([str(v + 1), str(v - 1), str(v * 2), str(v // 2), str(-v),
                           str(v ^ (1 << rng.randrange(32))), str(v + 8), rng.choice(_DEC)])
    except ValueError:
        return rng.choice(_DEC)


def m_vmcoreinfo(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    lines = a.vmcoreinfo.split(b"\n")
    what = []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        key, _, value = lines[i].decode("ascii", "replace").partition("=")
        op = rng.random()
        if op < 0.6:
            lines[i] = f"{key}={_new_value(rng, key, value)}".encode()
            what.append(f"value {key}")
        elif op < 0.75:
            del lines[i]
            what.append(f"drop {key}")
        elif op < 0.85:
            lines.insert(i, f"{key}={_new_value(rng, key, value)}".encode())
            what.append(f"duplicate {key}")
        elif op < 0.92:
            raw = bytearray(lines[i])
            if raw:
                raw[rng.randrange(len(raw))] = rng.choice(b"=()\0\xff \t.-Zz9")
            lines[i] = bytes(raw)
            what.append(f"corrupt line {key}")
        else:
            lines.insert(i, rng.choice([b"=", b"NUMBER()=1", b"no equals", b"\xff\xfe=1",
                                        b"OFFSET(page.flags=0", b"SIZE(page)=" + b"9" * 5000]))
            what.append("garbage line")
    text = b"\n".join(lines)
    if rng.random() < 0.05:
        text = text[: rng.randrange(len(text) + 1)]
        what.append("cut text")
    notes = [(n, t, text if n.rstrip(b"\0") == b"VMCOREINFO" else d) for n, t, d in a.notes]
    raw = _notes_bytes(notes)
    if len(raw) > a.note_space:
        cut = len(raw) - a.note_space
        notes = [(n, t, text[: len(text) - cut] if n.rstrip(b"\0") == b"VMCOREINFO" else d)
                 for n, t, d in a.notes]
        raw = _notes_bytes(notes)[: a.note_space]
    old_len = len(_notes_bytes(a.notes))
    inp.patches.append((a.note_off, raw + b"\0" * max(0, min(old_len, a.note_space) - len(raw))))
    inp.patches.append((a.note_phdr + 32, _u(len(raw), 8) * 2))  # p_filesz, p_memsz
    inp.what.append("VMCOREINFO " + ", ".join(what))


def m_pte(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    off = rng.choice(a.ptes)
    orig = _read(rd, off, 8)
    table = rng.choice(a.tables)
    value = rng.choice([
        orig ^ 1, orig | 0x80, orig & ~0x80, 0, table | 0x63, table | 0xE3,
        (a.ram_end + PAGE * rng.randrange(1, 1 << 20)) | 0x63, (1 << 51) | 0x63,
        orig ^ (1 << rng.randrange(64)), orig | (1 << 63), M64, ((orig & ~0xFFF) + PAGE) | 0x63,
        (off & ~0xFFF) | 0x63, rng.getrandbits(64) | 1,
    ])
    inp.patches.append((off, _u(value, 8)))
    inp.what.append("page-table entry")


def m_section(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    off = rng.choice(a.sections)
    orig = _read(rd, off, 8)
    value = rng.choice([
        orig ^ (1 << rng.randrange(7)), orig & ~7, 0, orig + 8 * rng.randrange(-64, 64),
        orig + (1 << 40), orig - a.size_page * rng.randrange(1, 1 << 15), M64,
        0x0000800000000000 | 7, (a.vmemmap + rng.randrange(1 << 30)) | 7, orig ^ (1 << 63),
        orig | 0xFF, rng.getrandbits(64),
    ])
    inp.patches.append((off, _u(value, 8)))
    inp.what.append("mem_section word")


def _page_value(rng: random.Random, a: Anatomy, name: str, orig: int, width: int) -> int:
    n = a.numbers
    mapcounts = [v for k, v in n.items() if k.endswith("MAPCOUNT_VALUE")]
    flags = [1 << v for k, v in n.items() if k.startswith("PG_") and 0 <= v < 64]
    flags += [v for k, v in n.items() if k.endswith("_mask")]
    if name in ("_mapcount", "page_type") and mapcounts and rng.random() < 0.6:
        return rng.choice(mapcounts) & 0xFFFFFFFF
    if name == "private":
        return rng.choice([rng.randrange(13), 11, 12, 63, 64, 255, 1 << 31, (1 << 32) - 1,
                           1 << 63, M64, rng.getrandbits(64)])
    if name == "flags" and flags:
        value = 0
        for _ in range(rng.randint(1, 4)):
            value |= rng.choice(flags)
        return rng.choice([value, orig | value, orig ^ value, M64])
    if name == "compound_head":
        return rng.choice([
            (a.vmemmap + a.size_page * rng.randrange(1 << 16)) | 1,
            (a.vmemmap + rng.randrange(1 << 24)) | 1, rng.getrandbits(64) | 1, orig | 1, 1,
            M64, (a.vmemmap - a.size_page) | 1])
    return _interesting(rng, orig, width, a)


def m_struct_page(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    base = rng.choice(a.struct_pages)
    fields = list(a.page_fields.items())
    count = rng.choice([1, 1, 1, 2, 8, 64, 512]) if a.size_page else 1
    name, foff = rng.choice(fields) if fields else ("raw", rng.randrange(a.size_page))
    width = {"_mapcount": 4, "_refcount": 4, "page_type": 4, "compound_order": 1,
             "compound_dtor": 1}.get(name, 8)
    value = None
    for k in range(count):
        off = base + k * a.size_page + foff
        if value is None or rng.random() < 0.3:
            value = _page_value(rng, a, name, _read(rd, off, width), width)
        inp.patches.append((off, _u(value, width)))
        if name == "_mapcount" and rng.random() < 0.5 and "private" in a.page_fields:
            off2 = base + k * a.size_page + a.page_fields["private"]
            inp.patches.append((off2, _u(_page_value(rng, a, "private", 0, 8), 8)))
    inp.what.append(f"struct page .{name} x{count}")


def m_struct_page_bytes(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    base = rng.choice(a.struct_pages)
    for _ in range(rng.randint(1, 8)):
        inp.patches.append((base + rng.randrange(a.size_page), bytes([rng.randrange(256)])))
    inp.what.append("struct page bytes")


def m_log(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    if not a.log:
        return m_data_bytes(rng, a, rd, inp)
    off, length = rng.choice(a.log)
    where = off + 8 * rng.randrange(max(1, length // 8))
    inp.patches.append((where, _u(_interesting(rng, _read(rd, where, 8), 8, a), 8)))
    inp.what.append("printk ring word")
    return None


def m_data_bytes(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    page = rng.choice(a.data_pages)
    for _ in range(rng.randint(1, 16)):
        inp.patches.append((page + rng.randrange(PAGE), bytes([rng.randrange(256)])))
    inp.what.append("data bytes")


def m_truncate(rng: random.Random, a: Anatomy, rd: Reader, inp: Input) -> None:
    if a.real:  # a real core is too big to copy per input: its truncation is unit-tested
        return m_header_bytes(rng, a, rd, inp)
    choices = [rng.randrange(a.note_off + a.note_space), rng.randrange(a.size),
               a.size - PAGE * rng.randrange(1, 64), rng.choice(a.struct_pages),
               rng.choice(a.ptes) & ~0xFFF]
    inp.truncate = max(0, rng.choice(choices))
    inp.what.append(f"truncate to {inp.truncate:#x}")
    return None


Mutator = Callable[[random.Random, Anatomy, Reader, Input], None]
MUTATORS: list[tuple[Mutator, int]] = [
    (m_header_bytes, 8), (m_ehdr, 5), (m_phdr, 10), (m_note_header, 4), (m_vmcoreinfo, 18),
    (m_pte, 14), (m_section, 10), (m_struct_page, 18), (m_struct_page_bytes, 5), (m_log, 5),
    (m_data_bytes, 5), (m_truncate, 2),
]


def mutate(rng: random.Random, seed: str, a: Anatomy, read: Reader) -> Input:
    """One input: 1..4 mutations of seed ``seed``; ``read(off, n)`` reads its pristine file."""
    inp = Input(seed)
    funcs = [f for f, _ in MUTATORS]
    weights = [w for _, w in MUTATORS]
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        rng.choices(funcs, weights)[0](rng, a, read, inp)
    return inp
