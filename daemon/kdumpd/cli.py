"""The ``kdumpd`` command line: the only place that prints and exits.

Every KdumpdError becomes one line on stderr and the class's exit code; ``--debug`` adds the
traceback and changes nothing else. A usage error is one line too (exit 2). Nothing here
decides anything: it parses, calls, formats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from kdumpd import __version__
from kdumpd.errors import ConfigError, KdumpdError, RefusedError, VmcoreError
from kdumpd.extentsfile import STDOUT, check_output_path, write_extents_file
from kdumpd.plan import Plan, make_plan, read_crash_log
from kdumpd.safeplan import DEFAULT_COLLECTOR, gated_plan, host_facts_here
from kdumpd.safety.collector import parse_collector
from kdumpd.safety.gate import MCE_POLICIES
from kdumpd.safety.hostfacts import HostFacts, parse_host_facts
from kdumpd.safety.kdumpconf import discover
from kdumpd.servecli import add_serve_commands
from kdumpd.units import human_size
from kdumpd.vmcore.core import Vmcore, open_vmcore

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
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: not a text file") from None


def _host_facts(args: argparse.Namespace) -> HostFacts | None:
    if args.host_iomem or args.host_cmdline:
        iomem = _read_named("--host-iomem", args.host_iomem)
        cmdline = _read_named("--host-cmdline", args.host_cmdline)
        if args.host_iomem and not iomem.strip():
            raise ConfigError(f"--host-iomem {args.host_iomem}: empty (expected the capture "
                              "kernel's /proc/iomem)")
        try:
            return parse_host_facts(iomem, cmdline, source="--host-iomem/--host-cmdline")
        except ValueError as exc:
            raise ConfigError(f"--host-iomem/--host-cmdline: {exc}") from None
    return host_facts_here(Path(args.vmcore))


def _collector(args: argparse.Namespace) -> str | None:
    """The collector named on the command line (``-d N`` stands for makedumpfile -d N)."""
    if args.dump_level is not None:
        return f"makedumpfile -d {args.dump_level}"
    collector: str | None = args.collector
    return collector


def _asked_level(args: argparse.Namespace) -> int | None:
    """The dump level the collector in force uses (None: it excludes nothing), found the way
    the gate finds it; for the survey header when the gate refused."""
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
    try:
        with open_vmcore(path) as vm:
            yield vm
    except VmcoreError as exc:
        if path in str(exc):
            raise
        raise VmcoreError(f"{path}: {exc}") from exc


def _build_plan(args: argparse.Namespace) -> tuple[Plan, str | None]:
    """The gated plan, or (for survey) the ungated counts and the refusal."""
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
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    asked = f"dump level {level}" if level is not None else "a collector that excludes nothing"
    print(f"kernel {plan.osrelease} ({plan.arch}), {asked}")
    if refusal:
        print(f"Pages per makedumpfile category (as dump level {plan.dump_level} would count "
              "them, for reference):")
    else:
        print("Excluded pages (makedumpfile categories):")
    for key, label in _CATEGORY_LABELS:
        value = plan.categories.get(key)
        shown = "not computed" if value is None else f"0x{value:016x}"
        print(f"  {label:<26}: {shown}")
    print(f"  {'Total pages':<26}: 0x{plan.total_pages:016x}")
    if refusal:
        print(f"reusable: none: refused by {refusal}")
    else:
        print(f"reusable: {plan.reusable_pages} pages ({human_size(plan.reusable_bytes)}) "
              f"in {len(plan.extents)} extents")
    for rule in plan.features.get("safety_rules", []):
        print(f"safety: {rule}")
    for rule, why in plan.withheld.items():
        print(f"withheld {rule}: {why}")
    feats: dict[str, Any] = {
        k: v for k, v in plan.features.items() if k not in ("safety_rules",)}
    print("layout: " + ", ".join(f"{k}={v}" for k, v in sorted(feats.items())))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    inputs = [p for p in (args.vmcore, args.host_iomem, args.host_cmdline) if p]
    check_output_path(args.extents, inputs)  # before the slow part: refuse early
    plan, _ = _build_plan(args)
    write_extents_file(args.extents, plan.extents, inputs)
    where = "standard output" if args.extents == STDOUT else args.extents
    print(f"{len(plan.extents)} extents, {plan.reusable_pages} pages "
          f"({human_size(plan.reusable_bytes)}) written to {where}", file=sys.stderr)
    return 0


def cmd_dmesg(args: argparse.Namespace) -> int:
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
    parser.add_argument("--mce-policy", choices=MCE_POLICIES, default="refuse",
                        help="after a hardware memory error: reuse nothing (refuse) or "
                             "exclude the reported address ranges (default: refuse)")
    parser.add_argument("--host-iomem", metavar="FILE", default=None,
                        help="the capture kernel's /proc/iomem, to check a plan offline "
                             "(default: read it only when planning the live /proc/vmcore)")
    parser.add_argument("--host-cmdline", metavar="FILE", default=None,
                        help="the capture kernel's /proc/cmdline, to check a plan offline "
                             "(default: as --host-iomem)")


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
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"kdumpd: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
