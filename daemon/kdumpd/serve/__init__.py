"""``kdumpd serve``, ``status`` and ``stop``: one serve run from its configuration to teardown.

Where each job lives:

- :mod:`~kdumpd.serve.prepare`: configuration -> plan (behind the safety gate) -> backend ->
  self-test -> ``runconf.json``; every refusal happens here, before nbdkit;
- :mod:`~kdumpd.serve.lifecycle`: nbdkit -> attach -> READY (each phase timed) -> exec the
  supervisor, with signals turned into :class:`~kdumpd.serve.signals.Terminate`;
- :mod:`~kdumpd.serve.watch`: what the daemon is from READY on (nothing of kdumpd imported),
  waiting for a stop signal or nbdkit's death; :mod:`~kdumpd.serve.supervise`: the teardown it
  then execs;
- :mod:`~kdumpd.serve.teardown`: the one teardown every exit path uses;
- :mod:`~kdumpd.serve.control`: ``status`` and ``stop``;
- :mod:`~kdumpd.serve.rundir` (run directory, lock, ``state.json``),
  :mod:`~kdumpd.serve.report` (the post-mortem report), :mod:`~kdumpd.serve.procs` (pids);
- :mod:`~kdumpd.serve.runconf` and :mod:`~kdumpd.serve.export`: what nbdkit's plugin
  (``nbd_plugin/kdumpd_plugin.py``, where every NBD request enters) reads and serves.

Layering: serve sits above plan, store, oldmem, nbd, config and journal; within the package
only the CLI imports it. This file imports nothing, so the plugin and the supervisor load only
the modules they name.
"""
