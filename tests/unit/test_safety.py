"""The safety gate's pure parts: collector parsing, kdump configuration, host facts, crash
facts and the decision, each rule forced on its own."""

from __future__ import annotations

import pytest
from tests.synth.builder import DATA, layout_variant

from kdumpd.crash.dmesg import LogRecord
from kdumpd.crash.facts import CrashFacts, crash_facts
from kdumpd.errors import ConfigError
from kdumpd.mm.classify import PageClass
from kdumpd.mm.pagelayout import PageLayout
from kdumpd.safety.collector import FOLIO_TAILS, parse_collector, withheld_classes
from kdumpd.safety.gate import decide
from kdumpd.safety.hostfacts import parse_host_facts
from kdumpd.safety.kdumpconf import discover, from_fedora_conf, from_kdump_tools
from kdumpd.vmcore.elf import Note
from kdumpd.vmcore.vmcoreinfo import parse_vmcoreinfo


def _layout(kernel: str) -> PageLayout:
    if kernel not in ("6.1", "6.12"):
        info = layout_variant("6.1", kernel)
        text = "".join(f"{k}={v}\n" for k, v in info.items())
        return PageLayout.from_vmcoreinfo(parse_vmcoreinfo(text.encode()))
    return PageLayout.from_vmcoreinfo(
        parse_vmcoreinfo((DATA / f"vmcoreinfo-{kernel}.txt").read_bytes()))


@pytest.mark.parametrize(("cmd", "kind", "level", "elf"), [
    ("makedumpfile -l --message-level 7 -d 31", "makedumpfile", 31, False),
    ("/usr/sbin/makedumpfile -c -d 17 -F", "makedumpfile", 17, False),
    ("makedumpfile -d31", "makedumpfile", 31, False),
    ("makedumpfile --dump-level=8 -E", "makedumpfile", 8, True),
    ("makedumpfile -cE -d 1", "makedumpfile", 1, True),
    ("makedumpfile -l", "makedumpfile", 0, False),
    ("cp --sparse=always", "cp", None, False),
    ("dd bs=1M", "dd", None, False),
    ("my-collector -x", "unknown", None, False),
])
def test_parse_collector(cmd: str, kind: str, level: int | None, elf: bool) -> None:
    c = parse_collector(cmd)
    assert (c.kind, c.dump_level, c.elf_output) == (kind, level, elf)


@pytest.mark.parametrize("bad", ["", "makedumpfile -d", "makedumpfile -d 40",
                                 "makedumpfile -d x", "makedumpfile 'unclosed"])
def test_bad_collector_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_collector(bad)


def test_kdump_configs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fed = from_fedora_conf("# comment\npath /var/crash\ncore_collector makedumpfile -l -d 17 "
                           "# trailing\n", "kdump.conf")
    assert fed.cmdline == "makedumpfile -l -d 17"
    assert "default" in from_fedora_conf("path /var/crash\n", "k").source
    deb = from_kdump_tools('USE_KDUMP=1\nMAKEDUMP_ARGS="-c -d 15"\n', "kdump-tools")
    assert deb.cmdline == "makedumpfile -c -d 15"
    assert from_kdump_tools("USE_KDUMP=1\n", "x").cmdline == "makedumpfile -c -d 31"
    assert discover(str(tmp_path)) is None
    (tmp_path / "etc" / "default").mkdir(parents=True)
    (tmp_path / "etc/default/kdump-tools").write_text('MAKEDUMP_ARGS="-d 1"\n')
    assert discover(str(tmp_path)).cmdline == "makedumpfile -d 1"  # type: ignore[union-attr]


def test_collector_capabilities_by_layout() -> None:
    assert withheld_classes("1.7.2", _layout("6.1")) == {}
    w = withheld_classes("1.7.2", _layout("6.12"))
    # verified here page by page on 6.12: folio tails and non-anonymous hugetlb heads only
    assert set(w) == {*FOLIO_TAILS, PageClass.USER_HUGETLB}
    assert PageClass.USER_ANON not in w and PageClass.CACHE not in w
    assert set(withheld_classes("1.7.3", _layout("pg_hugetlb-6.6"))) == set(w)
    assert withheld_classes("1.7.4", _layout("pg_hugetlb-6.6")) == {}
    assert set(withheld_classes("1.7.6", _layout("6.12"))) >= {PageClass.FREE}
    assert withheld_classes("1.7.9", _layout("6.12")) == {}
    unknown = withheld_classes(None, _layout("6.12"))
    assert {PageClass.FREE, PageClass.USER_ANON, *FOLIO_TAILS} <= set(unknown)


IOMEM_KDUMP = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000a0000-000bffff : PCI Bus 0000:00
2e000000-3dffffff : System RAM
  2f000000-2fa01d31 : Kernel code
3ffd7000-3fffffff : Reserved
100000000-13fffffff : Persistent Memory
  100000000-13fffffff : namespace0.0
