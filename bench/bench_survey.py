#!/usr/bin/env python3
"""kdumpd survey against makedumpfile -d 31 --dry-run on the same real vmcores, in one run.

Prints wall time and peak RSS of both (best of N runs, warm page cache) and the ratios. No
asserts: the figures are read, not enforced. Usage: bench/bench_survey.py [NAME ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests" / "vm"))
import vmcores  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def measure(cmd: list[str]) -> tuple[float, int]:
    """Best wall time (s) and peak RSS (bytes) of ``cmd`` over RUNS runs."""
    best_wall, best_rss = float("inf"), 0
    for _ in range(RUNS):
        pid_start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - pid_start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{cmd[0]} failed: {' '.join(cmd)}")
        best_wall = min(best_wall, wall)
        best_rss = max(best_rss, usage.ru_maxrss * 1024)
    return best_wall, best_rss


def main() -> int:
    names = sys.argv[1:] or [s.name for s in vmcores.STANDARD]
    env_py = str(TOP / ".venv" / "bin" / "python") if (TOP / ".venv").exists() else sys.executable
    print(f"{'vmcore':<22} {'GiB':>5} {'mdf s':>7} {'kdumpd s':>9} {'time x':>7} "
          f"{'mdf RSS':>9} {'kdumpd RSS':>11} {'RSS x':>6}")
    out = str(Path(tempfile.mkdtemp()) / "dry-run.out")  # --dry-run never creates it
    for name in names:
        vmcore = vmcores.ensure(name) / "vmcore"
        gib = vmcore.stat().st_size / (1 << 30)
        subprocess.run(["cat", str(vmcore)], stdout=subprocess.DEVNULL, check=True)  # warm
        mdf_t, mdf_rss = measure(["makedumpfile", "-l", "-d", "31", "--dry-run",
                                  "--message-level", "0", str(vmcore), out])
        kd_t, kd_rss = measure([env_py, "-m", "kdumpd", "survey", str(vmcore)])
        print(f"{name:<22} {gib:5.2f} {mdf_t:7.3f} {kd_t:9.3f} {kd_t / mdf_t:7.2f} "
              f"{mdf_rss / 2**20:7.1f}Mi {kd_rss / 2**20:9.1f}Mi {kd_rss / mdf_rss:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
