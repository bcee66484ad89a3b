#!/usr/bin/env python3
"""Produce a real vmcore by crashing a Debian kernel inside QEMU (TCG).

The oracle tests need vmcores whose every page class (clean and dirty page
cache, buffer-head pages, tmpfs, anonymous 4 KiB, THP, hugetlb, free) is
present and whose ground truth is known.  A synthetic ELF file cannot give
that, so this script boots the distribution kernel with a busybox initramfs
built here, runs a workload, loads a capture kernel with ``kexec -p``,
crashes with sysrq-c and lets the capture kernel copy /proc/vmcore to a raw
virtio disk.  Ground truth taken just before the crash (meminfo, vmstat,
iomem, kpageflags, the workload's frame numbers) goes to a second raw disk.

Usage:
    python3 tests/vm/mkvmcore.py --kernel 6.1 --ram 1024 --crashkernel 256M \
        [--nokaslr] [--4level] [--scenario NAME] --out DIR

--scenario adds one of the safety hazards of tests/vm/scenarios/safety.py
(machine check, hwpoison, balloon, memory hot-remove, pmem as System RAM):
extra QEMU devices, guest hooks around the standard workload, monitor
commands the guest asks for, and a check that the hazard really happened.

Outputs in DIR: vmcore, meminfo, vmstat, iomem.old, iomem.kdump, cmdline,
cmdline.kdump, console.log, info.json and a few extras (kpageflags,
workload-pfns.txt, zoneinfo, buddyinfo, meminfo.kdump).

Only the Python standard library is used; the host needs qemu-system-x86,
the kernel image and modules, busybox-static, kexec-tools, gcc with static
glibc, and e2fsprogs (see requirements-apt.txt next to this file).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
WORKLOAD_SRC = HERE / "workload.c"
SCENARIO_DIR = HERE / "scenarios"

MIB = 1 << 20
# Layout of the meta disk.  Each kernel writes its own region so neither can
# clobber the other; kpageflags (8 bytes per frame) gets the tail.
META_FIRST_OFFSET = 0
META_KDUMP_OFFSET = 8 * MIB
META_KPAGEFLAGS_OFFSET = 16 * MIB
SERIAL_DATA = "kdumpd-data"
SERIAL_META = "kdumpd-meta"
SERIAL_VMCORE = "kdumpd-vmcore"
MARK = "@@KDUMPD"
# Modules the guest needs when they are not built in; dependencies are
# resolved from modules.dep.  crc32c is a soft dependency of ext4/jbd2.
REQUIRED_MODULES = ("virtio_pci", "virtio_blk", "ext4")
OPTIONAL_MODULES = ("crc32c_generic", "crc32c_intel")
DEFAULT_TIMEOUT = 900.0


class MkVmcoreError(Exception):
    """A failure with a one-line reason for the user."""


# --------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Sizes:
    """Workload sizes in MiB, scaled from the guest RAM.

    Roughly: page cache ~15 % (clean read, written-and-synced, dirty),
    tmpfs 5 %, anonymous 10 %, THP 5 %, a hugetlb pool of 64-128 MiB of
    which three quarters are mapped; the rest stays free.
    """

    cache: int
    written: int
    dirty: int
    bdev: int
    tmpfs: int
    anon: int
    thp: int
    hugetlb_pool: int
    hugetlb_used: int

    @classmethod
    def for_ram(cls, ram_mib: int) -> Sizes:
        def pct(permille: int) -> int:
            return max(4, ram_mib * permille // 1000)

        pool = 64 if ram_mib <= 2048 else 128
        return cls(
            cache=pct(120),
            written=pct(20),
            dirty=pct(15),
            bdev=pct(10),
            tmpfs=pct(50),
            anon=pct(100),
            thp=pct(50) // 2 * 2,
            hugetlb_pool=pool,
            hugetlb_used=pool * 3 // 4 // 2 * 2,
        )


@dataclass(frozen=True)
class Kernel:
    """An installed kernel: image plus its module tree."""

    release: str
    image: Path
    modules: Path


@dataclass(frozen=True)
class Config:
    kernel: Kernel
    ram_mib: int
    crashkernel: str
    kaslr: bool
    four_level: bool
    smp: int
    timeout: float
    out: Path
    # A scenarios/safety.py Scenario, or None for the standard vmcores.
    scenario: Any = None
    sizes: Sizes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", Sizes.for_ram(self.ram_mib))

    def common_args(self) -> list[str]:
        """Kernel arguments shared by the first and the capture kernel."""
        args = ["console=ttyS0", "panic=1"]
        if not self.kaslr:
            args.append("nokaslr")
        if self.four_level:
            args.append("no5lvl")
        return args

    def first_cmdline(self) -> str:
        extra = list(self.scenario.first_args) if self.scenario else []
        return " ".join([*self.common_args(), f"crashkernel={self.crashkernel}", *extra])

    def kdump_cmdline(self) -> str:
        # What Debian's kdump-tools appends, minus systemd.
        extra = list(self.scenario.kdump_args) if self.scenario else []
        return " ".join(
            [*self.common_args(), "reset_devices", "nr_cpus=1", "irqpoll", "nousb", *extra]
        )


def script_hash(scenario: str | None = None) -> str:
    """Hash of everything that decides what a generated vmcore contains.

    vmcores.py compares it with the hash recorded in info.json, so editing
    the generator or the workload regenerates the cached vmcores.  A safety
    scenario also depends on the files under scenarios/, which the standard
    vmcores do not, so editing a scenario leaves the standard set current.
    """
    digest = hashlib.sha256()
    paths = [Path(__file__).resolve(), WORKLOAD_SRC]
    if scenario is not None:
        paths += sorted(p for p in SCENARIO_DIR.iterdir() if p.is_file() and p.suffix != ".pyc")
        digest.update(b"scenario\0" + scenario.encode() + b"\0")
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def load_scenarios() -> ModuleType:
    """scenarios/safety.py, imported by path (tests/vm is not a package)."""
    name = "kdumpd_tests_vm_safety"
    if name in sys.modules:
        return sys.modules[name]
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, SCENARIO_DIR / "safety.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _release_key(release: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", release)]


def find_kernel(spec: str) -> Kernel:
    """Pick the newest installed kernel whose release is or starts with `spec`.

    "6.1" matches 6.1.0-56-amd64 but not 6.12.107+deb12-amd64.
    """
    candidates = []
    for image in Path("/boot").glob("vmlinuz-*"):
        release = image.name.removeprefix("vmlinuz-")
        if release == spec or re.match(re.escape(spec) + r"[.\-+]", release):
            modules = Path("/lib/modules") / release
            if (modules / "modules.dep").exists():
                candidates.append(Kernel(release, image, modules))
    if not candidates:
        raise MkVmcoreError(
            f"no installed kernel matches {spec!r} (need /boot/vmlinuz-* "
            "and /lib/modules/*/modules.dep)"
        )
    return max(candidates, key=lambda k: _release_key(k.release))


# --------------------------------------------------------------------------
# initramfs


class Cpio:
    """Minimal writer for the "newc" cpio format the kernel unpacks.

    Written here rather than with cpio(1) so the archive does not depend on
    host file ownership and can hold a /dev/console node without root.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._dirs: set[str] = set()
        self.files: set[str] = set()
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        raw_name = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._ino += 1
        self._chunks.append(_pad4(header + raw_name) + _pad4(data))

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        if not path or path in self._dirs:
            return
        self.mkdir(os.path.dirname(path))
        self._dirs.add(path)
        self._entry(path, 0o040755)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self.files.add(path)
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, 0o120777, target.encode())

    def chardev(self, path: str, major: int, minor: int) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, 0o020600, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = Cpio()
        trailer._entry("TRAILER!!!", 0)
        return b"".join(self._chunks + trailer._chunks)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def resolve_modules(
    kernel: Kernel,
    required: Iterable[str] = REQUIRED_MODULES,
    optional: Iterable[str] = OPTIONAL_MODULES,
) -> list[tuple[Path, bool]]:
    """Module files to insmod, dependencies first, with a "required" flag.

    Modules built into this kernel (modules.builtin) are skipped, which is
    why 6.12 needs fewer than 6.1 (virtio_pci is built in there).
    """
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[_module_name(path)] = (path, rest.split())
    builtin = {
        _module_name(line) for line in (kernel.modules / "modules.builtin").read_text().splitlines()
    }
    order: list[tuple[Path, bool]] = []
    seen: set[str] = set()

    def visit(name: str, required: bool) -> None:
        if name in seen or name in builtin:
            return
        if name not in deps:
            if required:
                raise MkVmcoreError(f"module {name} not found for {kernel.release}")
            return
        seen.add(name)
        path, dep_paths = deps[name]
        for dep in reversed(dep_paths):
            visit(_module_name(dep), required)
        order.append((kernel.modules / path, required))

    for name in optional:
        visit(name, False)
    for name in required:
        visit(name, True)
    return order


