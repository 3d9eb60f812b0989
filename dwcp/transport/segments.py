"""Compressed segments: one message sent as a run of SEGMENT transfers, each a piece of it either
compressed (an HDE buffer-mode batch: zstd, verified by its own hash on decode) or stored.

Why a run of transfers and not one: the level is re-decided as the message goes (ratio, link rate and
CPU are measured on what was sent), and the next segment is compressed while the previous one is on
the wire, so compression and the link work at the same time. The receiver puts the pieces back into
one buffer; ``Session.recv()`` returns the whole message, as for any transfer.

Wire (docs/protocol.md "Compressed segments"): XFER_BEGIN kind SEGMENT with ``message_bytes`` (the
whole message's length, in the field BENCH transfers use for wrap_bytes) so that ``peek()`` and
``recv_into()`` know the size before anything is consumed; the transfer's payload is a 40-byte segment
header followed by the body. Every field is checked against the message before a byte is decoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dwcp.errors import ProtocolError

#: Feature name both ends list in the handshake when they can send and receive segments.
FEATURE_SEGMENTS = "zstd-segments"

SEGMENT_MAGIC = 0x47535744          # "DWSG" little-endian
SEGMENT_VERSION = 1
CODEC_STORED = 0                    # the body is the segment's bytes
CODEC_HDE_BUFFER = 1                # the body is one HDE buffer-mode batch (zstd, no base)
FLAG_LAST = 0x01
#: Largest raw segment: bounds the receiver's scratch for one compressed body.
MAX_SEGMENT_BYTES = 256 << 20

_HEADER = struct.Struct("<IBBBbQQQII")   # magic, version, codec, flags, level, message_id, message_len,
HEADER_BYTES = _HEADER.size             # offset, raw_len, reserved
assert HEADER_BYTES == 40


@dataclass(frozen=True)
class SegmentHeader:
    codec: int
    last: bool
    level: int           # zstd level used (0 when stored)
    message_id: int      # the transfer id of the message's first segment
    message_len: int
    offset: int
    raw_len: int

    def pack(self) -> bytes:
        return _HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, self.codec, FLAG_LAST if self.last else 0, self.level,
                            self.message_id, self.message_len, self.offset, self.raw_len, 0)


def parse_header(payload: memoryview | bytes | bytearray) -> SegmentHeader:
    if len(payload) < HEADER_BYTES:
        raise ProtocolError(f"segment of {len(payload)} bytes is shorter than its {HEADER_BYTES}-byte header")
    (magic, version, codec, flags, level, message_id, message_len, offset, raw_len,
     reserved) = _HEADER.unpack_from(payload)
    if magic != SEGMENT_MAGIC:
        raise ProtocolError("segment header has a bad magic: the peer sent something else as a segment")
    if version != SEGMENT_VERSION:
        raise ProtocolError(f"segment format version {version} is not one this side reads ({SEGMENT_VERSION}): "
                            "upgrade the older end")
    if codec not in (CODEC_STORED, CODEC_HDE_BUFFER):
        raise ProtocolError(f"segment codec {codec} is unknown")
    if flags & ~FLAG_LAST or reserved:
        raise ProtocolError("segment header has unknown flags or a non-zero reserved field")
    if raw_len == 0 and message_len != 0:
        raise ProtocolError("empty segment in a non-empty message")
    if raw_len > MAX_SEGMENT_BYTES:
        raise ProtocolError(f"segment of {raw_len} bytes is over the {MAX_SEGMENT_BYTES}-byte limit")
    if offset > message_len or raw_len > message_len - offset:
        raise ProtocolError(f"segment [{offset}, +{raw_len}) lies outside its {message_len}-byte message")
    if bool(flags & FLAG_LAST) != (offset + raw_len == message_len):
        raise ProtocolError("segment's LAST flag disagrees with where it ends in the message")
    if codec == CODEC_STORED and len(payload) - HEADER_BYTES != raw_len:
        raise ProtocolError(f"stored segment carries {len(payload) - HEADER_BYTES} bytes for {raw_len}")
    return SegmentHeader(codec, bool(flags & FLAG_LAST), level, message_id, message_len, offset, raw_len)


class Assembler:
    """Puts one message's segments back together, in order, checking each against the last."""

    def __init__(self, first: SegmentHeader, expected_len: int, message_id: int) -> None:
        if first.offset != 0:
            raise ProtocolError(f"a message's first segment starts at {first.offset}, not 0")
        if first.message_len != expected_len:
            raise ProtocolError(f"segment says the message is {first.message_len} bytes, its announcement "
                                f"{expected_len}")
        if first.message_id != message_id:
            raise ProtocolError("first segment names another message")
        self.message_len = first.message_len
        self.message_id = first.message_id
        self.next_offset = 0
        self.done = False

    def accept(self, h: SegmentHeader) -> None:
        if self.done:
            raise ProtocolError("segment after the message's last one")
        if h.message_id != self.message_id or h.message_len != self.message_len:
            raise ProtocolError("segment of another message in the middle of one")
        if h.offset != self.next_offset:
            raise ProtocolError(f"segment at {h.offset}, expected {self.next_offset}: lost or reordered")
        self.next_offset += h.raw_len
        self.done = h.last
