#!/usr/bin/python3
"""Store throughput against a plain numpy memcpy of the same bytes, measured in one run.

    PYTHONPATH=daemon /usr/bin/python3 bench/bench_store.py [--seconds 0.4] [--copies 1,2,3]

For each copy count N and each checksum kernel (pure Python, and cffi if it can be built), the
store runs over an image in /dev/shm: sequential reads and writes at 4 KiB, 64 KiB and 1 MiB,
and random 4 KiB reads and writes, one request per call, as nbdkit would issue them. The anchor
is numpy copying the same request sizes from the same mapping in the same kind of loop
("memcpy"): the ratio is the store's throughput over the anchor's. It also prints the
checksums' GB/s, 4 KiB random-read rates with 1, 2 and 4 threads (the store's lock vs the
GIL), and CPU time per request of first writes (fresh device, after a trim) against overwrites
(``--first-writes`` prints only those). No figure is asserted: absolute numbers are noisy on
shared machines, ratios less so.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from kdumpd.oldmem.image import ImageOldMem  # noqa: E402
from kdumpd.store.blockstore import BlockStore  # noqa: E402
from kdumpd.store.blocksum import BlockSums, PyBlockSums, checksum, load_cffi  # noqa: E402
from kdumpd.store.placement import Placement  # noqa: E402
from kdumpd.units import PAGE_SHIFT, Extent, PhysRange  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
BASE = 1 << 32  # physical base of the image (offset != address, as in a vmcore)
POOL = 320 * MiB
DEVICE = 64 * MiB
SIZES = [4 * KiB, 64 * KiB, 1 * MiB]


def timed(fn: Callable[[], int], seconds: float) -> float:
    """Run ``fn`` (returns bytes or ops done) repeatedly for about ``seconds``; rate per s."""
    fn()  # warm: page faults, caches
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def cffi_sums() -> BlockSums | None:
    sums = load_cffi()
    if sums is not None:
        return sums
    try:
        from kdumpd.store._build_blocksum import build

        return load_cffi(build(tempfile.mkdtemp(prefix="kdumpd-cffi-")))
    except Exception as exc:  # noqa: BLE001 - a bench reports, it does not fail
        print(f"# cffi kernels unavailable: {exc}")
        return None


def bench_checksums(seconds: float, sums: BlockSums | None) -> None:
    print("\nchecksum speed (GB/s)")
    print(f"{'checksum':<28}{'4 KiB':>10}{'1 MiB':>10}")
    small, big = os.urandom(4 * KiB), os.urandom(1 * MiB)
    rows: list[tuple[str, Callable[[bytes], object]]] = [
        ("xxh3_64 (python-xxhash)", checksum),
        ("zlib.crc32", zlib.crc32),
    ]
    try:
        import crc32c

        hw = "hardware" if getattr(crc32c, "hardware_based", False) else "software"
        rows.insert(1, (f"crc32c ({hw})", crc32c.crc32c))
    except ImportError:
        pass
    for name, fn in rows:
        r4 = timed(lambda fn=fn: (fn(small), len(small))[1], seconds / 4)
        r1 = timed(lambda fn=fn: (fn(big), len(big))[1], seconds / 4)
        print(f"{name:<28}{r4 / 1e9:>10.1f}{r1 / 1e9:>10.1f}")
    mv = memoryview(big)
    for ks in ([PyBlockSums()] + ([sums] if sums else [])):
        expected = memoryview(array("Q", ks.checksums(mv)))  # as the store passes its table
        r = timed(lambda ks=ks, e=expected: (ks.first_bad(mv, e), len(big))[1], seconds / 4)
        print(f"{'verify 256 blocks, ' + ks.name:<28}{'':>10}{r / 1e9:>10.1f}")


def make_store(tmpdir: str, copies: int, sums: BlockSums) -> tuple[BlockStore, ImageOldMem]:
    path = os.path.join(tmpdir, f"pool{copies}{sums.name}")
    image = ImageOldMem.create(path, POOL, [PhysRange(BASE, BASE + POOL, 0)])
    extents = [Extent(BASE >> PAGE_SHIFT, (BASE + POOL) >> PAGE_SHIFT)]
    store = BlockStore(image, Placement.from_extents(extents, copies), size_bytes=DEVICE,
                       block_sums=sums)
    store.write(0, os.urandom(DEVICE))
    return store, image


def workloads(
    store: BlockStore, src: np.ndarray, seconds: float
) -> list[tuple[str, int, float, float]]:
    """(test, request size, store B/s, memcpy B/s) for each pattern."""
    out = []
    rng = random.Random(1)
    rand_offsets = [rng.randrange(DEVICE >> 12) << 12 for _ in range(1 << 14)]
    for size in SIZES:
        buf = bytearray(size)
        mv = memoryview(buf)
        dst = np.frombuffer(buf, dtype=np.uint8)
        offsets = range(0, min(DEVICE, 4096 * size), size)

        def store_read(offsets=offsets, mv=mv, size=size) -> int:
            for off in offsets:
                store.readinto(off, mv)
            return len(offsets) * size

        def store_write(offsets=offsets, mv=mv, size=size) -> int:
            for off in offsets:
                store.write(off, mv)
            return len(offsets) * size

        def memcpy(offsets=offsets, dst=dst, size=size) -> int:
            for off in offsets:
                np.copyto(dst, src[off : off + size])
            return len(offsets) * size

        base = timed(memcpy, seconds)
        buf[:] = os.urandom(size)  # writes of zeros would be stored as holes
        out.append((f"seq read {size // KiB} KiB", size, timed(store_read, seconds), base))
        out.append((f"seq write {size // KiB} KiB", size, timed(store_write, seconds), base))
    buf = bytearray(os.urandom(4 * KiB))
    mv = memoryview(buf)
    dst = np.frombuffer(buf, dtype=np.uint8)

    def rand_read() -> int:
        for off in rand_offsets:
            store.readinto(off, mv)
        return len(rand_offsets) * 4 * KiB

    def rand_write() -> int:
        for off in rand_offsets:
            store.write(off, mv)
        return len(rand_offsets) * 4 * KiB

    def rand_memcpy() -> int:
        for off in rand_offsets:
            np.copyto(dst, src[off : off + 4 * KiB])
        return len(rand_offsets) * 4 * KiB

    base = timed(rand_memcpy, seconds)
    out.append(("rand read 4 KiB", 4 * KiB, timed(rand_read, seconds), base))
    out.append(("rand write 4 KiB", 4 * KiB, timed(rand_write, seconds), base))
    return out


def bench_threads(store: BlockStore, seconds: float) -> None:
    print("\n4 KiB random reads, N=2, threads sharing one store (the lock and the GIL)")
    for nthreads in (1, 2, 4):
        counts = [0] * nthreads
        stop = threading.Event()

        def worker(i: int, stop: threading.Event = stop, counts: list[int] = counts) -> None:
            rng = random.Random(i)
            mv = memoryview(bytearray(4 * KiB))
            nblocks = DEVICE >> 12
            while not stop.is_set():
                for _ in range(256):
                    store.readinto(rng.randrange(nblocks) << 12, mv)
                counts[i] += 256

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        rate = sum(counts) / (time.perf_counter() - start)
        print(f"  {nthreads} thread(s): {rate / 1e3:8.0f} k reads/s")


def bench_first_writes(tmpdir: str, sums: BlockSums, seconds: float) -> None:
    """CPU time per write request (this thread's, so other load on the machine does not
    count) for first writes (fresh device; after a whole-device trim, as swap writes into
    discarded slots) and overwrites, sequential, N=2, on the default path (C when built)."""
    print("\nfirst writes vs overwrites, N=2, sequential, CPU us per request (thread time)")
    print(f"{'size':<8}{'fresh device':>14}{'after trim':>12}{'overwrite':>11}")
    data = os.urandom(1 * MiB)
    for size in (4 * KiB, 64 * KiB):
        mv = memoryview(data)[:size]
        nreq = DEVICE // size
        cpu: dict[str, list[float]] = {"fresh": [], "trim": [], "over": []}
        # One image, every page touched first (old memory is present RAM; the first touch of
        # a tmpfs page is a page fault, not the store's work); a new store on it each round.
        path = os.path.join(tmpdir, "first")
        image = ImageOldMem.create(path, POOL, [PhysRange(BASE, BASE + POOL, 0)])
        image.burst(BASE, POOL, b"\xa5")
        extents = [Extent(BASE >> PAGE_SHIFT, (BASE + POOL) >> PAGE_SHIFT)]
        deadline = time.perf_counter() + 3 * seconds
        while time.perf_counter() < deadline or not cpu["over"]:
            store = BlockStore(image, Placement.from_extents(extents, 2), size_bytes=DEVICE,
                               block_sums=sums)
            for kind in ("fresh", "over", "trim", "over"):
                if kind == "trim":
                    store.trim(0, DEVICE)
                t0 = time.thread_time()
                for off in range(0, DEVICE, size):
                    store.write(off, mv)
                cpu[kind].append((time.thread_time() - t0) / nreq * 1e6)
            store.close()
        image.close()
        os.unlink(path)
        print(f"{size // KiB:>4} KiB{min(cpu['fresh']):>14.2f}{min(cpu['trim']):>12.2f}"
              f"{min(cpu['over']):>11.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=0.4, help="per measurement")
    ap.add_argument("--copies", default="1,2,3")
    ap.add_argument("--first-writes", action="store_true",
                    help="only the first-write vs overwrite CPU figures")
    args = ap.parse_args()
    tmpdir = tempfile.mkdtemp(prefix="kdumpd-bench-", dir="/dev/shm" if
                              os.path.isdir("/dev/shm") else None)
    sums = cffi_sums()
    if args.first_writes:
        bench_first_writes(tmpdir, sums or PyBlockSums(), args.seconds)
        os.rmdir(tmpdir)
        return
    print(f"# python {sys.version.split()[0]}, numpy {np.__version__}, cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.2f}, image in {tmpdir}")
    kernels: list[BlockSums] = [PyBlockSums()] + ([sums] if sums else [])
    print(f"\n{'test':<20}{'kernel':<8}{'N':>3}{'store GB/s':>12}{'req/s':>10}"
          f"{'memcpy GB/s':>13}{'req/s':>10}{'ratio':>7}")
    keep: BlockStore | None = None
    for copies in [int(c) for c in args.copies.split(",")]:
        for ks in kernels:
            store, image = make_store(tmpdir, copies, ks)
            src = np.frombuffer(image._mm, dtype=np.uint8)  # same mapping the store reads
            for name, size, rate, base in workloads(store, src, args.seconds):
                print(f"{name:<20}{ks.name:<8}{copies:>3}{rate / 1e9:>12.2f}"
                      f"{rate / size / 1e3:>9.0f}k{base / 1e9:>13.2f}{base / size / 1e3:>9.0f}k"
                      f"{rate / base:>7.2f}")
            st = store.stats()
            print(f"{'':<31}metadata {st.metadata_bytes / (DEVICE >> 12):.1f} B/block "
                  f"({100 * st.metadata_bytes / DEVICE:.2f} % of the device)")
            if copies == 2 and keep is None:
                keep = store
            else:
                del src
                store.close()
                image.close()
    bench_checksums(args.seconds, sums)
    if keep is not None:
        bench_threads(keep, args.seconds)
    if sums is not None:
        bench_first_writes(tmpdir, sums, args.seconds)
    for f in os.listdir(tmpdir):
        os.unlink(os.path.join(tmpdir, f))
    os.rmdir(tmpdir)


if __name__ == "__main__":
    main()
