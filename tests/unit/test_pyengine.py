"""The pure-Python AMST engine (dwcp.transport.pyengine) over real loopback TCP.

Sender and receiver run in two threads. Tests that need a misbehaving peer speak raw frames from the
test (dwcp.wire.frames), so they check the engine against docs/protocol.md rather than against itself.
Timeouts in the tests are generous upper bounds that only catch hangs; nothing asserts speed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp import errors
from dwcp.errors import (ConfigError, PeerClosedError, ProtocolError, SessionClosedError,
                         TransferTimeout, TransportError)
from dwcp.transport.pyengine import PyStreamSet
from dwcp.wire.frames import (HEADER_BYTES, MAX_CHUNK_BYTES, Flag, FrameType, Header, decode_header,
                              encode_header, payload_checksum)
from tests.conftest import Background, tcp_pairs

XXH3 = int(Flag.CSUM_XXH3)
CRC32C = int(Flag.CSUM_CRC32C)
HANG_S = 20.0  # a thread still running after this is a hang, not a slow machine


# ---- helpers ---------------------------------------------------------------------------------------
class Pairs:
    """Connected loopback TCP socket pairs: tx[i] <-> rx[i]; everything closed at teardown."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.sets: list[PyStreamSet] = []

    def __call__(self, n: int) -> tuple[list[socket.socket], list[socket.socket]]:
        tx, rx = tcp_pairs(n)
        self.socks += tx + rx
        return tx, rx

    def engines(self, n: int) -> tuple[PyStreamSet, PyStreamSet, list[socket.socket], list[socket.socket]]:
        tx, rx = self(n)
        a, b = PyStreamSet(tx), PyStreamSet(rx)
        self.sets += [a, b]
        return a, b, tx, rx

    def close(self) -> None:
        for e in self.sets:
            e.close()
        for s in self.socks:
            s.close()


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    p = Pairs()
    yield p
    p.close()


class Bg(Background):
    hang_s = HANG_S


def transfer(tx: PyStreamSet, rx: PyStreamSet, data: Any, dest: Any, *, length: int | None = None,
             chunk: int = 64 << 10, csum: int = XXH3, tid: int = 1,
             deadline: float | None = None, timeout_s: float = 10.0) -> tuple[int, int]:
    n = len(memoryview(data).cast("B")) if length is None else length
    recv = Bg(rx.recv_into, dest, transfer_id=tid, length=n, chunk_bytes=chunk, csum_flags=csum,
              timeout_s=timeout_s)
    sent = tx.send(data, transfer_id=tid, chunk_bytes=chunk, csum_flags=csum, length=length,
                   deadline=deadline, timeout_s=timeout_s)
    return sent, recv.result()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = sock.recv(n - len(out))
        if not b:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += b
    return bytes(out)


def read_header(sock: socket.socket) -> Header:
    return decode_header(recv_exact(sock, HEADER_BYTES), MAX_CHUNK_BYTES)


def data_frame(payload: bytes, *, stream: int, tid: int, offset: int, csum: int = XXH3,
               checksum: int | None = None, length: int | None = None) -> bytes:
    h = Header(type=FrameType.DATA, flags=csum, stream=stream, transfer_id=tid, offset=offset,
               length=len(payload) if length is None else length,
               checksum=payload_checksum(csum, payload) if checksum is None else checksum)
    return encode_header(h) + payload


def ctl_frame(type: int, *, stream: int, tid: int, offset: int = 0) -> bytes:
    return encode_header(Header(type=type, stream=stream, transfer_id=tid, offset=offset))


