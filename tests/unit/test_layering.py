"""Data flows one way: vmcore -> xlat -> mm -> plan -> store -> nbd. An AST scan enforces it."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "daemon" / "kdumpd"

# module group -> kdumpd groups it may import
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "units": set(),
    "phases": set(),
    "vmcore": {"errors", "units", "vmcore"},
    "xlat": {"errors", "units", "vmcore", "xlat"},
    "mm": {"errors", "units", "vmcore", "xlat", "mm"},
    "crash": {"errors", "units", "vmcore", "xlat", "crash"},
    "plan": {"errors", "units", "vmcore", "xlat", "mm", "crash"},
    "extentsfile": {"errors", "units"},
    "safety": {"errors", "units", "vmcore", "mm", "crash", "safety"},
    "safeplan": {"errors", "units", "vmcore", "mm", "crash", "safety", "plan"},
    "cmdline": set(),
    "config": {"errors", "config", "cmdline"},
    "journal": {"errors", "journal"},
    "nbd": {"plan", "store", "oldmem", "journal", "errors", "units", "nbd"},
    "oldmem": {"errors", "units", "oldmem", "cmdline"},
    "store": {"errors", "units", "oldmem", "store"},
}


def _group(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdumpd."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kdumpd."):
                    out.add(alias.name.split(".")[1])
    return out


def test_imports_follow_the_data_flow() -> None:
    violations = []
    for path in sorted(PKG.rglob("*.py")):
        group = _group(path)
        if group not in ALLOWED:
            continue
        bad = _imports(path) - ALLOWED[group]
        if bad:
            violations.append(f"{path.relative_to(PKG)} imports {sorted(bad)}")
    assert not violations, violations


def test_nothing_imports_the_cli() -> None:
    users = [p for p in PKG.rglob("*.py") if p.name != "__main__.py" and "cli" in _imports(p)]
    assert not users
