"""Open a vmcore: ELF header, VMCOREINFO and a read-only physical-memory view, validated."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kdumpd.errors import LayoutError, VmcoreError
from kdumpd.vmcore.elf import CoreHeader, read_core_header
from kdumpd.vmcore.physmem import PhysMem
from kdumpd.vmcore.vmcoreinfo import VmcoreInfo, parse_vmcoreinfo

__all__ = ["Vmcore", "open_vmcore"]


@dataclass(slots=True)
class Vmcore:
    """An opened vmcore; close it to unmap."""

    path: Path
    header: CoreHeader
    info: VmcoreInfo
    phys: PhysMem

    def close(self) -> None:
        self.phys.close()

    def __enter__(self) -> Vmcore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_vmcore(path: str | os.PathLike[str]) -> Vmcore:
    """Open and validate ``path``; every failure is a one-line VmcoreError/LayoutError."""
    p = Path(path)
    try:
        stream = open(p, "rb")  # noqa: SIM115 - closed below, the mmap outlives it
    except OSError as exc:
        raise VmcoreError(f"cannot open {p}: {exc.strerror}") from None
    with stream:
        size = os.fstat(stream.fileno()).st_size
        header = read_core_header(stream, size, str(p))  # an empty file is said so there
        note = header.find_note("VMCOREINFO", 0) or header.find_note("VMCOREINFO")
        if note is None:
            raise VmcoreError(f"{p} has no VMCOREINFO note")
        info = parse_vmcoreinfo(note.n_desc)
        if header.arch != "x86_64":
            raise LayoutError(f"architecture {header.arch} is not supported (x86_64 only for now)")
        if info.page_size != 4096:
            raise LayoutError(f"PAGESIZE={info.page_size} is not supported (4096 only)")
        ranges = header.phys_ranges()
        try:
            phys = PhysMem.open(stream.fileno(), size, ranges)
        except (OSError, ValueError) as exc:
            raise VmcoreError(f"cannot map {p}: {exc}") from None
    return Vmcore(p, header, info, phys)
