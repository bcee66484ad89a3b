/* The store's C kernels, compiled into kdumpd.store._blocksum by _build_blocksum.py (cffi,
 * out-of-line API mode): cffi pastes this file into the module it generates, so every function
 * is static and only those declared in _build_blocksum.py's CDEF are reachable from Python.
 *
 * - kdumpd_first_bad / kdumpd_checksums: XXH3-64 of many 4 KiB blocks in one call
 *   (kdumpd/store/blocksum.py);
 * - kdumpd_fast_*: the store's fast path (kdumpd/store/fastpath.py): aligned reads, writes
 *   (overwrites, and first writes that place blocks) and trims done whole here under the
 *   store's reader-writer lock, with the GIL released.
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
 * The tables are the store's arrays (slot.py), updated in place and never reallocated except
 * the free-group stack, which Python replaces (under the exclusive lock) when it must grow and
 * then hands over with kdumpd_fast_set_free:
 *   groups[block] (uint32), sums[block] (uint64): the per-block metadata;
 *   state[]: next (groups at or above it never handed out), nfree (entries of the free stack
 *            in use, top last), used_blocks: slot.py's allocator, shared, not copied;
 *   free_stack[free_cap]: the groups given back by trims and zero writes.
 * The runs are the placement's extents in pool order, each with the host address of its first
 * slot (NULL: not mapped, such slots go to the Python path). Slot index = copy * ngroups +
 * group, as in placement.py.
 * Every function that touches the tables holds `lock`: shared for reads, exclusive for
 * writes, trims and the Python paths (kdumpd_fast_lock). Nothing here takes the GIL or
 * allocates after kdumpd_fast_new. The data paths accept NULL (a closed store) and serve
 * nothing, so a late call cannot touch freed memory.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define KDUMPD_SHIFT 12
#define KDUMPD_UNWRITTEN 0xffffffffu
#define KDUMPD_STACK_SUMS 64    /* checksums of requests up to 256 KiB: on the stack */

/* state[] indices (slot.py: SlotTable.state) */
#define KDUMPD_NEXT 0
#define KDUMPD_NFREE 1
#define KDUMPD_USED 2

/* kdumpd_fast_unlock flags, from the Python side's sparse sets */
#define KDUMPD_NO_LOST 1u       /* no lost blocks: writes may bypass Python (it forgets them) */
#define KDUMPD_NO_RETIRED 2u    /* no retired groups: C may give groups back (Python filters) */

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
    uint64_t *state;            /* next, nfree, used_blocks */
    uint32_t *free_stack;
    uint64_t free_cap;
    uint64_t spare;             /* groups kept back for relocation (ordinary writes never take) */
    uint64_t *scratch;          /* checksums of requests above KDUMPD_STACK_SUMS blocks */
    uint64_t scratch_len;
    unsigned flags;             /* KDUMPD_NO_LOST | KDUMPD_NO_RETIRED, set at each unlock */
    uint64_t reads, writes, blocks_read, blocks_written, trims, zeroes;
};

static kdumpd_fast *kdumpd_fast_new(uint64_t ngroups, uint32_t copies, size_t nruns,
                                    const uint64_t *cum, unsigned char *const *base,
                                    uint32_t *groups, uint64_t *sums, uint64_t nblocks,
                                    uint64_t zero_sum, uint64_t *state, uint64_t spare,
                                    uint64_t *scratch, uint64_t scratch_len)
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
    f->state = state;
    f->spare = spare;
    f->scratch = scratch;
    f->scratch_len = scratch_len;
    f->flags = KDUMPD_NO_LOST | KDUMPD_NO_RETIRED;
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

/* Release the exclusive lock; the Python side says what C may do without it (flags). */
static void kdumpd_fast_unlock(kdumpd_fast *f, unsigned flags)
{
    f->flags = flags;
    pthread_rwlock_unlock(&f->lock);
}

