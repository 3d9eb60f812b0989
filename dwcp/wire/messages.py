"""Payloads of the control frames: dataclasses and their strict binary encode/decode.

Layouts are normative in docs/protocol.md ("Handshake", "Stream join", "Control messages"). Every
payload starts with a one-byte *message format version* (``MSG_VERSION``) so a message can evolve
without a new frame type; a version this side does not know is a ProtocolError.

Decoders treat their input as hostile: every length is bounded before it is used, every enum value
checked, text decoded as strict UTF-8, and trailing bytes rejected. The only exception a decoder
raises is :class:`~dwcp.errors.ProtocolError` (the fuzz tests hold us to that). Encoders validate the
caller's values and raise :class:`~dwcp.errors.ConfigError` for values the wire cannot carry, so a bad
argument is reported here instead of as a peer's protocol error.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

from dwcp.errors import ConfigError, ProtocolError
from dwcp.wire import frames
from dwcp.wire.frames import FrameType

MSG_VERSION = 1
NONCE_BYTES = 32
MAC_BYTES = 32
SESSION_ID_BYTES = 16

MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = frames.MAX_CHUNK_BYTES
MAX_STREAMS = 256
MAX_VERSIONS = 16
MAX_CHECKSUMS = 8
MAX_FEATURES = 32
MAX_NAME_BYTES = 32          # a checksum or feature name
MAX_PATH_BYTES = 4096        # XFER_BEGIN name
MAX_REASON_BYTES = 4096      # ABORT / ERROR text
MAX_FILE_MODE = 0o7777

# Names are short ASCII tokens so they can never smuggle control characters into logs.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")

HELLO_FLAG_INSECURE = 0x01      # the client has no pre-shared key
CHALLENGE_FLAG_INSECURE = 0x01  # the server has no pre-shared key
XFER_FLAG_HAS_MODE = 0x01


class XferKind(enum.IntEnum):
    """What an XFER_BEGIN announces."""
    BUFFER = 0
    FILE = 1
    BENCH = 2
    SEGMENT = 3   # one piece of a compressed message (dwcp/transport/segments.py); wrap_bytes = message length


class ErrorCode(enum.IntEnum):
    """Why the server refused a handshake (ERROR payload); lets the client raise the right class."""
    AUTH_FAILED = 1        # a MAC did not verify (wrong key or replay); deliberately unspecific
    INSECURE_MISMATCH = 2  # exactly one side has a pre-shared key
    NO_COMMON_VERSION = 3
    NEGOTIATION = 4        # no common checksum or invalid offer
    MALFORMED = 5          # the peer's frame could not be decoded or was unexpected


# --------------------------------------------------------------------------------------------------
# Primitive reader / writer


class _Reader:
    """Bounds-checked cursor over a payload; every failure is a ProtocolError naming the message."""

    __slots__ = ("_buf", "_pos", "_what")

    def __init__(self, data: bytes | bytearray | memoryview, what: str) -> None:
        self._buf = bytes(data)
        self._pos = 0
        self._what = what

    def fail(self, why: str) -> ProtocolError:
        return ProtocolError(f"malformed {self._what} payload: {why}", code=-16)

    def take(self, n: int, field_name: str) -> bytes:
        if n < 0 or self._pos + n > len(self._buf):
            raise self.fail(f"truncated at {field_name} (need {n} bytes at offset {self._pos}, "
                            f"payload has {len(self._buf)})")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _unpack(self, fmt: struct.Struct, field_name: str) -> int:
        value: int = fmt.unpack(self.take(fmt.size, field_name))[0]
        return value

    def u8(self, field_name: str) -> int:
        return self._unpack(_U8, field_name)

    def u16(self, field_name: str) -> int:
        return self._unpack(_U16, field_name)

    def u32(self, field_name: str) -> int:
        return self._unpack(_U32, field_name)

    def u64(self, field_name: str) -> int:
        return self._unpack(_U64, field_name)

    def version(self) -> None:
        v = self.u8("format version")
        if v != MSG_VERSION:
            raise ProtocolError(f"unsupported {self._what} format version {v} (this side understands "
                                f"{MSG_VERSION}); upgrade the older end", code=-2)

    def text(self, n: int, field_name: str) -> str:
        raw = self.take(n, field_name)
        try:
            s = raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            raise self.fail(f"{field_name} is not valid UTF-8 ({e.reason})") from None
        if "\x00" in s:
            raise self.fail(f"{field_name} contains a NUL character")
        return s

    def name(self, field_name: str) -> str:
        n = self.u8(f"{field_name} length")
        if not 1 <= n <= MAX_NAME_BYTES:
            raise self.fail(f"{field_name} length {n} outside 1..{MAX_NAME_BYTES}")
        raw = self.take(n, field_name)
        s = raw.decode("latin-1")  # never fails; the regex below admits ASCII only
        if not _NAME_RE.fullmatch(s):
            raise self.fail(f"{field_name} {raw!r} is not a lowercase ASCII token")
        return s

    def names(self, field_name: str, lo: int, hi: int) -> tuple[str, ...]:
        count = self.u8(f"{field_name} count")
        if not lo <= count <= hi:
            raise self.fail(f"{field_name} count {count} outside {lo}..{hi}")
        out = tuple(self.name(field_name) for _ in range(count))
        if len(set(out)) != len(out):
            raise self.fail(f"duplicate entry in {field_name}")
        return out

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise self.fail(f"{len(self._buf) - self._pos} unexpected trailing bytes")


_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _check_name(name: str, what: str) -> bytes:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{what} {name!r} must be a lowercase ASCII token of 1..{MAX_NAME_BYTES} "
                          "characters ([a-z0-9_.-])")
    return name.encode("ascii")


def _put_names(out: bytearray, names: tuple[str, ...] | frozenset[str], what: str, lo: int,
               hi: int) -> None:
    items = sorted(names) if isinstance(names, frozenset) else list(names)
    if not lo <= len(items) <= hi:
        raise ConfigError(f"{what}: {len(items)} entries, must be {lo}..{hi}")
    if len(set(items)) != len(items):
        raise ConfigError(f"{what}: duplicate entries in {items}")
    out += _U8.pack(len(items))
    for n in items:
        raw = _check_name(n, what)
        out += _U8.pack(len(raw)) + raw


def _check_range(value: int, lo: int, hi: int, what: str) -> None:
    if not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{what} = {value!r} is outside {lo}..{hi}")


def _check_bytes(value: bytes, n: int, what: str) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != n:
        raise ConfigError(f"{what} must be {n} bytes")


def _truncate_utf8(text: str, limit: int) -> bytes:
    """Encode text, cutting it at a character boundary so it fits ``limit`` bytes (reasons are for
    humans; a shortened reason beats a failed error report)."""
    raw = text.replace("\x00", "\ufffd").encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", errors="ignore").encode("utf-8")


# --------------------------------------------------------------------------------------------------
# Handshake messages


@dataclass(frozen=True)
class Hello:
    """Client → server: the client nonce and its offer."""
    nonce: bytes
    insecure: bool
    versions: tuple[int, ...]
    streams: int
    chunk_bytes: int
    checksums: tuple[str, ...]
    features: frozenset[str] = frozenset()


def encode_hello(m: Hello) -> bytes:
    _check_bytes(m.nonce, NONCE_BYTES, "HELLO nonce")
    if not 1 <= len(m.versions) <= MAX_VERSIONS or len(set(m.versions)) != len(m.versions):
        raise ConfigError(f"versions {m.versions!r}: need 1..{MAX_VERSIONS} distinct entries")
    for v in m.versions:
        _check_range(v, 1, 255, "protocol version")
    _check_range(m.streams, 1, MAX_STREAMS, "streams")
    _check_range(m.chunk_bytes, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES, "chunk_bytes")
    out = bytearray()
    out += _U8.pack(MSG_VERSION) + _U8.pack(HELLO_FLAG_INSECURE if m.insecure else 0) + m.nonce
    out += _U8.pack(len(m.versions)) + bytes(m.versions)
    out += _U16.pack(m.streams) + _U32.pack(m.chunk_bytes)
    _put_names(out, m.checksums, "checksums", 1, MAX_CHECKSUMS)
    _put_names(out, m.features, "features", 0, MAX_FEATURES)
    return bytes(out)


def decode_hello(payload: bytes | bytearray | memoryview) -> Hello:
    r = _Reader(payload, "HELLO")
    r.version()
    flags = r.u8("flags")
    if flags & ~HELLO_FLAG_INSECURE:
        raise r.fail(f"unknown flag bits 0x{flags:02x}")
    nonce = r.take(NONCE_BYTES, "nonce")
    nv = r.u8("version count")
    if not 1 <= nv <= MAX_VERSIONS:
        raise r.fail(f"version count {nv} outside 1..{MAX_VERSIONS}")
    versions = tuple(r.take(nv, "versions"))
    if 0 in versions or len(set(versions)) != nv:
        raise r.fail(f"versions {versions} must be distinct and non-zero")
    streams = r.u16("streams")
    if not 1 <= streams <= MAX_STREAMS:
        raise r.fail(f"streams {streams} outside 1..{MAX_STREAMS}")
    chunk = r.u32("chunk_bytes")
    if not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
        raise r.fail(f"chunk_bytes {chunk} outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    checksums = r.names("checksums", 1, MAX_CHECKSUMS)
    features = r.names("features", 0, MAX_FEATURES)
    r.end()
    return Hello(nonce=nonce, insecure=bool(flags & HELLO_FLAG_INSECURE), versions=versions,
                 streams=streams, chunk_bytes=chunk, checksums=checksums,
                 features=frozenset(features))


@dataclass(frozen=True)
class Challenge:
    """Server → client: the server nonce, the parameters it chose, and its MAC over the transcript.

    ``mac`` is all zeros when the server is insecure."""
    nonce: bytes
    insecure: bool
    version: int
    streams: int
    chunk_bytes: int
    checksum: str
    features: frozenset[str]
    mac: bytes = bytes(MAC_BYTES)


def encode_challenge_body(m: Challenge) -> bytes:
    """The CHALLENGE payload without its trailing MAC: exactly the bytes the transcript covers."""
    _check_bytes(m.nonce, NONCE_BYTES, "CHALLENGE nonce")
    _check_range(m.version, 1, 255, "protocol version")
    _check_range(m.streams, 1, MAX_STREAMS, "streams")
    _check_range(m.chunk_bytes, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES, "chunk_bytes")
    out = bytearray()
    out += _U8.pack(MSG_VERSION) + _U8.pack(CHALLENGE_FLAG_INSECURE if m.insecure else 0) + m.nonce
    out += _U8.pack(m.version) + _U16.pack(m.streams) + _U32.pack(m.chunk_bytes)
    raw = _check_name(m.checksum, "checksum")
    out += _U8.pack(len(raw)) + raw
    _put_names(out, m.features, "features", 0, MAX_FEATURES)
    return bytes(out)


def encode_challenge(m: Challenge) -> bytes:
    _check_bytes(m.mac, MAC_BYTES, "CHALLENGE mac")
    return encode_challenge_body(m) + bytes(m.mac)


def decode_challenge(payload: bytes | bytearray | memoryview) -> tuple[Challenge, bytes]:
    """Decode a CHALLENGE; returns the message and the body bytes (payload minus MAC) that the
    transcript hash covers."""
    r = _Reader(payload, "CHALLENGE")
    r.version()
    flags = r.u8("flags")
    if flags & ~CHALLENGE_FLAG_INSECURE:
        raise r.fail(f"unknown flag bits 0x{flags:02x}")
    nonce = r.take(NONCE_BYTES, "nonce")
    version = r.u8("version")
    if version == 0:
        raise r.fail("version 0")
    streams = r.u16("streams")
    if not 1 <= streams <= MAX_STREAMS:
        raise r.fail(f"streams {streams} outside 1..{MAX_STREAMS}")
    chunk = r.u32("chunk_bytes")
    if not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
        raise r.fail(f"chunk_bytes {chunk} outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    checksum = r.name("checksum")
    features = r.names("features", 0, MAX_FEATURES)
    body_len = r._pos
    mac = r.take(MAC_BYTES, "mac")
    r.end()
    insecure = bool(flags & CHALLENGE_FLAG_INSECURE)
    if insecure and mac != bytes(MAC_BYTES):
        raise r.fail("insecure CHALLENGE carries a non-zero mac")
    msg = Challenge(nonce=nonce, insecure=insecure, version=version, streams=streams,
                    chunk_bytes=chunk, checksum=checksum, features=frozenset(features), mac=mac)
    return msg, bytes(payload)[:body_len]


@dataclass(frozen=True)
class Proof:
    """Client → server: the client's MAC over the transcript (zeros when insecure)."""
    mac: bytes


