"""Memory the capture kernel itself owns, and persistent memory, from its /proc/iomem.

Pure parsing of /proc/iomem and /proc/cmdline text into physical ranges that must never be in
a plan: the capture kernel's own RAM (crashkernel ranges), the elfcorehdr, and anything the
firmware calls persistent memory (pmem onlined as "System RAM (kmem)" in the old kernel still
shows up as "Persistent Memory" here, and its contents outlive the reboot).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ForbiddenRange", "HostFacts", "parse_host_facts", "parse_nfit"]

_LINE = re.compile(r"^(\s*)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)$")
# elfcorehdr=[size@]offset; the header itself is small but we keep a generous guard.
_NUM = r"(?:0x[0-9a-fA-F]+|\d+)"
_ELFCOREHDR = re.compile(rf"(?:^|\s)elfcorehdr=(?:{_NUM}[KkMmGg]?@)?({_NUM})")
ELFCOREHDR_GUARD = 1 << 20


@dataclass(frozen=True, slots=True)
class ForbiddenRange:
    start_paddr: int
    end_paddr: int  # exclusive
    reason: str
    rule: int = 8  # the safety rule (docs/safety.md) that forbids it, named in the plan

    @property
    def key(self) -> str:
        """How the plan's ``withheld`` names what this range took away."""
        return f"rule {self.rule}: {self.reason}"


@dataclass(frozen=True, slots=True)
class HostFacts:
    forbidden: tuple[ForbiddenRange, ...] = ()
    source: str = "none"
    notes: list[str] = field(default_factory=list)
    # Whether the capture kernel's ACPI NFIT tables were read (none found is an answer too):
    # without them persistent memory onlined as kmem cannot be told apart (rule 4).
    nfit_known: bool = False
    # Whether the capture kernel's iomem was read (rule 8).
    iomem_known: bool = True


def _is_own_ram(name: str, depth: int) -> bool:
    return depth == 0 and name.startswith("System RAM")


def _is_pmem(name: str) -> bool:
    lowered = name.lower()
    return "persistent memory" in lowered or "(kmem)" in lowered or lowered.startswith("pmem")


# ACPI 6.x NFIT: 36-byte header, 4 reserved bytes, then structures (u16 type, u16 length).
# Type 0 is the System Physical Address Range: index, flags, reserved, proximity domain, a
# range-type GUID, base, length, mapping attributes.
_NFIT_FIRST = 40
_SPA_TYPE = 0
PMEM_GUID = bytes.fromhex("79d3f066f3b47440ac430d3318b78cdb")  # 66F0D379-B4F3-4074-AC43-...


def parse_nfit(table: bytes) -> list[ForbiddenRange]:
    """Every SPA range of an ACPI NFIT table (firmware's list of NVDIMM-backed memory).

    The capture kernel usually loads no NVDIMM driver, so its iomem does not show persistent
    memory; the firmware table does. Every SPA range is forbidden, persistent or not: they are
    all NVDIMM-backed. A truncated or garbled table raises ValueError (the caller refuses).
    """
    if len(table) < _NFIT_FIRST or table[:4] != b"NFIT":
        raise ValueError("not an ACPI NFIT table")
    length = int.from_bytes(table[4:8], "little")
    if length > len(table) or length < _NFIT_FIRST:
        raise ValueError(f"NFIT says {length} bytes, {len(table)} read")
    out: list[ForbiddenRange] = []
    pos = _NFIT_FIRST
    while pos + 4 <= length:
        kind = int.from_bytes(table[pos : pos + 2], "little")
        size = int.from_bytes(table[pos + 2 : pos + 4], "little")
        if size < 4 or pos + size > length:
            raise ValueError(f"NFIT structure at byte {pos} has bad length {size}")
        if kind == _SPA_TYPE:
            if size < 56:
                raise ValueError(f"NFIT SPA structure at byte {pos} is too short")
            guid = table[pos + 16 : pos + 32]
            base = int.from_bytes(table[pos + 32 : pos + 40], "little")
            span = int.from_bytes(table[pos + 40 : pos + 48], "little")
            what = "persistent memory" if guid == PMEM_GUID else f"NVDIMM range {guid.hex()}"
            if span:
                out.append(ForbiddenRange(base, base + span, f"{what} (ACPI NFIT)", 4))
        pos += size
    return out


def parse_host_facts(
    iomem: str, cmdline: str, source: str = "/proc",
    nfit_tables: Sequence[bytes] | None = None,
) -> HostFacts:
    """Ranges kdumpd must never plan, from the capture kernel's iomem, cmdline and NFIT
    tables (None: not known, as offline without --host-nfit; empty: the host has none).
    An iomem line that is not ``start-end : name`` raises ValueError (the caller refuses)."""
    out: list[ForbiddenRange] = []
    for table in nfit_tables or ():
        out.extend(parse_nfit(table))
    for lineno, line in enumerate(iomem.splitlines(), 1):
        m = _LINE.match(line)
        if not m:
            if not line.strip():
                continue
            # Not /proc/iomem: guessing would plan over memory the capture kernel owns.
            raise ValueError(f"iomem line {lineno} is not 'start-end : name': {line[:60]!r}")
        depth = len(m.group(1)) // 2
        start, end, name = int(m.group(2), 16), int(m.group(3), 16) + 1, m.group(4).strip()
        if start == 0 and end == 1:
            continue  # unprivileged readers see zeros: nothing to learn
        if _is_own_ram(name, depth):
            out.append(ForbiddenRange(start, end, "the capture kernel's own RAM"))
        elif name.startswith("Crash kernel"):
            out.append(ForbiddenRange(start, end, "crashkernel reservation"))
        elif _is_pmem(name):
            out.append(ForbiddenRange(start, end, f"persistent memory ({name})", 4))
    m = _ELFCOREHDR.search(cmdline)
    if m:
        addr = int(m.group(1), 0)
        out.append(ForbiddenRange(addr, addr + ELFCOREHDR_GUARD, "elfcorehdr"))
    return HostFacts(tuple(sorted(out, key=lambda r: r.start_paddr)), source,
                     nfit_known=nfit_tables is not None, iomem_known=bool(iomem.strip()))
