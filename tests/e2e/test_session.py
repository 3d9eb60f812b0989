"""Sessions end to end over real loopback TCP: the public API as users call it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dwcp
from dwcp import (AuthError, BufferTooSmall, ConfigError, PeerClosedError, SessionClosedError,
                  TransferTimeout, TransportError)
from tests.conftest import TEST_KEY, run_in_thread

CHUNK = 64 << 10
PEER = str(Path(__file__).with_name("peer.py"))


def pattern(n: int, seed: int = 1) -> bytearray:
    """n bytes whose every 8-byte word differs, so a chunk written at the wrong offset shows."""
    words = (n + 7) // 8
    a = np.arange(words, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    return bytearray(a.tobytes()[:n])


def transfer(pair: Any, data: Any, *, into: Any = None) -> Any:
    t, box = run_in_thread(pair.server.recv if into is None else pair.server.recv_into,
                           *(() if into is None else (into,)))
    sent = pair.client.send(data)
    t.join(60)
    assert not t.is_alive(), "receiver hung"
    if "error" in box:
        raise box["error"]
    assert sent == len(memoryview(data).cast("B"))
    return box["result"]


@pytest.mark.parametrize("size", [0, 1, 4097, 3 * CHUNK + 17, 5 << 20])
def test_roundtrip_sizes(session_pair: Any, backend: str, size: int) -> None:
    pair = session_pair(streams=4, backend=backend, chunk_bytes=CHUNK)
    data = pattern(size)
    got = transfer(pair, data)
    assert got == data
    s = pair.client.stats()
    assert s["backend"] == backend and s["bytes_sent"] == size and s["streams_alive"] == 4


@pytest.mark.parametrize("encrypt", [True, False])
def test_close_right_after_an_empty_transfer_loses_nothing(session_pair: Any, backend: str,
                                                          encrypt: bool) -> None:
    """The sender returns once one link carried DONE and may close at once, while the receiver still
    has DONE queued on its other links: its receive of that transfer must still complete (the CLOSE
    waits for the next call). The Python engine used to fail it with PeerClosedError."""
    pair = session_pair(streams=3, backend=backend, chunk_bytes=CHUNK, encrypt=encrypt,
                        listen_kw={"encrypt": encrypt})
    assert pair.client.stats()["cipher"] == ("aes-128-gcm" if encrypt else "none")
    assert transfer(pair, pattern(3 * CHUNK)) == pattern(3 * CHUNK)
    r, rbox = run_in_thread(pair.client.recv)
    pair.server.send(b"back")
    r.join(30)
    assert bytes(rbox["result"]) == b"back"
    got, gbox = run_in_thread(pair.server.recv)
    pair.client.send(b"")
    pair.client.close()
    got.join(30)
    assert "error" not in gbox, gbox.get("error")
    assert bytes(gbox["result"]) == b""


@pytest.mark.parametrize("streams", [1, 4, 16, 256])
def test_stream_counts(session_pair: Any, streams: int) -> None:
    pair = session_pair(streams=streams, chunk_bytes=CHUNK)
    data = pattern(streams * CHUNK * 3 + 123)
    assert transfer(pair, data) == data
    assert pair.server.stats()["streams"] == streams


def test_python_engine_many_streams(session_pair: Any) -> None:
    pair = session_pair(streams=32, backend="python", chunk_bytes=CHUNK)
    data = pattern(32 * CHUNK * 2 + 5)
    assert transfer(pair, data) == data


def test_joined_is_written_before_the_server_engine_takes_the_stream(
        session_pair: Any, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the server's last data stream to join creates the Session (the Python engine then
    makes every socket non-blocking) while another stream's handler thread may still be inside
    write_frame(JOINED), whose deadline handling ends by restoring the socket's earlier (blocking)
    mode. The engine's next recv on that socket then blocked its loop: the receiver held the ACK of
    the first chunk and both sides failed with "no byte moved" (about 1 session in 200). Here the
    first JOINED's restore is held back until the other streams have joined, so that interleaving
    happens every time if JOINED can still be in flight when the Session is built."""
    import threading

    from dwcp.transport import listener as listener_mod
    from dwcp.wire import io as wire_io

    real_send_joined = listener_mod.send_joined
    real_restore = wire_io._Deadline.restore
    tls = threading.local()
    first = threading.Lock()
    restored = threading.Event()

    def send_joined(sock: socket.socket, stream_index: int, **kw: Any) -> None:
        tls.hold = first.acquire(blocking=False)  # only the first JOINED of the session
        try:
            real_send_joined(sock, stream_index, **kw)
        finally:
            if tls.hold:
                restored.set()
            tls.hold = False

    def restore(self: Any) -> None:
        if getattr(tls, "hold", False):
            time.sleep(0.5)  # the other streams join meanwhile (milliseconds on loopback)
        real_restore(self)

    monkeypatch.setattr(listener_mod, "send_joined", send_joined)
    monkeypatch.setattr(wire_io._Deadline, "restore", restore)
    pair = session_pair(streams=4, backend=backend, chunk_bytes=CHUNK, timeout_s=5)
    assert restored.wait(10)
    if backend == "python":
        assert [s.gettimeout() for s in pair.server._data] == [0.0] * 4
    data = pattern(8 * CHUNK + 3)
    assert transfer(pair, data) == data
    t, box = run_in_thread(pair.client.recv)
    pair.server.send(data)
    t.join(30)
    assert box.get("result") == data, box