def is_closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the peer shut the connection down (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def pattern(n: int, seed: int = 0) -> bytes:
    return os.urandom(n) if seed == 0 else bytes((i * seed + 7) & 0xFF for i in range(n))


# ---- plain transfers -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 4097, 3 * (64 << 10) + 5, 8 << 20])
@pytest.mark.parametrize("streams", [1, 4])
def test_roundtrip_sizes(pairs: Pairs, size: int, streams: int) -> None:
    tx, rx, _, _ = pairs.engines(streams)
    data = os.urandom(size)
    dest = bytearray(size)
    assert transfer(tx, rx, data, dest) == (size, size)
    assert dest == data
    ts, rs = tx.stats(), rx.stats()
    chunks = -(-size // (64 << 10))
    assert ts["chunks"] == rs["chunks"] == chunks
    assert ts["bytes_payload"] == rs["bytes_payload"] == size
    assert ts["chunks_resent"] == rs["checksum_errors"] == ts["streams_failed"] == 0
    assert ts["zc_sends"] == 0  # zero-copy is not done by the Python engine (see module doc)


@pytest.mark.parametrize("csum", [0, CRC32C, XXH3])
def test_checksum_kinds(pairs: Pairs, csum: int) -> None:
    tx, rx, _, _ = pairs.engines(2)
    data = os.urandom(100_000)  # CRC32C may be the ~10 MB/s table fallback: keep it small
    dest = bytearray(len(data))
    assert transfer(tx, rx, data, dest, chunk=16 << 10, csum=csum) == (len(data), len(data))
    assert dest == data


@pytest.mark.parametrize("streams,size,chunk", [(16, 4 << 20, 64 << 10), (256, 1 << 20, 2 << 10)])
def test_many_streams(pairs: Pairs, streams: int, size: int, chunk: int) -> None:
    tx, rx, _, _ = pairs.engines(streams)
    data = os.urandom(size)
    dest = bytearray(size)
    assert transfer(tx, rx, data, dest, chunk=chunk) == (size, size)
    assert dest == data
    assert tx.alive_count() == rx.alive_count() == streams


def test_numpy_and_memoryview_buffers(pairs: Pairs) -> None:
    np = pytest.importorskip("numpy")  # a test extra; the engine itself does not need it
    tx, rx, _, _ = pairs.engines(4)
    src = np.random.default_rng(1).standard_normal((256, 1000))  # 2-D float64, C-contiguous
    dest = np.zeros_like(src)
    assert transfer(tx, rx, src, dest, chunk=32 << 10, tid=1) == (src.nbytes, src.nbytes)
    assert np.array_equal(src, dest)
    # A memoryview slice in, a slice of a bigger bytearray out (the rest stays untouched).
    raw = bytearray(os.urandom(300_001))
    out = bytearray(b"\xee" * 400_000)
    assert transfer(tx, rx, memoryview(raw)[1:], memoryview(out)[:300_000], tid=2) == (300_000, 300_000)
    assert out[:300_000] == raw[1:] and out[300_000:] == b"\xee" * 100_000


def test_sequence_and_both_directions_on_one_set(pairs: Pairs) -> None:
    """Like a Session: one stream set per side, transfers in both directions, ids per direction.
    Late ACK/DONE of one direction must not upset the next transfer of the other."""
    a, b, _, _ = pairs.engines(3)
    for tid in range(1, 5):
        for src, dst in ((a, b), (b, a)):
            data = os.urandom(tid * 70_001)
            dest = bytearray(len(data))
            assert transfer(src, dst, data, dest, chunk=16 << 10, tid=tid) == (len(data), len(data))
            assert dest == data
    assert a.alive_count() == b.alive_count() == 3
    assert a.stats()["streams_failed"] == b.stats()["streams_failed"] == 0


def test_length_prefix_of_buffer(pairs: Pairs) -> None:
    tx, rx, _, _ = pairs.engines(2)
    data = os.urandom(50_000)
    dest = bytearray(50_000)
    assert transfer(tx, rx, data, dest, length=30_000, chunk=4096) == (30_000, 30_000)
    assert dest[:30_000] == data[:30_000] and dest[30_000:] == bytes(20_000)


# ---- wrap mode and deadlines -----------------------------------------------------------------------
def test_wrap_mode(pairs: Pairs) -> None:
    tx, rx, _, _ = pairs.engines(4)
    chunk = 16 << 10
    data = os.urandom(8 * chunk)
    dest = bytearray(8 * chunk)
    length = 10 * len(data) + 3 * chunk + 17  # ends inside a partial chunk
    assert transfer(tx, rx, data, dest, length=length, chunk=chunk) == (length, length)
    assert dest == data
    assert rx.stats()["bytes_payload"] == length


def test_wrap_mode_deadline_truncates(pairs: Pairs) -> None:
    tx, rx, _, _ = pairs.engines(4)
    chunk = 16 << 10
    data = os.urandom(16 * chunk)
    dest = bytearray(len(data))
    length = 1 << 40  # far more than fits before the deadline
    sent, got = transfer(tx, rx, data, dest, length=length, chunk=chunk,
                         deadline=time.monotonic() + 0.3)
    assert sent == got
    assert 0 < sent < length and sent % chunk == 0
    assert tx.stats()["truncated_at"] == rx.stats()["truncated_at"] == sent
    assert rx.stats()["bytes_payload"] == tx.stats()["bytes_payload"] == sent, (tx.stats(), rx.stats())
    if sent >= len(data):
        assert dest == data
    # The set stays usable after a truncated transfer.
    data2 = os.urandom(100_000)
    dest2 = bytearray(len(data2))
    assert transfer(tx, rx, data2, dest2, chunk=chunk, tid=2) == (len(data2), len(data2))
    assert dest2 == data2


def test_deadline_already_passed_sends_nothing(pairs: Pairs) -> None:
    tx, rx, _, _ = pairs.engines(2)
    dest = bytearray(1 << 20)
    assert transfer(tx, rx, os.urandom(1 << 20), dest, chunk=64 << 10,
                    deadline=time.monotonic() - 1) == (0, 0)
    assert dest == bytes(1 << 20)


# ---- stream deaths ---------------------------------------------------------------------------------
def test_stream_killed_mid_transfer_resends_on_survivors(pairs: Pairs) -> None:
    tx, rx, _, rx_socks = pairs.engines(4)
    chunk = 1 << 20
    data = os.urandom(64 << 20)
    dest = bytearray(len(data))
    sender = Bg(tx.send, data, transfer_id=1, chunk_bytes=chunk, csum_flags=XXH3, timeout_s=10)
    # Let the sender fill the streams' socket buffers first, so stream 0 certainly holds chunks that
    # were sent and never acknowledged when its receiving end goes away.
    t_end = time.monotonic() + HANG_S
    while tx.stats()["bytes_wire"] < 4 << 20 and time.monotonic() < t_end:
        time.sleep(0.005)
    rx_socks[0].shutdown(socket.SHUT_RDWR)
    got = rx.recv_into(dest, transfer_id=1, length=len(data), chunk_bytes=chunk, csum_flags=XXH3,
                       timeout_s=10)
    assert sender.result() == got == len(data)
    assert dest == data
    ts = tx.stats()
    assert ts["chunks_resent"] > 0
    assert ts["streams_failed"] == 1 and ts["last_failed_stream"] == 0
    assert tx.alive() == [False, True, True, True]
    assert rx.alive()[0] is False


def test_kill_during_transfer_and_while_idle(pairs: Pairs) -> None:
    tx, rx, _, _ = pairs.engines(4)
    data = os.urandom(16 << 20)
    dest = bytearray(len(data))
    receiver = Bg(rx.recv_into, dest, transfer_id=1, length=len(data), chunk_bytes=256 << 10,
                  csum_flags=XXH3, timeout_s=10)
    sender = Bg(tx.send, data, transfer_id=1, chunk_bytes=256 << 10, csum_flags=XXH3, timeout_s=10)
    t_end = time.monotonic() + HANG_S
    while rx.stats()["bytes_payload"] < 2 << 20 and time.monotonic() < t_end:
        time.sleep(0.001)
    rx.kill(1)
    assert sender.result() == receiver.result() == len(data)
    assert dest == data
    assert rx.alive()[1] is False and rx.alive_count() == 3
    tx.kill(2)  # idle: takes effect at once
    assert tx.alive()[2] is False and tx.stats()["streams_failed"] >= 1
    data2 = os.urandom(1 << 20)
    dest2 = bytearray(len(data2))
    assert transfer(tx, rx, data2, dest2, tid=2) == (len(data2), len(data2))
    assert dest2 == data2
    assert tx.alive_count() == rx.alive_count() == 2


def test_all_streams_killed_sender_raises_peer_closed(pairs: Pairs) -> None:
    tx, _, _, rx_socks = pairs.engines(3)
    sender = Bg(tx.send, os.urandom(32 << 20), transfer_id=1, chunk_bytes=1 << 20, csum_flags=XXH3,
                timeout_s=10)
    time.sleep(0.1)
    for s in rx_socks:
        s.shutdown(socket.SHUT_RDWR)
    with pytest.raises(PeerClosedError, match="every connection of the session died"):
        sender.result()
    assert tx.alive_count() == 0 and tx.stats()["streams_failed"] == 3


def test_all_streams_killed_receiver_raises_peer_closed(pairs: Pairs) -> None:
    _, rx, tx_socks, _ = pairs.engines(2)
    receiver = Bg(rx.recv_into, bytearray(1 << 20), transfer_id=1, length=1 << 20,
                  chunk_bytes=64 << 10, csum_flags=XXH3, timeout_s=10)
    time.sleep(0.05)
    for s in tx_socks:
        s.close()
    with pytest.raises(PeerClosedError):
        receiver.result()


def test_silent_peer_times_out(pairs: Pairs) -> None:
    tx, rx, _, _ = pairs.engines(2)
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):  # the data fits in socket buffers; the ACKs never come
        tx.send(os.urandom(64 << 10), transfer_id=1, chunk_bytes=16 << 10, csum_flags=XXH3,
                timeout_s=0.3)
    with pytest.raises(TransferTimeout):
        rx.recv_into(bytearray(4096), transfer_id=1, length=4096, chunk_bytes=4096, csum_flags=XXH3,
                     timeout_s=0.3)
    assert time.monotonic() - t0 < HANG_S


# ---- interrupt / close / arguments -----------------------------------------------------------------
def test_interrupt_and_close_stop_a_running_transfer(pairs: Pairs) -> None:
    _, rx, _, _ = pairs.engines(2)
    receiver = Bg(rx.recv_into, bytearray(4096), transfer_id=1, length=4096, chunk_bytes=4096,
                  csum_flags=XXH3, timeout_s=30)
    time.sleep(0.05)
    with pytest.raises(TransportError, match="already running"):
        rx.recv_into(bytearray(4096), transfer_id=2, length=4096, chunk_bytes=4096, csum_flags=XXH3)
    rx.interrupt()
    with pytest.raises(SessionClosedError, match="interrupt"):
        receiver.result(timeout=5)
    # While idle, an interrupt stops the next call at its start (a close racing with the start of a
    # transfer must not be lost), and only that one.
    rx.interrupt()
    with pytest.raises(SessionClosedError):
        rx.recv_into(bytearray(4096), transfer_id=2, length=4096, chunk_bytes=4096, csum_flags=XXH3)
    receiver = Bg(rx.recv_into, bytearray(4096), transfer_id=3, length=4096, chunk_bytes=4096,
                  csum_flags=XXH3, timeout_s=30)
    time.sleep(0.05)
    assert receiver.thread.is_alive()
    rx.close()
    with pytest.raises(SessionClosedError):
        receiver.result(timeout=5)
    with pytest.raises(SessionClosedError):
        rx.recv_into(bytearray(1), transfer_id=4, length=1, chunk_bytes=1, csum_flags=XXH3)
    assert rx.alive() == [False, False]


def test_bad_arguments(pairs: Pairs) -> None:
    tx, rx, _, _ = pairs.engines(1)
    with pytest.raises(ConfigError, match="multiple of chunk_bytes"):
        tx.send(bytes(1000), transfer_id=1, chunk_bytes=300, csum_flags=XXH3, length=5000)
    with pytest.raises(ConfigError, match="writable"):
        rx.recv_into(bytes(10), transfer_id=1, length=10, chunk_bytes=10, csum_flags=XXH3)
    with pytest.raises(ConfigError, match="csum_flags"):
        tx.send(bytes(10), transfer_id=1, chunk_bytes=10, csum_flags=3)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        tx.send(bytes(10), transfer_id=1, chunk_bytes=0, csum_flags=XXH3)
    with pytest.raises(ConfigError, match="frame_flags"):
        tx.send(bytes(10), transfer_id=1, chunk_bytes=10, csum_flags=XXH3, frame_flags=int(Flag.CSUM_XXH3))
    with pytest.raises(ConfigError, match="buffer-protocol"):
        tx.send("text", transfer_id=1, chunk_bytes=10, csum_flags=XXH3)  # type: ignore[arg-type]
    assert transfer(tx, rx, b"x" * 10, bytearray(10), chunk=4, tid=5) == (10, 10)
    with pytest.raises(ConfigError, match="not above the last one sent"):
        tx.send(b"x", transfer_id=5, chunk_bytes=4, csum_flags=XXH3)
    with pytest.raises(ConfigError, match="not above the last one received"):
        rx.recv_into(bytearray(1), transfer_id=4, length=1, chunk_bytes=4, csum_flags=XXH3)
    with pytest.raises(ConfigError, match="timeout_s"):
        rx.recv_into(bytearray(10), transfer_id=9, length=10, chunk_bytes=10, csum_flags=XXH3,
                     timeout_s=0)
    with pytest.raises(ConfigError, match="deadline"):
        tx.send(b"x", transfer_id=9, chunk_bytes=4, csum_flags=XXH3, deadline="soon")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PyStreamSet([])
    a, _ = pairs(1)
    with pytest.raises(ConfigError, match="twice"):
        PyStreamSet([a[0], a[0]])
    with pytest.raises(ConfigError, match="index"):
        tx.kill(3)
    with PyStreamSet(a) as s:
        assert not s.closed and s.count == 1
    assert s.closed


# ---- a misbehaving peer, spoken to in raw frames ---------------------------------------------------
def test_bad_checksum_is_nacked_and_the_resend_completes(pairs: Pairs) -> None:
    raw, socks = pairs(1)
    rx = PyStreamSet(socks)
    pairs.sets.append(rx)
    raw[0].settimeout(HANG_S)
    payload = os.urandom(1000)
    dest = bytearray(1000)
    receiver = Bg(rx.recv_into, dest, transfer_id=7, length=1000, chunk_bytes=1000, csum_flags=XXH3,
                  timeout_s=10)
    raw[0].sendall(data_frame(payload, stream=0, tid=7, offset=0, checksum=12345))
    h = read_header(raw[0])
    assert (h.type, h.transfer_id, h.offset, h.stream) == (FrameType.NACK, 7, 0, 0)
    raw[0].sendall(data_frame(payload, stream=0, tid=7, offset=0))
    assert read_header(raw[0]).type == FrameType.ACK
    assert read_header(raw[0]).type == FrameType.DONE
    assert receiver.result() == 1000
    assert dest == payload
    assert rx.stats()["checksum_errors"] == 1 and rx.stats()["chunks"] == 1


@pytest.mark.parametrize("bad", ["oversized", "wrong_stream", "misaligned", "bad_header_crc"])
def test_protocol_violation_kills_only_that_stream_and_writes_nothing(pairs: Pairs, bad: str) -> None:
    raw, socks = pairs(2)
    rx = PyStreamSet(socks)
    pairs.sets.append(rx)
    for s in raw:
        s.settimeout(HANG_S)
    chunk = 4096
    data = os.urandom(2 * chunk)
    dest = bytearray(b"\xee" * (2 * chunk))
    receiver = Bg(rx.recv_into, dest, transfer_id=1, length=2 * chunk, chunk_bytes=chunk,
                  csum_flags=XXH3, timeout_s=0.5)
    junk = b"\x55" * (chunk + 1)
    if bad == "oversized":
        frame = data_frame(junk, stream=0, tid=1, offset=0)
    elif bad == "wrong_stream":
        frame = data_frame(junk[:chunk], stream=1, tid=1, offset=0)
    elif bad == "misaligned":
        frame = data_frame(junk[:chunk], stream=0, tid=1, offset=1)
    else:
        torn = bytearray(data_frame(junk[:chunk], stream=0, tid=1, offset=0))
        torn[24] ^= 1  # offset field changed after the header CRC was computed
        frame = bytes(torn)
    raw[0].sendall(frame)
    assert is_closed_by_peer(raw[0]), "the receiver must close a stream that broke the protocol"
    # Only chunk 1 arrives, on the surviving stream: it is verified; chunk 0 never is.
    raw[1].sendall(data_frame(data[chunk:], stream=1, tid=1, offset=chunk))
    assert read_header(raw[1]).type == FrameType.ACK
    with pytest.raises(TransferTimeout):
        receiver.result()
    assert dest[:chunk] == b"\xee" * chunk, "bytes of a rejected frame reached the buffer"
    assert dest[chunk:] == data[chunk:]
    st = rx.stats()
    assert st["streams_failed"] == 1 and st["last_failed_stream"] == 0
    assert rx.alive() == [False, True]


@pytest.mark.parametrize("bad,code", [("ack_to_receiver", errors.E_TYPE), ("past_end", errors.E_RANGE),
                                      ("wrong_csum_kind", errors.E_FLAGS), ("future_ack", None)])
def test_violation_on_the_last_stream_is_a_protocol_error(pairs: Pairs, bad: str,
                                                           code: int | None) -> None:
    """With no stream left, a violation among the causes is what the call reports (as the C engine
    does): ProtocolError carrying the code and the stream, not a generic PeerClosedError."""
    raw, socks = pairs(1)
    if bad == "future_ack":  # the test plays the receiver: an ACK for a transfer not yet sent
        tx = PyStreamSet(raw)
        pairs.sets.append(tx)
        socks[0].settimeout(HANG_S)
        call = Bg(tx.send, bytes(100), transfer_id=1, chunk_bytes=100, csum_flags=XXH3, timeout_s=10)
        socks[0].sendall(ctl_frame(FrameType.ACK, stream=0, tid=2))
        code = errors.E_PEER
    else:
        rx = PyStreamSet(socks)
        pairs.sets.append(rx)
        call = Bg(rx.recv_into, bytearray(100), transfer_id=1, length=100, chunk_bytes=100,
                  csum_flags=XXH3, timeout_s=10)
        if bad == "ack_to_receiver":
            raw[0].sendall(ctl_frame(FrameType.ACK, stream=0, tid=1))
        elif bad == "past_end":
            raw[0].sendall(data_frame(bytes(100), stream=0, tid=1, offset=100))
        else:
            raw[0].sendall(data_frame(bytes(100), stream=0, tid=1, offset=0, csum=CRC32C))
    with pytest.raises(ProtocolError) as ei:
        call.result()
    assert ei.value.code == code and ei.value.stream == 0


def test_violation_on_one_stream_transfer_completes_on_the_other(pairs: Pairs) -> None:
    raw, socks = pairs(2)
    rx = PyStreamSet(socks)
    pairs.sets.append(rx)
    raw[1].settimeout(HANG_S)
    data = os.urandom(3000)
    dest = bytearray(3000)
    receiver = Bg(rx.recv_into, dest, transfer_id=1, length=3000, chunk_bytes=1000, csum_flags=XXH3,
                  timeout_s=10)
    raw[0].sendall(b"GET / HTTP/1.1\r\n" + b"x" * 100)  # not DWCP at all: bad magic
    for k in range(3):
        raw[1].sendall(data_frame(data[k * 1000:(k + 1) * 1000], stream=1, tid=1, offset=k * 1000))
    assert receiver.result() == 3000
    assert dest == data
    assert rx.alive() == [False, True]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.one_of(st.binary(min_size=1, max_size=300),
                      st.tuples(st.integers(0, 39), st.integers(1, 255))))
