"""``kdumpd serve`` / ``status`` / ``stop`` end to end, over a copy of a real vmcore.

The daemon runs as systemd would run it (foreground, until SIGTERM); real clients talk to its
Unix socket: libnbd (several connections at once), qemu-io, qemu-img and nbdcopy.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import nbd
import pytest

from tests.conftest import require
from tests.integration.conftest import kdumpd, sparse_copy

MiB = 1 << 20


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_serve_status_stop_and_report(serve, tmp_path: Path) -> None:
    s = serve("--copies", "2")
    # The socket is private, the run directory too; nbdkit listens on nothing else.
    assert stat.S_IMODE(os.stat(s.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(s.run_dir).st_mode) == 0o700
    st = s.status()
    assert st["running"] and st["state"] == "serving"
    assert st["copies"] == 2
    assert st["capacity_bytes"] > 100 * MiB and st["size_bytes"] == st["capacity_bytes"]
    assert st["used_bytes"] == 0
    assert set(st["integrity"]) >= {"detected", "repaired", "quarantined", "lost"}
    assert st["rss_bytes"]["nbdkit"] > 0 and st["rss_bytes"]["daemon"] > 0
    # Once serving, the daemon has exec'd the watcher (same pid, nothing of kdumpd loaded).
    daemon_cmd = Path(f"/proc/{st['daemon_pid']}/cmdline").read_bytes()
    assert b"kdumpd.serve.watch" in daemon_cmd
    assert st["rss_anon_bytes"]["daemon"] < 6 * MiB, st["rss_anon_bytes"]
    assert "watching nbdkit" in s.log()
    nbdkit_pid = st["nbdkit_pid"]
    cmdline = Path(f"/proc/{nbdkit_pid}/cmdline").read_bytes().split(b"\0")
    assert b"--unix" in cmdline and b"--port" not in cmdline and b"-p" not in cmdline
    assert b"--swap" not in cmdline  # not attached: nothing to mlock for

    h = connect(s.uri)
    data = random.Random(5).randbytes(3 * MiB)
    h.pwrite(data, 10 * MiB)
    assert h.pread(len(data), 10 * MiB) == data
    h.shutdown()
    st = s.wait_status(lambda st: st["used_bytes"] == 3 * MiB)
    assert st["requests"]["writes"] >= 1

    human = kdumpd("status", "--run-dir", str(s.run_dir))
    assert human.returncode == 0
    for word in ("capacity", "used", "copies", "integrity", "detected", "repaired",
                 "quarantined", "lost"):
        assert word in human.stdout

    assert s.stop() == 0
    assert not os.path.exists(s.socket)
    assert not Path(f"/proc/{nbdkit_pid}").exists()
    gone = kdumpd("status", "--run-dir", str(s.run_dir))
    assert gone.returncode == 10 and "not running" in gone.stderr

    for path in (s.run_dir / "report.json", s.run_dir / "dump" / "kdumpd-report.json"):
        report = json.loads(path.read_text())
        assert report["state"] == "stopped"
        assert report["plan"]["dump_level"] == 31
        assert report["plan"]["reusable_bytes"] > 0
        assert len(report["plan"]["extent_list"]) == report["plan"]["extents"] > 0
        assert report["copies"] == 2
        assert report["used_bytes"] == 3 * MiB
        assert report["integrity"]["lost"] == 0
        assert report["config"]["copies"] == {"value": 2, "source": "--copies 2"}


def test_sigterm_tears_down(serve) -> None:
    s = serve("--copies", "1")
    pid = s.status()["nbdkit_pid"]
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    assert not Path(f"/proc/{pid}").exists()
    assert not os.path.exists(s.socket)
    assert "SIGTERM: stopping" in s.log()


def test_nbdkit_death_is_an_error(serve) -> None:
    s = serve()
    os.kill(s.status()["nbdkit_pid"], signal.SIGKILL)
    assert s.proc.wait(30) == 9  # ServeError
    assert "nbdkit exited unexpectedly" in s.log()


def test_second_daemon_on_one_run_dir_is_refused(serve, vmcore, image) -> None:
    s = serve()
    r = kdumpd("serve", str(vmcore), "--backend", f"image:{image}", "--run-dir",
               str(s.run_dir), "--config", os.devnull, "--kernel-cmdline", os.devnull)
    assert r.returncode == 6  # a refusal, like every "not here" (was 9, "serving failed")
    assert "another kdumpd" in r.stderr
    assert s.status()["running"]


def test_multi_connection(serve) -> None:
    s = serve("--copies", "3", "--threads", "4")
    nconn, span = 4, 4 * MiB
    errors: list[BaseException] = []
    payloads = [random.Random(10 + i).randbytes(span) for i in range(nconn)]

    def worker(i: int) -> None:
        try:
            h = connect(s.uri)
            assert h.can_multi_conn()
            for k in range(0, span, 256 * 1024):  # interleave with the other connections
                h.pwrite(payloads[i][k : k + 256 * 1024], i * span + k)
            h.flush()
            h.shutdown()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nconn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # Every connection sees every other connection's writes after their flush.
    handles = [connect(s.uri) for _ in range(nconn)]
    for j, h in enumerate(handles):
        for i in range(nconn):
            assert h.pread(span, i * span) == payloads[i], (j, i)
        h.shutdown()


def test_qemu_io(serve) -> None:
    require(shutil.which("qemu-io") is not None, "qemu-io (qemu-utils)")
    s = serve()
    cmds = [
        "write -P 0xab 0 1M", "read -P 0xab 0 1M",
        "write -P 0x11 4095 3", "read -P 0x11 4095 3", "read -P 0xab 0 4095",
        "discard 64k 128k", "read -P 0 64k 128k", "read -P 0xab 192k 64k",
        "write -z 512k 256k", "read -P 0 512k 256k",
        "write -P 0x5a -f 2M 3M", "flush", "read -P 0x5a 2M 3M",
        "aio_write -P 0x77 8M 1M", "aio_write -P 0x78 9M 1M", "aio_flush",
        "read -P 0x77 8M 1M", "read -P 0x78 9M 1M",
    ]
    argv = ["qemu-io", "-f", "raw", s.uri]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout
    assert "error" not in r.stdout.lower(), r.stdout


def test_nbdcopy_and_qemu_img_round_trip(serve, tmp_path: Path) -> None:
    require(shutil.which("nbdcopy") is not None, "nbdcopy (libnbd-bin)")
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    s = serve("--copies", "2", "--size", "64M")
    src = tmp_path / "src.img"
    rng = random.Random(6)
    with open(src, "wb") as fh:
        for k in range(64):
            # Data with holes: every fourth MiB is zeros (nbdcopy may zero or trim it).
            fh.write(bytes(MiB) if k % 4 == 3 else rng.randbytes(MiB))
    r = subprocess.run(["nbdcopy", "--connections=2", str(src), s.uri], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out.img"
    r = subprocess.run(["nbdcopy", s.uri, str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), s.uri],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    st = s.status()
    assert st["used_bytes"] == 48 * MiB  # zero blocks take no old memory


def _copy_offsets(runconf: dict, group: int) -> list[int]:
    """File offsets of every copy of ``group`` in the image (placement is deterministic)."""
    from kdumpd.store.placement import Placement
    from kdumpd.units import Extent, PhysRange

    p = Placement.from_extents([Extent(s, e) for s, e in runconf["extents"]],
                               runconf["copies"],
                               min_distance_bytes=runconf["min_distance_bytes"])
    ranges = [PhysRange(s, e, o) for s, e, o in runconf["ranges"]]
    out = []
    for paddr in p.group_paddrs(group):
        r = next(r for r in ranges if r.start_paddr <= paddr < r.end_paddr)
        out.append(r.offset_of(paddr))
    return out


def _damage(fd: int, offset: int, rng: random.Random) -> None:
    old = os.pread(fd, 4096, offset)
    new = bytearray(old)
    for pos in rng.sample(range(4096), 5):
        new[pos] ^= 1 << rng.randrange(8)
    os.pwrite(fd, bytes(new), offset)


def test_corruption_while_serving_is_repaired(serve, vmcore, tmp_path: Path) -> None:
    """A device scribbling on old memory while kdumpd serves: the client always reads what it
    wrote (or EIO when every copy is gone), and status shows detections and repairs."""
    image = sparse_copy(vmcore, tmp_path / "own.img")
    s = serve("--copies", "2", "--scrub-rate", "0", image_path=image)
    rc = s.runconf()
    rng = random.Random(7)
    nblocks = 256
    data = rng.randbytes(nblocks * 4096)
    h = connect(s.uri)
    h.pwrite(data, 0)  # one request on a fresh store: block b gets group b
    fd = os.open(image, os.O_RDWR)
    try:
        # Copy 0 of 40 blocks: reads find them bad and repair them from copy 1.
        damaged = rng.sample(range(nblocks), 40)
        for b in damaged:
            _damage(fd, _copy_offsets(rc, b)[0], rng)
        assert h.pread(len(data), 0) == data
        for b in damaged:
            assert h.pread(4096, b * 4096) == data[b * 4096 : (b + 1) * 4096]
        st = s.wait_status(lambda st: st["integrity"]["repaired"] >= 40)
        assert st["integrity"]["detected"] >= 40
        assert st["integrity"]["lost"] == 0
        # Repaired copies were rewritten in the image itself.
        for b in damaged:
            assert os.pread(fd, 4096, _copy_offsets(rc, b)[0]) == data[b * 4096 : (b + 1) * 4096]
        # Every copy of one block: the client gets EIO, never wrong bytes.
        victim = next(b for b in range(nblocks) if b not in damaged)
        for off in _copy_offsets(rc, victim):
            _damage(fd, off, rng)
        with pytest.raises(nbd.Error) as info:
            h.pread(4096, victim * 4096)
        assert info.value.errnum == 5  # EIO
        with pytest.raises(nbd.Error):
            h.pread(len(data), 0)  # a large read covering it fails too
        assert h.pread(4096, ((victim + 1) % nblocks) * 4096) == \
            data[((victim + 1) % nblocks) * 4096 :][:4096]
        st = s.wait_status(lambda st: st["integrity"]["lost"] == 1)
        # Rewriting the block brings it back.
        h.pwrite(data[victim * 4096 : (victim + 1) * 4096], victim * 4096)
        assert h.pread(len(data), 0) == data
    finally:
        os.close(fd)
        h.shutdown()
    assert s.stop() == 0
    report = json.loads((s.run_dir / "report.json").read_text())
    assert report["integrity"]["repaired"] >= 40 and report["integrity"]["lost"] == 1
    assert any("lost" in e["message"] for e in report["repairs"])
    assert any("failed its checksum" in e["message"] for e in report["repairs"])


def test_scrubber_repairs_copies_reads_never_touch(serve, vmcore, tmp_path: Path) -> None:
    image = sparse_copy(vmcore, tmp_path / "own.img")
    s = serve("--copies", "3", "--scrub-rate", "256M", image_path=image)
    rc = s.runconf()
    rng = random.Random(8)
    data = rng.randbytes(128 * 4096)
    h = connect(s.uri)
    h.pwrite(data, 0)
    fd = os.open(image, os.O_RDWR)
    try:
        for b in range(0, 128, 4):  # the last copy of every fourth block
            _damage(fd, _copy_offsets(rc, b)[2], rng)
        st = s.wait_status(lambda st: st["integrity"]["repaired"] >= 32, timeout=30)
        assert st["integrity"]["lost"] == 0
        assert st["scrub"]["blocks_checked"] >= 128
        for b in range(0, 128, 4):
            assert os.pread(fd, 4096, _copy_offsets(rc, b)[2]) == data[b * 4096 : (b + 1) * 4096]
    finally:
        os.close(fd)
    assert h.pread(len(data), 0) == data
    h.shutdown()


def test_stop_cleans_up_after_a_killed_daemon(serve) -> None:
    s = serve()
    nbdkit_pid = s.status()["nbdkit_pid"]
    s.proc.kill()  # no teardown at all
    s.proc.wait(10)
    # Detached, nbdkit follows its parent (--exit-with-parent).
    deadline = time.monotonic() + 10
    while Path(f"/proc/{nbdkit_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{nbdkit_pid}").exists()
    r = kdumpd("status", "--run-dir", str(s.run_dir))
    assert r.returncode == 10 and "stale" in r.stderr
    r = kdumpd("stop", "--run-dir", str(s.run_dir))
    assert r.returncode == 0, r.stderr
    assert "had died" in r.stdout
    assert not (s.run_dir / "state.json").exists()


def test_sd_notify_ready_and_status(vmcore, image, tmp_path: Path) -> None:
    import socket as socketmod

    from tests.integration.conftest import _env, start_serve

    path = str(tmp_path / "notify.sock")
    srv = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(30)
    env = _env()
    env["NOTIFY_SOCKET"] = path
    s = start_serve(vmcore, image, tmp_path / "run", "--copies", "3", env=env)
    try:
        msg = srv.recv(4096).decode()
        lines = msg.splitlines()
        assert "READY=1" in lines
        status = next(ln for ln in lines if ln.startswith("STATUS="))
        assert "serving" in status and "(3 copies)" in status and "MiB" in status
        s.stop()
        assert "STOPPING=1" in srv.recv(4096).decode()
    finally:
        s.kill()
        srv.close()


def test_plugin_imports_the_package_whatever_venv_is_first_on_path(vmcore, image,
                                                                  tmp_path: Path) -> None:
    """An activated venv without system packages first on PATH (an embedded CPython finds its
    prefix through the python3 on PATH): nbdkit must still get Debian's numpy and this
    checkout's kdumpd."""
    from tests.integration.conftest import _env, start_serve

    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    env = _env()
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    s = start_serve(vmcore, image, tmp_path / "run", env=env)
    try:
        h = connect(s.uri)
        h.pwrite(b"\x42" * 8192, 4096)
        assert h.pread(8192, 4096) == b"\x42" * 8192
        h.shutdown()
    finally:
        s.kill()