def _module_name(path: str) -> str:
    base = os.path.basename(path.strip())
    return base.split(".ko")[0].replace("-", "_")


def read_module(path: Path) -> bytes:
    """Module contents, decompressed because busybox insmod wants plain ELF."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def shared_libraries(binary: Path) -> list[Path]:
    """Shared objects `binary` loads, including the dynamic loader."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def build_workload(workdir: Path) -> Path:
    """Compile workload.c statically so it runs in the libc-less initramfs."""
    return build_c(WORKLOAD_SRC, workdir / "workload")


def build_c(source: Path, binary: Path) -> Path:
    cmd = ["gcc", "-static", "-O2", "-s", "-Wall", "-Wextra", "-o", str(binary), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MkVmcoreError(f"gcc failed: {result.stderr.strip().splitlines()[-1:]}")
    return binary


def guest_conf(cfg: Config) -> str:
    """Shell variables the guest's /init sources."""
    s = cfg.sizes
    values = {
        "CACHE_MIB": s.cache,
        "WRITTEN_MIB": s.written,
        "DIRTY_MIB": s.dirty,
        "BDEV_MIB": s.bdev,
        "TMPFS_MIB": s.tmpfs,
        "ANON_MIB": s.anon,
        "THP_MIB": s.thp,
        "HUGETLB_PAGES": s.hugetlb_pool // 2,
        "HUGETLB_MIB": s.hugetlb_used,
        "KDUMP_APPEND": cfg.kdump_cmdline(),
        "META_FIRST_OFFSET": META_FIRST_OFFSET,
        "META_KDUMP_OFFSET": META_KDUMP_OFFSET,
        "META_KPAGEFLAGS_OFFSET": META_KPAGEFLAGS_OFFSET,
        "SERIAL_DATA": SERIAL_DATA,
        "SERIAL_META": SERIAL_META,
        "SERIAL_VMCORE": SERIAL_VMCORE,
    }
    return "".join(f"{key}='{value}'\n" for key, value in values.items())


INIT_SCRIPT = r"""#!/bin/sh
# /init of the guests built by tests/vm/mkvmcore.py.  The same initramfs
# serves the first kernel (workload, then crash) and the kdump kernel
# (copy /proc/vmcore out); which one we are is told by /proc/vmcore.
export PATH=/bin
set -o pipefail
. /etc/vmcore.conf

mark() { echo "@@KDUMPD $*"; }

fail() {
    mark FAIL "$*"
    poweroff -f
    sleep 10
    echo o > /proc/sysrq-trigger
}

setup() {
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    exec </dev/console >/dev/console 2>&1
    while read -r mod need; do
        insmod "/lib/modules/$mod" || [ "$need" = optional ] || fail "insmod $mod"
    done < /etc/modules.list
    mkdir -p /meta /mnt/data /mnt/tmpfs
}

# Safety scenarios (/etc/scenario.sh) override these hooks.  hmp asks the
# host to run a QEMU monitor command (the host runs only lines that arrive
# whole, up to the #END); the guest then polls for the command's effect.
hmp() { mark HMP "$* #END"; }
scenario_setup() { :; }     # first kernel, before the capture kernel is loaded
scenario_loaded() { :; }    # first kernel, right after it is loaded
scenario_prepare() { :; }   # first kernel, after the workload, before ground truth
scenario_crash() { echo c > /proc/sysrq-trigger; }
scenario_kdump() { :; }     # capture kernel, before /proc/vmcore is copied
capture_vmcore() { /bin/workload rawput "$OUT" 0 < /proc/vmcore > /meta/vmcore.copied; }
load_scenario_modules() {
    while read -r mod need; do
        insmod "/lib/modules/$mod" || [ "$need" = optional ] || fail "insmod $mod"
    done < /etc/scenario-modules.list
}
[ -e /etc/scenario.sh ] && . /etc/scenario.sh

# Prints /dev/vdX for the virtio disk with serial $1, waiting for its probe.
find_disk() {
    i=0
    while [ $i -lt 200 ]; do
        for d in /sys/block/vd*; do
            [ -e "$d/serial" ] || continue
            if [ "$(cat "$d/serial")" = "$1" ] && [ -b "/dev/${d##*/}" ]; then
                echo "/dev/${d##*/}"
                return 0
            fi
        done
        usleep 100000
        i=$((i + 1))
    done
    return 1
}

load_kdump_kernel() {
    if kexec -p -s --initrd=/kdump/initrd.img --append="$KDUMP_APPEND" /kdump/vmlinuz; then
        KEXEC_MODE=kexec_file_load
    elif kexec -p --initrd=/kdump/initrd.img --append="$KDUMP_APPEND" /kdump/vmlinuz; then
        KEXEC_MODE=kexec_load
    else
        fail "kexec -p failed"
    fi
    [ "$(cat /sys/kernel/kexec_crash_loaded)" = 1 ] || fail "capture kernel not loaded"
    rm -rf /kdump
    mark KEXEC_LOADED "$KEXEC_MODE"
}

start_workload() {
    /bin/workload run "$ANON_MIB" "$THP_MIB" "$HUGETLB_MIB" \
        /meta/workload-pfns.txt /run/workload.ready &
    WORKLOAD_PID=$!
    i=0
    while [ ! -e /run/workload.ready ]; do
        kill -0 $WORKLOAD_PID 2>/dev/null || fail "workload died"
        [ $i -lt 6000 ] || fail "workload not ready"
        usleep 100000
        i=$((i + 1))
    done
}

fill_memory() {
    echo madvise > /sys/kernel/mm/transparent_hugepage/enabled
    echo madvise > /sys/kernel/mm/transparent_hugepage/defrag
    echo "$HUGETLB_PAGES" > /proc/sys/vm/nr_hugepages
    mount -t ext4 "$DATA" /mnt/data || fail "mount ext4"
    # Clean page cache.
    cat /mnt/data/cache.bin > /dev/null || fail "read cache.bin"
    # Written back page cache; ext4 keeps buffer heads (PG_private).
    dd if=/mnt/data/cache.bin of=/mnt/data/written.bin bs=1M count="$WRITTEN_MIB" \
        || fail "write written.bin"
    sync
    # Block device page cache, also with buffer heads.
    dd if="$DATA" of=/dev/null bs=1M count="$BDEV_MIB" || fail "read $DATA"
    mount -t tmpfs -o size=$((TMPFS_MIB + 16))m tmpfs /mnt/tmpfs || fail "mount tmpfs"
    dd if=/mnt/data/cache.bin of=/mnt/tmpfs/shmem.bin bs=1M count="$TMPFS_MIB" \
        || fail "write tmpfs"
    start_workload
    # Dirty page cache last and without sync, so it is still dirty at the crash.
    dd if=/mnt/data/cache.bin of=/mnt/data/dirty.bin bs=1M count="$DIRTY_MIB" \
        skip="$WRITTEN_MIB" || fail "write dirty.bin"
}

# Ground truth, written with O_DIRECT so it barely touches the page cache.
save_first_meta() {
    cat /proc/meminfo > /meta/meminfo
    cat /proc/vmstat > /meta/vmstat
    cat /proc/iomem > /meta/iomem
    cat /proc/cmdline > /meta/cmdline
    cat /proc/zoneinfo > /meta/zoneinfo
    cat /proc/buddyinfo > /meta/buddyinfo
    uname -r > /meta/release
    echo "$KEXEC_MODE" > /meta/kexec-mode
    /bin/workload rawput "$META" "$META_KPAGEFLAGS_OFFSET" < /proc/kpageflags \
        > /meta/kpageflags.size || fail "save kpageflags"
    tar -cf - -C /meta . | /bin/workload rawput "$META" "$META_FIRST_OFFSET" > /dev/null \
        || fail "save first-kernel meta"
}

first_kernel() {
    mark BOOTED "$(uname -r)"
    META=$(find_disk "$SERIAL_META") || fail "no meta disk"
    DATA=$(find_disk "$SERIAL_DATA") || fail "no data disk"
    scenario_setup
    load_kdump_kernel
    scenario_loaded
    fill_memory
    scenario_prepare
    mark WORKLOAD_READY
    save_first_meta
    mark CRASHING
    scenario_crash
    sleep 60
    fail "still alive after the crash was triggered"
}

kdump_kernel() {
    mark KDUMP_BOOTED "$(uname -r)"
    META=$(find_disk "$SERIAL_META") || fail "no meta disk"
    OUT=$(find_disk "$SERIAL_VMCORE") || fail "no vmcore disk"
    stat -c %s /proc/vmcore > /meta/vmcore.size
    cat /proc/iomem > /meta/iomem
    cat /proc/cmdline > /meta/cmdline
    cat /proc/meminfo > /meta/meminfo
    scenario_kdump
    mark CAPTURE_START "$(cat /meta/vmcore.size)"
    capture_vmcore || fail "copy /proc/vmcore"
    tar -cf - -C /meta . | /bin/workload rawput "$META" "$META_KDUMP_OFFSET" > /dev/null \
        || fail "save kdump meta"
    mark CAPTURE_DONE "$(cat /meta/vmcore.copied)"
    poweroff -f
    sleep 10
    echo o > /proc/sysrq-trigger
}

setup
if [ -e /proc/vmcore ]; then
    kdump_kernel
elif grep -q elfcorehdr= /proc/cmdline; then
    fail "capture kernel has no /proc/vmcore"
else
    first_kernel
fi
sleep 3600
"""


def base_initramfs(cfg: Config, workload: Path) -> bytes:
    """The initramfs both kernels boot: busybox, kexec, modules, workload."""
    cpio = Cpio()
    for d in ("proc", "sys", "dev", "run", "tmp", "meta", "mnt", "lib64"):
        cpio.mkdir(d)
    cpio.chardev("dev/console", 5, 1)
    for alias in ("sbin", "usr/bin", "usr/sbin"):
        cpio.symlink(alias, "/bin")
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            cpio.symlink(f"bin/{applet}", "busybox")
    add_binary(cpio, Path(shutil.which("kexec") or "/sbin/kexec"))
    cpio.file("bin/workload", workload.read_bytes(), 0o755)
    base_modules = resolve_modules(cfg.kernel)
    cpio.file("etc/modules.list", add_modules(cpio, base_modules, "").encode())
    conf = guest_conf(cfg)
    if cfg.scenario is not None:
        conf += add_scenario(cpio, cfg, base_modules, workload.parent)
    cpio.file("etc/vmcore.conf", conf.encode())
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    return cpio.getvalue()


def add_binary(cpio: Cpio, binary: Path) -> None:
    """A dynamically linked host binary as /bin/NAME, with its libraries."""
    cpio.file(f"bin/{binary.name}", binary.read_bytes(), 0o755)
    for lib in shared_libraries(binary):
        if str(lib).strip("/") not in cpio.files:
            cpio.file(str(lib), lib.resolve().read_bytes(), 0o755)


def add_modules(cpio: Cpio, modules: list[tuple[Path, bool]], subdir: str) -> str:
    """Puts modules under /lib/modules/SUBDIR; returns their insmod list."""
    listing = []
    for path, required in modules:
        name = os.path.join(subdir, path.name.split(".ko")[0] + ".ko")
        cpio.file(f"lib/modules/{name}", read_module(path))
        listing.append(f"{name} {'required' if required else 'optional'}\n")
    return "".join(listing)


def add_scenario(
    cpio: Cpio, cfg: Config, base_modules: list[tuple[Path, bool]], workdir: Path
) -> str:
    """The scenario's hooks, helper, tools and modules; returns extra conf lines.

    Its modules go to /lib/modules/scenario and are loaded by its own hooks
    (load_scenario_modules), only in the first kernel: the capture kernel
    must not, say, inflate a balloon inside its 256 MiB.
    """
    sc = cfg.scenario
    cpio.file("etc/scenario.sh", sc.script().encode(), 0o755)
    if sc.helper:
        cpio.file("bin/hazard", build_c(sc.helper, workdir / "hazard").read_bytes(), 0o755)
    for tool in sc.binaries:
        found = shutil.which(tool)
        if found is None:
            raise MkVmcoreError(f"{tool} not found on the host (see requirements-apt.txt)")
        add_binary(cpio, Path(found))
    loaded = {p for p, _ in base_modules}
    extra = [
        (p, r)
        for p, r in resolve_modules(cfg.kernel, sc.modules, sc.optional_modules)
        if p not in loaded
    ]
    cpio.file("etc/scenario-modules.list", add_modules(cpio, extra, "scenario").encode())
    values = {"SCENARIO": sc.name, **sc.guest_conf(cfg)}
    return "".join(f"{key}='{value}'\n" for key, value in values.items())


def payload_initramfs(cfg: Config, base: bytes) -> bytes:
    """Extra archive for the first kernel only: what `kexec -p` loads."""
    cpio = Cpio()
    cpio.file("kdump/vmlinuz", cfg.kernel.image.read_bytes())
    cpio.file("kdump/initrd.img", base)
    return cpio.getvalue()


# --------------------------------------------------------------------------
# disks


CACHE_SEED = 0x6B64756D


def _cache_block() -> bytes:
    """The 1 MiB of seeded random bytes cache.bin repeats."""
    return random.Random(CACHE_SEED).randbytes(MIB)


def cache_page(index: int, block: bytes | None = None) -> bytes:
    """Page `index` of cache.bin: the block's page with a unique 16-byte header.

    Every page starts with "KDUMPDPC" and its index, so no two pages are
    equal and none is zero (which would make exclusion tests trivial).
    """
    block = _cache_block() if block is None else block
    start = index % (MIB // 4096) * 4096
    return b"KDUMPDPC" + struct.pack("<Q", index) + block[start + 16 : start + 4096]


def make_data_image(cfg: Config, workdir: Path) -> Path:
    """ext4 image holding cache.bin, the source of all page-cache traffic."""
    src = workdir / "data"
    src.mkdir()
    block = _cache_block()
    pages_per_mib = MIB // 4096
    with open(src / "cache.bin", "wb") as out:
        for mib in range(cfg.sizes.cache):
            first = mib * pages_per_mib
            out.write(b"".join(cache_page(first + i, block) for i in range(pages_per_mib)))
    s = cfg.sizes
    size_mib = (s.cache + s.written + s.dirty) * 11 // 10 + 64
    image = workdir / "data.ext4"
    _run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "kdumpd",
            "-d",
            str(src),
            str(image),
            f"{size_mib}M",
        ],
        "mke2fs",
    )
    shutil.rmtree(src)
    return image


