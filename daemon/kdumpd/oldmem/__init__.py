"""Old-memory backends: read and write the crashed kernel's RAM by physical address.

One contract (:class:`~kdumpd.oldmem.base.OldMem`), three backends: ``/dev/mem``
(:mod:`~kdumpd.oldmem.devmem`), a writable ``/proc/vmcore`` (:mod:`~kdumpd.oldmem.vmcore_rw`)
and a file image with fault injection (:mod:`~kdumpd.oldmem.image`). Wrap any of them in
:class:`~kdumpd.oldmem.base.Guarded` before use. This package imports only ``errors`` and
``units``.
"""
