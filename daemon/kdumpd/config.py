"""Configuration: ``/etc/kdumpd.conf``, ``kdumpd.*=`` kernel parameters and flags -> Config.

Precedence, lowest first: built-in defaults, the config file, the kernel command line
(``kdumpd.copies=3``: the capture kernel's cmdline tunes a daemon whose unit file is fixed),
then command-line flags (what the operator typed wins). Every value remembers its source, and
every error names the key and the source, e.g.::

    /etc/kdumpd.conf:4: unknown key 'copise'
    kernel command line: kdumpd.copies=9: copies must be 1..4
    --size 12345: size must be a multiple of 4096 bytes

The file is ``key = value`` lines; ``#`` starts a comment; dashes and underscores in keys are
the same. ``docs/kdumpd.conf.example`` documents every key. This module imports ``errors``,
``cmdline`` and the backend spec's parser (``oldmem.spec``, pure) only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kdumpd.cmdline import iter_cmdline_params
from kdumpd.errors import ConfigError
from kdumpd.oldmem.spec import parse_backend

__all__ = [
    "DEFAULT_PATH",
    "KEYS",
    "Config",
    "format_size",
    "load_config",
    "load_serve_config",
    "parse_bool",
    "parse_kernel_cmdline",
    "parse_size",
]

DEFAULT_PATH = "/etc/kdumpd.conf"
_PREFIX = "kdumpd."
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``1.5G``, ``2MiB`` -> bytes (binary units); ValueError otherwise."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    number = t[: len(t) - len(unit)].strip()
    try:
        value = float(number) if "." in number else int(number, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 4096, 64K, 512M, 2G)") from None
    nbytes = int(value * _SIZE_UNITS[unit])
    if nbytes < 0:
        raise ValueError(f"{text!r} is negative")
    return nbytes


def format_size(nbytes: int) -> str:
    """The largest exact binary unit: 2097152 -> '2M', 4096 -> '4K', 1000 -> '1000'."""
    for unit in ("T", "G", "M", "K"):
        if nbytes and nbytes % _SIZE_UNITS[unit] == 0:
            return f"{nbytes // _SIZE_UNITS[unit]}{unit}"
    return str(nbytes)


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "yes", "true", "on", "y"):
        return True
    if t in ("0", "no", "false", "off", "n"):
        return False
    raise ValueError(f"{text!r} is not yes/no")


# -- the keys ---------------------------------------------------------------------------------


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 0)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be {lo}..{hi}, not {value}")
        return value

    return parse


def _choice(*names: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        t = text.strip().lower()
        if t not in names:
            raise ValueError(f"must be one of {', '.join(names)}, not {text!r}")
        return t

    return parse


def _path(text: str) -> str:
    t = text.strip()
    if not t:
        raise ValueError("must not be empty")
    if "\0" in t:
        raise ValueError("contains a NUL byte")
    return t


def _optional_path(text: str) -> str:
    return text.strip()


def _backend(text: str) -> str:
    return str(parse_backend(text))


def _size_auto(text: str) -> int:
    # 0 means "auto": the store's capacity.
    if text.strip().lower() == "auto":
        return 0
    nbytes = parse_size(text)
    if nbytes % 4096:
        raise ValueError(f"must be a multiple of 4096 bytes, not {nbytes}")
    return nbytes


def _rate(text: str) -> int:
    t = text.strip()
    if t.lower().endswith("/s"):
        t = t[:-2]
    return parse_size(t)


def _min_distance(text: str) -> int:
    nbytes = parse_size(text)
    if nbytes < 4096 or nbytes % 4096:
        raise ValueError(f"must be a multiple of 4096 bytes, at least 4096, not {nbytes}")
    return nbytes


def _seconds(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not 0.05 <= value <= 3600:
        raise ValueError(f"must be 0.05..3600 seconds, not {value}")
    return value


def _device(text: str) -> str:
    t = text.strip()
    if t == "auto":
        return t
    name = os.path.basename(t)
    if not (t.startswith("/dev/nbd") and name[3:].isdigit()):
        raise ValueError(f"must be auto or /dev/nbdN, not {text!r}")
    return t


def _text(text: str) -> str:
    return text.strip()


def _as(text: str) -> str:
    return _choice("none", "swap", "scratch")(text)


@dataclass(frozen=True, slots=True)
class _Key:
    parse: Callable[[str], Any]
    default: Any
    help: str


KEYS: dict[str, _Key] = {
    "vmcore": _Key(_path, "/proc/vmcore", "the crashed kernel's dump to plan from"),
    "backend": _Key(_backend, "auto",
                    "old memory: auto (writable /proc/vmcore if the kernel has it, else "
                    "/dev/mem), vmcore, devmem, or image:FILE (tests and dry runs)"),
    "dump_level": _Key(_int_range(0, 31), 31, "the dump level the collector uses"),
    "collector": _Key(_text, "",
                      "the collector's command line (empty: read /etc/kdump.conf or "
                      "/etc/default/kdump-tools; dump_level, if set, wins)"),
    "mce_policy": _Key(_choice("refuse", "exclude-range"), "refuse",
                       "after a hardware memory error: reuse nothing, or exclude the reported "
                       "address ranges"),
    "copies": _Key(_int_range(1, 4), 2, "copies of every block in old memory"),
    "run_dir": _Key(_path, "/run/kdumpd", "status, socket and state files (mode 0700)"),
    "socket": _Key(_optional_path, "", "the NBD Unix socket (default: RUN_DIR/kdumpd.sock)"),
    "size": _Key(_size_auto, 0, "device size; auto = the store's capacity"),
    "attach": _Key(parse_bool, False, "attach /dev/nbdX with nbd-client"),
    "as": _Key(_as, "none", "use the device as swap or as a scratch filesystem"),
    "mount": _Key(_optional_path, "", "mount point of the scratch filesystem"),
    "device": _Key(_device, "auto", "/dev/nbdN to attach, or auto (first free)"),
    "swap_priority": _Key(_int_range(-1, 32767), 100, "swapon priority"),
    "fstype": _Key(_choice("ext4", "ext2", "xfs"), "ext4", "scratch filesystem type"),
    "scrub_rate": _Key(_rate, 16 << 20, "scrubber rate in bytes of old memory/s; 0 = off"),
    "report": _Key(_optional_path, "/var/crash/kdumpd-report.json",
                   "where the JSON report goes (next to the dump); empty = RUN_DIR only"),
    "threads": _Key(_int_range(1, 64), 4,
                    "nbdkit worker threads per connection (more only add GIL handoffs)"),
    "min_distance": _Key(_min_distance, 2 << 20, "minimum distance between copies"),
    "protect": _Key(parse_bool, True,
                    "oom_score_adj -1000, PR_SET_IO_FLUSHER and mlockall on the I/O path"),
    "mlock": _Key(_choice("onfault", "all", "off"), "onfault",
                  "how nbdkit is locked in RAM once attached: onfault (the plugin locks pages "
                  "as they are touched), all (nbdkit --swap: every mapping, ~200 MiB more "
                  "with Debian's nbdkit 1.32), off"),
    "nbdkit": _Key(_path, "nbdkit", "the nbdkit binary"),
    "status_interval": _Key(_seconds, 1.0, "seconds between status.json updates"),
    "log_level": _Key(_choice("debug", "info", "warning", "error"), "info", "log level"),
}


@dataclass(frozen=True, slots=True)
class Config:
    """Every key's value, and where each came from ("default", "FILE:LINE", ...)."""

    values: Mapping[str, Any]
    sources: Mapping[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def vmcore(self) -> str:
        return str(self.values["vmcore"])

    @property
    def backend(self) -> str:
        return str(self.values["backend"])

    @property
    def dump_level(self) -> int:
        return int(self.values["dump_level"])

    @property
    def copies(self) -> int:
        return int(self.values["copies"])

    @property
    def run_dir(self) -> str:
        return str(self.values["run_dir"])

    @property
    def socket(self) -> str:
        return str(self.values["socket"]) or os.path.join(self.run_dir, "kdumpd.sock")

    @property
    def size(self) -> int:
        return int(self.values["size"])

    @property
    def attach(self) -> bool:
        return bool(self.values["attach"])

    @property
    def use_as(self) -> str:
        return str(self.values["as"])

    @property
    def mount(self) -> str:
        return str(self.values["mount"])

    def to_json(self) -> dict[str, Any]:
        return {k: {"value": v, "source": self.sources.get(k, "default")}
                for k, v in sorted(self.values.items())}


def _norm(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def _parse_one(key: str, text: str, where: str) -> Any:
    spec = KEYS.get(key)
    if spec is None:
        raise ConfigError(f"{where}: unknown key {key!r}")
    try:
        return spec.parse(text.strip())
    except ValueError as exc:
        raise ConfigError(f"{where}: {key} {exc}") from None


def parse_config_file(text: str, path: str) -> dict[str, tuple[Any, str]]:
    """``key = value`` lines -> {key: (value, "PATH:LINE")}; a repeated key is an error."""
    out: dict[str, tuple[Any, str]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        key, eq, value = line.partition("=")
        if not eq:
            raise ConfigError(f"{where}: expected 'key = value', got {raw.strip()!r}")
        k = _norm(key)
        if k in out:
            raise ConfigError(f"{where}: {k} is already set at {out[k][1]}")
        out[k] = (_parse_one(k, value, where), where)
    return out


def parse_kernel_cmdline(cmdline: str) -> dict[str, tuple[Any, str]]:
    """The ``kdumpd.KEY=VALUE`` parameters of a kernel command line (quotes group, ``--``
    ends the kernel's part, as in the kernel's ``parse_args``)."""
    out: dict[str, tuple[Any, str]] = {}
    for name, value in iter_cmdline_params(cmdline):
        if not name.startswith(_PREFIX):
            continue
        k = _norm(name[len(_PREFIX) :])
        shown = name if value is None else f"{name}={value}"
        where = f"kernel command line: {shown}"
        if value is None:
            if k in KEYS and KEYS[k].parse is parse_bool:
                value = "yes"
            else:
                raise ConfigError(f"{where}: " + (f"{k} needs a value" if k in KEYS
                                                   else f"unknown key {k!r}"))
        out[k] = (_parse_one(k, value, where), "kernel command line")
    return out


def load_config(
    flags: Mapping[str, str] | None = None,
    *,
    path: str = DEFAULT_PATH,
    path_required: bool = False,
    cmdline: str | None = None,
    cmdline_path: str = "/proc/cmdline",
) -> Config:
    """Merge defaults < ``path`` < kernel command line < ``flags``.

    ``flags`` maps a key to the flag's text (``{"copies": "3"}``); its source is shown as
    ``--copies 3``. A missing config file is fine unless ``path_required``. ``cmdline`` None
    reads ``cmdline_path`` (an unreadable one counts as empty).
    """
    values: dict[str, Any] = {k: spec.default for k, spec in KEYS.items()}
    sources: dict[str, str] = dict.fromkeys(KEYS, "default")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        if path_required:
            raise ConfigError(f"config file {path} does not exist") from None
        text = ""
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    layers = [parse_config_file(text, path)]
    if cmdline is None:
        try:
            with open(cmdline_path, "rb") as fh:
                cmdline = fh.read().decode("utf-8", "replace").replace("\0", " ")
        except OSError:
            cmdline = ""
    layers.append(parse_kernel_cmdline(cmdline))
    flag_layer: dict[str, tuple[Any, str]] = {}
    for key, text in (flags or {}).items():
        k = _norm(key)
        # vmcore is serve's positional argument: there is no --vmcore flag to name
        where = f"VMCORE argument {text}" if k == "vmcore" else f"--{k.replace('_', '-')} {text}"
        flag_layer[k] = (_parse_one(k, text, where), where)
    layers.append(flag_layer)
    for layer in layers:
        for k, (value, where) in layer.items():
            values[k] = value
            sources[k] = where
    _check_together(values, sources)
    return Config(values, sources)


def load_serve_config(
    flags: Mapping[str, str],
    *,
    config_path: str | None = None,
    cmdline_path: str | None = None,
) -> Config:
    """The configuration of serve, status and stop: :func:`load_config` over the files the
    user named. An explicit ``config_path`` or ``cmdline_path`` must exist and be readable (a
    file the user named that is missing is a mistake, not "no settings"); the defaults
    (/etc/kdumpd.conf, /proc/cmdline) may be absent."""
    cmdline: str | None = None
    if cmdline_path is not None:
        try:
            with open(cmdline_path, "rb") as fh:
                cmdline = fh.read().decode("utf-8", "replace").replace("\0", " ")
        except OSError as exc:
            raise ConfigError(f"kernel command line file {cmdline_path}: "
                              f"{exc.strerror}") from None
    return load_config(
        flags,
        path=config_path or DEFAULT_PATH,
        path_required=config_path is not None,
        cmdline=cmdline,
    )


def _check_together(values: dict[str, Any], sources: dict[str, str]) -> None:
    # Rules that span keys; the error names every key involved and its source.
    def src(k: str) -> str:
        return f"{k} = {values[k]!r} ({sources[k]})"

    if values["as"] == "scratch" and not values["mount"]:
        raise ConfigError(f"{src('as')} needs a mount point: set mount")
    if values["mount"] and values["as"] != "scratch":
        raise ConfigError(f"{src('mount')} only applies with as = scratch ({src('as')})")
    if values["as"] != "none" and not values["attach"]:
        # Using the device needs it attached: --as implies --attach unless attach was
        # explicitly refused.
        if sources["attach"] != "default":
            raise ConfigError(f"{src('as')} needs attach = yes ({src('attach')})")
        values["attach"] = True
        sources["attach"] = f"implied by as = {values['as']}"
    if values["device"] != "auto" and not values["attach"]:
        raise ConfigError(f"{src('device')} only applies with attach = yes")
