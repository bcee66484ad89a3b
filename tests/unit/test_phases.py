"""kdumpd.phases: the time to READY split into named steps, from the process's own start."""

from __future__ import annotations

import subprocess
import sys
import time

from kdumpd.phases import Phases, process_age


def test_process_age_of_a_fresh_child_is_small_and_grows() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        time.sleep(0.3)
        first = process_age(child.pid)
        time.sleep(0.3)
        second = process_age(child.pid)
    finally:
        child.kill()
        child.wait()
    assert first is not None and second is not None
    assert 0.2 <= first <= 5.0
    assert second - first >= 0.2


def test_process_age_of_a_missing_process_is_none() -> None:
    assert process_age(2**22 + 12345) is None


def test_phases_add_up_and_total_covers_them() -> None:
    ph = Phases()
    assert "startup" in ph.seconds  # this interpreter's age when Phases was made
    with ph.measure("plan"):
        time.sleep(0.05)
    with ph.measure("plan"):
        time.sleep(0.05)
    ph.add("attach", 0.25)
    assert ph.seconds["plan"] >= 0.1
    assert ph.seconds["attach"] == 0.25
    assert list(ph.to_json()) == ["startup", "plan", "attach"]
    # The total runs from the process's start: at least everything measured in real time.
    assert ph.total() >= ph.seconds["startup"] + ph.seconds["plan"] - 0.002  # rounding


def test_a_failing_phase_is_still_measured() -> None:
    ph = Phases()
    try:
        with ph.measure("selftest"):
            time.sleep(0.02)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert ph.seconds["selftest"] >= 0.02
