"""The ``kdumpd`` command line: the only place that prints and exits.

Every KdumpdError becomes one line on stderr and the class's exit code; ``--debug`` adds the
traceback. Nothing here decides anything: it parses, calls, formats.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdumpd import __version__
from kdumpd.config import Config
from kdumpd.errors import ConfigError, KdumpdError, RefusedError
from kdumpd.plan import Plan, make_plan, read_crash_log, write_extents_file
from kdumpd.safeplan import gated_plan, host_facts_here
from kdumpd.safety.gate import MCE_POLICIES
from kdumpd.safety.hostfacts import HostFacts, parse_host_facts
from kdumpd.vmcore.core import open_vmcore

__all__ = ["main"]

_CATEGORY_LABELS = [
    ("zero", "Pages filled with zero"),
    ("cache", "Non-private cache pages"),
    ("cache_private", "Private cache pages"),
    ("user", "User process data pages"),
    ("free", "Free pages"),
    ("hwpoison", "Hwpoison pages"),
    ("offline", "Offline pages"),
    ("remaining", "Remaining pages"),
]


class _ProgressBar:
    """A one-line progress bar on a terminal, shown only once the work has taken > 1 s."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.monotonic()
        self.shown = False
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.start < 1.0 or now - self.last < 0.1:
            return
        self.last = now
        self.shown = True
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 40)
        sys.stderr.write(f"\rclassifying [{bar:<40}] {frac * 100:5.1f}%")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 60 + "\r")


def _dump_level(text: str) -> int:
    try:
        level = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"dump level {text!r} is not a number") from None
    if not 0 <= level <= 31:
        raise argparse.ArgumentTypeError(f"dump level {level} is outside 0..31")
    return level


def _host_facts(args: argparse.Namespace) -> HostFacts | None:
    if args.host_iomem or args.host_cmdline or args.host_nfit:
        iomem = Path(args.host_iomem).read_text() if args.host_iomem else ""
        cmdline = Path(args.host_cmdline).read_text() if args.host_cmdline else ""
        tables = [_read_nfit(path) for path in args.host_nfit] if args.host_nfit else None
        try:
            return parse_host_facts(iomem, cmdline, source="--host-iomem/--host-cmdline",
                                    nfit_tables=tables)
        except ValueError as exc:
            raise ConfigError(f"--host-nfit: {exc}") from None
    return host_facts_here(Path(args.vmcore))


def _read_nfit(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"--host-nfit {path}: {exc.strerror}") from None


def _build_plan(args: argparse.Namespace) -> tuple[Plan, str | None]:
    """The gated plan, or (for survey) the ungated counts and the refusal."""
    bar = _ProgressBar(sys.stderr.isatty() and not getattr(args, "json", False))
    collector = args.collector
    if collector is None and args.dump_level is not None:
        collector = f"makedumpfile -d {args.dump_level}"
    try:
        with open_vmcore(args.vmcore) as vm:
            try:
                gated = gated_plan(
                    vm, collector=collector, host=_host_facts(args),
                    mce_policy=args.mce_policy,
                    count_zero=getattr(args, "count_zero", False), progress=bar,
                )
                return gated.plan, None
            except RefusedError as exc:
                if args.command != "survey":
                    raise
                counts = make_plan(vm, 31, count_zero=getattr(args, "count_zero", False))
                return counts, str(exc)
    finally:
        bar.close()


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# Dump level bits of each makedumpfile category; hwpoison and offline pages are excluded at
# every level, "remaining" is what the level keeps.
_CATEGORY_BITS = {"zero": 1, "cache": 2 | 4, "cache_private": 4, "user": 8, "free": 16}


def _level_categories(plan: Plan) -> dict[str, int | None]:
    """The categories as ``makedumpfile -d LEVEL`` reports them: a category the level does
    not exclude shows 0 and its pages count as remaining (issue 15, item 4)."""
    out = dict(plan.categories)
    moved = 0
    for key, bit in _CATEGORY_BITS.items():
        if not plan.dump_level & bit:
            moved += out.get(key) or 0
            out[key] = 0
    if out.get("remaining") is not None:
        out["remaining"] = (out["remaining"] or 0) + moved
    if plan.dump_level & 1 and plan.dump_level & 30 != 30 and out.get("zero") is not None:
        # kdumpd looks for zero pages only among those every level keeps; makedumpfile also
        # among the cache/user/free pages this level keeps: the count would be short
        out["remaining"] = (out["remaining"] or 0) + (out["zero"] or 0)
        out["zero"] = None
    return out