def encode_proof(m: Proof) -> bytes:
    _check_bytes(m.mac, MAC_BYTES, "PROOF mac")
    return _U8.pack(MSG_VERSION) + bytes(m.mac)


def decode_proof(payload: bytes | bytearray | memoryview) -> Proof:
    r = _Reader(payload, "PROOF")
    r.version()
    mac = r.take(MAC_BYTES, "mac")
    r.end()
    return Proof(mac=mac)


@dataclass(frozen=True)
class Welcome:
    """Server → client: the session id and a MAC under the session key (key confirmation)."""
    session_id: bytes
    mac: bytes


def encode_welcome(m: Welcome) -> bytes:
    _check_bytes(m.session_id, SESSION_ID_BYTES, "session id")
    _check_bytes(m.mac, MAC_BYTES, "WELCOME mac")
    return _U8.pack(MSG_VERSION) + bytes(m.session_id) + bytes(m.mac)


def decode_welcome(payload: bytes | bytearray | memoryview) -> Welcome:
    r = _Reader(payload, "WELCOME")
    r.version()
    sid = r.take(SESSION_ID_BYTES, "session id")
    mac = r.take(MAC_BYTES, "mac")
    r.end()
    return Welcome(session_id=sid, mac=mac)


@dataclass(frozen=True)
class JoinRequest:
    """First frame of a data stream: which session and slot it claims, and the proof."""
    session_id: bytes
    stream_index: int
    mac: bytes


