/* The store's C kernels, compiled into kdumpd.store._blocksum by _build_blocksum.py (cffi,
 * out-of-line API mode): cffi pastes this file into the module it generates, so every function
 * is static and only those declared in _build_blocksum.py's CDEF are reachable from Python.
 *
 * - kdumpd_first_bad / kdumpd_checksums: XXH3-64 of many 4 KiB blocks in one call
 *   (kdumpd/store/blocksum.py);
 * - kdumpd_fast_*: the store's fast path (kdumpd/store/fastpath.py): aligned reads and
 *   overwrites done whole here under the store's reader-writer lock, with the GIL released.
 *
 * Standalone check (what the tests run): gcc -fsyntax-only -Wall -Wextra -Wno-unused-function
 * blocksum.c
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* pthread_rwlockattr_setkind_np (Python.h defines it already) */
#endif
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

/* ---- the fast path --------------------------------------------------------------------
 * The tables (groups, sums) are the store's arrays (slot.py: array('I') and array('Q')),
 * updated in place and never reallocated; the runs are the placement's extents in pool order,
 * each with the host address of its first slot (NULL: not mapped, such slots go to the Python
 * path). Slot index = copy * ngroups + group, as in placement.py.
 * Every function that touches the tables holds `lock`: shared for reads, exclusive for
 * writes and for the Python paths (kdumpd_fast_lock). Nothing here takes the GIL. The data
 * paths accept NULL (a closed store) and serve nothing, so a late call cannot touch freed
 * memory.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define KDUMPD_SHIFT 12
#define KDUMPD_UNWRITTEN 0xffffffffu
#define KDUMPD_STACK_SUMS 64

typedef struct kdumpd_fast kdumpd_fast;

struct kdumpd_fast {
    pthread_rwlock_t lock;
    uint64_t ngroups;
    uint32_t copies;
    size_t nruns;
    uint64_t *cum;              /* nruns + 1 entries: first slot index of each run, then the end */
    unsigned char **base;       /* nruns entries */
    uint32_t *groups;
    uint64_t *sums;
    uint64_t nblocks;
    uint64_t zero_sum;
    int writes_ok;              /* 0 while the Python side has lost blocks to forget on rewrite */
    uint64_t reads, writes, blocks_read, blocks_written;
};

static kdumpd_fast *kdumpd_fast_new(uint64_t ngroups, uint32_t copies, size_t nruns,
                                    const uint64_t *cum, unsigned char *const *base,
                                    uint32_t *groups, uint64_t *sums, uint64_t nblocks,
                                    uint64_t zero_sum)
{
    pthread_rwlockattr_t attr;
    kdumpd_fast *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    f->cum = malloc((nruns + 1) * sizeof(*f->cum));
    f->base = malloc((nruns ? nruns : 1) * sizeof(*f->base));
    if (!f->cum || !f->base) {
        free(f->cum);
        free(f->base);
        free(f);
        return NULL;
    }
    memcpy(f->cum, cum, (nruns + 1) * sizeof(*f->cum));
    memcpy(f->base, base, nruns * sizeof(*f->base));
    f->ngroups = ngroups;
    f->copies = copies;
    f->nruns = nruns;
    f->groups = groups;
    f->sums = sums;
    f->nblocks = nblocks;
    f->zero_sum = zero_sum;
    f->writes_ok = 1;
    /* Writers first: a stream of shared readers must not starve a writer or the scrubber. */
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&f->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    return f;
}

static void kdumpd_fast_free(kdumpd_fast *f)
{
    if (!f)
        return;
    pthread_rwlock_destroy(&f->lock);
    free(f->cum);
    free(f->base);
    free(f);
}

static void kdumpd_fast_lock(kdumpd_fast *f) { pthread_rwlock_wrlock(&f->lock); }
static int kdumpd_fast_trylock(kdumpd_fast *f) { return pthread_rwlock_trywrlock(&f->lock) == 0; }

/* Release the exclusive lock; the Python side says whether overwrites may bypass it. */
static void kdumpd_fast_unlock(kdumpd_fast *f, int writes_ok)
{
    f->writes_ok = writes_ok;
    pthread_rwlock_unlock(&f->lock);
}

/* Host address of slot `idx`, or NULL if it is outside the pool or not mapped. */
static unsigned char *kdumpd_slot(const kdumpd_fast *f, uint64_t idx)
{
    size_t lo = 0, hi = f->nruns;
    if (idx >= f->cum[f->nruns])
        return NULL;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (f->cum[mid] <= idx)
            lo = mid;
        else
            hi = mid;
    }
    if (!f->base[lo])
        return NULL;
    return f->base[lo] + ((idx - f->cum[lo]) << KDUMPD_SHIFT);
}

/* Blocks [b0, b0 + n) from copy 0 into out, each verified after the copy (what is checked is
 * what the caller gets). Returns how many leading blocks were served: a block whose copy 0
 * fails its checksum, or whose slot is not mapped, stops it for the Python path (repair). */
