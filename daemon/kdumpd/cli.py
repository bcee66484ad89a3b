"""The ``kdumpd`` command line: the only place that prints and exits.

Every KdumpdError becomes one line on stderr and the class's exit code; ``--debug`` adds the
traceback and changes nothing else. A usage error is one line too (exit 2). Nothing here
decides anything: it parses, calls, formats.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from kdumpd import __version__
from kdumpd.errors import ConfigError, KdumpdError, RefusedError, VmcoreError
from kdumpd.servecli import add_serve_commands
from kdumpd.units import human_size

# The planner (vmcore reader, classifier, safety gate) is imported by the commands that plan,
# not here: `kdumpd --help`, `status` and `stop` start without it.
if TYPE_CHECKING:
    from kdumpd.plan.pipeline import Plan
    from kdumpd.safety.hostfacts import HostFacts
    from kdumpd.vmcore.core import Vmcore

# What --mce-policy takes (kdumpd.safety.gate.MCE_POLICIES; a unit test keeps them equal).
MCE_CHOICES = ("refuse", "exclude-range")

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


def _read_named(flag: str, path: str | None) -> str:
    """The text of a file the user named with ``flag``: missing, unreadable or binary is a
    ConfigError naming the flag and the file."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: not a text file") from None


def _host_facts(args: argparse.Namespace) -> HostFacts | None:
    from kdumpd.plan.gated import host_facts_here
    from kdumpd.safety.hostfacts import parse_host_facts

    if args.host_iomem or args.host_cmdline or args.host_nfit:
        iomem = _read_named("--host-iomem", args.host_iomem)
        cmdline = _read_named("--host-cmdline", args.host_cmdline)
        if args.host_iomem and not iomem.strip():
            raise ConfigError(f"--host-iomem {args.host_iomem}: empty (expected the capture "
                              "kernel's /proc/iomem)")
        tables = [_read_nfit(path) for path in args.host_nfit] if args.host_nfit else None
        try:
            return parse_host_facts(iomem, cmdline, source="--host-iomem/--host-cmdline",
                                    nfit_tables=tables)
        except ValueError as exc:
            raise ConfigError(f"--host-iomem/--host-cmdline/--host-nfit: {exc}") from None
    from pathlib import Path

    return host_facts_here(Path(args.vmcore))


def _read_nfit(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"--host-nfit {path}: {exc.strerror}") from None


def _collector(args: argparse.Namespace) -> str | None:
    """The collector named on the command line (``-d N`` stands for makedumpfile -d N)."""
    if args.dump_level is not None:
        return f"makedumpfile -d {args.dump_level}"
    collector: str | None = args.collector
    return collector


def _asked_level(args: argparse.Namespace) -> int | None:
    """The dump level the collector in force uses (None: it excludes nothing), found the way
    the gate finds it; for the survey header when the gate refused."""
    from kdumpd.plan.gated import DEFAULT_COLLECTOR
    from kdumpd.safety.collector import parse_collector
    from kdumpd.safety.kdumpconf import discover

    try:
        cmdline = _collector(args)
        if cmdline is None:
            found = discover("/")
            cmdline = found.cmdline if found else DEFAULT_COLLECTOR
        return parse_collector(cmdline).dump_level
    except KdumpdError:
        return None


@contextlib.contextmanager
def _vmcore(path: str) -> Iterator[Vmcore]:
    """open_vmcore, with every error naming the file (the ELF reader names it and calls an
    empty file empty; the layers above say what is wrong, not in which file)."""
    from kdumpd.vmcore.core import open_vmcore

    try:
        with open_vmcore(path) as vm:
            yield vm
    except VmcoreError as exc:
        if path in str(exc):
            raise
        raise VmcoreError(f"{path}: {exc}") from exc


