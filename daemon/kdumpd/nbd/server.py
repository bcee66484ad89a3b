"""The nbdkit command line and process, nbd-client attach, mkswap/swapon, mkfs/mount.

No block logic here: only processes. Every external command runs through :func:`run`, whose
failure is a one-line :class:`~kdumpd.errors.ServeError` naming the command and its last line
of stderr.

nbdkit runs in the foreground as the daemon's child, listening only on a Unix socket (created
under umask 077, so mode 0600; never TCP), with the parallel thread model (the plugin declares
it), and ``--swap`` (mlockall) only when asked (the plugin locks its own pages on fault).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kdumpd.errors import ServeError
from kdumpd.jsonfile import read_json
from kdumpd.nbd.sockpath import check_socket_path, remove_if_stale

__all__ = [
    "PLUGIN_PATH",
    "Nbdkit",
    "attach",
    "detach",
    "find_free_nbd",
    "make_scratch",
    "make_swap",
    "modprobe_nbd",
    "nbdkit_argv",
    "nbdkit_env",
    "run",
    "swapoff",
    "unmount",
]

log = logging.getLogger(__name__)

# nbd_plugin/ sits next to daemon/ in the source tree; an installed copy can be named with
# the KDUMPD_PLUGIN environment variable (the initramfs module installs it there).
PLUGIN_PATH = os.environ.get("KDUMPD_PLUGIN") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
    "nbd_plugin", "kdumpd_plugin.py",
)


def run(argv: Sequence[str], *, timeout: float = 120.0, input_text: str | None = None) -> str:
    """Run a command; its stdout, or ServeError with the last line of its stderr."""
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              input=input_text, check=False)
    except FileNotFoundError:
        raise ServeError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise ServeError(f"{' '.join(argv)}: no answer in {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ServeError(f"{' '.join(argv)} failed: {why}")
    return proc.stdout


# -- nbdkit ---------------------------------------------------------------------------------


def nbdkit_argv(
    *,
    runconf: str,
    socket: str | None,
    nbdkit: str = "nbdkit",
    plugin: str = PLUGIN_PATH,
    swap: bool = False,
    threads: int = 16,
    single: bool = False,
    exit_with_parent: bool = False,
    verbose: bool = False,
) -> list[str]:
    """The nbdkit command line. ``socket`` is the Unix socket (the only listener); ``single``
    serves one client on stdin/stdout instead (``-s``, for libnbd's connect_command)."""
    argv = [nbdkit]
    if single:
        argv.append("--single")
    else:
        if not socket:
            raise ServeError("nbdkit needs a Unix socket path (kdumpd never listens on TCP)")
        argv += ["--foreground", "--unix", socket]
    argv += ["--threads", str(threads)]
    if swap:
        argv.append("--swap")
    if exit_with_parent:
        argv.append("--exit-with-parent")
    if verbose:
        argv.append("--verbose")
    argv += ["python", plugin, f"runconf={runconf}"]
    return argv


def nbdkit_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("MALLOC_ARENA_MAX", "2")  # nbdkit's worker threads; keep the heap small
    # The embedded interpreter is Debian's libpython (prefix /usr): a venv's or pyenv's
    # variables would point it at the wrong standard library and site-packages. An embedded
    # CPython also finds its prefix by looking for "python3" on PATH, so a pyenv or venv
    # python3 first on PATH gives it that installation's sys.path (no Debian xxhash): put the
    # system directories first.
    for var in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(var, None)
    system = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    rest = [d for d in env.get("PATH", "").split(os.pathsep) if d and d not in system]
    env["PATH"] = os.pathsep.join(system + rest)
    return env


OVERCOMMIT_PATH = "/proc/sys/vm/overcommit_memory"


@contextmanager
def overcommit_for_exec(path: str = OVERCOMMIT_PATH) -> Iterator[None]:
    """Let the kernel map nbdkit's image, then put the overcommit policy back.

    Debian's nbdkit (1.32) has 192 MiB of .bss: never touched, but charged as one private
    mapping at exec. Under the default heuristic policy (0) the kernel refuses any single
    mapping larger than RAM + swap, and a capture kernel at crashkernel=192M has ~150 MiB of
    RAM and no swap yet: the exec fails ("__vm_enough_memory: ... not enough memory") and
    nbdkit dies with SIGSEGV. While nbdkit starts the policy is "always" (1); the previous
    value is restored as soon as it serves (or failed). Without root, or with another policy
    set by the administrator, nothing changes.
    """
    try:
        with open(path, encoding="ascii") as fh:
            before = fh.read().strip()
    except OSError:
        before = ""
    changed = False
    if before == "0":
        try:
            with open(path, "w", encoding="ascii") as fh:
                fh.write("1")
            changed = True
        except OSError:
            pass
    try:
        yield
    finally:
        if changed:
            try:
                with open(path, "w", encoding="ascii") as fh:
                    fh.write(before)
            except OSError as exc:
                log.warning("could not restore %s to %s: %s", path, before, exc.strerror)


@dataclass
class Nbdkit:
    """An nbdkit child serving the store on a Unix socket."""

    argv: list[str]
    socket: str
    status_path: str
    error_path: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> int:
        """Start nbdkit and wait until the plugin reports ``serving`` and the socket exists;
        return nbdkit's pid. A startup failure re-raises the plugin's error class."""
        for path in (self.status_path, self.error_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        # Never replace anything but a stale socket (checked again: time passed since serve
        # checked before planning).
        check_socket_path(self.socket)
        remove_if_stale(self.socket)
        log.info("starting %s", " ".join(self.argv))
        # Until nbdkit serves, not only until Popen returns: Popen returns when the exec has
        # closed its close-on-exec pipe, before the kernel maps the new image's .bss.
        with overcommit_for_exec():
            self._spawn_and_wait(timeout)
        mode = stat.S_IMODE(os.stat(self.socket).st_mode)
        if mode & 0o077:
            self.stop()
            raise ServeError(f"socket {self.socket} has mode {mode:o}, expected 600")
        assert self.proc is not None
        return self.proc.pid

    def _spawn_and_wait(self, timeout: float) -> None:
        try:
            self.proc = subprocess.Popen(self.argv, env=nbdkit_env(), umask=0o077,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise ServeError(f"cannot start {self.argv[0]}: {exc.strerror}") from None
        deadline = time.monotonic() + timeout
        chmodded = False
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise self._startup_error(rc)
            if not chmodded and os.path.exists(self.socket):
                # nbdkit creates the socket 0755 whatever the umask: make it 0600 at once
                # (the run directory is 0700, so nobody else could reach it meanwhile).
                os.chmod(self.socket, 0o600)
                chmodded = True
            if chmodded and self._ready():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"nbdkit did not become ready in {timeout:.0f} s")
            time.sleep(0.02)

    def _ready(self) -> bool:
        assert self.proc is not None
        try:
            doc = read_json(self.status_path)
        except Exception:
            return False
        return bool(doc.get("pid") == self.proc.pid and doc.get("state") == "serving")

    def _startup_error(self, rc: int) -> Exception:
        from kdumpd import errors  # the class named by the plugin's error.json

        try:
            doc = read_json(self.error_path)
        except Exception:
            return ServeError(f"nbdkit exited with status {rc} before serving (see its "
                              "messages above)")
        cls = getattr(errors, str(doc.get("class")), None)
        msg = str(doc.get("message", "nbdkit failed"))
        if isinstance(cls, type) and issubclass(cls, errors.KdumpdError):
            return cls(msg)
        return ServeError(f"nbdkit plugin: {doc.get('class')}: {msg}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it will not go; the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("nbdkit ignored SIGTERM for %.0f s: killing it", timeout)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# -- /dev/nbdX ------------------------------------------------------------------------------


def modprobe_nbd(sys_root: str = "/sys") -> None:
    if os.path.isdir(os.path.join(sys_root, "module", "nbd")):
        return
    run(["modprobe", "nbd"])
    if not os.path.isdir(os.path.join(sys_root, "module", "nbd")):
        raise ServeError("modprobe nbd succeeded but /sys/module/nbd is missing")


def find_free_nbd(sys_root: str = "/sys") -> str:
    """The first /dev/nbdN with no server attached (no ``pid`` file, size 0)."""
    block = os.path.join(sys_root, "block")
    try:
        names = sorted((n for n in os.listdir(block) if n.startswith("nbd") and n[3:].isdigit()),
                       key=lambda n: int(n[3:]))
    except OSError:
        names = []
    for name in names:
        if os.path.exists(os.path.join(block, name, "pid")):
            continue
        try:
            with open(os.path.join(block, name, "size"), encoding="ascii") as fh:
                if int(fh.read().strip() or "0") != 0:
                    continue
        except (OSError, ValueError):
            continue
        return f"/dev/{name}"
    raise ServeError("no free /dev/nbdN (all have a server attached)")


def attach(socket: str, device: str, *, swap: bool, timeout: float = 30.0,
           sys_root: str = "/sys") -> None:
    """Connect ``device`` to the server on ``socket`` with 4 KiB blocks; ``-swap`` makes
    nbd-client mlock itself and set oom_score_adj (it exits once the kernel holds the socket
    in netlink mode)."""
    argv = ["nbd-client", "-unix", socket, device, "-b", "4096"]
    if swap:
        argv.append("-swap")
    run(argv, timeout=timeout)
    name = os.path.basename(device)
    deadline = time.monotonic() + timeout
    size_path = os.path.join(sys_root, "block", name, "size")
    while time.monotonic() < deadline:
        try:
            with open(size_path, encoding="ascii") as fh:
                if int(fh.read().strip() or "0") > 0:
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise ServeError(f"{device} did not come up after nbd-client connected")


def detach(device: str) -> None:
    run(["nbd-client", "-d", device])


def make_swap(device: str, priority: int) -> None:
    run(["mkswap", device])
    run(["swapon", "--discard", "--priority", str(priority), device])


def swapoff(device: str) -> None:
    run(["swapoff", device], timeout=600.0)


def make_scratch(device: str, mountpoint: str, fstype: str) -> None:
    mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "ext2": ["mkfs.ext2", "-q", "-F"],
            "xfs": ["mkfs.xfs", "-q", "-f"]}[fstype]
    run([*mkfs, device], timeout=600.0)
    os.makedirs(mountpoint, exist_ok=True)
    run(["mount", "-t", fstype, "-o", "discard", device, mountpoint])


def unmount(mountpoint: str) -> None:
    run(["umount", mountpoint], timeout=600.0)
