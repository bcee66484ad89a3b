#!/usr/bin/env python3
"""kdumpd end to end: a kdump capture that runs out of memory without kdumpd succeeds with it,
and its dump is identical, page for page, to one taken before kdumpd touched anything.

    python3 tests/vm/kdump_e2e/run.py --kernel 6.1 [--ram 3072] [--crashkernel 192M]
        [--modes control,swap,scratch,luks-control,luks-swap] [--out DIR] [--timeout 900]
        [--factor 3] [--passes 2] [--luks-expect fail|complete]

For the kernel (a release or prefix of an installed Debian kernel):

1. dracut builds the capture initramfs three times: the core of a kdump-utils image alone,
   the same plus the kdumpd module (the difference is what kdumpd adds, compressed and
   unpacked), and that plus the test's own module (98kdumpd-e2e: it stands in for
   kdump-utils' kdumpbase, with a reference-dump unit ordered before kdumpd.service and a
   capture unit after it).
2. Per mode, a QEMU (TCG) guest boots the kernel with crashkernel=, fills memory (the
   workload of tests/vm/mkvmcore.py), loads the capture kernel and the dracut image with
   kexec -p -s and crashes. In the capture kernel systemd runs, in order:
   reference dump (makedumpfile -l -d 31) -> kdumpd.service (READY = swap on, or the scratch
   filesystem mounted) -> the capture: a program that fills and verifies FACTOR times the
   memory available before kdumpd, while another process writes random bursts into the old
   memory kdumpd uses (/dev/mem); then the final makedumpfile -l -d 31 (scratch: staged on
   kdumpd's filesystem, then copied out), kdumpd's status and report, the journal.
   control: the same with rd.kdumpd=0: the program must be OOM-killed.
   luks-swap / luks-control (luks.py): no program; the memory-hungry step is systemd-cryptsetup
   unlocking the LUKS2 dump target (Argon2id, 1 GiB) after kdumpd, and the final dump goes
   onto it. Without kdumpd the unlock must fail for lack of memory (--luks-expect complete:
   must succeed, the anchor with a large reservation).
3. The host reads the dump disk back (debugfs), compares the dumps page by page, checks the
   program saw no wrong byte, that kdumpd detected and repaired the corruption and lost
   nothing, prints a short summary and, last, one JSON line.

Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/vm: mkvmcore
sys.path.insert(0, str(HERE))

import dumpcmp  # noqa: E402
import initramfs  # noqa: E402
import luks  # noqa: E402
import mkvmcore as mk  # noqa: E402

TOP = HERE.parents[2]
PLAIN_MODES = ("control", "swap", "scratch")
# The encrypted dump target (luks.py): the unlock (Argon2id, 1 GiB) is the memory-hungry step;
# without kdumpd (luks-control) it must fail, over kdumpd's swap (luks-swap) it must complete.
LUKS_MODES = ("luks-control", "luks-swap")
MODES = PLAIN_MODES + LUKS_MODES
SERIAL_DUMP = "kdumpd-dump"
SCRATCH_MOUNT = "/var/lib/kdumpd-scratch"
MIB = 1 << 20
# What a kdump-utils capture kernel gets on x86_64 (gen-kdump-sysconfig.sh), minus what only
# matters on real hardware; quiet keeps the serial console (slow under TCG) for marks.
CAPTURE_ARGS = (
    "reset_devices", "nr_cpus=1", "irqpoll", "udev.children-max=2",
    "transparent_hugepage=never", "novmcoredd", "cma=0", "hugetlb_cma=0",
    "kfence.sample_interval=0", "acpi_no_memhotplug", "quiet", "systemd.show_status=error",
    "rd.emergency=poweroff",
)
# The test's kdumpd configuration (the module ships it as /etc/kdumpd.conf): as = swap is what
# the module adds when the host's file says nothing; the report goes to the dump target.
KDUMPD_CONF = """\
# tests/vm/kdump_e2e: the dump target is mounted (by the reference step) before kdumpd starts,
# so kdumpd writes its report beside the dump itself (at READY, and the final one at stop).
report = /kdump-target/run/kdumpd-report.json
"""


class E2EError(Exception):
    pass


@dataclass(frozen=True)
class E2EConfig(mk.Config):
    """mkvmcore's guest configuration with a dracut/systemd capture kernel command line."""

    capture_args: tuple[str, ...] = ()

    def kdump_cmdline(self) -> str:
        extra = os.environ.get("KDUMPD_E2E_APPEND", "").split()  # e.g. ignore_loglevel
        return " ".join([*self.common_args(), *CAPTURE_ARGS, *self.capture_args, *extra])


