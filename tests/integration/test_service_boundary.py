"""Bad input at the service boundary (issue 12): kdumpd fails alone, the capture goes on.

For each case: ``kdumpd serve`` exits non-zero with exactly one error line, the report (where
the dump is saved) says why when the configuration got far enough to name that place, and
nothing is left behind: no nbdkit, no socket, no state, no pid file, and not a byte written to
the image. Real nbdkit on a synthetic core; the kdump configuration and the full run directory
are real files and a real tmpfs in a private mount namespace (``unshare -m``, root only).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.integration.conftest import _env, kdumpd, start_serve

KDUMPD = [sys.executable, "-m", "kdumpd"]


@pytest.fixture
def namespaces() -> None:
    """A private mount namespace with overlayfs and tmpfs: root and unshare(1)."""
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "root and unshare")
    r = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    require(r.returncode == 0, "unshare -m (mount namespaces)")


def _stamp(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_mtime_ns}:{st.st_size}"


def _argv(synth: tuple[Path, Path], run_dir: Path, report: Path, *extra: str,
          cmdline: str = os.devnull) -> list[str]:
    core, image = synth
    return [*KDUMPD, "serve", str(core), "--backend", f"image:{image}", "--run-dir",
            str(run_dir), "--config", os.devnull, "--kernel-cmdline", cmdline,
            "--report", str(report), "--size", "16M", *extra]


def _in_namespace(setup: str, argv: list[str], timeout: float = 90,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` after the shell commands ``setup``, in a private mount namespace."""
    script = f"set -e; {setup}; exec {shlex.join(argv)}"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout, env=env or _env(),
                          stdin=subprocess.DEVNULL)


def _etc_overlay(tmp_path: Path, files: dict[str, str]) -> str:
    """Shell commands laying ``files`` (paths under /etc) over /etc with overlayfs."""
    upper, work = tmp_path / "upper", tmp_path / "work"
    for rel, text in files.items():
        (upper / rel).parent.mkdir(parents=True, exist_ok=True)
        (upper / rel).write_text(text)
    work.mkdir()
    return (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc")


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("kdumpd: ") and "Error" in ln
             and "WARNING" not in ln and "INFO" not in ln]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _nothing_left(run_dir: Path, image: Path, stamp: str) -> None:
    left = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert set(left) <= {"report.json", "status.json", "error.json"}, left
    assert not list(run_dir.glob("*.sock")) if run_dir.exists() else True
    assert _stamp(image) == stamp
    out = subprocess.run(["pgrep", "-f", f"nbdkit.*{run_dir}"], capture_output=True, text=True)
    assert out.stdout.strip() == "", f"nbdkit left running: {out.stdout}"


