"""A session survives losing any of its connections, the control one included, while one is left
(docs/protocol.md "Links"); with none left both sides get a TransportError in bounded time.

Connections are killed the way a broken path or a destroyed socket kills them: shutdown() of the socket
under the running engine (the peer sees FIN, this side's engine sees EOF), from another thread, in the
middle of a transfer. tests/kernel/test_soak.py does the same with `ss -K` (RST) and killed peers.
Joins carry generous bounds that catch a hang; they never assert how fast anything was.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
import pytest

from dwcp import PeerClosedError, SessionClosedError, TransportError
from tests.conftest import run_in_thread


def pattern(n: int, seed: int = 7) -> bytearray:
    words = (n + 7) // 8
    a = np.arange(words, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    return bytearray(a.tobytes()[:n])


def _size(backend: str) -> int:
    return 192 << 20 if backend == "c" else 48 << 20


def _start(pair: Any, data: bytearray, *, server_sends: bool = False) -> tuple[Any, Any, Any, Any, bytearray]:
    """Start a transfer of data (client → server, or the other way) and return once some of it moved."""
    out = bytearray(len(data))
    sender, receiver = (pair.server, pair.client) if server_sends else (pair.client, pair.server)
    r, rbox = run_in_thread(receiver.recv_into, out)
    s, sbox = run_in_thread(sender.send, data)
    deadline = time.monotonic() + 30
    while receiver.live_stats().get("bytes_payload", 0) < len(data) // 10:
        assert time.monotonic() < deadline, "the transfer made no progress"
        assert s.is_alive(), sbox
        time.sleep(0.001)
    return s, sbox, r, rbox, out


def _finish(s: Any, sbox: dict[str, Any], r: Any, rbox: dict[str, Any]) -> None:
    s.join(120)
    r.join(120)
    assert not s.is_alive() and not r.is_alive(), "a side hung"


def _kill(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


@pytest.mark.parametrize("side", ["client", "server"])
def test_control_connection_killed_mid_transfer_completes(session_pair: Any, backend: str, side: str) -> None:
    pair = session_pair(streams=4, backend=backend, chunk_bytes=256 << 10, timeout_s=20)
    data = pattern(_size(backend))
    s, sbox, r, rbox, out = _start(pair, data)
    _kill(getattr(pair, side).control_socket())
    _finish(s, sbox, r, rbox)
    assert "error" not in sbox and "error" not in rbox, (sbox, rbox)
    assert out == data
    # The session goes on without its control connection: announcements travel on the data streams.
    small = pattern(3 << 20, seed=3)
    s2, box2 = run_in_thread(pair.client.send, small)
    assert pair.server.recv() == small
    s2.join(30)
    assert box2.get("result") == len(small)
    back = pattern(1 << 20, seed=4)
    s3, box3 = run_in_thread(pair.server.send, back)
    assert pair.client.recv() == back
    s3.join(30)
    # Both engines have read the closed control connection by now (waiting for a transfer reads every
    # link), and no data stream was lost with it.
    for sess in (pair.client, pair.server):
        st = sess.stats()
        assert not st["control_alive"] and st["streams_alive"] == 4, st


@pytest.mark.parametrize("survivor", ["control", "stream"])
def test_every_connection_but_one_killed_mid_transfer_completes(session_pair: Any, backend: str,
                                                                 survivor: str) -> None:
    """Leave one connection: a data stream, or only the control connection, which then carries the
    data (the sender uses it for chunks once no data stream is left)."""
    pair = session_pair(streams=4, backend=backend, chunk_bytes=256 << 10, timeout_s=20)
    data = pattern(_size(backend))
    s, sbox, r, rbox, out = _start(pair, data, server_sends=True)
    socks = pair.client.data_sockets()
    victims = socks if survivor == "control" else [pair.client.control_socket(), *socks[:-1]]
    for sock in victims:
        _kill(sock)
    _finish(s, sbox, r, rbox)
    assert "error" not in sbox and "error" not in rbox, (sbox, rbox)
    assert out == data
    st = pair.client.stats()
    assert st["control_alive"] == (survivor == "control")
    assert st["streams_alive"] == (0 if survivor == "control" else 1)
    again = pattern(2 << 20, seed=5)
    t, box = run_in_thread(pair.server.recv)
    assert pair.client.send(again) == len(again)
    t.join(30)
    assert box.get("result") == again


def test_every_connection_killed_gives_transport_errors_in_bounded_time(session_pair: Any,
                                                                        backend: str) -> None:
    pair = session_pair(streams=4, backend=backend, chunk_bytes=256 << 10, timeout_s=20)
    data = pattern(_size(backend))
    s, sbox, r, rbox, _ = _start(pair, data)
    t0 = time.monotonic()
    for sock in [pair.client.control_socket(), *pair.client.data_sockets()]:
        _kill(sock)
    _finish(s, sbox, r, rbox)
    assert isinstance(sbox.get("error"), TransportError), sbox
    assert isinstance(rbox.get("error"), TransportError), rbox
    # EOF on every link is news at once, not after timeout_s (a bound that catches a hang only).
    assert time.monotonic() - t0 < 15
    with pytest.raises(SessionClosedError):
        pair.client.send(b"x")


def test_waiting_receiver_learns_that_every_connection_died(session_pair: Any, backend: str) -> None:
    """recv() waiting for the next transfer (no timeout) returns PeerClosedError when the last link
    goes, instead of waiting forever."""
    pair = session_pair(streams=2, backend=backend)
    t, box = run_in_thread(pair.server.recv)
    time.sleep(0.1)
    for sock in [pair.client.control_socket(), *pair.client.data_sockets()]:
        _kill(sock)
    t.join(30)
    assert not t.is_alive(), "recv() kept waiting with no connection left"
    assert isinstance(box.get("error"), PeerClosedError), box


def test_peer_abort_reason_reaches_the_sender_when_its_control_connection_is_gone(
        session_pair: Any, backend: str) -> None:
    """The receiver refuses a transfer (over its max_recv_bytes): the ABORT with the reason reaches the
    sender on a data stream, the control connection having been lost before."""
    from dwcp import ProtocolError, TransferAborted
    pair = session_pair(streams=2, backend=backend, listen_kw={"max_recv_bytes": 1 << 20})
    _kill(pair.server.control_socket())
    r, rbox = run_in_thread(pair.server.recv)
    s, sbox = run_in_thread(pair.client.send, bytes(8 << 20))
    r.join(60)
    s.join(60)
    assert isinstance(rbox.get("error"), ProtocolError), rbox
    err = sbox.get("error")
    assert isinstance(err, TransferAborted), sbox
    assert "max_recv_bytes" in str(err)
