"""The crashed kernel's printk log, straight from a vmcore: the one entry point for callers.

``dmesg`` reads the ring buffer through a virtual address space; this module builds that
space (the translator over the vmcore's physical memory) so the CLI's ``dmesg`` and the
safety gate's rule 1 read the log the same way without going through the planner.
"""

from __future__ import annotations

from kdumpd.crash.dmesg import LogRecord, read_log
from kdumpd.vmcore.core import Vmcore
from kdumpd.xlat import make_translator
from kdumpd.xlat.vmem import VirtMem

__all__ = ["read_crash_log"]


def read_crash_log(vm: Vmcore) -> list[LogRecord]:
    """The crashed kernel's printk log (both ring formats), oldest record first."""
    xlat = make_translator(vm.header.arch, vm.info, vm.header.loads, vm.phys.read_u64)
    return read_log(vm.info, VirtMem(xlat, vm.phys))
