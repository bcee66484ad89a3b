"""Planning runs in the capture kernel's ~100 MiB: it must not pull numpy in, and without its
C classifier it must stop with one line saying how to build it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DAEMON = str(Path(__file__).resolve().parents[2] / "daemon")


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": DAEMON}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_planning_imports_no_numpy() -> None:
    proc = _run("import sys, kdumpd.plan.pipeline, kdumpd.plan.gated, kdumpd.mm.classify, "
                "kdumpd.mm.policy, kdumpd.mm.extents; "
                "print(sorted(m for m in sys.modules if m.split('.')[0] == 'numpy'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_missing_extension_is_one_line(tmp_path: Path) -> None:
    # None in sys.modules makes the import fail as if the .so were not there.
    proc = _run("import runpy, sys; sys.modules['kdumpd.mm._classify'] = None; "
                "sys.argv[0] = 'kdumpd'; runpy.run_module('kdumpd', run_name='__main__')",
                "survey", str(tmp_path / "vmcore"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 12, proc.stderr
    assert len(lines) == 1 and "_build_classify.py" in lines[0], lines
