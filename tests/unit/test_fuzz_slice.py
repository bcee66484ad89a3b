"""The per-CI slice of the vmcore fuzzer (bench/fuzz_vmcore.py is the long run), and the
bugs it found, each pinned by a test.

The slice: a few hundred structure-aware mutations of every synthetic seed through survey, plan
and serve's planning step, each in a worker with a deadline: no exception outside the
KdumpdError taxonomy, one stderr line with the class's exit code, no hang, no write to the
vmcore or the image backend. KDUMPD_FUZZ_SLICE sets the count, KDUMPD_FUZZ_SEED the seed.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from tests.synth import fuzz
from tests.synth.builder import Machine, template
from tests.synth.fuzzrun import run_campaign
from tests.synth.mutate import Input

from kdumpd.cli import main
from kdumpd.errors import LayoutError, VmcoreError
from kdumpd.vmcore.core import open_vmcore
from kdumpd.xlat.x86_64 import X86_64Translator

SLICE = int(os.environ.get("KDUMPD_FUZZ_SLICE", "360"))
SEED = int(os.environ.get("KDUMPD_FUZZ_SEED", "12"))


def test_fuzz_slice(tmp_path: Path) -> None:
    camp = run_campaign(SLICE, SEED, tmp_path / "seeds", timeout=30, prepare_every=30,
                        findings_dir=tmp_path / "findings")
    assert camp.inputs == SLICE
    assert camp.hangs == 0 and camp.crashes == 0
    assert not camp.findings, [f["signature"] for f in camp.findings]
    # The mutations reached past the ELF reader: every error class and clean plans occur,
    # and each structure was mutated.
    seen = {k.split(":")[1].split("/")[0] for k in camp.outcomes if k.startswith("serve:")}
    assert {"ok", "ok-changed", "VmcoreError", "LayoutError", "TranslationError"} <= seen, \
        camp.outcomes
    assert {"page-table", "mem_section", "VMCOREINFO", "phdr"} <= set(camp.mutations)
    assert any(k.startswith("struct page") for k in camp.mutations)
    assert any(k.startswith("prepare:") for k in camp.outcomes)


def test_the_harness_reports_a_hang(tmp_path: Path) -> None:
    """A deadline no input can meet: every input is a hang, the worker is killed and
    restarted, and the campaign goes on."""
    camp = run_campaign(3, 1, tmp_path / "seeds", timeout=0.001, names=["6.1"])
    assert camp.inputs == 3 and camp.hangs == 3
    assert all(f["kind"] == "hang" for f in camp.findings)


def test_the_harness_reports_a_foreign_exception(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception outside the taxonomy, from the CLI or the serve path, is a finding."""
    from kdumpd.serve import prepare

    core = Machine(template("6.1"), ram=128 << 20).write(tmp_path / "core")

    def boom(*args: object, **kw: object) -> None:
        raise IndexError("deliberate")
    monkeypatch.setattr(prepare, "plan_for_serve", boom)
    monkeypatch.setattr("kdumpd.plan.gated.gated_plan", boom)  # the CLI imports it when planning
    res = fuzz._serve_plan(core, None)
    assert res["finding"].startswith("IndexError: deliberate")
    cli = fuzz._cli(["survey", str(core), "-d", "31"], fuzz._error_names())
    assert cli["finding"].startswith("IndexError: deliberate")


def test_input_json_round_trip() -> None:
    inp = Input("6.1", [(16, b"\x01\x02")], 4096, ["x"], True)
    assert Input.from_json(inp.to_json()) == inp


# --- regressions found by the fuzzer ---------------------------------------------------------


def _legacy_log_core(tmp_path: Path) -> tuple[Path, int]:
    """A core with the pre-5.10 printk buffer; returns it and the buffer's file offset."""
    m = Machine(template("6.1"), ram=128 << 20)
    m.set_log(["Linux version 6.1.0", "Kernel panic - not syncing: test"], legacy=True)
    core = m.write(tmp_path / "legacy")
    with open_vmcore(core) as vm:
        xlat = X86_64Translator(vm.info, vm.header.loads, vm.phys.read_u64)
        buf = vm.phys.read_u64(xlat.translate(vm.info.symbol("log_buf")))
        off = vm.phys.offset_of(xlat.translate(buf), 16)
    return core, off


def _dmesg_error(core: Path, capsys: pytest.CaptureFixture[str]) -> str:
    start = time.monotonic()
    assert main(["dmesg", str(core)]) == VmcoreError.exit_code
    assert time.monotonic() - start < 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_legacy_log_wrap_marker_loop_ends_at_once(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Found by the fuzzer: a wrap marker (length 0) at index 0 sent the reader back to 0,
    4 million times (3.5 s per read, three reads per serve) before calling it corrupt."""
    core, off = _legacy_log_core(tmp_path)
    with open(core, "r+b") as fh:
        fh.seek(off + 8)
        fh.write(struct.pack("<H", 0))
    assert "wraps twice" in _dmesg_error(core, capsys)


def test_legacy_log_record_shorter_than_its_header(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    core, off = _legacy_log_core(tmp_path)
    with open(core, "r+b") as fh:
        fh.seek(off + 8)
        fh.write(struct.pack("<H", 4))
    assert "shorter than its 16-byte header" in _dmesg_error(core, capsys)


def test_lockless_ring_with_more_descriptors_than_text(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """count_bits >= size_bits never happens in a kernel; read whole, such a ring could need
    more memory than the capture kernel has."""
    m = Machine(template("6.1"), ram=128 << 20)
    core = m.write(tmp_path / "ring")
    with open_vmcore(core) as vm:
        xlat = X86_64Translator(vm.info, vm.header.loads, vm.phys.read_u64)
        rb = vm.phys.read_u64(xlat.translate(vm.info.symbol("prb")))
        off = vm.phys.offset_of(xlat.translate(rb), 4)  # desc_ring.count_bits
    with open(core, "r+b") as fh:
        fh.seek(off)
        fh.write(struct.pack("<I", 20))  # the text ring has 14 bits
    assert "printk ring sizes are implausible (20, 14 bits)" in _dmesg_error(core, capsys)


@pytest.mark.parametrize("value", [str(1 << 64), str(1 << 63), "256", "-7"])
def test_hugetlb_dtor_out_of_range_is_a_layout_error(tmp_path: Path, value: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Found by the long run: NUMBER(HUGETLB_PAGE_DTOR)=2**64 overflowed the C layout's int64
    (an OverflowError traceback from survey, plan and serve)."""
    m = Machine(template("6.1"), ram=128 << 20)
    m.info["NUMBER(HUGETLB_PAGE_DTOR)"] = value
    core = m.write(tmp_path / "dtor")
    for argv in (["survey", str(core), "-d", "31"],
                 ["plan", str(core), "-d", "31", "--extents", str(tmp_path / "x")]):
        assert main(argv) == LayoutError.exit_code
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"kdumpd: LayoutError: NUMBER(HUGETLB_PAGE_DTOR)={value} is not a byte "
                       "value"], err
