"""Protections against the NBD swap deadlock for a process on the device's I/O path.

When the kernel swaps to (or writes back a filesystem on) /dev/nbdX, the server must answer
without needing memory that only that very I/O could free. Per process:

- ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`` (Linux 4.4): every page this process
  has touched, or will touch, stays in RAM, and untouched pages are *not* populated. nbdkit's
  own ``--swap`` is plain ``MCL_CURRENT | MCL_FUTURE``, which populates every mapping: Debian's
  nbdkit 1.32 carries 192 MiB of never-used static buffers in .bss and 8 MiB stacks per worker
  thread, so ``--swap`` costs ~200 MiB of a crash kernel's RAM (measured: VmLck 207 MiB for
  the null plugin), while on-fault locking costs only what is resident. nbd-client locks
  itself with ``-swap``;
- ``prctl(PR_SET_IO_FLUSHER, 1)`` (Linux 5.6, CAP_SYS_RESOURCE): the kernel marks the task
  PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE, so its own allocations never recurse into I/O;
  inherited across fork and kept across execve, so setting it in the daemon before it starts
  nbdkit covers nbdkit and nbd-client too;
- ``oom_score_adj = -1000``: the OOM killer never picks it (inherited as well).

Each step is best effort and reported: ``{"io_flusher": "on", "oom_score_adj": "-1000", ...}``
or the reason it could not be applied (not root, old kernel). Nothing here is per request.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

__all__ = [
    "MCL_CURRENT", "MCL_FUTURE", "MCL_ONFAULT", "PR_SET_IO_FLUSHER", "mlockall",
    "protect_process",
]

log = logging.getLogger(__name__)

PR_SET_IO_FLUSHER = 57
PR_GET_IO_FLUSHER = 58
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4


def _libc() -> ctypes.CDLL:
    # The C library this process already runs on (ctypes.util.find_library would import
    # subprocess, shutil and tempfile into nbdkit for nothing).
    return ctypes.CDLL(None, use_errno=True)


def _set_io_flusher() -> str:
    libc = _libc()
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        return f"failed: {os.strerror(err)}" + (" (needs CAP_SYS_RESOURCE)"
                                                if err == errno.EPERM else "")
    return "on" if libc.prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) == 1 else "set"


def _set_oom_score_adj(value: int) -> str:
    try:
        with open("/proc/self/oom_score_adj", "w", encoding="ascii") as fh:
            fh.write(str(value))
        with open("/proc/self/oom_score_adj", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError as exc:
        return f"failed: {exc.strerror}"


def mlockall(*, onfault: bool = True) -> str:
    """Lock this process's pages into RAM: with ``onfault``, the resident ones now and every
    page when it is first touched; without, every page of every mapping at once."""
    flags = MCL_CURRENT | MCL_FUTURE | (MCL_ONFAULT if onfault else 0)
    if _libc().mlockall(flags) != 0:
        return f"failed: {os.strerror(ctypes.get_errno())}"
    return "on fault" if onfault else "all"


def protect_process(*, lock_memory: str = "off") -> dict[str, str]:
    """Apply the protections to this process (io_flusher and oom_score_adj are inherited by
    its future children; memory locks are not). ``lock_memory``: "onfault", "all" or "off"."""
    done = {
        "io_flusher": _set_io_flusher(),
        "oom_score_adj": _set_oom_score_adj(-1000),
    }
    if lock_memory != "off":
        done["mlockall"] = mlockall(onfault=lock_memory == "onfault")
    for what, result in done.items():
        if result.startswith("failed"):
            log.warning("protection %s not applied: %s", what, result)
        else:
            log.debug("protection %s: %s", what, result)
    return done
