"""Where struct page fields lie and the page-flag/page-type constants, from VMCOREINFO.

Layout forks are decided by which keys exist, never by kernel version; each fork names the
kernel commit that made it necessary.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdumpd.errors import LayoutError
from kdumpd.vmcore.vmcoreinfo import VmcoreInfo

__all__ = ["OrderSource", "PageLayout"]


class OrderSource:
    """Where the compound order and hugetlb marker of a folio live (page[1] of the head)."""

    # Since Linux kernel commit d99e3140a4d3 ("mm: turn folio_test_hugetlb into a PageType")
    # (in v6.9): order in folio._flags_1 & 0xff, hugetlb is a page type of the head.
    FLAGS1_MAPCOUNT = "flags_1+hugetlb_mapcount"
    # Since Linux kernel commit 9c5ccf2db04b ("mm: remove HUGETLB_PAGE_DTOR") (in v6.6):
    # order in folio._flags_1 & 0xff, hugetlb is bit PG_hugetlb of folio._flags_1.
    FLAGS1_PG_HUGETLB = "flags_1+PG_hugetlb"
    # v6.3..v6.5: folio._folio_order / folio._folio_dtor (offsets counted from the head page).
    FOLIO_FIELDS = "folio._folio_order/_folio_dtor"
    # v4.16..v6.2: page[1].compound_order / compound_dtor, one byte each.
    PAGE_FIELDS = "page.compound_order/compound_dtor"


@dataclass(frozen=True, slots=True)
class PageLayout:
    """Everything needed to classify one struct page, validated up front."""

    size_page: int
    # Byte offsets in struct page (little-endian u64, except _mapcount: u32).
    off_flags: int
    off_mapping: int
    off_mapcount: int
    off_private: int
    off_compound_head: int
    # Byte offsets of the one-byte compound order and dtor within page[1] of a head
    # (FOLIO_FIELDS and PAGE_FIELDS only, else None).
    off_order: int | None
    off_dtor: int | None
    order_source: str
    pg_lru: int
    pg_private: int
    pg_swapcache: int
    pg_swapbacked: int | None
    pg_head_mask: int
    pg_slab: int | None
    pg_hwpoison: int | None
    pg_hugetlb: int | None
    hugetlb_dtor: int | None
    buddy_value: int
    offline_value: int | None
    hugetlb_value: int | None
    slab_value: int | None
    unaccepted_value: int | None
    max_buddy_order: int  # LENGTH(zone.free_area): valid buddy orders are below it
    page_type_top_byte: bool  # 6.12+ encoding (PGTY_* << 24); informational

    @classmethod
    def from_vmcoreinfo(cls, info: VmcoreInfo) -> PageLayout:
        size_page = info.size("page")
        if not 32 <= size_page <= 512:
            raise LayoutError(f"SIZE(page)={size_page} is implausible")

        # Since Linux kernel commit (v7.1) page.compound_head became page.compound_info.
        if info.has("OFFSET", "page.compound_head"):
            head_off = info.offset("page.compound_head")
        elif info.has("OFFSET", "page.compound_info"):
            head_off = info.offset("page.compound_info")
        else:
            raise LayoutError("VMCOREINFO lacks OFFSET(page.compound_head)")

        if not info.has("NUMBER", "PAGE_BUDDY_MAPCOUNT_VALUE"):
            raise LayoutError("VMCOREINFO lacks NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)")
        buddy_value = info.number("PAGE_BUDDY_MAPCOUNT_VALUE") & 0xFFFFFFFF
        # Since Linux kernel commit 6e292b9be7f4 ("mm: split page_type out from _mapcount")
        # (in v4.18) the buddy marker is ~PG_buddy (or PGTY_buddy << 24 from v6.12); the older
        # -128 marker means a layout this classifier was never checked against.
        if buddy_value == (-128 & 0xFFFFFFFF) or buddy_value == (-2 & 0xFFFFFFFF):
            raise LayoutError(
                "kernels before 4.18 (PAGE_BUDDY_MAPCOUNT_VALUE=-128) are not supported"
            )

        # name -> (width in bytes, offset)
        fields: dict[str, tuple[int, int]] = {
            "flags": (8, info.offset("page.flags")),
            "mapping": (8, info.offset("page.mapping")),
            "_mapcount": (4, info.offset("page._mapcount")),
            "private": (8, info.offset("page.private")),
            "compound_head": (8, head_off),
        }
        hugetlb_value = _opt32(info, "PAGE_HUGETLB_MAPCOUNT_VALUE")
        pg_hugetlb = info.numbers.get("PG_hugetlb")
        hugetlb_dtor = info.numbers.get("HUGETLB_PAGE_DTOR")
        # Offsets below are within page[1] of a compound head.
        if hugetlb_value is not None:
            source = OrderSource.FLAGS1_MAPCOUNT
        elif pg_hugetlb is not None:
            source = OrderSource.FLAGS1_PG_HUGETLB
        elif info.has("OFFSET", "folio._folio_order"):
            # Since Linux kernel commit 1c5509be58f6 ("mm: remove 'First tail page' members
            # from struct page") (in v6.3), the order is a folio field.
            source = OrderSource.FOLIO_FIELDS
            fields["order_byte"] = (1, info.offset("folio._folio_order") - size_page)
            fields["dtor_byte"] = (1, info.offset("folio._folio_dtor") - size_page)
        elif info.has("OFFSET", "page.compound_order"):
            source = OrderSource.PAGE_FIELDS
            fields["order_byte"] = (1, info.offset("page.compound_order"))
            fields["dtor_byte"] = (1, info.offset("page.compound_dtor"))
        else:
            raise LayoutError(
                "VMCOREINFO says nowhere where the compound order lives "
                "(no PAGE_HUGETLB_MAPCOUNT_VALUE, PG_hugetlb, folio._folio_order "
                "or page.compound_order)"
            )
        if source in (OrderSource.FOLIO_FIELDS, OrderSource.PAGE_FIELDS) and hugetlb_dtor is None:
            raise LayoutError("VMCOREINFO lacks NUMBER(HUGETLB_PAGE_DTOR)")
        # compound_dtor is one byte of page[1]: any other value is corruption (found by the
        # fuzzer: 2**64 overflowed the C layout's int64 with an OverflowError).
        if hugetlb_dtor is not None and not 0 <= hugetlb_dtor <= 255:
            raise LayoutError(f"NUMBER(HUGETLB_PAGE_DTOR)={hugetlb_dtor} is not a byte value")
        for name, (width, off) in fields.items():
            if not 0 <= off <= size_page - width:
                raise LayoutError(f"struct page field {name} at offset {off} lies outside "
                                  f"SIZE(page)={size_page}")
        pg_private = info.number("PG_private")
        # Since Linux kernel commit 6326fec1122c ("mm: Use owner_priv bit for PageSwapCache,
        # valid when PageSwapBacked") (in v4.10) PG_swapcache aliases PG_owner_priv_1.
        pg_swapbacked = info.numbers.get("PG_swapbacked")
        if pg_swapbacked is None and info.has("NUMBER", "PG_swapcache"):
            pg_swapbacked = None  # pre-4.10: PG_swapcache is a real bit of its own
        max_order = info.lengths.get("zone.free_area", 11)
        if not 1 <= max_order <= 63:
            raise LayoutError(f"LENGTH(zone.free_area)={max_order} is implausible")
        flag_bits = {
            "PG_lru": info.number("PG_lru"),
            "PG_private": pg_private,
            "PG_swapcache": info.number("PG_swapcache"),
        }
        for name in ("PG_slab", "PG_hwpoison", "PG_hugetlb", "PG_swapbacked"):
            if name in info.numbers:
                flag_bits[name] = info.numbers[name]
        for name, bit in flag_bits.items():
            if not 0 <= bit < 64:
                raise LayoutError(f"NUMBER({name})={bit} is not a bit number")
        return cls(
            size_page=size_page,
            off_flags=fields["flags"][1],
            off_mapping=fields["mapping"][1],
            off_mapcount=fields["_mapcount"][1],
            off_private=fields["private"][1],
            off_compound_head=fields["compound_head"][1],
            off_order=fields["order_byte"][1] if "order_byte" in fields else None,
            off_dtor=fields["dtor_byte"][1] if "dtor_byte" in fields else None,
            order_source=source,
            pg_lru=flag_bits["PG_lru"],
            pg_private=pg_private,
            pg_swapcache=flag_bits["PG_swapcache"],
            pg_swapbacked=pg_swapbacked,
            pg_head_mask=info.number("PG_head_mask"),
            pg_slab=info.numbers.get("PG_slab"),
            pg_hwpoison=info.numbers.get("PG_hwpoison"),
            pg_hugetlb=pg_hugetlb,
            hugetlb_dtor=hugetlb_dtor,
            buddy_value=buddy_value,
            offline_value=_opt32(info, "PAGE_OFFLINE_MAPCOUNT_VALUE"),
            hugetlb_value=hugetlb_value,
            slab_value=_opt32(info, "PAGE_SLAB_MAPCOUNT_VALUE"),
            unaccepted_value=_opt32(info, "PAGE_UNACCEPTED_MAPCOUNT_VALUE"),
            max_buddy_order=max_order,
            page_type_top_byte=(buddy_value & 0x00FFFFFF) == 0,
        )

    def features(self) -> dict[str, object]:
        """What layout was detected, for ``survey`` and the report."""
        return {
            "size_page": self.size_page,
            "compound_order_source": self.order_source,
            "page_type_encoding": "PGTY<<24" if self.page_type_top_byte else "inverted-bits",
            "slab_marker": "page_type" if self.slab_value is not None else "PG_slab",
            "hwpoison_flag": self.pg_hwpoison is not None,
            "offline_type": self.offline_value is not None,
            "unaccepted_type": self.unaccepted_value is not None,
            "buddy_orders": self.max_buddy_order,
        }


def _opt32(info: VmcoreInfo, name: str) -> int | None:
    value = info.numbers.get(name)
    return None if value is None else value & 0xFFFFFFFF
