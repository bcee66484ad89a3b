"""The checks every path kdumpd creates goes through before it is created.

Both outputs kdumpd makes at a path the user names (the extents file, the server's socket)
must land in a directory that exists (kdumpd never creates one: a typo would scatter files) and
must know what is there already before deciding to replace it. One place says so, with one
wording.
"""

from __future__ import annotations

import os
import stat

from kdumpd.errors import ConfigError

__all__ = ["existing_entry"]


def existing_entry(path: str, where: str, *, follow: bool = True,
                   hint: str = "") -> os.stat_result | None:
    """The stat of what ``path`` names now (``lstat`` if not ``follow``), None if nothing.

    ConfigError (naming ``where``) if the parent directory is missing or not a directory
    (``hint`` is appended to that message), if the entry cannot be looked at, or if it is a
    directory.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        pst = os.stat(parent)
    except OSError as exc:
        raise ConfigError(f"{where}: directory {parent}: {exc.strerror}{hint}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise ConfigError(f"{where}: {parent} is not a directory")
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{where}: is a directory")
    return st
