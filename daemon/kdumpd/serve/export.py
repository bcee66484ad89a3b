"""The export: the store as nbdkit serves it (backend, placement, store, scrubber, status file).

:class:`Service` is what the plugin holds. It is built in nbdkit's ``get_ready`` (before any
connection; a failure there makes nbdkit exit and is written to ``error.json`` for the daemon),
its threads start in ``after_fork`` (nbdkit kills threads made before a fork), and it stops in
``cleanup``. Per request there is nothing here: the plugin calls the store's bound methods.

Threads, all daemon threads inside nbdkit:

- ``kdumpd-scrub``: :class:`~kdumpd.store.scrub.Scrubber` at ``scrub_rate`` bytes/s;
- ``kdumpd-status``: writes ``status.json`` atomically every ``status_interval`` seconds
  (and once more, with ``state: stopped``, at cleanup).

Store warnings and errors (repairs, quarantines, lost blocks) are also kept, bounded, in the
status file's ``events`` so the post-mortem report can show what was repaired.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import threading
import time
from typing import Any

from kdumpd.errors import IntegrityError, KdumpdError, RefusedError
from kdumpd.jsonfile import atomic_write_json
from kdumpd.oldmem.backend import open_backend
from kdumpd.serve.procs import process_rss
from kdumpd.serve.runconf import RunConf
from kdumpd.store.blockstore import BlockStore
from kdumpd.store.placement import Placement
from kdumpd.store.scrub import Scrubber

__all__ = ["EventLog", "Service", "errno_for", "write_error"]

log = logging.getLogger(__name__)

_MAX_EVENTS = 200


def errno_for(exc: BaseException) -> int:
    """The errno an NBD client should see for ``exc`` (docs/store.md, "Errors")."""
    if isinstance(exc, IntegrityError | RefusedError):
        return errno.EIO
    if isinstance(exc, OSError) and exc.errno:  # BackendError is an OSError
        return int(exc.errno)
    if isinstance(exc, ValueError):
        return errno.EINVAL
    if isinstance(exc, MemoryError):
        return errno.ENOMEM
    return errno.EIO


class _ScrubView:
    """The store as the scrubber sees it, with a cheaper ``next_written``.

    ``BlockStore.next_written`` scans a 64 Ki-block window per call (~90 us measured), and the
    scrubber calls it once per block: at 16 MiB/s that is a fifth of a core holding the GIL,
    taken from the NBD requests. Here the next few blocks are probed with ``locate`` first
    (~1 us each, one lock hold each); only a run of unwritten blocks falls back to the scan.
    """

    _PROBES = 32

    def __init__(self, store: BlockStore) -> None:
        self._store = store
        self.copies = store.copies
        self.block_size = store.block_size
        self.verify_block = store.verify_block

    def next_written(self, block: int) -> int | None:
        store = self._store
        if store.fast_path is not None:
            return store.next_written(block)  # a C scan, no probing needed
        end = min(block + self._PROBES, store.nblocks)
        for b in range(block, end):
            if store.locate(b) is not None:
                return b
        return store.next_written(end) if end < store.nblocks else None


class EventLog(logging.Handler):
    """Keeps the last store warnings and errors (repairs, quarantines, losses) for the report."""

    def __init__(self, maxlen: int = _MAX_EVENTS) -> None:
        super().__init__(logging.WARNING)
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format must never break the I/O path
            msg = str(record.msg)
        self.count += 1
        self._events.append({"time": round(record.created, 3), "level": record.levelname,
                             "message": msg})

    def snapshot(self) -> list[dict[str, Any]]:
        return list(self._events)


class Service:
    """The block store over old memory plus its background threads and status file."""

    def __init__(self, rc: RunConf, *, protections: dict[str, str] | None = None) -> None:
        self.rc = rc
        self.protections = dict(protections or {})
        self.started = time.time()
        self.events = EventLog()
        logging.getLogger("kdumpd.store").addHandler(self.events)
        self.placement = Placement.from_extents(
            rc.extents, rc.copies, min_distance_bytes=rc.min_distance_bytes
        )
        self.backend = open_backend(rc.backend, rc.ranges, rc.extents)
        try:
            self.store = BlockStore(self.backend, self.placement, size_bytes=rc.size_bytes)
        except BaseException:
            self.backend.close()
            raise
        self.scrubber = (Scrubber(_ScrubView(self.store),  # type: ignore[arg-type]
                                  rate_bytes_per_s=rc.scrub_rate)
                         if rc.scrub_rate > 0 else None)
        self._stop = threading.Event()
        self._status_thread: threading.Thread | None = None
        self._status_lock = threading.Lock()
        self._closed = False
        stats = self.store.stats()
        if rc.size_bytes > stats.capacity_bytes:
            log.warning("device is %d MiB but old memory holds only %d MiB at %d copies: writes "
                        "past that fail with ENOSPC", rc.size_bytes >> 20,
                        stats.capacity_bytes >> 20, rc.copies)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scrubber and the status writer (call after nbdkit has forked)."""
        if self.scrubber is not None:
            self.scrubber.start()
        self.write_status("serving")
        self._status_thread = threading.Thread(target=self._status_loop, name="kdumpd-status",
                                               daemon=True)
        self._status_thread.start()

    def stop(self) -> None:
        """Stop the threads, flush, write the final status, close the backend. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self.scrubber is not None:
            self.scrubber.stop()
        if self._status_thread is not None:
            self._status_thread.join(5.0)
        try:
            self.store.flush()
        except KdumpdError as exc:
            log.error("flush at stop failed: %s", exc)
        try:
            self.write_status("stopped")
        except OSError as exc:  # a full run directory must not skip closing the backend
            log.warning("cannot write %s: %s", self.rc.status_path, exc.strerror or exc)
        self._closed = True
        logging.getLogger("kdumpd.store").removeHandler(self.events)
        self.store.close()  # its C fast path maps the backend: let go first
        self.backend.close()

    def _status_loop(self) -> None:
        failing = False  # warn once per streak: a full run directory must not flood the log
        while not self._stop.wait(self.rc.status_interval):
            try:
                self.write_status("serving")
            except Exception as exc:  # keep serving whatever the status file does
                if not failing:
                    log.warning("cannot write %s: %s (status is stale until it can)",
                                self.rc.status_path, exc)
                failing = True
                continue
            if failing:
                log.info("status: %s written again", self.rc.status_path)
                failing = False

    # -- status ------------------------------------------------------------------------------

    def status(self, state: str) -> dict[str, Any]:
        s = self.store.stats()
        scrub: dict[str, Any] = {"rate_bytes_per_s": self.rc.scrub_rate}
        if self.scrubber is not None:
            r = self.scrubber.report()
            scrub.update(passes=r.passes, blocks_checked=r.blocks_checked,
                         bytes_read=r.bytes_read, blocks_repaired=r.blocks_repaired,
                         blocks_lost=r.blocks_lost)
        return {
            "state": state,
            "pid": os.getpid(),
            "time": round(time.time(), 3),
            "started": round(self.started, 3),
            "backend": self.rc.backend,
            "copies": s.copies,
            "size_bytes": s.size_bytes,
            "capacity_bytes": s.capacity_bytes,
            "used_bytes": s.used_blocks * 4096,
            "free_bytes": s.free_bytes,
            "metadata_bytes": s.metadata_bytes,
            "placement": self.placement.describe(),
            "min_distance_bytes": self.placement.min_distance_bytes,
            "integrity": {
                "detected": s.corruptions_detected,
                "repaired": s.repaired,
                "quarantined": s.quarantined_slots,
                "relocated": s.relocations,
                "lost": s.lost_blocks,
                "scrubbed_blocks": s.scrubbed_blocks,
            },
            "requests": {
                "reads": s.reads, "writes": s.writes, "trims": s.trims, "zeroes": s.zeroes,
                "blocks_read": s.blocks_read, "blocks_written": s.blocks_written,
            },
            "scrub": scrub,
            "rss_bytes": process_rss(),
            "rss_anon_bytes": process_rss("self", "RssAnon"),
            "locked_bytes": process_rss("self", "VmLck"),  # VMA sizes: with on-fault
            # locking, more than is resident; rss_anon_bytes is what the lock really costs
            "protections": self.protections,
            "events": self.events.snapshot(),
            "events_total": self.events.count,
        }

    def write_status(self, state: str) -> None:
        with self._status_lock:
            atomic_write_json(self.rc.status_path, self.status(state))


def write_error(path: str, exc: BaseException) -> None:
    """Record a startup failure for the daemon: class name, one-line message, exit code."""
    code = exc.exit_code if isinstance(exc, KdumpdError) else 1
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        atomic_write_json(path, {"class": type(exc).__name__, "message": msg,
                                 "exit_code": code})
    except OSError as err:
        log.error("cannot write %s: %s", path, err)

