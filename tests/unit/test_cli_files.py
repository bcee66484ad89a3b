"""What a first-time user hit in the CLI (issue 15), each as the user's own command.

Never lose a user's file: ``plan --extents`` refuses its own inputs, directories, devices and
kernel interfaces, and writes atomically. Then: one line and the right exit code for files
that are missing or unusable, ``--debug`` that only adds the traceback, exclusive ``-d`` and
``--collector``, a survey header that names the level asked for, and help for every flag.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.synth.builder import Machine, template

from kdumpd.cli import build_parser, main
from kdumpd.errors import ConfigError, NotRunningError, RefusedError, VmcoreError

TOP = Path(__file__).resolve().parents[2]
EXTENTS = "0x4000 0x8000\n"


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """In-process ``serve`` and ``--debug`` reconfigure the root logger onto this test's
    captured stderr: put it back, or later tests log into a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    m = Machine(template("6.1"), ram=128 << 20)
    buddy = int(m.info["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"])
    for head in range(0x4000, 0x8000, 0x400):
        m.page(head, _mapcount=buddy, private=10)  # 64 MiB of free 4 MiB blocks
    return m.write(tmp_path_factory.mktemp("core") / "vmcore")


@pytest.fixture
def mine(core: Path, tmp_path: Path) -> Path:
    """A sparse copy of the core that a test may lose (and must not)."""
    dst = tmp_path / "vmcore"
    subprocess.run(["cp", "--sparse=always", str(core), str(dst)], check=True)
    return dst


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


# -- 1: plan --extents never destroys a file ----------------------------------------------------


@pytest.mark.parametrize("how", ["same", "hardlink", "symlink", "dotted"])
def test_plan_refuses_to_overwrite_its_vmcore(mine: Path, how: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`kdumpd plan V --extents V` once replaced the vmcore with the extents list, exit 0."""
    target = {"same": mine, "hardlink": mine.parent / "link", "symlink": mine.parent / "sym",
              "dotted": mine.parent / "." / mine.name}[how]
    if how == "hardlink":
        os.link(mine, target)
    elif how == "symlink":
        target.symlink_to(mine)
    before = _stamp(mine)
    assert main(["plan", str(mine), "--extents", str(target)]) == ConfigError.exit_code
    assert "same file" in _one_line(capsys)
    assert _stamp(mine) == before
    assert main(["survey", str(mine)]) == 0  # still a vmcore


def test_plan_refuses_to_overwrite_its_host_iomem(core: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    iomem = tmp_path / "iomem"
    iomem.write_text("00000000-07ffffff : System RAM\n")
    rc = main(["plan", str(core), "--host-iomem", str(iomem), "--extents", str(iomem)])
    assert rc == ConfigError.exit_code and "same file" in _one_line(capsys)
    assert iomem.read_text() == "00000000-07ffffff : System RAM\n"


@pytest.mark.parametrize("where,text", [
    ("DIR", "is a directory"),
    ("/dev/null", "not a regular file"),
    ("/proc/version", "under /proc"),
    ("/proc/self/kdumpd-extents", "under /proc"),
    ("/sys/kernel/kdumpd-extents", "under /sys"),
    ("/nonexistent/dir/x", "directory /nonexistent/dir: No such file or directory"),
    ("FILE/x", "is not a directory"),
])
def test_plan_refuses_what_is_not_a_place_for_a_file(
        core: Path, tmp_path: Path, where: str, text: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A directory, a device, /proc or /sys, a missing directory: one line, exit 2, nothing
    written (these were tracebacks, or an exit 0 that wrote into /dev/null)."""
    (tmp_path / "file").write_text("keep\n")
    path = where.replace("DIR", str(tmp_path)).replace("FILE", str(tmp_path / "file"))
    assert main(["plan", str(core), "--extents", path]) == ConfigError.exit_code
    assert text in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_plan_dash_is_standard_output(core: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(core), "--extents", "-"]) == 0
    out = capsys.readouterr()
    assert out.out == EXTENTS and "written to standard output" in out.err
    assert not (tmp_path / "-").exists()


