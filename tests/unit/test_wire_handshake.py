"""The control handshake and stream join over real socket pairs, both sides in threads."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from dwcp.errors import AuthError, ConfigError, PeerClosedError, ProtocolError, TransferTimeout
from dwcp.wire import auth, frames, handshake as hs, io, messages as m
from dwcp.wire.frames import Flag, FrameType
from dwcp.wire.handshake import Offer, ServerPolicy, SessionParams

KEY = b"wire-test-key-0123456789abcdef!!"
OTHER_KEY = b"another-key-0123456789abcdef!!!!"
CTRL = frames.MAX_CONTROL_BYTES


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, Outcome]:
    out = Outcome()

    def run() -> None:
        try:
            out.value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            out.error = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def serve(sock: socket.socket, *, key: bytes | None = KEY, insecure: bool = False,
          policy: ServerPolicy = ServerPolicy(), timeout_s: float = 5.0) -> SessionParams:
    """What the listener does: read the first frame itself, then hand it to server_handshake."""
    first = io.read_frame(sock, max_payload=CTRL, deadline=time.monotonic() + timeout_s)
    return hs.server_handshake(sock, first, key=key, insecure=insecure, policy=policy,
                               timeout_s=timeout_s)


def handshake_pair(*, ckey: bytes | None = KEY, skey: bytes | None = KEY, cinsecure: bool = False,
                   sinsecure: bool = False, offer: Offer = Offer(),
                   policy: ServerPolicy = ServerPolicy()) -> tuple[Outcome, Outcome]:
    a, b = socket.socketpair()
    with a, b:
        t, server = _in_thread(lambda: serve(b, key=skey, insecure=sinsecure, policy=policy))
        client = Outcome()
        try:
            client.value = hs.client_handshake(a, key=ckey, insecure=cinsecure, offer=offer,
                                               timeout_s=5.0)
        except BaseException as e:  # noqa: BLE001
            client.error = e
        t.join(10)
        assert not t.is_alive()
    return client, server


def read_all_frames(sock: socket.socket, timeout_s: float = 5.0) -> list[int]:
    """Frame types the peer sent until it closed."""
    types: list[int] = []
    while True:
        try:
            h, _ = io.read_frame(sock, max_payload=CTRL, deadline=time.monotonic() + timeout_s)
        except PeerClosedError:
            return types
        types.append(h.type)


# ------------------------------------------------------------------------------------------------
# successful handshakes


def test_both_sides_agree_on_negotiated_params() -> None:
    offer = Offer(streams=64, chunk_bytes=32 << 20, checksums=("xxh3", "crc32c"),
                  features=frozenset({"zerocopy", "hde", "tls"}), versions=(1, 2, 3))
    policy = ServerPolicy(max_streams=16, max_chunk_bytes=8 << 20, features=frozenset({"hde", "tls", "x"}),
                          versions=(2, 3, 4))
    client, server = handshake_pair(offer=offer, policy=policy)
    assert client.error is None and server.error is None, (client.error, server.error)
    c, s = client.value, server.value
    assert c == s
    assert c.version == 3                      # highest common
    assert c.streams == 16                     # server cap
    assert c.chunk_bytes == 8 << 20            # server cap
    assert c.checksum == "xxh3" and c.csum_flags == Flag.CSUM_XXH3
    assert c.features == frozenset({"hde", "tls"})
    assert len(c.session_id) == 16 and len(c.session_key) == 32
    assert c.session_key == s.session_key and not c.insecure
    assert c.session_key.hex() not in repr(c) and "session_key" not in repr(c)


def test_client_checksum_preference_wins() -> None:
    client, server = handshake_pair(offer=Offer(checksums=("crc32c", "xxh3")))
    assert client.value.checksum == server.value.checksum == "crc32c"
    assert client.value.csum_flags == Flag.CSUM_CRC32C
    client, server = handshake_pair(offer=Offer(checksums=("xxh3", "crc32c")),
                                    policy=ServerPolicy(checksums=("crc32c",)))
    assert client.value.checksum == server.value.checksum == "crc32c"


def test_small_requests_are_kept() -> None:
    client, server = handshake_pair(offer=Offer(streams=1, chunk_bytes=4096))
    assert (client.value.streams, client.value.chunk_bytes) == (1, 4096)
    assert server.value == client.value


def test_each_handshake_has_fresh_session() -> None:
    one, _ = handshake_pair()
    two, _ = handshake_pair()
    assert one.value.session_id != two.value.session_id
    assert one.value.session_key != two.value.session_key


def test_insecure_on_both_sides_works() -> None:
    client, server = handshake_pair(ckey=None, skey=None, cinsecure=True, sinsecure=True)
    assert client.error is None and server.error is None
    assert client.value == server.value and client.value.insecure


# ------------------------------------------------------------------------------------------------
# authentication failures


def test_wrong_key_fails_on_both_sides() -> None:
    client, server = handshake_pair(ckey=KEY, skey=OTHER_KEY)
    assert isinstance(client.error, AuthError)
    assert "could not prove it holds the key" in str(client.error)
    assert "same pre-shared key" in str(client.error)
    assert isinstance(server.error, AuthError)
    assert "same pre-shared key" in str(server.error)


def test_server_rejecting_client_proof_sends_generic_error() -> None:
    """A client that passes the server check but sends a bad PROOF gets ERROR 'authentication failed'
    and never WELCOME."""
    a, b = socket.socketpair()
    with a, b:
        t, server = _in_thread(lambda: serve(b))
        hello = m.Hello(nonce=bytes(32), insecure=False, versions=(2,), streams=2,
                        chunk_bytes=1 << 20, checksums=("xxh3",))
        io.write_frame(a, frames.encode_frame(FrameType.HELLO, m.encode_hello(hello)))
        h, _ = io.read_frame(a, max_payload=CTRL, deadline=time.monotonic() + 5)
        assert h.type == FrameType.CHALLENGE
        io.write_frame(a, frames.encode_frame(FrameType.PROOF, m.encode_proof(m.Proof(b"\x01" * 32))))
        h, payload = io.read_frame(a, max_payload=CTRL, deadline=time.monotonic() + 5)
        assert h.type == FrameType.ERROR
        err = m.decode_error(payload)
        assert err.code == m.ErrorCode.AUTH_FAILED and err.reason == "authentication failed"
        assert read_all_frames(a) == []
        t.join(5)
    assert isinstance(server.error, AuthError)


def test_missing_key_without_insecure_is_config_error() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ConfigError, match="no pre-shared key: pass key=... / --key-file, or "
                                              "insecure=True / --insecure"):
            hs.client_handshake(a, key=None, insecure=False, offer=Offer(), timeout_s=1)
        b.settimeout(1)
        assert b.recv(1) == b""   # nothing was sent, and the socket was closed
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ConfigError, match="no pre-shared key"):
            hs.server_handshake(b, (frames.Header(type=FrameType.HELLO), b""), key=None,
                                insecure=False, policy=ServerPolicy(), timeout_s=1)
        a.settimeout(1)
        assert a.recv(1) == b""


def test_key_and_insecure_together_is_config_error() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ConfigError, match="both a pre-shared key and insecure"):
        hs.client_handshake(a, key=KEY, insecure=True, offer=Offer(), timeout_s=1)


def test_short_key_is_config_error() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ConfigError, match="at least 16"):
        hs.client_handshake(a, key=b"short", insecure=False, offer=Offer(), timeout_s=1)


def test_insecure_client_against_keyed_server() -> None:
    client, server = handshake_pair(ckey=None, cinsecure=True)
    assert isinstance(client.error, AuthError)
    assert "server requires a pre-shared key but this client has none" in str(client.error)
    assert isinstance(server.error, AuthError)
    assert "without a pre-shared key" in str(server.error)


def test_keyed_client_against_insecure_server() -> None:
    client, server = handshake_pair(skey=None, sinsecure=True)
    assert isinstance(client.error, AuthError)
    assert "server runs without one" in str(client.error)
    assert isinstance(server.error, AuthError)
    assert "this server runs without a key" in str(server.error)


class RecordingSocket:
    """Delegates to a real socket and records every byte the owner sends."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sent = bytearray()

    def sendall(self, data: bytes) -> None:
        self.sent += data
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _split_frames(data: bytes) -> list[bytes]:
    out = []
    while data:
        h = frames.decode_header(data[:48], CTRL)
        out.append(data[:48 + h.length])
        data = data[48 + h.length:]
    return out


