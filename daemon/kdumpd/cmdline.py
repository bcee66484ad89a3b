"""The kernel command line split as the kernel's own ``parse_args`` does; pure.

Shared by the devmem backend (is ``elfcorehdr=`` really a kernel parameter?) and the
configuration (``kdumpd.*=`` parameters), so both read the command line the same way.
"""

from __future__ import annotations

__all__ = ["iter_cmdline_params"]


def iter_cmdline_params(cmdline: str) -> list[tuple[str, str | None]]:
    """Split a kernel command line into ``(name, value)`` as the kernel's ``parse_args`` does.

    Double quotes group spaces into one parameter and are stripped; a lone ``--`` ends the
    kernel's parameters (the rest goes to init, not the kernel). ``value`` is None for a bare
    ``name``.
    """
    params: list[tuple[str, str | None]] = []
    i, n = 0, len(cmdline)
    while i < n:
        while i < n and cmdline[i].isspace():
            i += 1
        if i >= n:
            break
        start, quoted = i, False
        while i < n and (quoted or not cmdline[i].isspace()):
            if cmdline[i] == '"':
                quoted = not quoted
            i += 1
        token = cmdline[start:i]
        if token == "--":
            break
        name, eq, value = token.partition("=")
        params.append((name.replace('"', ""), value.replace('"', "") if eq else None))
    return params
