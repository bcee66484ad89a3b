/*
 * Guest-side helper of the safety scenarios (tests/vm/scenarios/safety.py),
 * built with `gcc -static -O2` like workload.c and run in the first kernel.
 *
 *   hazard anon TARGETS READY
 *       Maps 16 anonymous 4 KiB pages and one 2 MiB transparent huge page,
 *       fills them with the workload.c pattern (region 4 and 5), poisons
 *       pages 3, 7 and 11 with madvise(MADV_HWPOISON), soft-offlines page 13
 *       with madvise(MADV_SOFT_OFFLINE) and poisons 4 KiB page 100 of the THP
 *       (which splits it).  Appends "pfn method kind detail" for each target
 *       to TARGETS, creates READY and sleeps until the crash, so the poisoned
 *       pages still belong to a live process.  Poisoned pages are never
 *       touched again (that would be a SIGBUS).
 *
 *   hazard file-pfn FILE INDEX
 *       Prints the frame of page INDEX of FILE's page cache (mapping it
 *       read-only and faulting it in); the page stays cached after unmap.
 *
 *   hazard file-poison FILE INDEX
 *       Prints that frame, then poisons it with madvise(MADV_HWPOISON) on a
 *       shared read-only mapping: the page-cache page itself is hit.
 *
 *   hazard free-block MIN_ORDER SKIP
 *       Scans /proc/kpageflags for a free buddy block of the largest order
 *       >= MIN_ORDER it can find (MAX_ORDER-1 = 10 first): 2^order frames,
 *       aligned to 2^order, whose flags are all exactly KPF_BUDDY.  The
 *       kernel reports KPF_BUDDY for every frame of a free block, not only
 *       its head, and buddies always merge, so such a run is one free block
 *       of that order (or part of a larger one).  Skips the first SKIP such
 *       blocks and prints "head_pfn order".
 *
 *   hazard kpf PFN
 *       Prints /proc/kpageflags of PFN in hex.
 *
 *   hazard fill FILE MIB
 *       Writes MIB MiB to FILE, every 4 KiB page starting with "KDUMPDHP"
 *       and its little-endian u64 index, then 0xA5 bytes.
 *
 *   hazard copy SOURCE DEVICE ERRFILE
 *       Like `workload rawput DEVICE 0 < SOURCE`, but survives read errors:
 *       a 4 MiB chunk that fails is re-read page by page, pages that still
 *       fail are written as zeros and their file ranges are appended to
 *       ERRFILE as "offset end errno".  Prints the bytes copied (the size of
 *       SOURCE).  Used in the capture kernel where /proc/vmcore may not be
 *       readable everywhere.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MADV_HWPOISON
#define MADV_HWPOISON 100
#endif
#ifndef MADV_SOFT_OFFLINE
#define MADV_SOFT_OFFLINE 101
#endif

#define PAGE_SIZE 4096UL
#define HUGE_SIZE (2UL << 20)
#define PATTERN_SEED 0x9E3779B97F4A7C15ULL
#define KPF_BUDDY (1ULL << 10)
#define KPF_THP (1ULL << 22)
#define REGION_ANON 4
#define REGION_THP 5
#define MAX_ORDER_SCAN 10

static void __attribute__((noreturn)) die(const char *what)
{
	fprintf(stderr, "hazard: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fill_page(uint64_t *page, uint64_t region, uint64_t index)
{
	memcpy(page, "KDUMPDWL", 8);
	page[1] = (region << 32) | index;
	for (uint64_t j = 2; j < PAGE_SIZE / 8; j++)
		page[j] = PATTERN_SEED ^ (region << 56) ^ (index << 12) ^ j;
}

static uint64_t pfn_of(const void *addr)
{
	uint64_t entry;
	int fd = open("/proc/self/pagemap", O_RDONLY);

	if (fd < 0)
		die("open pagemap");
	if (pread(fd, &entry, 8, (off_t)((uintptr_t)addr / PAGE_SIZE * 8)) != 8)
		die("pread pagemap");
	close(fd);
	if (!(entry >> 63)) {
		fprintf(stderr, "hazard: page not present\n");
		exit(1);
	}
	return entry & ((1ULL << 55) - 1);
}

static uint64_t kpf(uint64_t pfn)
{
	uint64_t flags;
	int fd = open("/proc/kpageflags", O_RDONLY);

	if (fd < 0)
		die("open kpageflags");
	if (pread(fd, &flags, 8, (off_t)(pfn * 8)) != 8)
		die("pread kpageflags");
	close(fd);
	return flags;
}

static void target(FILE *out, uint64_t pfn, const char *method, const char *kind,
		   const char *detail)
{
	fprintf(out, "%lu %s %s %s\n", (unsigned long)pfn, method, kind, detail);
	fflush(out);
}

static char *map_aligned(size_t size, int advice)
{
	char *raw = mmap(NULL, size + HUGE_SIZE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		die("mmap");
	char *p = (char *)(((uintptr_t)raw + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1));
	if (madvise(p, size, advice))
		die("madvise");
	return p;
}

static int cmd_anon(char **argv)
{
	FILE *out = fopen(argv[0], "a");
	char detail[64];

	if (!out)
		die("open targets");
	char *anon = map_aligned(16 * PAGE_SIZE, MADV_NOHUGEPAGE);
	for (size_t i = 0; i < 16; i++)
		fill_page((uint64_t *)(anon + i * PAGE_SIZE), REGION_ANON, i);
	char *thp = map_aligned(HUGE_SIZE, MADV_HUGEPAGE);
	for (size_t i = 0; i < HUGE_SIZE / PAGE_SIZE; i++)
		fill_page((uint64_t *)(thp + i * PAGE_SIZE), REGION_THP, i);

	static const int hard[] = { 3, 7, 11 };
	for (size_t i = 0; i < sizeof(hard) / sizeof(hard[0]); i++) {
		char *page = anon + hard[i] * PAGE_SIZE;
		uint64_t pfn = pfn_of(page);
		snprintf(detail, sizeof(detail), "live-process-page-%d", hard[i]);
		if (madvise(page, PAGE_SIZE, MADV_HWPOISON))
			die("madvise MADV_HWPOISON anon");
		target(out, pfn, "madvise-hwpoison", "anon", detail);
	}
	{
		char *page = anon + 13 * PAGE_SIZE;
		uint64_t pfn = pfn_of(page);
		if (madvise(page, PAGE_SIZE, MADV_SOFT_OFFLINE))
			die("madvise MADV_SOFT_OFFLINE anon");
		/* The data moved to a new frame; the old one is poisoned. */
		snprintf(detail, sizeof(detail), "migrated-to-%lu",
			 (unsigned long)pfn_of(page));
		target(out, pfn, "madvise-soft-offline", "anon", detail);
	}
	{
		char *page = thp + 100 * PAGE_SIZE;
		uint64_t pfn = pfn_of(page);
		int is_thp = (kpf(pfn) & KPF_THP) != 0;
		if (madvise(page, PAGE_SIZE, MADV_HWPOISON))
			die("madvise MADV_HWPOISON thp");
		snprintf(detail, sizeof(detail), "subpage-100-of-%s",
			 is_thp ? "thp" : "non-thp-2m-region");
		target(out, pfn, "madvise-hwpoison", is_thp ? "thp" : "anon", detail);
	}
	if (fclose(out))
		die("close targets");
	int ready = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (ready < 0)
		die("create ready file");
	close(ready);
	for (;;)
		pause();
	return 0;
}

