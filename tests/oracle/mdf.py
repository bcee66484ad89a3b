"""makedumpfile as an oracle: run it and read, page by page, what it excluded.

A kdump-compressed dump (``-l``) carries two bitmaps after its headers: the first marks pfns
present in the vmcore, the second the pfns actually dumped. Excluded = first & ~second. Reading
the bitmaps (not only the printed counts) lets the tests compare single pages.
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

_HDR = struct.Struct("<8si")
# disk_dump_header: signature[8], header_version, new_utsname (6*65), timeval (8-aligned),
# status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr.
_OFF_BLOCK_SIZE = 428


@dataclass(frozen=True)
class MdfResult:
    present: npt.NDArray[np.bool_]
    dumped: npt.NDArray[np.bool_]
    report: dict[str, int]
    version: str

    @property
    def excluded(self) -> npt.NDArray[np.bool_]:
        return self.present & ~self.dumped


def version() -> str:
    out = subprocess.run(["makedumpfile", "-v"], capture_output=True, text=True).stdout
    m = re.search(r"version\s+(\S+)", out)
    return m.group(1) if m else "unknown"


def _parse_report(text: str) -> dict[str, int]:
    names = {
        "Pages filled with zero": "zero",
        "Non-private cache pages": "cache",
        "Private cache pages": "cache_private",
        "User process data pages": "user",
        "Free pages": "free",
        "Hwpoison pages": "hwpoison",
        "Offline pages": "offline",
        "Remaining pages": "remaining",
        "Original pages": "original",
        "Excluded pages": "excluded",
        "Memory Hole": "hole",
        "Total pages": "total",
    }
    out: dict[str, int] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        label, _, value = line.partition(":")
        key = names.get(label.strip())
        if key and value.strip().startswith("0x"):
            out[key] = int(value.split()[0], 16)
    return out


def read_bitmaps(dump: Path) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    with open(dump, "rb") as fh:
        head = fh.read(4096)
        sig, _ver = _HDR.unpack_from(head)
        if sig != b"KDUMP   ":
            raise ValueError(f"{dump} is not a kdump-compressed file")
        block_size, sub_hdr_size, bitmap_blocks, max_mapnr = struct.unpack_from(
            "<iiII", head, _OFF_BLOCK_SIZE
        )
        fh.seek(block_size * (1 + sub_hdr_size))
        raw = fh.read(block_size * bitmap_blocks)
    half = len(raw) // 2
    first = np.unpackbits(np.frombuffer(raw[:half], np.uint8), bitorder="little")[:max_mapnr]
    second = np.unpackbits(np.frombuffer(raw[half:], np.uint8), bitorder="little")[:max_mapnr]
    return first.astype(bool), second.astype(bool)


def run(vmcore: Path, level: int, workdir: Path) -> MdfResult:
    """``makedumpfile -l -d LEVEL`` on ``vmcore``; its bitmaps and its printed report."""
    out = workdir / f"mdf-d{level}.kdump"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        ["makedumpfile", "-l", "-d", str(level), "--message-level", "31", str(vmcore), str(out)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"makedumpfile -d {level} failed: {proc.stderr.strip()[-500:]}")
    present, dumped = read_bitmaps(out)
    out.unlink()
    return MdfResult(present, dumped, _parse_report(proc.stdout + proc.stderr), version())
