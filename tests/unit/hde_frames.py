"""Shared by the HDE decoder fuzz tests: mutate a batch frame's body behind valid checksums, and check
that the decoder either refuses it or rebuilds exactly the right image."""

from __future__ import annotations

import random
import struct

from dwcp import _core
from dwcp.errors import ProtocolError


def flip_and_reseal(frame: bytearray, rng: random.Random, flips: int) -> bytes:
    """Flip bits in the stored body, then recompute its XXH3 and the header CRC, so only the body
    parser and the result checksum stand between the mutation and the output."""
    for _ in range(flips):
        pos = 64 + rng.randrange(len(frame) - 64)
        frame[pos] ^= 1 << rng.randrange(8)
    struct.pack_into("<Q", frame, 40, _core.xxh3(bytes(frame[64:])))
    struct.pack_into("<I", frame, 56, _core.crc32c(bytes(frame[:56])))
    return bytes(frame)


def refused_or_exact(ctx: _core.HdeContext, frame: bytes, page: int, base: bytes, new: bytes) -> None:
    dst = bytearray(len(new))
    try:
        ctx.decode_batch(frame, page, base, dst)
    except ProtocolError:
        return
    assert dst == new, "a mutated batch rebuilt a wrong image"
