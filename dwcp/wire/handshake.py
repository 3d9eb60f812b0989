"""The session handshake on the control connection, and the JOIN of each data stream.

Message flow (layouts in docs/protocol.md, "Handshake" and "Stream join")::

    client                                              server
    HELLO     {client nonce, insecure?, offer}   →
              ←  CHALLENGE {server nonce, insecure?, choice, server MAC(transcript)}
    PROOF     {client MAC(transcript)}           →
              ←  WELCOME   {session id, MAC_session_key(transcript, session id)}

    data stream i:  JOIN {session id, i, HMAC(session_key, "dwcp join" | session id | i)}  →
                    ←  JOINED   (or the server closes the connection)

Each side proves it holds the pre-shared key by a MAC over a transcript that includes the other
side's fresh nonce, so nothing recorded from an earlier handshake verifies again. The client checks the
server's proof before it sends its own, and the server sends WELCOME only after the client's proof
verified. On any failure the function closes the socket before raising: a half-authenticated
connection is never handed back. The server answers a refused handshake with an ERROR frame whose
reason is deliberately generic for MAC failures ("authentication failed": which check failed is no
business of an unauthenticated peer) and specific for configuration mismatches, which are not secret.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dwcp.errors import AuthError, ConfigError, DWCPError, PeerClosedError, ProtocolError
from dwcp.wire import auth, frames
from dwcp.wire import messages as m
from dwcp.wire.frames import FrameType, Header
from dwcp.wire.io import read_frame, write_frame
from dwcp.wire.messages import ErrorCode, JoinRequest
from dwcp.wire.tls import FEATURE_TLS_BIND, channel_binding
from dwcp.wire.negotiation import (CHECKSUM_FLAGS, CIPHERS, Choice, Offer, ServerPolicy, check_choice,
                                   negotiate, validate_offer, validate_policy)

__all__ = ["JoinRequest", "Offer", "ServerPolicy", "SessionParams", "client_handshake", "client_join",
           "parse_join", "send_joined", "server_handshake", "verify_join"]

log = logging.getLogger(__name__)

_CTRL = frames.MAX_CONTROL_BYTES
_AUTH_FAILED = "authentication failed"
_KEY_ADVICE = "check both ends use the same pre-shared key"


@dataclass(frozen=True)
class SessionParams:
    """What a successful handshake agreed on. Identical on both sides.

    ``session_key`` is secret (excluded from repr); it never goes on the wire. The server-side object
    also remembers which stream indexes have joined (:func:`verify_join`), so it is shared by all of a
    session's connections."""
    version: int
    streams: int
    chunk_bytes: int
    checksum: str
    features: frozenset[str]
    session_id: bytes
    session_key: bytes = field(repr=False)
    insecure: bool
    #: (client-to-server, server-to-client) secrets of sealed frames; empty when frames are not sealed
    traffic_secrets: tuple[bytes, bytes] = field(default=(b"", b""), repr=False)
    _joined: set[int] = field(default_factory=set, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    @property
    def csum_flags(self) -> int:
        """The frames.Flag bit for the negotiated data checksum (0 with sealed frames: the tag is
        the integrity check)."""
        return CHECKSUM_FLAGS.get(self.checksum, 0)

    @property
    def cipher(self) -> str | None:
        """The AEAD cipher every post-handshake frame is sealed with, or None (plaintext frames)."""
        return self.checksum if self.checksum in CIPHERS else None

    @property
    def joined(self) -> frozenset[int]:
        """Stream indexes that have joined so far (server side)."""
        with self._lock:
            return frozenset(self._joined)


# --------------------------------------------------------------------------------------------------
# helpers


def _deadline(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s = {timeout_s!r}: must be > 0")
    return time.monotonic() + timeout_s


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _send(sock: socket.socket, ftype: FrameType, payload: bytes, deadline: float,
          stream: int = 0) -> None:
    write_frame(sock, frames.encode_frame(ftype, payload, stream=stream), deadline=deadline)


def _refuse(sock: socket.socket, code: ErrorCode, reason: str, deadline: float) -> None:
    """Best effort: tell the client why, then the caller closes. A dead socket must not hide the
    original error, so failures here are only logged."""
    try:
        _send(sock, FrameType.ERROR, m.encode_error(m.Error(code, reason)),
              min(deadline, time.monotonic() + 1.0))
    except DWCPError as e:
        log.debug("could not send ERROR to the peer: %s", e)


def _expect(h: Header, *types: FrameType, stream: int = 0) -> None:
    """The frame must be one of ``types``, on ``stream``, with no transfer fields set."""
    if h.type not in types:
        got = FrameType(h.type).name
        want = " or ".join(t.name for t in types)
        raise ProtocolError(f"expected {want}, got {got}: the peer is out of step with the "
                            "handshake (is it a DWCP peer of a compatible version?)", code=-3)
    if h.stream != stream or h.transfer_id or h.offset:
        raise ProtocolError(f"{FrameType(h.type).name} frame with stream={h.stream}, transfer_id="
                            f"{h.transfer_id}, offset={h.offset} (expected {stream}, 0, 0)", code=-9)


def _client_error(err: m.Error, *, have_key: bool, after_proof: bool) -> DWCPError:
    """Turn the server's ERROR into the exception whose message tells the user what to do."""
    said = f" (server said: {err.reason})" if err.reason else ""
    if err.code == ErrorCode.AUTH_FAILED:
        what = ("the server rejected our key" if after_proof
                else "the server refused to authenticate us")
        return AuthError(f"{what}: {_KEY_ADVICE}{said}")
    if err.code == ErrorCode.INSECURE_MISMATCH:
        if have_key:
            return AuthError("this client has a pre-shared key but the server runs without one "
                             "(insecure): configure the same key on the server, or run both ends "
                             f"with insecure=True / --insecure{said}")
        return AuthError("the server requires a pre-shared key but this client has none (insecure): "
                         f"pass key=... / --key-file on the client{said}")
    if err.code == ErrorCode.NO_COMMON_VERSION:
        return ProtocolError(f"the server refused our protocol versions{said}", code=-2)
    return ProtocolError(f"the server refused the handshake{said}", code=-16)


class _ClientRefused(Exception):
    """Internal: the client answered CHALLENGE with ERROR; carries the exception to raise."""

    def __init__(self, error: DWCPError) -> None:
        super().__init__(str(error))
        self.error = error


def _server_error(err: m.Error) -> _ClientRefused:
    """The client refused our CHALLENGE (it sends ERROR in place of PROOF)."""
    said = f" (client said: {err.reason})" if err.reason else ""
    if err.code == ErrorCode.AUTH_FAILED:
        return _ClientRefused(AuthError(
            "the client could not verify this server's proof of the key: " + _KEY_ADVICE + said))
    if err.code == ErrorCode.INSECURE_MISMATCH:
        return _ClientRefused(AuthError("the client refused: exactly one side has a pre-shared key"
                                        + said))
    return _ClientRefused(ProtocolError("the client refused the handshake" + said, code=-16))


# --------------------------------------------------------------------------------------------------
# client


def client_handshake(sock: socket.socket, *, key: bytes | None, insecure: bool, offer: Offer,
                     timeout_s: float) -> SessionParams:
    """Run the client side on a connected control socket (already TLS-wrapped if TLS is on).

    Raises ConfigError (no key and not insecure, bad offer: nothing is sent), AuthError (key mismatch,
    insecure mismatch, server failed to prove the key), ProtocolError (no common version, malformed
    or out-of-offer answer), PeerClosedError / TransferTimeout. The socket is closed on failure."""
    try:
        k = auth.resolve_key(key, insecure)
        validate_offer(offer)
        deadline = _deadline(timeout_s)
        return _client(sock, k, offer, deadline)
    except BaseException:
        _close(sock)
        raise


def _client(sock: socket.socket, key: bytes | None, offer: Offer, deadline: float) -> SessionParams:
    hello = m.Hello(nonce=auth.new_nonce(), insecure=key is None, versions=offer.versions,
                    streams=offer.streams, chunk_bytes=offer.chunk_bytes,
                    checksums=offer.checksums, features=offer.features)
    hello_payload = m.encode_hello(hello)
    _send(sock, FrameType.HELLO, hello_payload, deadline)

    h, payload = read_frame(sock, max_payload=_CTRL, deadline=deadline)
    _expect(h, FrameType.CHALLENGE, FrameType.ERROR)
    if h.type == FrameType.ERROR:
        raise _client_error(m.decode_error(payload), have_key=key is not None, after_proof=False)
    ch, body = m.decode_challenge(payload)
    # Insecure mode is part of the negotiation: a client with a key never accepts an unauthenticated
    # server (that would let anyone in the path strip authentication), and vice versa.
    if ch.insecure != (key is None):
        _refuse(sock, ErrorCode.INSECURE_MISMATCH, "exactly one side has a pre-shared key", deadline)
        if key is not None:
            raise AuthError("this client has a pre-shared key but the server runs without one "
                            "(insecure): configure the same key on the server, or run both ends "
                            "with insecure=True / --insecure")
        raise AuthError("the server requires a pre-shared key but this client has none "
                        "(insecure): pass key=... / --key-file on the client")
    try:
        proof, transcript = _check_challenge(sock, key, offer, hello_payload, ch, body)
    except AuthError:
        # Tell the server why we hang up (it raises AuthError too); the reason stays generic.
        _refuse(sock, ErrorCode.AUTH_FAILED, _AUTH_FAILED, deadline)
        raise
    except ProtocolError as e:
        _refuse(sock, ErrorCode.NEGOTIATION, str(e), deadline)
        raise
    _send(sock, FrameType.PROOF, m.encode_proof(m.Proof(proof)), deadline)

    h, payload = read_frame(sock, max_payload=_CTRL, deadline=deadline)
    _expect(h, FrameType.WELCOME, FrameType.ERROR)
    if h.type == FrameType.ERROR:
        raise _client_error(m.decode_error(payload), have_key=key is not None, after_proof=True)
    welcome = m.decode_welcome(payload)
    session_key = auth.derive_session_key(key, hello.nonce, ch.nonce, transcript)
    if not auth.macs_equal(welcome.mac, auth.welcome_mac(session_key, transcript,
                                                         welcome.session_id)):
        raise AuthError("the server's WELCOME does not verify under the session key: " + _KEY_ADVICE
                        + " (or something in the path altered the handshake)")
    return SessionParams(version=ch.version, streams=ch.streams, chunk_bytes=ch.chunk_bytes,
                         checksum=ch.checksum, features=ch.features, session_id=welcome.session_id,
                         session_key=session_key, insecure=key is None,
                         traffic_secrets=_traffic(session_key, hello.nonce, ch.nonce, ch.checksum))


def _traffic(session_key: bytes, client_nonce: bytes, server_nonce: bytes,
             protection: str) -> tuple[bytes, bytes]:
    if protection not in CIPHERS:
        return (b"", b"")
    return auth.derive_traffic_secrets(session_key, client_nonce, server_nonce, protection)


def _binding(sock: socket.socket, features: frozenset[str], *, server: bool) -> bytes:
    """The TLS channel binding the transcript covers: empty unless both sides agreed to bind."""
    if FEATURE_TLS_BIND not in features:
        return b""
    value = channel_binding(sock, server=server) if isinstance(sock, ssl.SSLSocket) else None
    if not value:
        raise ProtocolError("the session was negotiated bound to TLS but this side cannot see the "
                            "TLS certificate (is the connection TLS?)", code=-16)
    return value


def _check_challenge(sock: socket.socket, key: bytes | None, offer: Offer, hello_payload: bytes,
                     ch: m.Challenge, body: bytes) -> tuple[bytes, bytes]:
    """Validate the server's CHALLENGE; return (our proof MAC, transcript hash)."""
    choice = Choice(version=ch.version, streams=ch.streams, chunk_bytes=ch.chunk_bytes,
                    checksum=ch.checksum, features=ch.features)
    check_choice(offer, choice)

    transcript = auth.transcript_hash(hello_payload, body, _binding(sock, ch.features, server=False))
    if key is not None:
        # Verify the server before sending our proof: an impostor gets nothing from us.
        if not auth.macs_equal(ch.mac, auth.server_proof(key, transcript)):
            raise AuthError("the server could not prove it holds the key: " + _KEY_ADVICE
                            + " (or something in the path altered the handshake)")
        proof = auth.client_proof(key, transcript)
    else:
        proof = bytes(m.MAC_BYTES)
    return proof, transcript


# --------------------------------------------------------------------------------------------------
# server


def server_handshake(sock: socket.socket, hello: tuple[Header, bytes], *, key: bytes | None,
                     insecure: bool, policy: ServerPolicy, timeout_s: float,
                     before_welcome: Callable[[SessionParams], None] | None = None) -> SessionParams:
    """Run the server side after the listener read the first frame (``hello``) to route the connection.

    ``before_welcome(params)`` runs once the client is authenticated, just before WELCOME hands it the
    session id: the client opens its data streams as soon as WELCOME arrives, so a listener must
    know the session by then (it registers it here) or their JOINs would name an unknown session.

    Raises ConfigError (this side misconfigured; nothing is sent), AuthError (the client has no or the
    wrong key, or replayed a handshake; the client was sent ERROR "authentication failed"),
    ProtocolError (malformed HELLO/PROOF, no common version or checksum; the client was sent ERROR),
    PeerClosedError / TransferTimeout. The socket is closed on failure."""
    try:
        k = auth.resolve_key(key, insecure)
        validate_policy(policy)
        deadline = _deadline(timeout_s)
        return _server(sock, hello, k, policy, deadline, before_welcome)
    except BaseException:
        _close(sock)
        raise


def _server(sock: socket.socket, first: tuple[Header, bytes], key: bytes | None,
            policy: ServerPolicy, deadline: float,
            before_welcome: Callable[[SessionParams], None] | None) -> SessionParams:
    h, hello_payload = first
    try:
        _expect(h, FrameType.HELLO)
        hello = m.decode_hello(hello_payload)
    except ProtocolError as e:
        _refuse(sock, ErrorCode.MALFORMED, str(e), deadline)
        raise

    if hello.insecure and key is not None:
        _refuse(sock, ErrorCode.INSECURE_MISMATCH,
                "this server requires a pre-shared key and the client has none (insecure)", deadline)
        raise AuthError("a client connected without a pre-shared key (insecure) but this server "
                        "requires one: configure the same key on the client")
    if not hello.insecure and key is None:
        _refuse(sock, ErrorCode.INSECURE_MISMATCH,
                "this server runs without a pre-shared key (insecure) but the client has one",
                deadline)
        raise AuthError("a client offered pre-shared-key authentication but this server runs "
                        "without a key (insecure): configure the same key on the server")
    try:
        choice = negotiate(hello, policy)
    except ProtocolError as e:
        code = ErrorCode.NO_COMMON_VERSION if e.code == -2 else ErrorCode.NEGOTIATION
        _refuse(sock, code, str(e), deadline)
        raise

    ch = m.Challenge(nonce=auth.new_nonce(), insecure=key is None, version=choice.version,
                     streams=choice.streams, chunk_bytes=choice.chunk_bytes,
                     checksum=choice.checksum, features=choice.features)
    body = m.encode_challenge_body(ch)
    transcript = auth.transcript_hash(hello_payload, body, _binding(sock, choice.features, server=True))
    server_mac = auth.server_proof(key, transcript) if key is not None else bytes(m.MAC_BYTES)
    _send(sock, FrameType.CHALLENGE, body + server_mac, deadline)

    h, payload = read_frame(sock, max_payload=_CTRL, deadline=deadline)
    try:
        _expect(h, FrameType.PROOF, FrameType.ERROR)
        if h.type == FrameType.ERROR:
            raise _server_error(m.decode_error(payload))
        proof = m.decode_proof(payload)
    except _ClientRefused as e:
        raise e.error from None
    except ProtocolError as e:
        _refuse(sock, ErrorCode.MALFORMED, str(e), deadline)
        raise
    if key is not None:
        if not auth.macs_equal(proof.mac, auth.client_proof(key, transcript)):
            _refuse(sock, ErrorCode.AUTH_FAILED, _AUTH_FAILED, deadline)
            raise AuthError("a client failed to prove it holds the pre-shared key (wrong key, or a "
                            "replayed handshake); " + _KEY_ADVICE)
    elif proof.mac != bytes(m.MAC_BYTES):
        _refuse(sock, ErrorCode.MALFORMED, "insecure PROOF must carry a zero mac", deadline)
        raise ProtocolError("malformed PROOF payload: insecure PROOF carries a non-zero mac",
                            code=-16)

    session_id = auth.new_session_id()
    session_key = auth.derive_session_key(key, hello.nonce, ch.nonce, transcript)
    welcome = m.Welcome(session_id=session_id,
                        mac=auth.welcome_mac(session_key, transcript, session_id))
    params = SessionParams(version=choice.version, streams=choice.streams,
                           chunk_bytes=choice.chunk_bytes, checksum=choice.checksum,
                           features=choice.features, session_id=session_id,
                           session_key=session_key, insecure=key is None,
                           traffic_secrets=_traffic(session_key, hello.nonce, ch.nonce, choice.checksum))
    if before_welcome is not None:
        before_welcome(params)
    _send(sock, FrameType.WELCOME, m.encode_welcome(welcome), deadline)
    return params


# --------------------------------------------------------------------------------------------------
# stream join


def client_join(sock: socket.socket, params: SessionParams, stream_index: int, *,
                timeout_s: float) -> None:
    """Present this data stream's token and wait for JOINED. The socket is closed on failure.

    AuthError if the server refuses (it closes the connection, or answers ERROR)."""
    if not isinstance(stream_index, int) or not 0 <= stream_index < params.streams:
        raise ConfigError(f"stream_index {stream_index!r} outside 0..{params.streams - 1}")
    deadline = _deadline(timeout_s)
    req = JoinRequest(session_id=params.session_id, stream_index=stream_index,
                      mac=auth.join_mac(params.session_key, params.session_id, stream_index))
    try:
        _send(sock, FrameType.JOIN, m.encode_join(req), deadline, stream=stream_index)
        try:
            h, payload = read_frame(sock, max_payload=_CTRL, deadline=deadline)
        except PeerClosedError as e:
            raise AuthError(f"the server closed data stream {stream_index} instead of answering "
                            "JOINED: it did not accept our session token (session ended, or the "
                            "index already joined)") from e
        if h.type == FrameType.ERROR:
            err = m.decode_error(payload)
            raise AuthError(f"the server refused data stream {stream_index}: {err.reason}")
        _expect(h, FrameType.JOINED, stream=stream_index)
    except BaseException:
        _close(sock)
        raise


def parse_join(payload: bytes) -> JoinRequest:
    """Decode a JOIN payload (ProtocolError if malformed). Authenticates nothing: see verify_join."""
    return m.decode_join(payload)


def verify_join(params: SessionParams, req: JoinRequest) -> None:
    """Server side: accept ``req`` as a member of the session ``params`` or raise AuthError.

    Checks the session id, the index bound, the MAC (constant time), and then claims the index: each
    index joins once, so a copied JOIN cannot open a second stream in the same slot. The index is
    claimed only after the MAC verified, so forged JOINs cannot burn slots."""
    if not auth.macs_equal(req.session_id, params.session_id):
        raise AuthError("JOIN names another session (stale or forged session id)")
    if not 0 <= req.stream_index < params.streams:
        raise AuthError(f"JOIN for stream index {req.stream_index} but the session has "
                        f"{params.streams} streams")
    expected = auth.join_mac(params.session_key, params.session_id, req.stream_index)
    if not auth.macs_equal(req.mac, expected):
        raise AuthError(f"JOIN for stream {req.stream_index} carries a bad token (wrong session key)")
    with params._lock:
        if req.stream_index in params._joined:
            raise AuthError(f"stream index {req.stream_index} already joined this session")
        params._joined.add(req.stream_index)


def send_joined(sock: socket.socket, stream_index: int, *, timeout_s: float = 10.0) -> None:
    """Server side: accept the data stream (after verify_join)."""
    write_frame(sock, frames.encode_frame(FrameType.JOINED, stream=stream_index),
                deadline=_deadline(timeout_s))
