"""The NBD socket's path: what may be replaced, and whether a server answers on it.

A Unix socket path is a file in someone's directory. ``serve`` once replaced a regular file
named by ``--socket`` with its socket (and deleted it at stop), and took over the live socket of
another daemon. The rules, checked before planning and again before nbdkit starts:

- the directory must exist (kdumpd creates its run directory, never the socket's directory);
- a path that exists must be a socket, and one that no server answers on (connect() refused:
  a stale socket left by a killed daemon); anything else is refused;
- at teardown the path is removed only if it is still a socket nobody answers on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct

from kdumpd.errors import ConfigError, RefusedError
from kdumpd.pathcheck import existing_entry

__all__ = ["answers", "check_socket_path", "remove_if_stale"]


_NBDMAGIC = b"NBDMAGIC"
_IHAVEOPT = b"IHAVEOPT"
_NBD_OPT_ABORT = 2
_CLIENT_FLAGS = 3  # NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES


def _leave_politely(sock: socket.socket) -> None:
    """After connect(): read the NBD newstyle greeting and end with NBD_OPT_ABORT, so that
    nbdkit sees a client that said goodbye, not a broken handshake (one error line in the
    journal per ``kdumpd status``)."""
    with contextlib.suppress(OSError):
        greeting = b""
        while len(greeting) < 18:
            chunk = sock.recv(18 - len(greeting))
            if not chunk:
                return
            greeting += chunk
        if greeting[:16] != _NBDMAGIC + _IHAVEOPT:
            return
        sock.sendall(struct.pack(">I", _CLIENT_FLAGS)
                     + _IHAVEOPT + struct.pack(">II", _NBD_OPT_ABORT, 0))
        sock.recv(20)  # the server's acknowledgement (or EOF)


def _probe(path: str, timeout: float = 2.0) -> int:
    """0 if a server accepts a connection on the Unix socket ``path``, else the errno."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError:
            return 0  # a listener with a full backlog is still a live server
        except OSError as exc:
            return exc.errno or errno.EIO
        _leave_politely(sock)
        return 0


def answers(path: str) -> bool:
    """True if a server accepts connections on the Unix socket ``path``."""
    return _probe(path) == 0


def _stale(path: str) -> bool:
    """True if ``path`` is a socket whose connect() is refused (no listener)."""
    return _probe(path) == errno.ECONNREFUSED


def check_socket_path(path: str, flag: str = "--socket") -> None:
    """Refuse a socket path that serving would create in a missing directory or that would
    replace something other than a stale socket. ConfigError (exit 2) for a bad path,
    RefusedError (exit 6) for a socket a live server answers on."""
    where = f"{flag} {path}"
    st = existing_entry(path, where, follow=False, hint=" (kdumpd does not create it)")
    if st is None:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{where}: exists and is not a socket: refusing to replace it")
    err = _probe(path)
    if err == 0:
        raise RefusedError(f"{where}: a server answers on this socket (another kdumpd?): "
                           "refusing to take it over")
    if err != errno.ECONNREFUSED:
        raise ConfigError(f"{where}: cannot tell whether a server uses it: {os.strerror(err)}")


def remove_if_stale(path: str) -> bool:
    """Remove ``path`` if it is a socket nobody answers on; True if removed."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode) or not _stale(path):
            return False
    except OSError:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True
