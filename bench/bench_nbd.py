#!/usr/bin/python3
"""kdumpd's nbdkit plugin (copies 1, 2, 3) against nbdkit's C memory plugin, in one run.

    python3 bench/bench_nbd.py [--seconds 3] [--copies 1,2,3] [--size 256M] [--repeat 1]
                               [--no-keep] [--json FILE]

Every server listens on a Unix socket; fio's ``ioengine=nbd`` (libnbd, one connection) drives
it: 4 KiB random read and write at QD1 and QD16, and 64 KiB and 1 MiB sequential read and write
at QD16; and first writes (the device trimmed whole, then written once over at 4 KiB random
and 64 KiB sequential, so every request places blocks). The device is written in full first,
so reads return stored data, not holes. kdumpd
runs its real plugin (verify on read, xxh3 checksums, scrubber on at its default rate) over an
image in /dev/shm, with the parallel thread model; ``--no-keep`` turns the thread-state trick
off (KDUMPD_NO_KEEP_TSTATE=1) to show what it buys. Ratios are to the memory plugin measured in
the same run; medians over ``--repeat``. Nothing is asserted: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "daemon"))

from kdumpd.nbd.server import PLUGIN_PATH, nbdkit_env  # noqa: E402
from kdumpd.serve.runconf import RunConf  # noqa: E402
from kdumpd.units import Extent, PhysRange  # noqa: E402

MiB = 1 << 20
BASE = 1 << 32  # physical base of the image (file offset != address, as in a vmcore)

TESTS = [
    # name, rw, bs, iodepth
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD16", "randread", "4k", 16),
    ("4k randwrite QD1", "randwrite", "4k", 1),
    ("4k randwrite QD16", "randwrite", "4k", 16),
    ("64k read QD16", "read", "64k", 16),
    ("64k write QD16", "write", "64k", 16),
    ("1M read QD16", "read", "1m", 16),
    ("1M write QD16", "write", "1m", 16),
    # First writes: the device is trimmed whole first, then written once over (fio's random
    # map: every block once), so every request places blocks, as swap-out into discarded
    # slots does.
    ("4k randwrite first QD16", "randwrite", "4k", 16),
    ("64k write first QD16", "write", "64k", 16),
]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.upper()
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio(sock: str, rw: str, bs: str, qd: int, seconds: float, size: int,
        pid: int, first: bool = False) -> dict[str, float]:
    argv = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
        f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={size}",
        "--output-format=json", "--randrepeat=0",
    ]
    if first:
        trim_all(sock, size)  # one pass over a trimmed device: every request a first write
    else:
        argv += ["--time_based", f"--runtime={seconds}", "--ramp_time=0.5", "--norandommap"]
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid) - cpu0
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    ios = side["total_ios"] or 1
    # Server CPU per request covers the ramp too: fio's total_ios excludes it, so scale.
    scale = 1.0 if first else (seconds + 0.5) / seconds
    return {"iops": side["iops"], "mibs": side["bw_bytes"] / MiB,
            "lat_us": side["clat_ns"]["mean"] / 1000,
            "cpu_us": cpu / (ios * scale) * 1e6}


def trim_all(sock: str, size: int) -> None:
    import nbd  # python3-libnbd

    h = nbd.NBD()
    h.connect_unix(sock)
    for off in range(0, size, 32 * MiB):
        h.trim(min(32 * MiB, size - off), off)
    h.flush()
    h.shutdown()


def prefill(sock: str, size: int) -> None:
    argv = ["fio", "--name=fill", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
            "--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}", "--output-format=terse"]
    subprocess.run(argv, capture_output=True, check=True)


class Server:
    def __init__(self, argv: list[str], sock: str, env: dict[str, str] | None = None) -> None:
        self.sock = sock
        if os.path.exists(sock):
            os.unlink(sock)
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {' '.join(argv)}")
            time.sleep(0.05)
        time.sleep(0.2)

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def kdumpd_server(tmp: str, copies: int, size: int, keep: bool, threads: int,
                  scrub_rate: int) -> Server:
    pool = copies * size + 64 * MiB  # room for the spares and the unused tail
    image = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tmp,
                         f"kdumpd-bench-{os.getpid()}-{copies}.img")
    with open(image, "wb") as fh:
        fh.truncate(pool)
    run_dir = tempfile.mkdtemp(prefix=f"run{copies}-", dir=tmp)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    # Two extents with a hole between them, as a plan would have.
    half = pool // 2 // 4096
    extents = (Extent((BASE >> 12) + 1, (BASE >> 12) + half),
               Extent((BASE >> 12) + half + 256, (BASE >> 12) + pool // 4096))
    rc = RunConf(
        run_dir=run_dir, package_dir=str(TOP / "daemon"), backend=f"image:{image}",
        extents=extents, ranges=(PhysRange(BASE, BASE + pool, 0),), copies=copies,
        size_bytes=size, min_distance_bytes=2 * MiB, scrub_rate=scrub_rate,
        status_interval=1.0, protect=False, log_level="warning",
    )
    conf = os.path.join(run_dir, "runconf.json")
    rc.write(conf)
    sock = os.path.join(run_dir, "sock")
    env = nbdkit_env()
    if not keep:
        env["KDUMPD_NO_KEEP_TSTATE"] = "1"
    server = Server(["nbdkit", "-f", "-U", sock, "--threads", str(threads), "python",
                     PLUGIN_PATH, f"runconf={conf}"],
                    sock, env)
    server.image = image  # type: ignore[attr-defined]
    return server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--copies", default="1,2,3")
    ap.add_argument("--size", default="256M")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-keep", action="store_true",
                    help="also run copies=2 without the thread-state trick")
    ap.add_argument("--threads", type=int, default=4,
                    help="nbdkit --threads for both servers (kdumpd's default is 4)")
    ap.add_argument("--scrub-rate", type=int, default=16 * MiB)
    ap.add_argument("--tests", default="", help="comma-separated substrings of test names")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    size = parse_size(args.size)
    copies = [int(c) for c in args.copies.split(",") if c]
    tests = [t for t in TESTS if not args.tests or any(s in t[0] for s in args.tests.split(","))]
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    rss: dict[str, float] = {}
    configs: list[tuple[str, int, bool]] = [("memory", 0, True)]
    configs += [(f"kdumpd N={c}", c, True) for c in copies]
    if args.no_keep:
        configs.append(("kdumpd N=2 no-keep", 2, False))
    with tempfile.TemporaryDirectory(prefix="kdumpd-bench-") as tmp:
        for _ in range(args.repeat):
            for name, c, keep in configs:
                if c == 0:
                    sock = os.path.join(tmp, "mem.sock")
                    srv = Server(["nbdkit", "-f", "-U", sock, "--threads", str(args.threads),
                                  "memory", str(size)], sock)
                else:
                    srv = kdumpd_server(tmp, c, size, keep, args.threads, args.scrub_rate)
                try:
                    prefill(srv.sock, size)
                    for tname, rw, bs, qd in tests:
                        r = fio(srv.sock, rw, bs, qd, args.seconds, size, srv.proc.pid,
                                first="first" in tname)
                        results.setdefault(name, {}).setdefault(tname, []).append(r)
                        print(f"  {name:<20} {tname:<18} {r['iops']:>9.0f} IOPS "
                              f"{r['mibs']:>8.0f} MiB/s {r['lat_us']:>7.1f} us "
                              f"{r['cpu_us']:>6.1f} us CPU/req", flush=True)
                    rss[name] = srv.rss_mib()
                finally:
                    srv.stop()
                    image = getattr(srv, "image", None)
                    if image:
                        os.unlink(image)
    names = [n for n, _, _ in configs]
    med = {n: {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for t, rs in results[n].items()} for n in names}
    print()
    print("| test | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for tname, _, bs, _ in tests:
        key = "iops" if bs == "4k" else "mibs"
        unit = "IOPS" if key == "iops" else "MiB/s"
        anchor = med["memory"][tname][key]
        cells = [f"{anchor:.0f} {unit}"]
        for n in names[1:]:
            v = med[n][tname][key]
            cells.append(f"{v:.0f} ({v / anchor:.2f}x)")
        print(f"| {tname} | " + " | ".join(cells) + " |")
    print("| RSS after the run (MiB) | " + " | ".join(f"{rss[n]:.0f}" for n in names) + " |")
    print()
    print("Server CPU per request (us; all threads of the nbdkit process):")
    print("| test | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for tname, _, _, _ in tests:
        print(f"| {tname} | " + " | ".join(f"{med[n][tname]['cpu_us']:.1f}" for n in names)
              + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"median": med, "rss_mib": rss, "seconds": args.seconds,
                       "size": size}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
