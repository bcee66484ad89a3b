"""Safety scenarios for tests/vm/mkvmcore.py: vmcores in which a hazard really happened.

kdumpd must refuse to reuse memory that is broken, gone or not ordinary RAM.  Each scenario
here makes one such hazard happen for real inside the QEMU guest before (or as) it crashes,
and records machine-readable ground truth about it:

    mce-6.1        the crash is a fatal machine check injected by QEMU (HMP ``mce``)
    hwpoison-6.1   frames with PG_hwpoison: anon, THP, free (inside free buddy blocks), page cache
    balloon-6.1    a virtio balloon inflated before the crash: PageOffline frames
    hotplug-6.1    memory hot-removed / offlined after ``kexec -p``: a stale elfcorehdr
    pmem-kmem-6.1  an NVDIMM given to the kmem driver as System RAM before ``kexec -p``

A scenario is: extra QEMU arguments, guest hooks (``common.sh`` plus ``<name>.sh`` here,
sourced by the guest's /init; see its hooks scenario_setup/loaded/prepare/crash/kdump),
QEMU monitor commands the guest asks for with ``hmp`` (run by mkvmcore.py on the host,
logged in hmp.log and info.json), and ``check``: after the capture it copies the
scenario's files out of the guest's metadata, derives ground truth, and raises
MkVmcoreError with a one-line reason when the hazard did not happen, so that a test built
on the vmcore cannot pass vacuously.  What it returns becomes ``info.json["hazard"]``.

Ground truth beyond the standard files (see README.md for the formats):
    mce.txt                 the injected machine check (also in info.json)
    hwpoison-targets.txt    "pfn method kind detail": every frame the guest poisoned
    hwpoison-pfns.txt       "pfn kind": every KPF_HWPOISON frame in kpageflags at the crash
    balloon.txt, offline-pfns.txt ("first_pfn count" runs of KPF_OFFLINE frames)
    hotplug.txt, iomem.hotplugged
    pmem.txt, ndctl.json, daxctl.json
    nfit.old.bin, nfit.kdump.bin   raw ACPI NFIT bytes from /sys/firmware/acpi/tables of
                            the first and the capture kernel (NFIT, or NFIT1, NFIT2, ...
                            concatenated; each table carries its own length)
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HAZARD_SRC = HERE / "hazard.c"
PAGE_SIZE = 4096
MIB = 1 << 20

# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF_BUDDY = 10
KPF_HWPOISON = 19
KPF_NOPAGE = 20
KPF_OFFLINE = 23


class HazardMissing(Exception):
    """The hazard did not (provably) happen; mkvmcore.py reports it in one line."""


def _error(message: str) -> HazardMissing:
    return HazardMissing(message)


@dataclass
class Capture:
    """What check() gets: the output directory and the guests' metadata files."""

    out: Path
    first: dict[str, bytes]
    kdump: dict[str, bytes]
    info: dict[str, Any]
    hmp: list[dict[str, Any]]

    def copy(self, *names: str) -> None:
        for name in names:
            if name not in self.first:
                raise _error(f"guest did not record {name}")
            (self.out / name).write_bytes(self.first[name])

    def text(self, name: str) -> str:
        return self.first[name].decode(errors="replace")

    def console(self) -> str:
        return (self.out / "console.log").read_bytes().decode(errors="replace")

    def kpageflags(self) -> array:
        flags = array("Q")
        flags.frombytes((self.out / "kpageflags").read_bytes())
        return flags

    def dmesg(self) -> str | None:
        """The crashed kernel's log from the vmcore (dmesg.old), if makedumpfile can read it."""
        path = self.out / "dmesg.old"
        return path.read_bytes().decode(errors="replace") if path.exists() else None

    def pt_loads(self) -> list[tuple[int, int]]:
        """(start, end) physical ranges of the vmcore's PT_LOAD segments."""
        return pt_loads(self.out / "vmcore")


