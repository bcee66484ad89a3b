"""``runconf.json``: what ``kdumpd serve`` hands the nbdkit plugin, written into the run directory.

One JSON file holds everything the plugin needs and nothing it must compute: the plan's
extents (half-open pfn ranges), the PT_LOAD :class:`~kdumpd.units.PhysRange` list (physical ->
file offset), the resolved backend, copies, device size, scrub rate, status file and the path
of the package's parent directory (so that nbdkit's embedded interpreter imports the same
``kdumpd`` as the CLI, whatever venv the CLI runs from). The plugin reads it with the standard
``json`` module before it imports ``kdumpd``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kdumpd.errors import ConfigError
from kdumpd.jsonfile import atomic_write_json, read_json
from kdumpd.units import Extent, PhysRange

__all__ = ["RUNCONF_VERSION", "RunConf"]

RUNCONF_VERSION = 1


@dataclass(frozen=True, slots=True)
class RunConf:
    """What the plugin serves; see the module docstring."""

    run_dir: str
    package_dir: str
    backend: str  # resolved: "image:FILE", "devmem" or "vmcore:PATH"
    extents: tuple[Extent, ...]
    ranges: tuple[PhysRange, ...]
    copies: int
    size_bytes: int
    min_distance_bytes: int
    scrub_rate: int  # bytes of old memory per second; 0 = no scrubber
    status_interval: float
    protect: bool
    log_level: str = "info"
    selftest: bool = True
    mlock: str = "off"  # "onfault": the plugin locks its pages as they fault in
    plan_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def status_path(self) -> str:
        return os.path.join(self.run_dir, "status.json")

    @property
    def error_path(self) -> str:
        return os.path.join(self.run_dir, "error.json")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RUNCONF_VERSION,
            "run_dir": self.run_dir,
            "package_dir": self.package_dir,
            "backend": self.backend,
            "extents": [[e.start_pfn, e.end_pfn] for e in self.extents],
            "ranges": [[r.start_paddr, r.end_paddr, r.offset] for r in self.ranges],
            "copies": self.copies,
            "size_bytes": self.size_bytes,
            "min_distance_bytes": self.min_distance_bytes,
            "scrub_rate": self.scrub_rate,
            "status_interval": self.status_interval,
            "protect": self.protect,
            "log_level": self.log_level,
            "selftest": self.selftest,
            "mlock": self.mlock,
            "plan": self.plan_summary,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str) -> RunConf:
        if doc.get("version") != RUNCONF_VERSION:
            raise ConfigError(f"{source}: run configuration version {doc.get('version')!r}, "
                              f"expected {RUNCONF_VERSION}")
        try:
            return cls(
                run_dir=str(doc["run_dir"]),
                package_dir=str(doc["package_dir"]),
                backend=str(doc["backend"]),
                extents=tuple(Extent(int(s), int(e)) for s, e in doc["extents"]),
                ranges=tuple(PhysRange(int(s), int(e), int(o)) for s, e, o in doc["ranges"]),
                copies=int(doc["copies"]),
                size_bytes=int(doc["size_bytes"]),
                min_distance_bytes=int(doc["min_distance_bytes"]),
                scrub_rate=int(doc["scrub_rate"]),
                status_interval=float(doc["status_interval"]),
                protect=bool(doc["protect"]),
                log_level=str(doc.get("log_level", "info")),
                selftest=bool(doc.get("selftest", True)),
                mlock=str(doc.get("mlock", "off")),
                plan_summary=dict(doc.get("plan", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: bad run configuration: {exc!r}") from None

    def write(self, path: str) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def read(cls, path: str) -> RunConf:
        return cls.from_json(read_json(path), path)
