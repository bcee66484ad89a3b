/* kdumpd.mm._classify: the per-page work of the planner, in C.
 *
 * Why C: the planner runs in the kdump capture kernel with ~100 MiB of memory; doing the
 * per-page work in Python is too slow, and numpy costs ~22 MiB of RSS and ~15 MiB of
 * initramfs. This file holds only the loops; what they implement is specified (and
 * documented) in classify.py, policy.py and extents.py, which wrap them.
 *
 * Built by _build_classify.py (cffi, out-of-line API mode). Every multi-byte field of the
 * crashed kernel's struct page is little-endian.
 */
#include <endian.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Page classes: the values of kdumpd.mm.classify.PageClass (checked at import). */
#define KDUMPD_PC_HOLE 0
#define KDUMPD_PC_NO_MEMMAP 1
#define KDUMPD_PC_KERNEL 2
#define KDUMPD_PC_SLAB 3
#define KDUMPD_PC_FREE 4
#define KDUMPD_PC_UNACCEPTED 5
#define KDUMPD_PC_CACHE 6
#define KDUMPD_PC_CACHE_PRIVATE 7
#define KDUMPD_PC_USER_ANON 8
#define KDUMPD_PC_USER_HUGETLB 9
#define KDUMPD_PC_HWPOISON 10
#define KDUMPD_PC_OFFLINE 11
#define KDUMPD_PC_TAIL 12
/* The pages after the head of an excluded compound folio (not of a buddy block): a
 * collector that cannot read the folio's order dumps them while it excludes the head. */
#define KDUMPD_PC_CACHE_TAIL 13
#define KDUMPD_PC_CACHE_PRIVATE_TAIL 14
#define KDUMPD_PC_USER_ANON_TAIL 15
#define KDUMPD_PC_USER_HUGETLB_TAIL 16

/* Where the compound order and hugetlb marker of a head live (see OrderSource). */
#define KDUMPD_ORDER_FLAGS1_MAPCOUNT 0 /* order in page[1].flags & 0xff, hugetlb page type */
#define KDUMPD_ORDER_FLAGS1_PG_HUGETLB 1 /* order in page[1].flags & 0xff, PG_hugetlb there */
#define KDUMPD_ORDER_BYTES 2 /* order and dtor are bytes of page[1] */

struct kdumpd_layout {
    uint32_t size_page;
    uint32_t off_flags, off_mapping, off_mapcount, off_private, off_head;
    uint32_t off_order, off_dtor; /* in page[1]; KDUMPD_ORDER_BYTES only */
    uint32_t order_source;
    /* Flag masks (1 << bit); 0 when the kernel has no such flag. */
    uint64_t m_lru, m_private, m_swapcache, m_swapbacked, m_head, m_slab, m_hwpoison, m_hugetlb;
    /* _mapcount/page_type markers (32 bits); -1 when the kernel has no such marker. */
    int64_t buddy_value, offline_value, hugetlb_value, slab_value, unaccepted_value;
    int64_t hugetlb_dtor; /* -1 when absent */
    uint32_t max_buddy_order; /* 1..63, checked by PageLayout */
};

/* A range (buddy block, folio) that ran past the end of the previous chunk. */
struct kdumpd_carry {
    int active;
    int poisoned;
    uint8_t cls;
    uint64_t start_pfn, end_pfn;
};

static inline uint64_t rd64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return le64toh(v);
}

static inline uint32_t rd32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return le32toh(v);
}

static inline int marker(int64_t value, uint32_t mapcount)
{
    return value >= 0 && (uint32_t)value == mapcount;
}

/* Classes whose head makedumpfile excludes together with its whole range. */
static inline int is_range_class(uint8_t c)
{
    switch (c) {
    case KDUMPD_PC_FREE: case KDUMPD_PC_UNACCEPTED: case KDUMPD_PC_CACHE:
    case KDUMPD_PC_CACHE_PRIVATE: case KDUMPD_PC_USER_ANON: case KDUMPD_PC_USER_HUGETLB:
    case KDUMPD_PC_HWPOISON: case KDUMPD_PC_OFFLINE:
        return 1;
    default:
        return 0;
    }
}

/* Page i's class as if evaluated on its own; *nr = pages its range covers (1 if none; <= 0
 * for an order-63 head, which then starts no range), *hwpoison = PG_hwpoison. The order of
 * the tests is makedumpfile's chain; see classify.py for each step's why. */
