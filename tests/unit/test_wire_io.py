"""read_frame / write_frame over real socket pairs, including hostile byte streams."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dwcp.errors import PeerClosedError, ProtocolError, TransferTimeout, TransportError
from dwcp.wire import frames, io
from dwcp.wire.frames import Flag, FrameType, Header

CTRL = frames.MAX_CONTROL_BYTES


def _header_bytes(**fields: int) -> bytes:
    return frames.encode_header(Header(**fields))


def test_roundtrip_control_and_data_frames() -> None:
    a, b = socket.socketpair()
    with a, b:
        io.write_frame(a, frames.encode_frame(FrameType.ABORT, b"\x01\x02\x00hi"))
        payload = bytes(range(256)) * 64
        io.write_frame(a, frames.encode_frame(FrameType.DATA, payload, flags=Flag.CSUM_XXH3, stream=3,
                                              transfer_id=7, offset=8192))
        io.write_frame(a, frames.encode_frame(FrameType.CLOSE))
        h, p = io.read_frame(b, max_payload=CTRL, deadline=time.monotonic() + 5)
        assert (h.type, p) == (FrameType.ABORT, b"\x01\x02\x00hi")
        h, p = io.read_frame(b, max_payload=1 << 20)
        assert (h.type, h.stream, h.transfer_id, h.offset, p) == (FrameType.DATA, 3, 7, 8192, payload)
        h, p = io.read_frame(b, max_payload=CTRL)
        assert (h.type, p) == (FrameType.CLOSE, b"")


@pytest.mark.parametrize("length", [CTRL + 1, 0xFFFFFFFF])
def test_oversized_length_rejected_before_payload_is_read(length: int) -> None:
    """The sender writes only the header and keeps the connection open: if the reader tried to read
    the payload it would block until the deadline; it must fail at once instead."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_header_bytes(type=FrameType.ABORT, flags=Flag.CSUM_CRC32C, length=length,
                                checksum=1))
        start = time.monotonic()
        with pytest.raises(ProtocolError, match="over the limit") as ei:
            io.read_frame(b, max_payload=CTRL, deadline=time.monotonic() + 10)
        assert time.monotonic() - start < 1.0
        assert ei.value.code == -7


def test_empty_type_with_payload_is_rejected_before_reading() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_header_bytes(type=FrameType.JOINED, flags=Flag.CSUM_CRC32C, length=10, checksum=1))
        with pytest.raises(ProtocolError, match="must be empty"):
            io.read_frame(b, max_payload=CTRL, deadline=time.monotonic() + 10)


def test_control_frame_needs_crc32c_and_no_compression() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frames.encode_frame(FrameType.ABORT, b"x", flags=Flag.CSUM_XXH3))
        with pytest.raises(ProtocolError, match="CRC32C"):
            io.read_frame(b, max_payload=CTRL)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frames.encode_frame(FrameType.ABORT, b"x",
                                      flags=Flag.CSUM_CRC32C | Flag.COMPRESSED))
        with pytest.raises(ProtocolError, match="COMPRESSED"):
            io.read_frame(b, max_payload=CTRL)


def test_payload_checksum_mismatch() -> None:
    a, b = socket.socketpair()
    with a, b:
        frame = bytearray(frames.encode_frame(FrameType.ABORT, b"hello world"))
        frame[-1] ^= 0x40
        a.sendall(frame)
        with pytest.raises(ProtocolError, match="checksum mismatch") as ei:
            io.read_frame(b, max_payload=CTRL)
        assert ei.value.code == -10


def test_empty_frame_with_checksum_is_rejected() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_header_bytes(type=FrameType.CLOSE, flags=Flag.CSUM_CRC32C, checksum=5))
        with pytest.raises(ProtocolError):
            io.read_frame(b, max_payload=CTRL)


def test_corrupt_header_crc() -> None:
    a, b = socket.socketpair()
    with a, b:
        frame = bytearray(frames.encode_frame(FrameType.CLOSE))
        frame[12] = 1   # length 1 without fixing the header CRC
        a.sendall(frame)
        with pytest.raises(ProtocolError, match="header checksum"):
            io.read_frame(b, max_payload=CTRL)


def test_eof_between_frames_mid_header_and_mid_payload() -> None:
    a, b = socket.socketpair()
    a.close()
    with b, pytest.raises(PeerClosedError, match="between frames"):
        io.read_frame(b, max_payload=CTRL)
    a, b = socket.socketpair()
    with b:
        a.sendall(frames.encode_frame(FrameType.CLOSE)[:20])
        a.close()
        with pytest.raises(PeerClosedError, match="20 of 48"):
            io.read_frame(b, max_payload=CTRL)
    a, b = socket.socketpair()
    with b:
        a.sendall(frames.encode_frame(FrameType.ABORT, b"0123456789")[:50])
        a.close()
        with pytest.raises(PeerClosedError, match="2 of 10"):
            io.read_frame(b, max_payload=CTRL)


