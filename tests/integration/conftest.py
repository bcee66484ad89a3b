"""Real nbdkit, real clients, no root: kdumpd serves a copy of a real vmcore (image backend).

Fixtures:

- ``vmcore``: the cached 6.1 vmcore (generated in QEMU by tests/vm if missing); never written.
- ``image``: one sparse copy of it per test session, which the store writes into at the
  PT_LOAD offsets. Every server starts with fresh metadata, so what earlier tests left in the
  copy's free pages does not matter.
- ``serve``: starts ``kdumpd serve`` (the CLI, in the foreground, as systemd would) and waits
  until ``kdumpd status`` says it serves; stops it at the end of the test.
- ``single``: a libnbd handle on ``nbdkit -s --exit-with-parent`` running the plugin over a run
  configuration that ``kdumpd.serve.prepare.prepare`` wrote, no daemon in between.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require

TOP = Path(__file__).resolve().parents[2]
VMCORE_NAME = "6.1-1g-kaslr"
KDUMPD = [sys.executable, "-m", "kdumpd"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TOP / "daemon") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def kdumpd(*args: str, check: bool = False, timeout: float = 60,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the kdumpd CLI to completion."""
    return subprocess.run([*KDUMPD, *args], capture_output=True, text=True, timeout=timeout,
                          check=check, env=env or _env(), stdin=subprocess.DEVNULL)


def _have_python_plugin() -> bool:
    if shutil.which("nbdkit") is None:
        return False
    r = subprocess.run(["nbdkit", "python", "--version"], capture_output=True, text=True)
    return r.returncode == 0


@pytest.fixture(scope="session")
def prerequisites() -> None:
    require(_have_python_plugin(), "nbdkit with its python plugin (nbdkit-plugin-python)")
    try:
        import nbd  # noqa: F401
    except ImportError:
        require(False, "python3-libnbd")


@pytest.fixture(scope="session")
def vmcore(prerequisites: None) -> Path:
    from tests.realcores import vmcore_dir

    path = vmcore_dir(VMCORE_NAME) / "vmcore"
    require(path.exists(), f"real vmcore {VMCORE_NAME}")
    return path


def sparse_copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], check=True)
    return dst


@pytest.fixture(scope="session")
def image(vmcore: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sparse_copy(vmcore, tmp_path_factory.mktemp("image") / "vmcore.img")


@pytest.fixture(scope="module")
def synth(prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small synthetic 6.1 core with free buddy blocks to serve from, and its image copy:
    fast to plan, for the tests of what happens around serving rather than of the plan."""
    from tests.synth.builder import Machine, template

    m = Machine(template("6.1"), ram=128 << 20)
    buddy = int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"])
    for head in range(0x4000, 0x8000, 0x400):
        m.page(head, _mapcount=buddy, private=10)
    d = tmp_path_factory.mktemp("synth")
    core = m.write(d / "vmcore")
    return core, sparse_copy(core, d / "image")


@dataclass
class Served:
    """A running ``kdumpd serve``."""

    proc: subprocess.Popen[str]
    run_dir: Path
    socket: str
    args: list[str]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def status(self) -> dict[str, Any]:
        r = kdumpd("status", "--json", "--run-dir", str(self.run_dir))
        assert r.returncode == 0, r.stderr
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc

    def wait_status(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"status never matched: {st}")
            time.sleep(0.1)

    def runconf(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.run_dir / "runconf.json").read_text())
        return doc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            r = kdumpd("stop", "--run-dir", str(self.run_dir), timeout=120)
            assert r.returncode == 0, r.stderr
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_serve(vmcore: Path, image: Path, run_dir: Path, *extra: str,
                env: dict[str, str] | None = None) -> Served:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "dump").mkdir(exist_ok=True)  # where the dump (and the report) is saved
    socket = str(run_dir / "kdumpd.sock")
    args = [
        "serve", str(vmcore), "--backend", f"image:{image}", "--run-dir", str(run_dir),
        "--socket", socket, "--config", os.devnull, "--kernel-cmdline", os.devnull,
        "--report", str(run_dir / "dump" / "kdumpd-report.json"), "--status-interval", "0.2",
        *extra,
    ]
    log_path = run_dir.parent / f"{run_dir.name}.log"
    log_fh = open(log_path, "w")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen([*KDUMPD, *args], stdout=log_fh, stderr=subprocess.STDOUT,
                            text=True, env=env or _env(), stdin=subprocess.DEVNULL)
    log_fh.close()
    served = Served(proc, run_dir, socket, args, log_path)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"kdumpd serve exited {proc.returncode}:\n{served.log()}")
        r = kdumpd("status", "--json", "--run-dir", str(run_dir))
        if r.returncode == 0 and json.loads(r.stdout)["running"]:
            return served
        if time.monotonic() > deadline:
            served.kill()
            raise AssertionError(f"kdumpd serve did not come up:\n{served.log()}")
        time.sleep(0.1)


@pytest.fixture
def serve(vmcore: Path, image: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*extra: str, name: str = "run", image_path: Path | None = None) -> Served:
        s = start_serve(vmcore, image_path or image, tmp_path / name, *extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


@pytest.fixture(scope="session")
def prepared(vmcore: Path, image: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A run configuration for the plugin (copies 2, 64 MiB device), from serve.prepare."""
    from kdumpd.config import load_serve_config
    from kdumpd.serve.prepare import prepare

    run_dir = tmp_path_factory.mktemp("single")
    cfg = load_serve_config(
        {"vmcore": str(vmcore), "backend": f"image:{image}", "run_dir": str(run_dir),
         "copies": "2", "size": "64M", "scrub_rate": "0", "report": ""},
        config_path=os.devnull, cmdline_path=os.devnull,
    )
    return prepare(cfg)


@pytest.fixture
def single(prepared: Any) -> Iterator[Any]:
    """A libnbd handle on a fresh ``nbdkit -s --exit-with-parent`` running the plugin."""
    import nbd

    from kdumpd.nbd.server import nbdkit_argv, nbdkit_env

    h = nbd.NBD()
    argv = nbdkit_argv(runconf=prepared.runconf_path, socket=None, single=True,
                       exit_with_parent=True)
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(nbdkit_env(old))
    try:
        h.connect_command(argv)
    finally:
        os.environ.clear()
        os.environ.update(old)
    yield h
    h.shutdown()
