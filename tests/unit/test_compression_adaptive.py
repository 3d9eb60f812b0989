"""The adaptive compression loop's decisions, from measured segments (no sockets): incompressible data
and fast links turn it off, slow links pick a level with a better ratio, segments are sized from the
link and RTT, and every change of level is recorded with its reason."""

from __future__ import annotations

import os

from dwcp import _core
from dwcp.compression.adaptive import (FIRST_SEGMENT_BYTES, MAX_SEGMENT_BYTES, AdaptiveCompression,
                                       SegmentResult)

CTX = _core.HdeContext(1 << 20)
OUT = bytearray(_core.hde_buffer_bound(4 << 20))


def sample(level: int, data: bytes) -> tuple[int, float]:
    import time
    t = time.perf_counter()
    n = CTX.encode_buffer(data, None, level, 1, OUT)
    return n, time.perf_counter() - t


def text(n: int) -> bytes:
    words = [os.urandom(3).hex() for _ in range(300)]
    return (" ".join(words[i % 300] for i in range(n // 7)).encode() + b" " * n)[:n]


def test_incompressible_data_is_off_after_one_cheap_level() -> None:
    calls = []

    def counting(level: int, data: bytes) -> tuple[int, float]:
        calls.append(level)
        return sample(level, data)
    loop = AdaptiveCompression(64 << 20, cores=2)
    loop.calibrate(memoryview(os.urandom(8 << 20)), counting)
    assert loop.off and "incompressible" in loop.off_reason
    assert calls == [1]
    p = loop.first()
    assert p.level is None and p.raw_bytes == 64 << 20


def test_first_segment_is_level_1_then_the_link_decides() -> None:
    data = memoryview(text(32 << 20))
    loop = AdaptiveCompression(len(data), cores=2, rtt_s=0.05)
    loop.calibrate(data, sample)
    p = loop.first()
    assert p.level == 1 and p.raw_bytes == FIRST_SEGMENT_BYTES
    # a thin link (100 Mbit/s): the segment took long on the wire -> more ratio pays
    loop.observe(SegmentResult(1, p.raw_bytes, p.raw_bytes // 3, encode_s=0.02, send_s=p.raw_bytes // 3 * 8 / 100e6))
    q = loop.next(p.raw_bytes)
    assert q.level in (3, 6), q.reason
    assert q.raw_bytes >= 4 << 20
    # a fast link (40 Gbit/s): nothing compresses fast enough -> off, the rest in big pieces
    loop.observe(SegmentResult(q.level, 8 << 20, (8 << 20) // 3, encode_s=0.05, send_s=(8 << 20) // 3 * 8 / 40e9))
    loop.observe(SegmentResult(None, 8 << 20, 8 << 20, encode_s=0.0, send_s=(8 << 20) * 8 / 40e9))
    r = loop.next(2 * (8 << 20))
    assert r.level is None and "off" in r.reason
    assert r.raw_bytes == min(MAX_SEGMENT_BYTES, len(data) - 2 * (8 << 20))
    levels = [d["level"] for d in loop.decisions]
    assert levels[0] == 1 and levels[-1] is None and all(d["reason"] for d in loop.decisions)


def test_segments_span_twenty_rtts_and_leave_no_runt() -> None:
    loop = AdaptiveCompression(1 << 30, cores=2, rtt_s=0.1)
    loop.calibrate(memoryview(text(8 << 20)), sample)
    loop.observe(SegmentResult(1, 8 << 20, 2 << 20, encode_s=0.02, send_s=(2 << 20) * 8 / 100e6))
    p = loop.next(8 << 20)
    # 100 Mbit/s x 20 RTT (2 s) x ratio: tens of MB, within the limits
    assert 16 << 20 <= p.raw_bytes <= MAX_SEGMENT_BYTES
    tail = AdaptiveCompression(10 << 20, cores=2, rtt_s=0.1)
    tail.calibrate(memoryview(text(8 << 20)), sample)
    tail.observe(SegmentResult(1, 8 << 20, 2 << 20, encode_s=0.02, send_s=(2 << 20) * 8 / 100e6))
    assert tail.next(8 << 20).raw_bytes == 2 << 20
