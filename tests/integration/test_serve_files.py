"""serve never replaces what it does not own (issue 15, items 2, 3 and 14), with real nbdkit.

A synthetic vmcore (64 MiB of free pages) keeps these runs short and independent of the real
vmcore cache; the image backend writes into a sparse copy of it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Served, kdumpd, start_serve


@pytest.fixture
def daemons(synth: tuple[Path, Path], tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        s.kill()


def _start(synth: tuple[Path, Path], run_dir: Path, started: list[Served],
           *extra: str) -> Served:
    core, image = synth
    s = start_serve(core, image, run_dir, "--size", "16M", *extra)
    started.append(s)
    return s


def _serve_once(synth: tuple[Path, Path], run_dir: Path, *extra: str
                ) -> subprocess.CompletedProcess[str]:
    """A serve expected to refuse at once (one that serves instead times out: a failure)."""
    core, image = synth
    return kdumpd("serve", str(core), "--backend", f"image:{image}", "--run-dir", str(run_dir),
                  "--config", os.devnull, "--kernel-cmdline", os.devnull, "--report", "",
                  "--size", "16M", *extra, timeout=60)


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("kdumpd: ") and "Error" in ln]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_a_regular_file_named_by_socket_is_never_replaced(synth, tmp_path) -> None:
    """`serve --socket FILE` replaced the file with its socket and deleted it at stop."""
    victim = tmp_path / "notes.txt"
    victim.write_text("the user's notes\n")
    r = _serve_once(synth, tmp_path / "run", "--socket", str(victim))
    assert r.returncode == 2, r.stderr
    assert "exists and is not a socket" in _one_line(r)
    assert victim.read_text() == "the user's notes\n"


def test_a_live_daemons_socket_is_not_taken_over(synth, daemons, tmp_path) -> None:
    """A second serve with another run dir but the same socket took over the first daemon's
    socket and removed it on stop, while status kept saying "serving"."""
    first = _start(synth, tmp_path / "a", daemons)
    r = _serve_once(synth, tmp_path / "b", "--socket", first.socket)
    assert r.returncode == 6, r.stderr
    assert "a server answers on this socket" in _one_line(r)
    assert first.status()["running"] and first.status()["socket_answers"]
    assert not (tmp_path / "b" / "kdumpd.pid").exists()
    assert first.stop() == 0


def test_status_checks_that_the_socket_answers(synth, daemons, tmp_path) -> None:
    s = _start(synth, tmp_path / "run", daemons)
    moved = tmp_path / "moved.sock"
    os.rename(s.socket, moved)  # what the takeover did: the daemon's socket is gone
    r = kdumpd("status", "--json", "--run-dir", str(s.run_dir))
    assert r.returncode == 1, r.stdout
    doc = json.loads(r.stdout)
    assert not doc["running"] and not doc["socket_answers"]
    assert doc["state"] == "not answering on its socket"
    os.rename(moved, s.socket)
    assert s.status()["running"]
    assert s.stop() == 0


def test_a_stale_socket_is_replaced(synth, daemons, tmp_path) -> None:
    """A socket nobody listens on (a killed daemon's) is the one thing serve may replace."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run_dir / "kdumpd.sock"))
    stale.close()  # the path stays, nobody listens: connect() is refused
    s = _start(synth, run_dir, daemons)
    assert s.status()["socket_answers"]
    assert s.stop() == 0


def test_busy_run_dir_is_a_refusal_and_a_clean_stop_leaves_no_pid(synth, daemons,
                                                                  tmp_path) -> None:
    s = _start(synth, tmp_path / "run", daemons)
    r = _serve_once(synth, s.run_dir, "--socket", str(tmp_path / "other.sock"))
    assert r.returncode == 6, r.stderr
    assert "another kdumpd" in _one_line(r)
    assert not (tmp_path / "other.sock").exists()
    assert s.status()["running"]
    report = s.run_dir / "report.json"
    sources = {k: v["source"] for k, v in json.loads(report.read_text())["config"].items()}
    assert "--vmcore" not in sources["vmcore"]  # serve has no such flag: VMCORE is positional
    assert s.stop() == 0
    assert not (s.run_dir / "kdumpd.pid").exists()
    assert not Path(s.socket).exists()
    r = kdumpd("status", "--json", "--run-dir", str(s.run_dir))
    assert r.returncode == 10 and json.loads(r.stdout)["running"] is False