static uint8_t own_class(const struct kdumpd_layout *L, const unsigned char *pages, size_t n,
                         size_t i, uint64_t pfn, int64_t *nr, int *hwpoison)
{
    const unsigned char *pg = pages + i * L->size_page;
    uint64_t flags = rd64(pg + L->off_flags);
    uint32_t mapcount = rd32(pg + L->off_mapcount);
    uint64_t mapping = rd64(pg + L->off_mapping);
    uint64_t priv_word = rd64(pg + L->off_private);
    int tail = (rd64(pg + L->off_head) & 1) != 0;
    int slab = (flags & L->m_slab) != 0 || marker(L->slab_value, mapcount);
    int buddy = !slab && marker(L->buddy_value, mapcount);
    int unaccepted = marker(L->unaccepted_value, mapcount);
    int swapcache = (flags & L->m_swapcache) != 0
                    && (L->m_swapbacked == 0 || (flags & L->m_swapbacked) != 0);
    int cache = (flags & L->m_lru) != 0 || swapcache;
    int priv = (flags & L->m_private) != 0;
    int anon = (mapping & 1) != 0 && !slab;
    int offline = !slab && marker(L->offline_value, mapcount);
    int hugetlb = 0;
    int64_t compound_nr = 1;

    *hwpoison = (flags & L->m_hwpoison) != 0;
    /* A head's order and hugetlb marker come from page[1]; the last page of a chunk is never
     * taken for a head (a head is aligned to its order, so its page[1] is in the chunk). */
    if ((flags & L->m_head) != 0 && i + 1 < n) {
        const unsigned char *next = pg + L->size_page;
        uint64_t order;
        if (L->order_source == KDUMPD_ORDER_BYTES) {
            order = next[L->off_order];
            hugetlb = L->hugetlb_dtor >= 0 && (int64_t)next[L->off_dtor] == L->hugetlb_dtor;
        } else {
            uint64_t flags1 = rd64(next + L->off_flags);
            order = flags1 & 0xff;
            if (L->order_source == KDUMPD_ORDER_FLAGS1_MAPCOUNT)
                hugetlb = marker(L->hugetlb_value, mapcount); /* a page type of the head */
            else
                hugetlb = (flags1 & L->m_hugetlb) != 0;
        }
        /* An order the head's pfn is not aligned to is not believed: order 0. */
        if (order < 64 && (pfn & ((UINT64_C(1) << (order < 62 ? order : 62)) - 1)) == 0)
            compound_nr = (int64_t)(UINT64_C(1) << order);
    }
    *nr = compound_nr;

    if (tail)
        return KDUMPD_PC_TAIL;
    if (buddy) {
        if (priv_word >= L->max_buddy_order)
            return KDUMPD_PC_KERNEL; /* "Invalid free page order": makedumpfile keeps it */
        *nr = (int64_t)(UINT64_C(1) << priv_word);
        return KDUMPD_PC_FREE;
    }
    if (unaccepted) {
        *nr = (int64_t)(UINT64_C(1) << (L->max_buddy_order - 1));
        return KDUMPD_PC_UNACCEPTED;
    }
    if (cache && !priv && !anon)
        return KDUMPD_PC_CACHE;
    if (cache && !anon)
        return KDUMPD_PC_CACHE_PRIVATE;
    if (anon)
        return KDUMPD_PC_USER_ANON;
    if (hugetlb)
        return KDUMPD_PC_USER_HUGETLB;
    if (*hwpoison)
        return KDUMPD_PC_HWPOISON;
    if (offline)
        return KDUMPD_PC_OFFLINE;
    if (slab)
        return KDUMPD_PC_SLAB;
    return KDUMPD_PC_KERNEL;
}

/* The class of the pages after the head of a range of class c: its *_TAIL class when the
 * range is a compound folio, c itself for buddy blocks (free, unaccepted) and for classes
 * that are never reused (hwpoison, offline). */
static inline uint8_t tail_class(uint8_t c)
{
    switch (c) {
    case KDUMPD_PC_CACHE: return KDUMPD_PC_CACHE_TAIL;
    case KDUMPD_PC_CACHE_PRIVATE: return KDUMPD_PC_CACHE_PRIVATE_TAIL;
    case KDUMPD_PC_USER_ANON: return KDUMPD_PC_USER_ANON_TAIL;
    case KDUMPD_PC_USER_HUGETLB: return KDUMPD_PC_USER_HUGETLB_TAIL;
    default: return c;
    }
}

static int any_set(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 1;
    return 0;
}

/* Classify the n struct pages at `pages` (pfns start_pfn..): cls[i] and poisoned[i] (0/1)
 * for each. examined[i] == 0 (NULL: all examined) marks a pfn that gets no class of its own
 * (HOLE) and starts no range, though a range may cover it. `carry` is the range state across
 * chunks, read and updated. Returns 1 when the carried range turned out to hold a poisoned
 * page here: retract[0..1] is then the part of it planned in earlier chunks. */
