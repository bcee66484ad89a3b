"""The pipeline vmcore -> xlat -> mm -> extents, producing a frozen, JSON-serialisable Plan.

This is the only module that sees the vmcore, the translator and the classifier together. It
streams the struct page array one memory section at a time, so memory stays flat whatever the
size of the crashed machine: ``classified_chunks`` is that stream (struct pages read and
classified, one chunk per section piece) and ``make_plan`` folds it into extents and counts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kdumpd.errors import LayoutError, TranslationError
from kdumpd.mm import native
from kdumpd.mm.classify import MDF_CATEGORIES, ChunkResult, Classifier, PageClass
from kdumpd.mm.extents import ExtentBuilder
from kdumpd.mm.memmap import MemSections, Section
from kdumpd.mm.pagelayout import PageLayout
from kdumpd.mm.plausible import KERNEL_PROBE_PAGES, Evidence, check
from kdumpd.mm.policy import ReusePolicy
from kdumpd.mm.zones import free_pages_counter
from kdumpd.units import PAGE_SHIFT, PAGE_SIZE, Extent
from kdumpd.vmcore.core import Vmcore
from kdumpd.vmcore.elf import kernel_text_loads
from kdumpd.xlat import Translator, make_translator

__all__ = ["Chunk", "Plan", "Progress", "classified_chunks", "make_plan"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Plan:
    """What kdumpd may reuse, and why: the contract between planning and the block store."""

    osrelease: str
    arch: str
    dump_level: int
    extents: tuple[Extent, ...]
    class_pages: dict[str, int]
    categories: dict[str, int | None]
    total_pages: int
    features: dict[str, Any] = field(default_factory=dict)
    # What a safety rule took away from the plan: key -> why, and key -> pages it took
    # (for a withheld class: that class's pages; for a rule cutting ranges: the pages it
    # removed from the plan that the rules before it had left).
    withheld: dict[str, str] = field(default_factory=dict)
    withheld_pages: dict[str, int] = field(default_factory=dict)

    @property
    def reusable_pages(self) -> int:
        return sum(e.npages for e in self.extents)

    @property
    def reusable_bytes(self) -> int:
        return self.reusable_pages * PAGE_SIZE

    def to_json(self) -> dict[str, Any]:
        return {
            "osrelease": self.osrelease,
            "arch": self.arch,
            "dump_level": self.dump_level,
            "total_pages": self.total_pages,
            "categories": self.categories,
            "classes": self.class_pages,
            "reusable_pages": self.reusable_pages,
            "reusable_bytes": self.reusable_bytes,
            "extents": len(self.extents),
            "features": self.features,
            "withheld": self.withheld_json(),
        }

    def withheld_json(self) -> dict[str, dict[str, Any]]:
        """``withheld`` with the page count of each entry, for reports."""
        return {key: {"reason": why, "pages": self.withheld_pages.get(key)}
                for key, why in self.withheld.items()}


class _StructPageReader:
    """Reads the struct pages of a pfn range through the translator, leaf by leaf."""

    def __init__(self, vm: Vmcore, xlat: Translator, layout: PageLayout) -> None:
        self.vm = vm
        self.xlat = xlat
        self.layout = layout
        self._buf = bytearray()

    def read(self, section: Section, start_pfn: int, end_pfn: int) -> memoryview:
        size = self.layout.size_page
        vaddr = section.page_vaddr(start_pfn, size)
        nbytes = (end_pfn - start_pfn) * size
        pieces: list[tuple[int, int]] = []
        done = 0
        while done < nbytes:
            try:
                paddr, contiguous = self.xlat.translate_leaf(vaddr + done)
            except TranslationError as exc:
                raise TranslationError(
                    f"struct pages of pfn {start_pfn:#x}..{end_pfn:#x} (section {section.nr}) "
                    f"do not resolve: {exc}"
                ) from None
            take = min(contiguous, nbytes - done)
            if pieces and pieces[-1][0] + pieces[-1][1] == paddr:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + take)
            else:
                pieces.append((paddr, take))
            done += take
        if len(self._buf) < nbytes:
            self._buf = bytearray(nbytes)
        view = memoryview(self._buf)[:nbytes]
        filled = 0
        for p, n in pieces:
            if self.vm.phys.contains(p, n):
                self.vm.phys.readinto(p, view[filled : filled + n])
            else:
                view[filled : filled + n] = self.vm.phys.read(p, n)
            filled += n
        # A view of the reused buffer, valid until the next read: the classifier keeps nothing.
        return view


def _examined_spans(vm: Vmcore) -> list[tuple[int, int, int, int]]:
    """(start_pfn, end_pfn, usable_start_pfn, usable_end_pfn) for each PT_LOAD RAM range.

    A pfn is examined (as makedumpfile does) when its first byte is in a PT_LOAD; it is usable
    for reuse only when the whole page is in the file.
    """
    return [
        (
            rng.start_paddr >> PAGE_SHIFT,
            (rng.end_paddr + PAGE_SIZE - 1) >> PAGE_SHIFT,
            (rng.start_paddr + PAGE_SIZE - 1) >> PAGE_SHIFT,
            rng.end_paddr >> PAGE_SHIFT,
        )
        for rng in vm.phys.ranges
    ]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One examined span's piece inside one memory section, as the walk yields it.

    ``pages`` (the struct pages read from old memory) and ``result`` (their classes) are None
    for a section without a mem_map; ``pages`` is a view of a reused buffer, valid only until
    the walk yields the next chunk. ``usable_start``/``usable_end`` bound the span's pfns
    whose whole page is in the file (the only ones that may be reused)."""

    section: Section
    start_pfn: int
    end_pfn: int
    usable_start: int
    usable_end: int
    pages: memoryview | None
    result: ChunkResult | None


