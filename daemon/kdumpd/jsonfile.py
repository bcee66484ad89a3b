"""JSON files that other processes read while they change: written whole or not at all.

The run directory's files (runconf.json, state.json, status.json, error.json, report.json)
are read by another process (the plugin, ``kdumpd status``, the supervisor) at any moment, so
every write goes to a temporary file that is renamed over the old one. Imports ``errors`` only.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kdumpd.errors import ConfigError

__all__ = ["atomic_write_json", "read_json"]


def atomic_write_json(path: str, doc: Any, *, mode: int = 0o600) -> None:
    """Write ``doc`` as JSON to a temporary file beside ``path`` and rename it over ``path``,
    so a reader sees the old file or the new one, never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json(path: str) -> Any:
    """The JSON document in ``path``; ConfigError (one line naming the file) if it cannot be
    read or is not JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
