"""Run mutated vmcores through survey, plan and serve's planning step, in worker processes
with a deadline per input.

Each input goes three ways: ``kdumpd survey V -d 31`` and ``kdumpd plan V -d 31 --extents F``
through ``cli.main`` (one stderr line naming a KdumpdError subclass and that class's exit code,
or success), and ``daemon.plan_for_serve`` (the gated plan serve uses: a Plan whose extents lie
in the core's RAM, or a KdumpdError). Anything else is a finding: another exception, a
traceback or a second line on stderr, an exit code that is not the class's, the two gated
paths disagreeing, the vmcore's mtime changing, a backend or store being opened by planning,
the worker dying (a crash in C), or an input outliving its deadline (a hang). Some inputs also
run all of ``daemon.prepare`` with the image backend over a copy of the seed; that copy must
not change.

A worker is ``python -m tests.synth.fuzz WORKDIR`` (JSON lines on stdin/stdout); the parent
kills it at the deadline and starts another.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.synth.fuzzbase import data_extents
from tests.synth.mutate import Input

__all__ = ["Worker", "materialize"]

TOP = Path(__file__).resolve().parents[2]


class _Tripwire(BaseException):
    """Raised when planning opens a backend or a store: not an Exception, so nothing on the
    way up can swallow it."""


def materialize(pristine: Path, inp: Input, dst: Path) -> Path:
    """Write the input as a file (sparse like its seed): for truncation and reproducers."""
    src = os.open(pristine, os.O_RDONLY)
    out = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = os.fstat(src).st_size
        for lo, hi in data_extents(src, 0, size):
            pos = lo
            while pos < hi:
                chunk = os.pread(src, min(hi - pos, 1 << 20), pos)
                os.pwrite(out, chunk, pos)
                pos += len(chunk)
        os.ftruncate(out, size)
        for off, data in inp.patches:
            os.pwrite(out, data, off)
        if inp.truncate is not None:
            os.ftruncate(out, inp.truncate)
    finally:
        os.close(src)
        os.close(out)
    return dst


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for lo, hi in data_extents(fd, 0, size):
            h.update(lo.to_bytes(8, "little") + os.pread(fd, hi - lo, lo))
    finally:
        os.close(fd)
    return h.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


# -- the worker --------------------------------------------------------------------------------


class _Guards:
    """Tripwires on everything that opens old memory for writing, armed while planning."""

    def __init__(self) -> None:
        from kdumpd.oldmem import backend, devmem, image, vmcore_rw
        from kdumpd.serve import export, prepare
        from kdumpd.store import blockstore

        self.armed = False
        self.targets = [(image.ImageOldMem, "__init__"), (devmem.DevMem, "__init__"),
                        (vmcore_rw.VmcoreRW, "__init__"), (blockstore.BlockStore, "__init__")]
        for cls, name in self.targets:
            self._wrap(cls, name)
        orig_open = backend.open_backend

        def open_backend(*args: Any, **kw: Any) -> Any:
            if self.armed:
                raise _Tripwire("open_backend called while planning")
            return orig_open(*args, **kw)
        # Every module that holds the name: the planning step must reach none of them.
        for module in (backend, prepare, export):
            module.open_backend = open_backend  # type: ignore[assignment]

    def _wrap(self, cls: Any, name: str) -> None:
        orig = getattr(cls, name)
        guards = self

        def wrapper(*args: Any, **kw: Any) -> Any:
            if guards.armed:
                raise _Tripwire(f"{cls.__name__} opened while planning")
            return orig(*args, **kw)
        setattr(cls, name, wrapper)

    @contextlib.contextmanager
    def armed_(self) -> Iterator[None]:
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


def _error_names() -> dict[str, int]:
    from kdumpd import errors

    return {name: getattr(errors, name).exit_code for name in errors.__all__}


def _cli(argv: list[str], names: dict[str, int]) -> dict[str, Any]:
    from kdumpd.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except _Tripwire as exc:
        return {"finding": f"tripwire: {exc}"}
    except SystemExit as exc:
        return {"finding": f"SystemExit {exc.code}: {err.getvalue().strip()[:300]}"}
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
        return {"finding": f"{type(exc).__name__}: {exc}"[:300],
                "traceback": traceback.format_exc()}
    text = err.getvalue()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if rc == 0:
        return {"outcome": "ok", "rc": 0}
    if "Traceback" in text or len(lines) != 1:
        return {"finding": f"rc {rc} with {len(lines)} stderr lines", "stderr": text[:2000]}
    line = lines[0]
    name = line.split(":", 2)[1].strip() if line.count(":") >= 2 else ""
    if not line.startswith("kdumpd: ") or name not in names:
        return {"finding": f"not a KdumpdError line: {line[:300]}", "rc": rc}
    if names[name] != rc:
        return {"finding": f"{name} exited {rc}, not {names[name]}: {line[:300]}"}
    return {"outcome": name, "rc": rc, "line": line[:300]}


def _serve_plan(path: Path, cfg: Any) -> dict[str, Any]:
    from kdumpd.errors import KdumpdError
    from kdumpd.serve.prepare import plan_for_serve
    from kdumpd.vmcore.core import open_vmcore

    try:
        with open_vmcore(path) as vm:
            plan = plan_for_serve(vm, cfg)
            ranges = [(r.start_paddr, r.end_paddr) for r in vm.phys.ranges]
    except _Tripwire as exc:
        return {"finding": f"tripwire: {exc}"}
    except KdumpdError as exc:
        msg = str(exc)
        if "\n" in msg or not msg:
            return {"finding": f"{type(exc).__name__} message not one line: {msg[:300]!r}"}
        return {"outcome": type(exc).__name__, "rc": exc.exit_code}
    except Exception as exc:  # noqa: BLE001
        return {"finding": f"{type(exc).__name__}: {exc}"[:300],
                "traceback": traceback.format_exc()}
    for e in plan.extents:
        lo, hi = e.start_pfn << 12, e.end_pfn << 12
        if not any(a <= lo and hi <= b for a, b in ranges) or lo >= hi:
            return {"finding": f"extent {lo:#x}-{hi:#x} outside the core's RAM"}
    return {"outcome": "ok", "rc": 0, "pages": plan.reusable_pages}


def _prepare(cfg: Any, image: Path) -> dict[str, Any]:
    from kdumpd.errors import KdumpdError
    from kdumpd.serve.prepare import prepare

    before, digest = _stamp(image), _digest(image)
    try:
        prepare(cfg)
        out: dict[str, Any] = {"outcome": "ok", "rc": 0}
    except KdumpdError as exc:
        out = {"outcome": type(exc).__name__, "rc": exc.exit_code}
    except Exception as exc:  # noqa: BLE001
        out = {"finding": f"prepare: {type(exc).__name__}: {exc}"[:300],
               "traceback": traceback.format_exc()}
    if _stamp(image) != before or _digest(image) != digest:
        out = {"finding": "prepare wrote into the image backend"}
    return out


def _run(path: Path, cfgs: tuple[Any, Any], image: Path, inp: Input, guards: _Guards,
         names: dict[str, int], work: Path, pristine: int | None = None) -> dict[str, Any]:
    stamp = _stamp(path)
    res: dict[str, Any] = {}
    ext = work / "extents"
    with contextlib.suppress(FileNotFoundError):
        ext.unlink()
    with guards.armed_():
        res["serve"] = _serve_plan(path, cfgs[0])
        res["survey"] = _cli(["survey", str(path), "-d", "31"], names)
        res["plan"] = _cli(["plan", str(path), "-d", "31", "--extents", str(ext)], names)
    if _stamp(path) != stamp:
        res["vmcore"] = {"finding": "the vmcore changed while it was planned"}
    s, p = res["serve"], res["plan"]
    if s.get("outcome") == "ok" and pristine is not None and s.get("pages") != pristine:
        s["outcome"] = "ok-changed"  # the mutation reached the classification
    ok = ("ok", "ok-changed")
    if "outcome" in s and "outcome" in p and (s["outcome"] in ok) != (p["outcome"] == "ok"):
        res["agree"] = {"finding": f"serve planning {s['outcome']} but plan {p['outcome']}"}
    if inp.prepare and s.get("outcome") in ok:
        res["prepare"] = _prepare(cfgs[1], image)
    return res


def _apply(fd: int, patches: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    undo = []
    size = os.fstat(fd).st_size
    for off, data in patches:
        if off >= size:
            continue
        data = data[: size - off]
        undo.append((off, os.pread(fd, len(data), off)))
        os.pwrite(fd, data, off)
    return undo


def worker_main(workdir: Path) -> None:
    """Serve inputs from stdin; write one JSON result line per input to the protocol fd."""
    from kdumpd.config import load_serve_config
    from kdumpd.plan import gated

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray writes (C, logging) go nowhere
    if not os.environ.get("KDUMPD_FUZZ_STDERR"):  # keep it to debug the harness
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    # `makedumpfile -v` once, not per input: the same answer, and a fork per input would
    # measure fork speed rather than the reader.
    version = gated.collector_version()
    gated.collector_version = lambda program="makedumpfile": version  # type: ignore
    seeds = json.loads((workdir / "seeds.json").read_text())
    me = workdir / f"w{os.getpid()}"
    me.mkdir()
    cores: dict[str, Path] = {}
    images: dict[str, Path] = {}
    cfgs: dict[str, tuple[Any, Any]] = {}
    for name, pristine in seeds.items():
        cores[name] = me / f"{name}.core"
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", pristine, cores[name]],
                       check=True)
        images[name] = Path(pristine + ".image")
    guards = _Guards()
    names = _error_names()

    def cfg(core: Path, name: str) -> tuple[Any, Any]:
        base = {"vmcore": str(core), "backend": f"image:{images[name]}",
                "run_dir": str(me / "run"), "dump_level": "31", "report": "", "copies": "2"}
        return (load_serve_config(base, config_path=os.devnull, cmdline_path=os.devnull),
                load_serve_config(base, config_path=os.devnull, cmdline_path=os.devnull))

    # The pristine plan of each seed: an input that plans differently reached classification.
    pristine = {name: _serve_plan(core, cfg(core, name)[0]).get("pages")
                for name, core in cores.items()}
    proto.write("ready\n")
    for line in sys.stdin:
        inp = Input.from_json(json.loads(line))
        core = cores[inp.seed]
        if inp.truncate is not None:
            path = materialize(Path(seeds[inp.seed]), inp, me / "input.core")
            res = _run(path, cfg(path, inp.seed), images[inp.seed], inp, guards, names, me,
                       pristine[inp.seed])
            path.unlink()
        else:
            if inp.seed not in cfgs:
                cfgs[inp.seed] = cfg(core, inp.seed)
            fd = os.open(core, os.O_RDWR)
            try:
                undo = _apply(fd, inp.patches)
                res = _run(core, cfgs[inp.seed], images[inp.seed], inp, guards, names, me,
                           pristine[inp.seed])
                for off, data in reversed(undo):
                    os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        proto.write(json.dumps(res) + "\n")


# -- the parent's handle on a worker -----------------------------------------------------------


class Worker:
    """One worker process; :meth:`run` returns its result, or None at the deadline (the
    worker is then killed, and restarted on the next run), or {"died": rc} if it died."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = b""

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TOP / "daemon"), str(TOP)])
        proc = subprocess.Popen([sys.executable, "-m", "tests.synth.fuzz", str(self.workdir)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=TOP, env=env)
        self.proc, self.buf = proc, b""
        if self._line(time.monotonic() + 120) != "ready":
            raise RuntimeError("fuzz worker did not start")
        return proc

    def _line(self, deadline: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def run(self, inp: Input, timeout: float) -> dict[str, Any] | None:
        proc = self.proc if self.proc and self.proc.poll() is None else self._start()
        assert proc.stdin is not None
        start = time.monotonic()
        try:
            proc.stdin.write((json.dumps(inp.to_json()) + "\n").encode())
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._line(start + timeout)
        if line is None:
            self.stop()
            return None
        if line == "":
            rc = proc.wait()
            self.proc = None
            return {"died": rc}
        out: dict[str, Any] = json.loads(line)
        out["seconds"] = time.monotonic() - start
        return out

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        for d in self.workdir.glob("w*"):
            if d.is_dir() and not Path(f"/proc/{d.name[1:]}").exists():
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    worker_main(Path(sys.argv[1]))
