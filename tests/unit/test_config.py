"""kdumpd.config: precedence (defaults < file < kernel command line < flags), and every error
naming the key and its source."""

from __future__ import annotations

import pytest

from kdumpd.config import (
    KEYS,
    format_size,
    load_config,
    parse_config_file,
    parse_kernel_cmdline,
    parse_size,
)
from kdumpd.errors import ConfigError
from kdumpd.units import human_size


def load(tmp_path, conf: str = "", cmdline: str = "", flags: dict[str, str] | None = None):
    path = tmp_path / "kdumpd.conf"
    path.write_text(conf)
    return load_config(flags or {}, path=str(path), cmdline=cmdline)


def test_defaults(tmp_path) -> None:
    cfg = load_config({}, path=str(tmp_path / "absent.conf"), cmdline="")
    assert cfg.copies == 2 and cfg.dump_level == 31 and cfg.backend == "auto"
    assert cfg.vmcore == "/proc/vmcore" and cfg.run_dir == "/run/kdumpd"
    assert cfg.socket == "/run/kdumpd/kdumpd.sock"
    assert cfg.size == 0 and not cfg.attach and cfg.use_as == "none"
    assert all(src == "default" for src in cfg.sources.values())
    assert set(cfg.values) == set(KEYS)


def test_precedence_and_sources(tmp_path) -> None:
    cfg = load(tmp_path, "copies = 1\nscrub_rate = 1M\nthreads = 4\n",
               "quiet kdumpd.copies=3 kdumpd.threads=8", {"threads": "2"})
    assert cfg.copies == 3 and cfg.sources["copies"] == "kernel command line"
    assert cfg["scrub_rate"] == 1 << 20 and cfg.sources["scrub_rate"].endswith("kdumpd.conf:2")
    assert cfg["threads"] == 2 and cfg.sources["threads"] == "--threads 2"
    assert cfg.to_json()["threads"] == {"value": 2, "source": "--threads 2"}


def test_file_syntax(tmp_path) -> None:
    cfg = load(tmp_path, "# comment\n\n  dump-level = 23   # trailing\nSWAP_PRIORITY=5\n")
    assert cfg.dump_level == 23 and cfg["swap_priority"] == 5


@pytest.mark.parametrize("conf,msg", [
    ("copise = 2\n", "kdumpd.conf:1: unknown key 'copise'"),
    ("\ncopies = 5\n", "kdumpd.conf:2: copies must be 1..4, not 5"),
    ("copies = two\n", "kdumpd.conf:1: copies 'two' is not a whole number"),
    ("copies\n", "kdumpd.conf:1: expected 'key = value'"),
    ("copies = 1\ncopies = 2\n", "kdumpd.conf:2: copies is already set at"),
    ("attach = maybe\n", "kdumpd.conf:1: attach 'maybe' is not yes/no"),
    ("size = 1000\n", "kdumpd.conf:1: size must be a multiple of 4096 bytes, not 1000"),
    ("size = lots\n", "size 'lots' is not a size"),
    ("backend = nfs\n", "backend must be auto, vmcore, devmem or image:FILE"),
    ("backend = image:\n", "backend must be auto"),
    ("device = /dev/sda\n", "device must be auto or /dev/nbdN"),
    ("as = zram\n", "as must be one of none, swap, scratch"),
    ("min_distance = 100\n", "min_distance must be a multiple of 4096"),
    ("status_interval = 0\n", "status_interval must be 0.05..3600 seconds"),
    ("run_dir =\n", "run_dir must not be empty"),
])
def test_file_errors_name_line_and_key(tmp_path, conf, msg) -> None:
    with pytest.raises(ConfigError, match="") as info:
        load(tmp_path, conf)
    assert msg in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cmdline,msg", [
    ("kdumpd.copies=0", "kernel command line: kdumpd.copies=0: copies must be 1..4"),
    ("ro kdumpd.nope=1", "kernel command line: kdumpd.nope=1: unknown key 'nope'"),
    ("kdumpd.copies", "kernel command line: kdumpd.copies: copies needs a value"),
    ("kdumpd.bogus", "kernel command line: kdumpd.bogus: unknown key 'bogus'"),
])
def test_cmdline_errors(tmp_path, cmdline, msg) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, cmdline=cmdline)
    assert msg in str(info.value)


def test_flag_errors_name_the_flag(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^--dump-level 99: dump_level must be 0\.\.31"):
        load(tmp_path, flags={"dump_level": "99"})


def test_cmdline_parsing() -> None:
    got = parse_kernel_cmdline('root=/dev/sda kdumpd.attach "kdumpd.mount=/a b" '
                               'kdumpdx.copies=9 -- kdumpd.copies=9')
    assert got["attach"][0] is True
    assert got["mount"][0] == "/a b"
    assert "copies" not in got  # after "--" the parameters are init's, not the kernel's


def test_cross_key_rules(tmp_path) -> None:
    cfg = load(tmp_path, "as = swap\n")
    assert cfg.attach and cfg.sources["attach"] == "implied by as = swap"
    with pytest.raises(ConfigError, match="needs attach = yes"):
        load(tmp_path, "as = swap\nattach = no\n")
    with pytest.raises(ConfigError, match="needs a mount point"):
        load(tmp_path, "as = scratch\n")
    with pytest.raises(ConfigError, match=r"mount = '/m' \(.*kdumpd.conf:1\) only applies"):
        load(tmp_path, "mount = /m\n")
    with pytest.raises(ConfigError, match="only applies with attach = yes"):
        load(tmp_path, "device = /dev/nbd3\n")
    cfg = load(tmp_path, "as = scratch\nmount = /mnt/dump\ndevice = /dev/nbd3\n")
    assert cfg.mount == "/mnt/dump" and cfg["device"] == "/dev/nbd3"


def test_missing_and_unreadable_files(tmp_path) -> None:
    load_config({}, path=str(tmp_path / "absent"), cmdline="")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({}, path=str(tmp_path / "absent"), path_required=True, cmdline="")
    bad = tmp_path / "bin.conf"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config({}, path=str(bad), cmdline="")


def test_cmdline_read_from_file(tmp_path) -> None:
    cl = tmp_path / "cmdline"
    cl.write_bytes(b"ro kdumpd.copies=4\0")
    cfg = load_config({}, path=str(tmp_path / "absent"), cmdline_path=str(cl))
    assert cfg.copies == 4


def test_sizes() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64K") == 65536 and parse_size("64k") == 65536
    assert parse_size("2MiB") == 2 << 20 and parse_size("1.5G") == 3 << 29
    assert parse_size("0x1000") == 4096
    for bad in ("", "G", "-1M", "1Q"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert format_size(2 << 20) == "2M" and format_size(1000) == "1000"
    assert human_size(512) == "512 B" and human_size(3 << 20) == "3.0 MiB"


def test_file_parser_is_pure() -> None:
    assert parse_config_file("copies = 3", "x.conf") == {"copies": (3, "x.conf:1")}


def test_example_documents_every_key_and_parses(tmp_path) -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "docs" / "kdumpd.conf.example"
    text = example.read_text()
    for key in KEYS:
        assert f"#{key} =" in text, key
    # Uncommenting every default gives the defaults back (mount/socket are empty there).
    lines = [ln[1:] for ln in text.splitlines() if ln.startswith("#") and " = " in ln
             and not ln.startswith("# ")]
    cfg = load(tmp_path, "\n".join(lines) + "\n")
    defaults = load_config({}, path=str(tmp_path / "absent"), cmdline="")
    assert dict(cfg.values) == dict(defaults.values)
