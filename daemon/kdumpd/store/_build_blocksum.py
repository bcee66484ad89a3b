"""cffi out-of-line build of ``kdumpd.store._blocksum``: checksum many 4 KiB blocks per call.

Build (needs gcc, python3-dev, libxxhash-dev; the result needs only libxxhash0, which
python3-xxhash already pulls in)::

    /usr/bin/python3 daemon/kdumpd/store/_build_blocksum.py

It links the same ``libxxhash.so.0`` that python3-xxhash uses, so both paths compute the same
XXH3-64 by construction; :mod:`kdumpd.store.blocksum` falls back to pure Python without it.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

# Imported by name: cffi ships no type hints, and this script is a build step, not runtime.
cffi: Any = importlib.import_module("cffi")

__all__ = ["build", "ffibuilder"]

CDEF = """
size_t kdumpd_first_bad(const unsigned char *buf, size_t nblocks, const uint64_t *expected);
void kdumpd_checksums(const unsigned char *buf, size_t nblocks, uint64_t *out);
"""

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <xxhash.h>

#define KDUMPD_BLOCK 4096u

/* Index of the first block whose XXH3-64 differs from expected[], or nblocks if none. */
static size_t kdumpd_first_bad(const unsigned char *buf, size_t nblocks, const uint64_t *expected)
{
    for (size_t i = 0; i < nblocks; i++)
        if (XXH3_64bits(buf + i * KDUMPD_BLOCK, KDUMPD_BLOCK) != expected[i])
            return i;
    return nblocks;
}

/* out[i] = XXH3-64 of block i. */
static void kdumpd_checksums(const unsigned char *buf, size_t nblocks, uint64_t *out)
{
    for (size_t i = 0; i < nblocks; i++)
        out[i] = XXH3_64bits(buf + i * KDUMPD_BLOCK, KDUMPD_BLOCK);
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "kdumpd.store._blocksum", SOURCE, libraries=["xxhash"], extra_compile_args=["-O2"]
)


def build(tmpdir: str) -> str:
    """Compile into ``tmpdir`` (as ``tmpdir/kdumpd/store/_blocksum*.so``); return the path."""
    return str(ffibuilder.compile(tmpdir=tmpdir, verbose=False))


if __name__ == "__main__":
    # daemon/kdumpd/store/_build_blocksum.py -> build under daemon/, next to the package.
    here = os.path.dirname(os.path.abspath(__file__))
    print(build(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(here))))