def test_replayed_handshake_is_rejected_and_never_welcomed() -> None:
    # Record the client's bytes from a real, successful handshake.
    a, b = socket.socketpair()
    with a, b:
        rec = RecordingSocket(a)
        t, server = _in_thread(lambda: serve(b))
        hs.client_handshake(rec, key=KEY, insecure=False, offer=Offer(), timeout_s=5)  # type: ignore[arg-type]
        t.join(5)
        assert server.error is None
    hello_frame, proof_frame = _split_frames(bytes(rec.sent))

    # Replay them to a fresh server that holds the same key.
    a, b = socket.socketpair()
    with a, b:
        t, server = _in_thread(lambda: serve(b))
        a.sendall(hello_frame)
        h, _ = io.read_frame(a, max_payload=CTRL, deadline=time.monotonic() + 5)
        assert h.type == FrameType.CHALLENGE
        a.sendall(proof_frame)
        rest = read_all_frames(a)
        t.join(5)
    assert isinstance(server.error, AuthError)
    assert rest == [FrameType.ERROR]
    assert FrameType.WELCOME not in rest


def test_blind_replay_of_whole_recording_is_rejected() -> None:
    a, b = socket.socketpair()
    with a, b:
        rec = RecordingSocket(a)
        t, _ = _in_thread(lambda: serve(b))
        hs.client_handshake(rec, key=KEY, insecure=False, offer=Offer(), timeout_s=5)  # type: ignore[arg-type]
        t.join(5)
    a, b = socket.socketpair()
    with a, b:
        t, server = _in_thread(lambda: serve(b))
        a.sendall(bytes(rec.sent))
        types = read_all_frames(a)
        t.join(5)
    assert types == [FrameType.CHALLENGE, FrameType.ERROR]
    assert isinstance(server.error, AuthError)