def test_peer_closed_is_also_connection_reset_error() -> None:
    a, b = socket.socketpair()
    a.close()
    with b, pytest.raises(ConnectionResetError):
        io.read_frame(b, max_payload=CTRL)


def test_deadline_exceeded_and_socket_timeout_restored() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(123.0)
        a.sendall(frames.encode_frame(FrameType.ABORT, b"0123456789")[:52])  # payload stalls
        start = time.monotonic()
        with pytest.raises(TransferTimeout):
            io.read_frame(b, max_payload=CTRL, deadline=time.monotonic() + 0.2)
        assert 0.15 < time.monotonic() - start < 2
        assert b.gettimeout() == 123.0


def test_deadline_already_past() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(TimeoutError):
        io.read_frame(b, max_payload=CTRL, deadline=time.monotonic() - 1)


def test_frame_arriving_in_pieces() -> None:
    a, b = socket.socketpair()
    frame = frames.encode_frame(FrameType.ABORT, bytes(range(200)))

    def dribble() -> None:
        for i in range(0, len(frame), 7):
            a.sendall(frame[i:i + 7])
            time.sleep(0.001)

    with a, b:
        t = threading.Thread(target=dribble)
        t.start()
        h, p = io.read_frame(b, max_payload=CTRL, deadline=time.monotonic() + 5)
        t.join()
        assert p == bytes(range(200))


def test_write_to_closed_peer_is_peer_closed() -> None:
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(PeerClosedError):
        for _ in range(100):   # the first writes may still land in the buffer
            io.write_frame(a, frames.encode_frame(FrameType.ABORT, bytes(60000)))


def test_write_deadline_on_full_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(TransferTimeout):
            for _ in range(10000):
                io.write_frame(a, frames.encode_frame(FrameType.ABORT, bytes(60000)),
                               deadline=time.monotonic() + 0.2)


def test_loopback_tcp() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    with srv:
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        with c, s:
            io.write_frame(c, frames.encode_frame(FrameType.ABORT, b"tcp"))
            assert io.read_frame(s, max_payload=CTRL)[1] == b"tcp"


# ------------------------------------------------------------------------------------------------
# fuzzing: whatever the peer sends, only ProtocolError / PeerClosedError come out


def _read_until_error(data: bytes, max_payload: int) -> list[Header]:
    a, b = socket.socketpair()
    got: list[Header] = []
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)   # then EOF
        while True:
            try:
                h, p = io.read_frame(b, max_payload=max_payload, deadline=time.monotonic() + 5)
            except (ProtocolError, PeerClosedError):
                return got
            assert len(p) == h.length <= max_payload
            got.append(h)


_fuzz = settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)


@_fuzz
@given(st.binary(max_size=4096), st.sampled_from([0, 16, CTRL]))
def test_fuzz_read_frame_arbitrary_bytes(data: bytes, max_payload: int) -> None:
    _read_until_error(data, max_payload)


@st.composite
def _mutated_frames(draw: st.DrawFn) -> bytes:
    """Valid frames, then some bytes changed (with the header CRC recomputed half of the time, so the
    fuzzer reaches the checks after the CRC)."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 4))):
        ftype = draw(st.sampled_from(list(FrameType)))
        payload = b"" if ftype in frames.EMPTY_TYPES else draw(st.binary(max_size=300))
        flags = Flag.CSUM_CRC32C if ftype >= 16 else draw(st.sampled_from(
            [Flag.CSUM_CRC32C, Flag.CSUM_XXH3, Flag(0), Flag.CSUM_XXH3 | Flag.COMPRESSED]))
        frame = bytearray(frames.encode_frame(ftype, payload, flags=flags,
                                              stream=draw(st.integers(0, 0xFFFF))))
        for _ in range(draw(st.integers(0, 3))):
            i = draw(st.integers(0, len(frame) - 1))
            frame[i] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            frame[40:44] = struct.pack("<I", frames.crc32c(bytes(frame[:40])))
        out += frame
    return bytes(out[:draw(st.integers(0, len(out)))]) if draw(st.booleans()) else bytes(out)


@_fuzz
@given(_mutated_frames())
def test_fuzz_read_frame_mutated_frames(data: bytes) -> None:
    _read_until_error(data, CTRL)


def test_only_transport_errors_escape_from_socket_failures() -> None:
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(TransportError):
        io.read_frame(b, max_payload=CTRL)