def encode_join(m: JoinRequest) -> bytes:
    _check_bytes(m.session_id, SESSION_ID_BYTES, "session id")
    _check_range(m.stream_index, 0, MAX_STREAMS - 1, "stream_index")
    _check_bytes(m.mac, MAC_BYTES, "JOIN mac")
    return (_U8.pack(MSG_VERSION) + bytes(m.session_id) + _U16.pack(m.stream_index)
            + bytes(m.mac))


def decode_join(payload: bytes | bytearray | memoryview) -> JoinRequest:
    r = _Reader(payload, "JOIN")
    r.version()
    sid = r.take(SESSION_ID_BYTES, "session id")
    index = r.u16("stream index")
    if index >= MAX_STREAMS:
        raise r.fail(f"stream index {index} outside 0..{MAX_STREAMS - 1}")
    mac = r.take(MAC_BYTES, "mac")
    r.end()
    return JoinRequest(session_id=sid, stream_index=index, mac=mac)


# --------------------------------------------------------------------------------------------------
# Control messages (after the handshake)

_XFER_FIXED = struct.Struct("<BBBBHHIIQQQ")  # 40 bytes; see docs/protocol.md "XFER_BEGIN"
# Only non-checksum flags may be forced onto data frames: the checksum is negotiated per session.
_XFER_FRAME_FLAGS = int(frames.Flag.COMPRESSED)