def mode_args(mode: str, factor: int, passes: int) -> tuple[str, ...]:
    args = [f"kdumpd_e2e={mode}", f"kdumpd_e2e_factor={factor}", f"kdumpd_e2e_passes={passes}"]
    if mode in ("control", "luks-control"):
        args.append("rd.kdumpd=0")
    elif mode == "scratch":
        args += ["kdumpd.as=scratch", f"kdumpd.mount={SCRATCH_MOUNT}"]
    return tuple(args)


# -- building -------------------------------------------------------------------------------


def build_programs(workdir: Path) -> Path:
    out = workdir / "programs"
    out.mkdir(exist_ok=True)
    cmd = ["gcc", "-static", "-O2", "-s", "-Wall", "-Wextra", "-o", str(out / "hog"),
           str(HERE / "guest" / "hog.c")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise E2EError(f"gcc hog.c failed: {proc.stderr.strip()[-300:]}")
    return out


def build_images(kernel: mk.Kernel, workdir: Path, programs: Path,
                 modes: list[str]) -> dict[str, initramfs.Image]:
    """base and kdumpd (what kdumpd adds), and the test images the modes need: e2e (plain
    dump target), e2e-luks (the same plus dracut's crypt module and the LUKS target's
    crypttab)."""
    tree = initramfs.dracut_tree(workdir)
    conf = workdir / "kdumpd.conf"
    conf.write_text(KDUMPD_CONF)
    env = {"kdumpd_package_dir": os.environ.get("KDUMPD_E2E_PACKAGE_DIR", str(TOP / "daemon")),
           "kdumpd_plugin": os.environ.get("KDUMPD_E2E_PLUGIN",
                                           str(TOP / "nbd_plugin" / "kdumpd_plugin.py"))}
    core = initramfs.CORE_MODULES
    images = {
        "base": initramfs.build(kernel.release, workdir / "base.img", tree, modules=core,
                                log=workdir / "dracut-base.log"),
        "kdumpd": initramfs.build(kernel.release, workdir / "kdumpd.img", tree,
                                  modules=(*core, "kdumpd"), env=env,
                                  log=workdir / "dracut-kdumpd.log"),
    }
    e2e_env = {**env, "kdumpd_conf": str(conf), "kdumpd_scratch": "yes",
               "KDUMPD_E2E_BUILD": str(programs)}
    if any(m in PLAIN_MODES for m in modes):
        images["e2e"] = initramfs.build(kernel.release, workdir / "e2e.img", tree,
                                        modules=(*core, "kdumpd", "kdumpd-e2e"), env=e2e_env,
                                        log=workdir / "dracut-e2e.log")
    if any(m in LUKS_MODES for m in modes):
        images["e2e-luks"] = initramfs.build(
            kernel.release, workdir / "e2e-luks.img", tree,
            modules=(*core, *luks.DRACUT_MODULES, "kdumpd", "kdumpd-e2e"),
            env={**e2e_env, "KDUMPD_E2E_LUKS_KEY": str(luks.key_file(workdir)),
                 "KDUMPD_E2E_LUKS_UUID": luks.UUID,
                 # 1: systemd-cryptsetup's mlockall made to fail (luks-nolock.conf)
                 "KDUMPD_E2E_LUKS_NOLOCK": os.environ.get("KDUMPD_E2E_LUKS_NOLOCK", "")},
            log=workdir / "dracut-e2e-luks.log")
    return images


# -- one guest run --------------------------------------------------------------------------


@dataclass
class GuestRun:
    marks: dict[str, tuple[float, str]]  # first time (s since start) and argument of each mark
    returncode: int | None
    timed_out: bool


def qemu_command(cfg: E2EConfig, initrd: Path, disks: dict[str, Path]) -> list[str]:
    cmd = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-accel", "tcg",
           "-cpu", "max", "-machine", "q35", "-m", f"{cfg.ram_mib}M", "-smp", str(cfg.smp),
           "-display", "none", "-serial", "stdio", "-no-reboot",
           # KDUMPD_E2E_MONITOR=PATH: a QEMU monitor socket (sendkey alt-sysrq-t to debug)
           "-monitor", (f"unix:{os.environ['KDUMPD_E2E_MONITOR']},server=on,wait=off"
                        if os.environ.get("KDUMPD_E2E_MONITOR") else "none"),
           "-kernel", str(cfg.kernel.image), "-initrd", str(initrd),
           "-append", cfg.first_cmdline()]
    for index, (serial, path) in enumerate(disks.items()):
        cmd += ["-drive", f"if=none,id=d{index},file={path},format=raw,cache=unsafe",
                "-device", f"virtio-blk-pci,drive=d{index},serial={serial}"]
    return cmd


