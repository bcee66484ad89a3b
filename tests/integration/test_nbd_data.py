"""Data integrity through a real nbdkit running the plugin, with libnbd as the client.

The server is ``nbdkit -s --exit-with-parent python kdumpd_plugin.py runconf=...`` (copies 2,
64 MiB device over a copy of a real vmcore), one fresh store per test.
"""

from __future__ import annotations

import errno
import random

import nbd
import pytest

MiB = 1 << 20


def test_negotiated_flags(single) -> None:
    h = single
    assert h.get_size() == 64 * MiB
    assert h.can_flush() and h.can_trim() and h.can_zero() and h.can_fua()
    assert h.can_multi_conn() and h.can_fast_zero()
    assert not h.is_read_only()
    assert not h.is_rotational()


def test_fresh_device_reads_zeros(single) -> None:
    assert single.pread(4 * MiB, 3 * MiB) == bytes(4 * MiB)


def test_random_requests_match_a_model(single) -> None:
    h = single
    rng = random.Random(1)
    size = 8 * MiB  # the model covers the first 8 MiB, ops go anywhere inside it
    model = bytearray(size)
    for _ in range(400):
        op = rng.random()
        aligned = rng.random() < 0.5
        length = rng.choice([1, 511, 4096, 4097, 8192, 65536, 131072 + 17, 1 * MiB])
        if aligned:
            length = max(4096, length & ~4095)
        off = rng.randrange(0, size - length + 1)
        if aligned:
            off &= ~4095
        if op < 0.45:
            data = rng.randbytes(length)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
            model[off : off + length] = data
        elif op < 0.55:
            h.trim(length, off)
            # kdumpd frees the whole blocks inside and leaves partial edge blocks alone.
            b0, b1 = (off + 4095) & ~4095, (off + length) & ~4095
            if b0 < b1:
                model[b0:b1] = bytes(b1 - b0)
        elif op < 0.65:
            h.zero(length, off)
            model[off : off + length] = bytes(length)
        else:
            assert h.pread(length, off) == bytes(model[off : off + length]), (off, length)
    assert h.pread(size, 0) == bytes(model)


def test_large_and_unaligned_requests(single) -> None:
    h = single
    rng = random.Random(2)
    big = rng.randbytes(32 * MiB)
    h.pwrite(big, 16 * MiB + 4096)
    assert h.pread(32 * MiB, 16 * MiB + 4096) == big
    # A large read spanning unwritten, written and unwritten blocks.
    got = h.pread(40 * MiB, 12 * MiB)
    assert got == bytes(4 * MiB + 4096) + big + bytes(40 * MiB - 4 * MiB - 4096 - 32 * MiB)
    # Odd sizes at odd offsets, across block edges.
    for off, n in [(1, 1), (4095, 2), (8191, 4098), (12345, 99999), (64 * MiB - 3, 3)]:
        data = rng.randbytes(n)
        h.pwrite(data, off)
        assert h.pread(n, off) == data
    # Past the end: refused by nbdkit before the plugin sees it.
    with pytest.raises(nbd.Error):
        h.pread(4096, 64 * MiB - 2048)


def test_trim_zero_flush(single) -> None:
    h = single
    rng = random.Random(3)
    data = rng.randbytes(MiB)
    h.pwrite(data, 0)
    h.flush()
    h.trim(512 * 1024, 256 * 1024)
    got = h.pread(MiB, 0)
    assert got[: 256 * 1024] == data[: 256 * 1024]
    assert got[256 * 1024 : 768 * 1024] == bytes(512 * 1024)
    assert got[768 * 1024 :] == data[768 * 1024 :]
    h.pwrite(data, 0)
    h.zero(5000, 3000)  # inside and across one block edge
    h.zero(256 * 1024, 512 * 1024, nbd.CMD_FLAG_FAST_ZERO)
    want = bytearray(data)
    want[3000:8000] = bytes(5000)
    want[512 * 1024 : 768 * 1024] = bytes(256 * 1024)
    assert h.pread(MiB, 0) == bytes(want)
    h.zero(MiB, 0, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(MiB, 0) == bytes(MiB)
    h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(MiB, 0) == data


def test_full_pool_is_enospc_not_corruption(vmcore, image, tmp_path) -> None:
    """A thin device bigger than old memory: writes past capacity fail with ENOSPC and earlier
    data stays intact."""
    import os

    from kdumpd.config import load_serve_config
    from kdumpd.nbd.server import nbdkit_argv, nbdkit_env
    from kdumpd.serve.prepare import prepare

    cfg = load_serve_config(
        {"vmcore": str(vmcore), "backend": f"image:{image}", "run_dir": str(tmp_path),
         "copies": "4", "size": "1G", "scrub_rate": "0", "report": ""},
        config_path=os.devnull, cmdline_path=os.devnull,
    )
    prep = prepare(cfg)
    cap = prep.capacity_bytes
    assert cap < 1 << 30
    h = nbd.NBD()
    old = dict(os.environ)
    os.environ.update(nbdkit_env(old))
    try:
        h.connect_command(nbdkit_argv(runconf=prep.runconf_path, socket=None, single=True,
                                      exit_with_parent=True))
    finally:
        os.environ.clear()
        os.environ.update(old)
    chunk = random.Random(4).randbytes(8 * MiB)
    off = 0
    with pytest.raises(nbd.Error) as info:
        while off < 1 << 30:
            h.pwrite(chunk, off)
            off += len(chunk)
    assert info.value.errnum == errno.ENOSPC
    assert off <= cap
    assert h.pread(len(chunk), 0) == chunk
    h.shutdown()
