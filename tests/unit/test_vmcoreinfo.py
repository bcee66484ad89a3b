"""VMCOREINFO parsing: every key kind (SYMBOL, SIZE, OFFSET, LENGTH, NUMBER in decimal and
hex, negative values) reads right, a missing key is named, and garbage is a VmcoreError."""

from __future__ import annotations

import pytest

from kdumpd.errors import LayoutError, VmcoreError
from kdumpd.vmcore.vmcoreinfo import parse_vmcoreinfo

TEXT = b"""OSRELEASE=6.1.0-56-amd64
PAGESIZE=4096
SYMBOL(init_top_pgt)=ffffffffa5e0a000
SIZE(page)=64
OFFSET(page._mapcount)=48
LENGTH(zone.free_area)=11
NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129
NUMBER(VMALLOC_START)=0xffffc90000000000
NUMBER(phys_base)=-2147483648
KERNELOFFSET=24400000
CRASHTIME=1700000000
\0\0\0"""


def test_parses_every_kind_and_both_number_forms() -> None:
    info = parse_vmcoreinfo(TEXT)
    assert info.osrelease == "6.1.0-56-amd64"
    assert info.page_size == 4096
    assert info.symbol("init_top_pgt") == 0xFFFFFFFFA5E0A000
    assert info.size("page") == 64
    assert info.offset("page._mapcount") == 48
    assert info.length("zone.free_area") == 11
    assert info.number("PAGE_BUDDY_MAPCOUNT_VALUE") == -129
    assert info.number("VMALLOC_START") == 0xFFFFC90000000000
    assert info.number("phys_base") == -(1 << 31)
    assert info.kerneloffset == 0x24400000


def test_missing_key_names_it() -> None:
    info = parse_vmcoreinfo(TEXT)
    with pytest.raises(LayoutError, match=r"VMCOREINFO lacks OFFSET\(page.flags\)"):
        info.offset("page.flags")


@pytest.mark.parametrize(
    "bad",
    [b"SIZE(page)=sixty-four\n", b"OSRELEASE=x\nNUMBER(x)=0xZZ\n", b"garbage line\n", b"\0"],
)
def test_garbage_is_a_vmcore_error(bad: bytes) -> None:
    with pytest.raises(VmcoreError):
        parse_vmcoreinfo(bad)
