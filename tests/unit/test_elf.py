"""kdumpd's own ELF64 reader: what it reads from a core, and one clear line, naming the file,
for every way the headers can be wrong. The synthetic cores here are built with ``struct``
from the System V ABI layout; pyelftools, where installed, checks the reader independently."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from tests.conftest import require

from kdumpd.cli import main
from kdumpd.errors import LayoutError, VmcoreError
from kdumpd.vmcore.elf import MAX_PHNUM, read_core_header

NOTE_OFF = 0x1000
DATA_OFF = 0x2000


def _note(name: bytes, n_type: int, desc: bytes) -> bytes:
    name_z = name + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name_z), len(desc), n_type) + pad(name_z) + pad(desc)


def _phdr(p_type: int, offset: int, vaddr: int, paddr: int, filesz: int, memsz: int) -> bytes:
    return struct.pack("<IIQQQQQQ", p_type, 7, offset, vaddr, paddr, filesz, memsz, 4096)


def core(*, ident: bytes = b"\x7fELF\x02\x01\x01", e_type: int = 4, machine: int = 62,
         phentsize: int = 56, phnum: int | None = None, shoff: int = 0, shnum: int = 0,
         phdrs: list[bytes] | None = None, notes: bytes | None = None,
         size: int = DATA_OFF + 0x3000) -> bytes:
    """A little ELF64 core: PT_NOTE at NOTE_OFF, two RAM PT_LOADs from DATA_OFF."""
    if notes is None:
        notes = _note(b"CORE", 1, b"\0" * 16) + _note(b"VMCOREINFO", 0, b"PAGESIZE=4096\n")
    if phdrs is None:
        phdrs = [_phdr(4, NOTE_OFF, 0, 0, len(notes), len(notes)),
                 _phdr(1, DATA_OFF, 0xFFFF888000100000, 0x100000, 0x1000, 0x1000),
                 _phdr(1, DATA_OFF + 0x1000, 0xFFFF888000200000, 0x200000, 0x2000, 0x3000)]
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident.ljust(16, b"\0"), e_type, machine, 1, 0, 64,
                       shoff, 0, 64, phentsize, len(phdrs) if phnum is None else phnum, 64,
                       shnum, 0)
    out = bytearray(size)
    table = ehdr + b"".join(phdrs)
    out[: len(table)] = table
    out[NOTE_OFF : NOTE_OFF + len(notes)] = notes
    return bytes(out)


def parse(tmp_path: Path, data: bytes, name: str = "vmcore") -> object:
    path = tmp_path / name
    path.write_bytes(data)
    with open(path, "rb") as fh:
        return read_core_header(fh)


def test_reads_loads_and_notes(tmp_path: Path) -> None:
    h = parse(tmp_path, core())
    assert h.arch == "x86_64" and h.file_size == DATA_OFF + 0x3000
    assert [(s.p_offset, s.p_paddr, s.p_filesz, s.p_memsz) for s in h.loads] == [
        (DATA_OFF, 0x100000, 0x1000, 0x1000), (DATA_OFF + 0x1000, 0x200000, 0x2000, 0x3000)]
    assert [(n.n_name, n.n_type) for n in h.notes] == [("CORE", 1), ("VMCOREINFO", 0)]
    assert h.find_note("VMCOREINFO").n_desc == b"PAGESIZE=4096\n"


def test_pn_xnum_takes_the_count_from_section_header_0(tmp_path: Path) -> None:
    data = bytearray(core(phnum=0xFFFF, shoff=0x800, shnum=1))
    struct.pack_into("<I", data, 0x800 + 44, 3)  # sh_info of section 0: three program headers
    h = parse(tmp_path, bytes(data))
    assert len(h.loads) == 2 and len(h.notes) == 2


def _error(tmp_path: Path, data: bytes, cls: type[Exception] = VmcoreError) -> str:
    path = tmp_path / "bad-core"
    path.write_bytes(data)
    with open(path, "rb") as fh, pytest.raises(cls) as exc:
        read_core_header(fh)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg


@pytest.mark.parametrize(("data", "cls", "says"), [
    (b"", VmcoreError, "empty (0 bytes): not a vmcore"),
    (b"hello world" * 10, VmcoreError, "not an ELF file"),
    (b"\x7fEL", VmcoreError, "not an ELF file"),
    (b"\x7fELF\x02\x01\x01" + b"\0" * 20, VmcoreError, "ELF header is truncated (27 of 64"),
    (core(ident=b"\x7fELF\x01\x01\x01"), LayoutError, "32-bit ELF cores are not supported"),
    (core(ident=b"\x7fELF\x05\x01\x01"), VmcoreError, "unknown ELF class 5"),
    (core(ident=b"\x7fELF\x02\x02\x01"), LayoutError, "big-endian ELF cores are not supported"),
    (core(ident=b"\x7fELF\x02\x00\x01"), VmcoreError, "unknown ELF data encoding 0"),
    (core(e_type=2), VmcoreError, "ELF type is ET_EXEC, not ET_CORE"),
    (core(e_type=0x1234), VmcoreError, "ELF type is 4660, not ET_CORE"),
    (core(phentsize=32), VmcoreError, "e_phentsize is 32, not 56"),
    (core(phnum=0xFFFF), VmcoreError, "PN_XNUM but section header 0 is missing"),
    (core(phnum=1000), VmcoreError, "program headers lie outside the file"),
    (core(phdrs=[]), VmcoreError, "no PT_LOAD segments"),
    (core(phdrs=[_phdr(1, DATA_OFF, 0, 0x1000, 0x2000, 0x1000)]), VmcoreError,
     "has p_filesz > p_memsz"),
    (core(phdrs=[_phdr(1, DATA_OFF, 0, (1 << 64) - 0x1000, 0x2000, 0x2000)]), VmcoreError,
     "wraps past the end of the address space"),
    (core(phdrs=[_phdr(1, DATA_OFF, 0, 0x1000, 0x10000, 0x10000)]), VmcoreError,
     "past the end of the file (0x5000): truncated vmcore"),
    (core(phdrs=[_phdr(4, NOTE_OFF, 0, 0, 65 << 20, 0)]), VmcoreError,
     "is implausibly large"),
    (core(phdrs=[_phdr(4, DATA_OFF + 0x2800, 0, 0, 0x1000, 0)]), VmcoreError,
     "PT_NOTE lies beyond the end of the file"),
    (core(notes=struct.pack("<III", 4, 0x10000, 0) + b"CORE"), VmcoreError,
     "ELF note at byte 0 overruns its PT_NOTE segment"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_headers_are_one_line_naming_the_file(tmp_path: Path, data: bytes,
                                                  cls: type[Exception], says: str) -> None:
    assert says in _error(tmp_path, data, cls)


def test_pn_xnum_count_is_capped(tmp_path: Path) -> None:
    data = bytearray(core(phnum=0xFFFF, shoff=0x800, shnum=1, size=1 << 24))
    struct.pack_into("<I", data, 0x800 + 44, MAX_PHNUM + 1)
    assert f"claims {MAX_PHNUM + 1} program headers" in _error(tmp_path, bytes(data))


def test_unreadable_stream_is_one_line(tmp_path: Path) -> None:
    with open(tmp_path / "x", "wb+") as fh:
        fh.write(core())
        fh.flush()
        with pytest.raises(VmcoreError, match=r"^some-core: cannot read the ELF headers: "
                                              r"Input/output error$"):
            read_core_header(_Failing(fh), None, "some-core")  # type: ignore[arg-type]


class _Failing:
    """A stream whose reads fail the way a bad /proc/vmcore read does (EIO)."""

    def __init__(self, fh: object) -> None:
        self._fh = fh

    def fileno(self) -> int:
        return self._fh.fileno()  # type: ignore[attr-defined, no-any-return]

    def seek(self, pos: int) -> int:
        return 0

    def read(self, n: int) -> bytes:
        raise OSError(5, "Input/output error")


def test_cli_says_the_file_is_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty-core"
    empty.write_bytes(b"")
    assert main(["survey", str(empty)]) == VmcoreError.exit_code
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"kdumpd: VmcoreError: {empty}: the file is empty (0 bytes): not a vmcore"]


def test_cli_names_the_file_that_is_not_elf(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "text-file"
    bad.write_bytes(b"hello world" * 100)
    assert main(["survey", str(bad)]) == VmcoreError.exit_code
    err = capsys.readouterr().err
    assert f"{bad}: not an ELF file" in err and len(err.strip().splitlines()) == 1


def test_agrees_with_pyelftools_on_a_synthetic_core(tmp_path: Path) -> None:
    """An independent check where pyelftools is installed (tests only; kdumpd does not use
    it): same PT_LOADs, same notes."""
    try:
        from elftools.elf.elffile import ELFFile
    except ImportError:
        ELFFile = None  # noqa: N806
    require(ELFFile is not None, "pyelftools (python3-pyelftools) not installed")
    from tests.synth.builder import Machine, template

    path = Machine(template("6.1"), ram=64 << 20).write(tmp_path / "vmcore")
    with open(path, "rb") as fh:
        ours = read_core_header(fh)
        fh.seek(0)
        elf = ELFFile(fh)
        theirs = [(s["p_offset"], s["p_vaddr"], s["p_paddr"], s["p_filesz"], s["p_memsz"])
                  for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        notes = [(n["n_name"], n["n_desc"] if isinstance(n["n_desc"], bytes) else None)
                 for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"
                 for n in s.iter_notes()]
    assert [(s.p_offset, s.p_vaddr, s.p_paddr, s.p_filesz, s.p_memsz) for s in ours.loads] == \
        theirs
    assert [n.n_name for n in ours.notes] == [name for name, _ in notes]
    vmcoreinfo = ours.find_note("VMCOREINFO")
    assert vmcoreinfo is not None and b"OSRELEASE=" in vmcoreinfo.n_desc