def classified_chunks(
    vm: Vmcore,
    xlat: Translator,
    sections: MemSections,
    classifier: Classifier,
    spans: list[tuple[int, int, int, int]],
) -> Iterator[Chunk]:
    """The seam of the pipeline: walk ``spans`` (see ``_examined_spans``) section by section,
    read each piece's struct pages and classify them, one chunk at a time, so whatever
    consumes the chunks (the plan's policy and counts) holds one section's pages at most."""
    reader = _StructPageReader(vm, xlat, classifier.layout)
    vmemmap = vm.info.symbols.get("vmemmap")
    for start, end, usable_start, usable_end in spans:
        classifier.skip_to(start)
        for section in sections.iter_sections(start, end):
            a = max(start, section.start_pfn)
            b = min(end, section.end_pfn)
            if not section.has_mem_map:
                classifier.skip_to(b)
                yield Chunk(section, a, b, usable_start, usable_end, None, None)
                continue
            if vmemmap is not None and section.coded_mem_map != vmemmap:
                raise LayoutError(
                    f"section {section.nr} mem_map {section.coded_mem_map:#x} disagrees with "
                    f"SYMBOL(vmemmap)={vmemmap:#x}"
                )
            pages = reader.read(section, a, b)
            yield Chunk(section, a, b, usable_start, usable_end, pages,
                        classifier.classify(a, pages))


