"""The recv() buffer pool: reuse only what nobody references, exact sizes, the byte cap."""

from __future__ import annotations

import numpy as np
import pytest

from dwcp.errors import ConfigError
from dwcp.transport.recvpool import POOL_MIN_BYTES, RecvPool

MiB = 1 << 20


def test_a_dropped_result_is_reused_and_a_held_one_never_is() -> None:
    pool = RecvPool(1 << 30)
    a = pool.take(8 * MiB)
    a_addr = np.frombuffer(a, dtype=np.uint8).ctypes.data
    held = pool.take(8 * MiB)                       # `a` still referenced: fresh memory
    assert np.frombuffer(held, dtype=np.uint8).ctypes.data != a_addr
    del a
    b = pool.take(8 * MiB - 5)                      # `a` dropped: its memory again, resized
    assert len(b) == 8 * MiB - 5
    assert np.frombuffer(b, dtype=np.uint8).ctypes.data == a_addr
    view = memoryview(b)                            # a view holds it too
    c = pool.take(8 * MiB)
    assert np.frombuffer(c, dtype=np.uint8).ctypes.data not in (a_addr,)
    view.release()
    assert pool.stats()["reused"] == 1


def test_the_usual_loop_reuses_memory() -> None:
    """`data = pool.take(n)` in a loop holds the previous result while taking the next: two buffers
    alternate and nothing new is allocated after them."""
    pool = RecvPool(1 << 30)
    data = bytearray()
    for _ in range(10):
        data = pool.take(64 * MiB)
        data[-1] = 1
    assert pool.stats()["allocated"] == 2 and pool.stats()["reused"] == 8


def test_sizes_caps_and_bad_options() -> None:
    pool = RecvPool(16 * MiB)
    assert isinstance(pool.take(100), bytearray) and len(pool.take(0)) == 0
    assert pool.stats()["buffers"] == 0                 # small results are not pooled
    big = pool.take(32 * MiB)                           # over the cap: not tracked
    assert len(big) == 32 * MiB and pool.stats()["buffers"] == 0
    for _ in range(3):
        pool.take(POOL_MIN_BYTES * 8)
    assert pool.stats()["bytes"] <= 16 * MiB
    assert RecvPool(0).take(4 * MiB) is not None and RecvPool(0).stats()["buffers"] == 0
    with pytest.raises(ConfigError, match="recv_pool_bytes"):
        RecvPool(-1)
