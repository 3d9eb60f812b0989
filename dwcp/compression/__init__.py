"""HDE, hybrid delta encoding: send only what changed against the version the peer already holds.

    from dwcp.compression import hde, BaselineStore
    delta, stats = hde.encode(new, base)          # mode auto: page or buffer, from a sample (stats.mode_reason)
    new2, _ = hde.decode(delta, base)
    session.send(delta, compressed=True)          # flagged: nothing below compresses it again

See docs/hde.md for the format and the choices behind it.
"""

from dwcp.compression import hde
from dwcp.compression.baseline import Baseline, BaselineStore, StoreStats
from dwcp.compression.format import Codec, DeltaHeader, Mode, PageClass
from dwcp.compression.hde import (HdeStats, ModeChoice, SegmentedBase, apply, choose_mode, decode, decode_into,
                                  decode_to_file, encode, read_header)
from dwcp.compression.level import LevelCost, LevelDecision

__all__ = [
    "Baseline", "BaselineStore", "Codec", "DeltaHeader", "HdeStats", "LevelCost", "LevelDecision", "Mode",
    "ModeChoice", "PageClass", "SegmentedBase", "StoreStats", "apply", "choose_mode", "decode", "decode_into",
    "decode_to_file", "encode", "hde", "read_header",
]
