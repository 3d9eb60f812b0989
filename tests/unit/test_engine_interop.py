"""The C engine (dwcp._core.StreamSet) and the pure-Python engine (PyStreamSet) on one wire.

A C sender must be received by a Python receiver and the reverse, over real loopback TCP, including
stream deaths, wrap mode and deadline truncation; and both engines must put the same bytes on the
wire for the same transfer (docs/protocol.md is the contract, neither engine is the reference).

These tests need the compiled core. A missing build is a failure, not a skip: it would otherwise let
the interop guarantee silently go untested.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dwcp.transport.pyengine import PyStreamSet
from dwcp.wire.frames import (HEADER_BYTES, MAX_CHUNK_BYTES, Flag, FrameType, Header, decode_header,
                              encode_header, payload_checksum)
from tests.conftest import Background, tcp_pairs

try:
    from dwcp import _core
    _CORE_ERROR = "" if hasattr(_core, "StreamSet") else "dwcp._core has no StreamSet"
except ImportError as e:  # reported by the `core` fixture, as a failure
    _core = None  # type: ignore[assignment]
    _CORE_ERROR = f"cannot import dwcp._core: {e}"

XXH3 = int(Flag.CSUM_XXH3)
CRC32C = int(Flag.CSUM_CRC32C)
HANG_S = 20.0
DIRECTIONS = [pytest.param(("c", "py"), id="c_to_py"), pytest.param(("py", "c"), id="py_to_c")]


@pytest.fixture
def core() -> Any:
    if _CORE_ERROR:
        pytest.fail(f"{_CORE_ERROR}. The C/Python interop tests need the compiled engine: build it "
                    "with `python3 setup.py build_ext --inplace` (or `make build`) and run again.")
    return _core


class Net:
    """Loopback TCP socket pairs and the engines on them; all closed at teardown."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.socks: list[socket.socket] = []
        self.engines: list[Any] = []

    def pairs(self, n: int) -> tuple[list[socket.socket], list[socket.socket]]:
        a, b = tcp_pairs(n)
        self.socks += a + b
        return a, b

    def engine(self, kind: str, socks: list[socket.socket]) -> Any:
        e = self.core.StreamSet([s.fileno() for s in socks]) if kind == "c" else PyStreamSet(socks)
        self.engines.append(e)
        return e

    def link(self, kinds: tuple[str, str], n: int) -> tuple[Any, Any, list[socket.socket],
                                                             list[socket.socket]]:
        a, b = self.pairs(n)
        return self.engine(kinds[0], a), self.engine(kinds[1], b), a, b

    def close(self) -> None:
        for e in self.engines:
            e.close()
        for s in self.socks:
            s.close()


@pytest.fixture
def net(core: Any) -> Iterator[Net]:
    n = Net(core)
    yield n
    n.close()


class Bg(Background):
    hang_s = HANG_S


def transfer(tx: Any, rx: Any, data: Any, dest: Any, *, length: int | None = None,
             chunk: int = 64 << 10, csum: int = XXH3, tid: int = 1, deadline: float | None = None,
             timeout_s: float = 10.0) -> tuple[int, int]:
    n = len(memoryview(data).cast("B")) if length is None else length
    recv = Bg(rx.recv_into, dest, transfer_id=tid, length=n, chunk_bytes=chunk, csum_flags=csum,
              timeout_s=timeout_s)
    kw: dict[str, Any] = {"deadline": deadline} if deadline is not None else {}
    sent = tx.send(data, transfer_id=tid, chunk_bytes=chunk, csum_flags=csum, length=length,
                   timeout_s=timeout_s, **kw)
    return sent, recv.result()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = sock.recv(n - len(out))
        if not b:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += b
    return bytes(out)


