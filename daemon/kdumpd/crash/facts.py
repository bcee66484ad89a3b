"""Facts about how the old kernel died that decide whether its memory may be touched at all.

Pure: log records and ELF notes in, facts out. A fatal machine check means the RAM itself
failed; writing to it again risks touching the failing cells and, through the dump, hiding
the evidence. This module only reports; the safety gate decides.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from kdumpd.crash.dmesg import LogRecord
from kdumpd.vmcore.elf import Note

__all__ = ["CrashFacts", "crash_facts"]

# arch/x86/kernel/cpu/mce/core.c: HW_ERR "[Hardware Error]: ", pr_fmt "mce: ", the panic strings
# of mce_panic()/mce_reign()/mce_timed_out(), and the tolerant-era spelling.
_FATAL_PATTERNS = (
    re.compile(r"Kernel panic - not syncing: .*(Fatal [Mm]achine check|Machine check)"),
    re.compile(r"Kernel panic - not syncing: Timeout: Not all CPUs entered broadcast exception"),
    re.compile(r"mce: \[Hardware Error\]"),
    re.compile(r"\[Hardware Error\]: .*(Machine check|MCE|Uncorrected)", re.IGNORECASE),
)
_ADDR = re.compile(r"\[Hardware Error\]: .*\bADDR ([0-9a-fA-F]+)")
# Notes a crashed kernel (or firmware-assisted dump) may add to say "do not dump/touch": the
# name is matched loosely because no mainline note has this role today.
_NOCOREDUMP_NOTE = re.compile(r"NOCOREDUMP", re.IGNORECASE)
NT_NOCOREDUMP_TYPES = frozenset({0x4E4F4344})  # 'NOCD'


@dataclass(frozen=True, slots=True)
class CrashFacts:
    """What the vmcore says about the crash, with the evidence line for each fact."""

    hardware_error: bool = False
    evidence: str = ""
    error_paddrs: tuple[int, ...] = ()
    nocoredump_note: str | None = None
    panic_line: str | None = None
    log_records: int = 0
    notes: list[str] = field(default_factory=list)


def crash_facts(records: Sequence[LogRecord], notes: Sequence[Note]) -> CrashFacts:
    evidence = ""
    paddrs: list[int] = []
    panic_line = None
    for rec in records:
        for line in rec.text.splitlines():
            if "Kernel panic - not syncing" in line and panic_line is None:
                panic_line = line.strip()
            if not evidence and any(p.search(line) for p in _FATAL_PATTERNS):
                evidence = line.strip()
            m = _ADDR.search(line)
            if m:
                paddrs.append(int(m.group(1), 16))
    nocore = next(
        (n.n_name for n in notes
         if _NOCOREDUMP_NOTE.search(n.n_name) or n.n_type in NT_NOCOREDUMP_TYPES),
        None,
    )
    return CrashFacts(
        hardware_error=bool(evidence),
        evidence=evidence,
        error_paddrs=tuple(sorted(set(paddrs))),
        nocoredump_note=nocore,
        panic_line=panic_line,
        log_records=len(records),
    )
