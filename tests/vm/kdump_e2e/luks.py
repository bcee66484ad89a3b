"""The encrypted dump target of the e2e test (issue 10, scenario 1): a LUKS2 disk made on the
host, unlocked in the capture kernel by systemd-cryptsetup, read back on the host.

Why the volume is made this way: the host that runs the test has no device-mapper (no
`cryptsetup open`), so the harness does in user space what `cryptsetup open` + `mkfs.ext4` +
`cryptsetup close` would: `cryptsetup luksFormat` with a volume key of its choosing, then the
ext4 image made by mke2fs is encrypted sector by sector with that key (aes-xts-plain64, the
LUKS2 default; `python3-cryptography`). The guest's dm-crypt mounting it is the proof that this
equals what dm-crypt writes; reading back decrypts the same way.

cryptsetup caps Argon2's memory at format time to half of the free memory when the host has no
swap (its own heuristic, for the formatting host); the keyslot must say 1 GiB whatever the host,
so luksFormat runs in a private mount namespace whose /proc/meminfo shows swap. The header's
keyslot is then checked to carry exactly the requested cost.

The guest side: /etc/crypttab in the test initramfs (98kdumpd-e2e, `KDUMPD_E2E_LUKS_*`), a key
file beside it, dracut's `crypt` module (systemd-cryptsetup generator and binary); the unit it
generates is ordered after cryptsetup-pre.target, so after kdumpd.service.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20
SERIAL = "kdumpd-luks"
MAPPER = "kdumpdluks"  # /etc/crypttab's name: /dev/mapper/kdumpdluks in the guest
UUID = "6b64756d-7064-4c55-4b53-000000000001"
# Argon2id at 1 GiB (issue 10: so that the case does not depend on the host); 4 passes (the
# smallest cryptsetup accepts) instead of a benchmark of the formatting host.
PBKDF_MEMORY_KIB = 1048576
PBKDF_ITERATIONS = 4
SECTOR = 4096  # encryption sector (ext4's block; IVs still count 512-byte sectors)
KEY = b"kdumpd-e2e: the dump target's key file\n"
# The dracut modules the LUKS image adds (crypt pulls dm; the systemd module is already there).
DRACUT_MODULES = ("crypt",)


class LuksError(Exception):
    pass


@dataclass(frozen=True)
class LuksDisk:
    path: Path
    volume_key: bytes
    data_offset: int  # bytes: where the encrypted segment starts
    keyslot: dict[str, Any]  # the header's keyslot 0 (kdf: type, memory, time, cpus)


def key_file(workdir: Path) -> Path:
    path = workdir / "luks.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    return path


def _xts(volume_key: bytes, data: bytes, first_sector: int, encrypt: bool) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    alg = algorithms.AES(volume_key)
    out = bytearray()
    view = memoryview(data)
    for i in range(len(data) // SECTOR):
        # plain64: the IV counts 512-byte sectors whatever the encryption sector (LUKS2
        # never sets dm-crypt's iv_large_sectors).
        tweak = ((first_sector + i) * (SECTOR // 512)).to_bytes(16, "little")
        c = Cipher(alg, modes.XTS(tweak))
        op = c.encryptor() if encrypt else c.decryptor()
        out += op.update(view[i * SECTOR:(i + 1) * SECTOR])
    return bytes(out)


def _transform(src: Path, dst: Path, src_off: int, dst_off: int, length: int,
               volume_key: bytes, encrypt: bool) -> None:
    chunk = 16 * MIB
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        for pos in range(0, length, chunk):
            fi.seek(src_off + pos)
            data = fi.read(min(chunk, length - pos))
            if len(data) % SECTOR:
                raise LuksError("the LUKS data area is not a whole number of sectors")
            fo.seek(dst_off + pos)
            fo.write(_xts(volume_key, data, pos // SECTOR, encrypt))


def read_header(path: Path) -> dict[str, Any]:
    """The LUKS2 JSON metadata of the primary header."""
    with open(path, "rb") as f:
        head = f.read(4096)
        if head[:6] != b"LUKS\xba\xbe" or int.from_bytes(head[6:8], "big") != 2:
            raise LuksError(f"{path}: not a LUKS2 header")
        hdr_size = int.from_bytes(head[8:16], "big")
        text = f.read(hdr_size - 4096).split(b"\0", 1)[0]
    doc: dict[str, Any] = json.loads(text)
    return doc


def make_disk(path: Path, size_mib: int, workdir: Path) -> LuksDisk:
    """A LUKS2 disk (Argon2id, 1 GiB, 4 passes) holding an empty ext4 filesystem."""
    volume_key = os.urandom(64)  # aes-xts-plain64 with 2 x 256-bit keys
    vk = workdir / "luks.volume-key"
    vk.write_bytes(volume_key)
    key = key_file(workdir)
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    fake = workdir / "meminfo.swap"
    script = (
        'sed "s/^SwapTotal:.*/SwapTotal:       4194304 kB/" /proc/meminfo > "$1" && '
        'mount --bind "$1" /proc/meminfo && shift && exec "$@"')
    cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(fake),
           "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "argon2id",
           "--pbkdf-memory", str(PBKDF_MEMORY_KIB),
           "--pbkdf-force-iterations", str(PBKDF_ITERATIONS), "--sector-size", str(SECTOR),
           "--uuid", UUID, "--volume-key-file", str(vk), "--key-file", str(key), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LuksError(f"cryptsetup luksFormat: {(proc.stderr or proc.stdout).strip()[-300:]}")
    meta = read_header(path)
    seg = meta["segments"]["0"]
    slot = meta["keyslots"]["0"]
    kdf = slot.get("kdf", {})
    if (kdf.get("type"), kdf.get("memory"), kdf.get("time")) != (
            "argon2id", PBKDF_MEMORY_KIB, PBKDF_ITERATIONS):
        raise LuksError(f"the keyslot's PBKDF is not what was asked: {kdf}")
    if seg.get("encryption") != "aes-xts-plain64" or int(seg.get("sector_size", 0)) != SECTOR:
        raise LuksError(f"unexpected LUKS2 segment: {seg}")
    offset = int(seg["offset"])
    plain = workdir / "luks-plain.ext4"
    length = size_mib * MIB - offset
    with open(plain, "wb") as f:
        f.truncate(length)
    proc = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "kdumpd-luks",
                           str(plain)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LuksError(f"mke2fs (LUKS payload): {proc.stderr.strip()}")
    _transform(plain, path, 0, offset, length, volume_key, encrypt=True)
    plain.unlink()
    return LuksDisk(path, volume_key, offset, {"kdf": kdf, "key_size": slot.get("key_size"),
                                               "sector_size": SECTOR,
                                               "cipher": seg.get("encryption")})


def read_back(disk: LuksDisk, workdir: Path, dest: Path) -> Path | None:
    """Decrypt the disk's data area and copy final.kdump out of its ext4 (debugfs): the
    dump's path under ``dest``, or None when the guest wrote none."""
    plain = workdir / "luks-readback.ext4"
    length = disk.path.stat().st_size - disk.data_offset
    with open(plain, "wb") as f:
        f.truncate(length)
    _transform(disk.path, plain, disk.data_offset, 0, length, disk.volume_key, encrypt=False)
    out = dest / "final.kdump"
    subprocess.run(["debugfs", "-R", f"dump /final.kdump {out}", str(plain)],
                   capture_output=True, text=True)
    plain.unlink()
    return out if out.exists() and out.stat().st_size else None


