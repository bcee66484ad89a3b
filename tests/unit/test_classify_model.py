"""The C classifier against its model (the numpy classifier it replaced), on random pages.

Random struct pages are biased towards what the rules look at (page-type markers, heads with
aligned and unaligned orders, tails, PG_hwpoison inside ranges, orders past the chunk end) and
streamed in chunks of random length, with pfns left unexamined and gaps skipped, so ranges
carry across several chunks and poisoned carried ranges are retracted. Every chunk's classes,
poisoned pages and retractions must be identical.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from tests.synth.builder import layout_variant, template
from tests.synth.refclassify import RefClassifier

from kdumpd.errors import LayoutError
from kdumpd.mm.classify import Classifier, PageClass
from kdumpd.mm.pagelayout import OrderSource, PageLayout
from kdumpd.vmcore.vmcoreinfo import parse_vmcoreinfo

LAYOUTS = ["6.1", "6.12", "folio-6.3", "pg_hugetlb-6.6", "unaccepted-6.16"]


def _layout(name: str) -> PageLayout:
    info = template(name) if name in ("6.1", "6.12") else layout_variant("6.1", name)
    text = "".join(f"{k}={v}\n" for k, v in info.items())
    return PageLayout.from_vmcoreinfo(parse_vmcoreinfo(text.encode()))


def _random_pages(lay: PageLayout, n: int, rng: random.Random) -> bytearray:
    raw = bytearray(n * lay.size_page)
    bits = [b for b in (lay.pg_lru, lay.pg_private, lay.pg_swapcache, lay.pg_swapbacked,
                        lay.pg_slab, lay.pg_hugetlb) if b is not None]
    # (marker, weight): unaccepted blocks cover 2**(max order - 1) pages, so they are rare
    markers = [(v, w) for v, w in ((lay.buddy_value, 30), (lay.offline_value, 6),
                                   (lay.hugetlb_value, 6), (lay.slab_value, 6),
                                   (lay.unaccepted_value, 1), (0xFFFFFFFF, 150))
               if v is not None]
    values, weights = [v for v, _ in markers], [w for _, w in markers]
    head_mask = lay.pg_head_mask
    for i in range(n):
        off = i * lay.size_page
        flags = 0
        for b in bits:
            if rng.random() < 0.15:
                flags |= 1 << b
        if lay.pg_hwpoison is not None and rng.random() < 0.01:
            flags |= 1 << lay.pg_hwpoison
        if rng.random() < 0.12:
            flags |= head_mask
        if rng.random() < 0.3:  # page[1] of a head: the order in the low byte
            flags = (flags & ~0xFF) | rng.choice([1, 2, 3, 9, rng.randrange(256)])
        if rng.random() < 0.02:
            flags |= rng.getrandbits(64)
        mapcount = (rng.choices(values, weights)[0] if rng.random() < 0.95
                    else rng.getrandbits(32))
        r = rng.random()
        private = (rng.randrange(lay.max_buddy_order + 2) if r < 0.9
                   else rng.getrandbits(64))
        mapping = rng.getrandbits(64) if rng.random() < 0.5 else 0
        head = (0xFFFFEA0000000000 | 1) if rng.random() < 0.1 else 0
        raw[off + lay.off_flags : off + lay.off_flags + 8] = flags.to_bytes(8, "little")
        raw[off + lay.off_mapcount : off + lay.off_mapcount + 4] = mapcount.to_bytes(4, "little")
        raw[off + lay.off_private : off + lay.off_private + 8] = private.to_bytes(8, "little")
        raw[off + lay.off_mapping : off + lay.off_mapping + 8] = mapping.to_bytes(8, "little")
        hoff = lay.off_compound_head
        raw[off + hoff : off + hoff + 8] = head.to_bytes(8, "little")
        if lay.off_order is not None and lay.off_dtor is not None:
            raw[off + lay.off_order] = rng.choice([0, 1, 2, 3, 9, 10, rng.randrange(256)])
            raw[off + lay.off_dtor] = rng.choice([0, 2, lay.hugetlb_dtor or 0])
    return raw


def _put(lay: PageLayout, raw: bytearray, i: int, field: str, value: int) -> None:
    off, width = {"flags": (lay.off_flags, 8), "mapping": (lay.off_mapping, 8),
                  "_mapcount": (lay.off_mapcount, 4), "head": (lay.off_compound_head, 8)}[field]
    base = i * lay.size_page + off
    raw[base : base + width] = value.to_bytes(width, "little")


def _plant_folios(lay: PageLayout, raw: bytearray, pfn: int, rng: random.Random) -> None:
    """A few well-formed order-1/2 folios of each excluded kind (cache, private cache, anon,
    hugetlb), so that every ``*_TAIL`` class is reached on every layout."""
    n = len(raw) // lay.size_page
    for _ in range(rng.randrange(3)):
        order = rng.choice([1, 2])
        i = rng.randrange(n)
        i -= (pfn + i) % (1 << order)
        if i < 0 or i + 1 >= n:
            continue
        kind = rng.choice(["cache", "private", "anon", "hugetlb"])
        flags = lay.pg_head_mask | {"cache": 1 << lay.pg_lru, "anon": 0, "hugetlb": 0,
                                    "private": (1 << lay.pg_lru) | (1 << lay.pg_private)}[kind]
        _put(lay, raw, i, "flags", flags)
        _put(lay, raw, i, "mapping", 0x1001 if kind == "anon" else 0)
        _put(lay, raw, i, "head", 0)
        _put(lay, raw, i, "_mapcount", 0xFFFFFFFF)
        flags1 = 0
        if lay.off_order is not None and lay.off_dtor is not None:
            raw[(i + 1) * lay.size_page + lay.off_order] = order
            hugetlb = lay.hugetlb_dtor if kind == "hugetlb" else 0
            raw[(i + 1) * lay.size_page + lay.off_dtor] = hugetlb or 0
        else:
            flags1 = order
            if kind == "hugetlb" and lay.pg_hugetlb is not None:
                flags1 |= 1 << lay.pg_hugetlb
            if kind == "hugetlb" and lay.hugetlb_value is not None:
                _put(lay, raw, i, "_mapcount", lay.hugetlb_value)
        _put(lay, raw, i + 1, "flags", flags1)


def _stream(lay: PageLayout, rng: random.Random, seen: Counter[int]) -> int:
    """Run one random stream through both classifiers; return the number of retractions."""
    ours, model = Classifier(lay), RefClassifier(lay)
    pfn = rng.choice([0x8000, 0x12345, 0x40001])
    retracts = 0
    for _ in range(80):
        if rng.random() < 0.1:  # a gap, reported as plan.py does
            pfn += rng.randrange(1, 2000)
            ours.skip_to(pfn)
            model.skip_to(pfn)
        n = rng.choice([1, 2, rng.randrange(3, 64), rng.randrange(64, 700)])
        raw = _random_pages(lay, n, rng)
        _plant_folios(lay, raw, pfn, rng)
        examined = np.ones(n, dtype=bool)
        if rng.random() < 0.3:
            a = rng.randrange(n)
            examined[a : a + rng.randrange(1, 50)] = False
        want_cls, want_poisoned, want_retract = model.classify(
            pfn, np.frombuffer(bytes(raw), dtype=model.dtype), examined)
        ex = None if examined.all() and rng.random() < 0.5 else examined.astype(np.uint8).tobytes()
        got = ours.classify(pfn, memoryview(raw), ex)
        assert got.start_pfn == pfn
        assert bytes(got.classes) == want_cls.astype(np.uint8).tobytes(), f"pfn {pfn:#x}"
        assert bytes(got.poisoned) == want_poisoned.astype(np.uint8).tobytes(), f"pfn {pfn:#x}"
        assert got.retract == want_retract
        seen.update(got.classes)
        retracts += len(got.retract)
        pfn += n
    return retracts


@pytest.mark.parametrize("name", LAYOUTS)
def test_c_classifier_matches_its_model(name: str) -> None:
    lay = _layout(name)
    seen: Counter[int] = Counter()
    retracts = sum(_stream(lay, random.Random(f"{name}-{seed}"), seen) for seed in range(8))
    # The random pages must reach every rule, or this test proves little.
    expected = set(PageClass) - {PageClass.NO_MEMMAP}
    if lay.unaccepted_value is None:
        expected.discard(PageClass.UNACCEPTED)
    assert {PageClass(c) for c in seen} >= expected
    assert retracts > 0, "no carried range was found poisoned"


@pytest.mark.parametrize("name", LAYOUTS)
def test_huge_and_unaligned_orders_at_pfn_0(name: str) -> None:
    """Orders 62..255 in page[1] of a head at pfn 0 (aligned to anything) and at pfn 1."""
    lay = _layout(name)
    for order in (1, 9, 61, 62, 63, 64, 200, 255):
        for start in (0, 1):
            raw = bytearray(8 * lay.size_page)
            flags = lay.pg_head_mask | (1 << lay.pg_lru)
            raw[lay.off_flags : lay.off_flags + 8] = flags.to_bytes(8, "little")
            page1 = lay.size_page
            if lay.off_order is not None:
                raw[page1 + lay.off_order] = order
            else:
                raw[page1 + lay.off_flags] = order
            ours, model = Classifier(lay), RefClassifier(lay)
            want = model.classify(start, np.frombuffer(bytes(raw), dtype=model.dtype),
                                  np.ones(8, dtype=bool))
            got = ours.classify(start, raw)
            assert bytes(got.classes) == want[0].tobytes(), (order, start)
            assert (ours._carry.active, ours._carry.end_pfn if ours._carry.active else 0) == (
                (True, start + (1 << order)) if model._carry else (False, 0)), (order, start)


def test_retraction_and_carry_by_hand() -> None:
    """A free block of 1024 pages fed 100 pages at a time, poisoned in its 5th chunk: the
    first four chunks' part is retracted once, and the rest of the block is poisoned."""
    lay = _layout("6.1")
    clf = Classifier(lay)
    pages = bytearray(1100 * lay.size_page)
    pages[lay.off_mapcount : lay.off_mapcount + 4] = lay.buddy_value.to_bytes(4, "little")
    pages[lay.off_private : lay.off_private + 8] = (10).to_bytes(8, "little")
    assert lay.pg_hwpoison is not None
    off = 450 * lay.size_page + lay.off_flags
    pages[off : off + 8] = (1 << lay.pg_hwpoison).to_bytes(8, "little")
    results = [clf.classify(0x10000 + k * 100,
                            memoryview(pages)[k * 100 * lay.size_page :
                                              (k + 1) * 100 * lay.size_page])
               for k in range(11)]
    assert all(set(r.classes) == {PageClass.FREE} for r in results[:10])
    assert results[10].classes[:24] == bytes([PageClass.FREE]) * 24
    assert PageClass.FREE not in results[10].classes[24:]
    assert [r.retract for r in results] == [[]] * 4 + [[(0x10000, 0x10190)]] + [[]] * 6
    assert not any(any(r.poisoned) for r in results[:4])
    assert all(all(r.poisoned) for r in results[4:10]) and all(results[10].poisoned[:24])


def test_order_sources_and_bad_input() -> None:
    assert _layout("6.12").order_source == OrderSource.FLAGS1_MAPCOUNT
    assert _layout("pg_hugetlb-6.6").order_source == OrderSource.FLAGS1_PG_HUGETLB
    assert _layout("folio-6.3").order_source == OrderSource.FOLIO_FIELDS
    assert _layout("6.1").order_source == OrderSource.PAGE_FIELDS
    clf = Classifier(_layout("6.1"))
    with pytest.raises(ValueError):
        clf.classify(0, b"\0" * 65)
    with pytest.raises(ValueError):
        clf.classify(0, b"\0" * 128, b"\1")
    info = template("6.1")
    info["LENGTH(zone.free_area)"] = "64"
    with pytest.raises(LayoutError):
        PageLayout.from_vmcoreinfo(parse_vmcoreinfo(
            "".join(f"{k}={v}\n" for k, v in info.items()).encode()))
