"""cffi out-of-line build of ``kdumpd.mm._classify``: the planner's per-page loops in C.

The C is ``classify.c`` beside this file (read here, not kept in a Python string, so that it
is compiled, read and reviewed as C); this script only declares what Python may call.

Build (needs gcc and python3-dev; the result needs nothing beyond libc)::

    /usr/bin/python3 daemon/kdumpd/mm/_build_classify.py

``scripts/setup-env`` runs it and copies the ``.so`` next to ``classify.py``; kdumpd refuses
to plan without it (no slow fallback).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

# Imported by name: cffi ships no type hints, and this script is a build step, not runtime.
cffi: Any = importlib.import_module("cffi")

__all__ = ["build", "ffibuilder"]

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
#define KDUMPD_PC_HOLE ...
#define KDUMPD_PC_NO_MEMMAP ...
#define KDUMPD_PC_KERNEL ...
#define KDUMPD_PC_SLAB ...
#define KDUMPD_PC_FREE ...
#define KDUMPD_PC_UNACCEPTED ...
#define KDUMPD_PC_CACHE ...
#define KDUMPD_PC_CACHE_PRIVATE ...
#define KDUMPD_PC_USER_ANON ...
#define KDUMPD_PC_USER_HUGETLB ...
#define KDUMPD_PC_HWPOISON ...
#define KDUMPD_PC_OFFLINE ...
#define KDUMPD_PC_TAIL ...
#define KDUMPD_PC_CACHE_TAIL ...
#define KDUMPD_PC_CACHE_PRIVATE_TAIL ...
#define KDUMPD_PC_USER_ANON_TAIL ...
#define KDUMPD_PC_USER_HUGETLB_TAIL ...
#define KDUMPD_ORDER_FLAGS1_MAPCOUNT ...
#define KDUMPD_ORDER_FLAGS1_PG_HUGETLB ...
#define KDUMPD_ORDER_BYTES ...

struct kdumpd_layout {
    uint32_t size_page;
    uint32_t off_flags, off_mapping, off_mapcount, off_private, off_head;
    uint32_t off_order, off_dtor;
    uint32_t order_source;
    uint64_t m_lru, m_private, m_swapcache, m_swapbacked, m_head, m_slab, m_hwpoison, m_hugetlb;
    int64_t buddy_value, offline_value, hugetlb_value, slab_value, unaccepted_value;
    int64_t hugetlb_dtor;
    uint32_t max_buddy_order;
};

struct kdumpd_carry {
    int active;
    int poisoned;
    uint8_t cls;
    uint64_t start_pfn, end_pfn;
};

int kdumpd_classify(const struct kdumpd_layout *L, const unsigned char *pages, size_t n,
                    uint64_t start_pfn, const unsigned char *examined,
                    struct kdumpd_carry *carry, unsigned char *cls, unsigned char *poisoned,
                    uint64_t *retract);
size_t kdumpd_runs(const unsigned char *vals, const unsigned char *veto, size_t lo, size_t hi,
                   const unsigned char *lut, uint32_t *out);
void kdumpd_check_pages(const struct kdumpd_layout *L, const unsigned char *pages, size_t n,
                        uint64_t vaddr0, uint64_t *counts);
void kdumpd_count(const unsigned char *vals, size_t n, uint64_t *counts);
int kdumpd_is_zero(const unsigned char *p, size_t n);
"""


def _source() -> str:
    with open(os.path.join(HERE, "classify.c"), encoding="utf-8") as fh:
        return fh.read()


ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kdumpd.mm._classify", _source(), extra_compile_args=["-O2"])


def build(tmpdir: str) -> str:
    """Compile into ``tmpdir`` (as ``tmpdir/kdumpd/mm/_classify*.so``); return the path."""
    return str(ffibuilder.compile(tmpdir=tmpdir, verbose=False))


if __name__ == "__main__":
    # daemon/kdumpd/mm/_build_classify.py -> build under daemon/, next to the package.
    print(build(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(HERE))))
