"""Manager.open_channel: DWCP when enabled and spoken, plain TCP otherwise, one send/recv API; the
channel listener serves both kinds on one port; a wrong key never falls back; the kill switch turns new
channels plain while running ones finish."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from dwcp.control.channel import DwcpChannel, PlainChannel
from dwcp.control.config import load_config
from dwcp.control.manager import Manager
from dwcp.control.metrics import MetricsRegistry
from dwcp.errors import AuthError, ProtocolError, TransportError
from tests.conftest import TEST_KEY

HDR = struct.Struct(">Q")


def manager(enabled: bool) -> Manager:
    cfg = load_config(env={}, runtime={"enabled": enabled}, use_system_file=False)
    return Manager(cfg, metrics=MetricsRegistry(), features=frozenset({"cext"}), rdma_reason="no device")


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


class PlainServer:
    """An application's own server without DWCP: length-prefixed messages, echoed back reversed.
    behaviour: "echo" (serves its framing), "close" (hangs up on a message it cannot take), "wait"
    (keeps reading what it believes is a huge message)."""

    def __init__(self, behaviour: str = "echo") -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.behaviour = behaviour
        self.connections = 0
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                (n,) = HDR.unpack(recv_exactly(conn, 8))
                if n > 1 << 30:
                    if self.behaviour == "close":
                        conn.close()
                        return
                    while conn.recv(65536):  # "wait": the rest of a message that never ends
                        pass
                    return
                body = recv_exactly(conn, n)
                conn.sendall(HDR.pack(n) + body[::-1])
        except (EOFError, OSError):
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self._conns:
            c.close()


@pytest.fixture
def plain_server(request: Any) -> Iterator[PlainServer]:
    srv = PlainServer(getattr(request, "param", "echo"))
    yield srv
    srv.close()


def addr(a: tuple[str, int]) -> str:
    return f"{a[0]}:{a[1]}"


def test_disabled_gives_a_plain_channel_that_talks_to_a_plain_server(plain_server: PlainServer) -> None:
    mgr = manager(enabled=False)
    with mgr.open_channel(addr(plain_server.address)) as ch:
        assert isinstance(ch, PlainChannel) and ch.kind == "plain"
        assert "disabled" in ch.decision.reason
        data = os.urandom(1 << 20)
        assert ch.send(data) == len(data)
        assert ch.recv() == data[::-1]
        buf = bytearray(2 << 20)
        ch.send(b"abc")
        assert ch.recv_into(buf) == 3 and buf[:3] == b"cba"
    assert [d.value for d in mgr.decisions() if d.what == "channel"] == ["plain"]


@pytest.mark.parametrize("plain_server", ["echo", "close"], indirect=True)
def test_enabled_falls_back_to_plain_against_a_server_without_dwcp(plain_server: PlainServer) -> None:
    mgr = manager(enabled=True)
    with mgr.open_channel(addr(plain_server.address), key=TEST_KEY, probe_timeout_s=2.0) as ch:
        assert isinstance(ch, PlainChannel)
        assert "does not speak DWCP" in ch.decision.reason
        if plain_server.behaviour == "echo":
            ch.send(b"hello")
            assert ch.recv() == b"olleh"
    # remembered: the next channel does not probe again (no handshake bytes reach the server)
    with mgr.open_channel(addr(plain_server.address), key=TEST_KEY) as ch2:
        assert isinstance(ch2, PlainChannel) and ch2.decision.inputs.get("cached")
        if plain_server.behaviour == "echo":
            ch2.send(b"again")
            assert ch2.recv() == b"niaga"


@pytest.mark.parametrize("plain_server", ["wait"], indirect=True)
def test_a_silent_server_is_told_apart_by_the_probe_timeout(plain_server: PlainServer) -> None:
    mgr = manager(enabled=True)
    with mgr.open_channel(addr(plain_server.address), key=TEST_KEY, probe_timeout_s=0.5) as ch:
        assert isinstance(ch, PlainChannel) and "no DWCP answer within 0.5 s" in ch.decision.reason


def test_allow_plain_false_refuses_the_fallback(plain_server: PlainServer) -> None:
    mgr = manager(enabled=True)
    with pytest.raises(TransportError, match="allow_plain=False"):
        mgr.open_channel(addr(plain_server.address), key=TEST_KEY, allow_plain=False, probe_timeout_s=2.0)


def serve_one(lis: Any, box: dict[str, Any], echo: int = 1) -> threading.Thread:
    def run() -> None:
        ch = lis.accept(timeout_s=10)
        box["channel"] = ch
        for _ in range(echo):
            data = ch.recv()
            ch.send(bytes(data[::-1]))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_dwcp_channel_end_to_end_through_the_channel_listener() -> None:
    server, client = manager(enabled=True), manager(enabled=True)
    with server.listen_channels(("127.0.0.1", 0), key=TEST_KEY) as lis:
        box: dict[str, Any] = {}
        t = serve_one(lis, box)
        with client.open_channel(addr(lis.address), key=TEST_KEY) as ch:
            assert isinstance(ch, DwcpChannel) and ch.kind == "dwcp"
            assert ch.session.params.streams == client.plan("127.0.0.1").streams
            data = os.urandom(3 << 20)
            ch.send(data)
            assert ch.recv(timeout_s=10) == data[::-1]
            assert ch.stats()["decision"]["value"] == "dwcp"
        t.join(10)
        assert isinstance(box["channel"], DwcpChannel)
        box["channel"].close()


def test_a_plain_client_is_served_by_the_channel_listener_too() -> None:
    server, client = manager(enabled=True), manager(enabled=False)
    with server.listen_channels(("127.0.0.1", 0), key=TEST_KEY) as lis:
        box: dict[str, Any] = {}
        t = serve_one(lis, box, echo=2)
        with client.open_channel(addr(lis.address)) as ch:
            assert isinstance(ch, PlainChannel)
            for size in (0, 1 << 20):
                data = os.urandom(size)
                ch.send(data)
                assert ch.recv(timeout_s=10) == data[::-1]
        t.join(10)
        assert isinstance(box["channel"], PlainChannel)
        assert "not a DWCP frame" in box["channel"].decision.reason
        box["channel"].close()


def test_a_wrong_key_is_an_error_never_a_plain_fallback() -> None:
    server, client = manager(enabled=True), manager(enabled=True)
    with server.listen_channels(("127.0.0.1", 0), key=TEST_KEY) as lis:
        with pytest.raises(AuthError):
            client.open_channel(addr(lis.address), key=b"another key of thirty bytes!!!")
        assert not [d for d in client.decisions() if d.what == "channel"]


def test_kill_switch_new_channels_plain_running_ones_finish() -> None:
    server, client = manager(enabled=True), manager(enabled=True)
    with server.listen_channels(("127.0.0.1", 0), key=TEST_KEY) as lis:
        box: dict[str, Any] = {}
        t = serve_one(lis, box, echo=1)
        with client.open_channel(addr(lis.address), key=TEST_KEY) as ch:
            assert isinstance(ch, DwcpChannel)
            client.kill_switch("incident 9")
            data = os.urandom(1 << 20)
            ch.send(data)                   # the running DWCP channel keeps working
            assert ch.recv(timeout_s=10) == data[::-1]
            t.join(10)
            t2 = serve_one(lis, box, echo=1)
            with client.open_channel(addr(lis.address), key=TEST_KEY) as ch2:
                assert isinstance(ch2, PlainChannel) and "incident 9" in ch2.decision.reason
                ch2.send(b"xy")
                assert ch2.recv(timeout_s=10) == b"yx"
            t2.join(10)


def test_plain_channel_refuses_an_absurd_length() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    b = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    srv.close()
    from dwcp.control.decision import Decision
    ch = PlainChannel(a, Decision("channel", "plain", "test"), max_message_bytes=1024)
    b.sendall(HDR.pack(1 << 40))
    with pytest.raises(ProtocolError, match="over the 1024-byte limit"):
        ch.recv()
    b.close()
