"""Adaptive compression level: pick the zstd level (or none) that moves the data fastest over the link.

The model: encoding runs at ``encode_bps`` (input bytes per second over all encoder threads) and the link
carries ``link_bps / 8`` bytes per second of output, which is ``ratio`` times as many input bytes. The
data moves at ``min(encode rate, link rate x ratio)``; we pick the level that maximises it and, among
levels within 5 % of the best, the one with the highest ratio (fewer bytes on the wire for the same
speed). Both rates come from a calibration on the data itself (a few batches encoded at each candidate
level), not from a table: ratio and speed both depend on the data far more than on the machine.

Without a link (a delta written to a file) there is no rate to match and the output's size is the
product; then the level is zstd's default, 3 (what ``zstd --patch-from`` uses), without calibrating.
Picking "the best ratio among levels nearly as fast as the fastest" from the calibration was tried and
measured wrong: the calibration compresses small sample bodies, on which levels 6 and 9 cost about half
of what they cost on a real 64 MiB batch body with its wide window (on the python snapshots of
bench/hde level 6 was calibrated at 0.8x the fastest level and ran at 0.6x).

The XenServer lesson falls out of the model: on a link faster than any level can compress (10 GbE with a
couple of cores), every level's encode rate is below the uncompressed link rate, so "off" wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dwcp.errors import ConfigError

#: Levels tried by calibration. Negative levels are zstd's fast modes; above 9 is rarely worth it
#: for bulk data in flight (and is still available by asking for a level explicitly).
CANDIDATE_LEVELS: tuple[int, ...] = (-3, 1, 3, 6, 9)
MIN_LEVEL, MAX_LEVEL = -7, 22
#: Among levels whose predicted rate is within this fraction of the best, prefer the best ratio.
TOLERANCE = 0.05
#: With no link (a delta written to a file): zstd's default level.
OFFLINE_LEVEL = 3


@dataclass(frozen=True)
class LevelCost:
    """Calibrated cost of one choice: level None = off (batches stored, page classes still applied)."""
    level: int | None
    encode_bps: float        # input bytes per second, all threads
    ratio: float             # input bytes / output bytes


@dataclass(frozen=True)
class LevelDecision:
    level: int | None        # zstd level, or None: no zstd (page-level delta only)
    reason: str
    link_bps: float | None   # the link rate the decision assumed (None: caller forced the level)
    predicted_bps: float | None = None   # predicted input bytes moved per second
    costs: tuple[LevelCost, ...] = field(default=())

    @property
    def codec(self) -> str:
        return "off" if self.level is None else "zstd"

    def to_json(self) -> dict[str, object]:
        return {"codec": self.codec, "level": self.level, "reason": self.reason, "link_bps": self.link_bps,
                "predicted_Bps": self.predicted_bps,
                "costs": [{"level": c.level, "encode_Bps": round(c.encode_bps), "ratio": round(c.ratio, 3)}
                          for c in self.costs]}


def parse_level(value: str | int | None) -> int | None | str:
    """User input -> a zstd level, None (off) or "auto"."""
    if value == "auto":
        return "auto"
    if value is None or value in ("off", "none"):
        return None
    try:
        level = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"compression level {value!r}: use auto, off, or a zstd level "
                          f"{MIN_LEVEL}..{MAX_LEVEL}") from None
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ConfigError(f"compression level {level} is outside zstd's {MIN_LEVEL}..{MAX_LEVEL}")
    return level


def fixed(level: int | None) -> LevelDecision:
    what = "off" if level is None else f"zstd level {level}"
    return LevelDecision(level, f"{what}, as requested", None)


def offline() -> LevelDecision:
    """The level for a delta written to a file (no link rate to match): OFFLINE_LEVEL."""
    return LevelDecision(OFFLINE_LEVEL, f"zstd level {OFFLINE_LEVEL}: no link rate given, so zstd's default; pass a "
                         "link rate to match the level to a link", None)


def decide(costs: Sequence[LevelCost], link_bps: float | None) -> LevelDecision:
    """Choose among calibrated costs for a link of link_bps bits per second (None: no link, a file:
    see offline())."""
    if not costs:
        raise ConfigError("no calibrated levels to choose from")
    if link_bps is None:
        return offline()
    link = float(link_bps)
    if not math.isfinite(link) or link <= 0:
        raise ConfigError(f"link rate must be a positive number of bits per second, got {link_bps}")
    link_Bps = link / 8

    def rate(c: LevelCost) -> float:
        return min(c.encode_bps, link_Bps * c.ratio)

    best = max(rate(c) for c in costs)
    good = [c for c in costs if rate(c) >= best * (1 - TOLERANCE)]
    pick = max(good, key=lambda c: (c.ratio, c.encode_bps))
    off = next((c for c in costs if c.level is None), None)
    link_txt = f"{link / 1e9:.3g} Gbit/s link"
    if pick.level is None:
        others = max((rate(c) for c in costs if c.level is not None), default=0.0)
        reason = (f"compression off: on a {link_txt} no zstd level beats sending the page-level delta as is "
                  f"({_mbs(rate(pick))} vs at best {_mbs(others)})")
    else:
        cpu_bound = pick.encode_bps < link_Bps * pick.ratio
        limit = "encoding" if cpu_bound else "the link"
        reason = (f"zstd level {pick.level}: moves {_mbs(rate(pick))} on a {link_txt}, limited by {limit} "
                  f"(ratio {pick.ratio:.1f}, encode {_mbs(pick.encode_bps)})")
        if off is not None:
            reason += f"; off would move {_mbs(rate(off))}"
    return LevelDecision(pick.level, reason, link, rate(pick), tuple(costs))


def calibrate(samples: Sequence[tuple[int, float, int]],
              compress: Callable[[int], tuple[float, int]], threads: int, link_bps: float | None,
              levels: Sequence[int] = CANDIDATE_LEVELS) -> list[LevelCost]:
    """Costs of off and of each level, from sample batches, in increasing level order.

    samples: per batch (input bytes, seconds to build its uncompressed body, body bytes).
    compress(level) -> (seconds, compressed bytes) for the same bodies at that level.
    Encode rate = threads x input / (body build time + compression time).
    Stops once a level makes encoding the bottleneck on the link (a higher level is slower still, so
    it cannot move data faster)."""
    inp = sum(s[0] for s in samples)
    t_body = sum(s[1] for s in samples)
    body = sum(s[2] for s in samples)
    tiny = 1e-9
    costs = [LevelCost(None, threads * inp / max(t_body, tiny), inp / max(body, 1))]
    for level in levels:
        t, out = compress(level)
        c = LevelCost(level, threads * inp / max(t_body + t, tiny), inp / max(out, 1))
        costs.append(c)
        if link_bps is not None and c.encode_bps < link_bps / 8 * c.ratio:
            break
    return costs


def _mbs(bps: float) -> str:
    return f"{bps / 1e6:,.0f} MB/s"