def test_garbage_on_a_stream_never_reaches_the_buffer(junk: bytes | tuple[int, int]) -> None:
    """Random bytes, or a DATA frame with one header byte changed, on stream 0: that stream dies (at
    the latest when it reaches EOF) and the buffer stays untouched; the transfer then completes on
    stream 1."""
    p = Pairs()
    try:
        raw, socks = p(2)
        rx = PyStreamSet(socks)
        p.sets.append(rx)
        for s in raw:
            s.settimeout(HANG_S)
        data = os.urandom(2000)
        dest = bytearray(b"\xee" * 2000)
        receiver = Bg(rx.recv_into, dest, transfer_id=1, length=2000, chunk_bytes=1000,
                      csum_flags=XXH3, timeout_s=10)
        if isinstance(junk, tuple):
            pos, xor = junk
            frame = bytearray(data_frame(b"\x55" * 1000, stream=0, tid=1, offset=0))
            frame[pos] ^= xor  # the header CRC catches any change to bytes 0..39
            junk = bytes(frame)
        raw[0].sendall(junk)
        raw[0].shutdown(socket.SHUT_WR)
        t_end = time.monotonic() + HANG_S
        while rx.alive()[0] and time.monotonic() < t_end:
            time.sleep(0.002)
        assert not rx.alive()[0]
        assert dest == b"\xee" * 2000
        raw[1].sendall(data_frame(data[:1000], stream=1, tid=1, offset=0)
                       + data_frame(data[1000:], stream=1, tid=1, offset=1000))
        assert receiver.result() == 2000 and dest == data
    finally:
        p.close()