def make_sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MkVmcoreError(f"{what} failed: {(result.stderr or result.stdout).strip()}")


# --------------------------------------------------------------------------
# QEMU


@dataclass
class GuestRun:
    """What the host saw of one QEMU run."""

    marks: dict[str, tuple[float, str]]
    returncode: int | None
    timed_out: bool
    started: float

    def at(self, mark: str) -> float | None:
        entry = self.marks.get(mark)
        return None if entry is None else entry[0] - self.started


def qemu_command(
    cfg: Config, initrd: Path, disks: dict[str, Path], workdir: Path, monitor: Path | None = None
) -> list[str]:
    sc = cfg.scenario
    machine = "q35" + (f",{sc.machine_opts}" if sc and sc.machine_opts else "")
    memory = f"{cfg.ram_mib}M" + (f",{sc.memory_opts}" if sc and sc.memory_opts else "")
    cmd = [
        "qemu-system-x86_64",
        "-nodefaults",
        "-no-user-config",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-machine",
        machine,
        "-m",
        memory,
        "-smp",
        str(cfg.smp),
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        f"unix:{monitor},server=on,wait=off" if monitor else "none",
        "-no-reboot",
        "-kernel",
        str(cfg.kernel.image),
        "-initrd",
        str(initrd),
        "-append",
        cfg.first_cmdline(),
    ]
    for index, (serial, path) in enumerate(disks.items()):
        cmd += [
            "-drive",
            f"if=none,id=d{index},file={path},format=raw,cache=unsafe",
            "-device",
            f"virtio-blk-pci,drive=d{index},serial={serial}",
        ]
    if sc is not None:
        cmd += sc.qemu_args(workdir)
    return cmd


