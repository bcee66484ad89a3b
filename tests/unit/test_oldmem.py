"""Old-memory backends: physical -> file offset mapping, the guard, the image's fault injection,
and the writable-/proc/vmcore probe. (/dev/mem has its own file: test_oldmem_devmem.py.)"""

from __future__ import annotations

import os
import random

import pytest

from kdumpd.errors import BackendError, RefusedError
from kdumpd.oldmem.base import Guarded, RangeMap, drop_contained, identity_ranges
from kdumpd.oldmem.image import ImageOldMem
from kdumpd.oldmem.vmcore_rw import VmcoreRW
from kdumpd.units import PAGE_SIZE, Extent, PhysRange

# Two ranges, out of address order in the file, neither at offset == address.
R_LOW = PhysRange(0x10_0000, 0x10_4000, 0x5000)
R_HIGH = PhysRange(0x20_0000, 0x20_2000, 0x1000)
FILE_SIZE = 0x9000


class Recorder:
    """A backend that records every call: proves the guard refused *before* touching it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def pread(self, paddr: int, nbytes: int) -> bytes:
        self.calls.append(("pread", paddr))
        return bytes(nbytes)

    def preadinto(self, paddr: int, buf: memoryview) -> None:
        self.calls.append(("preadinto", paddr))

    def pwrite(self, paddr: int, data: bytes | bytearray | memoryview) -> None:
        self.calls.append(("pwrite", paddr))

    def flush(self) -> None:
        self.calls.append(("flush", 0))

    def close(self) -> None:
        self.calls.append(("close", 0))


@pytest.fixture
def image(tmp_path):
    img = ImageOldMem.create(tmp_path / "core", FILE_SIZE, [R_HIGH, R_LOW])
    yield img
    img.close()


def file_bytes(img: ImageOldMem, offset: int, nbytes: int) -> bytes:
    img.flush()
    with open(img.path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


# -- RangeMap ------------------------------------------------------------------------------


def test_rangemap_maps_through_p_offset_not_identity() -> None:
    rm = RangeMap([R_HIGH, R_LOW])
    assert rm.translate(0x10_0000, 16) == 0x5000
    assert rm.translate(0x10_1234, 16) == 0x6234
    assert rm.translate(0x20_1000, PAGE_SIZE) == 0x2000
    assert rm.translate(0x10_3ff8, 16) == -1  # runs past the range end
    assert rm.translate(0xF_FFFF, 1) == -1
    assert list(rm.iter_pieces(0x20_0ff0, 0x20)) == [(0x1FF0, 0x20)]


def test_rangemap_refuses_holes_and_overlaps() -> None:
    rm = RangeMap([R_LOW, R_HIGH])
    with pytest.raises(BackendError, match="0x104000"):
        list(rm.iter_pieces(0x10_3000, 0x2000))
    with pytest.raises(BackendError, match="overlap"):
        RangeMap([R_LOW, PhysRange(0x10_3000, 0x10_8000, 0x9000)])
    with pytest.raises(BackendError):
        RangeMap([])


def test_rangemap_splits_touching_ranges_with_different_offsets() -> None:
    rm = RangeMap([PhysRange(0, 0x2000, 0x8000), PhysRange(0x2000, 0x3000, 0x1000)])
    assert rm.translate(0x1800, 0x1000) == -1
    assert list(rm.iter_pieces(0x1800, 0x1000)) == [(0x9800, 0x800), (0x1000, 0x800)]


def test_drop_contained_keeps_ram_and_refuses_partial_overlap() -> None:
    ram = PhysRange(0x0, 0x100_0000, 0x1000)
    text = PhysRange(0x20_0000, 0x40_0000, 0x200_0000)  # the kernel-text PT_LOAD of an ELF dump
    assert drop_contained([text, ram]) == [ram]
    with pytest.raises(BackendError, match="partially"):
        drop_contained([ram, PhysRange(0xF0_0000, 0x110_0000, 0)])


def test_identity_ranges_coalesce() -> None:
    assert identity_ranges([Extent(2, 4), Extent(0, 2), Extent(9, 10)]) == [
        PhysRange(0, 0x4000, 0), PhysRange(0x9000, 0xA000, 0x9000)]


# -- Guarded -------------------------------------------------------------------------------


def test_guard_refuses_write_outside_extents_before_touching_backend() -> None:
    rec = Recorder()
    g = Guarded(rec, [Extent(0x100, 0x102), Extent(0x200, 0x201)])
    for paddr, nbytes in [
        (0xFF000, 1),  # just before
        (0x101000, 0x1001),  # runs one byte past the end
        (0x102000, 1),  # just after
        (0x101FFF, 0x2000),  # starts inside, ends in the hole
        (0x1FF000, 0x2000),  # starts in the hole, ends inside
        (-1, 1),
    ]:
        with pytest.raises(RefusedError, match="outside the granted extents"):
            g.pwrite(paddr, bytes(nbytes))
        with pytest.raises(RefusedError):
            g.preadinto(paddr, memoryview(bytearray(nbytes)))
        with pytest.raises(RefusedError):
            g.pread(paddr, nbytes)
    assert rec.calls == []
    g.pwrite(0x100000, bytes(0x2000))  # exactly the first extent
    g.pwrite(0x200FFF, b"x")  # last byte of the second
    assert rec.calls == [("pwrite", 0x100000), ("pwrite", 0x200FFF)]


def test_guard_allows_touching_extents_as_one() -> None:
    rec = Recorder()
    g = Guarded(rec, [Extent(0x10, 0x11), Extent(0x11, 0x12)])
    g.pwrite(0x10800, bytes(PAGE_SIZE))
    assert rec.calls == [("pwrite", 0x10800)]


def test_guard_refuses_empty_plan() -> None:
    with pytest.raises(RefusedError):
        Guarded(Recorder(), [])


# -- ImageOldMem ---------------------------------------------------------------------------


def test_image_write_lands_at_p_offset(image) -> None:
    image.pwrite(0x20_0010, b"HIGH")
    image.pwrite(0x10_3FFC, b"LOW!")
    assert file_bytes(image, 0x1010, 4) == b"HIGH"
    assert file_bytes(image, 0x8FFC, 4) == b"LOW!"
    assert image.pread(0x20_0010, 4) == b"HIGH"
    buf = bytearray(4)
    image.preadinto(0x10_3FFC, memoryview(buf))
    assert buf == b"LOW!"


def test_image_refuses_unmapped_addresses(image) -> None:
    with pytest.raises(BackendError):
        image.pwrite(0x10_4000, b"x")
    with pytest.raises(BackendError):
        image.pread(0x1F_FFFF, 2)


def test_image_refuses_ranges_beyond_the_file(tmp_path) -> None:
    (tmp_path / "small").write_bytes(bytes(0x1000))
    with pytest.raises(BackendError, match="reach"):
        ImageOldMem(tmp_path / "small", [PhysRange(0, 0x2000, 0)])


def test_image_read_only_refuses_writes(tmp_path) -> None:
    (tmp_path / "ro").write_bytes(bytes(0x2000))
    img = ImageOldMem(tmp_path / "ro", writable=False)
    assert img.pread(0, 4) == bytes(4)
    with pytest.raises(BackendError, match="read-only"):
        img.pwrite(0, b"x")
    img.close()


def test_flip_bits_flips_exactly_n_distinct_bits(image) -> None:
    before = image.pread(0x10_1000, PAGE_SIZE)
    bits = image.flip_bits(0x10_1000, 5, rng=random.Random(1))
    after = image.pread(0x10_1000, PAGE_SIZE)
    diff = int.from_bytes(before, "little") ^ int.from_bytes(after, "little")
    assert bin(diff).count("1") == 5
    assert sorted(bits) == [i for i in range(PAGE_SIZE * 8) if diff >> i & 1]


def test_burst_pattern_and_random_cover_only_mapped_bytes(image) -> None:
    image.burst(0x10_3FF0, 0x20, b"\xab")  # the second half falls in no range: skipped
    assert image.pread(0x10_3FF0, 0x10) == b"\xab" * 0x10
    image.burst(0x20_0000, 0x2000, rng=random.Random(7))
    assert image.pread(0x20_0000, 0x2000) == random.Random(7).randbytes(0x2000)


def test_lose_writes_drops_only_the_overlap(image) -> None:
    image.pwrite(0x10_0000, b"a" * 0x30)
    image.lose_writes(0x10_0010, 0x10_0020)
    image.pwrite(0x10_0000, b"b" * 0x30)
    assert image.pread(0x10_0000, 0x30) == b"b" * 0x10 + b"a" * 0x10 + b"b" * 0x10
    image.clear_faults()
    image.pwrite(0x10_0000, b"c" * 0x30)
    assert image.pread(0x10_0000, 0x30) == b"c" * 0x30


def test_fault_injection_bypasses_the_guard(image) -> None:
    g = Guarded(image, [Extent(0x100, 0x101)])
    image.burst(0x20_0000, 16, b"\x01")  # outside the extents: a device does not ask
    assert image.pread(0x20_0000, 16) == b"\x01" * 16
    with pytest.raises(RefusedError):
        g.pwrite(0x20_0000, b"x")


# -- VmcoreRW ------------------------------------------------------------------------------


def test_vmcore_rw_probe_and_offsets_on_a_writable_file(tmp_path) -> None:
    path = tmp_path / "vmcore"
    path.write_bytes(os.urandom(FILE_SIZE))
    before = path.read_bytes()
    v = VmcoreRW([R_LOW, R_HIGH], probe_paddr=0x10_1000, path=str(path))
    assert path.read_bytes() == before  # the probe wrote the page's own bytes back
    v.pwrite(0x20_1FFE, b"ok")
    assert v.pread(0x20_1FFE, 2) == b"ok"
    assert path.read_bytes()[0x2FFE:0x3000] == b"ok"
    buf = bytearray(0x10)
    v.preadinto(0x10_0000, memoryview(buf))
    assert buf == before[0x5000:0x5010]
    with pytest.raises(BackendError):
        v.pwrite(0x10_4000, b"x")
    v.flush()
    v.close()


def test_vmcore_rw_unsupported_when_writes_fail() -> None:
    # /dev/full reads zeros and fails every write with ENOSPC, like a read-only /proc/vmcore.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(BackendError, match="writable /proc/vmcore not supported"):
        VmcoreRW([PhysRange(0, 0x10000, 0)], probe_paddr=0, path="/dev/full")


def test_vmcore_rw_unsupported_when_absent(tmp_path) -> None:
    with pytest.raises(BackendError, match="writable /proc/vmcore not supported"):
        VmcoreRW([R_LOW], probe_paddr=0x10_0000, path=str(tmp_path / "missing"))


def test_vmcore_rw_probe_address_must_be_mapped(tmp_path) -> None:
    path = tmp_path / "vmcore"
    path.write_bytes(bytes(FILE_SIZE))
    with pytest.raises(BackendError, match="probe address"):
        VmcoreRW([R_LOW], probe_paddr=0x50_0000, path=str(path))


def test_write_across_a_range_end_writes_nothing(image, tmp_path) -> None:
    image.pwrite(0x10_3FF0, b"a" * 0x10)
    with pytest.raises(BackendError):
        image.pwrite(0x10_3FF0, b"b" * 0x20)  # the second half is in no range
    assert image.pread(0x10_3FF0, 0x10) == b"a" * 0x10
    path = tmp_path / "vmcore"
    path.write_bytes(bytes(FILE_SIZE))
    v = VmcoreRW([R_LOW], probe_paddr=0x10_0000, path=str(path))
    with pytest.raises(BackendError):
        v.pwrite(0x10_3FF0, b"b" * 0x20)
    assert v.pread(0x10_3FF0, 0x10) == bytes(0x10)
    v.close()
