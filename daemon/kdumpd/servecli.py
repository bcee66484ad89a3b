"""The ``serve``, ``status`` and ``stop`` subcommands of the ``kdumpd`` command line.

Apart from cli.py so that each stays one job: this part maps flags onto configuration keys
(every flag's help is the key's own help and default, from kdumpd.config, so the two cannot
drift), loads the configuration, calls :mod:`kdumpd.serve` and formats the daemon's status.
``kdumpd.serve`` is imported only when one of these commands runs: survey, plan and dmesg stay
free of the store, nbd and systemd imports.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from kdumpd.config import KEYS, Config, format_size, load_serve_config
from kdumpd.errors import NotRunningError
from kdumpd.oldmem.spec import BACKEND_SYNTAX
from kdumpd.units import human_size

__all__ = ["add_serve_commands"]

# serve flag -> config key; every flag defaults to None so that only given flags override the
# config file and the kernel command line (see kdumpd.config for the precedence).
_SERVE_FLAGS = [
    ("--backend", "backend", BACKEND_SYNTAX),
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
    ("--log-level", "log_level", "debug|info|warning|error"),
    ("--nbdkit", "nbdkit", "PATH"),
]

_SIZES = ("size", "scrub_rate", "min_distance")


def _key_help(key: str) -> str:
    """A configuration key's help text with its built-in default."""
    spec = KEYS[key]
    text = spec.help
    if "default" in text:
        return text
    value = spec.default
    if key == "size" and not value:
        shown = "auto"
    elif key in _SIZES and isinstance(value, int):
        shown = format_size(value)
    elif isinstance(value, bool):
        shown = "yes" if value else "no"
    elif value == "":
        shown = "none"
    else:
        shown = str(value)
    return f"{text} (default: {shown})"


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


def _serve_config(args: argparse.Namespace) -> Config:
    return load_serve_config(_serve_flags(args), config_path=args.config,
                             cmdline_path=args.kernel_cmdline)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _serve_config(args)
    from kdumpd.serve.lifecycle import serve

    return serve(cfg)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        from kdumpd.serve.control import read_status

        st = read_status(_serve_config(args).run_dir)
    except NotRunningError as exc:
        if args.json:  # scripts get an object to read whatever the state
            print(json.dumps({"running": False, "state": "not running", "reason": str(exc)},
                             indent=2, sort_keys=True))
        raise
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0 if st["running"] else 1
    i = st["integrity"]
    use = {"swap": " as swap", "scratch": f" on {st.get('mounted')}"}.get(st.get("as") or "", "")
    print(f"kdumpd: {st['state']} (pid {st['daemon_pid']}, nbdkit {st['nbdkit_pid']})")
    answers = "" if st.get("socket_answers", True) else " (NOT ANSWERING)"
    print(f"  socket     {st['socket']}{answers}")
    print(f"  device     {st['device'] or 'not attached'}{use}")
    print(f"  backend    {st['backend']}")
    print(f"  copies     {st['copies']}")
    print(f"  size       {human_size(st['size_bytes'] or 0)}")
    print(f"  capacity   {human_size(st['capacity_bytes'] or 0)}")
    print(f"  used       {human_size(st['used_bytes'] or 0)}")
    print(f"  integrity  detected {i['detected']}, repaired {i['repaired']}, quarantined "
          f"{i['quarantined']}, lost {i['lost']} (relocated {i['relocated']}, scrubbed "
          f"{i['scrubbed_blocks']} blocks)")
    rss, anon, pss = st["rss_bytes"], st["rss_anon_bytes"], st.get("pss_bytes") or {}
    print(f"  memory     daemon {human_size(rss['daemon'])} RSS ({human_size(anon['daemon'])} "
          f"anon), nbdkit {human_size(rss['nbdkit'])} RSS ({human_size(anon['nbdkit'])} anon); "
          f"{human_size(sum(pss.values()))} PSS together")
    if st.get("ready_seconds") is not None:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in (st.get("phases") or {}).items())
        print(f"  ready in   {st['ready_seconds']:.2f} s ({phases})")
    prot = st.get("protections") or {}
    print("  protect    " + (", ".join(f"{k} {v}" for k, v in sorted(prot.items())) or "off"))
    return 0 if st["running"] else 1


def cmd_stop(args: argparse.Namespace) -> int:
    run_dir = _serve_config(args).run_dir
    from kdumpd.serve.control import stop

    print(stop(run_dir, timeout=args.timeout))
    return 0


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="configuration file (default: /etc/kdumpd.conf if it exists; a "
                             "file named here must exist)")
    parser.add_argument("--kernel-cmdline", metavar="FILE", default=None,
                        help="where to read kdumpd.KEY=VALUE parameters (default: "
                             "/proc/cmdline; a file named here must exist)")
    parser.add_argument("--run-dir", dest="run_dir", metavar="DIR", default=None,
                        help=_key_help("run_dir"))


def add_serve_commands(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add serve, status and stop to the ``kdumpd`` subcommand parser ``sub``."""
    serve = sub.add_parser(
        "serve", parents=parents, help="serve old memory as an NBD device (foreground)",
        description="Plan, self-test, start nbdkit on a Unix socket and (with --attach or "
                    "--as) attach /dev/nbdN; run until SIGTERM or `kdumpd stop`. Every flag "
                    "overrides the same key of the config file and of kdumpd.KEY= on the "
                    "kernel command line; the defaults shown apply when none sets it.")
    serve.add_argument("vmcore", nargs="?", default=None, help=_key_help("vmcore"))
    _add_config_options(serve)
    for flag, key, metavar in _SERVE_FLAGS:
        if key == "run_dir":
            continue
        serve.add_argument(flag, dest=key, metavar=metavar, default=None, help=_key_help(key))
    serve.add_argument("--attach", action=argparse.BooleanOptionalAction, default=None,
                       help=_key_help("attach") + "; needs root; implied by --as swap|scratch")
    serve.add_argument("--protect", action=argparse.BooleanOptionalAction, default=None,
                       help=_key_help("protect"))
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser(
        "status", parents=parents, help="capacity, use and integrity of the running daemon",
        description="Show the daemon serving from the run directory; exit 0 only if it "
                    "serves and its socket answers, 10 if nothing runs there.")
    _add_config_options(status)
    status.add_argument("--json", action="store_true",
                        help="print one JSON object (also when nothing runs; default: text)")
    status.set_defaults(func=cmd_status)

    stop = sub.add_parser(
        "stop", parents=parents, help="tear down: swapoff/umount, disconnect, stop nbdkit",
        description="Stop the daemon serving from the run directory and wait for its "
                    "teardown; clean up after a daemon that died.")
    _add_config_options(stop)
    stop.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                      help="how long to wait for the teardown (default: 600)")
    stop.set_defaults(func=cmd_stop)
