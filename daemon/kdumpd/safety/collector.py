"""The dump collector that will really run, and what it can exclude correctly on this kernel.

kdumpd may reuse a page only if the collector leaves it out of the dump; otherwise the dump
would contain kdumpd's data. So the dump level comes from the collector's own command line,
and classes an old makedumpfile misdetects on a newer kernel layout are withheld.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from kdumpd.errors import ConfigError
from kdumpd.mm.classify import PageClass
from kdumpd.mm.pagelayout import OrderSource, PageLayout

__all__ = [
    "FOLIO_TAILS", "MIN_ELF_EXCLUDED_RUN", "Collector", "parse_collector", "withheld_classes",
]

# makedumpfile -E (ELF output) writes excluded runs shorter than PFN_EXCLUDED (256) pages into
# the file with their contents (makedumpfile.c, write_elf_pages_cyclic). Only longer runs are
# really left out, so with -E kdumpd keeps only extents of at least this many pages.
MIN_ELF_EXCLUDED_RUN = 256


@dataclass(frozen=True, slots=True)
class Collector:
    """A parsed core_collector / MAKEDUMP_ARGS command line."""

    kind: str  # "makedumpfile", "cp", "dd", "cat", "unknown"
    dump_level: int | None  # None: nothing is excluded (reuse nothing)
    elf_output: bool
    raw: str
    program: str = "makedumpfile"  # argv[0] as written: a bare name or a path


    def describe(self) -> str:
        if self.kind != "makedumpfile":
            return f"{self.kind} (copies every page: nothing may be reused)"
        fmt = "ELF" if self.elf_output else "kdump-compressed"
        return f"makedumpfile -d {self.dump_level} ({fmt})"


def parse_collector(cmdline: str) -> Collector:
    """Parse the collector's command line; unknown programs get dump level None."""
    try:
        argv = shlex.split(cmdline)
    except ValueError as exc:
        raise ConfigError(f"collector command line {cmdline!r} does not parse: {exc}") from None
    if not argv:
        raise ConfigError("collector command line is empty")
    prog = argv[0].rsplit("/", 1)[-1]
    if prog != "makedumpfile":
        kind = prog if prog in ("cp", "dd", "cat") else "unknown"
        return Collector(kind, None, False, cmdline, argv[0])
    level: int | None = 0  # makedumpfile without -d dumps every page
    elf = False
    i = 1
    while i < len(argv):
        arg = argv[i]
        value: str | None = None
        if arg in ("-d", "--dump-level"):
            if i + 1 >= len(argv):
                raise ConfigError(f"collector {cmdline!r}: -d without a level")
            value = argv[i + 1]
            i += 1
        elif re.fullmatch(r"-d\d+", arg):
            value = arg[2:]
        elif arg.startswith("--dump-level="):
            value = arg.split("=", 1)[1]
        elif arg == "-E":
            elf = True
        elif re.fullmatch(r"-[A-Za-z]+", arg) and "E" in arg and not arg.startswith("--"):
            elf = True  # combined short flags such as -cE
        if value is not None:
            try:
                level = int(value, 0)
            except ValueError:
                raise ConfigError(f"collector {cmdline!r}: dump level {value!r}") from None
            if not 0 <= level <= 31:
                raise ConfigError(f"collector {cmdline!r}: dump level {level} outside 0..31")
        i += 1
    return Collector("makedumpfile", level, elf, cmdline, argv[0])


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", version)
    return tuple(int(p) for p in parts[:3]) if parts else (0,)


# The pages after the head of an excluded compound folio; see PageClass.
FOLIO_TAILS = (
    PageClass.CACHE_TAIL, PageClass.CACHE_PRIVATE_TAIL,
    PageClass.USER_ANON_TAIL, PageClass.USER_HUGETLB_TAIL,
)


def withheld_classes(version: str | None, layout: PageLayout) -> dict[PageClass, str]:
    """Classes this makedumpfile version would still dump on this kernel's layout.

    From makedumpfile's history (first release containing each fix):
    * 1.7.3 (446c4f6): folio._folio_order/_folio_dtor, kernels 6.3-6.5.
    * 1.7.4 (9661c1d): order in folio._flags_1, PG_hugetlb, kernels 6.6-6.8.
    * 1.7.6 (985e575): hugetlb as a page type, kernels 6.9+.
    * 1.7.7 (72c3414): typed compound pages, PGTY<<24 encoding, kernels 6.12+.
    A version older than the fix its layout needs cannot read a folio's order, so it takes
    every compound head for a single page: it excludes the head on its own flags (anonymous,
    page cache) and dumps the rest of the folio, and it does not see the hugetlb marker of a
    head that is not mapped anonymously. Debian's 1.7.2 was verified here page by page on
    real 6.12 vmcores to exclude free pages and every non-compound user and cache page (and
    THP heads) correctly and to dump exactly the folio tails and non-anonymous hugetlb heads,
    so only those are withheld: the plain anonymous pages stay reusable. 1.7.6 on 6.12 was
    reported not to find free pages at all (SONiC PR #25899), so 1.7.3-1.7.6 are not trusted
    for free pages on that layout. A collector of unknown version is trusted for no user
    page and no folio tail on layouts newer than 6.2.
    """
    v = _version_tuple(version) if version else (0,)
    name = f"makedumpfile {version or 'of unknown version'}"
    out: dict[PageClass, str] = {}
    src = layout.order_source
    needed = {
        OrderSource.FOLIO_FIELDS: (1, 7, 3),
        OrderSource.FLAGS1_PG_HUGETLB: (1, 7, 4),
        OrderSource.FLAGS1_MAPCOUNT: (1, 7, 6),
    }.get(src)
    if layout.page_type_top_byte:
        needed = (1, 7, 7)
        if (1, 7, 3) <= v < (1, 7, 7) or v == (0,):
            out[PageClass.FREE] = f"{name} misdetects free pages on the 6.12+ page_type encoding"
    if needed is None or v >= needed:
        return out
    need = ".".join(map(str, needed))
    tails = (f"{name} cannot read folio orders on this kernel ({src}; needs {need}+): it "
             "excludes a folio's head page but dumps the rest")
    for klass in FOLIO_TAILS:
        out[klass] = tails
    out[PageClass.USER_HUGETLB] = (f"{name} does not recognise hugetlb pages on this kernel "
                                   f"({src}; needs {need}+)")
    if v == (0,):
        out[PageClass.USER_ANON] = f"{name}: no user page is trusted on this kernel ({src})"
    return out