def test_tampered_challenge_is_detected_by_client() -> None:
    """A man in the middle lowers the chunk size in CHALLENGE (a parameter downgrade): the server's MAC
    no longer verifies, the client refuses and never sends its proof."""
    client_sock, mitm_client = socket.socketpair()
    mitm_server, server_sock = socket.socketpair()
    with client_sock, mitm_client, mitm_server, server_sock:
        ts, server = _in_thread(lambda: serve(server_sock))

        def mitm() -> list[int]:
            h, p = io.read_frame(mitm_client, max_payload=CTRL)
            io.write_frame(mitm_server, frames.encode_frame(h.type, p))
            h, p = io.read_frame(mitm_server, max_payload=CTRL)
            ch, _ = m.decode_challenge(p)
            forged = m.Challenge(nonce=ch.nonce, insecure=False, version=ch.version,
                                 streams=ch.streams, chunk_bytes=4096, checksum=ch.checksum,
                                 features=ch.features, mac=ch.mac)
            io.write_frame(mitm_client, frames.encode_frame(FrameType.CHALLENGE, m.encode_challenge(forged)))
            return read_all_frames(mitm_client)

        tm, relay = _in_thread(mitm)
        with pytest.raises(AuthError, match="could not prove"):
            hs.client_handshake(client_sock, key=KEY, insecure=False, offer=Offer(), timeout_s=5)
        tm.join(5)
        mitm_server.close()
        ts.join(5)
    assert relay.value == [FrameType.ERROR]          # no PROOF left the client
    assert isinstance(server.error, PeerClosedError)


# ------------------------------------------------------------------------------------------------
# negotiation and protocol failures


def test_no_common_version_names_both_sides() -> None:
    client, server = handshake_pair(offer=Offer(versions=(1,)), policy=ServerPolicy(versions=(2, 3)))
    for out in (client, server):
        assert isinstance(out.error, ProtocolError)
        assert "[1]" in str(out.error) and "[2, 3]" in str(out.error)


def test_no_common_checksum() -> None:
    client, server = handshake_pair(offer=Offer(checksums=("xxh3",)),
                                    policy=ServerPolicy(checksums=("crc32c",)))
    assert isinstance(client.error, ProtocolError) and isinstance(server.error, ProtocolError)
    assert "checksum" in str(client.error)


def test_server_refuses_non_hello_first_frame() -> None:
    a, b = socket.socketpair()
    with a, b:
        t, server = _in_thread(lambda: serve(b))
        io.write_frame(a, frames.encode_frame(FrameType.PROOF, m.encode_proof(m.Proof(bytes(32)))))
        assert read_all_frames(a) == [FrameType.ERROR]
        t.join(5)
    assert isinstance(server.error, ProtocolError)


def test_server_times_out_waiting_for_proof() -> None:
    a, b = socket.socketpair()
    with a, b:
        hello = m.Hello(nonce=bytes(32), insecure=False, versions=(2,), streams=2,
                        chunk_bytes=1 << 20, checksums=("xxh3",))
        io.write_frame(a, frames.encode_frame(FrameType.HELLO, m.encode_hello(hello)))
        start = time.monotonic()
        first = io.read_frame(b, max_payload=CTRL)
        with pytest.raises(TransferTimeout):
            hs.server_handshake(b, first, key=KEY, insecure=False, policy=ServerPolicy(),
                                timeout_s=0.3)
        assert time.monotonic() - start < 3


def test_client_rejects_choice_outside_offer() -> None:
    """A (buggy or hostile) server that raises a parameter above the offer is refused, even with a
    valid MAC."""
    a, b = socket.socketpair()
    with a, b:
        def bad_server() -> None:
            h, hello_payload = io.read_frame(b, max_payload=CTRL)
            ch = m.Challenge(nonce=bytes(32), insecure=False, version=1, streams=200,
                             chunk_bytes=1 << 20, checksum="xxh3", features=frozenset())
            body = m.encode_challenge_body(ch)
            mac = auth.server_proof(KEY, auth.transcript_hash(hello_payload, body))
            io.write_frame(b, frames.encode_frame(FrameType.CHALLENGE, body + mac))
            io.read_frame(b, max_payload=CTRL)

        t, _ = _in_thread(bad_server)
        with pytest.raises(ProtocolError, match="outside our offer"):
            hs.client_handshake(a, key=KEY, insecure=False, offer=Offer(streams=4), timeout_s=5)
        t.join(5)


