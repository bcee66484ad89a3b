"""Offline checks that match the capture kernel, on the real pmem-kmem-6.1 vmcore (issue 15,
item 16): a guest whose NVDIMM was onlined as System RAM (kmem). The live plan cuts it by the
capture kernel's ACPI NFIT; an offline plan without ``--host-nfit`` must not look safer, so
the memory sections added after boot (SECTION_IS_EARLY clear) are withheld instead.

Uses the cached vmcore only when it is current (never starts QEMU from here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kdumpd.cli import main
from kdumpd.extentsfile import read_extents_file
from kdumpd.units import PAGE_SHIFT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vm"))
import vmcores  # noqa: E402

NAME = "pmem-kmem-6.1"


@pytest.fixture(scope="module")
def pmem() -> Path:
    d = vmcores.default_cache_dir() / NAME
    if not vmcores.is_current(vmcores.CATALOGUE[NAME], d):
        pytest.skip(f"{NAME} is not in the vmcore cache (tests/vm/vmcores.py ensure {NAME})")
    return d


def _plan(d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str
          ) -> tuple[set[int], str]:
    out = tmp_path / "extents"
    assert main(["plan", str(d / "vmcore"), "--extents", str(out), *extra]) == 0
    pages = {p for e in read_extents_file(str(out)) for p in range(e.start_pfn, e.end_pfn)}
    return pages, capsys.readouterr().err


def test_offline_plan_is_no_safer_than_the_live_one(pmem: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (lo, hi), = ((a >> PAGE_SHIFT, b >> PAGE_SHIFT) for a, b in vmcores.hazard(pmem)["pmem"])
    live_facts = ["--host-iomem", str(pmem / "iomem.kdump"),
                  "--host-cmdline", str(pmem / "cmdline.kdump")]
    nfit = [a for p in sorted(pmem.glob("nfit.kdump*.bin")) for a in ("--host-nfit", str(p))]
    live, live_err = _plan(pmem, tmp_path, capsys, *live_facts, *nfit)
    offline, offline_err = _plan(pmem, tmp_path, capsys)
    assert not any(lo <= p < hi for p in live | offline), "persistent memory planned"
    assert offline <= live, "the offline plan holds pages the live one would not"
    assert len(offline) >= 0.99 * len(live)
    assert "withheld by rule 4" in live_err and "(ACPI NFIT)" in live_err
    assert "hot-added after boot" in offline_err
    # survey names the rules it could not check offline
    assert main(["survey", str(pmem / "vmcore")]) == 0
    out = capsys.readouterr().out
    assert "rule 4 not checked offline" in out and "rule 8 not checked offline" in out
    assert main(["survey", str(pmem / "vmcore"), "--json", *live_facts, *nfit]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not any("not checked" in r for r in doc["features"]["safety_rules"])