static int kdumpd_classify(const struct kdumpd_layout *L, const unsigned char *pages, size_t n,
                           uint64_t start_pfn, const unsigned char *examined,
                           struct kdumpd_carry *carry, unsigned char *cls,
                           unsigned char *poisoned, uint64_t *retract)
{
    uint64_t end_pfn = start_pfn + n;
    size_t covered = 0; /* pages before this index have been decided by a range */
    int retracted = 0;
    size_t i;

    for (i = 0; i < n; i++) {
        int64_t nr;
        int hwpoison;
        uint8_t c = own_class(L, pages, n, i, start_pfn + i, &nr, &hwpoison);
        cls[i] = (examined && !examined[i]) ? KDUMPD_PC_HOLE : c;
        poisoned[i] = (unsigned char)hwpoison;
    }

    if (carry->active) {
        carry->active = 0;
        if (carry->end_pfn > start_pfn) {
            size_t upto = (size_t)((carry->end_pfn < end_pfn ? carry->end_pfn : end_pfn)
                                   - start_pfn);
            int hit = any_set(poisoned, upto);
            memset(cls, carry->cls, upto);
            if (hit && !carry->poisoned) {
                retract[0] = carry->start_pfn;
                retract[1] = start_pfn;
                retracted = 1;
            }
            carry->poisoned |= hit;
            if (carry->poisoned)
                memset(poisoned, 1, upto);
            covered = upto;
            if (carry->end_pfn > end_pfn)
                carry->active = 1;
        }
    }

    for (i = covered; i < n; i++) {
        int64_t nr;
        int hwpoison;
        uint8_t c = cls[i];
        size_t stop;
        int bad;
        if (!is_range_class(c)) /* HOLE (not examined) is not a range class */
            continue;
        own_class(L, pages, n, i, start_pfn + i, &nr, &hwpoison);
        if (nr <= 1)
            continue;
        stop = (uint64_t)nr > n - i ? n : i + (size_t)nr;
        bad = any_set(poisoned + i, stop - i);
        memset(cls + i + 1, tail_class(c), stop - i - 1);
        if (bad)
            memset(poisoned + i, 1, stop - i);
        if ((uint64_t)nr > n - i) {
            carry->active = 1;
            carry->cls = tail_class(c); /* the head is in this chunk */
            carry->start_pfn = start_pfn + i;
            carry->end_pfn = start_pfn + i + (uint64_t)nr;
            carry->poisoned = bad;
        }
        i = stop - 1;
    }
    return retracted;
}

/* Half-open runs [a, b) within [lo, hi) where lut[vals[i]] and not veto[i] (veto may be NULL),
 * as index pairs into out (room for hi - lo + 1 entries); returns the number of runs. */
static size_t kdumpd_runs(const unsigned char *vals, const unsigned char *veto, size_t lo,
                          size_t hi, const unsigned char *lut, uint32_t *out)
{
    size_t runs = 0, i = lo;
    while (i < hi) {
        size_t a;
        while (i < hi && !(lut[vals[i]] && !(veto && veto[i])))
            i++;
        if (i == hi)
            break;
        a = i;
        while (i < hi && lut[vals[i]] && !(veto && veto[i]))
            i++;
        out[2 * runs] = (uint32_t)a;
        out[2 * runs + 1] = (uint32_t)i;
        runs++;
    }
    return runs;
}

/* Plausibility checks of the layout over n struct pages (vaddr0: address of the first):
 * counts[0] += compound heads (PG_head, not the last page), counts[1] += heads whose page[1]
 * is not a tail pointing back at them (compound_head == the head's address | 1);
 * counts[2] += anonymous pages on the LRU (mapping & 1, PG_lru), counts[3] += those without
 * PG_swapbacked (only MADV_FREE'd pages lack it on a real kernel). A wrong OFFSET of flags,
 * compound_head or mapping makes most of them fail. */
static void kdumpd_check_pages(const struct kdumpd_layout *L, const unsigned char *pages,
                               size_t n, uint64_t vaddr0, uint64_t *counts)
{
    for (size_t i = 0; i < n; i++) {
        const unsigned char *pg = pages + i * L->size_page;
        uint64_t flags = rd64(pg + L->off_flags);
        if ((flags & L->m_head) != 0 && i + 1 < n) {
            counts[0]++;
            if (rd64(pg + L->size_page + L->off_head) != ((vaddr0 + i * L->size_page) | 1))
                counts[1]++;
        }
        if (L->m_swapbacked != 0 && (flags & L->m_lru) != 0
            && (rd64(pg + L->off_mapping) & 1) != 0) {
            counts[2]++;
            if ((flags & L->m_swapbacked) == 0)
                counts[3]++;
        }
    }
}

/* counts[v] += number of i with vals[i] == v. */
static void kdumpd_count(const unsigned char *vals, size_t n, uint64_t *counts)
{
    for (size_t i = 0; i < n; i++)
        counts[vals[i]]++;
}

/* 1 if the n bytes at p are all zero. */
static int kdumpd_is_zero(const unsigned char *p, size_t n)
{
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, sizeof(v));
        acc |= v;
    }
    for (; i < n; i++)
        acc |= p[i];
    return acc == 0;
}