@pytest.mark.parametrize("offer", [Offer(streams=0), Offer(streams=257), Offer(chunk_bytes=4095),
                                   Offer(chunk_bytes=(64 << 20) + 1), Offer(checksums=("md5",)),
                                   Offer(checksums=()), Offer(versions=()),
                                   Offer(features=frozenset({"Bad Name"}))])
def test_bad_offer_is_config_error(offer: Offer) -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ConfigError):
        hs.client_handshake(a, key=KEY, insecure=False, offer=offer, timeout_s=1)


# ------------------------------------------------------------------------------------------------
# stream join


def _session() -> tuple[SessionParams, SessionParams]:
    client, server = handshake_pair(offer=Offer(streams=4))
    assert client.error is None and server.error is None
    return client.value, server.value


def _join_once(cparams: SessionParams, sparams: SessionParams, index: int) -> tuple[Outcome, Outcome]:
    """Client joins stream ``index``; the server reads JOIN, verifies and answers or closes."""
    a, b = socket.socketpair()
    with a, b:
        def server_side() -> None:
            try:
                h, payload = io.read_frame(b, max_payload=CTRL, deadline=time.monotonic() + 5)
                assert h.type == FrameType.JOIN and h.stream == index
                req = hs.parse_join(payload)
                hs.verify_join(sparams, req)
                hs.send_joined(b, req.stream_index)
            except BaseException:
                b.close()   # a stream that cannot prove membership is closed, nothing else read
                raise

        t, server = _in_thread(server_side)
        client = Outcome()
        try:
            hs.client_join(a, cparams, index, timeout_s=5)
        except BaseException as e:  # noqa: BLE001
            client.error = e
        t.join(5)
    return client, server


def test_join_all_streams() -> None:
    c, s = _session()
    for i in range(c.streams):
        client, server = _join_once(c, s, i)
        assert client.error is None and server.error is None, (client.error, server.error)
    assert s.joined == frozenset(range(4))


def test_duplicate_stream_index_is_rejected() -> None:
    c, s = _session()
    assert _join_once(c, s, 2)[1].error is None
    client, server = _join_once(c, s, 2)
    assert isinstance(server.error, AuthError) and "already joined" in str(server.error)
    assert isinstance(client.error, AuthError)


def test_join_with_bad_mac_is_rejected_and_slot_not_burnt() -> None:
    c, s = _session()
    forged = hs.JoinRequest(session_id=c.session_id, stream_index=1, mac=bytes(32))
    with pytest.raises(AuthError, match="bad token"):
        hs.verify_join(s, forged)
    assert 1 not in s.joined
    assert _join_once(c, s, 1)[1].error is None


def test_join_from_another_session_is_rejected() -> None:
    c, s = _session()
    c2, _ = _session()
    client, server = _join_once(c2, s, 0)
    assert isinstance(server.error, AuthError) and "another session" in str(server.error)
    assert isinstance(client.error, AuthError)
    # Right session id but the other session's key: the MAC fails.
    req = hs.JoinRequest(session_id=s.session_id, stream_index=0,
                         mac=auth.join_mac(c2.session_key, s.session_id, 0))
    with pytest.raises(AuthError, match="bad token"):
        hs.verify_join(s, req)


def test_join_index_out_of_range() -> None:
    c, s = _session()
    req = hs.JoinRequest(session_id=s.session_id, stream_index=4,
                         mac=auth.join_mac(s.session_key, s.session_id, 4))
    with pytest.raises(AuthError, match="4 streams"):
        hs.verify_join(s, req)
    a, b = socket.socketpair()
    with a, b, pytest.raises(ConfigError):
        hs.client_join(a, c, 4, timeout_s=1)


def test_parse_join_rejects_malformed() -> None:
    with pytest.raises(ProtocolError):
        hs.parse_join(b"\x01" + bytes(10))


def test_concurrent_duplicate_joins_admit_exactly_one() -> None:
    c, s = _session()
    req = hs.JoinRequest(session_id=s.session_id, stream_index=3,
                         mac=auth.join_mac(c.session_key, c.session_id, 3))
    results: list[bool] = []

    def attempt() -> None:
        try:
            hs.verify_join(s, req)
            results.append(True)
        except AuthError:
            results.append(False)

    threads = [threading.Thread(target=attempt) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 15 + [True]
