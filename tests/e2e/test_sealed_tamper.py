"""Sealed frames against an on-path attacker (docs/protocol.md "Sealed frames").

A real TCP proxy sits between a client and a server (both real sessions on the C engine) and parses
every frame it forwards. After the handshake it flips bits, replays, reorders, splices frames between
the streams of one session and injects frames recorded from another session. Whatever it does, the
receiver either gets exactly the bytes that were sent or a DWCPError; it never returns data the sender
did not send. Counters and nonces seen on the wire are checked for uniqueness across streams,
transfers and rekeys.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest

import dwcp
from dwcp import DWCPError
from dwcp._core import crc32c
from tests.conftest import TEST_KEY

HDR = 48
TAG = 16
SEALED = 1 << 3
DATA = 1
STREAM_CONTROL = 0xFFFF


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            got = sock.recv(n - len(buf))
        except OSError:
            return None
        if not got:
            return None
        buf += got
    return bytes(buf)


def frame_len(hdr: bytes) -> int:
    flags, = struct.unpack_from("<H", hdr, 6)
    length, = struct.unpack_from("<I", hdr, 12)
    return length + (TAG if flags & SEALED else 0)


def recrc(hdr: bytearray) -> bytes:
    hdr[40:44] = struct.pack("<I", crc32c(bytes(hdr[:40])))
    return bytes(hdr)


class Proxy:
    """Forwards client<->server connections frame by frame. ``attack(conn, direction, frame)`` returns
    the byte strings to forward instead of ``frame`` (conn: the link's stream index as its first frame
    names it, STREAM_CONTROL for the control connection). Records every sealed header it forwards."""

    def __init__(self, upstream: tuple[str, int],
                 attack: Callable[[Proxy, int, str, bytes], list[bytes]] | None = None) -> None:
        self.upstream = upstream
        self.attack = attack
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.address = self.lsock.getsockname()
        self.lock = threading.Lock()
        self.seen: list[tuple[str, int, int, int, int]] = []  # direction, wire stream, type, tid, ctr
        self.recorded: dict[int, list[bytes]] = {}
        self.out: dict[tuple[int, str], socket.socket] = {}
        self.socks: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(self.upstream)
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.socks += [c, u]
            state: dict[str, Any] = {"conn": None}
            threading.Thread(target=self._pump, args=(c, u, "c2s", state), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, "s2c", state), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, state: dict[str, Any]) -> None:
        while True:
            hdr = _read_exact(src, HDR)
            if hdr is None:
                break
            body = _read_exact(src, frame_len(hdr)) if frame_len(hdr) else b""
            if body is None:
                break
            ftype = hdr[5]
            flags, stream = struct.unpack_from("<HH", hdr, 6)
            if state["conn"] is None and direction == "c2s":
                # JOIN names the joining stream; the control connection starts with HELLO.
                state["conn"] = stream if ftype == 20 else STREAM_CONTROL
            frame = hdr + body
            out = [frame]
            if flags & SEALED:
                tid, = struct.unpack_from("<Q", hdr, 16)
                ctr, = struct.unpack_from("<Q", hdr, 32)
                with self.lock:
                    self.seen.append((direction, stream, ftype, tid, ctr))
                    self.out[(stream, direction)] = dst
                if self.attack is not None:
                    out = self.attack(self, stream, direction, frame)
            try:
                for piece in out:
                    dst.sendall(piece)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.lsock.close()
        with self.lock:
            for s in self.socks:
                try:
                    s.close()
                except OSError:
                    pass


def _session_through(proxy_attack: Callable[..., list[bytes]] | None, *, streams: int = 4, timeout_s: float = 5,
                     **kw: Any) -> tuple[Any, Any, Proxy, Any]:
    lst = dwcp.listen(("127.0.0.1", 0), key=TEST_KEY, timeout_s=timeout_s, **kw)
    proxy = Proxy(lst.address, proxy_attack)
    box: dict[str, Any] = {}

    def accept() -> None:
        box["server"] = lst.accept(timeout_s=10)

    th = threading.Thread(target=accept)
    th.start()
    client = dwcp.connect(proxy.address, key=TEST_KEY, streams=streams, timeout_s=timeout_s, **kw)
    th.join(10)
    return client, box["server"], proxy, lst


def _transfer(client: Any, server: Any, data: bytes) -> tuple[bytes | None, BaseException | None,
                                                               BaseException | None]:
    """Send data client -> server. Returns (what the server got or None, server error, client error)."""
    box: dict[str, Any] = {}

    def recv() -> None:
        try:
            box["got"] = bytes(server.recv())
        except DWCPError as e:
            box["rerr"] = e

    th = threading.Thread(target=recv)
    th.start()
    serr = None
    try:
        client.send(data)
    except DWCPError as e:
        serr = e
    th.join(60)
    assert not th.is_alive(), "the receiver hung"
    return box.get("got"), box.get("rerr"), serr


def _close(*things: Any) -> None:
    for t in things:
        try:
            t.close()
        except Exception:
            pass


def _flip_data(nth: int, *, streams: set[int] | None = None, where: str = "payload") -> Callable[..., list[bytes]]:
    count = {"n": 0}

    def attack(proxy: Proxy, stream: int, direction: str, frame: bytes) -> list[bytes]:
        if direction != "c2s" or frame[5] != DATA or (streams is not None and stream not in streams):
            return [frame]
        count["n"] += 1
        if count["n"] % nth:
            return [frame]
        f = bytearray(frame)
        if where == "payload":
            f[HDR + 100] ^= 0x01
        elif where == "tag":
            f[-1] ^= 0x80
        elif where == "offset":  # header field, CRC recomputed so only the AEAD can catch it
            off, = struct.unpack_from("<Q", f, 24)
            struct.pack_into("<Q", f, 24, off ^ (1 << 20))
            recrc(f)
        return [bytes(f)]
    return attack


@pytest.mark.parametrize("backend", ["c", "python"])
@pytest.mark.parametrize("where", ["payload", "tag", "offset"])
def test_a_tampered_chunk_is_never_written_and_is_sent_again(where: str, backend: str) -> None:
    data = os.urandom(24 << 20 if backend == "c" else 6 << 20)
    client, server, proxy, lst = _session_through(_flip_data(3, streams={0, 1}, where=where), backend=backend)
    try:
        got, rerr, serr = _transfer(client, server, data)
        assert got == data and rerr is None and serr is None
        assert server.stats()["cipher"] == "aes-128-gcm"
        assert server.stats()["engine"]["auth_failures"] >= 1
        assert server.stats()["engine"]["streams_failed"] >= 1
    finally:
        _close(client, server, proxy, lst)


def test_tampering_on_every_link_fails_the_transfer_without_wrong_data() -> None:
    data = os.urandom(8 << 20)
    client, server, proxy, lst = _session_through(_flip_data(1), timeout_s=3)
    try:
        got, rerr, serr = _transfer(client, server, data)
        assert got is None or got == data
        assert rerr is not None and isinstance(rerr, DWCPError)
    finally:
        _close(client, server, proxy, lst)


@pytest.mark.parametrize("backend", ["c", "python"])
def test_bit_flips_never_stay_in_the_buffer_of_a_failed_receive(backend: str) -> None:
    """GCM is malleable until the tag is checked, and the engine decrypts in place: a chunk whose tag
    fails is wiped, so even the buffer of a failed recv_into never keeps the attacker's version."""
    chunk = 1 << 20
    data = os.urandom(8 * chunk)
    client, server, proxy, lst = _session_through(_flip_data(1), timeout_s=3, backend=backend)
    buf = bytearray(b"\xee" * len(data))
    box: dict[str, Any] = {}

    def recv() -> None:
        try:
            server.recv_into(buf)
        except DWCPError as e:
            box["err"] = e

    try:
        th = threading.Thread(target=recv)
        th.start()
        with pytest.raises(DWCPError):
            client.send(data)
        th.join(60)
        assert "err" in box
        for off in range(0, len(data), chunk):
            flipped = bytearray(data[off + 64:off + 128])
            flipped[100 - 64] ^= 0x01
            assert buf[off + 64:off + 128] != flipped, f"chunk at {off} kept the tampered bytes"
    finally:
        _close(client, server, proxy, lst)


