"""The safety gate: turn facts about the crash, the collector and the host into a decision.

Pure. Either a refusal (one line, naming the rule) or what planning must leave out: classes
the collector would still dump, physical ranges that are not old memory to touch, and the
shortest extent the collector's output format really omits. Nothing here can add memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdumpd.crash.facts import CrashFacts
from kdumpd.errors import ConfigError
from kdumpd.mm.classify import PageClass
from kdumpd.mm.pagelayout import PageLayout
from kdumpd.safety.collector import MIN_ELF_EXCLUDED_RUN, Collector, withheld_classes
from kdumpd.safety.hostfacts import ForbiddenRange, HostFacts

__all__ = ["MCE_POLICIES", "Decision", "decide"]

MCE_POLICIES = ("refuse", "exclude-range")
# With the "exclude-range" policy, memory this close to a reported error address is left alone
# (a DIMM error rarely stays inside one page; 2 MiB also covers a huge-page mapping).
MCE_EXCLUDE_BYTES = 2 << 20


@dataclass(frozen=True, slots=True)
class Decision:
    """What planning must respect; ``refusal`` set means: reuse nothing, exit non-zero."""

    dump_level: int
    refusal: str | None = None
    withheld: dict[PageClass, str] = field(default_factory=dict)
    forbidden: tuple[ForbiddenRange, ...] = ()
    min_run_pages: int = 1
    rules: list[str] = field(default_factory=list)
    # Rule 4's fallback when the capture kernel's NFIT is not known: withhold the memory
    # sections added after boot (kmem persistent memory and hot-added DIMMs look like that).
    withhold_hotplugged: bool = False


def decide(
    *,
    collector: Collector,
    collector_source: str,
    collector_version: str | None,
    layout: PageLayout,
    crash: CrashFacts,
    host: HostFacts | None,
    mce_policy: str = "refuse",
) -> Decision:
    if mce_policy not in MCE_POLICIES:
        raise ConfigError(f"mce policy {mce_policy!r} is not one of {', '.join(MCE_POLICIES)}")
    rules: list[str] = [f"collector: {collector.describe()} from {collector_source}"]
    level = collector.dump_level
    if level is None:
        return Decision(0, f"rule 6 (dump needs it): the collector is {collector.kind!r} "
                           f"({collector.raw!r} from {collector_source}), which dumps every "
                           "page", rules=rules)
    if level & 0b11110 == 0:
        return Decision(level, f"rule 6 (dump needs it): dump level {level} excludes no page "
                               "class that kdumpd can reuse", rules=rules)
    if crash.nocoredump_note:
        return Decision(level, f"rule 1 (hardware memory error): the vmcore carries a "
                               f"{crash.nocoredump_note!r} note", rules=rules)
    forbidden: list[ForbiddenRange] = list(host.forbidden) if host else []
    if host is None or not host.iomem_known:
        rules.append("rule 8 not checked offline: the capture kernel's own RAM and elfcorehdr "
                     "are unknown (give --host-iomem and --host-cmdline)")
    hotplugged = host is None or not host.nfit_known
    if hotplugged:
        rules.append("rule 4 not checked offline: the capture kernel's ACPI NFIT is unknown "
                     "(give --host-nfit); memory sections hot-added after boot are withheld")
    if crash.hardware_error:
        if mce_policy == "refuse" or not crash.error_paddrs:
            why = "" if mce_policy == "refuse" else " and no error address was reported"
            return Decision(level, "rule 1 (hardware memory error): the crashed kernel "
                                   f"logged {crash.evidence!r}{why}", rules=rules)
        for paddr in crash.error_paddrs:
            start = paddr & ~(MCE_EXCLUDE_BYTES - 1)
            forbidden.append(ForbiddenRange(start, start + MCE_EXCLUDE_BYTES,
                                            f"hardware error reported at {paddr:#x}", 1))
        rules.append(f"rule 1: hardware error, excluding {len(crash.error_paddrs)} ranges")
    withheld = {}
    if collector.kind == "makedumpfile":
        withheld = withheld_classes(collector_version, layout)
    # The withheld classes are named, with their page counts, by the plan's ``withheld``.
    min_run = MIN_ELF_EXCLUDED_RUN if collector.elf_output else 1
    if collector.elf_output:
        rules.append(f"rule 6: ELF output keeps excluded runs < {MIN_ELF_EXCLUDED_RUN} pages")
    return Decision(level, None, withheld, tuple(forbidden), min_run, rules, hotplugged)
