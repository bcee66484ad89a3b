"""Data flows one way, flags -> config -> plan -> store -> serve: an AST scan of every module
proves no import runs back up, that only the CLI imports ``serve``, that nothing imports the
CLI, and that the supervisor and the plugin's export load none of the planner."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "daemon" / "kdumpd"

# module group (top-level module or package under kdumpd/) -> kdumpd groups it may import
_BOTTOM = {"errors", "units"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "units": set(),
    "phases": set(),
    "cmdline": set(),
    "journal": set(),
    "jsonfile": {"errors"},
    "pathcheck": {"errors"},
    "vmcore": _BOTTOM | {"vmcore"},
    "xlat": _BOTTOM | {"vmcore", "xlat"},
    "mm": _BOTTOM | {"vmcore", "xlat", "mm"},
    "crash": _BOTTOM | {"vmcore", "xlat", "crash"},
    "extentsfile": _BOTTOM | {"pathcheck"},
    "safety": _BOTTOM | {"vmcore", "mm", "crash", "safety"},
    # the pipeline (vmcore -> xlat -> mm -> extents) and, above it, the plan behind the gate
    "plan": _BOTTOM | {"vmcore", "xlat", "mm", "crash", "safety", "plan"},
    "oldmem": _BOTTOM | {"oldmem", "cmdline"},
    # config checks the backend spec with oldmem.spec (pure), nothing else of oldmem
    "config": {"errors", "config", "cmdline", "oldmem"},
    "store": _BOTTOM | {"oldmem", "store"},
    "nbd": _BOTTOM | {"store", "oldmem", "journal", "jsonfile", "pathcheck", "nbd"},
    "serve": _BOTTOM | {"vmcore", "plan", "store", "oldmem", "nbd", "journal", "jsonfile",
                        "config", "phases", "serve"},
    # the command line: parses flags and calls down
    "servecli": _BOTTOM | {"config", "oldmem", "serve"},
    "cli": _BOTTOM | {"vmcore", "crash", "plan", "safety", "extentsfile", "servecli"},
    "__main__": _BOTTOM | {"cli"},
}
_CLI = {"cli", "servecli", "__main__"}


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


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if not p.name.startswith("_build_"))


def test_every_module_has_a_place_in_the_order() -> None:
    assert {_group(p) for p in _modules()} - {"__init__"} <= set(ALLOWED)


def test_imports_follow_the_data_flow() -> None:
    violations = []
    for path in _modules():
        group = _group(path)
        if group == "__init__":
            continue
        bad = _imports(path) - ALLOWED[group]
        if bad:
            violations.append(f"{path.relative_to(PKG)} imports {sorted(bad)}")
    assert not violations, violations


def _full_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdumpd."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("kdumpd."))
    return out


def test_the_pipeline_sits_below_the_gate() -> None:
    """Inside plan/ the order is pipeline -> gated: the walk knows nothing of the safety rules
    (the gate hands it plain withheld classes and forbidden ranges)."""
    imports = _full_imports(PKG / "plan" / "pipeline.py")
    assert not {m for m in imports if m.startswith(("kdumpd.safety", "kdumpd.plan"))}, imports
    assert "kdumpd.plan.pipeline" in _full_imports(PKG / "plan" / "gated.py")


def test_the_crash_facts_need_no_planner() -> None:
    """The crashed kernel's log and facts are read without the planner (`kdumpd dmesg`, rule 1)."""
    users = [str(p.relative_to(PKG)) for p in (PKG / "crash").rglob("*.py")
             if {"plan", "safety", "mm"} & _imports(p)]
    assert not users


def test_only_the_cli_imports_serve() -> None:
    users = [str(p.relative_to(PKG)) for p in _modules()
             if _group(p) not in _CLI | {"serve"} and "serve" in _imports(p)]
    assert not users


def test_nothing_imports_the_cli() -> None:
    users = [p for p in PKG.rglob("*.py") if p.name != "__main__.py" and "cli" in _imports(p)]
    assert not users


def _loaded_by(module: str) -> set[str]:
    code = (f"import sys; sys.path.insert(0, {str(PKG.parent)!r}); import {module}; "
            "print('\\n'.join(m for m in sys.modules if m.startswith('kdumpd')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return set(proc.stdout.split())


_PLANNER = {"kdumpd.plan", "kdumpd.plan.pipeline", "kdumpd.plan.gated", "kdumpd.config",
            "kdumpd.vmcore", "kdumpd.mm", "kdumpd.xlat", "kdumpd.serve.prepare",
            "kdumpd.serve.lifecycle"}


def test_the_supervisor_loads_no_planner_and_no_store() -> None:
    """After READY the daemon execs the supervisor to shed the planner's memory: it must not
    load it (or the store) back."""
    loaded = _loaded_by("kdumpd.serve.supervise")
    assert not loaded & (_PLANNER | {"kdumpd.store", "kdumpd.oldmem", "kdumpd.serve.export"})
    assert "kdumpd.serve.teardown" in loaded


def test_the_watcher_loads_nothing_of_kdumpd() -> None:
    """What sits in memory from READY to the end of the capture imports no kdumpd module and
    no more of the standard library than os, signal, sys and time need."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); "
            "import kdumpd.serve.watch; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    proc = subprocess.run([sys.executable, "-S", "-c", code, str(PKG.parent)],
                          capture_output=True, text=True, check=True)
    loaded = set(proc.stdout.split())
    assert {m for m in loaded if m.startswith("kdumpd")} == {
        "kdumpd", "kdumpd.serve", "kdumpd.serve.watch"}, loaded
    heavy = {"logging", "json", "re", "socket", "subprocess", "threading", "dataclasses",
             "typing", "inspect", "argparse"}
    assert not loaded & heavy, loaded & heavy


def test_the_plugins_export_loads_no_planner() -> None:
    loaded = _loaded_by("kdumpd.serve.export")
    assert not loaded & _PLANNER
    assert "kdumpd.store.blockstore" in loaded