def _accounting_lines(plan: Plan) -> list[str]:
    """makedumpfile's report, number for number (issue 15, item 6): its "Original pages"
    count the kernel-text PT_LOAD a second time (that load duplicates RAM), "Memory Hole" is
    every pfn up to the last RAM pfn that no PT_LOAD holds, and "Total" is that last pfn.
    kdumpd's own count of physical pages is shown beside them."""
    cats = _level_categories(plan)
    text = int(plan.features.get("kernel_text_pages", 0))
    original = plan.total_pages + text
    excluded = sum(cats.get(k) or 0 for k, _ in _CATEGORY_LABELS if k != "remaining")
    out = [f"Original pages  : 0x{original:016x}  ({plan.total_pages} physical pages + {text} "
           "pages of the kernel-text PT_LOAD, which makedumpfile counts twice)",
           f"  Excluded pages   : 0x{excluded:016x}"]
    for key, label in _CATEGORY_LABELS:
        if key == "remaining":
            continue
        value = cats.get(key)
        shown = "not computed (--count-zero)" if value is None else f"0x{value:016x}"
        out.append(f"    {label:<24}: {shown}")
    note = "  (zero pages not counted: --count-zero)" if cats.get("zero") is None else ""
    out.append(f"  Remaining pages  : 0x{original - excluded:016x}{note}")
    max_pfn = int(plan.features.get("max_pfn", 0))
    out.append(f"Memory Hole     : 0x{max(max_pfn - original, 0):016x}")
    out.append(f"Total pages     : 0x{max_pfn:016x}")
    return out


def cmd_survey(args: argparse.Namespace) -> int:
    plan, refusal = _build_plan(args)
    if args.json:
        doc = plan.to_json()
        if refusal:
            doc.update(refused=refusal, reusable_pages=0, reusable_bytes=0, extents=0)
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"kernel {plan.osrelease} ({plan.arch}), dump level {plan.dump_level}")
    for line in _accounting_lines(plan):
        print(line)
    if refusal:
        print(f"reusable: none: refused by {refusal}")
    else:
        print(f"reusable: {plan.reusable_pages} pages ({_fmt_bytes(plan.reusable_bytes)}) "
              f"in {len(plan.extents)} extents")
    for rule in plan.features.get("safety_rules", []):
        print(f"safety: {rule}")
    for line in _withheld_lines(plan):
        print(line)
    feats: dict[str, Any] = {
        k: v for k, v in plan.features.items() if k not in ("safety_rules",)}
    print("layout: " + ", ".join(f"{k}={v}" for k, v in sorted(feats.items())))
    return 0


def _withheld_lines(plan: Plan) -> list[str]:
    """One line per safety rule (and reason) that took pages away, with how many; classes
    withheld for one reason share a line."""
    groups: dict[tuple[str, str], tuple[int | None, list[str]]] = {}
    for key, why in plan.withheld.items():
        pages = plan.withheld_pages.get(key)
        # class keys come from rule 6 (what the collector would still dump)
        label = key.partition(": ")[0] if key.startswith("rule ") else "rule 6"
        total, classes = groups.get((label, why), (0, []))
        total = None if total is None or pages is None else total + pages
        groups[(label, why)] = (total, classes + ([] if key.startswith("rule ") else [key]))
    out = []
    for (label, why), (pages, classes) in groups.items():
        count = "" if pages is None else f"{pages} pages ({_fmt_bytes(pages * 4096)})"
        of = f" of class{'es' if len(classes) > 1 else ''} {', '.join(classes)}" if classes else ""
        out.append(f"withheld by {label}: {count}{of}: {why}")
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    plan, _ = _build_plan(args)
    write_extents_file(args.extents, plan.extents)
    for line in _withheld_lines(plan):
        print(line, file=sys.stderr)
    print(f"{len(plan.extents)} extents, {plan.reusable_pages} pages "
          f"({_fmt_bytes(plan.reusable_bytes)}) written to {args.extents}", file=sys.stderr)
    return 0


