#!/usr/bin/env python3
"""Fuzz kdumpd's readers with mutated vmcores: survey, plan and serve's planning step.

Usage: bench/fuzz_vmcore.py --count N [--seed S] [--jobs 1] [--timeout 10] [--out DIR]
                            [--real VMCORE|none] [--progress FILE]
       bench/fuzz_vmcore.py --replay DIR/finding-000.json

Seeds are the synthetic cores of tests/synth/fuzzbase.py (real 6.1/6.12 VMCOREINFO texts) and,
by default, the cached real 6.1 vmcore if it is there. Prints the count per outcome and exit
code, the rate, and every finding kind; each finding's input is written to DIR/findings as JSON
(seed + patches) and, for a synthetic seed, as the vmcore file itself. Exit 1 if anything was
found. See tests/synth/fuzz.py for what counts as a finding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TOP / "daemon"), str(TOP)]

from tests.synth.fuzzrun import replay, run_campaign  # noqa: E402

REAL = Path("/var/cache/kdumpd-tests/vmcores/6.1-1g-kaslr/vmcore")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=20.0, help="deadline per input (s)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where seeds, findings/ and progress.json go (default: a temp dir)")
    ap.add_argument("--real", default=str(REAL),
                    help="a real vmcore to mutate as well (none: synthetic seeds only)")
    ap.add_argument("--progress", type=Path, default=None,
                    help="rewrite running totals here every 5 s (default: OUT/progress.json)")
    ap.add_argument("--replay", type=Path, default=None, help="run one finding's input again")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="kdumpd-fuzz-"))
    if args.replay:
        res = replay(json.loads(args.replay.read_text()), out / "replay")
        print(json.dumps(res, indent=1))
        bad = res is None or "died" in res or any("finding" in v for v in res.values()
                                                  if isinstance(v, dict))
        return 1 if bad else 0
    real = None if args.real == "none" or not Path(args.real).exists() else Path(args.real)
    camp = run_campaign(args.count, args.seed, out / "seeds", jobs=args.jobs,
                        timeout=args.timeout, real=real, findings_dir=out / "findings",
                        progress=args.progress or out / "progress.json", verbose=args.verbose)
    s = camp.summary()
    print(f"{s['inputs']} inputs in {s['seconds']} s ({s['inputs_per_s']}/s), seed {args.seed}, "
          f"seeds: {'synthetic + ' + str(real) if real else 'synthetic'}")
    print(f"hangs {s['hangs']}, worker crashes {s['crashes']}, findings {s['findings']}, "
          f"slowest input {s['slowest_input_s']} s")
    print("outcomes (path:outcome/exit code):")
    for key, n in sorted(s["outcomes"].items()):
        print(f"  {key:<40} {n}")
    print("mutations:", ", ".join(f"{k} {v}" for k, v in s["mutations"].items()))
    for sig, n in s["finding_kinds"].items():
        print(f"FINDING x{n}: {sig}")
    if s["findings"]:
        print(f"reproducers in {out / 'findings'}")
    return 1 if s["findings"] or s["hangs"] or s["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
