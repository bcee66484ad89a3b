"""The backend spec, parsed in one place: ``image:FILE|devmem|vmcore|auto`` as a user writes
it, and ``image:FILE|devmem|vmcore:PATH`` once ``serve`` has resolved it.

The configuration checks the user's spec with :func:`parse_backend`, ``serve`` resolves it with
:func:`resolve_backend` (``auto`` becomes ``vmcore:/proc/vmcore`` or ``devmem``, an image path
becomes absolute) and writes the resolved text into ``runconf.json``, and the plugin opens that
with :func:`kdumpd.oldmem.backend.open_backend`. Pure: imports ``errors`` only and touches no
file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kdumpd.errors import RefusedError

__all__ = ["BACKEND_SYNTAX", "PROC_VMCORE", "BackendSpec", "parse_backend", "resolve_backend"]

BACKEND_SYNTAX = "image:FILE|devmem|vmcore|auto"
PROC_VMCORE = "/proc/vmcore"
_KINDS = ("auto", "devmem", "vmcore", "image")


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend: ``kind`` (auto, devmem, vmcore, image) and ``path`` (the image file; the
    vmcore file once resolved; empty otherwise)."""

    kind: str
    path: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else self.kind


def parse_backend(text: str, *, resolved: bool = False) -> BackendSpec:
    """``text`` as a BackendSpec; ValueError saying what is accepted otherwise.

    As the user writes it (``resolved`` False): auto, vmcore, devmem or image:FILE. Resolved
    (what ``runconf.json`` holds): image:FILE, devmem or vmcore:PATH.
    """
    t = text.strip()
    kind, colon, path = t.partition(":")
    if resolved:
        if (kind in ("image", "vmcore") and path) or (kind == "devmem" and not colon):
            return BackendSpec(kind, path)
        raise ValueError(f"backend {text!r} is not image:FILE, devmem or vmcore:PATH")
    if (kind == "image" and path) or (kind in _KINDS and kind != "image" and not colon):
        return BackendSpec(kind, path)
    raise ValueError(f"must be auto, vmcore, devmem or image:FILE, not {text!r}")


def resolve_backend(spec: BackendSpec, vmcore: str, *, have_proc_vmcore: bool) -> BackendSpec:
    """The backend ``serve`` opens for ``spec`` when planning from ``vmcore``.

    ``image:FILE`` gets an absolute path and may not be /proc/vmcore itself; ``vmcore`` writes
    into /proc/vmcore only (never a saved file); ``auto`` is a writable /proc/vmcore if the plan
    comes from it and this kernel has one (``have_proc_vmcore``), else /dev/mem (which refuses
    outside a kdump kernel). RefusedError names the rule.
    """
    if spec.kind == "image":
        path = os.path.abspath(spec.path)
        if os.path.realpath(path) == os.path.realpath(PROC_VMCORE):
            raise RefusedError("backend image:/proc/vmcore: use --backend vmcore")
        return BackendSpec("image", path)
    if spec.kind == "vmcore":
        if os.path.realpath(vmcore) != PROC_VMCORE:
            raise RefusedError(
                f"backend vmcore writes into {vmcore} itself (rule: the vmcore backend is "
                "/proc/vmcore only; use image:FILE for a file)")
        return BackendSpec("vmcore", PROC_VMCORE)
    if spec.kind == "devmem":
        return spec
    if os.path.realpath(vmcore) == PROC_VMCORE and have_proc_vmcore:
        return BackendSpec("vmcore", PROC_VMCORE)
    return BackendSpec("devmem")
