"""Channels: what integrations send through. A DWCP session when DWCP is enabled and the peer speaks it,
plain TCP otherwise, behind one send/recv API.

DWCP is off by default (``enabled: false``), and a deployment turns it on host by host, so a channel
must work against any peer: ``Manager.open_channel(peer)`` gives

* a :class:`DwcpChannel` (a :class:`~dwcp.transport.session.Session` underneath) when DWCP is enabled,
  the kill switch is off and the handshake succeeds;
* a :class:`PlainChannel` otherwise: one TCP connection carrying length-prefixed messages (8-byte
  big-endian length, then the bytes; docs/protocol.md "Plain channels"), which is what an application
  without DWCP speaks. A peer that does not answer the DWCP handshake like a DWCP server (it closes,
  resets, times out within ``probe_timeout_s`` or answers with bytes that are not DWCP frames) gets a
  plain channel, and is remembered for ``probe_cache_s`` so the next channel does not probe again.

A wrong key is never a reason to fall back: an AuthError is raised, because plain TCP would silently
drop the authentication and encryption the caller asked for. Callers that must not run in the clear at
all pass ``allow_plain=False``.

:class:`ChannelListener` accepts both kinds on one port: a DWCP client's first bytes are the frame
magic, a plain client's are a message length, which can never equal it (the magic read as a length is
over 4 EB).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from dwcp._buffers import byte_view
from dwcp.control.decision import Decision
from dwcp.errors import (AuthError, ConfigError, DWCPError, PeerClosedError, ProtocolError, TransferTimeout,
                         TransportError)

if TYPE_CHECKING:
    from dwcp.control.manager import Manager
    from dwcp.transport.listener import Listener
    from dwcp.transport.session import Session

log = logging.getLogger(__name__)

PLAIN_HEADER = struct.Struct(">Q")
#: Largest message a plain channel accepts by default (a length above it is a protocol error, raised
#: before anything is allocated).
PLAIN_MAX_MESSAGE_BYTES = 1 << 34
#: How long a channel listener waits for a new connection's first bytes before treating it as a plain
#: channel whose peer speaks second (a DWCP client always speaks first).
FIRST_BYTES_WAIT_S = 1.0


class Channel(Protocol):
    """What both channel kinds offer."""

    kind: str                    # "dwcp" or "plain"
    decision: Decision           # why this kind

    def send(self, buffer: Any) -> int: ...
    def recv(self, timeout_s: float | None = None) -> bytearray: ...
    def recv_into(self, buffer: Any, timeout_s: float | None = None) -> int: ...
    def close(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def __enter__(self) -> Channel: ...
    def __exit__(self, *exc: object) -> None: ...


class PlainChannel:
    """Length-prefixed messages over one TCP connection (no DWCP on the wire)."""

    kind = "plain"

    def __init__(self, sock: socket.socket, decision: Decision, *,
                 max_message_bytes: int = PLAIN_MAX_MESSAGE_BYTES) -> None:
        self._sock = sock
        self.decision = decision
        self.max_message_bytes = max_message_bytes
        self.peer = sock.getpeername()[:2]
        self._pending: int | None = None      # length of a message whose header was read
        self._closed = False
        self._counts = {"messages_sent": 0, "messages_received": 0, "bytes_sent": 0, "bytes_received": 0}
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)

    def __enter__(self) -> PlainChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<dwcp PlainChannel peer={self.peer[0]}:{self.peer[1]}{' closed' if self._closed else ''}>"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, buffer: Any) -> int:
        """Send buffer as one message (header and payload in one sendmsg where the kernel takes it)."""
        self._check_open()
        mv = byte_view(buffer, what="send() buffer")
        n = len(mv)
        parts: list[Any] = [PLAIN_HEADER.pack(n), mv]
        try:
            while parts:
                sent = self._sock.sendmsg(parts)
                while parts and sent >= len(parts[0]):
                    sent -= len(parts[0])
                    parts.pop(0)
                if parts and sent:
                    parts[0] = memoryview(parts[0])[sent:]
        except OSError as e:
            raise self._error("sending", e) from e
        finally:
            mv.release()
        self._counts["messages_sent"] += 1
        self._counts["bytes_sent"] += n
        return n

    def _next_length(self, timeout_s: float | None) -> int:
        if self._pending is not None:
            return self._pending
        head = bytearray(PLAIN_HEADER.size)
        self._recv_exactly(memoryview(head), timeout_s, first=True)
        n = int(PLAIN_HEADER.unpack(head)[0])
        if n > self.max_message_bytes:
            self.close()
            raise ProtocolError(f"plain channel from {self.peer[0]}:{self.peer[1]}: message of {n} bytes is over "
                                f"the {self.max_message_bytes}-byte limit; the peer is not speaking this framing")
        self._pending = n
        return n

    def recv(self, timeout_s: float | None = None) -> bytearray:
        """The next message. timeout_s bounds the wait for it to start (TransferTimeout, nothing lost)."""
        self._check_open()
        n = self._next_length(timeout_s)
        out = bytearray(n)
        self._recv_body(memoryview(out))
        return out

    def recv_into(self, buffer: Any, timeout_s: float | None = None) -> int:
        """The next message into buffer; returns its length. A buffer too small raises ConfigError
        and consumes nothing."""
        self._check_open()
        view = byte_view(buffer, writable=True, what="recv_into() buffer")
        try:
            n = self._next_length(timeout_s)
            if n > len(view):
                raise ConfigError(f"incoming message is {n} bytes but the buffer holds {len(view)}; nothing was "
                                  "consumed, call again with a bigger buffer")
            self._recv_body(view[:n])
            return n
        finally:
            view.release()

    def _recv_body(self, view: memoryview) -> None:
        self._recv_exactly(view, None, first=False)
        self._pending = None
        self._counts["messages_received"] += 1
        self._counts["bytes_received"] += len(view)

    def _recv_exactly(self, view: memoryview, timeout_s: float | None, *, first: bool) -> None:
        got = 0
        self._sock.settimeout(timeout_s)
        try:
            while got < len(view):
                try:
                    k = self._sock.recv_into(view[got:])
                except socket.timeout:
                    if first and got == 0:
                        raise TransferTimeout(f"no message arrived within {timeout_s:g} s") from None
                    self.close()
                    raise TransferTimeout("the peer stopped in the middle of a message header") from None
                except OSError as e:
                    raise self._error("receiving", e) from e
                if k == 0:
                    self.close()
                    raise PeerClosedError("the peer closed the plain channel" +
                                          ("" if first and got == 0 else " in the middle of a message"))
                got += k
                if first and got:
                    self._sock.settimeout(None)  # once a header starts, it must finish
        finally:
            if not self._closed:
                self._sock.settimeout(None)

    def _error(self, doing: str, e: OSError) -> DWCPError:
        self.close()
        if isinstance(e, (ConnectionResetError, BrokenPipeError)):
            return PeerClosedError(f"the peer reset the plain channel while {doing}", errno=e.errno)
        return TransportError(f"plain channel failed while {doing}: {e.strerror or e}", errno=e.errno)

    def _check_open(self) -> None:
        if self._closed:
            from dwcp.errors import SessionClosedError
            raise SessionClosedError("the channel is closed; open a new one")

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "peer": f"{self.peer[0]}:{self.peer[1]}", **self._counts,
                "decision": self.decision.to_json()}


class DwcpChannel:
    """A DWCP session behind the channel API."""

    kind = "dwcp"

    def __init__(self, session: Session, decision: Decision) -> None:
        self.session = session
        self.decision = decision
        self.peer = session.peer

    def __enter__(self) -> DwcpChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<dwcp DwcpChannel {self.session!r}>"

    def send(self, buffer: Any) -> int:
        return self.session.send(buffer)

    def recv(self, timeout_s: float | None = None) -> bytearray:
        return self.session.recv(timeout_s)

    def recv_into(self, buffer: Any, timeout_s: float | None = None) -> int:
        return self.session.recv_into(buffer, timeout_s)

    def close(self) -> None:
        self.session.close()

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.session.stats(), "decision": self.decision.to_json()}


class _NotDwcp(Exception):
    """The peer answered the handshake in a way no DWCP server would."""


_not_dwcp_until: dict[tuple[str, int], tuple[float, str]] = {}
_cache_lock = threading.Lock()


def open_channel(manager: Manager, address: str | tuple[str, int], *, allow_plain: bool = True,
                 probe_timeout_s: float = 3.0, probe_cache_s: float = 60.0, connect_timeout_s: float = 10.0,
                 **connect_kwargs: Any) -> Channel:
    from dwcp.control.manager import peer_key
    from dwcp.transport.options import parse_address
    target = parse_address(address)
    if not target[0]:
        raise ConfigError(f"open_channel() needs a host in the address, got {address!r}")
    peer = peer_key(target[0])
    plan = manager.plan(peer)
    now = manager.clock()

    def decided(kind: str, reason: str, **inputs: Any) -> Decision:
        d = Decision("channel", kind, reason, peer=peer, at_s=now, inputs={"address": f"{target[0]}:{target[1]}",
                                                                           **inputs})
        manager.note_channel(peer, d)
        return d

    def plain(reason: str, **inputs: Any) -> PlainChannel:
        if not allow_plain:
            raise TransportError(f"{target[0]}:{target[1]}: {reason}, and allow_plain=False forbids a plain TCP "
                                 "channel")
        sock = _plain_connect(target, connect_timeout_s)
        return PlainChannel(sock, decided("plain", reason, **inputs))

    if plan.mode.value == "plain":
        return plain(plan.decisions["mode"].reason, mode=plan.mode.value)
    with _cache_lock:
        cached = _not_dwcp_until.get(target)
    if cached is not None and cached[0] > now:
        return plain(f"the peer did not speak DWCP {now - (cached[0] - probe_cache_s):.0f} s ago ({cached[1]}); "
                     f"probing again after {probe_cache_s:g} s", cached=True)
    import dwcp
    kwargs = dict(connect_kwargs)
    kwargs.setdefault("streams", plan.streams)
    try:
        session = _probe_connect(dwcp.connect, target, probe_timeout_s, connect_timeout_s, kwargs)
    except _NotDwcp as e:
        with _cache_lock:
            _not_dwcp_until[target] = (now + probe_cache_s, str(e))
        return plain(f"the peer does not speak DWCP ({e}): plain TCP", probe=str(e))
    with _cache_lock:
        _not_dwcp_until.pop(target, None)
    reason = (f"DWCP session: {plan.decisions['mode'].reason}; {session.params.streams} streams "
              f"({plan.decisions['streams'].reason})")
    return DwcpChannel(session, decided("dwcp", reason, streams=session.params.streams,
                                        features=sorted(session.params.features)))


def _probe_connect(connect: Callable[..., Session], target: tuple[str, int], probe_timeout_s: float,
                   connect_timeout_s: float, kwargs: dict[str, Any]) -> Session:
    """dwcp.connect(), classifying failures: a server that is not DWCP raises _NotDwcp; a DWCP server
    that refuses us (AuthError, ConfigError) or a host that refuses connections raises as is."""
    # The handshake is bounded by probe_timeout_s: a plain server waits for the rest of what it takes
    # for a huge message, so only a timeout tells it apart.
    timeout = min(connect_timeout_s, probe_timeout_s)
    try:
        return connect(target, connect_timeout_s=timeout, **kwargs)
    except AuthError:
        raise  # a DWCP server that refused our key: never fall back to unauthenticated plain TCP
    except ProtocolError as e:
        raise _NotDwcp(f"it answered with bytes that are not DWCP frames: {e}") from e
    except PeerClosedError as e:
        raise _NotDwcp(f"it closed the connection during the handshake: {e}") from e
    except TransferTimeout as e:
        if _reachable(target, timeout):
            raise _NotDwcp(f"no DWCP answer within {timeout:g} s") from e
        raise
    except TransportError as e:
        if e.errno is not None and e.errno in (104, 32):  # ECONNRESET, EPIPE during the handshake
            raise _NotDwcp(f"it reset the connection during the handshake: {e}") from e
        raise


def _reachable(target: tuple[str, int], timeout_s: float) -> bool:
    try:
        socket.create_connection(target, timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _plain_connect(target: tuple[str, int], timeout_s: float) -> socket.socket:
    try:
        s = socket.create_connection(target, timeout=timeout_s)
    except socket.timeout as e:
        raise TransferTimeout(f"connecting to {target[0]}:{target[1]} timed out after {timeout_s:g} s") from e
    except OSError as e:
        raise TransportError(f"cannot connect to {target[0]}:{target[1]}: {e.strerror or e}", errno=e.errno) from e
    s.settimeout(None)
    return s


class ChannelListener:
    """Accepts DWCP sessions and plain channels on one address (see the module doc). With DWCP
    disabled (or the kill switch engaged) DWCP clients are still served: a receiver never refuses a
    peer that already turned DWCP on."""

    def __init__(self, manager: Manager, address: str | tuple[str, int], **listen_kwargs: Any) -> None:
        import queue

        import dwcp
        self.manager = manager
        self._ready: queue.Queue[Channel] = queue.Queue()
        self._listener: Listener = dwcp.listen(address, **listen_kwargs)
        self._listener.on_session = self._on_session
        self._listener.on_foreign = self._on_foreign
        self._listener.first_bytes_wait_s = FIRST_BYTES_WAIT_S

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.address

    def __enter__(self) -> ChannelListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._listener.close()
        while not self._ready.empty():
            self._ready.get_nowait().close()

    def accept(self, timeout_s: float | None = None) -> Channel:
        import queue
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                raise TransferTimeout(f"no channel was opened within {timeout_s:g} s")
            try:
                return self._ready.get(timeout=wait)
            except queue.Empty:
                if self._listener.closed:
                    raise ConfigError("accept() on a closed channel listener") from None

    def _decision(self, peer: tuple[str, int], kind: str, reason: str) -> Decision:
        d = Decision("channel", kind, reason, peer=peer[0], at_s=self.manager.clock(),
                     inputs={"address": f"{peer[0]}:{peer[1]}", "side": "server"})
        self.manager.note_channel(peer[0], d)
        return d

    def _on_session(self, session: Session) -> None:
        self._ready.put(DwcpChannel(session, self._decision(session.peer, "dwcp", "the client opened a DWCP session")))

    def _on_foreign(self, conn: socket.socket, peer: tuple[str, int], first: bytes) -> None:
        why = ("the client's first bytes are not a DWCP frame" if first else
               f"the client sent nothing within {FIRST_BYTES_WAIT_S:g} s (a DWCP client speaks first)")
        self._ready.put(PlainChannel(conn, self._decision(peer, "plain", f"{why}: plain channel")))