/* The free-group stack, after Python replaced it to grow it; the exclusive lock is held. */
static void kdumpd_fast_set_free(kdumpd_fast *f, uint32_t *stack, uint64_t cap)
{
    if (!f)
        return;
    f->free_stack = stack;
    f->free_cap = cap;
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

/* Whether every copy of group g is mapped. */
static int kdumpd_group_mapped(const kdumpd_fast *f, uint32_t g)
{
    for (uint32_t c = 0; c < f->copies; c++)
        if (!kdumpd_slot(f, (uint64_t)c * f->ngroups + g))
            return 0;
    return 1;
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

/* Whether block k of a request (checksums s) is all zeros: the checksum says maybe, memcmp
 * decides. */
static int kdumpd_zero_at(const kdumpd_fast *f, const uint64_t *s, const unsigned char *data,
                          size_t k)
{
    return s[k] == f->zero_sum && kdumpd_is_zero(data + (k << KDUMPD_SHIFT));
}

/* The group the i-th block a request places gets, as slot.py's allocate hands them out: the
 * free stack from its top, then never-used groups upwards. Nothing is taken yet. */
static uint32_t kdumpd_nth_free(const kdumpd_fast *f, uint64_t i)
{
    uint64_t nfree = f->state[KDUMPD_NFREE];
    return i < nfree ? f->free_stack[nfree - 1 - i]
                     : (uint32_t)(f->state[KDUMPD_NEXT] + (i - nfree));
}

/* Groups ordinary writes may still take (the spares are kept for relocation). */
static uint64_t kdumpd_usable(const kdumpd_fast *f)
{
    uint64_t total = f->state[KDUMPD_NFREE] + f->ngroups - f->state[KDUMPD_NEXT];
    return total > f->spare ? total - f->spare : 0;
}

/* Write blocks [b0, b0 + n) in every copy, as blockstore.py's _write_blocks does: a block that
 * holds a group is overwritten, an unwritten one gets the next free group, an all-zero one
 * becomes unwritten and gives its group back (after the new ones are taken, like Python).
 * Checksums first (before the lock for small requests), then metadata, then the copies.
 * Returns 1 if done, 0 if nothing was changed and the Python path must do it: lost blocks to
 * forget, a group to give back while groups are retired, a free stack too small to take it
 * (Python grows it), no free group (Python raises ENOSPC), an unmapped slot, a request larger
 * than the scratch. */
static int kdumpd_fast_write(kdumpd_fast *f, uint64_t b0, size_t n, const unsigned char *data)
{
    uint64_t stack_sums[KDUMPD_STACK_SUMS];
    uint64_t *s = stack_sums;
    uint64_t nnew = 0, nfreed = 0, nfree, reuse, low, i, j;
    int done = 0;
    size_t k;
    uint32_t c;
    if (!f || b0 > f->nblocks || n > f->nblocks - b0)
        return 0;  /* out of range: the Python path raises */
    if (n > KDUMPD_STACK_SUMS && n > f->scratch_len)
        return 0;
    if (n <= KDUMPD_STACK_SUMS)
        for (k = 0; k < n; k++)
            s[k] = XXH3_64bits(data + ((size_t)k << KDUMPD_SHIFT), KDUMPD_BLOCK);
    pthread_rwlock_wrlock(&f->lock);
    if (n > KDUMPD_STACK_SUMS) {
        s = f->scratch;  /* shared by writers, so filled under the exclusive lock */
        for (k = 0; k < n; k++)
            s[k] = XXH3_64bits(data + ((size_t)k << KDUMPD_SHIFT), KDUMPD_BLOCK);
    }
    if (!(f->flags & KDUMPD_NO_LOST))
        goto unlock;
    /* Check everything before changing anything. */
    for (k = 0; k < n; k++) {
        uint32_t g = f->groups[b0 + k];
        if (kdumpd_zero_at(f, s, data, k)) {
            nfreed += g != KDUMPD_UNWRITTEN;
            continue;
        }
        if (g == KDUMPD_UNWRITTEN) {
            if (nnew == kdumpd_usable(f))
                goto unlock;  /* pool full: Python raises ENOSPC */
            g = kdumpd_nth_free(f, nnew++);
        }
        if (!kdumpd_group_mapped(f, g))
            goto unlock;
    }
    nfree = f->state[KDUMPD_NFREE];
    reuse = nnew < nfree ? nnew : nfree;
    low = nfree - reuse;  /* the stack's height once the new groups are taken */
    if (nfreed && (!(f->flags & KDUMPD_NO_RETIRED) || low + nfreed > f->free_cap))
        goto unlock;
    /* Metadata before the copies, as in blockstore.py: new groups first, then the freed ones
     * go on the stack in block order (the first freed on top), as slot.py's release. */
    for (k = 0, i = 0; k < n; k++)
        if (f->groups[b0 + k] == KDUMPD_UNWRITTEN && !kdumpd_zero_at(f, s, data, k))
            f->groups[b0 + k] = kdumpd_nth_free(f, i++);
    for (k = 0, j = 0; k < n; k++) {
        uint32_t g = f->groups[b0 + k];
        if (g != KDUMPD_UNWRITTEN && kdumpd_zero_at(f, s, data, k)) {
            f->free_stack[low + nfreed - 1 - j++] = g;
            f->groups[b0 + k] = KDUMPD_UNWRITTEN;
        }
        f->sums[b0 + k] = s[k];
    }
    f->state[KDUMPD_NFREE] = low + nfreed;
    f->state[KDUMPD_NEXT] += nnew - reuse;
    f->state[KDUMPD_USED] += nnew - nfreed;  /* modulo 2**64: may go down */
    for (k = 0; k < n; k++) {
        uint32_t g = f->groups[b0 + k];
        if (g == KDUMPD_UNWRITTEN)
            continue;
        for (c = 0; c < f->copies; c++)
            memcpy(kdumpd_slot(f, (uint64_t)c * f->ngroups + g),
                   data + ((size_t)k << KDUMPD_SHIFT), KDUMPD_BLOCK);
    }
    __atomic_add_fetch(&f->writes, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&f->blocks_written, n, __ATOMIC_RELAXED);
    done = 1;
unlock:
    pthread_rwlock_unlock(&f->lock);
    return done;
}

/* Make whole blocks [b0, b1) unwritten and give their groups back in block order (the first on
 * top), as blockstore.py's _free_blocks; counted as a trim (zero == 0) or a write-zeroes.
 * Returns 1 if done, 0 if nothing was changed and the Python path must do it (lost blocks to
 * forget, retired groups, a free stack too small). */
static int kdumpd_fast_trim(kdumpd_fast *f, uint64_t b0, uint64_t b1, int zero)
{
    uint64_t b, nfreed = 0, nfree, j = 0;
    int done = 0;
    if (!f || b1 > f->nblocks || b0 > b1)
        return 0;
    pthread_rwlock_wrlock(&f->lock);
    if ((f->flags & (KDUMPD_NO_LOST | KDUMPD_NO_RETIRED)) != (KDUMPD_NO_LOST | KDUMPD_NO_RETIRED))
        goto unlock;
    for (b = b0; b < b1; b++)
        nfreed += f->groups[b] != KDUMPD_UNWRITTEN;
    nfree = f->state[KDUMPD_NFREE];
    if (nfree + nfreed > f->free_cap)
        goto unlock;
    for (b = b0; j < nfreed; b++) {
        uint32_t g = f->groups[b];
        if (g == KDUMPD_UNWRITTEN)
            continue;
        f->free_stack[nfree + nfreed - 1 - j++] = g;
        f->groups[b] = KDUMPD_UNWRITTEN;
        f->sums[b] = f->zero_sum;
    }
    f->state[KDUMPD_NFREE] = nfree + nfreed;
    f->state[KDUMPD_USED] -= nfreed;
    __atomic_add_fetch(zero ? &f->zeroes : &f->trims, 1, __ATOMIC_RELAXED);
    done = 1;
unlock:
    pthread_rwlock_unlock(&f->lock);
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
    else if (!(f->flags & KDUMPD_NO_LOST))
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

/* reads, writes, blocks_read, blocks_written, trims, zeroes done by the fast path. Lock-free
 * (atomic loads), so it may be called with the exclusive lock held. */
static void kdumpd_fast_counters(kdumpd_fast *f, uint64_t *out)
{
    if (!f) {
        memset(out, 0, 6 * sizeof(*out));
        return;
    }
    out[0] = __atomic_load_n(&f->reads, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&f->writes, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&f->blocks_read, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&f->blocks_written, __ATOMIC_RELAXED);
    out[4] = __atomic_load_n(&f->trims, __ATOMIC_RELAXED);
    out[5] = __atomic_load_n(&f->zeroes, __ATOMIC_RELAXED);
}
