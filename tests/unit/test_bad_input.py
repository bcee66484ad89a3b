"""Bad input: a clear one-line error, a non-zero exit, and no traceback unless --debug."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.synth.builder import Machine, template

from kdumpd.cli import main
from kdumpd.errors import KdumpdError, LayoutError, TranslationError, VmcoreError
from kdumpd.plan.pipeline import make_plan
from kdumpd.vmcore.core import open_vmcore


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    m = Machine(template("6.1"))
    m.page(0x8000, _mapcount=int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"]), private=2)
    return m.write(tmp_path_factory.mktemp("good") / "vmcore")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_good_vmcore_surveys(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["survey", str(good)]) == 0
    out = capsys.readouterr().out
    assert "Free pages" in out and "reusable: 4 pages" in out


def test_plan_writes_sorted_hex_extents(good: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    ext = tmp_path / "extents"
    assert main(["plan", str(good), "--extents", str(ext)]) == 0
    assert ext.read_text() == "0x8000 0x8004\n"


def test_truncated(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "t"
    bad.write_bytes(good.read_bytes()[: 200 << 20])
    rc, err = _run(capsys, "survey", str(bad))
    assert rc == VmcoreError.exit_code
    assert "truncated" in _one_line(err)


def test_not_elf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "n"
    bad.write_bytes(b"hello world" * 100)
    rc, err = _run(capsys, "survey", str(bad))
    assert rc == VmcoreError.exit_code and "not an ELF" in _one_line(err)


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(capsys, "survey", str(tmp_path / "nope"))
    assert rc == VmcoreError.exit_code and "cannot open" in _one_line(err)


def test_no_vmcoreinfo(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(good.read_bytes())
    idx = data.find(b"VMCOREINFO")
    data[idx : idx + 10] = b"XMCOREINFO"
    bad = tmp_path / "v"
    bad.write_bytes(data)
    rc, err = _run(capsys, "survey", str(bad))
    assert rc == VmcoreError.exit_code and "no VMCOREINFO" in _one_line(err)


@pytest.mark.parametrize("key", ["OFFSET(page._mapcount)", "SYMBOL(init_top_pgt)",
                                 "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", "SIZE(page)",
                                 "SYMBOL(mem_section)", "NUMBER(phys_base)"])
def test_missing_key_is_named(tmp_path: Path, key: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    m = Machine(template("6.1"))
    bad = m.write(tmp_path / "k", drop_keys=(key,))
    rc, err = _run(capsys, "survey", str(bad))
    assert rc == LayoutError.exit_code
    assert key in _one_line(err)


def test_unsupported_arch(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(good.read_bytes())
    struct.pack_into("<H", data, 18, 183)  # EM_AARCH64
    bad = tmp_path / "a"
    bad.write_bytes(data)
    rc, err = _run(capsys, "survey", str(bad))
    assert rc == LayoutError.exit_code and "aarch64 is not supported" in _one_line(err)


def test_page_tables_that_do_not_resolve(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    m = Machine(template("6.1"))
    # Point init_top_pgt at an empty page: nothing resolves.
    m.init_top_pgt_va += 0x200000
    bad = m.write(tmp_path / "p")
    rc, err = _run(capsys, "survey", str(bad))
    assert rc == TranslationError.exit_code
    assert "not present" in _one_line(err)


def test_debug_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--debug adds the traceback and nothing else: the exit code is the class's, before or
    after the subcommand."""
    bad = tmp_path / "n"
    bad.write_bytes(b"\x7fELF" + b"\0" * 60)
    for argv in (["--debug", "survey", str(bad)], ["survey", str(bad), "--debug"]):
        assert main(argv) == VmcoreError.exit_code
        err = capsys.readouterr().err
        assert "Traceback" in err, err
        assert err.rstrip().endswith("unknown ELF class 0 (corrupt ELF header)"), err


def test_bad_dump_level(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["survey", str(good), "-d", "32"])
    assert exc.value.code != 0
    assert "outside 0..31" in capsys.readouterr().err


# --- fuzzing: corrupt headers, notes and VMCOREINFO never crash and never plan wrongly ---

FUZZ_EXAMPLES = int(os.environ.get("KDUMPD_FUZZ_EXAMPLES", "150"))
HEAD = 0x2000  # ELF header, program headers and notes (VMCOREINFO) of the synthetic core


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    m = Machine(template("6.12"), ram=128 << 20)
    m.page(0x4000, _mapcount=int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"]), private=2)
    return m.write(tmp_path_factory.mktemp("small") / "vmcore")


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_headers_only_raise_kdumpd_errors(small: Path, data: st.DataObject) -> None:
    """Byte mutations of the ELF header, program headers, notes and VMCOREINFO text: the
    reader either plans (from a still-valid core) or raises a KdumpdError, never anything else.
    KDUMPD_FUZZ_EXAMPLES raises the count for a long run."""
    with open(small, "r+b") as fh:
        pristine = fh.read(HEAD)
        raw = bytearray(pristine)
        for _ in range(data.draw(st.integers(1, 16))):
            where = data.draw(st.integers(0, len(raw) - 1))
            raw[where] = data.draw(st.integers(0, 255))
        fh.seek(0)
        fh.write(raw)
    try:
        with open_vmcore(small) as vm:
            make_plan(vm, 31)
    except KdumpdError:
        pass
    finally:
        with open(small, "r+b") as fh:
            fh.write(pristine)


def test_kernel_text_load_starting_with_its_ram_range(tmp_path: Path) -> None:
    """Seen on a real KASLR guest: the kernel-text PT_LOAD starts exactly where the RAM
    PT_LOAD holding it starts. It is a duplicate, not an overlap."""
    from kdumpd.vmcore.elf import CoreHeader, LoadSegment

    text = LoadSegment(0x1000, 0xFFFFFFFF81000000, 0x39000000, 0x3435000, 0x3435000)
    ram = LoadSegment(0x5000000, 0xFFFF888039000000, 0x39000000, 0x6FD6000, 0x6FD6000)
    header = CoreHeader("x86_64", (text, ram), (), 1 << 30)
    ranges = header.phys_ranges()
    assert [(r.start_paddr, r.end_paddr, r.offset) for r in ranges] == [
        (0x39000000, 0x3FFD6000, 0x5000000)]
    clash = LoadSegment(0x1000, 0, 0x3A000000, 0x8000000, 0x8000000)
    with pytest.raises(VmcoreError, match="overlap"):
        CoreHeader("x86_64", (ram, clash), (), 1 << 30).phys_ranges()
