"""Serving the store over NBD: the run-directory contract, the store service that runs inside
nbdkit, the startup self-test, process protections, and the nbdkit / nbd-client / mkswap /
mkfs command lines.

Imports ``plan``, ``store``, ``oldmem``, ``journal``, ``errors`` and ``units`` only. The plugin
itself (``nbd_plugin/kdumpd_plugin.py``, top level) stays a thin table of callbacks over
:class:`kdumpd.nbd.service.Service`.
"""