def test_stale_and_duplicate_frames_are_discarded(pairs: Pairs) -> None:
    raw, socks = pairs(2)
    rx = PyStreamSet(socks)
    pairs.sets.append(rx)
    for s in raw:
        s.settimeout(HANG_S)
    data = os.urandom(2000)
    dest = bytearray(2000)
    receiver = Bg(rx.recv_into, dest, transfer_id=5, length=2000, chunk_bytes=1000, csum_flags=XXH3,
                  timeout_s=10)
    raw[0].sendall(data_frame(b"\x11" * 1000, stream=0, tid=4, offset=0))  # earlier transfer: stale
    raw[0].sendall(data_frame(data[:1000], stream=0, tid=5, offset=0))
    assert read_header(raw[0]).type == FrameType.ACK
    # A duplicate of the verified chunk 0 with wrong bytes must not overwrite it, and is ACKed again.
    raw[1].sendall(data_frame(b"\x22" * 1000, stream=1, tid=5, offset=0))
    h = read_header(raw[1])
    assert (h.type, h.offset) == (FrameType.ACK, 0)
    raw[1].sendall(data_frame(data[1000:], stream=1, tid=5, offset=1000))
    assert receiver.result() == 2000
    assert dest == data
    assert rx.stats()["chunks_duplicate"] == 2 and rx.alive() == [True, True]


