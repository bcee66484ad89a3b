"""The one teardown undoes exactly what state.json says is set up, in order (swapoff, umount,
nbd-client -d, nbdkit), runs every step even after a failure, redoes nothing on a second call,
and leaves the report and status but not state.json, runconf.json or a stale socket.

The commands are real executables on PATH that record their arguments (this machine cannot
attach /dev/nbdX without root and the nbd module; tests/vm runs the real ones), and nbdkit is
a real child process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from kdumpd.serve.procs import alive, stop_process
from kdumpd.serve.rundir import State, read_state, release_pidfile, run_dir_lock
from kdumpd.serve.teardown import teardown


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """swapoff, umount and nbd-client that append their argv to calls.log; a tool named in
    FAIL exits 1 with a message."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("swapoff", "umount", "nbd-client"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n'
                          f'case " $FAIL " in *" {name} "*) echo "{name}: busy" >&2; exit 1;; '
                          "esac\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("FAIL", raising=False)
    return log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("state.json", "runconf.json", "status.json", "report.json"):
        (run / name).write_text("{}")
    return run


def test_swap_run_is_undone_in_order_once(tmp_path: Path, tools: Path) -> None:
    run = _run_dir(tmp_path)
    nbdkit = subprocess.Popen(["sleep", "60"])
    state = State(socket=str(run / "kdumpd.sock"), use_as="swap", device="/dev/nbd7",
                  swap_on=True, nbdkit_pid=nbdkit.pid)
    seen: list[list[str]] = []
    errors = teardown(str(run), state, seen.append)
    assert errors == [] and seen == [[]]
    assert _calls(tools) == ["swapoff /dev/nbd7", "nbd-client -d /dev/nbd7"]
    assert nbdkit.returncode is None and not alive(nbdkit.pid)  # reaped by teardown
    assert sorted(p.name for p in run.iterdir()) == ["report.json", "status.json"]
    assert (state.device, state.swap_on, state.nbdkit_pid) == (None, False, None)
    assert teardown(str(run), state) == [] and len(_calls(tools)) == 2  # nothing left to undo


def test_a_failed_step_does_not_stop_the_rest(tmp_path: Path, tools: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_dir(tmp_path)
    monkeypatch.setenv("FAIL", "umount")
    state = State(socket="", use_as="scratch", device="/dev/nbd3", mounted="/mnt/x")
    errors = teardown(str(run), state)
    assert len(errors) == 1 and errors[0].startswith("umount: ") and "busy" in errors[0]
    assert _calls(tools) == ["umount /mnt/x", "nbd-client -d /dev/nbd3"]
    assert state.mounted == "/mnt/x" and state.device is None  # a retry redoes only umount
    monkeypatch.delenv("FAIL")
    assert teardown(str(run), state) == []
    assert _calls(tools)[2:] == ["umount /mnt/x"]


def test_nbdkit_dying_badly_is_a_teardown_error(tmp_path: Path, tools: Path) -> None:
    run = _run_dir(tmp_path)
    child = subprocess.Popen(["sh", "-c", "exit 3"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    errors = teardown(str(run), State(socket="", nbdkit_pid=child.pid))
    assert errors == ["nbdkit exited with status 3"]


def test_stop_process_of_another_parents_child(tmp_path: Path) -> None:
    # kdumpd stop after the daemon died: nbdkit is not our child; SIGTERM it and wait.
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    assert stop_process(grandchild, timeout=10) is None
    assert not alive(grandchild)
    proc.send_signal(signal.SIGTERM)
    proc.wait()


def test_only_a_stale_socket_is_removed(tmp_path: Path, tools: Path) -> None:
    run = _run_dir(tmp_path)
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(run / "live.sock"))
    live.listen()
    teardown(str(run), State(socket=str(run / "live.sock")))
    assert (run / "live.sock").exists()
    live.close()  # nobody listens now: stale
    teardown(str(run), State(socket=str(run / "live.sock")))
    assert not (run / "live.sock").exists()


def test_state_round_trip_and_pidfile(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    state = State(socket="/s", use_as="swap", device="/dev/nbd0", swap_on=True, nbdkit_pid=7,
                  daemon_pid=6, phases={"plan": 1.5})
    state.save(str(run))
    assert read_state(str(run)) == state
    with run_dir_lock(str(run)):
        release_pidfile(str(run), None)  # locked by us: a live daemon's pid file stays
        assert (run / "kdumpd.pid").read_text() == f"{os.getpid()}\n"
    assert not (run / "kdumpd.pid").exists()
