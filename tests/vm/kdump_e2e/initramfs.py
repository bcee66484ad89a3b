"""Build the capture initramfs with dracut (and without kdumpd, to measure what it adds).

The host's dracut is used as installed; our modules are added through a private copy of its
base directory (symlinks to every stock file and module, plus 99kdumpd and the test's
98kdumpd-e2e), so nothing under /usr/lib/dracut changes.

The module set is the core of a kdump-utils initramfs (its kdumpbase depends on base,
shutdown and systemd) without the dump-target modules the test does not need.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parents[2]
KDUMPD_MODULE = TOP / "initramfs-hooks" / "dracut" / "99kdumpd"
E2E_MODULE = HERE / "dracut" / "98kdumpd-e2e"
STOCK = Path("/usr/lib/dracut")
CORE_MODULES = ("base", "shutdown", "systemd", "systemd-initrd", "dracut-systemd")
COMPRESS = "zstd"
# dracut module 99kdumpd packs its payload into this squashfs, mounted at PAYLOAD_MOUNT.
PAYLOAD = "/usr/lib/kdumpd/payload.squashfs"
PAYLOAD_MOUNT = "/usr/lib/kdumpd/payload"


class BuildError(Exception):
    pass


@dataclass(frozen=True)
class Image:
    path: Path
    compressed: int  # bytes of the image file
    unpacked: int  # bytes of the cpio archive(s) after decompression: what the kernel unpacks

    def to_json(self) -> dict[str, int | str]:
        return {"path": str(self.path), "compressed": self.compressed, "unpacked": self.unpacked}


def dracut_tree(workdir: Path) -> Path:
    """A dracut base directory: the stock one plus our modules, all symlinks."""
    tree = workdir / "dracut"
    if tree.exists():
        shutil.rmtree(tree)
    (tree / "modules.d").mkdir(parents=True)
    for entry in STOCK.iterdir():
        if entry.name != "modules.d":
            (tree / entry.name).symlink_to(entry)
    for mod in (STOCK / "modules.d").iterdir():
        (tree / "modules.d" / mod.name).symlink_to(mod)
    (tree / "modules.d" / KDUMPD_MODULE.name).symlink_to(KDUMPD_MODULE)
    (tree / "modules.d" / E2E_MODULE.name).symlink_to(E2E_MODULE)
    return tree


def build(
    release: str,
    out: Path,
    tree: Path,
    *,
    modules: tuple[str, ...],
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Image:
    """``dracut -m MODULES`` for kernel ``release`` into ``out``; its sizes."""
    cmd = [
        "dracut", "--no-hostonly", "--force", "--no-early-microcode", "--reproducible",
        "--compress", COMPRESS, "-m", " ".join(modules), "--kver", release, str(out),
    ]
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["dracutbasedir"] = str(tree)
    # The host's python3 in PATH may be a pyenv or venv one; dracut helpers must see Debian's.
    full_env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BuildError(f"dracut failed for {release} ({' '.join(modules)}):\n{tail}")
    return Image(out, out.stat().st_size, unpacked_size(out))


def _decompressor_for(data: bytes) -> list[str]:
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return ["zstd", "-dc"]
    if data.startswith(b"\x1f\x8b"):
        return ["gzip", "-dc"]
    if data.startswith(b"\xfd7zXZ"):
        return ["xz", "-dc"]
    return ["cat"]


def unpacked_size(image: Path) -> int:
    """Bytes of the decompressed archive (skipping an early uncompressed cpio, if any)."""
    skip = subprocess.run([str(STOCK / "skipcpio"), str(image)], capture_output=True, check=True)
    data = subprocess.run(_decompressor_for(skip.stdout), input=skip.stdout,
                          capture_output=True, check=True).stdout
    return len(data)


def unpack(image: Path, dest: Path) -> Path:
    """Extract the image into ``dest`` (for the chroot smoke test)."""
    dest.mkdir(parents=True, exist_ok=True)
    skip = subprocess.run([str(STOCK / "skipcpio"), str(image)], capture_output=True, check=True)
    data = subprocess.run(_decompressor_for(skip.stdout), input=skip.stdout,
                          capture_output=True, check=True).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=data, cwd=dest, check=True,
                   capture_output=True)
    # kdumpd's payload image, extracted where kdumpd-image.service mounts it in the guest.
    payload = dest / PAYLOAD.lstrip("/")
    if payload.exists():
        subprocess.run(["unsquashfs", "-f", "-q", "-no-xattrs", "-d",
                        str(dest / PAYLOAD_MOUNT.lstrip("/")), str(payload)],
                       check=True, capture_output=True)
    return dest


def payload_size(root: Path) -> int:
    """Bytes of kdumpd's squashfs payload in an unpacked image (0 if it has none)."""
    payload = root / PAYLOAD.lstrip("/")
    return payload.stat().st_size if payload.exists() else 0
