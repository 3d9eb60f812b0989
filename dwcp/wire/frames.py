"""Frame header encode/decode in Python (docs/protocol.md, "Frame header").

The compiled core has its own decoder for the data path; this one serves the control connection, the
pure-Python engine (TLS) and tests, and must accept and reject exactly the same bytes (the fuzz tests
compare the two).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import xxhash

from dwcp.errors import ConfigError, ProtocolError
from dwcp.wire import _crc32c

MAGIC = 0x50435744
VERSION = 1
SUPPORTED_VERSIONS = (1,)
HEADER_BYTES = 48
MAX_CHUNK_BYTES = 64 << 20
MAX_CONTROL_BYTES = 64 << 10
#: Stream index of every frame on the control connection once the handshake is over (data streams
#: use 0..N-1): a frame names the link it travels on (docs/protocol.md "Links").
STREAM_CONTROL = 0xFFFF

_HEADER = struct.Struct("<IBBHHHIQQQ")  # bytes 0..39, then header_crc u32 and reserved1 u32
_TAIL = struct.Struct("<II")


class FrameType(enum.IntEnum):
    DATA = 1
    ACK = 2
    NACK = 3
    DONE = 4
    TRUNCATE = 5
    HELLO = 16
    CHALLENGE = 17
    PROOF = 18
    WELCOME = 19
    JOIN = 20
    JOINED = 21
    XFER_BEGIN = 22
    ABORT = 23
    CLOSE = 24
    ERROR = 25


class Flag(enum.IntFlag):
    CSUM_CRC32C = 1 << 0
    CSUM_XXH3 = 1 << 1
    COMPRESSED = 1 << 2
    #: sealed frame (docs/protocol.md, "Sealed frames"): checksum = frame counter, payload encrypted,
    #: a 16-byte tag after it; never together with a checksum bit
    SEALED = 1 << 3


FLAGS_KNOWN = int(Flag.CSUM_CRC32C | Flag.CSUM_XXH3 | Flag.COMPRESSED | Flag.SEALED)
TAG_BYTES = 16
_CSUM_MASK = int(Flag.CSUM_CRC32C | Flag.CSUM_XXH3)
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)

#: Control frames that may travel on any link after the handshake.
LINK_CONTROL_TYPES = frozenset({FrameType.XFER_BEGIN, FrameType.ABORT, FrameType.CLOSE})

# Frame types that never carry a payload.
EMPTY_TYPES = frozenset({FrameType.ACK, FrameType.NACK, FrameType.DONE, FrameType.TRUNCATE,
                         FrameType.JOINED, FrameType.CLOSE})


@dataclass(frozen=True, slots=True)
class Header:
    type: int
    flags: int = 0
    stream: int = 0
    length: int = 0
    transfer_id: int = 0
    offset: int = 0
    checksum: int = 0
    version: int = VERSION


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    return _crc32c.crc32c(data, crc)


def payload_checksum(flags: int, payload: bytes | bytearray | memoryview) -> int:
    """Checksum of payload by the algorithm that flags names (0 when none)."""
    if flags & Flag.CSUM_XXH3:
        return xxhash.xxh3_64_intdigest(payload)
    if flags & Flag.CSUM_CRC32C:
        return crc32c(payload)
    return 0


def encode_header(h: Header) -> bytes:
    try:
        head = _HEADER.pack(MAGIC, h.version, h.type, h.flags, h.stream, 0, h.length, h.transfer_id,
                            h.offset, h.checksum)
    except struct.error as e:
        # A caller bug (negative or oversized field), not a peer's: say which value, as ConfigError,
        # instead of letting struct.error escape from the wire layer.
        raise ConfigError(f"frame header field out of range in {h!r}: {e}") from None
    return head + _TAIL.pack(crc32c(head), 0)


def encode_frame(type: int, payload: bytes = b"", *, flags: int = Flag.CSUM_CRC32C, stream: int = 0,
                 transfer_id: int = 0, offset: int = 0) -> bytes:
    """A whole frame (header + payload); the checksum is computed from flags."""
    csum = payload_checksum(flags, payload) if payload else 0
    return encode_header(Header(type=type, flags=int(flags), stream=stream, length=len(payload),
                                transfer_id=transfer_id, offset=offset, checksum=csum)) + bytes(payload)


def decode_header(data: bytes | bytearray | memoryview, max_payload: int) -> Header:
    """Validate and decode a 48-byte header; raise ProtocolError naming the first bad field.

    The order of checks matches csrc/frame.c so both decoders report the same error for the same
    bytes: magic, header CRC, version, reserved fields, type, flags, length."""
    if len(data) != HEADER_BYTES:
        raise ProtocolError(f"frame header must be {HEADER_BYTES} bytes, got {len(data)}", code=-7)
    (magic, version, type_, flags, stream, reserved0, length, transfer_id, offset,
     checksum) = _HEADER.unpack_from(data, 0)
    header_crc, reserved1 = _TAIL.unpack_from(data, 40)
    if magic != MAGIC:
        raise ProtocolError("bad magic: the peer is not speaking DWCP (wrong port or protocol?)", code=-1)
    if header_crc != crc32c(memoryview(data)[:40]):
        raise ProtocolError("frame header checksum mismatch (stream corrupted or out of sync)", code=-6)
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(f"unsupported protocol version {version} in frame header; this side "
                            f"speaks {SUPPORTED_VERSIONS}", code=-2)
    if reserved0 or reserved1:
        raise ProtocolError("reserved header field is not zero", code=-5)
    if type_ not in _KNOWN_TYPES:
        raise ProtocolError(f"unknown frame type {type_}", code=-3)
    if (flags & ~FLAGS_KNOWN or (flags & _CSUM_MASK) == _CSUM_MASK
            or (flags & Flag.SEALED and flags & _CSUM_MASK)):
        raise ProtocolError(f"unknown or inconsistent frame flags 0x{flags:04x}", code=-4)
    if length > max_payload:
        raise ProtocolError(f"frame length {length} over the limit {max_payload} for this frame",
                            code=-7)
    return Header(type=type_, flags=flags, stream=stream, length=length, transfer_id=transfer_id,
                  offset=offset, checksum=checksum, version=version)
