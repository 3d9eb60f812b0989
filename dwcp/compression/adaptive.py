"""The adaptive compression loop: which zstd level (or none) each segment of a message gets, and how big
the next segment is, re-decided from what the message's own segments measured.

The model is compression/level.py's: data moves at min(encode rate, link rate x ratio), and off moves
at the link rate. At the start a sample of the message (four 256 KiB slices) is compressed at the
candidate levels on one core, which gives each level's ratio and per-core speed; the link rate is not
known yet, so the first segment goes at level 1 (cheap, and most of the ratio). Every segment sent then
measures the link (wire bytes over the time its transfer took) and the level it used (its real encode
rate on all threads and its real ratio), and the next level is ``level.decide()`` over those costs.
An incompressible sample (ratio under ``MIN_RATIO``) or a link faster than any level can feed turns
compression off, and the rest of the message goes as it is.

Segments are sized so that one takes ``SEGMENT_RTTS`` round trips or ``MIN_SEGMENT_S`` on the wire
(whichever is longer): each segment is one transfer, the link idles for about one RTT between two, and
a transfer's last chunks leave on fewer streams than the rest (bench/compress: segments of 0.4 s on
a 100 Mbit/s link ran at 35-89 Mbit/s).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dwcp.compression import level as levels

#: Levels the loop chooses among (the model's candidates; above 6 rarely pays on a link).
LOOP_LEVELS: tuple[int, ...] = (1, 3, 6)
#: Below this sample ratio the data is treated as incompressible: compression stays off.
MIN_RATIO = 1.1
SAMPLE_SLICE_BYTES = 256 << 10
FIRST_SEGMENT_BYTES = 8 << 20
MIN_SEGMENT_BYTES = 4 << 20
MAX_SEGMENT_BYTES = 128 << 20
SEGMENT_RTTS = 50
MIN_SEGMENT_S = 1.0


@dataclass(frozen=True)
class SegmentPlan:
    level: int | None       # None: stored
    raw_bytes: int
    reason: str


@dataclass(frozen=True)
class SegmentResult:
    level: int | None
    raw_bytes: int
    wire_bytes: int
    encode_s: float         # wall time of the compression (all threads)
    send_s: float           # wall time of the segment's transfer


@dataclass
class AdaptiveCompression:
    """One message's loop. ``compress(level, data) -> (wire bytes, seconds)`` measures the sample on
    one thread; ``rtt_s`` is the path's RTT (0 if unknown)."""

    total_bytes: int
    cores: int
    rtt_s: float = 0.0
    costs: dict[int, levels.LevelCost] = field(default_factory=dict)
    link_bps: float | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    off_reason: str = ""

    def calibrate(self, data: memoryview, compress: Callable[[int, bytes], tuple[int, float]]) -> None:
        n = len(data)
        step = max(1, n // 4)
        sample = b"".join(bytes(data[i:i + SAMPLE_SLICE_BYTES]) for i in range(0, n, step))[:4 * SAMPLE_SLICE_BYTES]
        if not sample:
            self.off_reason = "empty message"
            return
        for lvl in LOOP_LEVELS:
            wire, seconds = compress(lvl, sample)
            self.costs[lvl] = levels.LevelCost(lvl, self.cores * len(sample) / max(seconds, 1e-9),
                                               len(sample) / max(wire, 1))
            if lvl == LOOP_LEVELS[0] and self.costs[lvl].ratio < MIN_RATIO / 1.05:
                break  # incompressible at the cheapest level: higher ones would cost 10x the time for ~nothing
        best = max(c.ratio for c in self.costs.values())
        if best < MIN_RATIO:
            self.off_reason = (f"incompressible: a sample of {len(sample) >> 10} KiB compresses x{best:.2f} at best "
                               f"(under x{MIN_RATIO})")

    @property
    def off(self) -> bool:
        return bool(self.off_reason)

    def first(self) -> SegmentPlan:
        if self.off:
            return self._record(SegmentPlan(None, self.total_bytes, f"off: {self.off_reason}"), 0)
        raw = min(self.total_bytes, FIRST_SEGMENT_BYTES)
        c = self.costs[LOOP_LEVELS[0]]
        return self._record(SegmentPlan(LOOP_LEVELS[0], raw, (
            f"zstd level {LOOP_LEVELS[0]} for the first segment: the link rate is not measured yet "
            f"(sample ratio x{c.ratio:.2f}, {c.encode_bps / 1e6:,.0f} MB/s on {self.cores} cores)")), 0)

    def observe(self, r: SegmentResult) -> None:
        if r.send_s > 0:
            rate = r.wire_bytes * 8 / r.send_s
            # The newest segment says most (the path may change); a little memory damps one bad
            # window (a segment that waited on a retransmit).
            self.link_bps = rate if self.link_bps is None else 0.7 * rate + 0.3 * self.link_bps
        if r.level is not None and r.encode_s > 0:
            self.costs[r.level] = levels.LevelCost(r.level, r.raw_bytes / r.encode_s, r.raw_bytes / max(r.wire_bytes, 1))

    def next(self, offset: int) -> SegmentPlan:
        """The plan for the segment starting at offset (after observe() of the previous one)."""
        left = self.total_bytes - offset
        if self.off:
            return self._record(SegmentPlan(None, left, f"off: {self.off_reason}"), offset)
        link = self.link_bps
        if link is None:
            return self._record(SegmentPlan(LOOP_LEVELS[0], min(left, FIRST_SEGMENT_BYTES),
                                            "link rate not measured yet: level 1"), offset)
        choices = [levels.LevelCost(None, float("inf"), 1.0), *self.costs.values()]
        d = levels.decide(choices, link)
        ratio = 1.0 if d.level is None else self.costs[d.level].ratio
        target_s = max(MIN_SEGMENT_S, SEGMENT_RTTS * self.rtt_s)
        raw = int(link / 8 * target_s * ratio)
        raw = max(MIN_SEGMENT_BYTES, min(MAX_SEGMENT_BYTES, raw))
        if d.level is None:
            # Off: the rest goes as it is, in as few segments as the size limit allows.
            raw = MAX_SEGMENT_BYTES
        if left - raw < raw // 4:
            raw = left   # no runt segment at the end: it would cost a round trip for little
        return self._record(SegmentPlan(d.level, min(raw, left), d.reason), offset)

    def _record(self, p: SegmentPlan, offset: int) -> SegmentPlan:
        if not self.decisions or self.decisions[-1]["level"] != p.level:
            self.decisions.append({"offset": offset, "level": p.level, "reason": p.reason,
                                   "link_bps": self.link_bps})
        return p


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    t = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t