static char *map_file_page(const char *path, long index, int *fd_out)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		die("open file");
	char *p = mmap(NULL, PAGE_SIZE, PROT_READ, MAP_SHARED, fd, index * (off_t)PAGE_SIZE);
	if (p == MAP_FAILED)
		die("mmap file");
	volatile char c = p[0];
	(void)c;
	*fd_out = fd;
	return p;
}

static int cmd_file_pfn(char **argv, int poison)
{
	int fd;
	char *p = map_file_page(argv[0], strtol(argv[1], NULL, 0), &fd);
	uint64_t pfn = pfn_of(p);

	printf("%lu\n", (unsigned long)pfn);
	fflush(stdout);
	if (poison && madvise(p, PAGE_SIZE, MADV_HWPOISON))
		die("madvise MADV_HWPOISON file");
	munmap(p, PAGE_SIZE);
	close(fd);
	return 0;
}

static int cmd_free_block(char **argv)
{
	int min_order = atoi(argv[0]);
	long skip = atol(argv[1]);
	int fd = open("/proc/kpageflags", O_RDONLY);

	if (fd < 0)
		die("open kpageflags");
	/* /proc/kpageflags has no size; read until EOF. */
	size_t cap = 1 << 20, n = 0;
	uint64_t *flags = malloc(cap * 8);
	for (;;) {
		if (n == cap) {
			cap *= 2;
			flags = realloc(flags, cap * 8);
		}
		if (!flags)
			die("malloc");
		ssize_t got = read(fd, flags + n, (cap - n) * 8);
		if (got < 0)
			die("read kpageflags");
		if (got == 0)
			break;
		n += (size_t)got / 8;
	}
	close(fd);
	for (int order = MAX_ORDER_SCAN; order >= min_order; order--) {
		size_t size = 1UL << order;
		long seen = 0;
		for (size_t head = 0; head + size <= n; head += size) {
			size_t i;
			for (i = 0; i < size && flags[head + i] == KPF_BUDDY; i++)
				;
			if (i < size)
				continue;
			if (seen++ < skip)
				continue;
			printf("%lu %d\n", (unsigned long)head, order);
			return 0;
		}
	}
	fprintf(stderr, "hazard: no free block of order >= %d\n", min_order);
	return 1;
}