def test_receiver_asks_again_for_a_chunk_whose_writer_died(pairs: Pairs) -> None:
    """Chunk 0 is being written from stream 0 when a re-sent copy arrives on stream 1 (dropped:
    another live stream is writing it); then stream 0 dies mid-payload. The sender holds the dropped
    copy as outstanding on a live stream and will not resend by itself, so the receiver must NACK."""
    raw, socks = pairs(2)
    rx = PyStreamSet(socks)
    pairs.sets.append(rx)
    for s in raw:
        s.settimeout(5)
    data = os.urandom(2000)
    dest = bytearray(2000)
    receiver = Bg(rx.recv_into, dest, transfer_id=1, length=2000, chunk_bytes=1000, csum_flags=XXH3,
                  timeout_s=10)
    raw[0].sendall(data_frame(data[:1000], stream=0, tid=1, offset=0)[:HEADER_BYTES + 500])
    time.sleep(0.1)  # let the receiver start writing chunk 0 from stream 0
    raw[1].sendall(data_frame(data[:1000], stream=1, tid=1, offset=0))      # dropped duplicate
    raw[1].sendall(data_frame(data[1000:], stream=1, tid=1, offset=1000))
    h = read_header(raw[1])
    assert (h.type, h.offset) == (FrameType.ACK, 1000)  # the duplicate before it was not ACKed
    raw[0].shutdown(socket.SHUT_RDWR)
    h = read_header(raw[1])
    assert (h.type, h.offset) == (FrameType.NACK, 0)
    raw[1].sendall(data_frame(data[:1000], stream=1, tid=1, offset=0))
    assert read_header(raw[1]).type == FrameType.ACK
    assert read_header(raw[1]).type == FrameType.DONE
    assert receiver.result() == 2000 and dest == data