class Monitor:
    """The QEMU human monitor (HMP) on a unix socket, for the guest's HMP marks.

    Every command and its reply go to `log`, which ends up as hmp.log.
    """

    PROMPT = b"(qemu) "

    def __init__(self, path: Path, log: Path) -> None:
        self.path = path
        self.log = log
        self.sock: socket.socket | None = None
        self.commands: list[dict[str, Any]] = []

    def _read_prompt(self, sock: socket.socket) -> bytes:
        data = b""
        deadline = time.monotonic() + 30
        while not data.endswith(self.PROMPT):
            if time.monotonic() > deadline:
                raise MkVmcoreError("QEMU monitor did not answer within 30 s")
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                raise MkVmcoreError("QEMU monitor closed the connection")
            data += chunk
        return data[: -len(self.PROMPT)]

    def run(self, command: str, at: float) -> str:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(self.path))
            self._read_prompt(self.sock)  # banner
        self.sock.sendall(command.encode() + b"\n")
        raw = self._read_prompt(self.sock).decode(errors="replace")
        # The monitor echoes the command line (with terminal escapes) first.
        reply = "\n".join(raw.replace("\r", "").splitlines()[1:]).strip()
        self.commands.append({"at": round(at, 2), "command": command, "reply": reply})
        with open(self.log, "a") as f:
            f.write(f"[{at:8.2f}] (qemu) {command}\n" + (f"{reply}\n" if reply else ""))
        return reply

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def run_guest(
    cmd: list[str],
    console: Path,
    timeout: float,
    on_mark: Callable[[str, str, float], None] | None = None,
) -> GuestRun:
    """Runs QEMU, teeing the serial console to `console` and timing marks.

    QEMU is killed after `timeout` seconds so a hung guest cannot hang CI.
    `on_mark(name, argument, seconds)` sees every mark, repeated ones too.
    """
    started = time.monotonic()
    marks: dict[str, tuple[float, str]] = {}
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pending = b""
    timed_out = False
    with open(console, "wb") as log:
        while True:
            remaining = started + timeout - time.monotonic()
            if remaining <= 0:
                timed_out = True
                proc.kill()
                break
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            pending += chunk
            *lines, pending = pending.split(b"\n")
            _scan_marks(lines, marks, on_mark, started)
        _scan_marks([pending], marks, on_mark, started)
    proc.stdout.close()
    returncode = proc.wait()
    return GuestRun(marks, None if timed_out else returncode, timed_out, started)