def _report(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


# -- the kdump configuration ------------------------------------------------------------------

KDUMP_CONF_CASES = [
    # (file under /etc, its text, exit code, class, words in the line)
    ("kdump.conf", "path /var/crash\ncore_collector makedumpfile -l -d\n", 2, "ConfigError",
     ["/etc/kdump.conf", "-d without a level"]),
    ("kdump.conf", "core_collector makedumpfile -l --message-level 7 -d '31\n", 2,
     "ConfigError", ["/etc/kdump.conf", "does not parse"]),
    ("kdump.conf", "core_collector\n", 2, "ConfigError", ["/etc/kdump.conf", "empty"]),
    ("default/kdump-tools", 'USE_KDUMP=1\nMAKEDUMP_ARGS="-c -d"\n', 2, "ConfigError",
     ["/etc/default/kdump-tools", "-d without a level"]),
    ("kdump.conf", "core_collector my-own-dumper --all\n", 6, "RefusedError",
     ["rule 6", "my-own-dumper"]),
]


@pytest.mark.parametrize("rel,text,code,cls,words", KDUMP_CONF_CASES,
                         ids=["no-level", "quote", "empty", "debian-no-level", "unknown"])
def test_malformed_kdump_configuration(synth, namespaces, tmp_path, rel, text, code, cls,
                                       words) -> None:
    """The kdump.conf (kdump-utils) or /etc/default/kdump-tools (kdump-tools) that the
    capture runs with: a collector line kdumpd cannot read, or a collector it does not
    know, is refused before nbdkit with the file named."""
    _, image = synth
    stamp = _stamp(image)
    run_dir, report = tmp_path / "run", tmp_path / "report.json"
    r = _in_namespace(_etc_overlay(tmp_path, {rel: text}), _argv(synth, run_dir, report))
    assert r.returncode == code, r.stderr
    line = _one_line(r)
    assert line.startswith(f"kdumpd: {cls}: ") and all(w in line for w in words), line
    doc = _report(report)
    assert doc["state"] == "refused" and doc["error"] == cls
    assert all(w in doc["reason"] for w in words[1:])
    _nothing_left(run_dir, image, stamp)


def test_unknown_collector_flag(synth, tmp_path) -> None:
    _, image = synth
    stamp = _stamp(image)
    run_dir, report = tmp_path / "run", tmp_path / "report.json"
    r = kdumpd(*_argv(synth, run_dir, report, "--collector", "my-dumper /proc/vmcore")[3:])
    assert r.returncode == 6, r.stderr
    assert "rule 6" in _one_line(r)
    assert _report(report)["error"] == "RefusedError"
    _nothing_left(run_dir, image, stamp)


# -- the kernel command line ------------------------------------------------------------------


@pytest.mark.parametrize("param,words", [
    ("kdumpd.copies=two", ["kdumpd.copies=two", "copies"]),
    ("kdumpd.copies", ["kdumpd.copies"]),
    ("kdumpd.=3", ["kdumpd.=3"]),
    ("kdumpd.size=12345x", ["kdumpd.size=12345x"]),
    ("kdumpd.as=swapp", ["kdumpd.as=swapp"]),
])
def test_malformed_kernel_parameter(synth, tmp_path, param, words) -> None:
    """A bad kdumpd.*= parameter is one ConfigError line naming it. No report: the
    configuration that says where the report goes is the thing that is broken."""
    _, image = synth
    stamp = _stamp(image)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"BOOT_IMAGE=/vmlinuz ro {param} irqpoll nr_cpus=1\n")
    run_dir, report = tmp_path / "run", tmp_path / "report.json"
    r = kdumpd(*_argv(synth, run_dir, report, cmdline=str(cmdline))[3:])
    assert r.returncode == 2, r.stderr
    line = _one_line(r)
    assert "ConfigError" in line and "kernel command line" in line, line
    assert all(w in line for w in words), line
    assert not report.exists()
    _nothing_left(run_dir, image, stamp)


# -- nbd, nbdkit ------------------------------------------------------------------------------


def test_missing_nbd_module(synth, tmp_path) -> None:
    """--attach where the nbd module cannot be loaded: nbdkit was already up, and goes."""
    require(os.geteuid() == 0, "root (modprobe)")
    require(not os.path.isdir("/sys/module/nbd"), "a host without the nbd module loaded")
    _, image = synth
    stamp = _stamp(image)
    run_dir, report = tmp_path / "run", tmp_path / "report.json"
    r = kdumpd(*_argv(synth, run_dir, report, "--attach", "--as", "none")[3:], timeout=120)
    assert r.returncode == 9, r.stderr
    line = _one_line(r)
    assert line.startswith("kdumpd: ServeError: ") and "modprobe" in line, line
    doc = _report(report)
    assert doc["state"] == "failed" and doc["error"] == "ServeError" and doc["device"] is None
    _nothing_left(run_dir, image, stamp)


@pytest.mark.parametrize("nbdkit,words", [
    ("/nonexistent/nbdkit", ["cannot start /nonexistent/nbdkit"]),
    ("/bin/false", ["nbdkit exited with status 1 before serving"]),  # exits at once
])
def test_nbdkit_missing_or_failing_to_start(synth, tmp_path, nbdkit, words) -> None:
    """(Without --nbdkit, kdumpd also looks in /usr/sbin and /usr/bin, so an empty PATH
    does not make nbdkit missing.)"""
    _, image = synth
    stamp = _stamp(image)
    run_dir, report = tmp_path / "run", tmp_path / "report.json"
    r = kdumpd(*_argv(synth, run_dir, report, "--nbdkit", nbdkit)[3:])
    assert r.returncode == 9, r.stderr
    line = _one_line(r)
    assert line.startswith("kdumpd: ServeError: ") and all(w in line for w in words), line
    doc = _report(report)
    assert doc["state"] == "failed" and "nbdkit" in doc["reason"]
    _nothing_left(run_dir, image, stamp)