@dataclass(frozen=True)
class Scenario:
    """One safety scenario; mkvmcore.py reads these attributes."""

    name: str
    summary: str
    hooks: str
    check_fn: Callable[[Capture], dict[str, Any]]
    kernel: str = "6.1"
    machine_opts: str = ""
    memory_opts: str = ""
    devices: tuple[str, ...] = ()
    first_args: tuple[str, ...] = ()
    kdump_args: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    optional_modules: tuple[str, ...] = ()
    binaries: tuple[str, ...] = ()
    helper: Path | None = HAZARD_SRC
    extra_mib: int = 0
    outputs: tuple[str, ...] = ()
    conf: tuple[tuple[str, str], ...] = field(default=())

    def output_files(self) -> tuple[str, ...]:
        """Files check() may write to the output directory."""
        return (*self.outputs, "dmesg.old")

    def script(self) -> str:
        """The guest's /etc/scenario.sh."""
        return (HERE / "common.sh").read_text() + "\n" + (HERE / self.hooks).read_text()

    def qemu_args(self, workdir: Path) -> list[str]:
        return [arg.format(workdir=workdir) for arg in self.devices]

    def guest_conf(self, cfg: Any) -> dict[str, str]:
        return dict(self.conf)

    def check(
        self,
        cfg: Any,
        first: dict[str, bytes],
        kdump: dict[str, bytes],
        info: dict[str, Any],
        hmp: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """Copies the scenario's files to cfg.out; returns info.json's "hazard".

        Raises HazardMissing when the hazard did not happen.
        """
        capture = Capture(cfg.out, first, kdump, info, hmp)
        dump_dmesg(cfg.out / "vmcore", cfg.out / "dmesg.old")
        failed = [c for c in hmp if "error" in c or _hmp_refused(c.get("reply", ""))]
        if failed:
            c = failed[0]
            raise _error(f"monitor command {c['command']!r} failed: {c.get('error') or c['reply']}")
        hazard = {"kind": self.name.rsplit("-", 1)[0], "summary": self.summary}
        hazard.update(self.check_fn(capture))
        return hazard


# --------------------------------------------------------------------------
# host-side parsing helpers


def dump_dmesg(vmcore: Path, dest: Path) -> bool:
    """The crashed kernel's printk log, as makedumpfile --dump-dmesg prints it."""
    dest.unlink(missing_ok=True)
    if shutil.which("makedumpfile") is None:
        return False
    result = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(vmcore), str(dest)], capture_output=True
    )
    if result.returncode != 0:
        dest.unlink(missing_ok=True)
        return False
    return True


def pt_loads(vmcore: Path) -> list[tuple[int, int]]:
    """(start, end) physical ranges of the PT_LOAD segments."""
    return [(paddr, paddr + memsz) for paddr, memsz, _, _ in _segments(vmcore)]


def _segments(vmcore: Path) -> list[tuple[int, int, int, int]]:
    """(p_paddr, p_memsz, p_offset, p_filesz) of every PT_LOAD."""
    with open(vmcore, "rb") as f:
        ehdr = f.read(64)
        (phoff,) = struct.unpack_from("<Q", ehdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    loads = []
    for i in range(phnum):
        p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", table, i * phentsize
        )
        if p_type == 1:
            loads.append((p_paddr, p_memsz, p_offset, p_filesz))
    return loads


def read_errors(vmcore: Path, text: str) -> list[dict[str, Any]]:
    """The capture's unreadable /proc/vmcore ranges ("offset end errno"), as physical ranges."""
    errors = []
    segments = _segments(vmcore)
    for line in text.splitlines():
        if not line.strip():
            continue
        start, end, errno = (int(v) for v in line.split())
        entry: dict[str, Any] = {"offset": start, "end": end, "errno": errno}
        for paddr, _, offset, filesz in segments:
            if offset <= start < offset + filesz:
                entry["paddr"] = paddr + start - offset
                entry["paddr_end"] = paddr + min(end, offset + filesz) - offset
                entry["paddr_hex"] = f"{entry['paddr']:#x}-{entry['paddr_end']:#x}"
        errors.append(entry)
    return errors


def iomem(text: str, pattern: str) -> list[tuple[int, int]]:
    """[start, end) of /proc/iomem lines (any depth) whose name matches `pattern`."""
    found = []
    for line in text.splitlines():
        match = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) : (.*)$", line)
        if match and re.search(pattern, match.group(3)):
            found.append((int(match.group(1), 16), int(match.group(2), 16) + 1))
    return found


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def covered(rng: tuple[int, int], ranges: list[tuple[int, int]]) -> bool:
    """Whether `rng` lies wholly inside the union of `ranges`."""
    pos = rng[0]
    for start, end in sorted(ranges):
        if start <= pos < end:
            pos = end
        if pos >= rng[1]:
            return True
    return pos >= rng[1]


