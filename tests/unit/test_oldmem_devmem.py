"""/dev/mem backend: it refuses outside a kdump kernel, and its windows map the right bytes.

The kdump facts are read from an injected ``proc_root`` and the device from an injected
``dev_path`` (a regular file standing in for /dev/mem); nothing here opens the real /dev/mem.
"""

from __future__ import annotations

import os

import pytest

from kdumpd.errors import BackendError, RefusedError
from kdumpd.oldmem.devmem import (
    DevMem,
    is_kdump_kernel,
    iter_cmdline_params,
    read_kdump_facts,
    system_ram_ranges,
)
from kdumpd.units import PhysRange

KDUMP_CMDLINE = (
    "BOOT_IMAGE=/vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro irqpoll nr_cpus=1 reset_devices "
    "cgroup_disable=memory mce=off numa=off udev.children-max=2 panic=10 "
    "acpi_no_memhotplug transparent_hugepage=never nokaslr hest_disable novmcoredd "
    "cma=0 hugetlb_cma=0 elfcorehdr=0xbf000000 disable_cpu_apicid=0"
)
LIVE_CMDLINE = "BOOT_IMAGE=/vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro crashkernel=256M quiet"
# The kdump kernel's view: only the crashkernel reservation is System RAM.
KDUMP_IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-0009ffff : Reserved
000f0000-000fffff : Reserved
  000f0000-000fffff : System ROM
2b000000-3affffff : System RAM
  39600000-3a5fffff : Kernel code
