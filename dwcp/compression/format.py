"""The HDE container: a 40-byte file header, then batch frames (layout in docs/hde.md).

The batch frames themselves are built and checked by the C core (csrc/hde.c); this module owns the
header that says what the frames describe (mode, page size, lengths) and the walk over the frames, which
checks that they tile the image exactly once, in order, with nothing after the last one.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from dwcp import _core
from dwcp.errors import ProtocolError

MAGIC = b"DWHD"
#: Format 2 (page mode) adds moved pages: classes COPY and PATCH_FROM, a refs section in the batch body
#: and batch flags. Format 1 deltas still decode; a newer format is refused with a clear error.
VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_BYTES = 40
BATCH_HEADER_BYTES = _core.HDE_BATCH_HEADER_BYTES
_HEADER = struct.Struct("<4sBBHIIQQI")  # ... then u32 crc32c of bytes 0..35
FLAG_HAS_BASE = 1 << 0


class Mode(enum.IntEnum):
    PAGE = 1
    BUFFER = 2


class PageClass(enum.IntEnum):
    UNCHANGED = _core.HDE_UNCHANGED
    ZERO = _core.HDE_ZERO
    PATCH = _core.HDE_PATCH
    RAW = _core.HDE_RAW
    COPY = _core.HDE_COPY
    PATCH_FROM = _core.HDE_PATCH_FROM


class Codec(enum.IntEnum):
    STORED = _core.HDE_STORED
    ZSTD = _core.HDE_ZSTD
    ZSTD_BASE = _core.HDE_ZSTD_BASE


@dataclass(frozen=True)
class DeltaHeader:
    mode: Mode
    new_length: int
    base_length: int          # bytes of the base the delta was made against (0: made without a base)
    page_size: int = 0        # page mode only
    batch_pages: int = 0      # page mode: pages per batch (the last batch may have fewer)
    version: int = VERSION

    @property
    def has_base(self) -> bool:
        return self.base_length > 0

    @property
    def pages(self) -> int:
        return -(-self.new_length // self.page_size) if self.page_size else 0

    @property
    def batches(self) -> int:
        if self.mode is Mode.BUFFER:
            return 1
        return -(-self.pages // self.batch_pages) if self.pages else 0

    def pack(self) -> bytes:
        flags = FLAG_HAS_BASE if self.base_length else 0
        head = _HEADER.pack(MAGIC, self.version, int(self.mode), flags, self.page_size, self.batch_pages,
                            self.new_length, self.base_length, 0)
        return head + struct.pack("<I", _core.crc32c(head))


def parse_header(data: bytes | memoryview) -> DeltaHeader:
    """Validate and decode the file header at the start of data."""
    if len(data) < HEADER_BYTES:
        raise ProtocolError(f"HDE delta too short: {len(data)} bytes, the header alone is {HEADER_BYTES}; "
                            "the file is truncated or not an HDE delta")
    head = bytes(data[:HEADER_BYTES - 4])
    magic, version, mode, flags, page_size, batch_pages, new_len, base_len, reserved = _HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"not an HDE delta: magic {magic!r}, expected {MAGIC!r}")
    (crc,) = struct.unpack_from("<I", bytes(data[HEADER_BYTES - 4:HEADER_BYTES]))
    if crc != _core.crc32c(head):
        raise ProtocolError("HDE delta header fails its CRC32C: the delta is corrupt")
    if version not in READABLE_VERSIONS:
        raise ProtocolError(f"HDE format version {version} is not supported (this build reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade dwcp on this side")
    if mode not in (Mode.PAGE, Mode.BUFFER):
        raise ProtocolError(f"HDE delta header: unknown mode {mode}")
    if flags & ~FLAG_HAS_BASE or reserved:
        raise ProtocolError(f"HDE delta header: unknown flags 0x{flags:x} or reserved field {reserved}")
    if bool(flags & FLAG_HAS_BASE) != (base_len > 0):
        raise ProtocolError("HDE delta header: base flag and base length disagree")
    if mode == Mode.PAGE:
        if not (_core.HDE_MIN_PAGE <= page_size <= _core.HDE_MAX_PAGE) or page_size & (page_size - 1):
            raise ProtocolError(f"HDE delta header: page size {page_size} is not a power of two in "
                                f"{_core.HDE_MIN_PAGE}..{_core.HDE_MAX_PAGE}")
        if not (1 <= batch_pages <= _core.HDE_MAX_BATCH_PAGES) or \
                batch_pages * page_size > _core.HDE_MAX_BATCH_BYTES:
            raise ProtocolError(f"HDE delta header: {batch_pages} pages per batch of {page_size} bytes is "
                                f"outside 1 page..{_core.HDE_MAX_BATCH_BYTES} bytes")
    elif page_size or batch_pages:
        raise ProtocolError("HDE delta header: buffer mode with a page size")
    return DeltaHeader(Mode(mode), new_len, base_len, page_size, batch_pages, version)


@dataclass(frozen=True)
class BatchRef:
    """Where one batch frame sits in a delta, and which bytes of the new image it rebuilds."""
    index: int
    frame_offset: int
    frame_bytes: int
    image_offset: int
    image_bytes: int
    codec: Codec
    flags: int = 0

    @property
    def reads_outside(self) -> bool:
        """The batch copies or patches from base pages outside its own region (format 2)."""
        return bool(self.flags & _core.HDE_FLAG_REFS_OUTSIDE)


def iter_batches(header: DeltaHeader, data: bytes | memoryview) -> Iterator[BatchRef]:
    """Walk the frames after the header, checking each header and that they tile the image in order."""
    view = memoryview(data)
    pos = HEADER_BYTES
    if header.mode is Mode.BUFFER:
        expect = [(0, 0, 0, header.new_length)]
    else:
        per = header.batch_pages * header.page_size
        expect = [(i * header.batch_pages, min(header.batch_pages, header.pages - i * header.batch_pages),
                   i * per, min(per, header.new_length - i * per)) for i in range(header.batches)]
    for i, (first, count, image_offset, image_bytes) in enumerate(expect):
        if pos >= len(view):
            raise ProtocolError(f"HDE delta is truncated: it ends after {i} of {len(expect)} batches "
                                f"(image bytes from {image_offset} on are missing)")
        h = _core.hde_parse_header(view[pos:pos + BATCH_HEADER_BYTES])
        if h["first"] != first or h["page_count"] != count:
            raise ProtocolError(f"HDE batch {i}: covers pages {h['first']}+{h['page_count']}, expected "
                                f"{first}+{count}: batches are missing, reordered or corrupt")
        if header.mode is Mode.PAGE and h["codec"] == Codec.ZSTD_BASE:
            raise ProtocolError(f"HDE batch {i}: codec ZSTD_BASE is only valid in buffer mode")
        # Format 1 frames carry no flags; format 2 page-mode frames always have a refs section.
        want_refs = header.mode is Mode.PAGE and header.version >= 2
        if bool(h["flags"] & _core.HDE_FLAG_REFS) != want_refs:
            raise ProtocolError(f"HDE batch {i}: flags 0x{h['flags']:x} do not belong in a format "
                                f"{header.version} {header.mode.name.lower()}-mode delta: corrupt")
        size = BATCH_HEADER_BYTES + h["stored_len"]
        if size > len(view) - pos:
            raise ProtocolError(f"HDE delta is truncated inside batch {i}: {len(view) - pos} bytes left, the "
                                f"batch needs {size}")
        yield BatchRef(i, pos, size, image_offset, image_bytes, Codec(h["codec"]), h["flags"])
        pos += size
    if pos != len(view):
        raise ProtocolError(f"HDE delta has {len(view) - pos} bytes after its last batch: corrupt or "
                            "two deltas concatenated")
