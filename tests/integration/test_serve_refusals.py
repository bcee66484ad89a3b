"""Bad configuration and refusals: one line naming the key (and its source) or the rule, a
non-zero exit, no nbdkit, and not one byte written to the image."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import kdumpd, sparse_copy


@pytest.fixture(scope="module")
def pristine(vmcore: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A copy of the vmcore that no test may change, and its modification stamp. A write
    through the store's shared mapping updates the file's mtime at the first fault; the
    full digest is compared once, after the module's last test."""
    img = sparse_copy(vmcore, tmp_path_factory.mktemp("pristine") / "vmcore.img")
    digest = _digest(img)
    yield img, _stamp(img)
    assert _digest(img) == digest, "a refused or misconfigured serve wrote into the image"


def _stamp(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_size}"


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _serve(vmcore: Path, image: Path, run_dir: Path, *extra: str,
           config: str = os.devnull, cmdline: str = os.devnull) -> subprocess.CompletedProcess[str]:
    return kdumpd("serve", str(vmcore), "--backend", f"image:{image}", "--run-dir", str(run_dir),
                  "--config", config, "--kernel-cmdline", cmdline, "--report", "", *extra,
                  timeout=120)


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("kdumpd: ") and "Error" in ln]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return errors[0]


CONFIG_CASES = [
    # (config file text, kernel cmdline, flags, exit code, expected text)
    ("copies = 2\ncopise = 3\n", "", [], 2, "kdumpd.conf:2: unknown key 'copise'"),
    ("copies = 9\n", "", [], 2, "kdumpd.conf:1: copies must be 1..4, not 9"),
    ("size = 12345\n", "", [], 2, "kdumpd.conf:1: size must be a multiple of 4096"),
    ("as = scratch\n", "", [], 2, "as = 'scratch' (", ),
    ("copies 2\n", "", [], 2, "kdumpd.conf:1: expected 'key = value'"),
    ("", "quiet kdumpd.copies=7 ro", [], 2, "kernel command line: kdumpd.copies=7: copies"),
    ("", "kdumpd.scrub_rat=1M", [], 2, "kernel command line: kdumpd.scrub_rat=1M: unknown key"),
    ("", "kdumpd.dump-level=40", [], 2, "kdumpd.dump-level=40: dump_level must be 0..31"),
    ("", "", ["--copies", "0"], 2, "--copies 0: copies must be 1..4"),
    ("", "", ["--threads", "many"], 2, "--threads many: threads 'many' is not a whole number"),
    ("", "", ["--backend", "tcp:1234"], 2, "--backend tcp:1234: backend must be auto"),
    ("", "", ["--mount", "/mnt"], 2, "mount = '/mnt' (--mount /mnt) only applies"),
]


@pytest.mark.parametrize("conf,cmdline,flags,code,text", CONFIG_CASES)
def test_bad_config_names_key_and_source(vmcore, pristine, tmp_path, conf, cmdline, flags,
                                         code, text) -> None:
    img, stamp = pristine
    cfg = tmp_path / "kdumpd.conf"
    cfg.write_text(conf)
    cl = tmp_path / "cmdline"
    cl.write_text(cmdline)
    r = _serve(vmcore, img, tmp_path / "run", *flags, config=str(cfg), cmdline=str(cl))
    assert r.returncode == code, r.stderr
    line = _one_line(r)
    assert "ConfigError" in line and text in line, line
    assert not (tmp_path / "run" / "kdumpd.sock").exists()
    assert _stamp(img) == stamp


def test_missing_explicit_config_file(vmcore, pristine, tmp_path) -> None:
    img, _ = pristine
    r = _serve(vmcore, img, tmp_path / "run", config=str(tmp_path / "nope.conf"))
    assert r.returncode == 2
    assert "nope.conf does not exist" in _one_line(r)


