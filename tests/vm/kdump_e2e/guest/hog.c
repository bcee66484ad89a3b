/* The memory-hungry capture step of the kdumpd end-to-end test.
 *
 *   hog anon MIB PASSES REPORT          anonymous memory (needs swap beyond RAM)
 *   hog file PATH MIB PASSES REPORT     a MAP_SHARED file (needs a filesystem beyond RAM)
 *
 * Fills MIB MiB with a pattern unique to every page and pass, then PASSES times: verifies
 * every page and rewrites it with the next pass's pattern; a last sweep verifies. Every page
 * is checked in full, so any byte that comes back different (from swap, or from the
 * filesystem) is counted: "wrong_pages" is the number of page reads that returned other
 * bytes than were written, "wrong_bytes" their differing bytes. The report is JSON.
 *
 * Under memory pressure without swap the kernel's OOM killer ends it (the test sets its
 * oom_score_adj to 1000 so it is the one chosen); mmap uses MAP_NORESERVE so that the
 * allocation itself never fails and the OOM happens where a real program's would: on use.
 *
 * Static, no dependencies: built on the host with gcc -static.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void fill(uint64_t *p, uint64_t page, uint64_t pass)
{
    uint64_t s = (page << 8) ^ pass ^ 0x6b64756d70646864ULL;
    p[0] = 0x474f48444d55444bULL; /* "KDUMDHOG" */
    p[1] = page;
    p[2] = pass;
    for (unsigned i = 3; i < WORDS; i++)
        p[i] = splitmix(&s);
}

/* Number of differing bytes of page `page` against pass `pass`'s pattern (0 = intact). */
static unsigned check(const uint64_t *p, uint64_t page, uint64_t pass)
{
    uint64_t want[WORDS];
    fill(want, page, pass);
    if (memcmp(p, want, PAGE) == 0)
        return 0;
    const unsigned char *a = (const unsigned char *)p, *b = (const unsigned char *)want;
    unsigned n = 0;
    for (unsigned i = 0; i < PAGE; i++)
        n += a[i] != b[i];
    return n;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    int file_mode = argc == 6 && strcmp(argv[1], "file") == 0;
    if (!(argc == 5 && strcmp(argv[1], "anon") == 0) && !file_mode) {
        fprintf(stderr, "usage: hog anon MIB PASSES REPORT | hog file PATH MIB PASSES REPORT\n");
        return 2;
    }
    int a = file_mode ? 3 : 2;
    uint64_t mib = strtoull(argv[a], NULL, 10);
    unsigned passes = (unsigned)strtoul(argv[a + 1], NULL, 10);
    const char *report = argv[a + 2];
    uint64_t pages = mib * (1UL << 20) / PAGE;
    size_t len = pages * PAGE;
    unsigned char *mem;

    if (file_mode) {
        int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
        if (fd < 0 || ftruncate(fd, (off_t)len) != 0) {
            perror(argv[2]);
            return 3;
        }
        mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
    } else {
        mem = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    }
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 3;
    }
    madvise(mem, len, MADV_NOHUGEPAGE);

    uint64_t wrong_pages = 0, wrong_bytes = 0, first_wrong = UINT64_MAX;
    double t0 = now(), sweep_s[64];
    unsigned sweeps = 0;
    printf("hog: %s %" PRIu64 " MiB, %u passes\n", file_mode ? "file" : "anon", mib, passes);
    fflush(stdout);
    for (unsigned pass = 0; pass <= passes; pass++) {
        double ts = now();
        for (uint64_t i = 0; i < pages; i++) {
            uint64_t *p = (uint64_t *)(mem + i * PAGE);
            if (pass > 0) {
                unsigned bad = check(p, i, pass - 1);
                if (bad) {
                    wrong_pages++;
                    wrong_bytes += bad;
                    if (first_wrong == UINT64_MAX)
                        first_wrong = i;
                }
            }
            if (pass < passes)
                fill(p, i, pass);
            if ((i + 1) % (pages / 4 ? pages / 4 : 1) == 0) {
                printf("hog: sweep %u %3" PRIu64 "%% (%.1f s)\n", pass,
                       (i + 1) * 100 / pages, now() - t0);
                fflush(stdout);
            }
        }
        if (file_mode && msync(mem, len, MS_SYNC) != 0)
            perror("msync");
        if (sweeps < 64)
            sweep_s[sweeps++] = now() - ts;
    }
    double total = now() - t0;

    FILE *out = fopen(report, "w");
    if (!out) {
        perror(report);
        return 3;
    }
    fprintf(out, "{\"mode\": \"%s\", \"mib\": %" PRIu64 ", \"passes\": %u, \"pages\": %" PRIu64
            ", \"page_reads\": %" PRIu64 ", \"wrong_pages\": %" PRIu64 ", \"wrong_bytes\": %"
            PRIu64 ", \"first_wrong_page\": %" PRId64 ", \"seconds\": %.2f, \"sweep_seconds\": [",
            file_mode ? "file" : "anon", mib, passes, pages, pages * passes, wrong_pages,
            wrong_bytes, first_wrong == UINT64_MAX ? (int64_t)-1 : (int64_t)first_wrong, total);
    for (unsigned i = 0; i < sweeps; i++)
        fprintf(out, "%s%.2f", i ? ", " : "", sweep_s[i]);
    fprintf(out, "]}\n");
    fclose(out);
    printf("hog: done in %.1f s, %" PRIu64 " wrong pages\n", total, wrong_pages);
    return wrong_pages ? 1 : 0;
}