# ---- transfers across engines ----------------------------------------------------------------------
@pytest.mark.parametrize("kinds", DIRECTIONS)
@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("size", [0, 1, 100_003, 8 << 20])
def test_transfer(net: Net, kinds: tuple[str, str], streams: int, size: int) -> None:
    tx, rx, _, _ = net.link(kinds, streams)
    data = os.urandom(size)
    dest = bytearray(size)
    assert transfer(tx, rx, data, dest) == (size, size)
    assert dest == data
    chunks = -(-size // (64 << 10))
    assert rx.stats()["chunks"] == chunks
    # A sender that completes on DONE may not have read every ACK: the C engine counts only the
    # ACKs it read, the Python one counts the rest as acknowledged by the DONE.
    assert tx.stats()["chunks"] <= chunks


@pytest.mark.parametrize("kinds", DIRECTIONS)
@pytest.mark.parametrize("csum", [0, CRC32C, XXH3])
def test_checksum_kinds(net: Net, kinds: tuple[str, str], csum: int) -> None:
    tx, rx, _, _ = net.link(kinds, 2)
    data = os.urandom(300_000)
    dest = bytearray(len(data))
    assert transfer(tx, rx, data, dest, chunk=16 << 10, csum=csum) == (len(data), len(data))
    assert dest == data


@pytest.mark.parametrize("kinds", DIRECTIONS)
def test_many_streams_and_a_sequence_of_transfers(net: Net, kinds: tuple[str, str]) -> None:
    tx, rx, _, _ = net.link(kinds, 32)
    for tid in range(1, 5):
        data = os.urandom(tid * 500_003)
        dest = bytearray(len(data))
        assert transfer(tx, rx, data, dest, chunk=16 << 10, tid=tid) == (len(data), len(data))
        assert dest == data
    assert tx.alive_count() == rx.alive_count() == 32


@pytest.mark.parametrize("kinds", DIRECTIONS)
def test_numpy_buffers(net: Net, kinds: tuple[str, str]) -> None:
    np = pytest.importorskip("numpy")  # a test extra; the engines do not need it
    tx, rx, _, _ = net.link(kinds, 4)
    src = np.random.default_rng(7).integers(0, 2**31, size=(300, 1001), dtype=np.int32)
    dest = np.zeros_like(src)
    assert transfer(tx, rx, src, dest) == (src.nbytes, src.nbytes)
    assert np.array_equal(src, dest)


@pytest.mark.parametrize("kinds", DIRECTIONS)
def test_wrap_mode_and_deadline_truncation(net: Net, kinds: tuple[str, str]) -> None:
    tx, rx, _, _ = net.link(kinds, 4)
    chunk = 16 << 10
    data = os.urandom(32 * chunk)
    dest = bytearray(len(data))
    length = 3 * len(data) + 5 * chunk + 99
    assert transfer(tx, rx, data, dest, length=length, chunk=chunk) == (length, length)
    assert dest == data
    dest2 = bytearray(len(data))
    sent, got = transfer(tx, rx, data, dest2, length=1 << 40, chunk=chunk, tid=2,
                         deadline=time.monotonic() + 0.3)
    assert sent == got and 0 < sent < 1 << 40 and sent % chunk == 0
    assert tx.stats()["truncated_at"] == rx.stats()["truncated_at"] == sent
    if sent >= len(data):
        assert dest2 == data


@pytest.mark.parametrize("kinds", DIRECTIONS)
def test_stream_death_resends_on_survivors(net: Net, kinds: tuple[str, str]) -> None:
    tx, rx, _, rx_socks = net.link(kinds, 4)
    chunk = 1 << 20
    data = os.urandom(64 << 20)
    dest = bytearray(len(data))
    sender = Bg(tx.send, data, transfer_id=1, chunk_bytes=chunk, csum_flags=XXH3, timeout_s=10)
    t_end = time.monotonic() + HANG_S
    while tx.stats()["bytes_wire"] < 4 << 20 and time.monotonic() < t_end:
        time.sleep(0.005)
    rx_socks[0].shutdown(socket.SHUT_RDWR)  # chunks on stream 0 were sent and never acknowledged
    got = rx.recv_into(dest, transfer_id=1, length=len(data), chunk_bytes=chunk, csum_flags=XXH3,
                       timeout_s=10)
    assert sender.result() == got == len(data)
    assert dest == data
    assert tx.stats()["chunks_resent"] > 0
    assert tx.alive()[0] is False and tx.alive_count() == 3


# ---- byte-for-byte ---------------------------------------------------------------------------------
def _sender_bytes(net: Net, kind: str, data: bytes, chunk: int, csum: int, frame_flags: int) -> bytes:
    """Everything `kind`'s sender writes for a one-stream transfer, the test acking each chunk."""
    a, b = net.pairs(1)
    tx = net.engine(kind, a)
    raw = b[0]
    raw.settimeout(HANG_S)
    sender = Bg(tx.send, data, transfer_id=9, chunk_bytes=chunk, csum_flags=csum,
                frame_flags=frame_flags, timeout_s=10)
    out = bytearray()
    for _ in range(-(-len(data) // chunk)):
        head = recv_exact(raw, HEADER_BYTES)
        h = decode_header(head, MAX_CHUNK_BYTES)
        out += head + recv_exact(raw, h.length)
        raw.sendall(encode_header(Header(type=FrameType.ACK, transfer_id=9, offset=h.offset)))
    assert sender.result() == len(data)
    return bytes(out)


def _receiver_bytes(net: Net, kind: str, frames: list[bytes], length: int, chunk: int,
                    csum: int, expect: int) -> bytes:
    """Everything `kind`'s receiver writes back (expect frames) for the given DATA frames."""
    a, b = net.pairs(1)
    rx = net.engine(kind, b)
    raw = a[0]
    raw.settimeout(HANG_S)
    dest = bytearray(length)
    receiver = Bg(rx.recv_into, dest, transfer_id=9, length=length, chunk_bytes=chunk,
                  csum_flags=csum, timeout_s=10)
    out = bytearray()
    for f in frames:
        raw.sendall(f)
        out += recv_exact(raw, HEADER_BYTES)  # the ACK or NACK for it
    out += recv_exact(raw, HEADER_BYTES * (expect - len(frames)))
    assert receiver.result() == length
    return bytes(out)


@pytest.mark.parametrize("csum", [CRC32C, XXH3])
def test_senders_write_identical_bytes(net: Net, csum: int) -> None:
    data = os.urandom(3 * 4096 + 100)
    flags = int(Flag.COMPRESSED)
    c = _sender_bytes(net, "c", data, 4096, csum, flags)
    py = _sender_bytes(net, "py", data, 4096, csum, flags)
    assert c == py
    first = decode_header(c[:HEADER_BYTES], MAX_CHUNK_BYTES)
    assert first.flags == csum | flags and first.checksum == payload_checksum(csum, data[:4096])


def test_receivers_write_identical_bytes(net: Net) -> None:
    data = os.urandom(2 * 4096)

    def frame(off: int, good: bool = True) -> bytes:
        p = data[off:off + 4096]
        csum = payload_checksum(XXH3, p) if good else 1
        return encode_header(Header(type=FrameType.DATA, flags=XXH3, length=len(p), transfer_id=9,
                                    offset=off, checksum=csum)) + p

    frames = [frame(0), frame(4096, good=False), frame(4096)]  # ACK, NACK, ACK, then DONE
    c = _receiver_bytes(net, "c", frames, len(data), 4096, XXH3, 4)
    py = _receiver_bytes(net, "py", frames, len(data), 4096, XXH3, 4)
    assert c == py
    types = [decode_header(c[i:i + HEADER_BYTES], 0).type for i in range(0, len(c), HEADER_BYTES)]
    assert types == [FrameType.ACK, FrameType.NACK, FrameType.ACK, FrameType.DONE]


@pytest.mark.parametrize("kind", ["py", "c"])
def test_receiver_asks_again_for_a_chunk_whose_writer_died(net: Net, kind: str) -> None:
    """Chunk 0 is being written from stream 0 when a re-sent copy arrives on stream 1 (dropped:
    another live stream is writing it); then stream 0 dies mid-payload. The sender holds the dropped
    copy as outstanding on a live stream and never resends it by itself, so the receiver must ask
    for it (NACK, "offset = chunk to send again"). Without that the transfer hangs until its
    timeout (test_stream_death_resends_on_survivors hit this by chance before both engines did it)."""
    a, b = net.pairs(2)
    rx = net.engine(kind, b)
    for s in a:
        s.settimeout(2)
    data = os.urandom(2000)
    dest = bytearray(2000)
    receiver = Bg(rx.recv_into, dest, transfer_id=1, length=2000, chunk_bytes=1000, csum_flags=XXH3,
                  timeout_s=10)

    def frame(off: int, stream: int) -> bytes:
        p = data[off:off + 1000]
        return encode_header(Header(type=FrameType.DATA, flags=XXH3, stream=stream, length=1000,
                                    transfer_id=1, offset=off, checksum=payload_checksum(XXH3, p))) + p

    a[0].sendall(frame(0, 0)[:HEADER_BYTES + 500])
    time.sleep(0.1)  # let the receiver start writing chunk 0 from stream 0
    a[1].sendall(frame(0, 1) + frame(1000, 1))  # a dropped duplicate of chunk 0, then chunk 1
    h = decode_header(recv_exact(a[1], HEADER_BYTES), 0)
    assert (h.type, h.offset) == (FrameType.ACK, 1000)
    a[0].shutdown(socket.SHUT_RDWR)
    try:
        h = decode_header(recv_exact(a[1], HEADER_BYTES), 0)
    except socket.timeout:
        pytest.fail(f"{kind} receiver never asked again for chunk 0 after the stream writing it died "
                    "and its duplicate had been dropped: the transfer would hang")
    assert (h.type, h.offset) == (FrameType.NACK, 0)
    a[1].sendall(frame(0, 1))
    assert receiver.result() == 2000 and dest == data


@pytest.mark.parametrize("kinds", [
    pytest.param(("py", "py"), id="py_py"),
    pytest.param(("c", "py"), id="c_py"),
    pytest.param(("py", "c"), id="py_c"),
    pytest.param(("c", "c"), id="c_c"),
])
def test_one_stream_set_carries_both_directions(net: Net, kinds: tuple[str, str]) -> None:
    """As Session does: one set per side, transfers alternating direction, ids growing across both
    directions. The late DONEs of one direction arrive while the set receives in the other and must
    be dropped as stale, not taken for a protocol violation."""
    a, b, _, _ = net.link(kinds, 4)
    for tid in range(1, 7):
        src, dst = (a, b) if tid % 2 else (b, a)
        data = os.urandom(300_001)
        dest = bytearray(len(data))
        assert transfer(src, dst, data, dest, chunk=16 << 10, tid=tid) == (len(data), len(data))
        assert dest == data
    assert a.stats()["streams_failed"] == b.stats()["streams_failed"] == 0