@pytest.mark.parametrize("backend", ["c", "python"])
def test_replayed_and_reordered_frames_fail_authentication(backend: str) -> None:
    held: dict[str, Any] = {"replayed": 0, "swapped": 0}

    def attack(proxy: Proxy, stream: int, direction: str, frame: bytes) -> list[bytes]:
        if direction != "c2s" or frame[5] != DATA:
            return [frame]
        if stream == 0 and held["replayed"] == 0:
            held["replayed"] = 1
            return [frame, frame]  # the same frame twice: its counter is used up
        if stream == 1:
            if "hold" not in held and held["swapped"] == 0:
                held["hold"] = frame
                return []
            if "hold" in held:
                held["swapped"] = 1
                return [frame, held.pop("hold")]  # two frames of one link out of order
        return [frame]

    data = os.urandom(24 << 20 if backend == "c" else 6 << 20)
    client, server, proxy, lst = _session_through(attack, backend=backend)
    try:
        got, rerr, serr = _transfer(client, server, data)
        assert got == data and rerr is None and serr is None
        assert server.stats()["engine"]["auth_failures"] >= 2
    finally:
        _close(client, server, proxy, lst)


def test_frames_spliced_between_streams_or_sessions_never_open() -> None:
    """A DATA frame of stream 0 re-labelled as stream 1's (stream field and counter rewritten, CRC
    fixed) and a frame recorded in another session: both fail at their tag."""
    other_client, other_server, other_proxy, other_lst = _session_through(None)
    recorded: list[bytes] = []

    def record(proxy: Proxy, stream: int, direction: str, frame: bytes) -> list[bytes]:
        if direction == "c2s" and frame[5] == DATA and stream == 2 and not recorded:
            recorded.append(frame)
        return [frame]

    other_proxy.attack = record
    try:
        got, _, _ = _transfer(other_client, other_server, os.urandom(8 << 20))
        assert got is not None and recorded
    finally:
        _close(other_client, other_server, other_proxy, other_lst)

    state = {"spliced": 0, "foreign": 0}
    expected_ctr: dict[int, int] = {}

    def attack(proxy: Proxy, stream: int, direction: str, frame: bytes) -> list[bytes]:
        if direction != "c2s":
            return [frame]
        ctr, = struct.unpack_from("<Q", frame, 32)
        expected_ctr[stream] = ctr + 1
        if frame[5] != DATA:
            return [frame]
        if stream == 0 and not state["spliced"] and 1 in expected_ctr:
            state["spliced"] = 1
            f = bytearray(frame)
            struct.pack_into("<H", f, 8, 1)
            struct.pack_into("<Q", f, 32, expected_ctr[1])
            recrc(f)
            dst = proxy.out.get((1, "c2s"))
            if dst is not None:
                dst.sendall(bytes(f))  # lands between stream 1's frames
            return [frame]
        if stream == 2 and not state["foreign"]:
            state["foreign"] = 1
            f = bytearray(recorded[0])
            struct.pack_into("<Q", f, 32, ctr)  # the counter this link expects next
            recrc(f)
            return [bytes(f), frame]
        return [frame]

    data = os.urandom(24 << 20)
    client, server, proxy, lst = _session_through(attack)
    try:
        got, rerr, serr = _transfer(client, server, data)
        assert got == data and rerr is None and serr is None
        assert state["foreign"] == 1
        assert server.stats()["engine"]["auth_failures"] >= 1 + state["spliced"] - 1
    finally:
        _close(client, server, proxy, lst)


