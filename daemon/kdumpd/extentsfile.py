"""The extents file ``kdumpd plan`` writes: one ``start end`` pair of hex pfns per line.

Writing it is the one place the offline commands create a file the user named, so it is
guarded like a careful system tool: the path is checked before the (slow) planning starts, and
is refused if it is an input of the same run (same inode: ``plan V --extents V`` once replaced
a vmcore with 864 bytes), a directory, a device or anything else that is not a regular file, or
lies under /proc or /sys. The file is written to a temporary file in the same directory and
renamed over the target only when complete, so a failure (disk full, file size limit, a
signal) leaves the old file as it was and never half a new one. ``-`` means standard output.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Sequence

from kdumpd.errors import ConfigError
from kdumpd.pathcheck import existing_entry
from kdumpd.units import Extent

__all__ = ["STDOUT", "check_output_path", "format_extents", "read_extents_file",
           "write_extents_file"]

STDOUT = "-"
_PSEUDO_FS = ("/proc", "/sys")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def check_output_path(path: str, inputs: Sequence[str] = (), flag: str = "--extents") -> None:
    """Refuse an output path that would destroy or cannot hold what the user asked for.

    ``inputs`` are the files the run reads (vmcore, --host-iomem, ...): writing over one of
    them, by any name or hard link, is refused. Raises ConfigError naming the path and why.
    """
    if path == STDOUT:
        return
    where = f"{flag} {path}"
    if not path:
        raise ConfigError(f"{flag}: empty path")
    real = os.path.realpath(path)
    for top in _PSEUDO_FS:
        if _under(real, top):
            raise ConfigError(f"{where}: refusing to write under {top} (a kernel interface, "
                              "not a place for files)")
    st = existing_entry(real, where)
    if st is None:
        return
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: not a regular file (a device, pipe or socket); "
                          f"use {flag} - for standard output")
    for name in inputs:
        with contextlib.suppress(OSError):
            ist = os.stat(name)
            if (ist.st_dev, ist.st_ino) == (st.st_dev, st.st_ino):
                raise ConfigError(f"{where}: is the input {name} (same file): refusing to "
                                  "overwrite it")


def format_extents(extents: Iterable[Extent]) -> str:
    """One ``start end`` pair per line, hex pfns, half-open, in the given (sorted) order."""
    return "".join(f"{ext.start_pfn:#x} {ext.end_pfn:#x}\n" for ext in extents)


def _atomic_write(path: str, text: str, where: str) -> None:
    real = os.path.realpath(path)  # a symlink's target is replaced, the link is kept
    directory = os.path.dirname(real) or "."
    try:
        mode = stat.S_IMODE(os.stat(real).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot create a file in {directory}: {exc.strerror}") \
            from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, real)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"{where}: write failed ({exc.strerror}); nothing written") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_extents_file(path: str, extents: Sequence[Extent], inputs: Sequence[str] = ()) -> None:
    """Write ``extents`` to ``path`` (``-``: standard output) atomically, after
    :func:`check_output_path`."""
    check_output_path(path, inputs)
    text = format_extents(extents)
    if path == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    _atomic_write(path, text, f"--extents {path}")


def read_extents_file(path: str) -> list[Extent]:
    """Parse an extents file written by :func:`write_extents_file`; rejects unsorted input.
    Raises ConfigError naming the file and line."""
    out: list[Extent] = []
    try:
        with open(path, encoding="ascii") as fh:
            lines = fh.readlines()
    except OSError as exc:
        raise ConfigError(f"extents file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"extents file {path} is not ASCII text") from None
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 2:
                raise ValueError("expected 'start end'")
            ext = Extent(int(parts[0], 16), int(parts[1], 16))
        except ValueError as exc:
            raise ConfigError(f"{path}:{lineno}: {exc}") from None
        if out and ext.start_pfn <= out[-1].end_pfn:
            raise ConfigError(f"{path}:{lineno}: extents not sorted and coalesced")
        out.append(ext)
    return out