static size_t kdumpd_fast_read(kdumpd_fast *f, uint64_t b0, size_t n, unsigned char *out)
{
    size_t k;
    if (!f || b0 > f->nblocks || n > f->nblocks - b0)
        return 0;  /* out of range: the Python path raises */
    pthread_rwlock_rdlock(&f->lock);
    for (k = 0; k < n; k++) {
        uint32_t g = f->groups[b0 + k];
        unsigned char *dst = out + ((size_t)k << KDUMPD_SHIFT);
        const unsigned char *src;
        if (g == KDUMPD_UNWRITTEN) {
            memset(dst, 0, KDUMPD_BLOCK);
            continue;
        }
        src = kdumpd_slot(f, g);
        if (!src)
            break;
        memcpy(dst, src, KDUMPD_BLOCK);
        if (XXH3_64bits(dst, KDUMPD_BLOCK) != f->sums[b0 + k])
            break;
    }
    __atomic_add_fetch(&f->blocks_read, k, __ATOMIC_RELAXED);
    if (k == n)
        __atomic_add_fetch(&f->reads, 1, __ATOMIC_RELAXED);
    pthread_rwlock_unlock(&f->lock);
    return k;
}

static int kdumpd_is_zero(const unsigned char *p)
{
    static const unsigned char zeros[KDUMPD_BLOCK];
    return memcmp(p, zeros, KDUMPD_BLOCK) == 0;
}

/* Overwrite blocks [b0, b0 + n) that all hold a group already, with non-zero data: checksums
 * (computed before the lock), then every copy. Returns 1 if done, 0 if nothing was changed
 * and the Python path must do it (a block to place or free, an unmapped slot, lost blocks to
 * forget, or no memory for the checksums). */
static int kdumpd_fast_write(kdumpd_fast *f, uint64_t b0, size_t n, const unsigned char *data)
{
    uint64_t stack_sums[KDUMPD_STACK_SUMS];
    uint64_t *s;
    int done = 0;
    size_t k;
    uint32_t c;
    if (!f || b0 > f->nblocks || n > f->nblocks - b0)
        return 0;  /* out of range: the Python path raises */
    s = n <= KDUMPD_STACK_SUMS ? stack_sums : malloc(n * sizeof(*s));
    if (!s)
        return 0;
    for (k = 0; k < n; k++) {
        const unsigned char *src = data + ((size_t)k << KDUMPD_SHIFT);
        s[k] = XXH3_64bits(src, KDUMPD_BLOCK);
        if (s[k] == f->zero_sum && kdumpd_is_zero(src))
            goto out;  /* zero blocks give their group back: Python's job */
    }
    pthread_rwlock_wrlock(&f->lock);
    if (!f->writes_ok)
        goto unlock;
    for (k = 0; k < n; k++) {
        uint32_t g = f->groups[b0 + k];
        if (g == KDUMPD_UNWRITTEN)
            goto unlock;
        for (c = 0; c < f->copies; c++)
            if (!kdumpd_slot(f, (uint64_t)c * f->ngroups + g))
                goto unlock;
    }
    /* Metadata before the copies, as in blockstore.py. */
    for (k = 0; k < n; k++)
        f->sums[b0 + k] = s[k];
    for (k = 0; k < n; k++) {
        uint32_t g = f->groups[b0 + k];
        for (c = 0; c < f->copies; c++)
            memcpy(kdumpd_slot(f, (uint64_t)c * f->ngroups + g),
                   data + ((size_t)k << KDUMPD_SHIFT), KDUMPD_BLOCK);
    }
    __atomic_add_fetch(&f->writes, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&f->blocks_written, n, __ATOMIC_RELAXED);
    done = 1;
unlock:
    pthread_rwlock_unlock(&f->lock);
out:
    if (s != stack_sums)
        free(s);
    return done;
}

/* The scrubber's check of one block, every copy hashed in place: 0 unwritten, 1 every copy
 * matches, -1 anything else (a bad or unmapped copy, lost blocks known): the Python path
 * then verifies again and repairs. */
static int kdumpd_fast_verify(kdumpd_fast *f, uint64_t block)
{
    int r = 1;
    uint32_t c, g;
    if (!f || block >= f->nblocks)
        return -1;
    pthread_rwlock_rdlock(&f->lock);
    g = f->groups[block];
    if (g == KDUMPD_UNWRITTEN)
        r = 0;
    else if (!f->writes_ok)
        r = -1;
    for (c = 0; r == 1 && c < f->copies; c++) {
        const unsigned char *p = kdumpd_slot(f, (uint64_t)c * f->ngroups + g);
        if (!p || XXH3_64bits(p, KDUMPD_BLOCK) != f->sums[block])
            r = -1;
    }
    pthread_rwlock_unlock(&f->lock);
    return r;
}

/* The first written block at or after `block`, or nblocks. */
static uint64_t kdumpd_fast_next_written(kdumpd_fast *f, uint64_t block)
{
    uint64_t b;
    if (!f)
        return 0;
    pthread_rwlock_rdlock(&f->lock);
    for (b = block; b < f->nblocks && f->groups[b] == KDUMPD_UNWRITTEN; b++)
        ;
    pthread_rwlock_unlock(&f->lock);
    return b < f->nblocks ? b : f->nblocks;
}

/* reads, writes, blocks_read, blocks_written done by the fast path. Lock-free (atomic loads),
 * so it may be called with the exclusive lock held. */
static void kdumpd_fast_counters(kdumpd_fast *f, uint64_t *out)
{
    if (!f) {
        out[0] = out[1] = out[2] = out[3] = 0;
        return;
    }
    out[0] = __atomic_load_n(&f->reads, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&f->writes, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&f->blocks_read, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&f->blocks_written, __ATOMIC_RELAXED);
}
