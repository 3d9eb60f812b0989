"""HDE, hybrid delta encoding: send only what changed against the version the peer already holds.

    from dwcp.compression import hde, BaselineStore
    delta, stats = hde.encode(new, base)          # page mode for whole-page images, else buffer mode
    new2, _ = hde.decode(delta, base)
    session.send(delta, compressed=True)          # flagged: nothing below compresses it again

See docs/hde.md for the format and the choices behind it.
"""

from dwcp.compression import hde
from dwcp.compression.baseline import Baseline, BaselineStore, StoreStats
from dwcp.compression.format import Codec, DeltaHeader, Mode, PageClass
from dwcp.compression.hde import HdeStats, SegmentedBase, apply, decode, decode_into, encode, read_header
from dwcp.compression.level import LevelCost, LevelDecision

__all__ = [
    "Baseline", "BaselineStore", "Codec", "DeltaHeader", "HdeStats", "LevelCost", "LevelDecision", "Mode",
    "PageClass", "SegmentedBase", "StoreStats", "apply", "decode", "decode_into", "encode", "hde",
    "read_header",
]