@dataclass(frozen=True)
class XferBegin:
    """Sender → receiver on the control connection, before the first chunk of a transfer."""
    transfer_id: int
    length: int
    chunk_bytes: int
    kind: XferKind = XferKind.BUFFER
    wrap_bytes: int = 0
    frame_flags: int = 0
    name: str = ""
    mode: int | None = None

    @property
    def compressed(self) -> bool:
        """The payload is HDE output (dwcp.compression): decode it after receiving."""
        return bool(self.frame_flags & frames.Flag.COMPRESSED)

    @property
    def message_length(self) -> int:
        """What recv() will return: the whole message for a SEGMENT (the session reassembles it; its
        length travels in wrap_bytes), else the transfer's length."""
        return self.wrap_bytes if self.kind == XferKind.SEGMENT else self.length


_XFER_KINDS = tuple(XferKind)          # indexed by value (0, 1, 2, 3)
_XFER_KIND_VALUES = frozenset(k.value for k in XferKind)
assert all(k.value == i for i, k in enumerate(_XFER_KINDS))


def encode_xfer_begin(m: XferBegin) -> bytes:
    _check_range(m.transfer_id, 0, (1 << 64) - 1, "transfer_id")
    _check_range(m.length, 0, (1 << 64) - 1, "length")
    _check_range(m.chunk_bytes, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES, "chunk_bytes")
    if m.kind not in _XFER_KINDS:
        raise ConfigError(f"kind {m.kind!r} is not one of {[k.name for k in XferKind]}")
    _check_range(m.wrap_bytes, 0, (1 << 64) - 1, "wrap_bytes")
    if m.wrap_bytes and m.kind not in (XferKind.BENCH, XferKind.SEGMENT):
        raise ConfigError("wrap_bytes must be 0 unless kind is BENCH (the wrap) or SEGMENT (the message length)")
    if not isinstance(m.frame_flags, int) or m.frame_flags & ~_XFER_FRAME_FLAGS:
        raise ConfigError(f"frame_flags 0x{m.frame_flags:x}: only COMPRESSED may be set per transfer")
    if not isinstance(m.name, str) or "\x00" in m.name:
        raise ConfigError("name must be a str without NUL characters")
    try:
        name = m.name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"name is not encodable as UTF-8: {e.reason}") from None
    if len(name) > MAX_PATH_BYTES:
        raise ConfigError(f"name is {len(name)} bytes in UTF-8, the limit is {MAX_PATH_BYTES}")
    opt = 0
    mode = 0
    if m.mode is not None:
        if m.kind != XferKind.FILE:
            raise ConfigError("mode is only meaningful for kind FILE")
        _check_range(m.mode, 0, MAX_FILE_MODE, "mode")
        opt |= XFER_FLAG_HAS_MODE
        mode = m.mode
    return _XFER_FIXED.pack(MSG_VERSION, int(m.kind), opt, 0, m.frame_flags, len(name),
                            m.chunk_bytes, mode, m.transfer_id, m.length, m.wrap_bytes) + name


