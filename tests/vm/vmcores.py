#!/usr/bin/env python3
"""Catalogue of the QEMU-made vmcores the oracle and safety tests run against.

Each entry names one configuration of tests/vm/mkvmcore.py: STANDARD (every
page class, crashed with sysrq-c) and SAFETY (one real hazard each, see
scenarios/safety.py: fatal machine check, hwpoison, balloon, memory
hot-remove, pmem as System RAM).  ``ensure(name)``
returns a directory holding that vmcore, generating it when it is missing or
was made by a different version of the generator (the script hash recorded
in info.json), so tests never silently run against a stale capture.

Generating takes about a minute per 1 GiB guest under TCG, so results are
cached outside the work tree: $KDUMPD_VMCORE_CACHE, else
/var/cache/kdumpd-tests/vmcores.  vmcore files are never committed.

CLI:
    python3 tests/vm/vmcores.py ensure-all [--cache-dir DIR]      # STANDARD
    python3 tests/vm/vmcores.py ensure-safety [--cache-dir DIR]   # SAFETY
    python3 tests/vm/vmcores.py ensure NAME... [--cache-dir DIR]
    python3 tests/vm/vmcores.py list [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
MKVMCORE = HERE / "mkvmcore.py"
DEFAULT_CACHE_DIR = Path("/var/cache/kdumpd-tests/vmcores")

# Workload regions, as numbered by workload.c.
REGION_ANON = 1
REGION_THP = 2
REGION_HUGETLB = 3
_PATTERN_SEED = 0x9E3779B97F4A7C15


class VmcoreUnavailable(Exception):
    """A vmcore could not be generated; the message says why and where to look."""


@dataclass(frozen=True)
class VmcoreSpec:
    """One standard configuration of mkvmcore.py."""

    name: str
    kernel: str
    ram_mib: int
    crashkernel: str
    kaslr: bool
    four_level: bool
    timeout: float = 900.0
    # A safety scenario of scenarios/safety.py, None for the standard set.
    scenario: str | None = None

    def mkvmcore_args(self, out: Path) -> list[str]:
        args = [
            "--kernel",
            self.kernel,
            "--ram",
            str(self.ram_mib),
            "--crashkernel",
            self.crashkernel,
            "--timeout",
            str(self.timeout),
            "--out",
            str(out),
        ]
        if not self.kaslr:
            args.append("--nokaslr")
        if self.four_level:
            args.append("--4level")
        if self.scenario is not None:
            args += ["--scenario", self.scenario]
        return args

    def matches(self, info: dict[str, Any]) -> bool:
        """Whether a recorded info.json was produced from this configuration."""
        release = str(info.get("kernel_release", ""))
        return (
            (release == self.kernel or release.startswith(self.kernel + "."))
            and info.get("ram_mib") == self.ram_mib
            and info.get("crashkernel") == self.crashkernel
            and info.get("kaslr") == self.kaslr
            and info.get("four_level") == self.four_level
            and info.get("scenario") == self.scenario
        )


STANDARD: tuple[VmcoreSpec, ...] = (
    # -cpu max offers LA57, so the default is 5-level paging.
    VmcoreSpec("6.1-1g-kaslr", "6.1", 1024, "256M", kaslr=True, four_level=False),
    VmcoreSpec("6.1-1g-nokaslr-4l", "6.1", 1024, "256M", kaslr=False, four_level=True),
    VmcoreSpec("6.12-1g-kaslr", "6.12", 1024, "256M", kaslr=True, four_level=False),
    VmcoreSpec("6.12-1g-nokaslr-4l", "6.12", 1024, "256M", kaslr=False, four_level=True),
    # 5 GiB: on q35 3 GiB of RAM sits above 4 GiB, exercising high frames.
    VmcoreSpec("6.1-5g-kaslr", "6.1", 5120, "256M", kaslr=True, four_level=False, timeout=2400.0),
)
# One real hazard each; not in STANDARD (the oracle tests would misread them).
# The name is the scenario's.  Ground truth: info.json["hazard"] plus the
# files listed in scenarios/safety.py and README.md.
SAFETY: tuple[VmcoreSpec, ...] = tuple(
    VmcoreSpec(name, "6.1", 1024, "256M", kaslr=True, four_level=False, scenario=name)
    for name in ("mce-6.1", "hwpoison-6.1", "balloon-6.1", "hotplug-6.1", "pmem-kmem-6.1")
)
CATALOGUE: dict[str, VmcoreSpec] = {spec.name: spec for spec in STANDARD + SAFETY}


def default_cache_dir() -> Path:
    env = os.environ.get("KDUMPD_VMCORE_CACHE")
    return Path(env) if env else DEFAULT_CACHE_DIR


def _load_mkvmcore() -> ModuleType:
    """Imports mkvmcore.py by path: tests/vm is not a package."""
    name = "kdumpd_tests_mkvmcore"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MKVMCORE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def script_hash(scenario: str | None = None) -> str:
    """The generator's hash; a scenario's also covers tests/vm/scenarios/."""
    return str(_load_mkvmcore().script_hash(scenario))


def load_info(directory: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((directory / "info.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_current(spec: VmcoreSpec, directory: Path) -> bool:
    """A cached vmcore is reusable only if complete, same config, same generator."""
    info = load_info(directory)
    if info is None or not (directory / "vmcore").is_file():
        return False
    if (directory / "vmcore").stat().st_size != info.get("vmcore_size"):
        return False
    return spec.matches(info) and info.get("script_hash") == script_hash(spec.scenario)


@contextmanager
def _locked(cache_dir: Path, name: str) -> Iterator[None]:
    """Serialises generation of one vmcore across parallel test workers."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def generate(spec: VmcoreSpec, cache_dir: Path) -> Path:
    """Runs mkvmcore.py into a scratch directory, then swaps it into place.

    A failed attempt is kept as NAME.failed (console.log inside) for
    debugging; the previous good directory, if any, is only replaced on
    success.
    """
    final = cache_dir / spec.name
    scratch = cache_dir / f".{spec.name}.tmp"
    failed = cache_dir / f"{spec.name}.failed"
    shutil.rmtree(scratch, ignore_errors=True)
    cmd = [sys.executable, str(MKVMCORE), *spec.mkvmcore_args(scratch)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(failed, ignore_errors=True)
        if scratch.exists():
            scratch.rename(failed)
        reason = (result.stderr.strip().splitlines() or ["mkvmcore.py failed"])[0]
        raise VmcoreUnavailable(f"{spec.name}: {reason} (console log: {failed}/console.log)")
    shutil.rmtree(final, ignore_errors=True)
    scratch.rename(final)
    shutil.rmtree(failed, ignore_errors=True)
    return final


def ensure(name: str, cache_dir: Path | None = None) -> Path:
    """Directory holding vmcore `name`, generating it if missing or stale."""
    spec = CATALOGUE.get(name)
    if spec is None:
        raise KeyError(f"unknown vmcore {name!r}; known: {', '.join(CATALOGUE)}")
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    directory = cache_dir / name
    if is_current(spec, directory):
        return directory
    with _locked(cache_dir, name):
        if is_current(spec, directory):
            return directory
        return generate(spec, cache_dir)


# --------------------------------------------------------------------------
# ground-truth helpers for tests


def workload_page(region: int, index: int) -> bytes:
    """The 4 KiB page workload.c wrote at `index` of `region` (see its header)."""
    words = [_PATTERN_SEED ^ (region << 56) ^ (index << 12) ^ j for j in range(2, 512)]
    return b"KDUMPDWL" + struct.pack("<Q", (region << 32) | index) + struct.pack("<510Q", *words)


def cache_page(index: int) -> bytes:
    """Page `index` of cache.bin, the file behind the page-cache workload."""
    return bytes(_load_mkvmcore().cache_page(index))


@dataclass(frozen=True)
class PfnRun:
    """Frames [first_pfn, first_pfn + count) back pages first_index.. of a region."""

    region: int
    first_index: int
    first_pfn: int
    count: int


def workload_pfns(directory: Path) -> list[PfnRun]:
    runs = []
    for line in (directory / "workload-pfns.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            region, first_index, first_pfn, count = (int(v) for v in line.split())
            runs.append(PfnRun(region, first_index, first_pfn, count))
    return runs


def meminfo(directory: Path, name: str = "meminfo") -> dict[str, int]:
    """/proc/meminfo of the first kernel just before the crash, in kB (or pages)."""
    values = {}
    for line in (directory / name).read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key.strip()] = int(rest.split()[0])
    return values


def kpageflags(directory: Path) -> memoryview:
    """Per-frame /proc/kpageflags (u64) sampled just before the crash."""
    data = (directory / "kpageflags").read_bytes()
    return memoryview(data).cast("Q")


def hazard(directory: Path) -> dict[str, Any]:
    """info.json["hazard"] of a SAFETY vmcore: what happened, where (see safety.py)."""
    info = load_info(directory) or {}
    value = info.get("hazard")
    if not isinstance(value, dict):
        raise KeyError(f"{directory} is not a safety vmcore (no hazard in info.json)")
    return value


def hwpoison_pfns(directory: Path) -> dict[int, str]:
    """pfn -> kind of every KPF_HWPOISON frame at the crash (hwpoison-pfns.txt)."""
    pfns = {}
    for line in (directory / "hwpoison-pfns.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            pfn, kind = line.split()
            pfns[int(pfn)] = kind
    return pfns


def offline_pfn_runs(directory: Path) -> list[tuple[int, int]]:
    """(first_pfn, count) runs of KPF_OFFLINE (ballooned) frames (offline-pfns.txt)."""
    out = []
    for line in (directory / "offline-pfns.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            first, count = line.split()
            out.append((int(first), int(count)))
    return out


def nfit_bytes(directory: Path, which: str = "kdump") -> bytes:
    """Raw ACPI NFIT of pmem-kmem-6.1 as /sys/firmware/acpi/tables showed it.

    `which` is "kdump" (the capture kernel, nfit.kdump.bin) or "old" (the first
    kernel, nfit.old.bin).  Several tables (NFIT1, NFIT2, ...) are concatenated,
    each with its own ACPI header and length.  b"" when that kernel had no NFIT
    (then info.json["hazard"]["nfit_in_kdump"] is false for "kdump").
    """
    if which not in ("kdump", "old"):
        raise ValueError(f"which must be 'kdump' or 'old', not {which!r}")
    path = directory / f"nfit.{which}.bin"
    return path.read_bytes() if path.exists() else b""


# --------------------------------------------------------------------------
# CLI


def _describe(name: str, directory: Path, seconds: float, cached: bool) -> str:
    info = load_info(directory) or {}
    timings = info.get("timings", {})
    vmci = info.get("vmcoreinfo", {})
    how = "cached" if cached else f"generated in {seconds:.0f} s"
    return (
        f"{name}: ok ({how}) guest boot {timings.get('boot')} s, workload "
        f"{timings.get('workload')} s, crash {timings.get('crash')} s, capture "
        f"{timings.get('capture')} s; vmcore {info.get('vmcore_size')} bytes, "
        f"l5={vmci.get('NUMBER(pgtable_l5_enabled)')} "
        f"KERNELOFFSET={vmci.get('KERNELOFFSET')} {directory}"
        + (f" hazard: {info['hazard'].get('summary')}" if "hazard" in info else "")
    )


def _ensure_and_report(name: str, cache_dir: Path) -> bool:
    cached = is_current(CATALOGUE[name], cache_dir / name)
    started = time.monotonic()
    try:
        directory = ensure(name, cache_dir)
    except VmcoreUnavailable as exc:
        print(f"{name}: FAILED after {time.monotonic() - started:.0f} s: {exc}", flush=True)
        return False
    print(_describe(name, directory, time.monotonic() - started, cached), flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="QEMU vmcores for the oracle and safety tests.")
    parser.add_argument("command", choices=("ensure-all", "ensure-safety", "ensure", "list"))
    parser.add_argument("names", nargs="*")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()
    if args.command == "list":
        for spec in STANDARD + SAFETY:
            state = "current" if is_current(spec, cache_dir / spec.name) else "missing/stale"
            kind = f" (safety: {spec.scenario})" if spec.scenario else ""
            print(f"{spec.name}: {state} {cache_dir / spec.name}{kind}")
        return 0
    if args.command == "ensure-all":
        names = [spec.name for spec in STANDARD]
    elif args.command == "ensure-safety":
        names = [spec.name for spec in SAFETY]
    else:
        names = args.names
    unknown = [n for n in names if n not in CATALOGUE]
    if unknown or not names:
        parser.error(f"unknown or missing names: {unknown}; known: {', '.join(CATALOGUE)}")
    results = [_ensure_and_report(name, cache_dir) for name in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
