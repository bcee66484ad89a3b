"""Test tiers, and CI's rule that a skipped tier is a failure.

Tier markers follow the directories. With KDUMPD_TEST_REQUIRE_ALL=1 (set by scripts/test in
CI) a test that would skip for a missing prerequisite fails instead, as drgn's force flag does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "daemon"))
sys.path.insert(0, str(TOP))

REQUIRE_ALL = os.environ.get("KDUMPD_TEST_REQUIRE_ALL") == "1"
_TIERS = ("unit", "integration", "oracle", "vm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(TOP / "tests")
        tier = rel.parts[0]
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, tier))


def require(condition: bool, why: str) -> None:
    """Skip when a prerequisite is missing, or fail in CI where every tier must run."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"prerequisite missing in CI: {why}")
    pytest.skip(why)


def pytest_report_header(config: pytest.Config) -> str:
    return f"kdumpd tiers: {', '.join(_TIERS)}; skips are failures: {REQUIRE_ALL}"