def test_precedence_file_cmdline_flags(vmcore, pristine, tmp_path) -> None:
    """The config file sets copies and size; the kernel command line overrides copies; an
    explicit flag overrides the kernel command line. Seen through a refusal: the file's 1 GiB
    minimum copy distance cannot be met, and the refusal happens before any write."""
    img, stamp = pristine
    cfg = tmp_path / "kdumpd.conf"
    cfg.write_text("# test\ncopies = 1\nmin_distance = 1G\n")
    cl = tmp_path / "cmdline"
    cl.write_text("ro kdumpd.copies=3\n")
    r = _serve(vmcore, img, tmp_path / "run", config=str(cfg), cmdline=str(cl))
    assert r.returncode == 6
    assert "cannot hold 3 copies" in _one_line(r)
    r = _serve(vmcore, img, tmp_path / "run", "--copies", "2", config=str(cfg), cmdline=str(cl))
    assert "cannot hold 2 copies" in _one_line(r)
    assert _stamp(img) == stamp


@pytest.mark.parametrize("extra,code,text", [
    (["--backend", "devmem"], 6, "devmem: not a kdump kernel"),
    (["--backend", "auto"], 6, "devmem: not a kdump kernel"),
    (["--backend", "vmcore"], 6, "the vmcore backend is /proc/vmcore only"),
    (["--copies", "4", "--min-distance", "512M"], 6, "placement: a pool of"),
    (["--dump-level", "1"], 6, "dump level 1 excludes no page class"),
    (["--nbdkit", "/nonexistent/nbdkit"], 9, "cannot start /nonexistent/nbdkit"),
    (["--as", "swap", "--size", "8G"], 6, "swap is never thin"),
])
def test_refusals_before_the_first_write(vmcore, pristine, tmp_path, extra, code, text) -> None:
    img, stamp = pristine
    args = list(extra)
    if args[:2] in (["--backend", "devmem"], ["--backend", "auto"], ["--backend", "vmcore"]):
        r = kdumpd("serve", str(vmcore), "--run-dir", str(tmp_path / "run"), "--config",
                   os.devnull, "--kernel-cmdline", os.devnull, "--report", "", *args)
    else:
        r = _serve(vmcore, img, tmp_path / "run", *args)
    assert r.returncode == code, r.stderr
    assert text in _one_line(r)
    assert not (tmp_path / "run" / "kdumpd.sock").exists()
    assert _stamp(img) == stamp


def test_plugin_rejects_unknown_parameters(tmp_path) -> None:
    from kdumpd.nbd.server import PLUGIN_PATH

    r = subprocess.run(["nbdkit", "-U", str(tmp_path / "s"), "--exit-with-parent", "python",
                        PLUGIN_PATH, "bogus=1"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "unknown parameter: bogus" in r.stderr
    r = subprocess.run(["nbdkit", "-U", str(tmp_path / "s"), "python", PLUGIN_PATH],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "runconf parameter is required" in r.stderr


def test_fatal_machine_check_crash_is_refused_with_a_report(tmp_path: Path) -> None:
    """serve on a real crash caused by a fatal machine check: rule 1 in one line, a non-zero
    exit before any write, the reason in the report and in `kdumpd status`; with the
    exclude-range policy it serves."""
    from tests.realcores import vmcore_dir

    mce = vmcore_dir("mce-6.1") / "vmcore"
    image = sparse_copy(mce, tmp_path / "mce.img")
    stamp = _stamp(image)
    run_dir = tmp_path / "run"
    report = tmp_path / "crash" / "kdumpd-report.json"
    report.parent.mkdir()
    r = kdumpd("serve", str(mce), "--backend", f"image:{image}", "--run-dir", str(run_dir),
               "--config", os.devnull, "--kernel-cmdline", os.devnull, "--report", str(report),
               "--collector", "makedumpfile -l -d 31", timeout=120)
    assert r.returncode == 6
    line = _one_line(r)
    assert "rule 1 (hardware memory error)" in line and "Hardware Error" in line
    import json

    doc = json.loads(report.read_text())
    assert doc["state"] == "refused" and "rule 1" in doc["reason"]
    st = kdumpd("status", "--run-dir", str(run_dir), timeout=30)
    assert st.returncode != 0 and "refused: rule 1" in st.stderr
    assert _stamp(image) == stamp, "a refused serve wrote into the image"
