"""nbdkit python plugin: kdumpd's block store over old memory, as an NBD export.

    nbdkit [--swap] -U SOCKET python kdumpd_plugin.py runconf=RUN_DIR/runconf.json [pkgdir=DIR]

Thin on purpose: parse the config, build :class:`kdumpd.serve.export.Service` from the run
configuration ``kdumpd serve`` wrote, map each callback to the store, map errors to errno with
``nbdkit.set_error``. It runs as ``__main__`` inside nbdkit's embedded interpreter (Debian's
/usr/bin/python3), so it uses absolute imports and finds the package itself (see
``_import_kdumpd``).

Performance: nbdkit's worker threads have no Python thread state, so CPython creates and
destroys one around every callback (QD1 4 KiB reads: 59 us without the fix below, 37 us with
it; nbd_plugin/README.md says how it was measured). :func:`_keep_thread_state` takes one
extra, never-released ``PyGILState_Ensure`` per worker thread, once, so the thread state lives
as long as the thread and a callback only takes and drops the GIL.
"""

import builtins
import contextlib
import ctypes
import json
import os
import sys
import threading
from typing import Any, NoReturn

import nbdkit

API_VERSION = 2

_params: dict[str, str] = {}
_service: Any = None  # kdumpd.serve.export.Service, once get_ready has run
_size = 0
_fast_read: Any = None  # the store's C fast path (None: Python only), tried first
_fast_write: Any = None
_readinto: Any = None  # the store's bound methods, looked up once
_write: Any = None
_trim: Any = None
_zero: Any = None
_flush: Any = None
_errno_for: Any = None
_runconf = ""


def _record_error(exc: BaseException) -> None:
    # Tell the daemon why startup failed (one line, the error class) before nbdkit exits.
    run_dir = None
    try:
        with builtins.open(_params["runconf"], encoding="utf-8") as fh:
            run_dir = json.load(fh)["run_dir"]
    except Exception:
        pass
    if run_dir is None:
        return
    try:
        from kdumpd.serve.export import write_error

        write_error(os.path.join(run_dir, "error.json"), exc)
    except Exception:
        pass


def _import_kdumpd(pkgdir: str) -> None:
    """Import ``kdumpd`` from ``pkgdir`` (the directory holding the package), whatever is on
    this interpreter's path. The directory is removed from sys.path once the package is
    imported: submodules resolve through the package itself, and xxhash, cffi and the rest
    keep coming from this interpreter's own (Debian's) site-packages."""
    pkgdir = os.path.abspath(pkgdir)
    if not os.path.isfile(os.path.join(pkgdir, "kdumpd", "__init__.py")):
        raise RuntimeError(f"kdumpd package not found in {pkgdir}")
    sys.path.insert(0, pkgdir)
    try:
        import kdumpd
    finally:
        sys.path.remove(pkgdir)
    where = os.path.dirname(os.path.dirname(os.path.abspath(kdumpd.__file__)))
    if where != pkgdir:
        raise RuntimeError(f"imported kdumpd from {where}, expected {pkgdir}")


def _default_pkgdir() -> str:
    # The source tree: nbd_plugin/ next to daemon/.
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "daemon")


# -- configuration -------------------------------------------------------------------------


def config(key: str, value: str) -> None:
    if key in ("runconf", "pkgdir"):
        _params[key] = value
    else:
        raise RuntimeError(f"unknown parameter: {key} (expected runconf=FILE [pkgdir=DIR])")


def config_complete() -> None:
    global _runconf
    if "runconf" not in _params:
        raise RuntimeError("runconf parameter is required")
    try:
        with builtins.open(_params["runconf"], encoding="utf-8") as fh:  # open is a callback here
            doc = json.load(fh)
        pkgdir = _params.get("pkgdir") or doc.get("package_dir") or _default_pkgdir()
        _import_kdumpd(pkgdir)
        import logging

        logging.basicConfig(level=str(doc.get("log_level", "info")).upper(),
                            format="kdumpd-plugin: %(levelname)s: %(message)s",
                            stream=sys.stderr)
        _runconf = _params["runconf"]
    except Exception as exc:
        _record_error(exc)
        raise


def thread_model() -> int:
    # The store takes its own lock per request; requests overlap in nbdkit's C code.
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def get_ready() -> None:
    global _service, _size, _readinto, _write, _trim, _zero, _flush, _errno_for
    global _fast_read, _fast_write
    try:
        from kdumpd.nbd.protect import protect_process
        from kdumpd.nbd.selftest import run_selftest
        from kdumpd.serve.export import Service, errno_for
        from kdumpd.serve.runconf import RunConf

        rc = RunConf.read(_runconf)
        if rc.selftest:
            run_selftest(rc.copies, rc.run_dir)
        protections = protect_process() if rc.protect else {}
        _service = Service(rc, protections=protections)
    except Exception as exc:
        _record_error(exc)
        raise
    store = _service.store
    _size = rc.size_bytes
    _readinto, _write, _trim, _zero, _flush = (
        store.readinto, store.write, store.trim, store.zero, store.flush)
    if store.fast_path is not None:
        _fast_read, _fast_write = store.fast_path.read_request, store.fast_path.write_request
    _errno_for = errno_for