def cmd_dmesg(args: argparse.Namespace) -> int:
    with open_vmcore(args.vmcore) as vm:
        for record in read_crash_log(vm):
            print(record.format())
    return 0


def _add_gate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dump-level", "-d", type=_dump_level, default=None,
        help="shorthand for --collector 'makedumpfile -d N'")
    parser.add_argument(
        "--collector", metavar="'COMMAND LINE'", default=None,
        help="the dump collector that will run (default: read from /etc/kdump.conf or "
             "/etc/default/kdump-tools; without either: makedumpfile -d 31)")
    parser.add_argument("--mce-policy", choices=MCE_POLICIES, default="refuse",
                        help="after a hardware memory error: reuse nothing (default) or "
                             "exclude the reported address ranges")
    parser.add_argument("--host-iomem", metavar="FILE", default=None,
                        help="the capture kernel's /proc/iomem, to check a plan offline")
    parser.add_argument("--host-cmdline", metavar="FILE", default=None,
                        help="the capture kernel's /proc/cmdline, to check a plan offline")
    parser.add_argument("--host-nfit", metavar="FILE", action="append", default=None,
                        help="the capture kernel's /sys/firmware/acpi/tables/NFIT (repeat for "
                             "NFIT1...), to check persistent memory offline; without it, "
                             "memory sections hot-added after boot are withheld")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdumpd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kdumpd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    survey = sub.add_parser("survey", help="count pages per class and what could be reused")
    survey.add_argument("vmcore")
    _add_gate_options(survey)
    survey.add_argument("--json", action="store_true")
    survey.add_argument("--count-zero", action="store_true",
                        help="also read page contents to count zero pages (slow)")
    survey.set_defaults(func=cmd_survey)

    plan = sub.add_parser("plan", help="write the reusable pfn extents")
    plan.add_argument("vmcore")
    _add_gate_options(plan)
    plan.add_argument("--extents", required=True, metavar="FILE")
    plan.set_defaults(func=cmd_plan)

    dmesg = sub.add_parser("dmesg", help="print the crashed kernel's log from the vmcore")
    dmesg.add_argument("vmcore")
    dmesg.set_defaults(func=cmd_dmesg)

    _add_serve_commands(sub)
    return parser


# -- serve / status / stop -------------------------------------------------------------------

# serve flag -> config key; every flag defaults to None so that only given flags override the
# config file and the kernel command line (see kdumpd.config for the precedence).
_SERVE_FLAGS = [
    ("--backend", "backend", "image:FILE|devmem|vmcore|auto"),
    ("--socket", "socket", "PATH"),
    ("--copies", "copies", "N"),
    ("--run-dir", "run_dir", "DIR"),
    ("--as", "as", "swap|scratch|none"),
    ("--mount", "mount", "DIR"),
    ("--dump-level", "dump_level", "N"),
    ("--collector", "collector", "'COMMAND LINE'"),
    ("--mce-policy", "mce_policy", "refuse|exclude-range"),
    ("--size", "size", "BYTES|auto"),
    ("--device", "device", "/dev/nbdN|auto"),
    ("--report", "report", "PATH"),
    ("--scrub-rate", "scrub_rate", "BYTES/s"),
    ("--swap-priority", "swap_priority", "N"),
    ("--fstype", "fstype", "ext4|ext2|xfs"),
    ("--threads", "threads", "N"),
    ("--min-distance", "min_distance", "BYTES"),
    ("--status-interval", "status_interval", "SECONDS"),
    ("--log-level", "log_level", "LEVEL"),
    ("--nbdkit", "nbdkit", "PATH"),
]


def _serve_flags(args: argparse.Namespace) -> dict[str, str]:
    flags = {key: str(getattr(args, key)) for _, key, _ in _SERVE_FLAGS
             if getattr(args, key, None) is not None}
    if getattr(args, "vmcore", None) is not None:
        flags["vmcore"] = args.vmcore
    for key in ("attach", "protect"):
        if getattr(args, key, None) is not None:
            flags[key] = "yes" if getattr(args, key) else "no"
    if args.debug and "log_level" not in flags:
        flags["log_level"] = "debug"
    return flags


