"""ELF core headers, PT_LOAD table and notes of a vmcore; never reads page data.

A small reader of its own (``struct`` over the ELF64 little-endian header, program headers and
PT_NOTE bytes) rather than pyelftools: kdumpd runs in the kdump kernel's ~100 MiB and needs
only the ELF header, PT_LOAD and PT_NOTE, and pyelftools costs ~8 MiB per process for them.
Every field is checked against the file before it is used (a corrupt ``n_descsz`` or
``p_filesz`` on ``/proc/vmcore`` could otherwise read GiBs of old memory), and every failure is
one line that names the file. Layout: the System V ABI's ELF64 ``Elf64_Ehdr``/``Elf64_Phdr``.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from kdumpd.errors import LayoutError, VmcoreError
from kdumpd.units import PhysRange

__all__ = ["CoreHeader", "LoadSegment", "Note", "read_core_header"]

EM_X86_64 = 62
EM_AARCH64 = 183
ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
_ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN"}
_ARCH_NAMES = {EM_X86_64: "x86_64", EM_AARCH64: "aarch64", 3: "i386", 21: "ppc64", 22: "s390x"}

# The kernel's merged PT_NOTE is a few KiB per CPU; a cap keeps a corrupt p_filesz from making
# us read a large part of /proc/vmcore into memory.
MAX_NOTE_BYTES = 64 << 20
MAX_PHNUM = 65535
# Kernel-image virtual addresses on x86_64 start here; PT_LOADs with a p_vaddr at or above it
# describe the kernel text duplicate, not a RAM range.
_X86_64_START_KERNEL_MAP = 0xFFFFFFFF80000000
_ADDR_LIMIT = 1 << 64

# Elf64_Ehdr after e_ident[16]: e_type, e_machine, e_version, e_entry, e_phoff, e_shoff,
# e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
_EHDR = struct.Struct("<HHIQQQIHHHHHH")
_EHDR_SIZE = 16 + _EHDR.size  # 64
# Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
_PHDR = struct.Struct("<IIQQQQQQ")
_PHDR_SIZE = _PHDR.size  # 56
_SHDR_SIZE = 64  # Elf64_Shdr; only sh_info (offset 44) of section 0 is read, for PN_XNUM
_SH_INFO = struct.Struct("<I")
_NHDR = struct.Struct("<III")  # Elf64_Nhdr: n_namesz, n_descsz, n_type


@dataclass(frozen=True, slots=True)
class LoadSegment:
    """One PT_LOAD with the ELF field names kept; ``p_offset`` is a file offset."""

    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int

    @property
    def end_paddr(self) -> int:
        return self.p_paddr + self.p_memsz


@dataclass(frozen=True, slots=True)
class Note:
    """One ELF note: name without the NUL, type, and descriptor bytes."""

    n_name: str
    n_type: int
    n_desc: bytes


@dataclass(frozen=True, slots=True)
class CoreHeader:
    """What the ELF headers of a vmcore say, validated against the file size."""

    arch: str
    loads: tuple[LoadSegment, ...]
    notes: tuple[Note, ...]
    file_size: int

    def find_note(self, name: str, n_type: int | None = None) -> Note | None:
        for note in self.notes:
            if note.n_name == name and (n_type is None or note.n_type == n_type):
                return note
        return None

    def phys_ranges(self) -> list[PhysRange]:
        """RAM as physical ranges -> file offsets, de-duplicated, only bytes the file holds.

        The kernel-text PT_LOAD duplicates part of a RAM PT_LOAD; a range wholly inside another
        is dropped so every physical byte has exactly one file offset. Bytes past ``p_filesz``
        are not in the file and so are not old memory anyone can read or write.
        """
        # Longest first among equal starts, so a duplicate that starts where its RAM range
        # starts (KASLR can put the kernel there) is seen as contained, not as an overlap.
        raw = sorted(
            ((seg.p_paddr, seg.p_paddr + seg.p_filesz, seg.p_offset)
             for seg in self.loads if seg.p_filesz > 0),
            key=lambda t: (t[0], -t[1]),
        )
        out: list[PhysRange] = []
        for start, end, offset in raw:
            if any(r.start_paddr <= start and end <= r.end_paddr for r in out):
                continue
            if out and start < out[-1].end_paddr:
                raise VmcoreError(
                    f"PT_LOADs overlap at physical {start:#x} without one containing the other"
                )
            out.append(PhysRange(start, end, offset))
        return out


def _parse_notes(data: bytes) -> list[Note]:
    # Each note is bounded by the segment's bytes, whatever its n_namesz and n_descsz say.
    notes: list[Note] = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, n_type = _NHDR.unpack_from(data, pos)
        pos += 12
        name_end = pos + namesz
        desc_start = pos + ((namesz + 3) & ~3)
        desc_end = desc_start + descsz
        if desc_end > len(data):
            raise VmcoreError(f"ELF note at byte {pos - 12} overruns its PT_NOTE segment")
        name = data[pos:name_end].split(b"\0", 1)[0].decode("ascii", "replace")
        notes.append(Note(name, n_type, bytes(data[desc_start:desc_end])))
        pos = desc_start + ((descsz + 3) & ~3)
        if namesz == 0 and descsz == 0 and n_type == 0:
            break  # zero padding after the last note
    return notes


def read_core_header(stream: BinaryIO, file_size: int | None = None,
                     name: str | None = None) -> CoreHeader:
    """Parse and validate the ELF core header of ``stream``; raise VmcoreError (LayoutError for
    a well-formed core kdumpd cannot use) whose one line names the file (``name``, else the
    stream's own name)."""
    where = name if name is not None else str(getattr(stream, "name", "vmcore"))
    try:
        if file_size is None:
            file_size = os.fstat(stream.fileno()).st_size
        return _read_core_header(stream, file_size, where)
    except (OSError, io.UnsupportedOperation) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise VmcoreError(f"{where}: cannot read the ELF headers: {why}") from None


def _read_core_header(stream: BinaryIO, file_size: int, where: str) -> CoreHeader:
    def bad(what: str) -> VmcoreError:
        return VmcoreError(f"{where}: {what}")

    if file_size == 0:
        hint = "not a kdump kernel?" if where == "/proc/vmcore" else "not a vmcore"
        raise bad(f"the file is empty (0 bytes): {hint}")
    stream.seek(0)
    head = stream.read(_EHDR_SIZE)
    if len(head) < 4 or head[:4] != b"\x7fELF":
        raise bad("not an ELF file (bad magic)")
    if len(head) < _EHDR_SIZE or file_size < _EHDR_SIZE:
        raise bad(f"ELF header is truncated ({min(len(head), file_size)} of {_EHDR_SIZE} bytes)")
    ei_class, ei_data = head[4], head[5]
    if ei_class == 1:
        raise LayoutError(f"{where}: 32-bit ELF cores are not supported")
    if ei_class != 2:
        raise bad(f"unknown ELF class {ei_class} (corrupt ELF header)")
    if ei_data == 2:
        raise LayoutError(f"{where}: big-endian ELF cores are not supported")
    if ei_data != 1:
        raise bad(f"unknown ELF data encoding {ei_data} (corrupt ELF header)")
    (e_type, e_machine, _version, _entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize,
     e_phnum, _shentsize, e_shnum, _shstrndx) = _EHDR.unpack_from(head, 16)
    if e_type != ET_CORE:
        raise bad(f"ELF type is {_ET_NAMES.get(e_type, e_type)}, not ET_CORE")
    arch = _ARCH_NAMES.get(e_machine, f"e_machine {e_machine}")
    if e_phentsize != _PHDR_SIZE:
        raise bad(f"e_phentsize is {e_phentsize}, not {_PHDR_SIZE} (corrupt ELF header)")
    phnum = e_phnum
    if e_phnum == PN_XNUM:  # the real count is in section header 0's sh_info
        if e_shnum == 0 or e_shoff + _SHDR_SIZE > file_size:
            raise bad("e_phnum is PN_XNUM but section header 0 is missing (corrupt ELF header)")
        stream.seek(e_shoff)
        shdr0 = stream.read(_SHDR_SIZE)
        if len(shdr0) < _SHDR_SIZE:
            raise bad("ELF section header 0 is truncated")
        phnum = _SH_INFO.unpack_from(shdr0, 44)[0]
    if phnum > MAX_PHNUM:
        raise bad(f"ELF header claims {phnum} program headers (at most {MAX_PHNUM})")
    if e_phoff + _PHDR_SIZE * phnum > file_size:
        raise bad("ELF program headers lie outside the file (corrupt or truncated)")
    stream.seek(e_phoff)
    table = stream.read(_PHDR_SIZE * phnum)
    if len(table) < _PHDR_SIZE * phnum:
        raise bad("ELF program headers are truncated")

    loads: list[LoadSegment] = []
    notes: list[Note] = []
    for i, (p_type, _pflags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align) in \
            enumerate(_PHDR.iter_unpack(table)):
        if p_type == PT_LOAD:
            if p_filesz > p_memsz:
                raise bad(f"PT_LOAD at physical {p_paddr:#x} has p_filesz > p_memsz")
            if p_paddr + p_memsz > _ADDR_LIMIT:
                raise bad(f"PT_LOAD at physical {p_paddr:#x} of {p_memsz:#x} bytes wraps past "
                          "the end of the address space")
            if p_offset + p_filesz > file_size:
                raise bad(f"PT_LOAD at physical {p_paddr:#x} ends at byte "
                          f"{p_offset + p_filesz:#x}, past the end of the file "
                          f"({file_size:#x}): truncated vmcore")
            loads.append(LoadSegment(p_offset, p_vaddr, p_paddr, p_filesz, p_memsz))
        elif p_type == PT_NOTE:
            if p_filesz > MAX_NOTE_BYTES:
                raise bad(f"PT_NOTE of {p_filesz} bytes is implausibly large")
            if p_offset + p_filesz > file_size:
                raise bad("PT_NOTE lies beyond the end of the file (truncated?)")
            stream.seek(p_offset)
            blob = stream.read(p_filesz)
            if len(blob) < p_filesz:
                raise bad(f"PT_NOTE (program header {i}) is truncated")
            try:
                notes += _parse_notes(blob)
            except VmcoreError as exc:
                raise bad(str(exc)) from None
    if not loads:
        raise bad("no PT_LOAD segments: nothing of the old memory is in this file")
    return CoreHeader(arch=arch, loads=tuple(loads), notes=tuple(notes), file_size=file_size)


def kernel_text_loads(loads: Sequence[LoadSegment]) -> list[LoadSegment]:
    """PT_LOADs that map the x86_64 kernel image (their p_vaddr is a kernel-image address)."""
    return [s for s in loads if s.p_vaddr >= _X86_64_START_KERNEL_MAP]