def test_plan_replaces_a_file_whole_and_keeps_its_mode(core: Path, tmp_path: Path) -> None:
    out = tmp_path / "extents"
    out.write_text("old\n" * 1000)
    out.chmod(0o640)
    assert main(["plan", str(core), "--extents", str(out)]) == 0
    assert out.read_text() == EXTENTS and (out.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extents"]


def test_a_failed_write_leaves_the_old_file(core: Path, tmp_path: Path) -> None:
    """A write that fails half-way (here: a 4-byte file size limit, as a full disk would)
    leaves the previous file intact and no temporary file behind; it used to leave half a
    file and a traceback."""
    out = tmp_path / "extents"
    out.write_text("previous extents\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4, 4))

    env = dict(os.environ, PYTHONPATH=str(TOP / "daemon"), PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-m", "kdumpd", "plan", str(core), "--extents",
                        str(out)], capture_output=True, text=True, env=env, preexec_fn=limit,
                       timeout=120, check=False)
    assert r.returncode == ConfigError.exit_code, r.stderr
    assert "Traceback" not in r.stderr and "write failed" in r.stderr
    assert out.read_text() == "previous extents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extents"]


# -- 10: named input files ----------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--host-iomem", "--host-cmdline"])
def test_missing_host_file_is_one_line(core: Path, flag: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["survey", str(core), flag, "/nonexistent"]) == ConfigError.exit_code
    assert f"{flag} /nonexistent: No such file or directory" in _one_line(capsys)