fec00000-fec003ff : PNP0003:00
"""
OLD_RAM = [PhysRange(0x100000, 0x2B000000, 0x100000)]  # old RAM below the crashkernel


def fake_proc(tmp_path, *, cmdline=KDUMP_CMDLINE, vmcore=True, iomem=KDUMP_IOMEM):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cmdline").write_bytes(cmdline.encode() + b"\n")
    if vmcore:
        (proc / "vmcore").write_bytes(b"\x7fELF")
    if iomem is not None:
        (proc / "iomem").write_text(iomem)
    return str(proc)


def fake_devmem(tmp_path, size=0x2B000000):
    path = tmp_path / "mem"
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: a file standing in for physical memory
    return str(path)


# -- the pure rule -------------------------------------------------------------------------


def test_is_kdump_kernel_needs_both_facts() -> None:
    assert is_kdump_kernel(KDUMP_CMDLINE, True)
    assert not is_kdump_kernel(KDUMP_CMDLINE, False)
    assert not is_kdump_kernel(LIVE_CMDLINE, True)
    assert not is_kdump_kernel(LIVE_CMDLINE, False)
    assert not is_kdump_kernel("", True)


@pytest.mark.parametrize(
    "cmdline",
    [
        "ro elfcorehdr",  # no value
        "ro elfcorehdr=",  # empty value
        "ro xelfcorehdr=0x1000",  # another parameter's name
        "ro -- elfcorehdr=0x1000",  # after --: the kernel hands it to init
        'ro foo="bar elfcorehdr=0x1000"',  # inside another parameter's quoted value
        "ro elfcorehdr_size=0x1000",
    ],
)
def test_is_kdump_kernel_is_not_fooled(cmdline: str) -> None:
    assert not is_kdump_kernel(cmdline, True)


def test_cmdline_params_follow_the_kernel() -> None:
    assert iter_cmdline_params('a=1  b "c=d e" f= -- g=2') == [
        ("a", "1"), ("b", None), ("c", "d e"), ("f", "")]
    assert is_kdump_kernel("elfcorehdr=1M@0xbf000000\n", True)
    assert is_kdump_kernel('"elfcorehdr=0x1000"', True)


def test_read_kdump_facts(tmp_path) -> None:
    proc = fake_proc(tmp_path)
    cmdline, vmcore = read_kdump_facts(proc)
    assert vmcore and "elfcorehdr=0xbf000000" in cmdline
    cmdline, vmcore = read_kdump_facts(str(tmp_path / "nowhere"))
    assert (cmdline, vmcore) == ("", False)


def test_system_ram_ranges_top_level_only() -> None:
    assert system_ram_ranges(KDUMP_IOMEM) == [(0x1000, 0xA0000 - 0x400), (0x2B000000, 0x3B000000)]


# -- refusals ------------------------------------------------------------------------------


def test_refuses_on_this_live_system_with_defaults() -> None:
    # The real /proc of the machine running the tests: not a kdump kernel.
    cmdline, vmcore = read_kdump_facts()
    if is_kdump_kernel(cmdline, vmcore):
        pytest.skip("the tests are running inside a kdump kernel")
    with pytest.raises(RefusedError, match="not a kdump kernel"):
        DevMem(OLD_RAM)


@pytest.mark.parametrize(
    ("cmdline", "vmcore", "why"),
    [
        (KDUMP_CMDLINE, False, "no /proc/vmcore"),
        (LIVE_CMDLINE, True, "no elfcorehdr="),
        (LIVE_CMDLINE, False, "no /proc/vmcore"),
    ],
)
def test_refuses_outside_kdump_before_opening_the_device(tmp_path, cmdline, vmcore, why) -> None:
    proc = fake_proc(tmp_path, cmdline=cmdline, vmcore=vmcore)
    # dev_path does not exist: a BackendError would mean the device was tried first.
    with pytest.raises(RefusedError, match=why) as exc:
        DevMem(OLD_RAM, proc_root=proc, dev_path=str(tmp_path / "absent"))
    assert "rule:" in str(exc.value)


def test_refuses_ranges_over_the_running_kernels_ram(tmp_path) -> None:
    proc = fake_proc(tmp_path)
    dev = fake_devmem(tmp_path, 0x40000000)
    with pytest.raises(RefusedError, match="System RAM"):
        DevMem([PhysRange(0x3A000000, 0x3C000000, 0x3A000000)], proc_root=proc, dev_path=dev)


def test_refuses_without_readable_iomem_addresses(tmp_path) -> None:
    dev = fake_devmem(tmp_path)
    with pytest.raises(RefusedError, match="iomem"):
        DevMem(OLD_RAM, proc_root=fake_proc(tmp_path, iomem=None), dev_path=dev)
    zeros = "00000000-00000000 : System RAM\n"
    (tmp_path / "proc" / "iomem").write_text(zeros)  # what a non-root reader sees
    with pytest.raises(RefusedError, match="not root"):
        DevMem(OLD_RAM, proc_root=str(tmp_path / "proc"), dev_path=dev)


def test_refuses_non_identity_offsets(tmp_path) -> None:
    with pytest.raises(BackendError, match="identity"):
        DevMem([PhysRange(0x100000, 0x200000, 0x5000)], proc_root=fake_proc(tmp_path),
               dev_path=fake_devmem(tmp_path))


# -- mapping through bounded windows -------------------------------------------------------


def test_windows_read_and_write_the_right_bytes(tmp_path) -> None:
    dev = fake_devmem(tmp_path)
    ranges = [PhysRange(0x100000, 0x400000, 0x100000), PhysRange(0x1000000, 0x1100000, 0x1000000)]
    mem = DevMem(ranges, proc_root=fake_proc(tmp_path), dev_path=dev,
                 window_bytes=0x40000, max_windows=2)
    data = os.urandom(0x50000)
    mem.pwrite(0x13F000, data)  # crosses two window boundaries
    assert mem.pread(0x13F000, len(data)) == data
    mem.pwrite(0x10FFFF0, b"z" * 16)  # last bytes of the second range, another window
    buf = bytearray(16)
    mem.preadinto(0x10FFFF0, memoryview(buf))
    assert buf == b"z" * 16
    assert len(mem._windows) <= 2  # evicted, bounded
    with open(dev, "rb") as f:  # /dev/mem offsets are physical addresses
        f.seek(0x13F000)
        assert f.read(len(data)) == data
    with pytest.raises(BackendError):
        mem.pwrite(0x400000, b"x")  # past the first range: never mapped
    with pytest.raises(BackendError):
        mem.pread(0x3FFFFF, 2)
    mem.flush()
    mem.close()


def test_write_across_a_range_end_writes_nothing(tmp_path) -> None:
    dev = fake_devmem(tmp_path)
    mem = DevMem([PhysRange(0x100000, 0x200000, 0x100000)], proc_root=fake_proc(tmp_path),
                 dev_path=dev, window_bytes=0x10000)
    with pytest.raises(BackendError):
        mem.pwrite(0x1FFFF0, b"b" * 0x20)
    assert mem.pread(0x1FFFF0, 0x10) == bytes(0x10)
    mem.close()


def test_mappable_leaves_out_what_the_kernel_refuses(tmp_path, monkeypatch) -> None:
    """x86 refuses mmap of busy iomem resources (a "RAM buffer" over old RAM in a kdump
    kernel) with EPERM for the whole mapping: the probe bisects down to the page."""
    import mmap as real_mmap

    import kdumpd.oldmem.devmem as devmem_mod

    busy = (0x1234000, 0x1236000)  # two pages inside the first range
    real = real_mmap.mmap
    calls = []

    def fake_mmap(fd, length, *args, offset=0, **kw):  # type: ignore[no-untyped-def]
        calls.append((offset, length))
        if offset < busy[1] and busy[0] < offset + length:
            raise PermissionError(1, "Operation not permitted")
        return real(fd, length, *args, offset=offset, **kw)

    ranges = [PhysRange(0x1000000, 0x1400000, 0x1000000),
              PhysRange(0x2000000, 0x2100000, 0x2000000)]
    mem = DevMem(ranges, proc_root=fake_proc(tmp_path), dev_path=fake_devmem(tmp_path))
    monkeypatch.setattr(devmem_mod.mmap, "mmap", fake_mmap)
    got = mem.mappable(chunk_bytes=0x100000)
    assert got == [(0x1000000, busy[0]), (busy[1], 0x1400000), (0x2000000, 0x2100000)]
    assert len(calls) < 40  # chunks plus a bisection, not a page-by-page walk
    monkeypatch.setattr(devmem_mod.mmap, "mmap", real)
    mem.close()
