"""The gate end to end on synthetic vmcores: what it cuts out of a plan, through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.synth.builder import Machine, template

from kdumpd.cli import main
from kdumpd.errors import RefusedError
from kdumpd.extentsfile import read_extents_file


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    m = Machine(template("6.1"))
    buddy = int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"])
    for head in range(0x8000, 0x10000, 0x400):
        m.page(head, _mapcount=buddy, private=10)  # 128 MiB of free 4 MiB blocks
    return m.write(tmp_path_factory.mktemp("g") / "vmcore")


def _plan(core: Path, tmp_path: Path, *extra: str) -> tuple[int, list[tuple[int, int]]]:
    out = tmp_path / "extents"
    rc = main(["plan", str(core), "--extents", str(out), *extra])
    if rc:
        return rc, []
    return rc, [(e.start_pfn, e.end_pfn) for e in read_extents_file(str(out))]


def test_capture_kernel_ram_and_elfcorehdr_are_never_planned(core: Path, tmp_path: Path) -> None:
    rc, full = _plan(core, tmp_path)
    assert rc == 0 and full == [(0x8000, 0x10000)]
    iomem = tmp_path / "iomem"
    # A "malformed header" case: the PT_LOADs claim this RAM, the capture kernel owns it.
    iomem.write_text("09000000-09ffffff : System RAM\n0c000000-0c3fffff : Persistent Memory\n")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("elfcorehdr=0xe000000 console=ttyS0\n")
    rc, cut = _plan(core, tmp_path, "--host-iomem", str(iomem), "--host-cmdline", str(cmdline))
    assert rc == 0
    assert cut == [(0x8000, 0x9000), (0xA000, 0xC000), (0xC400, 0xE000), (0xE100, 0x10000)]


def test_refusals_exit_non_zero_and_write_nothing(core: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for collector in ("cp /proc/vmcore /tmp/x", "makedumpfile -d 1", "weird-tool"):
        out = tmp_path / "never"
        rc = main(["plan", str(core), "--extents", str(out), "--collector", collector])
        assert rc == RefusedError.exit_code
        assert not out.exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "rule 6" in err[0]


def test_survey_reports_a_refusal_without_failing(core: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["survey", str(core), "--collector", "cp"]) == 0
    out = capsys.readouterr().out
    assert "reusable: none: refused by rule 6" in out
    assert "Free pages" in out


@pytest.mark.parametrize("legacy", [False, True])
def test_hardware_error_in_the_log_refuses(tmp_path: Path, legacy: bool,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Rule 1 from both printk formats (lockless 5.10+, and the older record buffer)."""
    m = Machine(template("6.1"))
    m.page(0x8000, _mapcount=int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"]), private=10)
    m.set_log(["Linux version 6.1.0", "mce: [Hardware Error]: CPU 1: Machine Check Exception",
               "mce: [Hardware Error]: TSC 0 ADDR 8000123 MISC 0",
               "Kernel panic - not syncing: Fatal machine check"], legacy=legacy)
    core = m.write(tmp_path / "mce")
    assert main(["dmesg", str(core)]) == 0
    assert "Fatal machine check" in capsys.readouterr().out
    rc, _ = _plan(core, tmp_path)
    assert rc == RefusedError.exit_code
    assert "rule 1" in capsys.readouterr().err
    rc, ranged = _plan(core, tmp_path, "--mce-policy", "exclude-range")
    assert rc == 0 and ranged == [(0x8200, 0x8400)]  # the 2 MiB around 0x8000123 is cut


def test_every_rule_that_withholds_says_how_much(core: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15, item 7: rule 8 cut the plan by two thirds without a word. Each rule that
    takes pages away is named with its count, in the text output, in plan's stderr and in
    JSON ``withheld``."""
    import json

    iomem = tmp_path / "iomem"
    iomem.write_text("09000000-09ffffff : System RAM\n0c000000-0c3fffff : Persistent Memory\n")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("elfcorehdr=0xe000000 console=ttyS0\n")
    host = ["--host-iomem", str(iomem), "--host-cmdline", str(cmdline)]
    assert main(["survey", str(core), *host, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["reusable_pages"] == 0x8000 - 0x1000 - 0x400 - 0x100
    assert doc["withheld"] == {
        "rule 8: the capture kernel's own RAM": {
            "reason": "the capture kernel's own RAM", "pages": 0x1000},
        "rule 4: persistent memory (Persistent Memory)": {
            "reason": "persistent memory (Persistent Memory)", "pages": 0x400},
        "rule 8: elfcorehdr": {"reason": "elfcorehdr", "pages": 0x100},
    }
    assert main(["survey", str(core), *host]) == 0
    out = capsys.readouterr().out
    assert "withheld by rule 8: 4096 pages (16.0 MiB): the capture kernel's own RAM" in out
    assert "withheld by rule 4: 1024 pages (4.0 MiB): persistent memory" in out
    assert main(["plan", str(core), "--extents", str(tmp_path / "x"), *host]) == 0
    assert "withheld by rule 8: 4096 pages" in capsys.readouterr().err
    # ELF output (rule 6) drops runs under 256 pages: the 128 left after this elfcorehdr
    cmdline.write_text("elfcorehdr=0xfe80000\n")
    assert main(["survey", str(core), "--collector", "makedumpfile -E -d 31", *host]) == 0
    assert ("withheld by rule 6: 128 pages (512.0 KiB): excluded runs shorter than 256 pages "
            "(ELF output)") in capsys.readouterr().out


def test_collector_version_comes_from_the_binary_the_line_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15, item 17: ``--collector "/usr/local/sbin/makedumpfile -l -d 31"`` (a newer
    makedumpfile by its path) was reported as the 1.7.2 first on PATH. The same for a
    core_collector with a path in kdump.conf."""
    import json

    m = Machine(template("6.12"))
    m.page(0x8000, _mapcount=int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"]), private=10)
    core = m.write(tmp_path / "vmcore")
    newer = tmp_path / "sbin" / "makedumpfile"
    newer.parent.mkdir()
    newer.write_text("#!/bin/sh\necho 'makedumpfile: version 1.7.7 (released on 1 Jan 2025)'\n")
    newer.chmod(0o755)
    assert main(["survey", str(core), "--json", "--collector", f"{newer} -l -d 31"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["features"]["collector_version"] == "1.7.7"
    assert doc["withheld"] == {}, "1.7.7 reads 6.12 folios: nothing is withheld"
    conf = tmp_path / "root" / "etc" / "kdump.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"core_collector {newer} -l --message-level 7 -d 31\n")
    from kdumpd.plan.gated import gated_plan
    from kdumpd.vmcore.core import open_vmcore

    with open_vmcore(core) as vm:
        plan = gated_plan(vm, config_root=str(tmp_path / "root")).plan
    assert plan.features["collector_version"] == "1.7.7"
    missing = tmp_path / "nowhere" / "makedumpfile"
    assert main(["survey", str(core), "--json", "--collector", f"{missing} -d 31"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["features"]["collector_version"] is None
    assert "user_anon" in doc["withheld"], "a collector of unknown version is trusted less"


def test_survey_lists_only_what_the_level_excludes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15, item 4: ``survey -d 17`` listed cache and user pages as excluded; makedumpfile
    -d 17 shows 0x0 for them and counts them as remaining."""
    m = Machine(template("6.1"))
    m.page(0x8000, _mapcount=int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"]), private=4)
    for pfn in range(0x9000, 0x9020):
        m.page(pfn, flags=m.flag("PG_lru"))  # page cache
    for pfn in range(0x9100, 0x9108):
        m.page(pfn, flags=m.flag("PG_lru"), mapping=0xFFFF888000ABC001)  # anonymous
    core = m.write(tmp_path / "vmcore")

    def shown(*argv: str) -> dict[str, int]:
        assert main(["survey", str(core), *argv]) == 0
        out: dict[str, int] = {}
        for line in capsys.readouterr().out.splitlines():
            label, _, value = line.partition(":")
            if value.strip().startswith("0x"):
                out[label.strip()] = int(value.split()[0], 16)
        return out

    full, d17 = shown("-d", "31"), shown("-d", "17")
    assert full["Non-private cache pages"] == 0x20 and full["User process data pages"] == 8
    assert d17["Free pages"] == full["Free pages"] == 16
    assert d17["Non-private cache pages"] == d17["User process data pages"] == 0
    assert d17["Private cache pages"] == 0
    assert d17["Remaining pages"] == full["Remaining pages"] + 0x20 + 8
    assert d17["Total pages"] == full["Total pages"]
    # makedumpfile's accounting: the kernel-text PT_LOAD (2048 pages here) is counted twice
    assert full["Original pages"] == 0x10000 + 2048
    assert d17["Excluded pages"] == 16 and full["Excluded pages"] == 16 + 0x20 + 8
    assert full["Remaining pages"] == full["Original pages"] - full["Excluded pages"]


def _nfit_without_ranges() -> bytes:
    return b"NFIT" + (40).to_bytes(4, "little") + bytes(32)


def test_offline_plan_withholds_hot_added_sections_unless_the_nfit_is_given(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15, item 16: offline, the capture kernel's NFIT is unknown, so persistent memory
    onlined as kmem (a section added after boot, SECTION_IS_EARLY clear) must be withheld
    and the rules that could not be checked are named; --host-nfit supplies the table."""
    import json

    m = Machine(template("6.1"), ram=512 << 20)
    buddy = int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"])
    for head in (0x8000, 0x10000):  # sections 1 (boot memory) and 2 (hot-added)
        m.page(head, _mapcount=buddy, private=10)
    m.set_section(2, 0x7)  # present | mem_map | online, not early
    core = m.write(tmp_path / "vmcore")
    assert main(["survey", str(core), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["reusable_pages"] == 1024
    (key,) = (k for k in doc["withheld"] if k.startswith("rule 4"))
    assert doc["withheld"][key]["pages"] == 1024 and "hot-added" in key
    assert main(["survey", str(core)]) == 0
    out = capsys.readouterr().out
    assert "rule 4 not checked offline" in out and "rule 8 not checked offline" in out
    nfit = tmp_path / "NFIT"
    nfit.write_bytes(_nfit_without_ranges())
    assert main(["survey", str(core), "--host-nfit", str(nfit)]) == 0
    out = capsys.readouterr().out
    assert "reusable: 2048 pages" in out
    assert "rule 4 not checked" not in out and "rule 8 not checked offline" in out
    nfit.write_bytes(b"NFIT garbage")
    assert main(["survey", str(core), "--host-nfit", str(nfit)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--host-nfit" in err[0]
    assert main(["survey", str(core), "--host-nfit", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err