def decode_xfer_begin(payload: bytes | bytearray | memoryview) -> XferBegin:
    r = _Reader(payload, "XFER_BEGIN")
    if len(payload) < _XFER_FIXED.size:
        # Short payloads take the field-by-field path, whose error names the missing field.
        r.version()
        for field, read in (("kind", r.u8), ("options", r.u8), ("reserved", r.u8), ("frame_flags", r.u16),
                            ("name length", r.u16), ("chunk_bytes", r.u32), ("mode", r.u32),
                            ("transfer_id", r.u64), ("length", r.u64), ("wrap_bytes", r.u64)):
            read(field)
    # Every announcement is parsed on the receive path of a small transfer: one unpack of the fixed
    # part instead of a call per field.
    (version, kind, opt, reserved, frame_flags, name_len, chunk, mode, transfer_id, length,
     wrap) = _XFER_FIXED.unpack_from(r.take(_XFER_FIXED.size, "fixed fields"))
    if version != MSG_VERSION:
        raise ProtocolError(f"unsupported XFER_BEGIN format version {version} (this side understands "
                            f"{MSG_VERSION}); upgrade the older end", code=-2)
    if kind not in _XFER_KIND_VALUES:
        raise r.fail(f"unknown transfer kind {kind}")
    if opt & ~XFER_FLAG_HAS_MODE:
        raise r.fail(f"unknown option bits 0x{opt:02x}")
    if reserved:
        raise r.fail("reserved byte is not zero")
    if frame_flags & ~_XFER_FRAME_FLAGS:
        raise r.fail(f"frame_flags 0x{frame_flags:04x}: only COMPRESSED may be set per transfer")
    if name_len > MAX_PATH_BYTES:
        raise r.fail(f"name length {name_len} over the limit {MAX_PATH_BYTES}")
    if not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
        raise r.fail(f"chunk_bytes {chunk} outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    if wrap and kind not in (XferKind.BENCH, XferKind.SEGMENT):
        raise r.fail("wrap_bytes is non-zero for a transfer that is neither a benchmark nor a segment")
    has_mode = bool(opt & XFER_FLAG_HAS_MODE)
    if has_mode and kind != XferKind.FILE:
        raise r.fail("file mode given for a transfer that is not a file")
    if mode > MAX_FILE_MODE or (mode and not has_mode):
        raise r.fail(f"file mode 0o{mode:o} invalid (max 0o{MAX_FILE_MODE:o}, only with the flag)")
    name = r.text(name_len, "name")
    r.end()
    return XferBegin(transfer_id=transfer_id, length=length, chunk_bytes=chunk, kind=_XFER_KINDS[kind],
                     wrap_bytes=wrap, frame_flags=frame_flags, name=name,
                     mode=mode if has_mode else None)


@dataclass(frozen=True)
class Abort:
    """Either side: the current transfer is abandoned, with a human-readable reason."""
    reason: str = ""


def encode_abort(m: Abort) -> bytes:
    raw = _truncate_utf8(m.reason, MAX_REASON_BYTES)
    return _U8.pack(MSG_VERSION) + _U16.pack(len(raw)) + raw


def decode_abort(payload: bytes | bytearray | memoryview) -> Abort:
    r = _Reader(payload, "ABORT")
    r.version()
    n = r.u16("reason length")
    if n > MAX_REASON_BYTES:
        raise r.fail(f"reason length {n} over the limit {MAX_REASON_BYTES}")
    reason = r.text(n, "reason")
    r.end()
    return Abort(reason=reason)


@dataclass(frozen=True)
class Error:
    """Server → client: the handshake (or join) was refused; the connection closes after it."""
    code: ErrorCode
    reason: str = ""


def encode_error(m: Error) -> bytes:
    if m.code not in tuple(ErrorCode):
        raise ConfigError(f"unknown error code {m.code!r}")
    raw = _truncate_utf8(m.reason, MAX_REASON_BYTES)
    return _U8.pack(MSG_VERSION) + _U8.pack(int(m.code)) + _U16.pack(len(raw)) + raw


def decode_error(payload: bytes | bytearray | memoryview) -> Error:
    r = _Reader(payload, "ERROR")
    r.version()
    code = r.u8("code")
    if code not in {c.value for c in ErrorCode}:
        raise r.fail(f"unknown error code {code}")
    n = r.u16("reason length")
    if n > MAX_REASON_BYTES:
        raise r.fail(f"reason length {n} over the limit {MAX_REASON_BYTES}")
    reason = r.text(n, "reason")
    r.end()
    return Error(code=ErrorCode(code), reason=reason)


@dataclass(frozen=True)
class Close:
    """Either side: orderly end of the session (empty payload)."""


ControlMessage = XferBegin | Abort | Error | Close


def encode_control(m: ControlMessage) -> bytes:
    """A whole control frame (header + payload, CRC32C) carrying ``m``."""
    if isinstance(m, XferBegin):
        return frames.encode_frame(FrameType.XFER_BEGIN, encode_xfer_begin(m))
    if isinstance(m, Abort):
        return frames.encode_frame(FrameType.ABORT, encode_abort(m))
    if isinstance(m, Error):
        return frames.encode_frame(FrameType.ERROR, encode_error(m))
    if isinstance(m, Close):
        return frames.encode_frame(FrameType.CLOSE)
    raise ConfigError(f"not a control message: {m!r}")


def decode_control(header: frames.Header, payload: bytes | bytearray | memoryview) -> ControlMessage:
    """Decode a post-handshake control frame; any other frame type is a ProtocolError."""
    t = header.type
    if t == FrameType.XFER_BEGIN:
        return decode_xfer_begin(payload)
    if t == FrameType.ABORT:
        return decode_abort(payload)
    if t == FrameType.ERROR:
        return decode_error(payload)
    if t == FrameType.CLOSE:
        if len(payload):
            raise ProtocolError("malformed CLOSE payload: must be empty", code=-16)
        return Close()
    name = FrameType(t).name if t in FrameType._value2member_map_ else str(t)
    raise ProtocolError(f"unexpected {name} frame on the control connection after the handshake",
                        code=-3)
