/*
 * Guest-side helper for tests/vm/mkvmcore.py, built with `gcc -static -O2`
 * and run inside the QEMU guests (first kernel and kdump kernel).
 *
 *   workload run ANON_MIB THP_MIB HUGETLB_MIB PFN_FILE READY_FILE
 *       Maps three anonymous regions (4 KiB pages, transparent huge pages,
 *       hugetlb pages), fills every page with the deterministic pattern
 *       below, writes the physical frame ranges backing them to PFN_FILE,
 *       creates READY_FILE and then sleeps until the machine crashes.  The
 *       process must still be alive at the crash so its pages are "user"
 *       pages in the vmcore, which is why it never exits on success.
 *
 *   workload rawput DEVICE OFFSET
 *       Copies stdin to DEVICE at byte OFFSET with O_DIRECT, padding the
 *       last block with zeros, and prints the number of payload bytes.
 *       O_DIRECT keeps the copy out of the page cache, so saving metadata
 *       just before the crash barely perturbs the memory being dumped, and
 *       copying /proc/vmcore in the 256 MiB kdump kernel does not thrash.
 *
 * Page pattern (checked by tests/vm/vmcores.py:workload_page):
 *   bytes 0..7   "KDUMPDWL"
 *   bytes 8..15  little-endian u64 (region << 32) | page_index
 *   word j>=2    PATTERN_SEED ^ (region << 56) ^ (page_index << 12) ^ j
 * Regions: 1 = anon 4 KiB, 2 = THP, 3 = hugetlb.  page_index counts 4 KiB
 * pages from the start of the region.
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

#define PAGE_SIZE 4096UL
#define HUGE_SIZE (2UL << 20)
#define PATTERN_SEED 0x9E3779B97F4A7C15ULL
#define RAWPUT_CHUNK (4UL << 20)

static void die(const char *what)
{
	fprintf(stderr, "workload: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fill_page(uint64_t *page, uint64_t region, uint64_t index)
{
	memcpy(page, "KDUMPDWL", 8);
	page[1] = (region << 32) | index;
	for (uint64_t j = 2; j < PAGE_SIZE / 8; j++)
		page[j] = PATTERN_SEED ^ (region << 56) ^ (index << 12) ^ j;
}

static void fill_region(char *base, size_t size, uint64_t region)
{
	for (size_t off = 0; off < size; off += PAGE_SIZE)
		fill_page((uint64_t *)(base + off), region, off / PAGE_SIZE);
}

/* mmap `size` bytes aligned to 2 MiB, so THP can back the whole region. */
static char *map_aligned(size_t size)
{
	char *raw = mmap(NULL, size + HUGE_SIZE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		die("mmap");
	uintptr_t aligned = ((uintptr_t)raw + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1);
	return (char *)aligned;
}

static char *map_region(size_t size, int kind)
{
	char *p;

	if (size == 0)
		return NULL;
	if (kind == 3) {
		p = mmap(NULL, size, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
		if (p == MAP_FAILED)
			die("mmap MAP_HUGETLB");
		return p;
	}
	p = map_aligned(size);
	if (madvise(p, size, kind == 2 ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
		die("madvise");
	return p;
}

/* Writes "region first_index first_pfn count" runs of contiguous frames. */
static void dump_pfns(FILE *out, int pagemap, char *base, size_t size,
		      uint64_t region)
{
	uint64_t run_index = 0, run_pfn = 0, run_len = 0;

	for (size_t off = 0; off < size; off += PAGE_SIZE) {
		uint64_t entry;
		off_t pos = (off_t)((uintptr_t)(base + off) / PAGE_SIZE * 8);

		if (pread(pagemap, &entry, 8, pos) != 8)
			die("pread pagemap");
		if (!(entry >> 63)) {
			fprintf(stderr, "workload: page not present\n");
			exit(1);
		}
		uint64_t pfn = entry & ((1ULL << 55) - 1);
		uint64_t index = off / PAGE_SIZE;
		if (run_len && pfn == run_pfn + run_len &&
		    index == run_index + run_len) {
			run_len++;
			continue;
		}
		if (run_len)
			fprintf(out, "%lu %lu %lu %lu\n", (unsigned long)region,
				(unsigned long)run_index,
				(unsigned long)run_pfn, (unsigned long)run_len);
		run_index = index;
		run_pfn = pfn;
		run_len = 1;
	}
	if (run_len)
		fprintf(out, "%lu %lu %lu %lu\n", (unsigned long)region,
			(unsigned long)run_index, (unsigned long)run_pfn,
			(unsigned long)run_len);
}

static int cmd_run(char **argv)
{
	size_t sizes[3];
	char *bases[3];

	for (int i = 0; i < 3; i++)
		sizes[i] = strtoul(argv[i], NULL, 10) << 20;
	for (int i = 0; i < 3; i++) {
		bases[i] = map_region(sizes[i], i + 1);
		if (bases[i])
			fill_region(bases[i], sizes[i], i + 1);
	}

	int pagemap = open("/proc/self/pagemap", O_RDONLY);
	if (pagemap < 0)
		die("open pagemap");
	FILE *out = fopen(argv[3], "w");
	if (!out)
		die("open pfn file");
	fprintf(out, "# region first_page_index first_pfn count\n");
	for (int i = 0; i < 3; i++)
		if (bases[i])
			dump_pfns(out, pagemap, bases[i], sizes[i], i + 1);
	if (fclose(out))
		die("close pfn file");
	close(pagemap);

	int ready = open(argv[4], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (ready < 0)
		die("create ready file");
	close(ready);
	for (;;)
		pause();
}

/* Reads until `buf` is full or EOF; returns the byte count. */
static size_t read_full(int fd, char *buf, size_t size)
{
	size_t got = 0;

	while (got < size) {
		ssize_t n = read(fd, buf + got, size - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("read stdin");
		if (n == 0)
			break;
		got += (size_t)n;
	}
	return got;
}

static int cmd_rawput(char **argv)
{
	off_t offset = (off_t)strtoull(argv[1], NULL, 0);
	unsigned long long total = 0;
	void *buf;
	int fd = open(argv[0], O_WRONLY | O_DIRECT);

	if (fd < 0)
		die("open device");
	if (offset % PAGE_SIZE) {
		fprintf(stderr, "workload: offset not page aligned\n");
		return 1;
	}
	if (posix_memalign(&buf, PAGE_SIZE, RAWPUT_CHUNK))
		die("posix_memalign");
	for (;;) {
		size_t n = read_full(0, buf, RAWPUT_CHUNK);
		if (n == 0)
			break;
		size_t padded = (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
		memset((char *)buf + n, 0, padded - n);
		if (pwrite(fd, buf, padded, offset) != (ssize_t)padded)
			die("pwrite device");
		offset += (off_t)padded;
		total += n;
		if (n < RAWPUT_CHUNK)
			break;
	}
	if (fsync(fd))
		die("fsync device");
	close(fd);
	printf("%llu\n", total);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 7 && !strcmp(argv[1], "run"))
		return cmd_run(argv + 2);
	if (argc == 4 && !strcmp(argv[1], "rawput"))
		return cmd_rawput(argv + 2);
	fprintf(stderr,
		"usage: workload run ANON_MIB THP_MIB HUGETLB_MIB PFN_FILE READY_FILE\n"
		"       workload rawput DEVICE OFFSET < data\n");
	return 2;
}
