"""Open a resolved backend spec (see :mod:`kdumpd.oldmem.spec`): the one place that picks the
:class:`~kdumpd.oldmem.base.OldMem` class for ``image:FILE``, ``devmem`` or ``vmcore:PATH``."""

from __future__ import annotations

from kdumpd.errors import ConfigError, RefusedError
from kdumpd.oldmem.base import OldMem, identity_ranges
from kdumpd.oldmem.devmem import DevMem
from kdumpd.oldmem.image import ImageOldMem
from kdumpd.oldmem.spec import parse_backend
from kdumpd.oldmem.vmcore_rw import VmcoreRW
from kdumpd.units import Extent, PhysRange

__all__ = ["open_backend"]


def open_backend(spec: str, ranges: tuple[PhysRange, ...], extents: tuple[Extent, ...]) -> OldMem:
    """Open a resolved backend: ``image:FILE`` (at the PT_LOAD offsets), ``devmem`` (only the
    granted extents, identity-mapped) or ``vmcore:PATH`` (writable /proc/vmcore, probed on the
    first granted page). Refusals and failures raise before anything is written; a spec that is
    not resolved is a ConfigError."""
    try:
        parsed = parse_backend(spec, resolved=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if parsed.kind == "image":
        return ImageOldMem(parsed.path, ranges)
    if parsed.kind == "devmem":
        return DevMem(identity_ranges(extents))
    if not extents:
        raise RefusedError("vmcore backend: the plan grants no old memory")
    return VmcoreRW(ranges, probe_paddr=extents[0].start_paddr, path=parsed.path)