def _scan_marks(
    lines: Iterable[bytes],
    marks: dict[str, tuple[float, str]],
    on_mark: Callable[[str, str, float], None] | None = None,
    started: float = 0.0,
) -> None:
    now = time.monotonic()
    for raw in lines:
        line = raw.decode(errors="replace")
        match = re.search(MARK + r" (\w+) ?(.*)", line)
        if not match:
            continue
        if match.group(1) not in marks:
            marks[match.group(1)] = (now, match.group(2).strip())
        if on_mark is not None:
            on_mark(match.group(1), match.group(2).strip(), now - started)


def check_run(run: GuestRun, timeout: float) -> None:
    if "CAPTURE_DONE" in run.marks:
        return
    if "FAIL" in run.marks:
        raise MkVmcoreError(f"guest failed: {run.marks['FAIL'][1]}")
    last = max(run.marks, key=lambda m: run.marks[m][0]) if run.marks else "none"
    if run.timed_out:
        raise MkVmcoreError(f"qemu timeout after {timeout:.0f} s (last mark: {last})")
    raise MkVmcoreError(
        f"qemu exited with {run.returncode} before the capture finished (last mark: {last})"
    )


# --------------------------------------------------------------------------
# results


def read_meta(disk: Path, offset: int) -> dict[str, bytes]:
    """Files of the tar archive a guest wrote at `offset` of the meta disk."""
    with open(disk, "rb") as f:
        f.seek(offset)
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                files = {}
                for member in tar:
                    extracted = tar.extractfile(member) if member.isfile() else None
                    if extracted is not None:
                        files[os.path.basename(member.name)] = extracted.read()
                return files
        except tarfile.ReadError as exc:
            raise MkVmcoreError(f"no metadata at offset {offset} of the meta disk: {exc}") from exc


