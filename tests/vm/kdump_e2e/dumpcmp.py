"""Compare two kdump-compressed dumps (makedumpfile -l/-c/-p/-z, not flattened) page by page.

Byte-identical files are identical dumps. Otherwise the headers, the two bitmaps (pfns
present; pfns dumped) and, for every dumped pfn, its page descriptor and its (compressed)
data are compared, and the first differing pfns are named: equal compressed bytes under the
same descriptor flags mean equal page contents, so no decompression is needed.

    python3 dumpcmp.py REFERENCE FINAL     # prints a JSON verdict, exit status 0 if identical
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SIG = b"KDUMP   "
_OFF_TIMESTAMP = 408  # struct timeval in disk_dump_header (after utsname, 8-aligned)
_OFF_BLOCK = 428  # block_size, sub_hdr_size, bitmap_blocks, max_mapnr
_DESC = np.dtype([("offset", "<i8"), ("size", "<u4"), ("flags", "<u4"), ("page_flags", "<u8")])


@dataclass
class Dump:
    path: Path
    block_size: int
    sub_hdr_size: int
    bitmap_blocks: int
    max_mapnr: int
    header: bytes
    present: np.ndarray
    dumped: np.ndarray
    descs: np.ndarray

    @classmethod
    def open(cls, path: Path) -> Dump:
        with open(path, "rb") as fh:
            head = fh.read(4096)
            if head[:8] != _SIG:
                raise ValueError(f"{path} is not a kdump-compressed dump")
            block_size, sub_hdr_size, bitmap_blocks, max_mapnr = struct.unpack_from(
                "<iiII", head, _OFF_BLOCK)
            fh.seek(0)
            header = fh.read(block_size * (1 + sub_hdr_size))
            raw = fh.read(block_size * bitmap_blocks)
            half = len(raw) // 2
            present = np.unpackbits(np.frombuffer(raw[:half], np.uint8),
                                    bitorder="little")[:max_mapnr].astype(bool)
            dumped = np.unpackbits(np.frombuffer(raw[half:], np.uint8),
                                   bitorder="little")[:max_mapnr].astype(bool)
            n = int(dumped.sum())
            descs = np.frombuffer(fh.read(n * _DESC.itemsize), _DESC)
        return cls(path, block_size, sub_hdr_size, bitmap_blocks, max_mapnr, header, present,
                   dumped, descs)

    def page(self, fh: object, i: int) -> bytes:
        d = self.descs[i]
        fh.seek(int(d["offset"]))  # type: ignore[attr-defined]
        return fh.read(int(d["size"]))  # type: ignore[attr-defined,no-any-return]


def compare(ref_path: Path, final_path: Path, limit: int = 10) -> dict[str, object]:
    """A JSON-able verdict: identical, pages compared, and where they differ."""
    ref, fin = Dump.open(ref_path), Dump.open(final_path)
    out: dict[str, object] = {
        "reference": str(ref_path), "final": str(final_path),
        "reference_bytes": ref_path.stat().st_size, "final_bytes": final_path.stat().st_size,
        "pages_dumped": int(ref.dumped.sum()), "max_mapnr": ref.max_mapnr,
    }
    if ref_path.stat().st_size == final_path.stat().st_size and _same_bytes(ref_path,
                                                                              final_path):
        out.update(identical=True, byte_identical=True, pages_compared=int(ref.dumped.sum()),
                   differing_pfns=[])
        return out
    problems = []
    hdr_ref = ref.header[:_OFF_TIMESTAMP] + ref.header[_OFF_TIMESTAMP + 16:]
    hdr_fin = fin.header[:_OFF_TIMESTAMP] + fin.header[_OFF_TIMESTAMP + 16:]
    if hdr_ref != hdr_fin:
        problems.append("headers differ (other than the timestamp)")
    if ref.max_mapnr != fin.max_mapnr or not np.array_equal(ref.present, fin.present):
        problems.append("different pfns present")
    differing: list[int] = []
    if not np.array_equal(ref.dumped, fin.dumped):
        only = np.flatnonzero(ref.dumped[: fin.max_mapnr] != fin.dumped[: ref.max_mapnr])
        problems.append(f"{len(only)} pfns dumped in one dump only")
        differing.extend(int(p) for p in only[:limit])
        compared = 0
    else:
        pfns = np.flatnonzero(ref.dumped)
        same_desc = (ref.descs["size"] == fin.descs["size"]) & (
            ref.descs["flags"] == fin.descs["flags"])
        compared = len(pfns)
        with open(ref_path, "rb") as a, open(final_path, "rb") as b:
            for i in range(len(pfns)):
                if not same_desc[i] or ref.page(a, i) != fin.page(b, i):
                    differing.append(int(pfns[i]))
        if differing:
            problems.append(f"{len(differing)} dumped pages differ")
    out.update(identical=not problems, byte_identical=False, pages_compared=compared,
               differing_pfns=[hex(p) for p in differing[:limit]], problems=problems)
    return out


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    verdict = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps(verdict, indent=2))
    sys.exit(0 if verdict["identical"] else 1)