@pytest.mark.parametrize("text", ["garbage\n", "", "System RAM 0-fff\n"])
def test_host_iomem_that_is_not_iomem_is_an_error(core: Path, tmp_path: Path, text: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A garbage --host-iomem was accepted silently: rule 8 then checked nothing."""
    iomem = tmp_path / "iomem"
    iomem.write_text(text)
    out = tmp_path / "extents"
    rc = main(["plan", str(core), "--host-iomem", str(iomem), "--extents", str(out)])
    assert rc == ConfigError.exit_code and "--host-iomem" in _one_line(capsys)
    assert not out.exists()


# -- 11: --debug only adds the traceback ------------------------------------------------------


@pytest.mark.parametrize("argv,code", [
    (["--debug", "survey", "EMPTY"], VmcoreError.exit_code),
    (["survey", "EMPTY", "--debug"], VmcoreError.exit_code),
    (["--debug", "plan", "CORE", "-d", "0", "--extents", "OUT"], RefusedError.exit_code),
    (["plan", "CORE", "-d", "0", "--extents", "OUT", "--debug"], RefusedError.exit_code),
])
def test_debug_keeps_the_exit_code(core: Path, tmp_path: Path, argv: list[str], code: int,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").write_bytes(b"")
    subst = {"EMPTY": str(tmp_path / "empty"), "CORE": str(core), "OUT": str(tmp_path / "x")}
    assert main([subst.get(a, a) for a in argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("kdumpd: ")
    assert not (tmp_path / "x").exists()


# -- 8 and 5: the dump level --------------------------------------------------------------------


def test_dump_level_and_collector_are_exclusive(core: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """-d was ignored without a word when --collector was also given."""
    with pytest.raises(SystemExit) as exc:
        main(["survey", str(core), "-d", "31", "--collector", "cp"])
    assert exc.value.code == 2
    assert "not allowed with" in _one_line(capsys)


@pytest.mark.parametrize("argv,level", [
    (["-d", "0"], 0), (["-d", "1"], 1), (["--collector", "makedumpfile"], 0),
    (["--collector", "cp"], None), (["-d", "31"], 31),
])
def test_survey_names_the_level_asked_for(core: Path, argv: list[str], level: int | None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`survey -d 0` said "dump level 31" in its header and JSON while refusing level 0."""
    assert main(["survey", str(core), *argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dump_level"] == level
    assert main(["survey", str(core), *argv]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    if level is None:
        assert "excludes nothing" in header and "31" not in header
    else:
        assert header.endswith(f"dump level {level}")


# -- 13 and 14: serve's named files, status without a daemon -----------------------------------


def test_missing_kernel_cmdline_file_is_an_error(core: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["serve", str(core), "--backend", "image:/nonexistent", "--run-dir",
               str(tmp_path / "run"), "--config", os.devnull, "--kernel-cmdline",
               "/nonexistent", "--report", ""])
    assert rc == ConfigError.exit_code
    assert "kernel command line file /nonexistent" in _one_line(capsys)


@pytest.mark.parametrize("where,text", [
    ("/proc/kdumpd-run", "under /proc"),
    ("/sys/kdumpd-run", "under /sys"),
    ("FILE/run", "Not a directory"),
    ("FILE", "exists and is not a directory"),
])
def test_serve_run_dir_that_cannot_be_one(core: Path, tmp_path: Path, where: str, text: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("keep\n")
    run_dir = where.replace("FILE", str(tmp_path / "file"))
    rc = main(["serve", str(core), "--backend", "image:/nonexistent", "--run-dir", run_dir,
               "--config", os.devnull, "--kernel-cmdline", os.devnull, "--report", ""])
    assert rc == ConfigError.exit_code
    assert text in _one_line(capsys)
    assert (tmp_path / "file").read_text() == "keep\n"


@pytest.mark.parametrize("where,text", [
    ("DIR", "is a directory"),
    ("DIR/file", "exists and is not a socket"),
    ("DIR/nodir/sock", "(kdumpd does not create it)"),
])
def test_serve_socket_path_checked_before_planning(core: Path, tmp_path: Path, where: str,
                                                   text: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("keep\n")
    rc = main(["serve", str(core), "--backend", "image:/nonexistent", "--run-dir",
               str(tmp_path / "run"), "--socket", where.replace("DIR", str(tmp_path)),
               "--config", os.devnull, "--kernel-cmdline", os.devnull, "--report", ""])
    assert rc == ConfigError.exit_code
    assert text in _one_line(capsys)
    assert (tmp_path / "file").read_text() == "keep\n"
    assert not (tmp_path / "nodir").exists()
    assert not (tmp_path / "run" / "kdumpd.pid").exists()


def test_status_json_with_nothing_running(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["status", "--json", "--run-dir", str(tmp_path), "--config", os.devnull])
    assert rc == NotRunningError.exit_code
    doc = json.loads(capsys.readouterr().out)
    assert doc["running"] is False and doc["state"] == "not running"


# -- 15: help -----------------------------------------------------------------------------------


def _subparsers(parser: object) -> dict[str, object]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_help_shows_no_internal_docstring(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "the only place that prints" not in out and "Nothing here decides" not in out
    assert "exit codes:" in out


def test_every_flag_says_what_it_means_and_its_default() -> None:
    import argparse

    missing = []
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        assert isinstance(sub, argparse.ArgumentParser)
        assert sub.description, f"{name} has no description"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            if not text or (action.option_strings and not action.required
                            and "default" not in text):
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_readme_synopsis_brackets_optional_flags() -> None:
    readme = (TOP / "README.md").read_text()
    block = readme[readme.index("## Commands"):readme.index("`survey` prints")]
    assert "kdumpd serve [VMCORE] [--backend auto|" in block
    assert "[--as none|swap|scratch]" in block
    assert "kdumpd status [--json] [--run-dir DIR]" in block
    assert "kdumpd stop [--run-dir DIR]" in block
    assert "--extents FILE|-" in block


@pytest.mark.parametrize("content,text",
                         [(b"", "the file is empty"), (b"hello\n" * 20, "not an ELF")])
@pytest.mark.parametrize("command", ["survey", "dmesg"])
def test_a_file_that_is_no_vmcore_is_named(tmp_path: Path, content: bytes, text: str,
                                           command: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "mycore"
    bad.write_bytes(content)
    assert main([command, str(bad)]) == VmcoreError.exit_code
    line = _one_line(capsys)
    assert f"{bad}: " in line and text in line


def test_mce_policy_choices_are_the_gates() -> None:
    """The CLI lists --mce-policy's choices without importing the gate (start-up time)."""
    from kdumpd import cli
    from kdumpd.safety.gate import MCE_POLICIES

    assert tuple(cli.MCE_CHOICES) == tuple(MCE_POLICIES)


def test_help_imports_no_planner() -> None:
    """`kdumpd --help` starts without the vmcore reader, the classifier or the gate."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kdumpd.cli; "
            "print(' '.join(m for m in sys.modules if m.startswith('kdumpd')))")
    top = Path(__file__).resolve().parents[2] / "daemon"
    out = subprocess.run([sys.executable, "-I", "-c", code, str(top)], capture_output=True,
                         text=True, check=True).stdout.split()
    for heavy in ("kdumpd.plan", "kdumpd.mm.classify", "kdumpd.vmcore.core", "kdumpd.plan.gated",
                  "kdumpd.serve.lifecycle"):
        assert heavy not in out, out