def after_fork() -> None:
    # Memory locks do not survive fork, so they are taken here, in the serving process.
    if _service.rc.mlock == "onfault":
        from kdumpd.nbd.protect import mlockall

        _service.protections["mlockall"] = mlockall(onfault=True)
    elif _service.rc.mlock == "all":
        _service.protections["mlockall"] = "all (nbdkit --swap)"
    _service.start()


def cleanup() -> None:
    if _service is not None:
        _service.stop()


# -- the thread-state trick ----------------------------------------------------------------

_ensure = ctypes.pythonapi.PyGILState_Ensure
_ensure.argtypes = []
_ensure.restype = ctypes.c_int
_tls = threading.local()


_KEEP = os.environ.get("KDUMPD_NO_KEEP_TSTATE") != "1"  # off only to measure what it buys


def _keep_thread_state() -> None:
    # Called with the GIL held, inside a callback, when this thread's local is fresh (so its
    # thread state is the one nbdkit's PyGILState_Ensure just made). One more Ensure that is
    # never released keeps the count above zero, so nbdkit's Release no longer destroys it.
    if _KEEP:
        _ensure()
    _tls.kept = True


# -- per connection ------------------------------------------------------------------------


def open(readonly: bool) -> int:  # noqa: A001 - nbdkit's callback name
    return 1


def get_size(h: int) -> int:
    return _size


def block_size(h: int) -> tuple[int, int, int]:
    return (1, 4096, 32 << 20)


def is_rotational(h: int) -> bool:
    return False


def can_write(h: int) -> bool:
    return True


def can_flush(h: int) -> bool:
    return True


def can_trim(h: int) -> bool:
    return True


def can_zero(h: int) -> bool:
    return True


def can_fast_zero(h: int) -> bool:
    return True  # whole blocks are freed in the table; only partial edges are written


def can_fua(h: int) -> int:
    # A write is in old memory (its final place) when pwrite returns: nothing to force.
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(h: int) -> bool:
    return True  # one store in one process serves every connection


def can_cache(h: int) -> int:
    return int(nbdkit.CACHE_NONE)


# -- data path -----------------------------------------------------------------------------

# The C fast path, tried first, needs no gate: its reader-writer lock is taken in C without
# the GIL, so its waiters never spin. On the Python path (unaligned requests, new or zero
# blocks, repairs, stores without the fast path) multi-block requests queue here, blocked in
# the kernel, before they reach the store. The
# store hashes them in C with the GIL released while it holds its own mutex; other threads
# then take the GIL and spin on that mutex (it yields the GIL up to 200 times before it
# blocks), and with 16 workers a 64 KiB request cost 2-3x its CPU (measured in process: 64 KiB
# writes 97 -> 54 us CPU per request with 16 threads). One-block requests hash with the GIL
# held, never spin, and stay ungated (gating them costs more than it saves).
_multi: contextlib.AbstractContextManager[Any] = threading.Lock()
if os.environ.get("KDUMPD_NO_MULTI_GATE") == "1":  # to measure what the gate buys
    _multi = contextlib.nullcontext()


def _fail(exc: BaseException) -> NoReturn:
    nbdkit.set_error(_errno_for(exc))
    # A short exception for nbdkit's log: the store's own log already has the details.
    raise RuntimeError(f"{type(exc).__name__}: {exc}") from None


def pread(h: int, buf: memoryview, offset: int, flags: int) -> None:
    if "kept" not in _tls.__dict__:
        _keep_thread_state()
    try:
        if _fast_read is not None and _fast_read(offset, buf):
            return  # aligned, every block verified, done in C without the GIL
        if len(buf) > 4096:
            with _multi:
                _readinto(offset, buf)
        else:
            _readinto(offset, buf)
    except Exception as exc:
        _fail(exc)


def pwrite(h: int, buf: memoryview, offset: int, flags: int) -> None:
    if "kept" not in _tls.__dict__:
        _keep_thread_state()
    try:
        if _fast_write is not None and _fast_write(offset, buf):
            return  # an aligned overwrite, done in C without the GIL
        if len(buf) > 4096:
            with _multi:
                _write(offset, buf)
        else:
            _write(offset, buf)
    except Exception as exc:
        _fail(exc)


def trim(h: int, count: int, offset: int, flags: int) -> None:
    if "kept" not in _tls.__dict__:
        _keep_thread_state()
    try:
        _trim(offset, count)
    except Exception as exc:
        _fail(exc)


def zero(h: int, count: int, offset: int, flags: int) -> None:
    if "kept" not in _tls.__dict__:
        _keep_thread_state()
    try:
        _zero(offset, count)
    except Exception as exc:
        _fail(exc)


def flush(h: int, flags: int) -> None:
    try:
        _flush()
    except Exception as exc:
        _fail(exc)

