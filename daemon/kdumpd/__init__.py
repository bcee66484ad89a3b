"""kdumpd: turn the crashed kernel's dump-excluded memory into a block device inside kdump.

Data flows one way: vmcore -> xlat -> mm (page classes) -> plan (extents) -> store -> nbd.
"""

__version__ = "0.1.0"