def parse_vmcore(path: Path) -> tuple[int, dict[str, str]]:
    """Expected file size (end of the last segment) and the VMCOREINFO keys."""
    with open(path, "rb") as f:
        ehdr = f.read(64)
        if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
            raise MkVmcoreError(f"{path} is not an ELF64 core")
        (phoff,) = struct.unpack_from("<Q", ehdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        end = 0
        info: dict[str, str] = {}
        for i in range(phnum):
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
                "<IIQQQQ", table, i * phentsize
            )
            end = max(end, p_offset + p_filesz)
            if p_type == 4:  # PT_NOTE
                f.seek(p_offset)
                info.update(_vmcoreinfo(f.read(p_filesz)))
    return end, info


def _vmcoreinfo(notes: bytes) -> dict[str, str]:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, _ = struct.unpack_from("<III", notes, pos)
        if namesz == 0 and descsz == 0:
            break
        name_start = pos + 12
        desc_start = name_start + namesz + (-namesz % 4)
        name = notes[name_start : name_start + namesz].rstrip(b"\0")
        desc = notes[desc_start : desc_start + descsz]
        if name == b"VMCOREINFO":
            text = desc.decode(errors="replace")
            return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        pos = desc_start + descsz + (-descsz % 4)
    return {}


def finish_vmcore(raw: Path, copied: int, dest: Path) -> dict[str, str]:
    """Truncates the output disk to the vmcore and checks it is whole."""
    os.truncate(raw, copied)
    expected, info = parse_vmcore(raw)
    if expected != copied:
        raise MkVmcoreError(f"vmcore truncated: {copied} bytes copied, ELF says {expected}")
    if not info:
        raise MkVmcoreError("vmcore has no VMCOREINFO note")
    raw.rename(dest)
    if shutil.which("fallocate"):
        # Free guest RAM is mostly zero; punching holes saves GiBs of cache.
        subprocess.run(["fallocate", "--dig-holes", str(dest)], check=False)
    return info