static int cmd_fill(char **argv)
{
	const size_t chunk = 1UL << 20;
	unsigned long mib = strtoul(argv[1], NULL, 0);
	char *buf = malloc(chunk);
	int fd = open(argv[0], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	uint64_t index = 0;

	if (fd < 0)
		die("open fill file");
	if (!buf)
		die("malloc");
	memset(buf, 0xA5, chunk);
	for (unsigned long m = 0; m < mib; m++) {
		for (size_t off = 0; off < chunk; off += PAGE_SIZE, index++) {
			memcpy(buf + off, "KDUMPDHP", 8);
			memcpy(buf + off + 8, &index, 8);
		}
		if (write(fd, buf, chunk) != (ssize_t)chunk)
			die("write fill file");
	}
	if (close(fd))
		die("close fill file");
	return 0;
}

static void record_error(FILE *errs, off_t *start, off_t *end, int *err,
			 off_t off, int e)
{
	if (*end == off && *err == e) {
		*end = off + (off_t)PAGE_SIZE;
		return;
	}
	if (*end > *start)
		fprintf(errs, "%lld %lld %d\n", (long long)*start, (long long)*end, *err);
	*start = off;
	*end = off + (off_t)PAGE_SIZE;
	*err = e;
}

static int cmd_copy(char **argv)
{
	const size_t chunk = 4UL << 20;
	int src = open(argv[0], O_RDONLY);
	int dst = open(argv[1], O_WRONLY | O_DIRECT);
	FILE *errs = fopen(argv[2], "w");
	struct stat st;
	char *buf;
	off_t err_start = 0, err_end = 0;
	int err_no = 0;

	if (src < 0)
		die("open source");
	if (dst < 0)
		die("open device");
	if (!errs)
		die("open error file");
	if (fstat(src, &st))
		die("stat source");
	if (posix_memalign((void **)&buf, PAGE_SIZE, chunk))
		die("posix_memalign");
	for (off_t off = 0; off < st.st_size; off += (off_t)chunk) {
		size_t want = (size_t)(st.st_size - off) < chunk ? (size_t)(st.st_size - off) : chunk;
		ssize_t n = pread(src, buf, want, off);
		if (n != (ssize_t)want) {
			for (size_t p = 0; p < want; p += PAGE_SIZE) {
				size_t len = want - p < PAGE_SIZE ? want - p : PAGE_SIZE;
				ssize_t m = pread(src, buf + p, len, off + (off_t)p);
				if (m != (ssize_t)len) {
					memset(buf + p, 0, len);
					record_error(errs, &err_start, &err_end, &err_no,
						     off + (off_t)p, m < 0 ? errno : 0);
				}
			}
		}
		size_t padded = (want + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
		memset(buf + want, 0, padded - want);
		if (pwrite(dst, buf, padded, off) != (ssize_t)padded)
			die("pwrite device");
	}
	record_error(errs, &err_start, &err_end, &err_no, -1, -1);
	if (fclose(errs))
		die("close error file");
	if (fsync(dst))
		die("fsync device");
	printf("%lld\n", (long long)st.st_size);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "anon"))
		return cmd_anon(argv + 2);
	if (argc == 4 && !strcmp(argv[1], "file-pfn"))
		return cmd_file_pfn(argv + 2, 0);
	if (argc == 4 && !strcmp(argv[1], "file-poison"))
		return cmd_file_pfn(argv + 2, 1);
	if (argc == 4 && !strcmp(argv[1], "free-block"))
		return cmd_free_block(argv + 2);
	if (argc == 4 && !strcmp(argv[1], "fill"))
		return cmd_fill(argv + 2);
	if (argc == 5 && !strcmp(argv[1], "copy"))
		return cmd_copy(argv + 2);
	if (argc == 3 && !strcmp(argv[1], "kpf")) {
		printf("0x%lx\n", (unsigned long)kpf(strtoull(argv[2], NULL, 0)));
		return 0;
	}
	fprintf(stderr,
		"usage: hazard anon TARGETS READY | file-pfn FILE INDEX |\n"
		"       file-poison FILE INDEX | free-block MIN_ORDER SKIP | kpf PFN |\n"
		"       fill FILE MIB | copy SOURCE DEVICE ERRFILE\n");
	return 2;
}
