"""Planning: which pages of the crashed machine kdumpd may reuse, and why.

``pipeline`` is the walk vmcore -> xlat -> mm -> extents that makes a ``Plan``; ``gated`` puts
that walk behind the safety rules and is the only way the daemon gets a plan it may write
into. The names below are re-exported so callers can say ``from kdumpd.plan import X``.
"""

from kdumpd.plan.gated import (
    DEFAULT_COLLECTOR,
    GatedPlan,
    collector_version,
    gated_plan,
    host_facts_here,
)
from kdumpd.plan.pipeline import Plan, Progress, make_plan

__all__ = [
    "DEFAULT_COLLECTOR",
    "GatedPlan",
    "Plan",
    "Progress",
    "collector_version",
    "gated_plan",
    "host_facts_here",
    "make_plan",
]