def runs(pfns: list[int]) -> list[tuple[int, int]]:
    """(first_pfn, count) runs of a sorted pfn list."""
    out: list[tuple[int, int]] = []
    for pfn in pfns:
        if out and out[-1][0] + out[-1][1] == pfn:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((pfn, 1))
    return out


def pfns_with(flags: array, bit: int) -> list[int]:
    mask = 1 << bit
    nopage = 1 << KPF_NOPAGE
    return [pfn for pfn, f in enumerate(flags) if f & mask and not f & nopage]


def _hmp_refused(reply: str) -> bool:
    """Whether a monitor reply is an error message (HMP has no status codes)."""
    return bool(
        re.search(
            r"^(Error|unknown command|Unknown|Invalid|invalid|.*: (error|disabled|not found))"
            r"|Uncorrected error reporting disabled|Previous MCE still in progress",
            reply,
            re.M,
        )
    )


def _kv(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, rest = line.strip().partition(" ")
        if key:
            values[key] = rest.split()
    return values


def _workload_pfns(capture: Capture) -> list[tuple[int, int, int, int]]:
    rows = []
    for line in capture.text("workload-pfns.txt").splitlines():
        if line and not line.startswith("#"):
            region, index, pfn, count = (int(v) for v in line.split())
            rows.append((region, index, pfn, count))
    return rows


# --------------------------------------------------------------------------
# mce-6.1

# MCi_STATUS: VAL | UC | EN | MISCV | ADDRV | PCC, MCA error code 0x9f (memory
# controller read error, generic channel).  PCC makes every vendor's severity
# grading (QEMU's -cpu max is AuthenticAMD family 0xf) say "panic".
MCE_STATUS = 0xBE0000000000009F
MCE_MCGSTATUS = 0x4  # MCIP only: neither RIPV nor EIPV, no way to restart
MCE_MISC = 0x86  # address mode physical (2 << 6), LSB 6
MCE_BANK = 1  # bank 4 is off limits: Linux clears a bit of MC4_CTL on family 0xf
MCE_CPU = 0


def _check_mce(capture: Capture) -> dict[str, Any]:
    capture.copy("mce.txt")
    values = {k: v[0] for k, v in _kv(capture.text("mce.txt")).items()}
    addr = int(values["addr"])
    # The #MC handler runs in NMI context, where printk only stores: the
    # panic kexecs into the capture kernel before any console flush, so the
    # evidence is in the crashed kernel's own log inside the vmcore.
    dmesg = capture.dmesg()
    if dmesg is None:
        raise _error("makedumpfile --dump-dmesg could not read the crashed kernel's log")
    hw_lines = [ln.strip() for ln in dmesg.splitlines() if "[Hardware Error]" in ln]
    panic = re.search(r"Kernel panic - not syncing: ([^\r\n]*)", dmesg)
    if not hw_lines:
        raise _error("no [Hardware Error] line in the crashed kernel's log")
    if panic is None or "machine check" not in panic.group(1).lower():
        what = panic.group(1) if panic else "no panic"
        raise _error(f"the first kernel did not panic on the machine check ({what})")
    if not any(f"ADDR {addr:x}" in ln for ln in hw_lines):
        raise _error(f"no [Hardware Error] line reports ADDR {addr:x}")
    if "sysrq" in dmesg.lower():
        raise _error("the crashed kernel's log mentions sysrq")
    return {
        "cpu": int(values["cpu"]),
        "bank": int(values["bank"]),
        "status": values["status"],
        "mcgstatus": values["mcgstatus"],
        "misc": values["misc"],
        "addr": addr,
        "addr_hex": f"{addr:#x}",
        "pfn": int(values["pfn"]),
        "pfn_is": "workload anonymous page (region 1), see workload-pfns.txt",
        "panic": panic.group(0).strip(),
        "hardware_error_lines": hw_lines,
        "evidence": "dmesg.old (the crashed kernel's log, makedumpfile --dump-dmesg)",
    }


# --------------------------------------------------------------------------
# hwpoison-6.1


def _check_hwpoison(capture: Capture) -> dict[str, Any]:
    capture.copy("hwpoison-targets.txt")
    targets: dict[int, tuple[str, str, str]] = {}
    for line in capture.text("hwpoison-targets.txt").splitlines():
        if line and not line.startswith("#"):
            pfn, method, kind, detail = line.split(maxsplit=3)
            targets[int(pfn)] = (method, kind, detail)
    flags = capture.kpageflags()
    poisoned = pfns_with(flags, KPF_HWPOISON)
    lines = ["# pfn kind (from kpageflags KPF_HWPOISON just before the crash; kind from"]
    lines.append("# hwpoison-targets.txt, 'unknown' when the guest did not poison it itself)")
    for pfn in poisoned:
        lines.append(f"{pfn} {targets[pfn][1] if pfn in targets else 'unknown'}")
    (capture.out / "hwpoison-pfns.txt").write_text("\n".join(lines) + "\n")
    missing = [f"{pfn}({t[1]})" for pfn, t in sorted(targets.items()) if pfn not in poisoned]
    if not poisoned:
        raise _error("no KPF_HWPOISON frame in kpageflags")
    if missing:
        raise _error(f"targets without KPF_HWPOISON at the crash: {' '.join(missing)}")
    kinds = {t[1] for t in targets.values()}
    needed = {"anon", "free", "pagecache-clean", "pagecache-dirty"}
    if not needed <= kinds:
        raise _error(f"no poisoned frame of kind {', '.join(sorted(needed - kinds))}")
    hardware_corrupted = int(capture.text("meminfo").split("HardwareCorrupted:")[1].split()[0])
    return {
        "pfns": poisoned,
        "targets": [
            {"pfn": pfn, "method": m, "kind": k, "detail": d}
            for pfn, (m, k, d) in sorted(targets.items())
        ],
        "meminfo_hardware_corrupted_kb": hardware_corrupted,
    }


# --------------------------------------------------------------------------
# balloon-6.1

BALLOON_MIB = 128


def _check_balloon(capture: Capture) -> dict[str, Any]:
    capture.copy("balloon.txt")
    values = _kv(capture.text("balloon.txt"))
    flags = capture.kpageflags()
    offline = pfns_with(flags, KPF_OFFLINE)
    pfn_runs = runs(offline)
    lines = ["# first_pfn count (runs of KPF_OFFLINE frames in kpageflags just before the crash)"]
    lines += [f"{first} {count}" for first, count in pfn_runs]
    (capture.out / "offline-pfns.txt").write_text("\n".join(lines) + "\n")
    expected = BALLOON_MIB * MIB // PAGE_SIZE
    if len(offline) < expected:
        raise _error(
            f"only {len(offline)} KPF_OFFLINE frames at the crash, balloon should hold {expected}"
        )
    info_balloon = [c for c in capture.hmp if c.get("command") == "info balloon"]
    return {
        "balloon_mib": BALLOON_MIB,
        "target_mib": int(values["target_mib"][0]),
        "offline_pages": len(offline),
        "offline_runs": len(pfn_runs),
        "memtotal_kb_before": int(values["memtotal_kb_before"][0]),
        "memtotal_kb_after": int(values["memtotal_kb_after"][0]),
        "info_balloon": info_balloon[-1].get("reply", "") if info_balloon else "",
    }


# --------------------------------------------------------------------------
# hotplug-6.1

HOTPLUG_DIMM_MIB = 256


def _check_hotplug(capture: Capture) -> dict[str, Any]:
    capture.copy("hotplug.txt", "iomem.hotplugged")
    values = _kv(capture.text("hotplug.txt"))
    removed = (int(values["removed"][0]), int(values["removed"][1]))
    offline = (int(values["offline"][0]), int(values["offline"][1]))
    loads = capture.pt_loads()
    ram_old = iomem(capture.text("iomem"), r"^System RAM")
    ram_plugged = iomem(capture.text("iomem.hotplugged"), r"^System RAM")
    for what, rng in (("removed", removed), ("offline", offline)):
        if rng[1] - rng[0] != HOTPLUG_DIMM_MIB * MIB:
            raise _error(f"{what} range {rng[0]:#x}-{rng[1]:#x} is not one dimm")
        if not covered(rng, ram_plugged):
            raise _error(f"{what} range {rng[0]:#x}-{rng[1]:#x} never was System RAM")
        if not covered(rng, loads):
            raise _error(f"no PT_LOAD covers the {what} range {rng[0]:#x}-{rng[1]:#x}")
    if any(overlaps(removed, r) for r in ram_old):
        raise _error("the removed range is still System RAM in the old kernel's iomem")
    not_offline = [
        ln
        for ln in capture.text("hotplug.txt").splitlines()
        if ln.startswith("state ") and not ln.endswith(" offline")
    ]
    if not_offline:
        raise _error(f"dimm2 block not offline at the crash: {not_offline[0]}")
    info_md = [c for c in capture.hmp if c.get("command") == "info memory-devices"]
    reply = info_md[-1].get("reply", "") if info_md else ""
    if "dimm1" in reply:
        raise _error("QEMU still lists dimm1 after device_del")
    return {
        "removed": list(removed),
        "removed_hex": f"{removed[0]:#x}-{removed[1]:#x}",
        "offline": list(offline),
        "offline_hex": f"{offline[0]:#x}-{offline[1]:#x}",
        "dimm_mib": HOTPLUG_DIMM_MIB,
        "block_size": int(values["block_size"][0]),
        "pt_loads": [[s, e] for s, e in loads],
        "kdump_read_errors": read_errors(
            capture.out / "vmcore", capture.kdump.get("vmcore.readerrors", b"").decode()
        ),
        "removed_range_in_vmcore": _range_summary(capture.out / "vmcore", removed),
        "offline_range_in_vmcore": _range_summary(capture.out / "vmcore", offline),
        "qemu_memory_devices": reply,
    }


def _range_summary(vmcore: Path, rng: tuple[int, int]) -> dict[str, int]:
    """How the capture kernel read a physical range: counts of zero, 0xff and other pages."""
    counts = {"zero": 0, "ones": 0, "data": 0}
    zero, ones = bytes(PAGE_SIZE), b"\xff" * PAGE_SIZE
    with open(vmcore, "rb") as f:
        for paddr, _, offset, filesz in _segments(vmcore):
            lo, hi = max(rng[0], paddr), min(rng[1], paddr + filesz)
            for page in range(lo, hi, PAGE_SIZE):
                f.seek(offset + page - paddr)
                data = f.read(PAGE_SIZE)
                key = "zero" if data == zero else "ones" if data == ones else "data"
                counts[key] += 1
    return counts


# --------------------------------------------------------------------------
# pmem-kmem-6.1

PMEM_MIB = 512
# ACPI 6.x, 5.2.26.2: the address range type GUID of persistent memory.
NFIT_SPA_PM_GUID = "66f0d379-b4f3-4074-ac43-0d3318b78cdb"


def nfit_spa_ranges(data: bytes) -> list[dict[str, Any]]:
    """SPA Range Structures (type 0) of one or more concatenated ACPI NFIT tables.

    Each table: 36-byte ACPI header (signature "NFIT", u32 length), 4 reserved bytes,
    then structures (u16 type, u16 length).  SPA: u16 range index, u16 flags, u32
    reserved, u32 proximity domain, 16-byte range type GUID, u64 base, u64 length,
    u64 memory mapping attributes.  Raises ValueError on anything malformed.
    """
    ranges = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 40 or data[pos : pos + 4] != b"NFIT":
            raise ValueError(f"no NFIT header at byte {pos}")
        (length,) = struct.unpack_from("<I", data, pos + 4)
        if length < 40 or pos + length > len(data):
            raise ValueError(f"NFIT at byte {pos} has bad length {length}")
        table = data[pos : pos + length]
        if sum(table) & 0xFF:
            raise ValueError(f"NFIT at byte {pos} has a bad checksum")
        off = 40
        while off < length:
            if length - off < 4:
                raise ValueError(f"truncated structure at byte {pos + off}")
            stype, slen = struct.unpack_from("<HH", table, off)
            if slen < 4 or off + slen > length:
                raise ValueError(f"structure at byte {pos + off} has bad length {slen}")
            if stype == 0:
                if slen < 56:
                    raise ValueError(f"SPA structure at byte {pos + off} is only {slen} bytes")
                index, flags, _, domain = struct.unpack_from("<HHII", table, off + 4)
                guid = str(uuid.UUID(bytes_le=table[off + 16 : off + 32]))
                base, size, attrs = struct.unpack_from("<QQQ", table, off + 32)
                ranges.append(
                    {
                        "range_index": index,
                        "flags": flags,
                        "proximity_domain": domain,
                        "guid": guid,
                        "persistent": guid == NFIT_SPA_PM_GUID,
                        "base": base,
                        "length": size,
                        "mapping_attributes": attrs,
                        "hex": f"{base:#x}-{base + size:#x}",
                    }
                )
            off += slen
        pos += length
    return ranges


def _nfit(capture: Capture, meta: dict[str, bytes], which: str) -> dict[str, Any]:
    """Copies one kernel's NFIT bytes to nfit.WHICH.bin; what they say, for the hazard."""
    dest = capture.out / f"nfit.{which}.bin"
    dest.unlink(missing_ok=True)
    data = meta.get("nfit.bin", b"")
    found: dict[str, Any] = {"present": bool(data)}
    if data:
        dest.write_bytes(data)
        found["tables"] = meta.get("nfit.tables", b"").decode(errors="replace").split()[::2]
        try:
            found["spa"] = nfit_spa_ranges(data)
        except ValueError as exc:
            found["error"] = str(exc)
    if "nfit.missing" in meta:
        found["missing"] = meta["nfit.missing"].decode(errors="replace").strip()
    return found


def _check_pmem(capture: Capture) -> dict[str, Any]:
    capture.copy("pmem.txt", "ndctl.json", "daxctl.json")
    old = capture.text("iomem")
    pmem = iomem(old, r"^Persistent Memory")
    kmem = iomem(old, r"^System RAM \(kmem\)")
    if not pmem:
        raise _error("no Persistent Memory range in the old kernel's iomem")
    if not kmem:
        raise _error("no System RAM (kmem) range in the old kernel's iomem")
    loads = capture.pt_loads()
    uncovered = [r for r in kmem if not covered(r, loads)]
    if uncovered:
        raise _error(f"no PT_LOAD covers the kmem range {uncovered[0][0]:#x}-{uncovered[0][1]:#x}")
    flags = capture.kpageflags()
    in_kmem = used = 0
    for start, end in kmem:
        for pfn in range(start // PAGE_SIZE, min(end // PAGE_SIZE, len(flags))):
            in_kmem += 1
            f = flags[pfn]
            if f and not f & (1 << KPF_BUDDY) and not f & (1 << KPF_NOPAGE):
                used += 1
    workload = 0
    for _, _, pfn, count in _workload_pfns(capture):
        for start, end in kmem:
            lo, hi = max(pfn, start // PAGE_SIZE), min(pfn + count, end // PAGE_SIZE)
            workload += max(0, hi - lo)
    lines = [ln.strip() for ln in old.splitlines() if re.search(r"Persistent|kmem|dax", ln)]
    # The capture kernel's iomem has no pmem line (no nfit driver there): the
    # firmware's NFIT is how kdumpd learns the range, so record both kernels' copies.
    nfit_old = _nfit(capture, capture.first, "old")
    nfit_kdump = _nfit(capture, capture.kdump, "kdump")
    if not nfit_old["present"] or "error" in nfit_old:
        raise _error(f"the first kernel's NFIT: {nfit_old.get('error', 'missing')}")
    pm_old = [(r["base"], r["base"] + r["length"]) for r in nfit_old["spa"] if r["persistent"]]
    if sorted(pm_old) != sorted(pmem):
        raise _error(f"the first kernel's NFIT SPA ranges {pm_old} are not iomem's pmem {pmem}")
    nfit_in_kdump = nfit_kdump["present"] and "error" not in nfit_kdump
    if not nfit_in_kdump:
        why = nfit_kdump.get("error") or "not in /sys/firmware/acpi/tables"
        warning = f"pmem-kmem: the capture kernel has no usable ACPI NFIT ({why})"
        print(f"warning: {warning}", file=sys.stderr)
        capture.info.setdefault("warnings", []).append(warning)
    return {
        "pmem": [list(r) for r in pmem],
        "pmem_hex": [f"{s:#x}-{e:#x}" for s, e in pmem],
        "kmem": [list(r) for r in kmem],
        "kmem_hex": [f"{s:#x}-{e:#x}" for s, e in kmem],
        "pmem_mib": PMEM_MIB,
        "iomem_lines": lines,
        "kmem_pages": in_kmem,
        "kmem_pages_with_flags": used,
        "kmem_workload_pages": workload,
        "pt_loads": [[s, e] for s, e in loads],
        "nfit_in_kdump": nfit_in_kdump,
        "nfit_old": nfit_old,
        "nfit_kdump": nfit_kdump,
        "nfit_kdump_matches_old": nfit_in_kdump
        and capture.first.get("nfit.bin") == capture.kdump.get("nfit.bin"),
    }


# --------------------------------------------------------------------------
# the catalogue

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="mce-6.1",
            summary="fatal machine check (QEMU HMP mce, PCC) at a workload page; "
            "the panic, not sysrq, starts the capture kernel",
            hooks="mce.sh",
            check_fn=_check_mce,
            outputs=("mce.txt",),
            conf=(
                ("MCE_CPU", str(MCE_CPU)),
                ("MCE_BANK", str(MCE_BANK)),
                ("MCE_STATUS", f"{MCE_STATUS:#x}"),
                ("MCE_MCGSTATUS", f"{MCE_MCGSTATUS:#x}"),
                ("MCE_MISC", f"{MCE_MISC:#x}"),
                ("MCE_ADDR_OFFSET", "0x40"),
            ),
        ),
        Scenario(
            name="hwpoison-6.1",
            summary="PG_hwpoison frames: anon (hard, soft), THP subpage, free pages inside "
            "free buddy blocks (hard, soft), clean and dirty page cache",
            hooks="hwpoison.sh",
            check_fn=_check_hwpoison,
            outputs=("hwpoison-targets.txt", "hwpoison-pfns.txt"),
        ),
        Scenario(
            name="balloon-6.1",
            summary=f"virtio balloon inflated by {BALLOON_MIB} MiB: PageOffline frames",
            hooks="balloon.sh",
            check_fn=_check_balloon,
            devices=("-device", "virtio-balloon-pci,id=balloon0"),
            modules=("virtio_balloon",),
            helper=None,
            outputs=("balloon.txt", "offline-pfns.txt"),
            conf=(
                ("BALLOON_MIB", str(BALLOON_MIB)),
                ("BALLOON_TARGET_MIB", str(1024 - BALLOON_MIB)),
            ),
        ),
        Scenario(
            name="hotplug-6.1",
            summary="two pc-dimms hot-added and onlined before kexec -p; afterwards dimm1 "
            "offlined and hot-removed, dimm2 offlined: stale elfcorehdr",
            hooks="hotplug.sh",
            check_fn=_check_hotplug,
            memory_opts="slots=2,maxmem=2G",
            # As Fedora's kdump does: without it the capture kernel's ACPI
            # driver hot-adds dimm2 (still plugged) as its own RAM, and
            # /proc/vmcore then fails to read it ("ioremap on RAM").
            kdump_args=("acpi_no_memhotplug",),
            extra_mib=2 * HOTPLUG_DIMM_MIB,
            outputs=("hotplug.txt", "iomem.hotplugged"),
            conf=(("HP_MIB", str(HOTPLUG_DIMM_MIB)),),
        ),
        Scenario(
            name="pmem-kmem-6.1",
            summary=f"{PMEM_MIB} MiB NVDIMM as devdax, reconfigured as System RAM (kmem) "
            "and onlined before kexec -p",
            hooks="pmem-kmem.sh",
            check_fn=_check_pmem,
            machine_opts="nvdimm=on",
            memory_opts="slots=2,maxmem=2G",
            devices=(
                "-object",
                f"memory-backend-file,id=nv1,share=on,mem-path={{workdir}}/pmem.img,"
                f"size={PMEM_MIB}M",
                "-device",
                "nvdimm,memdev=nv1,id=nvdimm1",
            ),
            modules=("nfit", "nd_pmem", "dax_pmem", "device_dax", "kmem"),
            binaries=("ndctl", "daxctl"),
            helper=None,
            extra_mib=PMEM_MIB,
            outputs=("pmem.txt", "ndctl.json", "daxctl.json", "nfit.old.bin", "nfit.kdump.bin"),
        ),
    )
}
