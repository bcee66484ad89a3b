#!/usr/bin/env python3
"""The smallest crashkernel= at which a real, memory-hungry capture completes, with kdumpd and
without it (issue 10): the figure an administrator chooses a reservation by.

    bench/crashkernel_min.py [--scenario luks] [--sizes 256M,192M | --bisect 128M:1536M]
        [--ways without,with] [--kernel 6.12] [--ram 4096] [--timeout 3600] [--out DIR]
    bench/crashkernel_min.py --quick          # luks at 256M and 192M, both ways
    bench/crashkernel_min.py --from DIR ...   # the table from earlier run.py result dirs

Every point is one tests/vm/kdump_e2e/run.py run: a real crash of a Debian kernel in QEMU and a
real capture kernel booted from a dracut image; a point "completes" when the capture did (LUKS:
the unlock succeeded and the dump on the encrypted disk equals the reference page for page).
--bisect searches each way separately in 16 MiB steps between the two bounds (checking the
bounds first: a way that fails at the upper one or completes at the lower one says so).
Prints a markdown table and writes the same as JSON (DIR/crashkernel_min.json). A run that
hangs ends at --timeout and is recorded as such, never retried.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent
RUN = TOP / "tests" / "vm" / "kdump_e2e" / "run.py"
MIB = 1 << 20
STEP = 16  # MiB
# scenario -> way -> run.py mode
SCENARIOS = {"luks": {"without": "luks-control", "with": "luks-swap"}}


def mib(size: str) -> int:
    s = size.strip().upper().removesuffix("B")
    mult = {"M": 1, "G": 1024}.get(s[-1:], 0)
    if not mult or not s[:-1].isdigit():
        raise argparse.ArgumentTypeError(f"not a size like 256M or 1G: {size!r}")
    return int(s[:-1]) * mult


def point(mode: str, r: dict[str, Any], results: Path) -> dict[str, Any]:
    """One run's figures, from run.py's results.json entry for ``mode``."""
    marks = r.get("marks") or {}
    start, done = marks.get("REFERENCE_START"), marks.get("CAPTURE_DONE")
    why = None
    if r.get("timed_out"):
        last = max(marks.items(), key=lambda kv: float(kv[1]))[0] if marks else "-"
        why = f"timeout (hang?) after the {last} mark"
    elif not r.get("completed"):
        if r.get("error") or r.get("unlock_failure"):
            why = str(r.get("error") or r.get("unlock_failure"))
            hung = r.get("console_warnings") or []
            if hung and "console:" not in why:
                why += f"; console: {hung[-1]}"
        elif mode.endswith("swap") and r.get("kdumpd_unit") != "active":
            why = f"kdumpd.service {r.get('kdumpd_unit')}"
        elif r.get("dump_identical") is False:
            why = "the dump differs from the reference"
        else:
            why = "did not complete"
    return {
        "mode": mode,
        "crashkernel_mib": mib(str(r.get("crashkernel", "0M"))),
        "completed": bool(r.get("completed")),
        "why_failed": why,
        "unlock_seconds": r.get("unlock_seconds"),
        "dump_seconds": r.get("dump_seconds"),
        "capture_seconds": round(done - start, 1) if start is not None and done else None,
        "kdumpd_pss_bytes": r.get("kdumpd_pss_bytes"),
        "kdumpd_rss_bytes": r.get("kdumpd_rss_bytes"),
        "swap_used_bytes": r.get("swap_used_bytes"),
        "repairs": r.get("repairs"),
        "lost": (r.get("integrity") or {}).get("lost"),
        "results": str(results),
    }


def load(results_dir: Path) -> list[dict[str, Any]]:
    doc = json.loads((results_dir / "results.json").read_text())
    return [point(m, r, results_dir / "results.json") for m, r in doc["modes"].items()]


def run_point(args: argparse.Namespace, modes: list[str], size: int) -> list[dict[str, Any]]:
    out = args.out / f"{'+'.join(modes)}-{size}M"
    cmd = ["nice", "-n", str(args.nice), sys.executable, str(RUN), "--kernel", args.kernel,
           "--ram", str(args.ram), "--crashkernel", f"{size}M", "--modes", ",".join(modes),
           "--timeout", str(args.timeout), "--out", str(out)]
    print(f"bench: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with open(args.out / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if not (out / "results.json").exists():
        return [{"mode": m, "crashkernel_mib": size, "completed": False,
                 "why_failed": f"run.py wrote no results (see {out.name}.log)"} for m in modes]
    points = load(out)
    for p in points:
        p["run_wall_seconds"] = round(time.monotonic() - t0, 1)
        print(f"bench:   {p['mode']} at {size}M: "
              + ("completed" if p["completed"] else f"FAILED ({p['why_failed']})"),
              file=sys.stderr, flush=True)
    return points


def bisect(args: argparse.Namespace, mode: str, lo: int, hi: int) -> list[dict[str, Any]]:
    """Runs at hi, lo, then halves the gap (16 MiB steps) until the boundary is found."""
    points: list[dict[str, Any]] = []

    def ok(size: int) -> bool:
        p = run_point(args, [mode], size)
        points.extend(p)
        return bool(p[0]["completed"])

    if not ok(hi) or ok(lo):
        return points
    while hi - lo > STEP:
        mid = (lo + hi) // 2 // STEP * STEP
        if mid in (lo, hi):
            break
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return points


def summarise(scenario: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    ways: dict[str, Any] = {}
    for way, mode in SCENARIOS[scenario].items():
        mine = [p for p in points if p["mode"] == mode]
        done = sorted(p["crashkernel_mib"] for p in mine if p["completed"])
        failed = sorted(p["crashkernel_mib"] for p in mine if not p["completed"])
        smallest = done[0] if done else None
        ways[way] = {"smallest_completed_mib": smallest,
                     "largest_failed_mib": failed[-1] if failed else None,
                     "tested_mib": sorted({p["crashkernel_mib"] for p in mine})}
    w, wo = ways["with"]["smallest_completed_mib"], ways["without"]["smallest_completed_mib"]
    reduction = round(100 * (wo - w) / wo, 1) if w and wo else None
    bound = None
    if w and not wo and ways["without"]["largest_failed_mib"]:
        # without kdumpd never completed: the reduction is at least this much
        bound = round(100 * (1 - w / ways["without"]["largest_failed_mib"]), 1)
    return {"scenario": scenario, "ways": ways, "reduction_percent": reduction,
            "reduction_at_least_percent": bound}


def _fmt(n: Any, unit: str = "") -> str:
    if n is None:
        return "-"
    if unit == "MiB":
        return f"{n / MIB:.0f} MiB"
    return f"{n}{unit}"


def markdown(summary: dict[str, Any], points: list[dict[str, Any]]) -> str:
    rows = ["| crashkernel | kdumpd | completed | unlock s | dump s | capture s | kdumpd PSS "
            "| kdumpd RSS | swap used | repairs | why it failed |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    way_of = {m: w for w, m in SCENARIOS[summary["scenario"]].items()}
    for p in sorted(points, key=lambda p: (-p["crashkernel_mib"], p["mode"])):
        rows.append(
            f"| {p['crashkernel_mib']}M | {way_of.get(p['mode'], p['mode'])} | "
            f"{'yes' if p['completed'] else 'no'} | {_fmt(p.get('unlock_seconds'))} | "
            f"{_fmt(p.get('dump_seconds'))} | {_fmt(p.get('capture_seconds'))} | "
            f"{_fmt(p.get('kdumpd_pss_bytes'), 'MiB')} | {_fmt(p.get('kdumpd_rss_bytes'), 'MiB')} "
            f"| {_fmt(p.get('swap_used_bytes'), 'MiB')} | {_fmt(p.get('repairs'))} | "
            f"{p.get('why_failed') or ''} |")
    ways = summary["ways"]
    lines = [f"### {summary['scenario']}: smallest crashkernel= that completes", "",
             *rows, "",
             f"- without kdumpd: smallest completed "
             f"{_fmt(ways['without']['smallest_completed_mib'], 'M')}, largest failed "
             f"{_fmt(ways['without']['largest_failed_mib'], 'M')}",
             f"- with kdumpd: smallest completed "
             f"{_fmt(ways['with']['smallest_completed_mib'], 'M')}, largest failed "
             f"{_fmt(ways['with']['largest_failed_mib'], 'M')}"]
    if summary["reduction_percent"] is not None:
        lines.append(f"- reduction: {summary['reduction_percent']} %")
    elif summary["reduction_at_least_percent"] is not None:
        lines.append(f"- reduction: at least {summary['reduction_at_least_percent']} % "
                     "(without kdumpd never completed in the tested range)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="luks")
    ap.add_argument("--sizes", default=None, help="comma-separated reservations, e.g. 256M,192M")
    ap.add_argument("--bisect", default=None, metavar="LO:HI", help="e.g. 128M:1536M")
    ap.add_argument("--ways", default="without,with")
    ap.add_argument("--quick", action="store_true", help="luks at 256M and 192M, both ways")
    ap.add_argument("--from", dest="sources", type=Path, action="append", default=[],
                    metavar="DIR", help="a run.py --out directory to include (no new runs)")
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument("--ram", type=int, default=4096, help="guest MiB (Argon2's 1 GiB must fit "
                    "in kdumpd's swap: 2 copies of what the crash left reusable)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per guest run")
    ap.add_argument("--nice", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        ways = [w for w in args.ways.split(",") if w]
        modes = [SCENARIOS[args.scenario][w] for w in ways]
        if args.quick:
            args.sizes = "256M,192M"
        sizes = [mib(s) for s in args.sizes.split(",")] if args.sizes else []
        bounds = [mib(s) for s in args.bisect.split(":")] if args.bisect else []
    except (KeyError, argparse.ArgumentTypeError, ValueError) as exc:
        ap.error(f"bad argument: {exc}")
    if args.bisect and (len(bounds) != 2 or bounds[0] >= bounds[1]):
        ap.error("--bisect LO:HI with LO < HI")
    if not (sizes or bounds or args.sources):
        ap.error("nothing to do: --sizes, --bisect, --quick or --from")
    points: list[dict[str, Any]] = []
    for src in args.sources:
        try:
            points += [p for p in load(src) if p["mode"] in SCENARIOS[args.scenario].values()]
        except (OSError, ValueError, KeyError) as exc:
            print(f"bench: {src}: no usable results.json ({exc})", file=sys.stderr)
            return 2
    args.out = (args.out or Path(f"/var/tmp/kdumpd-crashkernel-{os.getpid()}")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        points += run_point(args, modes, size)
    for mode in modes if bounds else []:
        points += bisect(args, mode, bounds[0], bounds[1])
    summary = summarise(args.scenario, points)
    text = markdown(summary, points)
    (args.out / "crashkernel_min.json").write_text(
        json.dumps({"summary": summary, "points": points}, indent=2) + "\n")
    (args.out / "crashkernel_min.md").write_text(text)
    print(text)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