fec00000-fec003ff : IOAPIC 0
"""


def test_host_facts_forbid_own_ram_pmem_and_elfcorehdr() -> None:
    facts = parse_host_facts(IOMEM_KDUMP, "elfcorehdr=0x2e000000 console=ttyS0 reset_devices")
    spans = {(r.start_paddr, r.end_paddr): r.reason for r in facts.forbidden}
    assert spans[(0x1000, 0x9FC00)] == "the capture kernel's own RAM"
    assert spans[(0x2E000000, 0x3E000000)] == "the capture kernel's own RAM"
    assert "persistent memory" in spans[(0x100000000, 0x140000000)]
    assert spans[(0x2E000000, 0x2E100000)] == "elfcorehdr"
    assert not any("Kernel code" in r for r in spans.values())
    assert parse_host_facts(IOMEM_KDUMP, "elfcorehdr=4096K@0x2e000000").forbidden


MCE_LOG = [
    "mce: [Hardware Error]: CPU 0: Machine Check Exception: 5 Bank 1: bd00000000000000",
    "mce: [Hardware Error]: RIP !INEXACT! 10:<ffffffff8106cd43>",
    "mce: [Hardware Error]: TSC 2f7ce7b6ff ADDR 3a4b5000 MISC 0",
    "mce: [Hardware Error]: Machine check: Processor context corrupt",
    "Kernel panic - not syncing: Fatal machine check",
]


def test_crash_facts_find_machine_checks() -> None:
    records = [LogRecord(i, i, t) for i, t in enumerate(MCE_LOG)]
    facts = crash_facts(records, [])
    assert facts.hardware_error and "Hardware Error" in facts.evidence
    assert facts.error_paddrs == (0x3A4B5000,)
    assert facts.panic_line == "Kernel panic - not syncing: Fatal machine check"
    calm = crash_facts([LogRecord(0, 0, "Kernel panic - not syncing: sysrq triggered crash"),
                        LogRecord(1, 1, "Memory failure: 0x1234: recovery action: Recovered")],
                       [])
    assert not calm.hardware_error
    assert crash_facts([], [Note("NOCOREDUMP", 0, b"")]).nocoredump_note == "NOCOREDUMP"


def _decide(**kw):  # type: ignore[no-untyped-def]
    args = dict(collector=parse_collector("makedumpfile -d 31"), collector_source="t",
                collector_version="1.7.2", layout=_layout("6.1"), crash=CrashFacts(),
                host=None)
    args.update(kw)
    return decide(**args)


def test_decide_each_rule() -> None:
    ok = _decide()
    assert ok.refusal is None and ok.dump_level == 31 and ok.min_run_pages == 1
    assert "collector is 'cp'" in _decide(collector=parse_collector("cp")).refusal
    assert "excludes no page class" in _decide(collector=parse_collector("makedumpfile -d 1")
                                               ).refusal
    mce = CrashFacts(hardware_error=True, evidence="Kernel panic - not syncing: Fatal machine "
                     "check", error_paddrs=(0x3A4B5000,))
    assert _decide(crash=mce).refusal.startswith("rule 1")
    ranged = _decide(crash=mce, mce_policy="exclude-range")
    assert ranged.refusal is None
    assert [(r.start_paddr, r.end_paddr) for r in ranged.forbidden] == [(0x3A400000, 0x3A600000)]
    no_addr = CrashFacts(hardware_error=True, evidence="mce: [Hardware Error]: x")
    assert _decide(crash=no_addr, mce_policy="exclude-range").refusal.startswith("rule 1")
    assert _decide(crash=CrashFacts(nocoredump_note="NOCOREDUMP")).refusal.startswith("rule 1")
    assert _decide(collector=parse_collector("makedumpfile -E -d 31")).min_run_pages == 256
    assert set(_decide(layout=_layout("6.12")).withheld) == {*FOLIO_TAILS,
                                                             PageClass.USER_HUGETLB}
    with pytest.raises(ConfigError):
        _decide(mce_policy="ignore")


def _nfit(*spas: tuple[bytes, int, int]) -> bytes:
    import struct

    body = b""
    for guid, base, length in spas:
        body += struct.pack("<HHHHII16sQQQ", 0, 56, 1, 0, 0, 0, guid, base, length, 0)
    body += struct.pack("<HH", 4, 8) + b"\0" * 4  # another structure type, skipped
    total = 40 + len(body)
    return b"NFIT" + struct.pack("<I", total) + b"\0" * 32 + body


def test_nfit_spa_ranges_are_forbidden() -> None:
    from kdumpd.safety.hostfacts import PMEM_GUID, parse_nfit

    table = _nfit((PMEM_GUID, 0x100000000, 0x20000000), (b"\x11" * 16, 0x200000000, 0x1000))
    ranges = parse_nfit(table)
    assert [(r.start_paddr, r.end_paddr) for r in ranges] == [
        (0x100000000, 0x120000000), (0x200000000, 0x200001000)]
    assert ranges[0].reason == "persistent memory (ACPI NFIT)"
    facts = parse_host_facts("", "", nfit_tables=[table])
    assert len(facts.forbidden) == 2
    for bad in (b"XXXX" + table[4:], table[:50], table[:8] + b"\0" * 32 + b"\0\0\x02\0"):
        with pytest.raises(ValueError):
            parse_nfit(bad)