def run_guest(cmd: list[str], console: Path, timeout: float, tag: str) -> GuestRun:
    """mkvmcore's QEMU runner (serial console teed to ``console``, killed after ``timeout``
    seconds), with each mark's first occurrence echoed to stderr as progress and its time made
    relative to the start."""
    seen: set[str] = set()

    def progress(name: str, arg: str, at: float) -> None:
        if name not in seen:
            seen.add(name)
            print(f"e2e[{tag}]: {at:6.1f} s {name} {arg}", file=sys.stderr, flush=True)

    run = mk.run_guest(cmd, console, timeout, progress)
    marks = {name: (t - run.started, arg) for name, (t, arg) in run.marks.items()}
    return GuestRun(marks, run.returncode, run.timed_out)


def first_kernel_initrd(cfg: E2EConfig, workload: Path, capture_image: Path) -> bytes:
    """mkvmcore's busybox initramfs for the first kernel, carrying the kernel and the dracut
    image that kexec -p loads as the capture kernel."""
    base = mk.base_initramfs(cfg, workload)
    payload = mk.Cpio()
    payload.file("kdump/vmlinuz", cfg.kernel.image.read_bytes())
    payload.file("kdump/initrd.img", capture_image.read_bytes())
    return base + payload.getvalue()


def make_dump_disk(path: Path, size_mib: int) -> Path:
    mk.make_sparse(path, size_mib * MIB)
    proc = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "kdumpd-dump", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise E2EError(f"mke2fs dump disk: {proc.stderr.strip()}")
    return path


