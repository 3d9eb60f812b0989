"""The exceptions DWCP raises.

Everything derives from :class:`DWCPError`. Each class says whose fault the failure was, so callers can
decide whether to retry, reconfigure, or report the peer. This module imports nothing from the rest of
the package: every layer, the compiled core included, may raise these.
"""

from __future__ import annotations

import errno as _errno
import os


class DWCPError(Exception):
    """Base class of every error DWCP raises on purpose."""


class ConfigError(DWCPError, ValueError):
    """The caller's configuration or arguments are wrong (your fault: fix the call or the config)."""


class CapabilityError(DWCPError):
    """This host or build lacks something the request needs (BPF, RDMA, a kernel feature).

    Not a bug on either side: choose another mode or run where the capability exists."""


class ProtocolError(DWCPError):
    """The peer sent bytes that break the DWCP protocol (its fault, or a corrupting network).

    The session that received them is no longer trustworthy; nothing from the bad frame was written to
    the caller's buffer."""

    def __init__(self, message: str, *, code: int | None = None, stream: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.stream = stream


class AuthError(DWCPError):
    """Authentication failed: the peer does not hold the same pre-shared key, replayed an old
    handshake, or presented a bad session token. Check that both ends use the same key."""


class TransportError(DWCPError, OSError):
    """Moving bytes failed: connection refused, reset, all streams dead, or no progress in time.

    ``errno`` is set when the kernel gave one. Subclasses tell a connection broken by the peer from one
    closed by you and from a timeout."""

    def __init__(self, message: str, *, errno: int | None = None, stream: int | None = None) -> None:
        OSError.__init__(self, message)
        self.errno = errno
        self.strerror = message
        self.stream = stream

    def __str__(self) -> str:
        return str(self.strerror)


class PeerClosedError(TransportError, ConnectionResetError):
    """The peer closed or reset the connection (or died) while a transfer needed it."""


class SessionClosedError(TransportError):
    """The session was closed by this side; create a new one."""


class TransferAborted(TransportError):
    """The peer gave up the transfer and said so (an ABORT frame): its reason is in the message, and
    ``payload`` holds the frame's raw payload. Not your fault; the session is closed afterwards."""

    def __init__(self, message: str, *, payload: bytes = b"", stream: int | None = None) -> None:
        super().__init__(message, stream=stream)
        self.payload = payload


class TransferTimeout(TransportError, TimeoutError):
    """No byte moved on any stream for the configured timeout; the peer may be hung or the link down."""


class InsufficientBandwidth(DWCPError):
    """The link cannot deliver the bandwidth a request needs (admission and migration checks)."""


class AdmissionDenied(DWCPError):
    """A reservation was refused because admitting it would over-commit the link."""


# Error codes of the compiled core (csrc/include/dwcp/frame.h, enum dwcp_err).
E_MAGIC = -1
E_VERSION = -2
E_TYPE = -3
E_FLAGS = -4
E_RESERVED = -5
E_HEADER_CRC = -6
E_LENGTH = -7
E_RANGE = -8
E_STREAM = -9
E_CHECKSUM = -10
E_SYSCALL = -11
E_TIMEOUT = -12
E_ALL_STREAMS = -13
E_NOMEM = -14
E_INVAL = -15
E_PEER = -16
E_CLOSED = -17
E_PEER_ABORT = -18
E_PEER_CLOSE = -19
E_AUTH = -20

_PROTOCOL_MESSAGES = {
    E_MAGIC: "bad magic: the peer is not speaking DWCP (wrong port or protocol?)",
    E_VERSION: "unsupported protocol version in frame header",
    E_TYPE: "unknown or unexpected frame type",
    E_FLAGS: "unknown or inconsistent frame flags",
    E_RESERVED: "reserved header field is not zero",
    E_HEADER_CRC: "frame header checksum mismatch (stream corrupted or out of sync)",
    E_LENGTH: "frame length over the limit for its type",
    E_RANGE: "frame offset/length outside the transfer or not on a chunk boundary",
    E_STREAM: "frame carries the wrong stream index",
    E_CHECKSUM: "payload checksum mismatch",
    E_PEER: "peer broke the protocol",
    E_AUTH: ("a sealed frame failed authentication or came out of order (tampered with on the path, "
             "or not from this session's peer)"),
}

_PEER_GONE_ERRNOS = {_errno.ECONNRESET, _errno.EPIPE, _errno.ECONNABORTED, _errno.ENOTCONN}


def convert_error(code: int, *, errno: int = 0, stream: int | None = None, context: str = "") -> DWCPError:
    """Turn a negative C error code (plus the errno the kernel gave) into the matching exception.

    ``context`` names the operation ("send", "recv", "decode header") and leads the message."""
    where = f"{context}: " if context else ""
    if code in _PROTOCOL_MESSAGES:
        return ProtocolError(where + _PROTOCOL_MESSAGES[code], code=code, stream=stream)
    if code == E_TIMEOUT:
        return TransferTimeout(
            where + "no progress on any stream within the timeout; is the peer alive and reading?",
            errno=_errno.ETIMEDOUT, stream=stream)
    if code == E_ALL_STREAMS:
        detail = f" (last error: {os.strerror(errno)})" if errno else ""
        return PeerClosedError(
            where + f"every connection of the session died{detail}; the peer closed, crashed or the path "
            "is down",
            errno=errno or None, stream=stream)
    if code == E_CLOSED:
        return SessionClosedError(where + "the session was closed locally", stream=stream)
    if code == E_PEER_ABORT:
        return TransferAborted(where + "the peer aborted the transfer", stream=stream)
    if code == E_PEER_CLOSE:
        return PeerClosedError(where + "the peer closed the session during the transfer", stream=stream)
    if code == E_SYSCALL:
        msg = os.strerror(errno) if errno else "system call failed"
        cls = PeerClosedError if errno in _PEER_GONE_ERRNOS else TransportError
        return cls(where + msg, errno=errno or None, stream=stream)
    if code == E_NOMEM:
        return TransportError(where + "out of memory in the transfer engine", errno=_errno.ENOMEM)
    if code == E_INVAL:
        return ConfigError(where + "invalid argument passed to the transfer engine")
    return DWCPError(where + f"unknown core error {code}")
