"""The block store over old memory: placement, metadata, verify-on-read and repair, scrub.

:mod:`~kdumpd.store.placement` decides where copies go (pure), :mod:`~kdumpd.store.slot` holds
the in-memory metadata, :mod:`~kdumpd.store.blockstore` does the I/O and
:mod:`~kdumpd.store.scrub` sweeps in the background. Imports ``oldmem``, ``errors``, ``units``.
See docs/store.md.
"""
