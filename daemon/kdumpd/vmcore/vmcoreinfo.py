"""VMCOREINFO text -> a typed, queryable object.

VMCOREINFO is the crashed kernel's own description of its layout (``KEY=value`` lines in the
note named ``VMCOREINFO``, type 0). kdumpd tells kernel layouts apart only by which keys exist,
never by ``OSRELEASE``: distributions backport layout changes without bumping the version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kdumpd.errors import LayoutError, VmcoreError

__all__ = ["VmcoreInfo", "parse_vmcoreinfo"]

_LINE = re.compile(r"^(SYMBOL|SIZE|OFFSET|LENGTH|NUMBER)\(([^)]*)\)=(.*)$")
_MAX_TEXT = 1 << 20


def _parse_int(text: str, *, hex_default: bool) -> int:
    """Parse a VMCOREINFO number: SYMBOL is bare hex, NUMBER is decimal or 0x-hex."""
    text = text.strip()
    neg = text.startswith("-")
    body = text[1:] if neg else text
    if body.lower().startswith("0x"):
        value = int(body[2:], 16)
    elif hex_default:
        value = int(body, 16)
    else:
        value = int(body, 10)
    return -value if neg else value


@dataclass(frozen=True, slots=True)
class VmcoreInfo:
    """The parsed VMCOREINFO note; lookups use the key's literal kernel spelling."""

    symbols: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)
    numbers: dict[str, int] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)

    # Lookups that raise name the key the way it appears in the note, so that a missing key
    # reads as e.g. "VMCOREINFO lacks OFFSET(page._mapcount)".
    def symbol(self, name: str) -> int:
        return self._get(self.symbols, "SYMBOL", name)

    def size(self, name: str) -> int:
        return self._get(self.sizes, "SIZE", name)

    def offset(self, name: str) -> int:
        return self._get(self.offsets, "OFFSET", name)

    def length(self, name: str) -> int:
        return self._get(self.lengths, "LENGTH", name)

    def number(self, name: str) -> int:
        return self._get(self.numbers, "NUMBER", name)

    def has(self, kind: str, name: str) -> bool:
        table = {"SYMBOL": self.symbols, "SIZE": self.sizes, "OFFSET": self.offsets,
                 "LENGTH": self.lengths, "NUMBER": self.numbers}[kind]
        return name in table

    @property
    def osrelease(self) -> str:
        return self.other.get("OSRELEASE", "unknown")

    @property
    def page_size(self) -> int:
        if "PAGESIZE" not in self.other:
            raise LayoutError("VMCOREINFO lacks PAGESIZE")
        return _parse_int(self.other["PAGESIZE"], hex_default=False)

    @property
    def kerneloffset(self) -> int | None:
        text = self.other.get("KERNELOFFSET")
        return None if text is None else _parse_int(text, hex_default=True)

    @staticmethod
    def _get(table: dict[str, int], kind: str, name: str) -> int:
        try:
            return table[name]
        except KeyError:
            raise LayoutError(f"VMCOREINFO lacks {kind}({name})") from None


def parse_vmcoreinfo(desc: bytes) -> VmcoreInfo:
    """Parse the VMCOREINFO note descriptor; raise VmcoreError on garbage."""
    if len(desc) > _MAX_TEXT:
        raise VmcoreError(f"VMCOREINFO note of {len(desc)} bytes is implausibly large")
    text = desc.split(b"\0", 1)[0].decode("ascii", "replace")
    info = VmcoreInfo()
    tables = {"SYMBOL": info.symbols, "SIZE": info.sizes, "OFFSET": info.offsets,
              "LENGTH": info.lengths, "NUMBER": info.numbers}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        match = _LINE.match(line)
        try:
            if match:
                kind, name, value = match.groups()
                tables[kind][name] = _parse_int(value, hex_default=(kind == "SYMBOL"))
            elif "=" in line:
                key, value = line.split("=", 1)
                info.other[key] = value
            else:
                raise ValueError("no '='")
        except ValueError:
            raise VmcoreError(f"VMCOREINFO line {lineno} is malformed: {line[:80]!r}") from None
    if not info.other.get("OSRELEASE") and not info.sizes:
        raise VmcoreError("VMCOREINFO note holds no keys")
    # Keys read later as numbers are checked now, so garbage fails here with its name.
    for key, hexa in (("PAGESIZE", False), ("KERNELOFFSET", True), ("CRASHTIME", False)):
        if key in info.other:
            try:
                _parse_int(info.other[key], hex_default=hexa)
            except ValueError:
                bad = info.other[key][:40]
                raise VmcoreError(f"VMCOREINFO {key}={bad!r} is not a number") from None
    return info
