"""Session.send(compress=...): a message compressed on the way as a run of segments whose level the
adaptive loop picks, received whole by recv()/recv_into()/recv_file(); incompressible data and peers
without the feature get the buffer as it is; corrupt or out-of-order segments are protocol errors that
write nothing past the message. Both engines."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from dwcp.errors import ProtocolError
from dwcp.transport import segments
from dwcp.wire import messages


def compressible(n: int) -> bytes:
    # text-like data with structure: zstd gets x3-x5 from it
    words = [os.urandom(4).hex() for _ in range(512)]
    out = bytearray()
    i = 0
    while len(out) < n:
        out += (" ".join(words[(i * 7 + k) % 512] for k in range(16)) + "\n").encode()
        i += 1
    return bytes(out[:n])


def send_async(session: Any, data: Any, **kw: Any) -> threading.Thread:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["n"] = session.send(data, **kw)
        except BaseException as e:  # reported by the test
            box["error"] = e
    t = threading.Thread(target=run)
    t.box = box  # type: ignore[attr-defined]
    t.start()
    return t


@pytest.mark.parametrize("compress", [3, 1])
def test_compressed_messages_arrive_whole(session_pair: Any, backend: str, compress: Any) -> None:
    p = session_pair(streams=4, backend=backend)
    data = compressible(40 << 20)
    t = send_async(p.client, data, compress=compress)
    b = p.server.peek(timeout_s=30)
    assert b.kind == messages.XferKind.SEGMENT and b.message_length == len(data)
    got = p.server.recv(timeout_s=30)
    t.join()
    assert "error" not in t.box, t.box  # type: ignore[attr-defined]
    assert got == data
    lc = p.client.last_compression
    assert lc is not None and lc["wire_bytes"] < len(data) / 2 and lc["ratio"] > 2


def test_recv_into_and_recv_file_take_compressed_messages(session_pair: Any, tmp_path: Path) -> None:
    p = session_pair(streams=2)
    data = compressible(9 << 20)
    t = send_async(p.client, data, compress=3)
    buf = bytearray(len(data) + 100)
    assert p.server.recv_into(buf, timeout_s=30) == len(data)
    t.join()
    assert buf[:len(data)] == data
    t = send_async(p.client, data, compress=1)
    assert p.server.recv_file(tmp_path / "out", timeout_s=30) == len(data)
    t.join()
    assert (tmp_path / "out").read_bytes() == data


def test_recv_into_too_small_consumes_nothing(session_pair: Any) -> None:
    p = session_pair(streams=2)
    data = compressible(5 << 20)
    t = send_async(p.client, data, compress=1)
    from dwcp.transport.session import BufferTooSmall
    with pytest.raises(BufferTooSmall):
        p.server.recv_into(bytearray(1 << 20), timeout_s=30)
    assert p.server.recv(timeout_s=30) == data
    t.join()


def test_auto_on_loopback_sends_as_it_is(session_pair: Any) -> None:
    # memory is faster than any zstd level: the adaptive loop over a real link is in
    # tests/kernel/test_compress_wan.py
    p = session_pair(streams=2)
    data = compressible(16 << 20)
    t = send_async(p.client, data, compress="auto")
    b = p.server.peek(timeout_s=30)
    assert b.kind == messages.XferKind.BUFFER
    assert p.server.recv(timeout_s=30) == data
    t.join()
    assert p.client.last_compression["level"] is None
    assert "loopback" in p.client.last_compression["reason"]


def test_a_peer_without_the_feature_gets_the_plain_buffer(session_pair: Any) -> None:
    p = session_pair(streams=2, listen_kw={"features": frozenset()})
    assert segments.FEATURE_SEGMENTS not in p.client.params.features
    data = compressible(3 << 20)
    t = send_async(p.client, data, compress="auto")
    assert p.server.recv(timeout_s=30) == data
    t.join()
    assert "does not receive compressed segments" in p.client.last_compression["reason"]


def test_segment_headers_are_checked() -> None:
    h = segments.SegmentHeader(segments.CODEC_STORED, True, 0, 5, 10, 0, 10)
    good = h.pack() + b"x" * 10
    assert segments.parse_header(good) == h
    bad = [
        good[:20],                                                                   # short
        b"XXXX" + good[4:],                                                          # magic
        segments.SegmentHeader(segments.CODEC_STORED, False, 0, 5, 10, 0, 10).pack() + b"x" * 10,  # LAST lies
        segments.SegmentHeader(segments.CODEC_STORED, True, 0, 5, 10, 5, 10).pack() + b"x" * 10,   # outside
        segments.SegmentHeader(segments.CODEC_STORED, True, 0, 5, 10, 0, 10).pack() + b"x" * 9,    # stored size
        segments.SegmentHeader(7, True, 0, 5, 10, 0, 10).pack() + b"x" * 10,                        # codec
    ]
    for b in bad:
        with pytest.raises(ProtocolError):
            segments.parse_header(b)
    asm = segments.Assembler(segments.SegmentHeader(1, False, 1, 5, 20, 0, 10), 20, 5)
    asm.accept(segments.SegmentHeader(1, False, 1, 5, 20, 0, 10))
    with pytest.raises(ProtocolError, match="expected 10"):
        asm.accept(segments.SegmentHeader(1, True, 1, 5, 20, 12, 8))


def test_a_corrupt_compressed_body_fails_the_session_cleanly(session_pair: Any) -> None:
    p = session_pair(streams=2)
    from dwcp import _core
    raw = compressible(1 << 20)
    out = bytearray(_core.hde_buffer_bound(len(raw)))
    n = _core.HdeContext(1 << 20).encode_buffer(raw, None, 3, 1, out)
    body = bytearray(out[:n])
    body[n // 2] ^= 0xFF
    tid = p.client._peek_tid()
    seg = segments.SegmentHeader(segments.CODEC_HDE_BUFFER, True, 3, tid, len(raw), 0, len(raw)).pack() + bytes(body)
    t = threading.Thread(target=lambda: _raw_segment(p.client, seg, len(raw)))
    t.start()
    with pytest.raises(ProtocolError, match="does not decode|compressed message"):
        p.server.recv(timeout_s=30)
    t.join()


def _raw_segment(session: Any, seg: bytes, total: int) -> None:
    try:
        with session._lock:
            session._send_locked(memoryview(seg), messages.XferKind.SEGMENT, name="", length=len(seg),
                                 deadline=None, message_bytes=total)
    except Exception:
        pass  # the receiver fails the session; the sender may see it go
