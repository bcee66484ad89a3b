"""cffi out-of-line build of ``kdumpd.store._blocksum``: the store's C kernels.

The C is ``blocksum.c`` (beside this file); this script declares what Python may call (``CDEF``)
and compiles it. Two groups of functions:

- ``kdumpd_first_bad`` / ``kdumpd_checksums``: XXH3-64 of many 4 KiB blocks per call;
- ``kdumpd_fast_*``: the store's fast path (:mod:`kdumpd.store.fastpath`): aligned reads,
  writes (block placement included) and trims done whole in C under the store's reader-writer
  lock, with the GIL released, so that nbdkit's worker threads copy and hash in parallel
  instead of queueing on the GIL.

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

__all__ = ["CDEF", "SOURCE_PATH", "build", "ffibuilder"]

CDEF = """
size_t kdumpd_first_bad(const unsigned char *buf, size_t nblocks, const uint64_t *expected);
void kdumpd_checksums(const unsigned char *buf, size_t nblocks, uint64_t *out);

typedef struct kdumpd_fast kdumpd_fast;
kdumpd_fast *kdumpd_fast_new(uint64_t ngroups, uint32_t copies, size_t nruns,
                             const uint64_t *cum, unsigned char *const *base, uint32_t *groups,
                             uint64_t *sums, uint64_t nblocks, uint64_t zero_sum,
                             uint64_t *state, uint64_t spare, uint64_t *scratch,
                             uint64_t scratch_len);
void kdumpd_fast_free(kdumpd_fast *f);
void kdumpd_fast_lock(kdumpd_fast *f);
int kdumpd_fast_trylock(kdumpd_fast *f);
void kdumpd_fast_unlock(kdumpd_fast *f, unsigned flags);
void kdumpd_fast_set_free(kdumpd_fast *f, uint32_t *stack, uint64_t cap);
size_t kdumpd_fast_read(kdumpd_fast *f, uint64_t b0, size_t n, unsigned char *out);
int kdumpd_fast_write(kdumpd_fast *f, uint64_t b0, size_t n, const unsigned char *data);
int kdumpd_fast_trim(kdumpd_fast *f, uint64_t b0, uint64_t b1, int zero);
void kdumpd_fast_counters(kdumpd_fast *f, uint64_t *out);
int kdumpd_fast_verify(kdumpd_fast *f, uint64_t block);
uint64_t kdumpd_fast_next_written(kdumpd_fast *f, uint64_t block);
"""

# The C itself lives in blocksum.c beside this file, so it can be read, compiled on its own,
# linted and diffed as C.
SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blocksum.c")
with open(SOURCE_PATH, encoding="utf-8") as _fh:
    SOURCE = _fh.read()

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "kdumpd.store._blocksum", SOURCE, libraries=["xxhash"],
    extra_compile_args=["-O2", "-pthread"], extra_link_args=["-pthread"]
)


def build(tmpdir: str) -> str:
    """Compile into ``tmpdir`` (as ``tmpdir/kdumpd/store/_blocksum*.so``); return the path."""
    return str(ffibuilder.compile(tmpdir=tmpdir, verbose=False))


if __name__ == "__main__":
    # daemon/kdumpd/store/_build_blocksum.py -> build under daemon/, next to the package.
    here = os.path.dirname(os.path.abspath(__file__))
    print(build(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(here))))