def test_nbdkit_killed_while_serving(synth, tmp_path) -> None:
    """kill -9 of nbdkit mid-run: the daemon notices, tears down, reports, exits 9."""
    core, image = synth
    run_dir = tmp_path / "run"
    s = start_serve(core, image, run_dir, "--size", "16M")
    try:
        nbdkit = s.status()["nbdkit_pid"]
        os.kill(nbdkit, signal.SIGKILL)
        assert s.proc.wait(30) == 9
    finally:
        s.kill()
    log = s.log()
    errors = [ln for ln in log.splitlines() if ln.startswith("kdumpd: ServeError")]
    assert errors == ["kdumpd: ServeError: nbdkit exited unexpectedly with status -9"], log
    assert "Traceback" not in log
    for where in (run_dir / "report.json", run_dir / "dump" / "kdumpd-report.json"):
        doc = _report(where)
        assert doc["state"] == "failed" and "nbdkit exited unexpectedly" in doc["reason"]
    assert not Path(f"/proc/{nbdkit}").exists() or "Z" in Path(f"/proc/{nbdkit}/stat").read_text()
    assert not os.path.exists(s.socket)
    assert not any((run_dir / n).exists() for n in ("state.json", "runconf.json", "kdumpd.pid"))
    assert kdumpd("status", "--run-dir", str(run_dir)).returncode == 10


# -- a full run directory ---------------------------------------------------------------------


@pytest.mark.parametrize("free_kib,code,cls,words", [
    (0, 9, "ServeError", ["kdumpd.pid", "No space left on device"]),
    (8, 11, "SelfTestError", ["self-test", "No space left on device"]),
])
def test_full_run_directory(synth, namespaces, tmp_path, free_kib, code, cls, words) -> None:
    """The run directory on a full tmpfs: before the fix, the self-test's scratch image
    took a SIGBUS through its mapping (exit 135, no line, no report)."""
    _, image = synth
    stamp = _stamp(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_dir, report = mnt / "run", tmp_path / "report.json"
    setup = (f"mount -t tmpfs -o size=16k tmpfs {mnt}; "
             f"dd if=/dev/zero of={mnt}/fill bs=1k count={16 - free_kib} 2>/dev/null || true; "
             f"mkdir -p {run_dir}")
    argv = _argv(synth, run_dir, report, "--socket", str(tmp_path / "kdumpd.sock"))
    r = _in_namespace(setup, argv)
    assert r.returncode == code, r.stderr
    line = _one_line(r)
    assert line.startswith(f"kdumpd: {cls}: ") and all(w in line for w in words), line
    doc = _report(report)
    assert doc["state"] == "refused" and doc["error"] == cls
    assert not (tmp_path / "kdumpd.sock").exists()
    assert _stamp(image) == stamp
    time.sleep(0)  # the tmpfs vanished with the namespace: nothing can be left in it


def test_run_directory_fills_while_serving(synth, namespaces, tmp_path) -> None:
    """The run directory fills up after READY: status writes warn once (not every interval),
    serving goes on, and SIGTERM still tears down cleanly (the plugin's final status write
    used to raise out of its cleanup, a traceback, before the backend was closed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_dir, report, log = mnt / "run", tmp_path / "report.json", tmp_path / "serve.log"
    sock = tmp_path / "kdumpd.sock"
    serve = shlex.join(_argv(synth, run_dir, report, "--socket", str(sock),
                             "--status-interval", "0.2"))
    status = shlex.join([*KDUMPD, "status", "--run-dir", str(run_dir)])
    script = (f"set -e; mount -t tmpfs -o size=2m tmpfs {mnt}; mkdir -p {run_dir}; "
              f"{serve} > {log} 2>&1 & D=$!; "
              f"for i in $(seq 300); do {status} >/dev/null 2>&1 && break; sleep 0.2; done; "
              f"dd if=/dev/zero of={mnt}/fill bs=4k 2>/dev/null || true; sleep 1.5; "
              f"{status} >/dev/null; kill -TERM $D; rc=0; wait $D || rc=$?; echo rc=$rc")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                       timeout=120, env=_env(), stdin=subprocess.DEVNULL)
    text = log.read_text()
    assert r.stdout.strip().endswith("rc=0"), (r.stdout, r.stderr, text)
    assert "Traceback" not in text, text
    stale = [ln for ln in text.splitlines() if "status is stale" in ln]
    assert len(stale) == 1, text
    assert _report(report)["state"] == "stopped"
    assert not sock.exists()
    out = subprocess.run(["pgrep", "-f", f"nbdkit.*{run_dir}"], capture_output=True, text=True)
    assert out.stdout.strip() == ""
