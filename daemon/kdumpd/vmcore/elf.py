"""ELF core headers, PT_LOAD table and notes of a vmcore; never reads page data.

pyelftools parses the ELF and program headers. Notes are parsed here from the PT_NOTE bytes,
bounded by the segment: pyelftools' ``iter_notes`` trusts ``n_descsz`` and would read as much of
the file as a corrupt header asks for, which on ``/proc/vmcore`` can be GiBs of old memory.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from kdumpd.errors import LayoutError, VmcoreError
from kdumpd.units import PhysRange

__all__ = ["CoreHeader", "LoadSegment", "Note", "read_core_header"]

EM_X86_64 = 62
EM_AARCH64 = 183
_ARCH_NAMES = {EM_X86_64: "x86_64", EM_AARCH64: "aarch64", 3: "i386", 21: "ppc64", 22: "s390x"}

# The kernel's merged PT_NOTE is a few KiB per CPU; a cap keeps a corrupt p_filesz from making
# us read a large part of /proc/vmcore into memory.
MAX_NOTE_BYTES = 64 << 20
MAX_PHNUM = 65535
# Kernel-image virtual addresses on x86_64 start here; PT_LOADs with a p_vaddr at or above it
# describe the kernel text duplicate, not a RAM range.
_X86_64_START_KERNEL_MAP = 0xFFFFFFFF80000000


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


def _parse_notes(data: bytes, byteorder: str) -> list[Note]:
    fmt = "<III" if byteorder == "little" else ">III"
    notes: list[Note] = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, n_type = struct.unpack_from(fmt, data, pos)
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


def read_core_header(stream: BinaryIO, file_size: int | None = None) -> CoreHeader:
    """Parse and validate the ELF core header of ``stream``; raise VmcoreError if unusable."""
    if file_size is None:
        file_size = os.fstat(stream.fileno()).st_size
    try:
        head = stream.read(64)
        stream.seek(0)
        if len(head) < 16 or head[:4] != b"\x7fELF":
            raise VmcoreError("not an ELF file (bad magic)")
        elf = ELFFile(stream)
        if elf["e_type"] != "ET_CORE":
            raise VmcoreError(f"ELF type is {elf['e_type']}, not ET_CORE")
        if elf.elfclass != 64:
            raise LayoutError("32-bit ELF cores are not supported")
        machine = elf["e_machine"]
        e_machine = elf.header.e_machine
        arch = _ARCH_NAMES.get(_machine_number(machine, e_machine), str(machine))
        phnum = elf.num_segments()
        if phnum > MAX_PHNUM:
            raise VmcoreError("ELF header claims too many program headers")
        if elf["e_phentsize"] != 56 or elf["e_phoff"] + 56 * phnum > file_size:
            raise VmcoreError("ELF program headers lie outside the file (corrupt or truncated)")
        loads: list[LoadSegment] = []
        note_blobs: list[bytes] = []
        for seg in elf.iter_segments():
            kind = seg["p_type"]
            if kind == "PT_LOAD":
                loads.append(
                    LoadSegment(
                        seg["p_offset"], seg["p_vaddr"], seg["p_paddr"], seg["p_filesz"],
                        seg["p_memsz"],
                    )
                )
            elif kind == "PT_NOTE":
                if seg["p_filesz"] > MAX_NOTE_BYTES:
                    raise VmcoreError(f"PT_NOTE of {seg['p_filesz']} bytes is implausibly large")
                if seg["p_offset"] + seg["p_filesz"] > file_size:
                    raise VmcoreError("PT_NOTE lies beyond the end of the file (truncated?)")
                stream.seek(seg["p_offset"])
                note_blobs.append(stream.read(seg["p_filesz"]))
    except (ELFError, struct.error, ValueError, KeyError, OSError, io.UnsupportedOperation) as exc:
        raise VmcoreError(f"corrupt ELF header: {exc}") from exc
    except EOFError as exc:
        raise VmcoreError("ELF header is truncated") from exc
    except Exception as exc:  # pyelftools' construct raises its own exception types
        if type(exc).__module__.startswith("elftools"):
            raise VmcoreError(f"corrupt ELF header: {exc}") from exc
        raise

    byteorder = "little" if elf.little_endian else "big"
    notes = [n for blob in note_blobs for n in _parse_notes(blob, byteorder)]
    if not loads:
        raise VmcoreError("no PT_LOAD segments: nothing of the old memory is in this file")
    for seg in loads:
        if seg.p_filesz > seg.p_memsz:
            raise VmcoreError(f"PT_LOAD at physical {seg.p_paddr:#x} has p_filesz > p_memsz")
        if seg.p_offset + seg.p_filesz > file_size:
            raise VmcoreError(
                f"PT_LOAD at physical {seg.p_paddr:#x} ends at byte "
                f"{seg.p_offset + seg.p_filesz:#x}, past the end of the file "
                f"({file_size:#x}): truncated vmcore"
            )
    return CoreHeader(arch=arch, loads=tuple(loads), notes=tuple(notes), file_size=file_size)


def _machine_number(machine: object, e_machine: object) -> int:
    # pyelftools gives 'EM_X86_64' for known machines and the raw int for unknown ones.
    names = {"EM_X86_64": EM_X86_64, "EM_AARCH64": EM_AARCH64, "EM_386": 3, "EM_PPC64": 21,
             "EM_S390": 22}
    if isinstance(machine, int):
        return machine
    if isinstance(e_machine, int):
        return e_machine
    return names.get(str(machine), -1)


def kernel_text_loads(loads: Sequence[LoadSegment]) -> list[LoadSegment]:
    """PT_LOADs that map the x86_64 kernel image (their p_vaddr is a kernel-image address)."""
    return [s for s in loads if s.p_vaddr >= _X86_64_START_KERNEL_MAP]
