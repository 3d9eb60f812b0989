"""Server side: dwcp.listen() and the Listener that turns connections into Sessions.

Every connection to the listening port starts with one frame that says what it is: HELLO opens a new
session on this (control) connection; JOIN attaches a data stream to a session whose handshake has
completed. A background thread accepts connections and a short-lived thread per connection reads that
first frame, so a slow or hostile client cannot block other clients. A session is handed to accept()
once all its streams have joined; a handshake that fails is logged and dropped (the client gets the
error), it never breaks the listener.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dwcp.errors import AuthError, ConfigError, DWCPError, ProtocolError, TransferTimeout
from dwcp.transport.connect import tune_socket
from dwcp.transport.options import SessionOptions, parse_address
from dwcp.transport.segments import FEATURE_SEGMENTS
from dwcp.transport.session import Session
from dwcp.wire import auth, messages
from dwcp.wire.frames import MAGIC, MAX_CONTROL_BYTES, FrameType, encode_frame
from dwcp.wire.handshake import (ServerPolicy, SessionParams, parse_join, send_joined, server_handshake,
                                 verify_join)
from dwcp.wire.io import read_frame, write_frame
from dwcp.wire.tls import FEATURE_TLS_BIND, server_binding

log = logging.getLogger(__name__)

MAX_PENDING_CONNECTIONS = 1024
FRAME_MAGIC_BYTES = struct.pack("<I", MAGIC)  # how every DWCP connection's first frame starts


@dataclass
class _Pending:
    params: SessionParams
    control: socket.socket
    peer: tuple[str, int]
    deadline: float
    streams: list[socket.socket | None] = field(default_factory=list)


class Listener:
    """Accepts DWCP sessions on one address. Use as a context manager."""

    def __init__(self, sock: socket.socket, options: SessionOptions, *, key: bytes | None, insecure: bool,
                 policy: ServerPolicy, handshake_timeout_s: float) -> None:
        self._sock = sock
        self.options = options
        self._key = key
        self._insecure = insecure
        self._policy = policy
        self._handshake_timeout_s = handshake_timeout_s
        self._ready: queue.Queue[Session] = queue.Queue()
        self._pending: dict[bytes, _Pending] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._handlers = threading.BoundedSemaphore(MAX_PENDING_CONNECTIONS)
        self.failed_handshakes = 0
        # Hooks for dwcp.control's ChannelListener, which serves DWCP sessions and plain channels on
        # one port: on_session takes each session instead of accept(); on_foreign(conn, peer, first)
        # takes a connection whose first bytes are not the frame magic (or that sent nothing within
        # first_bytes_wait_s).
        self.on_session: Callable[[Session], None] | None = None
        self.on_foreign: Callable[[socket.socket, tuple[str, int], bytes], None] | None = None
        self.first_bytes_wait_s = 1.0
        self._thread = threading.Thread(target=self._accept_loop, name="dwcp-listener", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def accept(self, timeout_s: float | None = None) -> Session:
        """The next session whose handshake and stream joins completed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._closed.is_set() and self._ready.empty():
                raise ConfigError("accept() on a closed listener")
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                raise TransferTimeout(f"no session was established within {timeout_s:g} s")
            try:
                return self._ready.get(timeout=wait)
            except queue.Empty:
                continue

    def close(self) -> None:
        """Stop accepting; sessions already handed out stay open."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            _close_all([p.control, *p.streams])
        while not self._ready.empty():
            self._ready.get_nowait().close()

    # ---- background work ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        # The timeout lets the loop expire sessions whose streams never joined even when no new
        # connection arrives.
        self._sock.settimeout(0.5)
        while not self._closed.is_set():
            try:
                conn, peer = self._sock.accept()
                conn.settimeout(None)
            except socket.timeout:
                self._expire_pending()
                continue
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off instead of spinning
                continue
            if not self._handlers.acquire(blocking=False):
                log.warning("dropping connection from %s: %d handshakes already in progress", peer,
                            MAX_PENDING_CONNECTIONS)
                conn.close()
                continue
            threading.Thread(target=self._handle, args=(conn, peer), name="dwcp-handshake",
                             daemon=True).start()
            self._expire_pending()

    def _handle(self, conn: socket.socket, peer: Any) -> None:
        try:
            tune_socket(conn)
            if self.options.tls is not None:
                conn.settimeout(self._handshake_timeout_s)
                conn = self.options.tls.wrap_socket(conn, server_side=True)
                conn.settimeout(None)
            if self.on_foreign is not None and self.options.tls is None:
                first = _peek(conn, len(FRAME_MAGIC_BYTES), self.first_bytes_wait_s)
                if first != FRAME_MAGIC_BYTES:
                    self.on_foreign(conn, (peer[0], peer[1]), first)
                    return
            deadline = time.monotonic() + self._handshake_timeout_s
            hdr, payload = read_frame(conn, max_payload=MAX_CONTROL_BYTES, deadline=deadline)
            if hdr.type == FrameType.HELLO:
                self._new_session(conn, (hdr, payload), (peer[0], peer[1]))
            elif hdr.type == FrameType.JOIN:
                self._join(conn, payload)
            else:
                raise ProtocolError(f"first frame of a connection must be HELLO or JOIN, got type {hdr.type}")
        except (DWCPError, OSError, ssl.SSLError) as e:
            self.failed_handshakes += 1
            log.info("rejected connection from %s: %s", peer, e)
            _close_all([conn])
        finally:
            self._handlers.release()

    def _new_session(self, conn: socket.socket, hello: Any, peer: tuple[str, int]) -> None:
        registered: list[_Pending] = []

        def register(params: SessionParams) -> None:
            # Before WELCOME, not after: the client sends its JOINs the moment WELCOME arrives, and a
            # JOIN handled before the session is registered would be refused as "unknown session".
            pending = _Pending(params=params, control=conn, peer=peer,
                               deadline=time.monotonic() + self._handshake_timeout_s,
                               streams=[None] * params.streams)
            with self._lock:
                self._pending[params.session_id] = pending
            registered.append(pending)

        try:
            server_handshake(conn, hello, key=self._key, insecure=self._insecure, policy=self._policy,
                             timeout_s=self._handshake_timeout_s, before_welcome=register)
        except BaseException:
            for p in registered:  # WELCOME failed: the session never started
                with self._lock:
                    if self._pending.get(p.params.session_id) is p:
                        del self._pending[p.params.session_id]
                _close_all(list(p.streams))
            raise

    def _join(self, conn: socket.socket, payload: bytes) -> None:
        req = parse_join(payload)
        with self._lock:
            pending = self._pending.get(req.session_id)
            if pending is None:
                raise AuthError("JOIN for an unknown or expired session")
            verify_join(pending.params, req)  # claims the index: a second JOIN for it is refused
            if req.stream_index >= len(pending.streams) or pending.streams[req.stream_index] is not None:
                raise AuthError(f"stream index {req.stream_index} already joined or out of range")
        # JOINED goes out before the stream is added to the session, never after: the last stream to
        # join creates the Session, whose engine takes the sockets over (the Python engine makes them
        # non-blocking). A JOINED still being written by this thread at that moment would end with
        # write_frame restoring the socket's old blocking mode under the engine, whose next recv on
        # it then blocks the whole transfer loop; and a server that sends first could put DATA
        # ahead of JOINED. So this thread is done with the socket before it becomes a member.
        send_joined(conn, req.stream_index)
        with self._lock:
            if self._pending.get(req.session_id) is not pending:
                raise AuthError("session expired while its data stream joined")
            pending.streams[req.stream_index] = conn
            complete = all(s is not None for s in pending.streams)
            if complete:
                del self._pending[req.session_id]
        if complete:
            streams = [s for s in pending.streams if s is not None]
            try:
                session = Session(pending.control, streams, pending.params, self.options, role="server",
                                  peer=pending.peer)
            except BaseException:
                _close_all([pending.control, *streams])
                raise
            if self.on_session is not None:
                self.on_session(session)
            else:
                self._ready.put(session)

    def _expire_pending(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [sid for sid, p in self._pending.items() if p.deadline < now]
            gone = [self._pending.pop(sid) for sid in expired]
        for p in gone:
            log.info("session from %s expired before all %d streams joined", p.peer, len(p.streams))
            try:
                write_frame(p.control, encode_frame(FrameType.ERROR, messages.encode_error(messages.Error(
                    messages.ErrorCode.MALFORMED, "not all data streams joined in time"))))
            except OSError:
                pass
            _close_all([p.control, *p.streams])


def _peek(conn: socket.socket, n: int, wait_s: float) -> bytes:
    """Up to n first bytes of conn without consuming them (b"" if none arrived within wait_s)."""
    conn.settimeout(wait_s)
    got = b""
    deadline = time.monotonic() + wait_s
    try:
        while len(got) < n and time.monotonic() < deadline:
            got = conn.recv(n, socket.MSG_PEEK)
            if not got or got != FRAME_MAGIC_BYTES[:len(got)]:
                break  # EOF, or bytes that already differ from the magic
            if len(got) < n:
                time.sleep(0.001)
    except (socket.timeout, BlockingIOError):
        pass
    finally:
        conn.settimeout(None)
    return got


def _close_all(socks: list[socket.socket | None]) -> None:
    for s in socks:
        if s is not None:
            try:
                s.close()
            except OSError:
                pass


def listen(addr: str | tuple[str, int] = ("127.0.0.1", 0), *, key: bytes | str | None = None,
           key_file: str | os.PathLike[str] | None = None, insecure: bool = False,
           max_streams: int = 256, max_chunk_bytes: int = 64 << 20, timeout_s: float = 30.0,
           handshake_timeout_s: float = 10.0, tls: ssl.SSLContext | None = None, backlog: int = 512,
           features: frozenset[str] | None = None, **extra: Any) -> Listener:
    """Listen for DWCP sessions on addr ('host:port', ':port' for all addresses, or (host, port)).

    The key (bytes/str, key_file, or $DWCP_KEY) must match the clients'; without one, insecure=True
    must be given explicitly. timeout_s applies to transfers of accepted sessions. features: the
    optional features this server offers (default: all this build has, e.g. zstd-segments; an older
    peer's set is what a smaller one emulates)."""
    # An explicit insecure=True ignores $DWCP_KEY, but an explicit key with it is ambiguous
    # (resolve_key refuses it); no key and not insecure is refused before any socket is opened.
    psk = auth.resolve_key(auth.load_key(key=key, key_file=key_file, env=None if insecure else "DWCP_KEY"),
                           insecure)
    options = SessionOptions(timeout_s=timeout_s, tls=tls, **extra)
    host, port = parse_address(addr, default_host="")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host or '*'}:{port}: {e.strerror or e}") from e
    # Over TLS the connection is encrypted already: frames are not sealed a second time.
    sealing = psk is not None and tls is None
    policy = ServerPolicy(max_streams=max_streams, max_chunk_bytes=max_chunk_bytes,
                          checksums=options.checksums + (options.ciphers if sealing else ()),
                          features=frozenset((({"tls"} | ({FEATURE_TLS_BIND} if server_binding(tls) else set()))
                                              if tls else set())
                                             | ({FEATURE_SEGMENTS} if features is None else set(features))),
                          require_cipher=sealing and options.encrypt)
    return Listener(sock, options, key=psk, insecure=insecure, policy=policy,
                    handshake_timeout_s=handshake_timeout_s)
