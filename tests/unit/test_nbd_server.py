"""The serving pieces without nbdkit: the nbdkit command line and environment, the run
configuration's round trip, errno mapping, the self-test, backend specs, the store's capacity,
/dev/nbdX discovery and process protections each do what the daemon relies on."""

from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

import pytest

from kdumpd.errors import (
    BackendError,
    ConfigError,
    IntegrityError,
    RefusedError,
    SelfTestError,
    ServeError,
)
from kdumpd.jsonfile import atomic_write_json, read_json
from kdumpd.nbd import server
from kdumpd.nbd.protect import protect_process
from kdumpd.nbd.selftest import SELFTEST_COUNT, run_selftest
from kdumpd.oldmem.backend import open_backend
from kdumpd.serve.export import EventLog, errno_for
from kdumpd.serve.prepare import store_capacity
from kdumpd.serve.runconf import RunConf
from kdumpd.store.placement import Placement
from kdumpd.units import Extent, PhysRange

PKG = Path(__file__).resolve().parents[2] / "daemon" / "kdumpd"


def test_nbdkit_argv_unix_only() -> None:
    argv = server.nbdkit_argv(runconf="/run/k/runconf.json", socket="/run/k/s", threads=4)
    assert argv[:4] == ["nbdkit", "--foreground", "--unix", "/run/k/s"]
    assert "--swap" not in argv and "--port" not in argv and "-p" not in argv
    assert argv[-3:] == ["python", server.PLUGIN_PATH, "runconf=/run/k/runconf.json"]
    assert argv[argv.index("--threads") + 1] == "4"
    swap = server.nbdkit_argv(runconf="r", socket="s", swap=True, exit_with_parent=True)
    assert "--swap" in swap and "--exit-with-parent" in swap
    single = server.nbdkit_argv(runconf="r", socket=None, single=True)
    assert "--single" in single and "--unix" not in single
    with pytest.raises(ServeError, match="never listens on TCP"):
        server.nbdkit_argv(runconf="r", socket=None)


def test_plugin_path_is_the_source_trees_plugin() -> None:
    # Without KDUMPD_PLUGIN, nbdkit is pointed at nbd_plugin/ beside daemon/ in this tree.
    if os.environ.get("KDUMPD_PLUGIN"):
        pytest.skip("KDUMPD_PLUGIN names an installed plugin")
    assert Path(server.PLUGIN_PATH) == PKG.parents[1] / "nbd_plugin" / "kdumpd_plugin.py"
    assert "def pread(" in Path(server.PLUGIN_PATH).read_text()


def test_nbdkit_env_is_for_debians_python() -> None:
    env = server.nbdkit_env({"PATH": "/root/.pyenv/versions/3.11.7/bin:/opt/venv/bin:/bin",
                             "PYTHONHOME": "/x", "PYTHONPATH": "/y", "VIRTUAL_ENV": "/v"})
    assert "PYTHONHOME" not in env and "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    # The embedded interpreter looks for python3 on PATH to find its prefix: system first.
    assert env["PATH"].split(":") == ["/usr/sbin", "/usr/bin", "/sbin", "/bin",
                                      "/root/.pyenv/versions/3.11.7/bin", "/opt/venv/bin"]


def test_run_reports_the_last_stderr_line() -> None:
    assert server.run(["sh", "-c", "echo out"]) == "out\n"
    with pytest.raises(ServeError, match=r"sh -c .* failed: second"):
        server.run(["sh", "-c", "echo first >&2; echo second >&2; exit 3"])
    with pytest.raises(ServeError, match="command not found"):
        server.run(["/nonexistent/tool"])


def test_find_free_nbd(tmp_path) -> None:
    block = tmp_path / "block"
    for name, size, busy in [("nbd0", "100", True), ("nbd1", "0", False), ("nbd10", "0", False),
                             ("sda", "0", False)]:
        (block / name).mkdir(parents=True)
        (block / name / "size").write_text(size + "\n")
        if busy:
            (block / name / "pid").write_text("1\n")
    assert server.find_free_nbd(str(tmp_path)) == "/dev/nbd1"
    (block / "nbd1" / "pid").write_text("2\n")
    assert server.find_free_nbd(str(tmp_path)) == "/dev/nbd10"
    (block / "nbd10" / "size").write_text("8\n")
    with pytest.raises(ServeError, match="no free"):
        server.find_free_nbd(str(tmp_path))


def _runconf(tmp_path) -> RunConf:
    return RunConf(
        run_dir=str(tmp_path), package_dir=str(PKG.parent), backend="image:/x",
        extents=(Extent(16, 80), Extent(100, 200)),
        ranges=(PhysRange(0, 1 << 20, 4096), PhysRange(1 << 30, (1 << 30) + 4096, 0)),
        copies=2, size_bytes=1 << 20, min_distance_bytes=4096, scrub_rate=0,
        status_interval=0.5, protect=False, plan_summary={"dump_level": 31},
    )