def test_sender_resends_a_nacked_chunk(pairs: Pairs) -> None:
    socks, raw = pairs(1)
    tx = PyStreamSet(socks)
    pairs.sets.append(tx)
    raw[0].settimeout(HANG_S)
    data = os.urandom(5000)
    sender = Bg(tx.send, data, transfer_id=3, chunk_bytes=5000, csum_flags=XXH3, timeout_s=10)
    h = read_header(raw[0])
    assert (h.type, h.stream, h.transfer_id, h.offset, h.length) == (FrameType.DATA, 0, 3, 0, 5000)
    assert h.flags == XXH3
    payload = recv_exact(raw[0], h.length)
    assert payload == data and h.checksum == payload_checksum(XXH3, payload)
    raw[0].sendall(ctl_frame(FrameType.NACK, stream=0, tid=3, offset=0))
    h2 = read_header(raw[0])
    assert (h2.type, h2.offset, h2.checksum) == (FrameType.DATA, 0, h.checksum)
    assert recv_exact(raw[0], h2.length) == data
    raw[0].sendall(ctl_frame(FrameType.ACK, stream=0, tid=3, offset=0))
    assert sender.result() == 5000
    assert tx.stats()["chunks_resent"] == 1


def test_sender_kills_stream_whose_peer_breaks_protocol(pairs: Pairs) -> None:
    socks, raw = pairs(2)
    tx = PyStreamSet(socks)
    pairs.sets.append(tx)
    for s in raw:
        s.settimeout(HANG_S)
    data = os.urandom(2000)
    sender = Bg(tx.send, data, transfer_id=1, chunk_bytes=1000, csum_flags=XXH3, timeout_s=10)
    # An ACK for a chunk that was never sent is a violation: stream 0 dies, its chunks move to 1.
    raw[0].sendall(ctl_frame(FrameType.ACK, stream=0, tid=1, offset=50_000))
    got = bytearray(2000)
    seen: set[int] = set()
    while seen != {0, 1000}:
        h = read_header(raw[1])
        got[h.offset:h.offset + h.length] = recv_exact(raw[1], h.length)
        seen.add(h.offset)
    raw[1].sendall(ctl_frame(FrameType.DONE, stream=1, tid=1, offset=2000))
    assert sender.result() == 2000
    assert got == data
    assert tx.alive() == [False, True]