def read_back(disk: Path, dest: Path) -> Path:
    """Copy /run of the ext4 dump disk to dest (debugfs: no mount, no loop device)."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["debugfs", "-R", f"rdump /run {dest}", str(disk)],
                          capture_output=True, text=True)
    if not (dest / "run").is_dir():
        # A guest stopped mid-write (a hang ended by the timeout) leaves stale bitmaps:
        # catastrophic mode ignores them and still reads what reached the disk.
        proc = subprocess.run(["debugfs", "-c", "-R", f"rdump /run {dest}", str(disk)],
                              capture_output=True, text=True)
    run = dest / "run"
    if not run.is_dir():
        raise E2EError(f"nothing on the dump disk: {proc.stderr.strip()[-300:]}")
    return run


def run_mode(mode: str, args: argparse.Namespace, kernel: mk.Kernel, workdir: Path,
             data_image: Path, workload: Path, images: dict[str, initramfs.Image]
             ) -> dict[str, Any]:
    out = args.out / mode
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = E2EConfig(kernel=kernel, ram_mib=args.ram, crashkernel=args.crashkernel, kaslr=True,
                    four_level=False, smp=args.smp, timeout=args.timeout, out=out,
                    capture_args=mode_args(mode, args.factor, args.passes))
    rundir = workdir / mode
    rundir.mkdir()
    initrd = rundir / "initrd.img"
    capture_image = images["e2e-luks" if mode in LUKS_MODES else "e2e"].path
    initrd.write_bytes(first_kernel_initrd(cfg, workload, capture_image))
    data = rundir / "data.ext4"
    subprocess.run(["cp", "--sparse=always", str(data_image), str(data)], check=True)
    kpf_room = (cfg.ram_mib + 4096) * MIB // 4096 * 8
    disks = {
        mk.SERIAL_DATA: data,
        mk.SERIAL_META: mk.make_sparse(rundir / "meta.raw", mk.META_KPAGEFLAGS_OFFSET + kpf_room),
        SERIAL_DUMP: make_dump_disk(rundir / "dump.ext4", 512 + 2 * cfg.ram_mib // 8),
    }
    luks_disk = None
    if mode in LUKS_MODES:
        luks_disk = luks.make_disk(rundir / "luks.img", 256 + cfg.ram_mib // 8, rundir)
        disks[luks.SERIAL] = luks_disk.path
    console = out / "console.log"
    print(f"e2e[{mode}]: booting {kernel.release}, {cfg.ram_mib} MiB, "
          f"crashkernel={cfg.crashkernel} (console: {console})", file=sys.stderr, flush=True)
    run = run_guest(qemu_command(cfg, initrd, disks), console, cfg.timeout, mode)
    marks = {name: round(at, 1) for name, (at, _) in run.marks.items()}
    result: dict[str, Any] = {"mode": mode, "marks": marks, "timed_out": run.timed_out,
                              "crashkernel": cfg.crashkernel, "guest_ram_mib": cfg.ram_mib}
    if luks_disk is not None:
        result["luks_keyslot"] = luks_disk.keyslot
    try:
        files = read_back(disks[SERIAL_DUMP], out)
        if luks_disk is not None:
            luks.read_back(luks_disk, rundir, files)
    except E2EError as exc:
        result["error"] = str(exc)
        files = None
    if "FAIL" in run.marks:
        result["error"] = f"guest: {run.marks['FAIL'][1]}"
    elif "CAPTURE_DONE" not in run.marks:
        last = max(run.marks, key=lambda m: run.marks[m][0]) if run.marks else "none"
        result.setdefault("error", ("timeout" if run.timed_out else "guest stopped")
                          + f" before the capture finished (last mark {last})")
    if files is not None:
        result.update(analyse(mode, files))
    hung = console_warnings(console)
    if hung:
        result["console_warnings"] = hung
    if mode in LUKS_MODES and result.get("error") and not result.get("unlock_failure") \
            and not result.get("unlock_ok"):
        # A run that ended before the capture unit: why, from the marks and the console.
        result["unlock_failure"] = result["error"] + (f"; console: {hung[-1]}" if hung else "")
    shutil.rmtree(rundir)
    return result


# -- analysis -------------------------------------------------------------------------------


def console_warnings(console: Path) -> list[str]:
    """The kernel's and systemd's stall reports on the console (hung tasks, watchdogs): what a
    run that hangs leaves, when nothing reaches the dump disk."""
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return []
    keys = ("blocked for more than", "Watchdog timeout", "System is deadlocked",
            "Possible stuck request", "Out of memory")
    return [line.strip()[:160] for line in text.splitlines() if any(k in line for k in keys)]


def _json(path: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc
    except (OSError, ValueError):
        return {}


def _kv(path: Path) -> dict[str, str]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=" if "=" in line else " ")
            out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def analyse(mode: str, d: Path) -> dict[str, Any]:
    r: dict[str, Any] = {}
    timings = {k: float(v) for k, v in _kv(d / "timings.txt").items()}
    r["timings"] = timings
    unit = _kv(d / "kdumpd-unit.txt")
    r["kdumpd_unit"] = unit.get("ActiveState", "?")
    start, ready = (int(unit.get(k, "0") or 0) for k in
                    ("InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic"))
    r["ready_seconds"] = round((ready - start) / 1e6, 2) if start and ready else None
    hog = _json(d / "hog.json")
    rc_text = (d / "hog-rc").read_text().strip() if (d / "hog-rc").exists() else ""
    r["hog_rc"] = int(rc_text) if rc_text.lstrip("-").isdigit() else None
    r["hog_mib"] = int((d / "hog-mib").read_text()) if (d / "hog-mib").exists() else None
    r["mem_available_kib"] = (int((d / "memavailable-kib").read_text())
                              if (d / "memavailable-kib").exists() else None)
    r["hog"] = hog
    oom = (d / "oom.txt").read_text() if (d / "oom.txt").exists() else ""
    r["oom_killed"] = r["hog_rc"] == 137 and "(hog)" in oom
    r["completed"] = r["hog_rc"] == 0 and bool(hog) and hog.get("wrong_pages") == 0
    r["wrong_reads"] = hog.get("wrong_pages")
    # time, daemon RSS, PSS, nbdkit RSS, PSS, swap used, MemFree (KiB)
    samples: list[list[float]] = []
    try:
        for line in (d / "samples.txt").read_text().splitlines():
            parts = line.split()
            if len(parts) == 7:
                samples.append([float(p or 0) for p in parts])
    except (OSError, ValueError):
        pass
    serving = [s for s in samples if s[1] and s[3]]  # both processes up
    r["swap_used_bytes"] = int(max((s[5] for s in samples), default=0)) * 1024
    for what, col in (("rss", 1), ("pss", 2)):
        totals = sorted(s[col] + s[col + 2] for s in serving)
        r[f"kdumpd_{what}_bytes"] = int(totals[-1]) * 1024 if totals else None
        r[f"kdumpd_{what}_median_bytes"] = int(totals[len(totals) // 2]) * 1024 if totals else None
        r[f"kdumpd_{what}_parts"] = {
            "daemon": int(max((s[col] for s in serving), default=0)) * 1024,
            "nbdkit": int(max((s[col + 2] for s in serving), default=0)) * 1024}
    r["samples"] = len(serving)
    st = _json(d / "status-end.json")
    integ = st.get("integrity", {})
    r["status"] = {k: st.get(k) for k in ("copies", "size_bytes", "capacity_bytes",
                                          "used_bytes", "backend")}
    r["integrity"] = integ
    r["repairs"] = integ.get("repaired")
    r["inject"] = _json(d / "inject.json")
    report = _json(d / "kdumpd-report.json")
    r["report_saved"] = bool(report)
    if report:
        plan = report.get("plan", {})
        r["plan"] = {k: plan.get(k) for k in ("reusable_bytes", "extents", "dump_level",
                                               "osrelease")}
        r["report_state"] = report.get("state")
        r["phases"] = report.get("phases")  # kdumpd's own split of its time to READY
        r["teardown_errors"] = report.get("teardown_errors")
    ref, fin = d / "reference.kdump", d / "final.kdump"
    if mode != "control" and ref.exists() and fin.exists():
        r["dump"] = dumpcmp.compare(ref, fin)
        r["dump_identical"] = bool(r["dump"]["identical"])
    else:
        r["dump_identical"] = None
    r["dump_seconds"] = timings.get("dump_seconds")
    r["failures"] = ((d / "failures.txt").read_text().strip().splitlines()
                     if (d / "failures.txt").exists() else [])
    if mode in LUKS_MODES:
        r.update(luks.analyse(d, _kv(d / "luks-unit.txt")))
        r["completed"] = bool(r["unlock_ok"] and r["dump_identical"])
    for name in ("reference.kdump", "final.kdump"):  # large; the verdict is kept
        if not os.environ.get("KDUMPD_E2E_KEEP_DUMPS"):
            (d / name).unlink(missing_ok=True)
    return r


def checks(results: dict[str, dict[str, Any]], luks_expect: str = "fail") -> list[str]:
    """What failed, one line each (empty: every check passed). ``luks_expect``: what
    luks-control must do (fail; complete with enough RAM, the time anchor)."""
    bad = []
    for mode, r in results.items():
        if mode in LUKS_MODES:
            bad += luks.checks(mode, r, luks_expect)
            if r.get("error") and (mode == "luks-swap" or luks_expect == "complete"):
                bad.append(f"{mode}: {r['error']}")
            continue
        if r.get("error"):
            bad.append(f"{mode}: {r['error']}")
            continue
        if mode == "control":
            if not r.get("oom_killed"):
                bad.append(f"control: the program was not OOM-killed without kdumpd "
                           f"(exit {r.get('hog_rc')})")
            continue
        if r.get("kdumpd_unit") != "active":
            bad.append(f"{mode}: kdumpd.service was {r.get('kdumpd_unit')} at capture time")
        if not r.get("completed"):
            bad.append(f"{mode}: the program did not complete (exit {r.get('hog_rc')}, "
                       f"wrong pages {r.get('wrong_reads')})")
        if r.get("wrong_reads") is None:
            bad.append(f"{mode}: no verification report from the program")
        elif r["wrong_reads"]:
            bad.append(f"{mode}: {r['wrong_reads']} pages read back wrong")
        if r.get("dump_identical") is not True:
            bad.append(f"{mode}: dumps differ: {r.get('dump', {}).get('problems')}")
        integ = r.get("integrity") or {}
        if integ.get("lost"):
            bad.append(f"{mode}: kdumpd lost {integ['lost']} blocks")
        if not r.get("repairs"):
            bad.append(f"{mode}: no repairs counted (injected {r.get('inject', {})})")
        if mode == "swap" and not r.get("swap_used_bytes"):
            bad.append("swap: no swap was used")
        if not r.get("report_saved") or r.get("report_state") != "stopped":
            bad.append(f"{mode}: kdumpd's final report was not saved beside the dump "
                       f"(state {r.get('report_state')})")
        if r.get("failures"):
            bad.append(f"{mode}: guest: {'; '.join(r['failures'])}")
    return bad


# -- output ---------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / MIB:.0f} MiB"


def summary_line(args: argparse.Namespace, kernel: mk.Kernel, images: dict[str, Any],
                 results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    c, s, x, lc, ls = (results.get(m, {}) for m in MODES)
    added_c = images["kdumpd"].compressed - images["base"].compressed
    added_u = images["kdumpd"].unpacked - images["base"].unpacked
    ran = [r for m, r in results.items() if m in ("swap", "scratch")]
    s = s or ls  # the footprint of kdumpd serving swap: the plain swap run, else the LUKS one
    return {
        "kernel": kernel.release,
        "guest_ram": f"{args.ram}M",
        "crashkernel": args.crashkernel,
        "oom_without_kdumpd": c.get("oom_killed") if c else None,
        "completed_with_kdumpd": all(r.get("completed") for r in ran) if ran else None,
        "dump_identical": all(r.get("dump_identical") for r in ran) if ran else None,
        "wrong_reads": sum(r.get("wrong_reads") or 0 for r in ran),
        "repairs": sum(r.get("repairs") or 0 for r in ran),
        "lost": sum((r.get("integrity") or {}).get("lost", 0) for r in ran),
        "swap_used_bytes": s.get("swap_used_bytes"),
        "initramfs_added_bytes": added_c,
        "initramfs_added_unpacked_bytes": added_u,
        "kdumpd_rss_bytes": s.get("kdumpd_rss_bytes") or x.get("kdumpd_rss_bytes"),
        "kdumpd_pss_bytes": s.get("kdumpd_pss_bytes") or x.get("kdumpd_pss_bytes"),
        "kdumpd_pss_parts": s.get("kdumpd_pss_parts") or x.get("kdumpd_pss_parts"),
        "kdumpd_rss_parts": s.get("kdumpd_rss_parts") or x.get("kdumpd_rss_parts"),
        "ready_seconds": s.get("ready_seconds") or x.get("ready_seconds"),
        "ready_phases": s.get("phases") or x.get("phases"),
        "dump_seconds": s.get("dump_seconds"),
        "reference_dump_seconds": (s.get("timings") or {}).get("reference_dump_seconds"),
        "hog_mib": s.get("hog_mib") or c.get("hog_mib"),
        "mem_available_mib": ((s.get("mem_available_kib") or 0) // 1024) or None,
        "scratch": ({k: x.get(k) for k in ("completed", "dump_identical", "wrong_reads",
                                          "repairs", "ready_seconds", "dump_seconds")}
                    if x else None),
        "luks": luks_summary(lc, ls) if lc or ls else None,
        "modes": list(results),
        "passed": not checks(results, args.luks_expect),
    } | ratios(s.get("ready_seconds") or x.get("ready_seconds"), s.get("dump_seconds"),
               (s.get("timings") or {}).get("reference_dump_seconds"))


def luks_summary(lc: dict[str, Any], ls: dict[str, Any]) -> dict[str, Any]:
    keys = ("unlock_ok", "unlock_seconds", "unlock_failure", "completed", "dump_identical",
            "dump_seconds")
    return {"keyslot": (lc or ls).get("luks_keyslot"),
            "unlock_memory_locked": os.environ.get("KDUMPD_E2E_LUKS_NOLOCK") != "1",
            "without_kdumpd": {k: lc.get(k) for k in keys} if lc else None,
            "with_kdumpd": ({k: ls.get(k) for k in (*keys, "swap_used_bytes", "kdumpd_pss_bytes",
                                                    "kdumpd_rss_bytes")} if ls else None)}


def ratios(ready: float | None, dump: float | None, reference: float | None) -> dict[str, Any]:
    """Start-up and the dump's slowdown against the reference dump of the same run (the
    dump before kdumpd started, in the same capture kernel): ratios, not absolute times."""
    if not reference:
        return {"ready_vs_reference_dump": None, "dump_vs_reference_dump": None}
    return {"ready_vs_reference_dump": round(ready / reference, 3) if ready else None,
            "dump_vs_reference_dump": round(dump / reference, 3) if dump else None}


# The footprint goals (issue "Lean and fast"): printed met or missed, never asserted here.
GOALS = (
    ("kdumpd_pss_bytes", "PSS of everything kdumpd runs", 24 * MIB, "bytes"),
    ("initramfs_added_unpacked_bytes", "added to the initramfs, unpacked", 12 * MIB, "bytes"),
    ("ready_vs_reference_dump", "time to READY / reference dump", 0.25, "ratio"),
    ("dump_vs_reference_dump", "dump while serving / reference dump", 1.10, "ratio"),
)


def goal_lines(line: dict[str, Any]) -> list[str]:
    out = []
    for key, what, limit, kind in GOALS:
        value = line.get(key)
        if value is None:
            out.append(f"{what}: not measured")
            continue
        shown = (f"{value / MIB:.1f} MiB (goal <= {limit / MIB:.0f} MiB)" if kind == "bytes"
                 else f"{value:.2f}x (goal <= {limit:.2f}x)")
        out.append(f"{what}: {shown} {'met' if value <= limit else 'MISSED'}")
    return out


def print_summary(line: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    p = lambda text="": print(text, file=sys.stderr)  # noqa: E731
    s = results.get("swap", {})
    p()
    p(f"== kdumpd end to end: {line['kernel']}, guest {line['guest_ram']}, "
      f"crashkernel={line['crashkernel']}")
    plan = s.get("plan") or results.get("scratch", {}).get("plan") or {}
    if plan:
        p(f"   old memory found: {_mib(plan.get('reusable_bytes'))} reusable in "
          f"{plan.get('extents')} extents (dump level {plan.get('dump_level')}); "
          f"kdumpd ready in {line['ready_seconds']} s")
        phases = line.get("ready_phases") or {}
        if phases:
            p("      ready: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    st = s.get("status") or {}
    if st.get("capacity_bytes"):
        p(f"   swap: {_mib(st.get('capacity_bytes'))} in old memory, {st.get('copies')} copies "
          f"of every block; {_mib(line['swap_used_bytes'])} used at the peak")
    c = results.get("control")
    hog = line.get("hog_mib")
    avail = line.get("mem_available_mib")
    if c:
        p(f"   without kdumpd: filling {hog} MiB with {avail} MiB available -> "
          + ("OOM-killed" if c.get("oom_killed") else f"NOT OOM-killed (exit {c.get('hog_rc')})"))
    for mode in ("swap", "scratch"):
        r = results.get(mode)
        if not r:
            continue
        where = "anonymous memory over kdumpd's swap" if mode == "swap" else \
            "a file on kdumpd's filesystem"
        inj = r.get("inject") or {}
        integ = r.get("integrity") or {}
        p(f"   with kdumpd ({mode}): {hog} MiB of {where} written and verified "
          f"{(r.get('hog') or {}).get('passes', '?')}x -> "
          + ("completed" if r.get("completed") else f"FAILED (exit {r.get('hog_rc')})")
          + f", {r.get('wrong_reads')} wrong pages")
        p(f"      corruption: {inj.get('bursts', 0)} random bursts ({inj.get('bytes', 0)} bytes) "
          f"into old memory via /dev/mem; kdumpd detected {integ.get('detected', 0)}, repaired "
          f"{integ.get('repaired', 0)}, lost {integ.get('lost', 0)}")
        dump = r.get("dump") or {}
        p("      dump: makedumpfile -d 31 after = before: "
          + ("IDENTICAL" if r.get("dump_identical") else "DIFFERENT")
          + f" ({dump.get('pages_compared', 0)} pages, {_mib(dump.get('final_bytes'))}"
          + (", staged on kdumpd's filesystem" if mode == "scratch" else "")
          + f"); {r.get('dump_seconds')} s")
    p(f"   cost: +{line['initramfs_added_bytes'] / MIB:.1f} MiB initramfs "
      f"(+{line['initramfs_added_unpacked_bytes'] / MIB:.1f} MiB unpacked), "
      f"kdumpd + nbdkit {_mib(line['kdumpd_rss_bytes'])} RSS, "
      f"{_mib(line['kdumpd_pss_bytes'])} PSS while serving (peak)")
    for mode in LUKS_MODES:
        r = results.get(mode)
        if not r:
            continue
        kdf = (r.get("luks_keyslot") or {}).get("kdf") or {}
        p(f"   LUKS2 target ({kdf.get('type')}, {kdf.get('memory', 0) // 1024} MiB, "
          f"{kdf.get('time')} passes, {kdf.get('cpus')} lanes), "
          + ("without kdumpd" if mode == "luks-control" else "with kdumpd") + ": unlock "
          + (f"completed in {r.get('unlock_seconds')} s" if r.get("unlock_ok")
             else f"FAILED: {r.get('unlock_failure')}")
          + (f"; dump onto it {'IDENTICAL' if r.get('dump_identical') else 'DIFFERENT'} "
             f"({r.get('dump_seconds')} s)" if r.get("unlock_ok") else "")
          + (f"; swap used at the peak {_mib(r.get('swap_used_bytes'))}"
             if mode == "luks-swap" else ""))
    for goal in goal_lines(line):
        p(f"   goal: {goal}")
    bad = checks(results, line.get("luks_expect", "fail"))
    p("   RESULT: " + ("PASS" if not bad else "FAIL: " + "; ".join(bad)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default="6.1", help="installed kernel release or prefix")
    ap.add_argument("--ram", type=int, default=3072, help="guest RAM in MiB")
    ap.add_argument("--crashkernel", default="192M")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default: a new one under /var/tmp)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per guest run")
    ap.add_argument("--factor", type=int, default=3,
                    help="the program uses FACTOR x the memory available before kdumpd")
    ap.add_argument("--passes", type=int, default=1, help="verify-and-rewrite passes")
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--luks-expect", choices=("fail", "complete"), default="fail",
                    help="luks-control must fail (default) or complete (the time anchor, with "
                         "a reservation large enough for Argon2's 1 GiB)")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="kdumpd-e2e-", dir="/var/tmp"))
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        kernel = mk.find_kernel(args.kernel)
        with tempfile.TemporaryDirectory(prefix="work-", dir=args.out) as tmp:
            workdir = Path(tmp)
            programs = build_programs(workdir)
            print(f"e2e: dracut images for {kernel.release}", file=sys.stderr, flush=True)
            images = build_images(kernel, workdir, programs, modes)
            cfg0 = E2EConfig(kernel=kernel, ram_mib=args.ram, crashkernel=args.crashkernel,
                             kaslr=True, four_level=False, smp=args.smp, timeout=args.timeout,
                             out=args.out)
            workload = mk.build_workload(workdir)
            data_image = mk.make_data_image(cfg0, workdir)
            results = {}
            for mode in modes:
                results[mode] = run_mode(mode, args, kernel, workdir, data_image, workload,
                                         images)
            image_info = {k: v.to_json() for k, v in images.items()}
    except (mk.MkVmcoreError, initramfs.BuildError, E2EError, luks.LuksError) as exc:
        print(f"e2e: {exc}", file=sys.stderr)
        return 2
    line = summary_line(args, kernel, images, results)
    line["luks_expect"] = args.luks_expect
    line["wall_seconds"] = round(time.monotonic() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(
        {"summary": line, "modes": results, "images": image_info}, indent=2, default=str) + "\n")
    print_summary(line, results)
    print(f"   details: {args.out}/results.json", file=sys.stderr)
    print(json.dumps(line), flush=True)
    return 0 if line["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
