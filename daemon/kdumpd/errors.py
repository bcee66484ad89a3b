"""The whole exception taxonomy and the exit code of each class.

Pure code only raises these; ``cli.main()`` and the nbdkit callbacks are the only places that
catch them. A message is one line and names the key, address, level or file at fault, because
the person reading it is in a crash kernel's console with no debugger.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "IntegrityError",
    "KdumpdError",
    "LayoutError",
    "MissingExtensionError",
    "NotRunningError",
    "RefusedError",
    "SelfTestError",
    "ServeError",
    "TranslationError",
    "VmcoreError",
]


class KdumpdError(Exception):
    """Base of every error kdumpd raises on purpose."""

    exit_code = 1


class VmcoreError(KdumpdError):
    """The vmcore is not a usable ELF core: truncated, corrupt, or missing a part."""

    exit_code = 3


class LayoutError(KdumpdError, LookupError):
    """The crashed kernel's layout is unknown: a VMCOREINFO key is missing or unsupported."""

    exit_code = 4


class TranslationError(KdumpdError):
    """A virtual address did not resolve through the crashed kernel's page tables."""

    exit_code = 5


class RefusedError(KdumpdError):
    """A safety rule fired: kdumpd will not write to old memory, and says which rule."""

    exit_code = 6


class ConfigError(KdumpdError):
    """A configuration value is unknown or invalid; the message names the key and source."""

    exit_code = 2


class BackendError(KdumpdError, OSError):
    """An old-memory backend cannot be opened or used."""

    exit_code = 7


class IntegrityError(KdumpdError):
    """Every copy of a block failed its checksum: the data is lost, never returned wrong."""

    exit_code = 8


class ServeError(KdumpdError):
    """Serving failed outside the store: nbdkit, the NBD device, swap or the filesystem."""

    exit_code = 9


class NotRunningError(KdumpdError):
    """``kdumpd status``/``stop`` found no running daemon in the run directory."""

    exit_code = 10


class SelfTestError(KdumpdError):
    """The store's self-test failed: nothing was written to old memory."""

    exit_code = 11


class MissingExtensionError(KdumpdError, ImportError):
    """A C extension module of kdumpd is not built (the image or the tree lacks its .so)."""

    exit_code = 12
