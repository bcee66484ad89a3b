"""The crashed kernel's own count of free pages: sum of zone->vm_stat[NR_FREE_PAGES].

Why: a second, independent witness for the classifier. The buddy allocator counts its free
pages in every zone's vm_stat; if kdumpd's struct page layout is right, the pages it calls
free add up to that number (exactly, on every real vmcore tried: the crash path folds the
per-cpu deltas). VMCOREINFO exports what is needed on 6.1 and 6.12 (node_data or
contig_page_data, pglist_data.node_zones/nr_zones, SIZE(zone), zone.vm_stat, NR_FREE_PAGES).
"""

from __future__ import annotations

from collections.abc import Callable

from kdumpd.errors import KdumpdError
from kdumpd.vmcore.vmcoreinfo import VmcoreInfo

__all__ = ["free_pages_counter"]

_MAX_ZONES = 8  # MAX_NR_ZONES is at most 6 on any kernel kdumpd knows


def free_pages_counter(info: VmcoreInfo, read_u64: Callable[[int], int]) -> int | None:
    """The kernel's NR_FREE_PAGES summed over the zones of every online node, or None when
    VMCOREINFO lacks a key or the structures do not read (then nothing is compared)."""
    need = [("OFFSET", "pglist_data.node_zones"), ("OFFSET", "pglist_data.nr_zones"),
            ("SIZE", "zone"), ("OFFSET", "zone.vm_stat"), ("NUMBER", "NR_FREE_PAGES")]
    if not all(info.has(kind, name) for kind, name in need):
        return None
    try:
        nodes = _nodes(info, read_u64)
        zones_off = info.offset("pglist_data.node_zones")
        nr_off = info.offset("pglist_data.nr_zones")
        size_zone = info.size("zone")
        stat = info.offset("zone.vm_stat") + 8 * info.number("NR_FREE_PAGES")
        total = 0
        for pgdat in nodes:
            nr_zones = read_u64(pgdat + nr_off) & 0xFFFFFFFF
            if nr_zones > _MAX_ZONES:
                return None
            for z in range(nr_zones):
                value = read_u64(pgdat + zones_off + z * size_zone + stat)
                total += max(value - (1 << 64) if value >> 63 else value, 0)
    except (KdumpdError, ValueError, OSError):
        return None
    return total


def _nodes(info: VmcoreInfo, read_u64: Callable[[int], int]) -> list[int]:
    """Addresses of the online nodes' pglist_data."""
    if "contig_page_data" in info.symbols:  # !CONFIG_NUMA
        return [info.symbol("contig_page_data")]
    base = info.symbol("node_data")
    count = min(info.lengths.get("node_data", 1), 1 << 10)
    online = info.symbols.get("node_online_map")
    out = []
    for word_nr in range(-(-count // 64)):
        word = read_u64(online + 8 * word_nr) if online is not None else (1 << 64) - 1
        for bit in range(64):
            nid = word_nr * 64 + bit
            if nid < count and (word >> bit) & 1:
                pgdat = read_u64(base + 8 * nid)
                if pgdat:
                    out.append(pgdat)
    return out
