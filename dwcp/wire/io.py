"""Blocking frame I/O on one socket (plain or TLS): read a validated frame, write a frame.

The reader never trusts a length it has not validated: it reads exactly the 48 header bytes, runs
:func:`dwcp.wire.frames.decode_header` (magic, header CRC, version, reserved, type, flags, length limit)
and only then reads the payload, so a hostile length costs the peer a ProtocolError, not our memory.
The payload checksum is verified before the payload is returned.

Socket errors become DWCP exceptions: EOF or reset → PeerClosedError, deadline → TransferTimeout,
anything else → TransportError carrying the errno.
"""

from __future__ import annotations

import errno as _errno
import socket
import ssl
import time

from dwcp.errors import PeerClosedError, ProtocolError, TransferTimeout, TransportError
from dwcp.wire import frames
from dwcp.wire.frames import EMPTY_TYPES, HEADER_BYTES, Flag, FrameType, Header

_CONTROL_MIN_TYPE = int(FrameType.HELLO)  # types >= this are control/handshake frames

_PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError,
              ssl.SSLZeroReturnError)


class _Deadline:
    """Applies an absolute time.monotonic() deadline to a socket, one blocking call at a time, and
    restores the socket's own timeout afterwards."""

    __slots__ = ("_sock", "_deadline", "_saved")

    def __init__(self, sock: socket.socket, deadline: float | None) -> None:
        self._sock = sock
        self._deadline = deadline
        self._saved = sock.gettimeout() if deadline is not None else None

    def arm(self, what: str) -> None:
        if self._deadline is None:
            return  # the socket's own timeout (if any) applies
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TransferTimeout(f"timed out {what}; is the peer alive and speaking DWCP?",
                                  errno=_errno.ETIMEDOUT)
        self._sock.settimeout(remaining)

    def restore(self) -> None:
        if self._deadline is not None:
            try:
                self._sock.settimeout(self._saved)
            except OSError:
                pass  # socket already closed: nothing to restore


def _os_error(e: OSError, what: str) -> TransportError:
    if isinstance(e, _PEER_GONE):
        return PeerClosedError(f"peer closed the connection {what} ({e})", errno=e.errno or None)
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError since 3.10
        return TransferTimeout(f"timed out {what}; is the peer alive and speaking DWCP?",
                               errno=_errno.ETIMEDOUT)
    return TransportError(f"socket error {what}: {e}", errno=e.errno or None)


def recv_exactly(sock: socket.socket, view: memoryview, dl: _Deadline, what: str) -> None:
    """Fill ``view`` from the socket; PeerClosedError if EOF comes first."""
    got = 0
    need = len(view)
    while got < need:
        dl.arm(what)
        try:
            n = sock.recv_into(view[got:], need - got)
        except OSError as e:
            raise _os_error(e, what) from e
        if n == 0:
            where = "between frames" if got == 0 and what == "reading a frame header" else \
                f"{what} after {got} of {need} bytes"
            raise PeerClosedError(f"peer closed the connection {where}")
        got += n


def _check_frame_rules(h: Header) -> None:
    """Rules beyond decode_header that hold on every connection (docs/protocol.md).

    They are checked here, before the payload is read, because they only need the header."""
    if h.type in EMPTY_TYPES and h.length:
        raise ProtocolError(f"{FrameType(h.type).name} frame carries {h.length} payload bytes; it "
                            "must be empty", code=-7)
    if h.length == 0 and h.checksum:
        raise ProtocolError("empty frame with a non-zero checksum", code=-10)
    if h.type >= _CONTROL_MIN_TYPE:
        # Control frames are checksummed with CRC32C (known before negotiation) and never compressed.
        if h.flags & Flag.COMPRESSED:
            raise ProtocolError(f"{FrameType(h.type).name} frame has the COMPRESSED flag", code=-4)
        if h.length and not h.flags & Flag.CSUM_CRC32C:
            raise ProtocolError(f"{FrameType(h.type).name} frame is not CRC32C-checksummed", code=-4)


def read_frame(sock: socket.socket, *, max_payload: int,
               deadline: float | None = None) -> tuple[Header, bytes]:
    """Read one frame and return (header, payload).

    ``max_payload`` bounds the length field (use ``frames.MAX_CONTROL_BYTES`` on the control
    connection); a larger length is a ProtocolError raised before any payload byte is read.
    ``deadline`` is an absolute ``time.monotonic()`` value; None leaves the socket's own timeout.

    Raises ProtocolError (bad header, rules, payload checksum), PeerClosedError (EOF/reset),
    TransferTimeout (deadline) or TransportError (other socket errors)."""
    dl = _Deadline(sock, deadline)
    try:
        head = bytearray(HEADER_BYTES)
        recv_exactly(sock, memoryview(head), dl, "reading a frame header")
        h = frames.decode_header(head, max_payload)
        _check_frame_rules(h)
        if not h.length:
            return h, b""
        payload = bytearray(h.length)
        recv_exactly(sock, memoryview(payload), dl, f"reading a {h.length}-byte frame payload")
    finally:
        dl.restore()
    data = bytes(payload)
    if h.flags & (Flag.CSUM_CRC32C | Flag.CSUM_XXH3):
        if frames.payload_checksum(h.flags, data) != h.checksum:
            raise ProtocolError("payload checksum mismatch (data corrupted in transit)", code=-10,
                                stream=h.stream)
    elif h.checksum:
        raise ProtocolError("frame has a checksum but no checksum flag", code=-4)
    return h, data


def write_frame(sock: socket.socket, frame_bytes: bytes | bytearray | memoryview, *,
                deadline: float | None = None) -> None:
    """Write a whole encoded frame (``frames.encode_frame``). Same error mapping as read_frame."""
    dl = _Deadline(sock, deadline)
    try:
        dl.arm("writing a frame")
        try:
            sock.sendall(frame_bytes)
        except OSError as e:
            raise _os_error(e, "writing a frame") from e
    finally:
        dl.restore()
