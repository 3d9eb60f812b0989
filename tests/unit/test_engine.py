"""The C transfer engine (dwcp._core.StreamSet) over real loopback TCP connections.

Sender and receiver run in two threads: both release the GIL for the whole transfer. Raw-frame tests
play one side by hand with encode_header/decode_header to check the engine's reaction to bad peers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from dwcp import _core
from dwcp._core import FLAG_CSUM_CRC32C, FLAG_CSUM_XXH3, StreamSet
from dwcp.errors import (ConfigError, PeerClosedError, ProtocolError, SessionClosedError,
                         TransferTimeout, TransportError)
from dwcp.wire.frames import FrameType
from tests.conftest import Background, tcp_pairs

KiB = 1 << 10
MiB = 1 << 20
E_TYPE, E_HEADER_CRC, E_LENGTH, E_RANGE, E_STREAM = -3, -6, -7, -8, -9


class Link:
    """n loopback pairs with a StreamSet on each side."""

    def __init__(self, n: int) -> None:
        self.a, self.b = tcp_pairs(n)
        self.tx = StreamSet([s.fileno() for s in self.a])
        self.rx = StreamSet([s.fileno() for s in self.b])

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        for s in self.a + self.b:
            s.close()


@pytest.fixture
def link_factory() -> Iterator[Callable[[int], Link]]:
    links: list[Link] = []

    def make(n: int) -> Link:
        link = Link(n)
        links.append(link)
        return link

    yield make
    for link in links:
        link.close()


def pattern(size: int, seed: int = 1) -> np.ndarray:
    """Bytes that encode their own position, so a misplaced chunk is visible."""
    words = (size + 7) // 8
    arr = (np.arange(words, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed))
    return arr.view(np.uint8)[:size].copy()


def transfer(link: Link, src: Any, dst: Any, *, tid: int = 1, chunk: int = 64 * KiB,
             csum: int = FLAG_CSUM_XXH3, length: int | None = None, timeout_s: float = 20.0,
             **send_kw: Any) -> tuple[int, int]:
    n = len(memoryview(src).cast("B")) if length is None else length
    rx = Background(lambda: link.rx.recv_into(dst, transfer_id=tid, length=n, chunk_bytes=chunk,
                                              csum_flags=csum, timeout_s=timeout_s))
    sent = link.tx.send(src, transfer_id=tid, chunk_bytes=chunk, csum_flags=csum, length=length,
                        timeout_s=timeout_s, **send_kw)
    return sent, rx.result()


# ------------------------------------------------------------------ sizes and stream counts

@pytest.mark.parametrize("size,streams,chunk", [
    (0, 1, 64 * KiB),
    (1, 1, 64 * KiB),
    (3 * 64 * KiB + 17, 4, 64 * KiB),
    (64 * KiB, 4, 64 * KiB),
    (5 * MiB + 12345, 16, 256 * KiB),
    (3 * 4 * KiB + 17, 16, 4 * KiB),
    (256 * 16 * KiB + 999, 256, 16 * KiB),
])
@pytest.mark.parametrize("csum", [FLAG_CSUM_XXH3, FLAG_CSUM_CRC32C, 0])
def test_transfer_sizes(link_factory: Callable[[int], Link], size: int, streams: int, chunk: int,
                        csum: int) -> None:
    link = link_factory(streams)
    src = pattern(size)
    dst = np.zeros(size, dtype=np.uint8)
    sent, got = transfer(link, src, dst, chunk=chunk, csum=csum)
    assert sent == got == size
    assert np.array_equal(src, dst)
    chunks = -(-size // chunk)
    assert link.tx.stats()["chunks"] == chunks
    rs = link.rx.stats()
    assert rs["chunks"] == chunks
    assert rs["bytes_payload"] == size
    assert rs["checksum_errors"] == 0


def test_many_transfers_on_one_set(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(4)
    for tid, size in enumerate([1000, 0, 3 * MiB + 1, 17, 2 * MiB], start=10):
        src = pattern(size, seed=tid)
        dst = np.zeros(size, dtype=np.uint8)
        sent, got = transfer(link, src, dst, tid=tid, chunk=256 * KiB)
        assert sent == got == size
        assert np.array_equal(src, dst)


def test_buffer_types(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(2)
    payload = bytes(pattern(300 * KiB + 3))
    dst = bytearray(len(payload))
    transfer(link, memoryview(payload), memoryview(dst), tid=1)
    assert bytes(dst) == payload
    arr = np.zeros(len(payload) // 4 + 1, dtype=np.uint32)
    view = memoryview(arr).cast("B")[:len(payload)]
    transfer(link, payload, view, tid=2)
    assert bytes(view) == payload
    with pytest.raises(ConfigError, match="writable"):
        link.rx.recv_into(payload, transfer_id=3, length=10, chunk_bytes=4096, csum_flags=0)
    with pytest.raises(ConfigError, match="C-contiguous"):
        link.tx.send(np.zeros(100, dtype=np.uint8)[::2], transfer_id=3, chunk_bytes=4096, csum_flags=0)


def test_bad_arguments_say_what_to_do(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(1)
    buf = bytearray(100)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        link.tx.send(buf, transfer_id=1, chunk_bytes=0, csum_flags=FLAG_CSUM_XXH3)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        link.tx.send(buf, transfer_id=1, chunk_bytes=128 * MiB, csum_flags=FLAG_CSUM_XXH3)
    with pytest.raises(ConfigError, match="csum_flags"):
        link.tx.send(buf, transfer_id=1, chunk_bytes=64, csum_flags=3)
    with pytest.raises(ConfigError, match="frame_flags"):
        link.tx.send(buf, transfer_id=1, chunk_bytes=64, csum_flags=2, frame_flags=1)
    with pytest.raises(ConfigError, match="multiple of chunk_bytes"):
        link.tx.send(buf, transfer_id=1, chunk_bytes=64, csum_flags=2, length=1000)
    with pytest.raises(ConfigError, match="multiple of chunk_bytes"):
        link.rx.recv_into(buf, transfer_id=1, length=101, chunk_bytes=64, csum_flags=2)
    with pytest.raises(ConfigError, match="timeout_s"):
        link.rx.recv_into(buf, transfer_id=1, length=100, chunk_bytes=64, csum_flags=2, timeout_s=0)
    with pytest.raises(ConfigError, match="transfer_id"):
        link.tx.send(buf, transfer_id=-1, chunk_bytes=64, csum_flags=2)
    with pytest.raises(ConfigError, match="deadline"):
        link.tx.send(buf, transfer_id=1, chunk_bytes=64, csum_flags=2, deadline="soon")
    with pytest.raises(ConfigError):
        StreamSet([])
    with pytest.raises(ConfigError, match="twice"):
        StreamSet([link.a[0].fileno(), link.a[0].fileno()])
    with pytest.raises(ConfigError, match="index"):
        link.tx.kill(5)


def test_stream_set_api(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(3)
    assert link.tx.count == 3
    assert link.tx.alive() == [True, True, True]
    assert link.tx.alive_count() == 3
    st = link.tx.stats()
    assert set(st) == {"bytes_payload", "bytes_wire", "chunks", "chunks_resent", "chunks_duplicate",
                       "checksum_errors", "streams_failed", "zc_sends", "zc_completions", "zc_copied",
                       "zc_fallback", "last_errno", "last_failed_stream", "truncated_at", "control_frames",
                       "mt_transfers", "auth_failures", "rekeys"}
    link.tx.kill(1)
    assert link.tx.alive() == [True, False, True]
    assert link.tx.alive_count() == 2
    with StreamSet([link.a[0].fileno()]) as s:
        assert not s.closed
    assert s.closed
    with pytest.raises(SessionClosedError):
        s.send(b"x", transfer_id=1, chunk_bytes=64, csum_flags=2)
    s.close()  # idempotent


# ------------------------------------------------------------------ wrap mode and deadlines

def test_wrap_mode(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(4)
    chunk = 64 * KiB
    src = pattern(4 * chunk)
    dst = np.zeros(4 * chunk, dtype=np.uint8)
    length = 37 * chunk + 100
    sent, got = transfer(link, src, dst, chunk=chunk, length=length)
    assert sent == got == length
    assert np.array_equal(src, dst)
    assert link.rx.stats()["bytes_payload"] == length


def test_deadline_truncates_at_a_chunk_boundary(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(4)
    chunk = 256 * KiB
    src = pattern(16 * chunk)
    dst = np.zeros(16 * chunk, dtype=np.uint8)
    length = 1 << 50
    sent, got = transfer(link, src, dst, chunk=chunk, length=length, deadline=time.monotonic() + 0.3)
    assert 0 < sent < length
    assert sent == got
    assert sent % chunk == 0
    assert link.tx.stats()["truncated_at"] == sent == link.rx.stats()["truncated_at"]
    assert link.rx.stats()["bytes_payload"] == sent
    if sent >= len(src):
        assert np.array_equal(src, dst)
    # The set stays usable for the next transfer.
    small = pattern(1000, seed=9)
    out = np.zeros(1000, dtype=np.uint8)
    assert transfer(link, small, out, tid=2) == (1000, 1000)
    assert np.array_equal(small, out)


def test_deadline_already_passed_sends_nothing(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(2)
    src = pattern(MiB)
    dst = np.zeros(MiB, dtype=np.uint8)
    sent, got = transfer(link, src, dst, deadline=time.monotonic() - 1)
    assert sent == got == 0


# ------------------------------------------------------------------ stream failures

def _wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.002)


def test_stream_killed_mid_transfer_is_recovered(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(4)
    size = 256 * MiB
    src = pattern(size)
    dst = np.zeros(size, dtype=np.uint8)
    chunk = 1 * MiB
    rx = Background(lambda: link.rx.recv_into(dst, transfer_id=1, length=size, chunk_bytes=chunk,
                                              csum_flags=FLAG_CSUM_XXH3, timeout_s=30))

    def killer() -> None:
        _wait_for(lambda: link.rx.stats()["bytes_payload"] > 16 * MiB)
        link.b[2].shutdown(socket.SHUT_RDWR)

    k = Background(killer)
    sent = link.tx.send(src, transfer_id=1, chunk_bytes=chunk, csum_flags=FLAG_CSUM_XXH3,
                        timeout_s=30)
    k.result()
    assert rx.result() == sent == size
    assert np.array_equal(src, dst)
    ts, rs = link.tx.stats(), link.rx.stats()
    assert ts["streams_failed"] == 1 and rs["streams_failed"] == 1
    assert ts["last_failed_stream"] == 2
    assert ts["chunks_resent"] > 0
    assert link.tx.alive() == [True, True, False, True]


def test_sender_side_kill_requeues(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(3)
    size = 96 * MiB
    src = pattern(size)
    dst = np.zeros(size, dtype=np.uint8)
    rx = Background(lambda: link.rx.recv_into(dst, transfer_id=1, length=size, chunk_bytes=MiB,
                                              csum_flags=FLAG_CSUM_XXH3, timeout_s=30))

    def killer() -> None:
        _wait_for(lambda: link.tx.stats()["chunks"] > 8)
        link.tx.kill(0)

    k = Background(killer)
    sent = link.tx.send(src, transfer_id=1, chunk_bytes=MiB, csum_flags=FLAG_CSUM_XXH3, timeout_s=30)
    k.result()
    assert rx.result() == sent == size
    assert np.array_equal(src, dst)
    assert link.tx.alive() == [False, True, True]


@pytest.mark.parametrize("seed", range(10))
def test_random_stream_deaths_never_corrupt_or_hang(link_factory: Callable[[int], Link],
                                                    seed: int) -> None:
    # Random stream counts, chunk sizes and deaths (either side, engine kill or a socket shutdown
    # behind the engine's back), always leaving one pair alive: the transfer must complete with the
    # right bytes. This is how the lost-FIN and dropped-duplicate hangs were found.
    import random
    rng = random.Random(seed)
    n = rng.choice([2, 3, 5, 8])
    chunk = rng.choice([1000, 4096, 65536, 1 << 20])
    size = rng.randrange(1, 24 * MiB)
    link = link_factory(n)
    src = pattern(size, seed)
    dst = np.zeros(size, dtype=np.uint8)
    victims = rng.sample(range(n), rng.randrange(1, n))
    plan = [(k, rng.choice("ab+-"), rng.random() * 0.01) for k in victims]

    def killer() -> None:
        for k, how, delay in plan:
            time.sleep(delay)
            if how == "a":
                link.a[k].shutdown(socket.SHUT_RDWR)
            elif how == "b":
                link.b[k].shutdown(socket.SHUT_RDWR)
            elif how == "+":
                link.tx.kill(k)
            else:
                link.rx.kill(k)

    rx = Background(lambda: link.rx.recv_into(dst, transfer_id=1, length=size, chunk_bytes=chunk,
                                              csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
    k = Background(killer)
    sent = link.tx.send(src, transfer_id=1, chunk_bytes=chunk, csum_flags=FLAG_CSUM_XXH3, timeout_s=20)
    assert rx.result() == sent == size, plan
    k.result()
    assert np.array_equal(src, dst), plan


def test_all_streams_killed_raises_peer_closed(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(4)
    size = 256 * MiB
    src = pattern(size)

    def closer() -> None:
        time.sleep(0.2)
        for s in link.b:
            s.shutdown(socket.SHUT_RDWR)

    k = Background(closer)
    t0 = time.monotonic()
    with pytest.raises(PeerClosedError):
        link.tx.send(src, transfer_id=1, chunk_bytes=MiB, csum_flags=FLAG_CSUM_XXH3, timeout_s=30)
    assert time.monotonic() - t0 < 15
    k.result()
    assert link.tx.alive_count() == 0


def test_receiver_sees_all_senders_gone(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(2)
    dst = np.zeros(MiB, dtype=np.uint8)
    k = Background(lambda: (time.sleep(0.2), [s.shutdown(socket.SHUT_RDWR) for s in link.a]))
    with pytest.raises(PeerClosedError):
        link.rx.recv_into(dst, transfer_id=1, length=MiB, chunk_bytes=64 * KiB,
                          csum_flags=FLAG_CSUM_XXH3, timeout_s=30)
    k.result()


def test_silent_peer_times_out(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(2)
    src = pattern(128 * MiB)
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        link.tx.send(src, transfer_id=1, chunk_bytes=MiB, csum_flags=FLAG_CSUM_XXH3, timeout_s=0.5)
    assert time.monotonic() - t0 < 30  # only catches hangs


def test_interrupt_and_busy(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(2)
    dst = np.zeros(MiB, dtype=np.uint8)
    rx = Background(lambda: link.rx.recv_into(dst, transfer_id=1, length=MiB, chunk_bytes=64 * KiB,
                                              csum_flags=FLAG_CSUM_XXH3, timeout_s=30))
    time.sleep(0.1)
    with pytest.raises(TransportError, match="already running"):
        link.rx.recv_into(dst, transfer_id=1, length=MiB, chunk_bytes=64 * KiB, csum_flags=2)
    link.rx.interrupt()
    with pytest.raises(SessionClosedError):
        rx.result(timeout=10)
    # close() while busy: interrupts, and the transfer thread frees the state.
    rx = Background(lambda: link.rx.recv_into(dst, transfer_id=2, length=MiB, chunk_bytes=64 * KiB,
                                              csum_flags=FLAG_CSUM_XXH3, timeout_s=30))
    time.sleep(0.1)
    link.rx.close()
    with pytest.raises(SessionClosedError):
        rx.result(timeout=10)
    assert link.rx.closed


# ------------------------------------------------------------------ hostile or broken peers

def _read_frame(sock: socket.socket, timeout: float = 10.0, max_payload: int = 0) -> tuple[int, ...]:
    sock.settimeout(timeout)
    data = b""
    while len(data) < 48:
        part = sock.recv(48 - len(data))
        assert part, "engine closed the connection"
        data += part
    return _core.decode_header(data, max_payload)


def _data_frame(stream: int, tid: int, offset: int, payload: bytes, *, csum: int | None = None,
                length: int | None = None) -> bytes:
    c = _core.xxh3(payload) if csum is None else csum
    n = len(payload) if length is None else length
    return _core.encode_header(FrameType.DATA, FLAG_CSUM_XXH3, stream, n, tid, offset, c) + payload


def test_corrupted_payload_is_nacked_then_accepted() -> None:
    a, b = tcp_pairs(1)
    chunk = 4096
    payload = bytes(pattern(2 * chunk))
    dst = bytearray(2 * chunk)
    with StreamSet([b[0].fileno()]) as rx_set:
        rx = Background(lambda: rx_set.recv_into(dst, transfer_id=5, length=2 * chunk,
                                                 chunk_bytes=chunk, csum_flags=FLAG_CSUM_XXH3,
                                                 timeout_s=20))
        first = payload[:chunk]
        a[0].sendall(_data_frame(0, 5, 0, first, csum=_core.xxh3(first) ^ 1))
        f = _read_frame(a[0])
        assert (f[1], f[3], f[5], f[6]) == (FrameType.NACK, 0, 5, 0)
        # A stale frame of an earlier transfer is drained and ignored.
        a[0].sendall(_data_frame(0, 4, 0, b"old" * 100))
        a[0].sendall(_data_frame(0, 5, 0, first))
        assert _read_frame(a[0])[1::5] == (FrameType.ACK, 0)
        a[0].sendall(_data_frame(0, 5, chunk, payload[chunk:]))
        assert _read_frame(a[0])[1::5] == (FrameType.ACK, chunk)
        done = _read_frame(a[0])
        assert (done[1], done[5]) == (FrameType.DONE, 5)
        assert rx.result() == 2 * chunk
        assert bytes(dst) == payload
        st = rx_set.stats()
        assert st["checksum_errors"] == 1 and st["chunks"] == 2
    for s in a + b:
        s.close()


def _bad_crc(frame: bytes) -> bytes:
    b = bytearray(frame)
    b[40] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("name,make,code", [
    ("oversized", lambda p: _data_frame(0, 1, 4096, p[:4096], length=4097), E_LENGTH),
    ("too long for the type limit", lambda p: _core.encode_header(FrameType.DATA, 2, 0, 128 << 20, 1,
                                                                 4096, 0), E_LENGTH),
    ("bad header crc", lambda p: _bad_crc(_data_frame(0, 1, 4096, p[4096:8192])), E_HEADER_CRC),
    ("wrong stream", lambda p: _data_frame(1, 1, 4096, p[4096:8192]), E_STREAM),
    ("misaligned offset", lambda p: _data_frame(0, 1, 4095, p[4096:8192]), E_RANGE),
    ("offset past end", lambda p: _data_frame(0, 1, 1 << 20, p[:4096]), E_RANGE),
    ("ack on data stream", lambda p: _core.encode_header(FrameType.ACK, 0, 0, 0, 1, 0, 0), E_TYPE),
])
def test_bad_frame_is_protocol_error_and_writes_nothing(name: str, make: Callable[[bytes], bytes],
                                                        code: int) -> None:
    a, b = tcp_pairs(1)
    chunk = 4096
    payload = bytes(pattern(3 * chunk))
    dst = bytearray(3 * chunk)
    with StreamSet([b[0].fileno()]) as rx_set:
        rx = Background(lambda: rx_set.recv_into(dst, transfer_id=1, length=3 * chunk,
                                                 chunk_bytes=chunk, csum_flags=FLAG_CSUM_XXH3,
                                                 timeout_s=20))
        a[0].sendall(_data_frame(0, 1, 0, payload[:chunk]))
        assert _read_frame(a[0])[1] == FrameType.ACK
        a[0].sendall(make(payload) + payload[4096:8192])
        with pytest.raises(ProtocolError) as ei:
            rx.result(timeout=20)
        assert ei.value.code == code, name
        assert ei.value.stream == 0
        assert bytes(dst[:chunk]) == payload[:chunk]
        assert dst[chunk:] == bytearray(2 * chunk)  # nothing beyond the verified chunk
        assert rx_set.alive() == [False]
    for s in a + b:
        s.close()


def test_next_transfer_frame_waits_for_the_next_call() -> None:
    # The sender starts transfer n+1 as soon as it holds every ACK of n, while the receiver may still
    # be flushing DONE: a frame of n+1 must be kept for the next call, not rejected or dropped.
    a, b = tcp_pairs(2)
    chunk = 4096
    p1, p2 = bytes(pattern(2 * chunk, 1)), bytes(pattern(chunk, 2))
    d1, d2 = bytearray(2 * chunk), bytearray(chunk)
    with StreamSet([s.fileno() for s in b]) as rx_set:
        rx = Background(lambda: rx_set.recv_into(d1, transfer_id=1, length=2 * chunk, chunk_bytes=chunk,
                                                 csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        a[0].sendall(_data_frame(0, 1, 0, p1[:chunk]) + _data_frame(0, 2, 0, p2))
        time.sleep(0.05)
        a[1].sendall(_data_frame(1, 1, chunk, p1[chunk:]))
        assert rx.result() == 2 * chunk and d1 == p1
        assert rx_set.recv_into(d2, transfer_id=2, length=chunk, chunk_bytes=chunk,
                                csum_flags=FLAG_CSUM_XXH3, timeout_s=20) == chunk
        assert d2 == p2
        assert rx_set.alive() == [True, True]
    for s in a + b:
        s.close()


def _copy_dropped_while_written(a: list[socket.socket], rx_set: StreamSet, data: bytes, dst: bytearray,
                                chunk: int) -> Background:
    """A receive of two chunks where chunk 0 is half written from stream 0 when a copy of it (and
    chunk 1) arrives on stream 1: the copy is dropped, another live stream writes that chunk."""
    rx = Background(lambda: rx_set.recv_into(dst, transfer_id=1, length=2 * chunk, chunk_bytes=chunk,
                                             csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
    a[0].sendall(_data_frame(0, 1, 0, data[:chunk])[:48 + 500])
    time.sleep(0.1)
    a[1].sendall(_data_frame(1, 1, 0, data[:chunk]) + _data_frame(1, 1, chunk, data[chunk:]))
    return rx


def test_receiver_asks_again_for_a_chunk_whose_writer_died() -> None:
    # Chunk 0 is being written from stream 0 when a re-sent copy arrives on stream 1 and is dropped
    # (another live stream writes it); then stream 0 dies mid-payload. The sender counts the dropped
    # copy as outstanding on a live stream, so only a NACK from the receiver gets it sent again.
    a, b = tcp_pairs(2)
    chunk = 1000
    data = bytes(pattern(2 * chunk))
    dst = bytearray(2 * chunk)
    with StreamSet([s.fileno() for s in b]) as rx_set:
        rx = _copy_dropped_while_written(a, rx_set, data, dst, chunk)
        assert _read_frame(a[1])[1::5] == (FrameType.ACK, chunk)  # the dropped copy is not ACKed
        a[0].shutdown(socket.SHUT_RDWR)
        assert _read_frame(a[1])[1::5] == (FrameType.NACK, 0)
        a[1].sendall(_data_frame(1, 1, 0, data[:chunk]))
        assert _read_frame(a[1])[1::5] == (FrameType.ACK, 0)
        assert _read_frame(a[1])[1] == FrameType.DONE
        assert rx.result() == 2 * chunk and dst == data
        assert rx_set.stats()["chunks_duplicate"] == 1
    for s in a + b:
        s.close()


def test_receiver_acks_a_dropped_copy_where_the_sender_waits_for_it() -> None:
    # Chunk 0 is being written from stream 0 when a re-sent copy arrives on stream 1 and is dropped;
    # then stream 0's copy completes. The sender re-sent the chunk because it lost stream 0's end, so
    # an ACK on stream 0 may never reach it: the chunk is acknowledged on stream 1 as well.
    a, b = tcp_pairs(2)
    chunk = 1000
    data = bytes(pattern(2 * chunk))
    dst = bytearray(2 * chunk)
    with StreamSet([s.fileno() for s in b]) as rx_set:
        rx = _copy_dropped_while_written(a, rx_set, data, dst, chunk)
        time.sleep(0.1)
        a[0].sendall(_data_frame(0, 1, 0, data[:chunk])[48 + 500:])
        seen = []
        while not seen or seen[-1][1] != FrameType.DONE:
            seen.append(_read_frame(a[1]))
        assert (FrameType.ACK, 0) in [f[1::5] for f in seen], seen
        assert rx.result() == 2 * chunk and dst == data
    for s in a + b:
        s.close()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    out = bytearray()
    while len(out) < n:
        part = sock.recv(min(n - len(out), 1 << 20))
        assert part, "engine closed the connection"
        out += part
    return bytes(out)


def test_sender_carries_a_cut_off_frame_into_the_next_call() -> None:
    # DONE arrives while a big frame is still half in the socket: send() returns, the caller may
    # scribble over its buffer, and the rest of that frame goes out (from a private copy) at the
    # start of the next call, so the byte stream stays framed.
    a, b = tcp_pairs(1)
    chunk = 16 * MiB
    src = bytearray(pattern(2 * chunk, 3))
    original = bytes(src)
    with StreamSet([a[0].fileno()]) as tx_set:
        tx = Background(lambda: tx_set.send(src, transfer_id=1, chunk_bytes=chunk,
                                            csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        time.sleep(0.2)  # let the first frame fill the socket buffers
        b[0].sendall(_core.encode_header(FrameType.DONE, 0, 0, 0, 1, 2 * chunk, 0))
        assert tx.result() == 2 * chunk
        if _core.features()["debug_counters"]:
            assert _core.debug_counters()["carry_buffers"] >= 1
        src[:] = bytes(len(src))  # the caller owns its buffer again
        tx = Background(lambda: tx_set.send(b"next", transfer_id=2, chunk_bytes=chunk,
                                            csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        h = _core.decode_header(_read_exact(b[0], 48), chunk)
        assert (h[1], h[4], h[5], h[6]) == (FrameType.DATA, chunk, 1, 0)
        assert _read_exact(b[0], chunk) == original[:chunk]
        h = _core.decode_header(_read_exact(b[0], 48), chunk)
        assert (h[1], h[4], h[5]) == (FrameType.DATA, 4, 2)
        assert _read_exact(b[0], 4) == b"next"
        b[0].sendall(_core.encode_header(FrameType.ACK, 0, 0, 0, 2, 0, 0))
        assert tx.result() == 4
    for s in a + b:
        s.close()


def test_receiver_discards_the_rest_of_a_duplicate_in_the_next_call() -> None:
    a, b = tcp_pairs(2)
    chunk = 4096
    data = bytes(pattern(2 * chunk, 4))
    dst = bytearray(2 * chunk)
    with StreamSet([s.fileno() for s in b]) as rx_set:
        rx = Background(lambda: rx_set.recv_into(dst, transfer_id=1, length=2 * chunk, chunk_bytes=chunk,
                                                 csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        a[0].sendall(_data_frame(0, 1, 0, data[:chunk]))
        assert _read_frame(a[0])[1::5] == (FrameType.ACK, 0)
        dup = _data_frame(1, 1, 0, data[:chunk])
        a[1].sendall(dup[:48 + 1000])  # a duplicate, cut off by the end of the transfer
        time.sleep(0.05)
        a[0].sendall(_data_frame(0, 1, chunk, data[chunk:]))
        assert rx.result() == 2 * chunk and dst == data
        second = bytes(pattern(chunk, 5))
        out = bytearray(chunk)
        rx = Background(lambda: rx_set.recv_into(out, transfer_id=2, length=chunk, chunk_bytes=chunk,
                                                 csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        a[1].sendall(dup[48 + 1000:] + _data_frame(1, 2, 0, second))
        assert rx.result() == chunk and out == second
        assert dst == data  # the tail of the duplicate went nowhere near the old buffer
    for s in a + b:
        s.close()


def test_one_set_carries_both_directions(link_factory: Callable[[int], Link]) -> None:
    # As Session does: the same pair of sets, transfers alternating direction. The late DONEs of a
    # send are still in the sockets when the set starts receiving and must be dropped as stale.
    link = link_factory(4)
    for tid in range(1, 9):
        fwd = tid % 2 == 1
        tx, rx = (link.tx, link.rx) if fwd else (link.rx, link.tx)
        size = 300_001 + tid
        src = pattern(size, tid)
        dst = np.zeros(size, dtype=np.uint8)
        r = Background(lambda: rx.recv_into(dst, transfer_id=tid, length=size, chunk_bytes=16 * KiB,
                                            csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        assert tx.send(src, transfer_id=tid, chunk_bytes=16 * KiB, csum_flags=FLAG_CSUM_XXH3,
                       timeout_s=20) == size
        assert r.result() == size
        assert np.array_equal(src, dst)
    assert link.tx.stats()["streams_failed"] == link.rx.stats()["streams_failed"] == 0


def test_transfer_ids_must_grow_per_direction(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(1)
    transfer(link, b"abc", bytearray(3), tid=5)
    with pytest.raises(ConfigError, match="not above the last one sent"):
        link.tx.send(b"abc", transfer_id=5, chunk_bytes=64, csum_flags=FLAG_CSUM_XXH3)
    with pytest.raises(ConfigError, match="not above the last one received"):
        link.rx.recv_into(bytearray(3), transfer_id=4, length=3, chunk_bytes=64, csum_flags=2)
    # The other direction has its own sequence.
    r = Background(lambda: link.tx.recv_into(bytearray(3), transfer_id=1, length=3, chunk_bytes=64,
                                             csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
    assert link.rx.send(b"xyz", transfer_id=1, chunk_bytes=64, csum_flags=FLAG_CSUM_XXH3) == 3
    assert r.result() == 3


def test_carried_frame_goes_out_before_the_acks_of_a_receive() -> None:
    # The set's last send ended with a frame half on the wire; its next call is a receive. The tail
    # must precede the first ACK, or the peer would read the ACK as payload.
    a, b = tcp_pairs(1)
    chunk = 16 * MiB
    src = bytes(pattern(2 * chunk, 6))
    with StreamSet([a[0].fileno()]) as x:
        tx = Background(lambda: x.send(src, transfer_id=1, chunk_bytes=chunk, csum_flags=FLAG_CSUM_XXH3,
                                       timeout_s=20))
        time.sleep(0.2)
        b[0].sendall(_core.encode_header(FrameType.DONE, 0, 0, 0, 1, 2 * chunk, 0))
        assert tx.result() == 2 * chunk
        got = bytearray(100)
        rx = Background(lambda: x.recv_into(got, transfer_id=1, length=100, chunk_bytes=4096,
                                            csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        payload = bytes(range(100))
        b[0].sendall(_data_frame(0, 1, 0, payload))
        h = _core.decode_header(_read_exact(b[0], 48), chunk)
        assert (h[1], h[5], h[6]) == (FrameType.DATA, 1, 0)
        assert _read_exact(b[0], chunk) == src[:chunk]
        assert _read_frame(b[0])[1::5] == (FrameType.ACK, 0)
        assert _read_frame(b[0])[1] == FrameType.DONE
        assert rx.result() == 100 and got == payload
    for s in a + b:
        s.close()


def test_sender_drops_late_data_of_an_earlier_receive() -> None:
    a, b = tcp_pairs(1)
    with StreamSet([a[0].fileno()]) as x:
        got = bytearray(100)
        rx = Background(lambda: x.recv_into(got, transfer_id=7, length=100, chunk_bytes=4096,
                                            csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        b[0].sendall(_data_frame(0, 7, 0, bytes(100)))
        assert rx.result() == 100
        assert _read_frame(b[0])[1] == FrameType.ACK and _read_frame(b[0])[1] == FrameType.DONE
        tx = Background(lambda: x.send(b"hello", transfer_id=1, chunk_bytes=4096,
                                       csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        # A late duplicate of receive 7 (with a payload bigger than the read buffer's share), then --
        # once the chunk was really sent, as a real peer would -- the ACK. The duplicate is drained
        # and answered with DONE for 7 again (its sender re-sends only when it lost our first DONE),
        # before or after our DATA.
        b[0].sendall(_data_frame(0, 7, 0, bytes(20000)))
        seen = []
        while not seen or seen[-1][1] != FrameType.DATA:
            seen.append(_read_frame(b[0], max_payload=4096))
        assert [(f[1], f[5]) for f in seen[:-1]] in ([], [(FrameType.DONE, 7)]), seen
        assert _read_exact(b[0], 5) == b"hello"
        if len(seen) == 1:
            assert _read_frame(b[0])[1::4] == (FrameType.DONE, 7)
        b[0].sendall(_core.encode_header(FrameType.ACK, 0, 0, 0, 1, 0, 0))
        assert tx.result() == 5
        assert x.alive() == [True]
    for s in a + b:
        s.close()


def test_sender_leaves_the_peers_next_transfer_in_the_socket() -> None:
    # The peer finishes receiving and at once starts sending towards us on the same stream: its DATA
    # arrives behind its ACK and DONE, possibly in the same read. The sender must stop there and
    # leave header and payload for the receive call that follows.
    a, b = tcp_pairs(1)
    with StreamSet([a[0].fileno()]) as x:
        tx = Background(lambda: x.send(b"ping" * 25, transfer_id=1, chunk_bytes=4096,
                                       csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        _read_frame(b[0], max_payload=4096)
        _read_exact(b[0], 100)
        reply = bytes(pattern(3000, 8))
        b[0].sendall(_core.encode_header(FrameType.ACK, 0, 0, 0, 1, 0, 0) +
                     _core.encode_header(FrameType.DONE, 0, 0, 0, 1, 100, 0) +
                     _data_frame(0, 2, 0, reply))
        assert tx.result() == 100
        got = bytearray(3000)
        assert x.recv_into(got, transfer_id=2, length=3000, chunk_bytes=4096,
                           csum_flags=FLAG_CSUM_XXH3, timeout_s=20) == 3000
        assert got == reply
        assert x.alive() == [True]
    for s in a + b:
        s.close()


def test_sender_rejects_bogus_acks() -> None:
    a, b = tcp_pairs(1)
    with StreamSet([a[0].fileno()]) as tx_set:
        tx = Background(lambda: tx_set.send(bytes(8192), transfer_id=3, chunk_bytes=4096,
                                            csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        b[0].sendall(_core.encode_header(FrameType.ACK, 0, 0, 0, 3, 1 << 30, 0))
        with pytest.raises(ProtocolError) as ei:
            tx.result(timeout=20)
        assert ei.value.code == E_RANGE
    for s in a + b:
        s.close()


def test_sender_finishes_on_done_and_ignores_stale_acks() -> None:
    a, b = tcp_pairs(1)
    with StreamSet([a[0].fileno()]) as tx_set:
        # Late ACK/DONE of an earlier transfer already waiting in the socket.
        b[0].sendall(_core.encode_header(FrameType.DONE, 0, 0, 0, 1, 0, 0) +
                     _core.encode_header(FrameType.ACK, 0, 0, 0, 1, 0, 0))
        tx = Background(lambda: tx_set.send(bytes(8192), transfer_id=2, chunk_bytes=4096,
                                            csum_flags=FLAG_CSUM_XXH3, timeout_s=20))
        f = _read_frame(b[0], max_payload=4096)
        assert (f[1], f[5]) == (FrameType.DATA, 2)
        b[0].sendall(_core.encode_header(FrameType.DONE, 0, 0, 0, 2, 8192, 0))
        assert tx.result(timeout=20) == 8192
    for s in a + b:
        s.close()


# ------------------------------------------------------------------ zero-copy

def test_zerocopy_on_loopback_falls_back(link_factory: Callable[[int], Link]) -> None:
    if not _core.features()["zerocopy"]:
        pytest.skip("kernel refuses SO_ZEROCOPY on TCP sockets")
    link = link_factory(2)
    size = 64 * MiB
    src = pattern(size)
    dst = np.zeros(size, dtype=np.uint8)
    sent, got = transfer(link, src, dst, chunk=MiB, zerocopy=True)
    assert sent == got == size
    assert np.array_equal(src, dst)
    st = link.tx.stats()
    assert st["zc_sends"] > 0
    assert st["zc_fallback"] == 1 or st["zc_copied"] > 0
    assert st["zc_completions"] == st["zc_sends"]  # send() returned only after every completion
    # After the fallback, zero-copy requests are plain sends and still correct.
    dst[:] = 0
    assert transfer(link, src, dst, tid=2, chunk=MiB, zerocopy=True) == (size, size)
    assert np.array_equal(src, dst)


# ------------------------------------------------------------------ large

@pytest.mark.slow
def test_one_gib_wrapped_over_eight_streams(link_factory: Callable[[int], Link]) -> None:
    link = link_factory(8)
    chunk = MiB
    src = pattern(64 * MiB)
    dst = np.zeros(64 * MiB, dtype=np.uint8)
    sent, got = transfer(link, src, dst, chunk=chunk, length=1 << 30, timeout_s=60)
    assert sent == got == 1 << 30
    assert np.array_equal(src, dst)
    assert link.rx.stats()["chunks"] == 1024
