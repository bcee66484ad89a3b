"""Memory the capture kernel itself owns, and persistent memory, from its /proc/iomem.

Pure parsing of /proc/iomem and /proc/cmdline text into physical ranges that must never be in
a plan: the capture kernel's own RAM (crashkernel ranges), the elfcorehdr, and anything the
firmware calls persistent memory (pmem onlined as "System RAM (kmem)" in the old kernel still
shows up as "Persistent Memory" here, and its contents outlive the reboot).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["ForbiddenRange", "HostFacts", "parse_host_facts"]

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


@dataclass(frozen=True, slots=True)
class HostFacts:
    forbidden: tuple[ForbiddenRange, ...] = ()
    source: str = "none"
    notes: list[str] = field(default_factory=list)


def _is_own_ram(name: str, depth: int) -> bool:
    return depth == 0 and name.startswith("System RAM")


def _is_pmem(name: str) -> bool:
    lowered = name.lower()
    return "persistent memory" in lowered or "(kmem)" in lowered or lowered.startswith("pmem")


def parse_host_facts(iomem: str, cmdline: str, source: str = "/proc") -> HostFacts:
    """Ranges kdumpd must never plan, from the capture kernel's iomem and cmdline."""
    out: list[ForbiddenRange] = []
    for line in iomem.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        start, end, name = int(m.group(2), 16), int(m.group(3), 16) + 1, m.group(4).strip()
        if start == 0 and end == 1:
            continue  # unprivileged readers see zeros: nothing to learn
        if _is_own_ram(name, depth):
            out.append(ForbiddenRange(start, end, "the capture kernel's own RAM"))
        elif name.startswith("Crash kernel"):
            out.append(ForbiddenRange(start, end, "crashkernel reservation"))
        elif _is_pmem(name):
            out.append(ForbiddenRange(start, end, f"persistent memory ({name})"))
    m = _ELFCOREHDR.search(cmdline)
    if m:
        addr = int(m.group(1), 0)
        out.append(ForbiddenRange(addr, addr + ELFCOREHDR_GUARD, "elfcorehdr"))
    return HostFacts(tuple(sorted(out, key=lambda r: r.start_paddr)), source)