def test_sender_mid_frame_at_completion_finishes_from_a_private_copy(pairs: Pairs) -> None:
    """The receiver says DONE while the sender is still writing a (duplicate) chunk: send() returns
    at once, holds no view of the caller's buffer (a bytearray can be resized), and the rest of that
    frame goes out, unchanged, at the start of the next call."""
    socks, raw = pairs(2)
    tx = PyStreamSet(socks)
    pairs.sets.append(tx)
    for s in raw:
        s.settimeout(HANG_S)
    chunk = 16 << 20  # more than the socket buffers hold, so the writer blocks mid-frame
    buf = bytearray(os.urandom(2 * chunk))
    original = bytes(buf)
    sender = Bg(tx.send, buf, transfer_id=1, chunk_bytes=chunk, csum_flags=XXH3, timeout_s=10)
    # Stream 1: read only the header and a little of its chunk. Stream 0: read a whole frame.
    h1 = read_header(raw[1])
    part = recv_exact(raw[1], 1 << 20)
    h0 = read_header(raw[0])
    recv_exact(raw[0], h0.length)
    raw[0].sendall(ctl_frame(FrameType.DONE, stream=0, tid=1, offset=2 * chunk))
    assert sender.result() == 2 * chunk
    buf[:] = b"\0" * len(buf)
    buf.extend(b"more")  # BufferError if the engine still exported a view of it
    # The next call first finishes the old frame, then carries transfer 2.
    data2 = os.urandom(1000)
    sender2 = Bg(tx.send, data2, transfer_id=2, chunk_bytes=1000, csum_flags=XXH3, timeout_s=10)
    rest = recv_exact(raw[1], h1.length - len(part))
    assert part + rest == original[h1.offset:h1.offset + h1.length]
    assert payload_checksum(XXH3, part + rest) == h1.checksum
    r, _, _ = select.select(raw, [], [], HANG_S)
    s = r[0]
    h = read_header(s)
    assert (h.type, h.transfer_id) == (FrameType.DATA, 2)
    assert recv_exact(s, h.length) == data2
    s.sendall(ctl_frame(FrameType.ACK, stream=h.stream, tid=2, offset=0))
    assert sender2.result() == 1000