def make_plan(
    vm: Vmcore,
    dump_level: int = 31,
    *,
    withheld: dict[PageClass, str] | None = None,
    forbidden: Sequence[tuple[int, int, str]] = (),
    min_run_pages: int = 1,
    withhold_hotplugged: bool = False,
    count_zero: bool = False,
    progress: Progress | None = None,
) -> Plan:
    """Classify every page of ``vm`` and derive the reusable extents for ``dump_level``.

    ``withheld`` classes are never reused (the safety gate's collector rule); ``forbidden``
    physical byte ranges ``(start, end, reason)`` are cut out of the extents; extents shorter
    than ``min_run_pages`` after splitting at PT_LOAD boundaries are dropped (ELF output);
    ``withhold_hotplugged`` keeps out sections not present at boot (rule 4's offline fallback).
    """
    info = vm.info
    layout = PageLayout.from_vmcoreinfo(info)
    xlat = make_translator(vm.header.arch, info, vm.header.loads, vm.phys.read_u64)
    sections = MemSections(info, xlat_read_u64(xlat, vm), xlat.max_physmem_bits)
    policy = ReusePolicy.build(dump_level, layout, withheld)
    reuse_lut = native.lut(policy.classes)
    candidates = 0  # reusable by class in usable sections, before the poison veto
    offline_pages = 0  # reusable by class but in a section that is not online
    hotplugged_pages = 0  # reusable by class but in a section added after boot (withheld)
    classifier = Classifier(layout)
    builder = ExtentBuilder()
    counts: Counter[int] = Counter()
    chunk_counts = native.new_counts()  # per-class pages of every classified chunk, in C
    zero_pages = 0
    spans = _examined_spans(vm)
    total = sum(end - start for start, end, _, _ in spans)
    done = 0
    vmemmap = info.symbols.get("vmemmap")  # for the features; the walk checks it
    probes = [(s.p_paddr >> PAGE_SHIFT,
               (s.p_paddr >> PAGE_SHIFT) + min(KERNEL_PROBE_PAGES, s.p_memsz >> PAGE_SHIFT))
              for s in kernel_text_loads(vm.header.loads)]
    evidence = Evidence()
    checks = native.new_counts()
    for chunk in classified_chunks(vm, xlat, sections, classifier, spans):
        a, b, section = chunk.start_pfn, chunk.end_pfn, chunk.section
        npages = b - a
        result = chunk.result
        if chunk.pages is None or result is None:
            counts[PageClass.NO_MEMMAP] += npages
            done += npages
            continue
        classifier.check_pages(chunk.pages, section.page_vaddr(a, layout.size_page), checks)
        for lo, hi in probes:
            for pfn in range(max(lo, a), min(hi, b)):
                evidence.kernel_pages[pfn] = result.classes[pfn - a]
        for lo, hi in result.retract:
            builder.withdraw(lo, hi)
        late = withhold_hotplugged and not section.early
        ok = section.usable and not late
        usable = (chunk.usable_start - a, chunk.usable_end - a) if ok else (0, 0)
        runs = policy.reusable_runs(result.classes, result.poisoned, usable)
        lo, hi = max(chunk.usable_start - a, 0), min(chunk.usable_end - a, npages)
        if lo < hi:
            by_class = sum(y - x for x, y in native.runs(result.classes, reuse_lut, None, lo, hi))
            if ok:
                candidates += by_class
            elif not section.usable:
                offline_pages += by_class
            else:
                hotplugged_pages += by_class
        builder.add_runs([(a + lo, a + hi) for lo, hi in runs])
        native.count(result.classes, chunk_counts)
        if count_zero:
            zero_pages += _count_zero(vm, a, b, result.classes)
        done += npages
        if progress is not None:
            progress(done, total)
    for c in PageClass:
        if chunk_counts[c]:
            counts[c] += int(chunk_counts[c])
    evidence.heads, evidence.bad_heads = int(checks[0]), int(checks[1])
    evidence.anon_lru, evidence.anon_not_swapbacked = int(checks[2]), int(checks[3])
    evidence.free_pages = counts[PageClass.FREE] + counts[PageClass.UNACCEPTED]
    evidence.free_counter = free_pages_counter(info, xlat_read_u64(xlat, vm))
    check(evidence, layout)
    withheld_why = dict(policy.withheld)
    withheld_pages = {key: sum(counts[c] for c in PageClass if c.name.lower() == key)
                      for key in withheld_why}
    taken = {
        "rule 2: buddy blocks and folios holding a PG_hwpoison page": candidates - builder.npages,
        "rule 5: memory sections that are not online": offline_pages,
        "rule 4: memory sections hot-added after boot (persistent memory onlined as kmem "
        "looks like this; without the capture kernel's NFIT it cannot be told apart)":
            hotplugged_pages,
    }
    for start_paddr, end_paddr, key in forbidden:
        before = builder.npages
        builder.withdraw(start_paddr >> PAGE_SHIFT, -(-end_paddr // PAGE_SIZE))
        taken[key] = taken.get(key, 0) + before - builder.npages
    before = builder.npages
    extents = _split_and_filter(builder.extents(), spans, min_run_pages)
    taken[f"rule 6: excluded runs shorter than {min_run_pages} pages (ELF output)"] = (
        before - sum(e.npages for e in extents))
    for key, n_taken in taken.items():
        if n_taken:
            withheld_why[key] = key.split(": ", 1)[1]
            withheld_pages[key] = n_taken
    class_pages = {PageClass(c).name.lower(): n for c, n in sorted(counts.items())}
    categories: dict[str, int | None] = {
        name: sum(counts.get(c, 0) for c in members) for name, members in MDF_CATEGORIES.items()
    }
    categories["zero"] = zero_pages if count_zero else None
    if count_zero and categories["remaining"] is not None:
        categories["remaining"] = categories["remaining"] - zero_pages
    features: dict[str, Any] = {
        **layout.features(),
        "paging_levels": xlat.paging_levels,
        "kaslr_offset": info.kerneloffset,
        "sparsemem_extreme": sections.extreme,
        "section_size_bits": sections.section_size_bits,
        "vmemmap_symbol": vmemmap is not None,
        "pt_loads": len(vm.header.loads),
        "ram_ranges": len(vm.phys.ranges),
        # makedumpfile's accounting (survey prints it): it counts the kernel-text PT_LOAD's
        # pages a second time (the load duplicates RAM) and reports up to the last RAM pfn.
        "kernel_text_pages": sum(s.p_memsz >> PAGE_SHIFT
                                 for s in kernel_text_loads(vm.header.loads)),
        "max_pfn": max((end for _, end, _, _ in spans), default=0),
        "plausibility": evidence.summary(),
    }
    plan = Plan(
        osrelease=info.osrelease,
        arch=vm.header.arch,
        dump_level=dump_level,
        extents=tuple(extents),
        class_pages=class_pages,
        categories=categories,
        total_pages=total,
        features=features,
        withheld=withheld_why,
        withheld_pages=withheld_pages,
    )
    log.info(
        "planned %d reusable pages (%d MiB) in %d extents at dump level %d",
        plan.reusable_pages, plan.reusable_bytes >> 20, len(plan.extents), dump_level,
    )
    return plan


def _split_and_filter(
    extents: list[Extent], spans: list[tuple[int, int, int, int]], min_run_pages: int
) -> list[Extent]:
    """Split extents at PT_LOAD boundaries (collectors walk PT_LOADs one by one) and drop the
    pieces shorter than ``min_run_pages``; a no-op when every piece is long enough."""
    if min_run_pages <= 1:
        return extents
    bounds = sorted({b for s in spans for b in (s[0], s[1])})
    out: list[Extent] = []
    for ext in extents:
        cuts = [b for b in bounds if ext.start_pfn < b < ext.end_pfn]
        edges = [ext.start_pfn, *cuts, ext.end_pfn]
        for a, b in zip(edges, edges[1:], strict=False):
            if b - a >= min_run_pages:
                out.append(Extent(a, b))
    return out


def xlat_read_u64(xlat: Translator, vm: Vmcore) -> Callable[[int], int]:
    """A ``read_u64(vaddr)`` over the crashed kernel's virtual address space."""

    def read(vaddr: int) -> int:
        return vm.phys.read_u64(xlat.translate(vaddr))

    return read


_KEPT = native.lut((PageClass.KERNEL, PageClass.SLAB, PageClass.TAIL))


def _count_zero(vm: Vmcore, start_pfn: int, end_pfn: int, classes: bytearray) -> int:
    """Zero-filled pages among those the struct page rules keep (makedumpfile's bit 1)."""
    zeros = 0
    for lo, hi in native.runs(classes, _KEPT):
        for pfn in range(start_pfn + lo, start_pfn + hi):
            paddr = pfn << PAGE_SHIFT
            if not vm.phys.contains(paddr, PAGE_SIZE):
                continue
            if native.is_zero(vm.phys.view(paddr, PAGE_SIZE)):
                zeros += 1
    return zeros