def _build_plan(args: argparse.Namespace) -> tuple[Plan, str | None]:
    """The gated plan, or (for survey) the ungated counts and the refusal."""
    from kdumpd.plan.gated import gated_plan
    from kdumpd.plan.pipeline import make_plan

    bar = _ProgressBar(sys.stderr.isatty() and not getattr(args, "json", False))
    collector = _collector(args)
    try:
        with _vmcore(args.vmcore) as vm:
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
    # Refused, the counts are those dump level 31 would give (for reference); the header and
    # the JSON name the level actually asked for, as the refusal line does.
    level: int | None = _asked_level(args) if refusal else plan.dump_level
    if args.json:
        doc = plan.to_json()
        if refusal:
            doc.update(refused=refusal, reusable_pages=0, reusable_bytes=0, extents=0,
                       dump_level=level, counted_at_dump_level=plan.dump_level)
        import json

        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    asked = f"dump level {level}" if level is not None else "a collector that excludes nothing"
    print(f"kernel {plan.osrelease} ({plan.arch}), {asked}")
    if refusal:
        print(f"Pages per makedumpfile category (as dump level {plan.dump_level} would count "
              "them, for reference):")
    for line in _accounting_lines(plan):
        print(line)
    if refusal:
        print(f"reusable: none: refused by {refusal}")
    else:
        print(f"reusable: {plan.reusable_pages} pages ({human_size(plan.reusable_bytes)}) "
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
        count = "" if pages is None else f"{pages} pages ({human_size(pages * 4096)})"
        of = f" of class{'es' if len(classes) > 1 else ''} {', '.join(classes)}" if classes else ""
        out.append(f"withheld by {label}: {count}{of}: {why}")
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    from kdumpd.extentsfile import STDOUT, check_output_path, write_extents_file

    inputs = [p for p in (args.vmcore, args.host_iomem, args.host_cmdline) if p]
    check_output_path(args.extents, inputs)  # before the slow part: refuse early
    plan, _ = _build_plan(args)
    write_extents_file(args.extents, plan.extents, inputs)
    where = "standard output" if args.extents == STDOUT else args.extents
    for line in _withheld_lines(plan):
        print(line, file=sys.stderr)
    print(f"{len(plan.extents)} extents, {plan.reusable_pages} pages "
          f"({human_size(plan.reusable_bytes)}) written to {where}", file=sys.stderr)
    return 0


def cmd_dmesg(args: argparse.Namespace) -> int:
    from kdumpd.crash.log import read_crash_log

    with _vmcore(args.vmcore) as vm:
        for record in read_crash_log(vm):
            print(record.format())
    return 0


_VMCORE_HELP = "the crashed kernel's dump: an ELF vmcore (/proc/vmcore or a saved copy)"
_DESCRIPTION = (
    "kdumpd reuses the crashed kernel's memory that the dump leaves out (free pages, page "
    "cache, user data) as a block device in the kdump capture kernel. survey, plan and dmesg "
    "only read a vmcore; serve, status and stop run the device.")
_EPILOG = ("exit codes: 0 ok, 1 other error, 2 bad configuration or argument, 3 corrupt or "
           "truncated vmcore, 4 unknown layout, 5 page tables that do not resolve, 6 refused, "
           "7 old-memory backend, 8 data lost, 9 serving failed, 10 not running, "
           "11 self-test failed")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other kdumpd error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common() -> _Parser:
    """Options every subcommand takes too, so that ``kdumpd survey V --debug`` works."""
    common = _Parser(add_help=False)
    # SUPPRESS: absent after the subcommand, it keeps what was given before it.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="also print the traceback of an error and debug logs (the exit "
                             "code stays the same; default: off)")
    return common


def _add_gate_options(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--dump-level", "-d", type=_dump_level, default=None, metavar="N",
        help="the dump level the collector uses: shorthand for --collector "
             "'makedumpfile -d N' (default: the configured collector's)")
    which.add_argument(
        "--collector", metavar="'COMMAND LINE'", default=None,
        help="the dump collector that will run (default: read from /etc/kdump.conf or "
             "/etc/default/kdump-tools; without either: makedumpfile -d 31)")
    parser.add_argument("--mce-policy", choices=MCE_CHOICES, default="refuse",
                        help="after a hardware memory error: reuse nothing (refuse) or "
                             "exclude the reported address ranges (default: refuse)")
    parser.add_argument("--host-iomem", metavar="FILE", default=None,
                        help="the capture kernel's /proc/iomem, to check a plan offline "
                             "(default: read it only when planning the live /proc/vmcore)")
    parser.add_argument("--host-cmdline", metavar="FILE", default=None,
                        help="the capture kernel's /proc/cmdline, to check a plan offline "
                             "(default: as --host-iomem)")
    parser.add_argument("--host-nfit", metavar="FILE", action="append", default=None,
                        help="the capture kernel's /sys/firmware/acpi/tables/NFIT (repeat for "
                             "NFIT1...), to check persistent memory offline (default: none; "
                             "without it, memory sections hot-added after boot are withheld)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdumpd", description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument("--version", action="version", version=f"kdumpd {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="also print the traceback of an error and debug logs (the exit "
                             "code stays the same; default: off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common()]

    survey = sub.add_parser(
        "survey", parents=common, help="count pages per class and what could be reused",
        description="Count the vmcore's pages in makedumpfile's categories and show what "
                    "kdumpd could reuse at the collector's dump level, behind the safety "
                    "gate. A refusal is reported, not an error.")
    survey.add_argument("vmcore", help=_VMCORE_HELP)
    _add_gate_options(survey)
    survey.add_argument("--json", action="store_true",
                        help="print one JSON object instead of text (default: text)")
    survey.add_argument("--count-zero", action="store_true",
                        help="also read page contents to count zero pages (slow; default: "
                             "not computed)")
    survey.set_defaults(func=cmd_survey)

    plan = sub.add_parser(
        "plan", parents=common, help="write the reusable pfn extents",
        description="Write the pages kdumpd may reuse as half-open pfn ranges, 'start end' in "
                    "hex, one per line. A refusal exits 6 and writes nothing.")
    plan.add_argument("vmcore", help=_VMCORE_HELP)
    _add_gate_options(plan)
    plan.add_argument("--extents", required=True, metavar="FILE",
                      help="where to write the extents (required; - for standard output). "
                           "Written atomically; never an input, a directory or a device")
    plan.set_defaults(func=cmd_plan)

    dmesg = sub.add_parser("dmesg", parents=common,
                           help="print the crashed kernel's log from the vmcore",
                           description="Print the crashed kernel's log buffer, as dmesg would.")
    dmesg.add_argument("vmcore", help=_VMCORE_HELP)
    dmesg.set_defaults(func=cmd_dmesg)

    add_serve_commands(sub, common)
    return parser


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
            import traceback

            traceback.print_exc()
        print(f"kdumpd: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `kdumpd survey V | head`: the reader left, nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # A file kdumpd did not expect to fail (the named ones are checked and raise
        # KdumpdError): still one line naming it, never a traceback unless --debug.
        if args.debug:
            import traceback

            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"kdumpd: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