def test_receiver_mid_duplicate_at_completion_discards_the_rest_next_call(pairs: Pairs) -> None:
    raw, socks = pairs(2)
    rx = PyStreamSet(socks)
    pairs.sets.append(rx)
    for s in raw:
        s.settimeout(HANG_S)
    data = os.urandom(2000)
    dest = bytearray(2000)
    receiver = Bg(rx.recv_into, dest, transfer_id=1, length=2000, chunk_bytes=1000, csum_flags=XXH3,
                  timeout_s=10)
    raw[0].sendall(data_frame(data[:1000], stream=0, tid=1, offset=0))
    assert read_header(raw[0]).type == FrameType.ACK
    dup = data_frame(data[:1000], stream=1, tid=1, offset=0)
    raw[1].sendall(dup[:HEADER_BYTES + 300])  # a duplicate, cut in the middle of its payload
    time.sleep(0.05)
    raw[0].sendall(data_frame(data[1000:], stream=0, tid=1, offset=1000))
    assert receiver.result() == 2000 and dest == data
    data2 = os.urandom(500)
    dest2 = bytearray(500)
    receiver2 = Bg(rx.recv_into, dest2, transfer_id=2, length=500, chunk_bytes=1000, csum_flags=XXH3,
                   timeout_s=10)
    raw[1].sendall(dup[HEADER_BYTES + 300:] + data_frame(data2, stream=1, tid=2, offset=0))
    assert receiver2.result() == 500 and dest2 == data2
    assert dest == data
    assert rx.alive() == [True, True]


# ---- TLS -------------------------------------------------------------------------------------------
def _self_signed(tmp_path: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1: with the cryptography package if installed, else the
    openssl CLI."""
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        from cryptography import x509  # type: ignore[import-not-found, unused-ignore]
        from cryptography.hazmat.primitives import hashes, serialization  # type: ignore[import-not-found, unused-ignore]
        from cryptography.hazmat.primitives.asymmetric import ec  # type: ignore[import-not-found, unused-ignore]
        from cryptography.x509.oid import NameOID  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("TLS test needs the cryptography package or the openssl CLI to make a cert")
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key_path), "-out",
                        str(cert_path), "-days", "1", "-subj", "/CN=dwcp-test", "-addext",
                        "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:TRUE"],
                       check=True, capture_output=True, timeout=30)
        return str(cert_path), str(key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dwcp-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_streams(pairs: Pairs, tmp_path: Any) -> None:
    from dwcp.wire.tls import client_context, server_context

    cert, key = _self_signed(tmp_path)
    sctx = server_context(cert, key)
    cctx = client_context(ca_file=cert)
    plain_c, plain_s = pairs(4)
    servers = Bg(lambda: [sctx.wrap_socket(s, server_side=True) for s in plain_s])
    clients = [cctx.wrap_socket(c, server_hostname="127.0.0.1") for c in plain_c]
    tls_s = servers.result()
    pairs.socks += clients + tls_s
    a, b = PyStreamSet(clients), PyStreamSet(tls_s)
    pairs.sets += [a, b]
    data = os.urandom((8 << 20) + 12345)
    dest = bytearray(len(data))
    assert transfer(a, b, data, dest, chunk=256 << 10) == (len(data), len(data))
    assert dest == data
    back = bytearray(len(data))
    assert transfer(b, a, dest, back, chunk=256 << 10) == (len(data), len(data))
    assert back == data
    # A stream lost under TLS re-routes its chunks like a plain one.
    b.kill(3)
    dest3 = bytearray(3 << 20)
    data3 = os.urandom(3 << 20)
    assert transfer(a, b, data3, dest3, chunk=64 << 10, tid=2) == (len(data3), len(data3))
    assert dest3 == data3 and a.alive_count() == 3