# -- what the guest recorded ----------------------------------------------------------------


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def classify_failure(journal: str, kernel: str, unit: dict[str, str]) -> str | None:
    """Why the unlock failed, from the unit's journal, the kernel log and the unit's result."""
    result = unit.get("Result", "")
    if "__vm_enough_memory" in kernel:
        return "ENOMEM: the kernel refused the Argon2 allocation (__vm_enough_memory)"
    if result == "oom-kill" or ("Killed process" in kernel and "cryptse" in kernel):
        return "OOM kill"
    if "Not enough available memory" in journal or "Cannot allocate memory" in journal:
        return "ENOMEM (allocation failure reported by cryptsetup)"
    if result and result != "success":
        return f"unit result {result} (exit {unit.get('ExecMainStatus')})"
    if unit.get("ActiveState") not in (None, "", "active"):
        return f"unit {unit.get('ActiveState')}"
    return None


def analyse(d: Path, kv: dict[str, str]) -> dict[str, Any]:
    """The unlock's outcome and wall time (``kv``: the unit's properties)."""
    r: dict[str, Any] = {"luks_unit": kv}
    start, end = (int(kv.get(k, "0") or 0) for k in
                  ("ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic"))
    r["unlock_seconds"] = round((end - start) / 1e6, 2) if start and end >= start else None
    r["unlock_ok"] = kv.get("ActiveState") == "active" and (d / "luks-open").exists()
    journal = _text(d / "luks-journal.txt")
    kernel = _text(d / "luks-kernel.txt")
    if r["unlock_ok"]:
        r["unlock_failure"] = None
    elif not kv:  # the capture unit never ran: the caller says why (timeout, hang, stop)
        r["unlock_failure"] = None
    else:
        r["unlock_failure"] = classify_failure(journal, kernel, kv) or "the unit did not run"
    words = ("memory", "Failed", "failed", "Set up")
    r["unlock_messages"] = [ln for ln in journal.splitlines() if any(w in ln for w in words)][-6:]
    r["kernel_messages"] = kernel.strip().splitlines()[-6:]
    return r


def checks(mode: str, r: dict[str, Any], expect_control: str) -> list[str]:
    """What failed for a LUKS mode (empty: every check passed)."""
    bad = []
    must_complete = mode == "luks-swap" or expect_control == "complete"
    if not must_complete:
        if r.get("unlock_ok"):
            bad.append(f"{mode}: the unlock completed without kdumpd "
                       f"({r.get('unlock_seconds')} s): the scenario is not memory-bound")
        elif not any(w in str(r.get("unlock_failure")) for w in ("ENOMEM", "OOM")):
            bad.append(f"{mode}: the unlock did not fail for lack of memory: "
                       f"{r.get('unlock_failure')}")
        return bad
    if mode == "luks-swap" and r.get("kdumpd_unit") != "active":
        bad.append(f"{mode}: kdumpd.service was {r.get('kdumpd_unit')} at capture time")
    if not r.get("unlock_ok"):
        bad.append(f"{mode}: the unlock failed: {r.get('unlock_failure')}")
    elif r.get("dump_identical") is not True:
        bad.append(f"{mode}: the dump on the LUKS disk differs or is missing: "
                   f"{(r.get('dump') or {}).get('problems')}")
    if mode == "luks-swap":
        if not r.get("swap_used_bytes"):
            bad.append(f"{mode}: no swap was used")
        if (r.get("integrity") or {}).get("lost"):
            bad.append(f"{mode}: kdumpd lost {r['integrity']['lost']} blocks")
        if not r.get("report_saved") or r.get("report_state") != "stopped":
            bad.append(f"{mode}: kdumpd's final report was not saved (state "
                       f"{r.get('report_state')})")
    if r.get("failures"):
        bad.append(f"{mode}: guest: {'; '.join(r['failures'])}")
    return bad