def test_runconf_round_trip(tmp_path) -> None:
    rc = _runconf(tmp_path)
    path = str(tmp_path / "runconf.json")
    rc.write(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert RunConf.read(path) == rc
    assert rc.status_path == str(tmp_path / "status.json")
    doc = read_json(path)
    doc["version"] = 99
    atomic_write_json(path, doc)
    with pytest.raises(ConfigError, match="version 99"):
        RunConf.read(path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_json(str(tmp_path / "bad.json"))


def test_errno_mapping() -> None:
    assert errno_for(IntegrityError("x")) == errno.EIO
    assert errno_for(RefusedError("x")) == errno.EIO
    assert errno_for(BackendError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert errno_for(BackendError("no errno")) == errno.EIO
    assert errno_for(ValueError("range")) == errno.EINVAL
    assert errno_for(MemoryError()) == errno.ENOMEM
    assert errno_for(RuntimeError()) == errno.EIO


@pytest.mark.parametrize("copies", [1, 2, 3, 4])
def test_selftest_passes(copies, tmp_path) -> None:
    assert run_selftest(copies, str(tmp_path)) == SELFTEST_COUNT
    assert os.listdir(tmp_path) == []  # its scratch image is gone


def test_selftest_catches_a_broken_checksum(monkeypatch, tmp_path) -> None:
    import kdumpd.store.blockstore as bs

    monkeypatch.setattr(bs, "checksum", lambda buf: 0)  # verifies anything
    with pytest.raises(SelfTestError, match="self-test"):
        run_selftest(2, str(tmp_path))


def test_open_backend_specs(tmp_path) -> None:
    img = tmp_path / "img"
    img.write_bytes(bytes(1 << 20))
    mem = open_backend(f"image:{img}", (PhysRange(0, 1 << 20, 0),), (Extent(1, 2),))
    mem.close()
    with pytest.raises(ConfigError, match="not image:FILE"):
        open_backend("tcp:1", (), ())
    with pytest.raises(RefusedError, match="not a kdump kernel"):
        open_backend("devmem", (), (Extent(1, 2),))  # this test machine is no kdump kernel


def test_store_capacity_matches_the_store(tmp_path) -> None:
    from kdumpd.oldmem.image import ImageOldMem
    from kdumpd.store.blockstore import BlockStore

    for pages, copies in [(1200, 2), (70000, 3), (5000, 1)]:
        p = Placement.from_extents([Extent(1, 1 + pages)], copies, min_distance_bytes=4096)
        img = ImageOldMem.create(tmp_path / f"i{pages}", (pages + 2) * 4096)
        store = BlockStore(img, p, size_bytes=4096)
        assert store.stats().capacity_bytes == store_capacity(p)
        store.close()
        img.close()


def test_event_log_is_bounded() -> None:
    import logging

    ev = EventLog(maxlen=3)
    log = logging.getLogger("kdumpd.store.test_events")
    log.addHandler(ev)
    try:
        for i in range(5):
            log.warning("repair %d", i)
        log.info("not kept")
    finally:
        log.removeHandler(ev)
    assert [e["message"] for e in ev.snapshot()] == ["repair 2", "repair 3", "repair 4"]
    assert ev.count == 5


def test_protect_process_reports_each_step() -> None:
    done = protect_process()
    assert set(done) == {"io_flusher", "oom_score_adj"}
    assert all(isinstance(v, str) and v for v in done.values())


def test_plugin_uses_absolute_imports_only() -> None:
    plugin = Path(server.PLUGIN_PATH)
    for node in ast.walk(ast.parse(plugin.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0


def test_overcommit_is_always_only_for_the_exec(tmp_path) -> None:
    """nbdkit's 192 MiB .bss needs overcommit for its exec; the policy is put back after."""
    knob = tmp_path / "overcommit_memory"
    knob.write_text("0\n")
    seen = []
    with server.overcommit_for_exec(str(knob)):
        seen.append(knob.read_text())
    assert seen == ["1"] and knob.read_text() == "0"
    # Restored even when the exec fails.
    try:
        with server.overcommit_for_exec(str(knob)):
            raise OSError("exec failed")
    except OSError:
        pass
    assert knob.read_text() == "0"
    # An administrator's own policy is left alone; no knob, nothing happens.
    knob.write_text("2\n")
    with server.overcommit_for_exec(str(knob)):
        assert knob.read_text() == "2\n"
    with server.overcommit_for_exec(str(tmp_path / "none")):
        pass