def test_nonces_are_unique_across_streams_transfers_and_rekeys() -> None:
    """With a tiny rekey budget every link moves through several epochs; every (direction, stream,
    counter) the wire carried is distinct, counters grow by one within an epoch and a new epoch starts
    at its first counter."""
    client, server, proxy, lst = _session_through(None, rekey_bytes=3 << 20)
    try:
        for i in range(3):
            data = os.urandom((16 << 20) + i)
            got, rerr, serr = _transfer(client, server, data)
            assert got == data
            back = os.urandom(1 << 20)
            box: dict[str, Any] = {}
            th = threading.Thread(target=lambda: box.setdefault("got", bytes(client.recv())))
            th.start()
            server.send(back)
            th.join(30)
            assert box["got"] == back
        assert client.stats()["engine"]["rekeys"] >= 6
        assert server.stats()["engine"]["rekeys"] >= 6
    finally:
        _close(client, server, proxy, lst)
    nonces = [(d, s, c) for d, s, _, _, c in proxy.seen]
    assert len(nonces) == len(set(nonces))
    by_link: dict[tuple[str, int], list[int]] = {}
    for d, s, c in nonces:
        by_link.setdefault((d, s), []).append(c)
    epochs = set()
    for ctrs in by_link.values():
        for a, b in zip(ctrs, ctrs[1:]):
            assert b == a + 1 or (b & 0xFFFFFFFF == 0 and b >> 32 == (a >> 32) + 1)
        epochs |= {c >> 32 for c in ctrs}
    assert len(epochs) >= 3
