"""DMA-like corruption of the old memory kdumpd serves, from outside kdumpd (via /dev/mem).

    python3 inject.py --run-dir /run/kdumpd --out REPORT.json [--interval S] [--seed N]
                      [--max-bytes N] [--targeted F]

Runs until SIGTERM, then writes its report. Every `interval` seconds it overwrites one burst
of random bytes (16 B .. max-bytes, log-uniform) at a random place in the store's pool, as a
device writing where it should not would. The pool is read from kdumpd's own runconf.json
and laid out with kdumpd's placement, so the injector knows which copy of which group each
byte belongs to. Two rules keep the test about repair rather than loss:

* a burst never leaves the plan's extents (outside them is the crashed kernel's memory the
  dump still needs; the dump comparison would catch a stray byte);
* no group ever gets two different copies damaged: a burst that would hit another copy of a
  group already hit is drawn again. A block losing every copy is the store's EIO case,
  covered by its unit tests; here it would only make the run flaky.

A fraction `targeted` of the bursts lands in the groups the store has handed out so far (from
status.json's used bytes: the allocator hands groups out from 0 upwards), the rest anywhere in
the pool; both are random within their range.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import signal
import sys
import time

from kdumpd.serve.runconf import RunConf
from kdumpd.store.placement import Placement

PAGE = 4096


class Stop(Exception):
    pass


def _stop(signum, frame):  # type: ignore[no-untyped-def]
    raise Stop()


def used_groups(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "status.json"), encoding="utf-8") as fh:
            return int(json.load(fh).get("used_bytes", 0)) // PAGE
    except (OSError, ValueError):
        return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="/run/kdumpd")
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--max-bytes", type=int, default=64 << 10)
    ap.add_argument("--targeted", type=float, default=0.5)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    rc = RunConf.read(os.path.join(args.run_dir, "runconf.json"))
    pl = Placement.from_extents(rc.extents, rc.copies, min_distance_bytes=rc.min_distance_bytes)
    rng = random.Random(args.seed)
    fd = os.open("/dev/mem", os.O_RDWR)
    hit: dict[int, int] = {}  # group -> the one copy ever damaged
    stats = {"seed": args.seed, "bursts": 0, "bytes": 0, "pages": 0, "groups": 0,
             "targeted_bursts": 0, "redrawn": 0, "copies": rc.copies, "ngroups": pl.ngroups,
             "pool_bytes": pl.pool_pages * PAGE, "max_bytes": args.max_bytes,
             "interval_s": args.interval, "errors": 0}
    started = time.monotonic()
    try:
        while True:
            time.sleep(args.interval)
            for _ in range(100):
                used = used_groups(args.run_dir)
                targeted = used > 0 and rng.random() < args.targeted
                copy = rng.randrange(rc.copies)
                group = rng.randrange(min(used, pl.ngroups) if targeted else pl.ngroups)
                size = int(2 ** rng.uniform(4, max(4.0, (args.max_bytes).bit_length() - 1)))
                start = pl.slot_paddr(copy, group) + rng.randrange(PAGE)
                # Clip at the first byte outside the pool (or in a page of the pool's tail).
                end = start
                slots = []
                while end < start + size:
                    where = pl.locate_paddr(end)
                    if where is None:
                        break
                    slots.append(where)
                    end = min(start + size, (end // PAGE + 1) * PAGE)
                if any(hit.get(g, c) != c for c, g in slots):
                    stats["redrawn"] += 1
                    continue
                break
            else:
                continue
            if end <= start:
                continue
            base = start // PAGE * PAGE
            length = -(-(end - base) // PAGE) * PAGE
            try:
                with mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=base) as m:
                    m[start - base:end - base] = rng.randbytes(end - start)
            except OSError as exc:
                stats["errors"] += 1
                print(f"inject: {start:#x}+{end - start}: {exc}", file=sys.stderr)
                continue
            for c, g in slots:
                if g not in hit:
                    hit[g] = c
                    stats["groups"] += 1
            stats["bursts"] += 1
            stats["targeted_bursts"] += int(targeted)
            stats["bytes"] += end - start
            stats["pages"] += len(slots)
    except Stop:
        pass
    finally:
        os.close(fd)
        stats["seconds"] = round(time.monotonic() - started, 2)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
