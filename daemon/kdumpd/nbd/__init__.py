"""NBD itself: the nbdkit command line and process, the nbd-client attach, mkswap/swapon and
mkfs/mount (:mod:`~kdumpd.nbd.server`), the NBD socket's path and handshake probe
(:mod:`~kdumpd.nbd.sockpath`), the store's self-test (:mod:`~kdumpd.nbd.selftest`) and the
process protections (:mod:`~kdumpd.nbd.protect`).

Imports ``store``, ``oldmem``, ``jsonfile``, ``errors`` and ``units`` only; what a serve run
does with these pieces is :mod:`kdumpd.serve`.
"""
