"""docs/kdumpd.8.md documents every flag of every command and nothing else, every flag has help
text (both checked against the argparse parsers themselves), and no document or source file
points at a path outside the repository."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from kdumpd.cli import build_parser

TOP = Path(__file__).resolve().parents[2]
PAGE = TOP / "docs" / "kdumpd.8.md"
_ITEM = re.compile(r"\*\*`(-{1,2}[\w-]+|[A-Z]+)`\*\*")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"GLOBAL OPTIONS": top, **sub.choices}


def _names(parser: argparse.ArgumentParser) -> set[str]:
    out: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        out.update(action.option_strings or [str(action.metavar or action.dest).upper()])
    return out


def _page_sections() -> dict[str, set[str]]:
    """Section title ("survey", "GLOBAL OPTIONS", ...) -> the names its list items document."""
    sections: dict[str, set[str]] = {}
    title = ""
    for line in PAGE.read_text().splitlines():
        if m := re.match(r"#{2,3} (.+)", line):
            title = m.group(1).strip()
        elif line.startswith("- **`"):
            sections.setdefault(title, set()).update(_ITEM.findall(line.split(":", 1)[0]))
    return sections


def test_every_flag_is_on_the_page_and_every_page_flag_exists() -> None:
    documented = _page_sections()
    for name, parser in _parsers().items():
        assert name in documented, f"docs/kdumpd.8.md has no section for {name}"
        have = _names(parser)
        assert have - documented[name] == set(), f"{name}: undocumented flags"
        assert documented[name] - have == set(), f"{name}: the page lists flags that do not exist"
    assert set(documented) - set(_parsers()) == set(), "a section documents an unknown command"


def test_every_flag_has_help() -> None:
    for name, parser in _parsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            what = "/".join(action.option_strings) or action.dest
            assert action.help and len(action.help) > 10, f"{name} {what} has no help text"
            if name == "serve" and action.option_strings and action.nargs != 0 \
                    and not isinstance(action, argparse.BooleanOptionalAction):
                assert "default" in action.help, f"serve {what} does not say its default"


# Notes kept beside the project while it was written; a user of the project has none of them.
_OUTSIDE = re.compile(r"/work/|\.\./shared|shared/docs|shared notes|measured\.md|style\.md")


def test_no_file_points_outside_the_repository() -> None:
    me = Path(__file__).resolve()
    bad = []
    for top in ("README.md", "docs", "daemon", "nbd_plugin", "initramfs-hooks", "tests", "bench",
                "scripts"):
        root = TOP / top
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if not path.is_file() or path == me or "data" in path.relative_to(TOP).parts \
                    or path.suffix in (".so", ".pyc", ".gz", ".xz", ".zst"):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            bad += [f"{path.relative_to(TOP)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                    if _OUTSIDE.search(line)]
    assert not bad