def _daemon() -> Any:
    """The daemon module, imported only by serve/status/stop: survey, plan and dmesg stay
    free of the store, nbd and systemd imports (start-up time and memory)."""
    from kdumpd import daemon

    return daemon


def _serve_config(args: argparse.Namespace) -> Config:
    cfg: Config = _daemon().load_serve_config(_serve_flags(args), config_path=args.config,
                                              cmdline_path=args.kernel_cmdline)
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    rc: int = _daemon().serve(_serve_config(args))
    return rc


def cmd_status(args: argparse.Namespace) -> int:
    st = _daemon().read_status(_serve_config(args).run_dir)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0 if st["running"] else 1
    i = st["integrity"]
    use = {"swap": " as swap", "scratch": f" on {st.get('mounted')}"}.get(st.get("as") or "", "")
    print(f"kdumpd: {st['state']} (pid {st['daemon_pid']}, nbdkit {st['nbdkit_pid']})")
    print(f"  socket     {st['socket']}")
    print(f"  device     {st['device'] or 'not attached'}{use}")
    print(f"  backend    {st['backend']}")
    print(f"  copies     {st['copies']}")
    print(f"  size       {_fmt_bytes(st['size_bytes'] or 0)}")
    print(f"  capacity   {_fmt_bytes(st['capacity_bytes'] or 0)}")
    print(f"  used       {_fmt_bytes(st['used_bytes'] or 0)}")
    print(f"  integrity  detected {i['detected']}, repaired {i['repaired']}, quarantined "
          f"{i['quarantined']}, lost {i['lost']} (relocated {i['relocated']}, scrubbed "
          f"{i['scrubbed_blocks']} blocks)")
    rss, anon = st["rss_bytes"], st["rss_anon_bytes"]
    print(f"  memory     daemon {_fmt_bytes(rss['daemon'])} RSS ({_fmt_bytes(anon['daemon'])} "
          f"anon), nbdkit {_fmt_bytes(rss['nbdkit'])} RSS ({_fmt_bytes(anon['nbdkit'])} anon)")
    prot = st.get("protections") or {}
    print("  protect    " + (", ".join(f"{k} {v}" for k, v in sorted(prot.items())) or "off"))
    return 0 if st["running"] else 1


def cmd_stop(args: argparse.Namespace) -> int:
    print(_daemon().stop(_serve_config(args).run_dir, timeout=args.timeout))
    return 0


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="configuration file (default /etc/kdumpd.conf, may be absent)")
    parser.add_argument("--kernel-cmdline", metavar="FILE", default="/proc/cmdline",
                        help="where to read kdumpd.*= parameters (default /proc/cmdline)")
    parser.add_argument("--run-dir", dest="run_dir", metavar="DIR", default=None,
                        help="run directory (default /run/kdumpd)")


def _add_serve_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve old memory as an NBD device (foreground)")
    serve.add_argument("vmcore", nargs="?", default=None,
                       help="the crashed kernel's dump (default /proc/vmcore)")
    _add_config_options(serve)
    for flag, key, metavar in _SERVE_FLAGS:
        if key == "run_dir":
            continue
        serve.add_argument(flag, dest=key, metavar=metavar, default=None)
    serve.add_argument("--attach", action=argparse.BooleanOptionalAction, default=None,
                       help="attach /dev/nbdX with nbd-client (needs root)")
    serve.add_argument("--protect", action=argparse.BooleanOptionalAction, default=None,
                       help="mlockall, PR_SET_IO_FLUSHER, oom_score_adj -1000 (default on)")
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="capacity, use and integrity of the running daemon")
    _add_config_options(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    stop = sub.add_parser("stop", help="tear down: swapoff/umount, disconnect, stop nbdkit")
    _add_config_options(stop)
    stop.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    stop.set_defaults(func=cmd_stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="kdumpd: %(levelname)s: %(message)s",
    )
    try:
        rc: int = args.func(args)
        return rc
    except KdumpdError as exc:
        if args.debug:
            raise
        print(f"kdumpd: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