def test_session_is_registered_before_welcome(session_pair: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the listener registered a new session only after server_handshake() returned,
    i.e. after WELCOME had gone out; the client joins its streams as soon as WELCOME arrives, so a
    JOIN handled in between was refused as "unknown or expired session" (about 1 connect in 1000).
    Here the control connection's handler is held back after the handshake, so such JOINs come first
    every time."""
    from dwcp.transport import listener as listener_mod

    real = listener_mod.server_handshake

    def slow_server_handshake(*args: Any, **kw: Any) -> Any:
        params = real(*args, **kw)
        time.sleep(0.3)
        return params

    monkeypatch.setattr(listener_mod, "server_handshake", slow_server_handshake)
    pair = session_pair(streams=4, backend="python", chunk_bytes=CHUNK, timeout_s=5)
    assert pair.listener.failed_handshakes == 0
    assert transfer(pair, b"x") == b"x"


def test_numpy_and_memoryview_buffers(session_pair: Any, backend: str) -> None:
    pair = session_pair(streams=4, backend=backend, chunk_bytes=CHUNK)
    arr = np.arange(300_001, dtype=np.float64)
    out = np.zeros_like(arr)
    n = transfer(pair, arr, into=out)
    assert n == arr.nbytes and np.array_equal(arr, out)
    data = pattern(CHUNK * 5 + 3)
    dest = bytearray(len(data) + 100)
    n = transfer(pair, memoryview(data)[: len(data)], into=memoryview(dest))
    assert n == len(data) and dest[:n] == data and dest[n:] == bytes(100)


def test_non_contiguous_buffer_is_a_clear_error(session_pair: Any) -> None:
    pair = session_pair(streams=1)
    with pytest.raises(ConfigError, match="contiguous"):
        pair.client.send(np.arange(100)[::2])
    with pytest.raises(ConfigError, match="buffer-protocol"):
        pair.client.send("text is not bytes")  # type: ignore[arg-type]


def test_recv_into_too_small_loses_nothing(session_pair: Any) -> None:
    pair = session_pair(streams=2, chunk_bytes=CHUNK)
    data = pattern(CHUNK * 3)
    t, box = run_in_thread(pair.client.send, data)
    with pytest.raises(BufferTooSmall) as ei:
        pair.server.recv_into(bytearray(100), timeout_s=10)
    assert ei.value.needed_bytes == len(data)
    assert pair.server.peek().length == len(data)
    assert pair.server.recv() == data
    t.join(10)
    assert box.get("result") == len(data)


def test_send_file_recv_file(session_pair: Any, backend: str, tmp_path: Path) -> None:
    pair = session_pair(streams=3, backend=backend, chunk_bytes=CHUNK)
    src = tmp_path / "src.bin"
    src.write_bytes(pattern(CHUNK * 7 + 999))
    src.chmod(0o640)
    dst = tmp_path / "out" / "dst.bin"
    dst.parent.mkdir()
    t, box = run_in_thread(pair.server.recv_file, dst)
    assert pair.client.send_file(src) == src.stat().st_size
    t.join(30)
    assert box.get("result") == src.stat().st_size, box
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in dst.parent.iterdir()] == ["dst.bin"]  # no temp file left
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    t, box = run_in_thread(pair.server.recv_file, tmp_path / "empty.out")
    assert pair.client.send_file(empty) == 0
    t.join(10)
    assert (tmp_path / "empty.out").read_bytes() == b""


def test_stream_killed_mid_transfer_completes(session_pair: Any, backend: str) -> None:
    pair = session_pair(streams=4, backend=backend, chunk_bytes=256 << 10)
    data = pattern(256 << 20 if backend == "c" else 64 << 20)
    out = bytearray(len(data))
    t, box = run_in_thread(pair.server.recv_into, out)
    s, sbox = run_in_thread(pair.client.send, data)
    deadline = time.monotonic() + 20
    while pair.server.live_stats().get("bytes_payload", 0) < len(data) // 8:
        assert time.monotonic() < deadline, "transfer made no progress"
        time.sleep(0.001)
    pair.server._data[1].shutdown(socket.SHUT_RDWR)  # the peer's end of stream 1 dies
    s.join(60)
    t.join(60)
    assert "error" not in sbox and "error" not in box, (sbox, box)
    assert out == data
    st = pair.client.stats()
    assert st["streams_alive"] == 3
    assert st["engine"]["streams_failed"] >= 1
    # A second transfer still works on the surviving streams.
    assert transfer(pair, data[: 1 << 20]) == data[: 1 << 20]


def test_every_connection_dead_is_a_transport_error(session_pair: Any, backend: str) -> None:
    """With the data streams *and* the control connection gone there is nothing left to carry the
    transfer: both sides get a TransportError and the session is closed. (Data streams alone are not
    enough to stop it: tests/e2e/test_session_survival.py.)"""
    pair = session_pair(streams=3, backend=backend, chunk_bytes=CHUNK, timeout_s=20)
    data = pattern(512 << 20 if backend == "c" else 128 << 20)
    out = bytearray(len(data))
    t, box = run_in_thread(pair.server.recv_into, out)
    s, sbox = run_in_thread(pair.client.send, data)
    time.sleep(0.05)
    for sock in [*pair.server.data_sockets(), pair.server.control_socket()]:
        sock.shutdown(socket.SHUT_RDWR)
    s.join(30)
    t.join(30)
    assert not s.is_alive() and not t.is_alive(), "a side hung after its connections died"
    assert isinstance(sbox.get("error"), TransportError), sbox
    assert isinstance(box.get("error"), TransportError), box
    with pytest.raises(SessionClosedError):
        pair.client.send(b"x")


def _peer(args: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, DWCP_KEY=TEST_KEY.decode(), PYTHONPATH=os.getcwd())
    return subprocess.Popen([sys.executable, PEER, *args], stdout=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_peer_death_or_hang_gives_transport_error_in_bounded_time(how: str) -> None:
    proc = _peer(["receive"])
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with dwcp.connect(("127.0.0.1", port), key=TEST_KEY, streams=4, timeout_s=3.0) as s:
            t, box = run_in_thread(s.send_for, bytearray(16 << 20), 60.0)
            deadline = time.monotonic() + 20
            while s.live_stats().get("bytes_payload", 0) == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            t0 = time.monotonic()
            t.join(30)  # a hang-catching bound, not a speed assertion
            assert not t.is_alive(), "send() hung after the peer died"
            err = box.get("error")
            assert isinstance(err, TransportError), box
            if how == "freeze":
                assert isinstance(err, TransferTimeout), repr(err)
            assert time.monotonic() - t0 < 30
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_wrong_key_missing_key_and_insecure() -> None:
    with dwcp.listen(("127.0.0.1", 0), key=TEST_KEY) as lis:
        with pytest.raises(AuthError):
            dwcp.connect(lis.address, key=b"another-key-that-is-long-enough", streams=2)
        with pytest.raises(ConfigError, match="pre-shared key"):
            dwcp.connect(lis.address, streams=2)
        with pytest.raises(AuthError):
            dwcp.connect(lis.address, insecure=True, streams=2)
    with pytest.raises(ConfigError, match="pre-shared key"):
        dwcp.listen(("127.0.0.1", 0))
    with dwcp.listen(("127.0.0.1", 0), insecure=True) as lis:
        t, box = run_in_thread(lis.accept, 10)
        with dwcp.connect(lis.address, insecure=True, streams=2) as c:
            t.join(10)
            with box["result"] as srv:
                r, rbox = run_in_thread(srv.recv)
                c.send(b"hello")
                r.join(10)
                assert rbox["result"] == b"hello"
                assert srv.stats()["insecure"]


def test_one_transfer_at_a_time_and_closed_session(session_pair: Any) -> None:
    pair = session_pair(streams=2, chunk_bytes=CHUNK)
    t, box = run_in_thread(pair.client.send, pattern(64 << 20))
    time.sleep(0.05)
    if t.is_alive():
        with pytest.raises(TransportError, match="one transfer at a time"):
            pair.client.send(b"x")
    pair.server.recv()
    t.join(10)
    pair.client.close()
    with pytest.raises(SessionClosedError):
        pair.client.send(b"x")
    with pytest.raises(PeerClosedError):
        pair.server.recv(timeout_s=10)


def test_recv_wait_timeout_keeps_session(session_pair: Any) -> None:
    pair = session_pair(streams=2)
    with pytest.raises(TransferTimeout):
        pair.server.recv(timeout_s=0.2)
    assert transfer(pair, b"still works") == b"still works"


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    import ssl
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(d / "cert.pem", d / "key.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_verify_locations(d / "cert.pem")
    return client, server


def test_tls_session(session_pair: Any, tls_contexts: tuple[Any, Any]) -> None:
    client_ctx, server_ctx = tls_contexts
    pair = session_pair(streams=4, chunk_bytes=CHUNK, tls=client_ctx, listen_kw={"tls": server_ctx})
    data = pattern(CHUNK * 9 + 1)
    assert transfer(pair, data) == data
    st = pair.client.stats()
    assert st["tls"] and st["backend"] == "python"


@pytest.mark.slow
def test_one_gibibyte(session_pair: Any) -> None:
    pair = session_pair(streams=16, chunk_bytes=1 << 20, timeout_s=60)
    data = pattern(1 << 30, seed=7)
    out = bytearray(len(data) + 1)
    n = transfer(pair, data, into=out)
    assert n == len(data)
    assert memoryview(out)[:n] == memoryview(data)
    del data, out


def test_backend_features_reported() -> None:
    feats = dwcp.backend_features
    assert {"cext", "xxh3", "tls"} <= feats
    assert "rdma" not in feats  # no RDMA device can exist here (MACHINE.md)
    assert dwcp.backend in ("cext", "python")
    report = dwcp.feature_report()
    assert all(isinstance(v["reason"], str) and v["reason"] for v in report.values())


@pytest.mark.parametrize("sndbuf", [0, -1, 300_000])
def test_send_buffers_follow_the_path(session_pair: Any, backend: str, sndbuf: int) -> None:
    """Auto mode caps the send buffers of a short path (loopback here) at 1 MiB instead of the kernel's
    autotuning, which grows them to several MiB and pushes queued data out of the caches; -1 leaves
    the kernel's sizing; a size sets it (the kernel doubles what it is given)."""
    pair = session_pair(streams=2, backend=backend, sndbuf_bytes=sndbuf, listen_kw={"sndbuf_bytes": sndbuf})
    fresh = socket.socket()
    kernel_default = fresh.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    fresh.close()
    for sess in (pair.client, pair.server):
        st = sess.stats()
        if sndbuf == 0:
            # Auto: the cap wherever the links' round trips were short when measured (loopback,
            # unless the machine was too busy to answer within 200 us).
            assert st["sndbuf_bytes"] == (512 << 10 if 0 < st["path_rtt_us"] < 200 else 0), st
        else:
            assert st["sndbuf_bytes"] == max(sndbuf, 0), st
    auto_capped = pair.client.stats()["sndbuf_bytes"] > 0
    for s in [*pair.client.data_sockets(), pair.client.control_socket()]:
        got = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        if sndbuf == 0 and auto_capped:
            assert got == 2 * (512 << 10)
        elif sndbuf > 0:
            assert got == 2 * sndbuf
        else:
            assert got != 2 * (512 << 10) and got >= kernel_default
    data = pattern(3 << 20)
    assert transfer(pair, data) == data
