"""Which collector the kdump tooling on this machine will run: Fedora/RHEL or Debian/Ubuntu.

Parsing is pure (text in); ``discover`` is the thin part that reads the files.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CollectorSource", "discover", "from_fedora_conf", "from_kdump_tools"]

FEDORA_CONF = "etc/kdump.conf"
DEBIAN_CONF = "etc/default/kdump-tools"
# kdump-utils' default core_collector; kdump-tools' default MAKEDUMP_ARGS. kdump-config adds
# -F for its pipe, which changes nothing about which pages are excluded.
FEDORA_DEFAULT = "makedumpfile -l --message-level 7 -d 31"
DEBIAN_DEFAULT_ARGS = "-c -d 31"


@dataclass(frozen=True, slots=True)
class CollectorSource:
    """A collector command line and where it was found (for messages and the report)."""

    cmdline: str
    source: str


def from_fedora_conf(text: str, source: str) -> CollectorSource:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("core_collector"):
            return CollectorSource(line[len("core_collector"):].strip(), source)
    return CollectorSource(FEDORA_DEFAULT, f"{source} (default core_collector)")


def from_kdump_tools(text: str, source: str) -> CollectorSource:
    args = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("MAKEDUMP_ARGS="):
            value = line.split("=", 1)[1]
            try:
                parts = shlex.split(value, comments=True)
            except ValueError:
                parts = [value]
            args = " ".join(parts)
    if args is None:
        return CollectorSource(f"makedumpfile {DEBIAN_DEFAULT_ARGS}",
                               f"{source} (default MAKEDUMP_ARGS)")
    return CollectorSource(f"makedumpfile {args}", source)


def discover(root: str = "/") -> CollectorSource | None:
    """The collector configured under ``root``, or None if no kdump tooling is configured."""
    base = Path(root)
    fedora = base / FEDORA_CONF
    if fedora.is_file():
        return from_fedora_conf(fedora.read_text(errors="replace"), str(fedora))
    debian = base / DEBIAN_CONF
    if debian.is_file():
        return from_kdump_tools(debian.read_text(errors="replace"), str(debian))
    return None