def check_paging(cfg: Config, info: dict[str, str]) -> list[str]:
    """The vmcore must reflect the requested KASLR and paging mode."""
    warnings = []
    offset = int(info.get("KERNELOFFSET", "0"), 16)
    if not cfg.kaslr and offset != 0:
        raise MkVmcoreError(f"nokaslr requested but KERNELOFFSET={offset:x}")
    if cfg.kaslr and offset == 0:
        warnings.append("KASLR requested but KERNELOFFSET is 0")
    l5 = info.get("NUMBER(pgtable_l5_enabled)")
    if cfg.four_level and l5 != "0":
        raise MkVmcoreError(f"4-level paging requested but pgtable_l5_enabled={l5}")
    if not cfg.four_level and l5 != "1":
        warnings.append(f"5-level paging expected with -cpu max, pgtable_l5_enabled={l5}")
    return warnings


VMCOREINFO_KEYS = (
    "OSRELEASE",
    "PAGESIZE",
    "KERNELOFFSET",
    "NUMBER(pgtable_l5_enabled)",
    "NUMBER(phys_base)",
    "SYMBOL(_stext)",
)


def write_outputs(
    cfg: Config,
    run: GuestRun,
    first: dict[str, bytes],
    kdump: dict[str, bytes],
    vmcoreinfo: dict[str, str],
    warnings: list[str],
    kpageflags: bytes,
    monitor: Monitor | None = None,
) -> None:
    out = cfg.out
    renames = {
        "meminfo": first,
        "vmstat": first,
        "zoneinfo": first,
        "buddyinfo": first,
        "workload-pfns.txt": first,
    }
    for name, source in renames.items():
        (out / name).write_bytes(source[name])
    (out / "iomem.old").write_bytes(first["iomem"])
    (out / "cmdline").write_bytes(first["cmdline"])
    (out / "iomem.kdump").write_bytes(kdump["iomem"])
    (out / "cmdline.kdump").write_bytes(kdump["cmdline"])
    (out / "meminfo.kdump").write_bytes(kdump["meminfo"])
    (out / "kpageflags").write_bytes(kpageflags)

    def t(mark: str) -> float:
        value = run.at(mark)
        return round(value, 2) if value is not None else -1.0

    info = {
        "kernel_release": first["release"].decode().strip(),
        "kernel_image": str(cfg.kernel.image),
        "kernel_image_sha256": hashlib.sha256(cfg.kernel.image.read_bytes()).hexdigest(),
        "ram_mib": cfg.ram_mib,
        "crashkernel": cfg.crashkernel,
        "kaslr": cfg.kaslr,
        "four_level": cfg.four_level,
        "smp": cfg.smp,
        "machine": "q35",
        "cpu": "max",
        "qemu": _qemu_version(),
        "kexec_mode": first["kexec-mode"].decode().strip(),
        "cmdline": first["cmdline"].decode().strip(),
        "cmdline_kdump": kdump["cmdline"].decode().strip(),
        "vmcore_size": int(kdump["vmcore.copied"]),
        "kpageflags_size": len(kpageflags),
        "sizes_mib": asdict(cfg.sizes),
        "timings": {
            "boot": t("BOOTED"),
            "workload": round(t("CRASHING") - t("BOOTED"), 2),
            "crash": round(t("KDUMP_BOOTED") - t("CRASHING"), 2),
            "capture": round(t("CAPTURE_DONE") - t("KDUMP_BOOTED"), 2),
            "total": t("CAPTURE_DONE"),
        },
        "vmcoreinfo": {k: vmcoreinfo[k] for k in VMCOREINFO_KEYS if k in vmcoreinfo},
        "warnings": warnings,
        "script_hash": script_hash(cfg.scenario.name if cfg.scenario else None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cfg.scenario is not None:
        # Raises when the hazard did not happen, before info.json exists,
        # so a vmcore without its hazard never looks complete.
        hmp = monitor.commands if monitor is not None else []
        try:
            hazard = cfg.scenario.check(cfg, first, kdump, info, hmp)
        except load_scenarios().HazardMissing as exc:
            raise MkVmcoreError(f"{cfg.scenario.name}: hazard did not happen: {exc}") from exc
        info["scenario"] = cfg.scenario.name
        info["hazard"] = hazard
        info["hmp"] = hmp
        info["memory"] = cfg.scenario.memory_opts or ""
        if cfg.scenario.machine_opts:
            info["machine"] = f"q35,{cfg.scenario.machine_opts}"
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def _qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


# --------------------------------------------------------------------------
# main


OUTPUT_FILES = (
    "vmcore",
    "meminfo",
    "vmstat",
    "zoneinfo",
    "buddyinfo",
    "workload-pfns.txt",
    "iomem.old",
    "iomem.kdump",
    "cmdline",
    "cmdline.kdump",
    "meminfo.kdump",
    "kpageflags",
    "info.json",
    "console.log",
    "hmp.log",
)


def generate(cfg: Config) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    names = list(OUTPUT_FILES) + (list(cfg.scenario.output_files()) if cfg.scenario else [])
    for name in names:
        (cfg.out / name).unlink(missing_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix=".work-", dir=cfg.out) as tmp,
        tempfile.TemporaryDirectory(prefix="mkvmcore-mon-") as sockdir,
    ):
        # The monitor socket lives in /tmp: unix socket paths are short.
        workdir = Path(tmp)
        workload = build_workload(workdir)
        base = base_initramfs(cfg, workload)
        initrd = workdir / "initrd.img"
        initrd.write_bytes(base + payload_initramfs(cfg, base))
        extra_mib = cfg.scenario.extra_mib if cfg.scenario else 0
        kpf_room = (cfg.ram_mib + 4096 + extra_mib) * MIB // 4096 * 8
        disks = {
            SERIAL_DATA: make_data_image(cfg, workdir),
            SERIAL_META: make_sparse(workdir / "meta.raw", META_KPAGEFLAGS_OFFSET + kpf_room),
            SERIAL_VMCORE: make_sparse(
                workdir / "vmcore.raw", (cfg.ram_mib + extra_mib + 64) * MIB
            ),
        }
        console = cfg.out / "console.log"
        monitor = None
        on_mark = None
        if cfg.scenario is not None:
            monitor = Monitor(Path(sockdir) / "hmp.sock", cfg.out / "hmp.log")
            on_mark = _hmp_handler(monitor)
        cmd = qemu_command(cfg, initrd, disks, workdir, monitor.path if monitor else None)
        try:
            run = run_guest(cmd, console, cfg.timeout, on_mark)
        finally:
            if monitor is not None:
                monitor.close()
        check_run(run, cfg.timeout)
        first = read_meta(disks[SERIAL_META], META_FIRST_OFFSET)
        kdump = read_meta(disks[SERIAL_META], META_KDUMP_OFFSET)
        kpf_size = int(first["kpageflags.size"])
        with open(disks[SERIAL_META], "rb") as f:
            f.seek(META_KPAGEFLAGS_OFFSET)
            kpageflags = f.read(kpf_size)
        vmcoreinfo = finish_vmcore(
            disks[SERIAL_VMCORE], int(kdump["vmcore.copied"]), cfg.out / "vmcore"
        )
        warnings = check_paging(cfg, vmcoreinfo)
        write_outputs(cfg, run, first, kdump, vmcoreinfo, warnings, kpageflags, monitor)


def _hmp_handler(monitor: Monitor) -> Callable[[str, str, float], None]:
    """Runs the monitor command of every "HMP" mark the guest prints.

    A failure is logged, not raised: QEMU must keep running, and the guest,
    which polls for the command's effect, then fails with its own reason.
    """

    def handle(name: str, arg: str, at: float) -> None:
        if name != "HMP":
            return
        try:
            if not arg.endswith("#END"):
                raise MkVmcoreError("garbled on the console (kernel output in the line?)")
            monitor.run(arg.removesuffix("#END").strip(), at)
        except (OSError, MkVmcoreError) as exc:
            monitor.commands.append({"at": round(at, 2), "command": arg, "error": str(exc)})
            with open(monitor.log, "a") as f:
                f.write(f"[{at:8.2f}] (qemu) {arg}\nERROR: {exc}\n")

    return handle


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kernel", help="release or prefix, e.g. 6.1 or 6.12 (default: the scenario's)"
    )
    parser.add_argument("--ram", type=int, default=1024, help="guest RAM in MiB")
    parser.add_argument("--crashkernel", default="256M")
    parser.add_argument("--nokaslr", action="store_true")
    parser.add_argument(
        "--4level",
        dest="four_level",
        action="store_true",
        help="boot with no5lvl (default: 5-level paging from -cpu max)",
    )
    parser.add_argument("--smp", type=int, default=2)
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="kill QEMU after this many seconds"
    )
    parser.add_argument(
        "--scenario",
        help="safety scenario: " + ", ".join(load_scenarios().SCENARIOS),
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    scenario = None
    if args.scenario is not None:
        scenarios = load_scenarios().SCENARIOS
        if args.scenario not in scenarios:
            parser.error(f"unknown scenario {args.scenario!r}; known: {', '.join(scenarios)}")
        scenario = scenarios[args.scenario]
    kernel = args.kernel or (scenario.kernel if scenario else None)
    if kernel is None:
        parser.error("--kernel is required without --scenario")
    return Config(
        kernel=find_kernel(kernel),
        ram_mib=args.ram,
        crashkernel=args.crashkernel,
        kaslr=not args.nokaslr,
        four_level=args.four_level,
        smp=args.smp,
        timeout=args.timeout,
        out=args.out.resolve(),
        scenario=scenario,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        generate(cfg)
    except MkVmcoreError as exc:
        print(f"mkvmcore: {exc}", file=sys.stderr)
        console = Path(argv_out(argv)) / "console.log"
        if console.exists():
            print(f"mkvmcore: console log: {console}", file=sys.stderr)
        return 1
    info = json.loads((cfg.out / "info.json").read_text())
    print(
        f"mkvmcore: {cfg.out}/vmcore {info['vmcore_size']} bytes, "
        f"timings {info['timings']}, console log: {cfg.out / 'console.log'}"
    )
    for warning in info["warnings"]:
        print(f"mkvmcore: warning: {warning}", file=sys.stderr)
    return 0


def argv_out(argv: list[str] | None) -> str:
    """The --out value, for error reporting before/after parsing failed."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--out" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return "."


if __name__ == "__main__":
    sys.exit(main())
