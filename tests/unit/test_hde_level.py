"""The adaptive level: pure decisions over calibrated costs (no timing is asserted anywhere)."""

from __future__ import annotations

import pytest

from dwcp.compression import hde
from dwcp.compression.level import LevelCost, decide, fixed, parse_level
from dwcp.errors import ConfigError

GB = 1e9

# Shaped like the redis snapshots: off is fastest, higher levels compress more and run slower.
COSTS = [LevelCost(None, 4.0 * GB, 2.0), LevelCost(1, 1.6 * GB, 18.0), LevelCost(3, 1.2 * GB, 21.0),
         LevelCost(9, 0.3 * GB, 23.0)]


def test_fast_link_turns_compression_off() -> None:
    """The XenServer lesson: 100 Gbit/s carries 12.5 GB/s uncompressed; no level encodes that fast."""
    d = decide(COSTS, 100e9)
    assert d.level is None and d.codec == "off"
    assert "off" in d.reason


def test_slow_link_prefers_ratio() -> None:
    d = decide(COSTS, 100e6)          # 12.5 MB/s: every level is link-bound; the best ratio that keeps up
    assert d.level == 9
    assert "limited by the link" in d.reason


def test_middle_link_picks_the_fastest_mover() -> None:
    d = decide(COSTS, 10e9)           # 1.25 GB/s: off moves 2.5 GB/s, level 1 1.6 GB/s (CPU-bound)
    assert d.level is None
    d = decide(COSTS, 1e9)            # 125 MB/s: level 1 moves 1.6 GB/s (CPU), level 3 1.2 GB/s ...
    assert d.level == 1
    assert d.predicted_bps == pytest.approx(1.6 * GB)


def test_no_link_takes_zstds_default_level() -> None:
    costs = [LevelCost(None, 9.0 * GB, 2.0), LevelCost(1, 2.5 * GB, 18.0), LevelCost(9, 2.4 * GB, 23.0)]
    d = decide(costs, None)            # off is not a candidate offline, however fast; nor is a guess at 9
    assert d.level == 3 and d.link_bps is None
    assert "no link rate" in d.reason
    _, stats = hde.encode(b"abc" * 100000, None)   # a file: no calibration
    assert stats.level is not None and stats.level.level == 3 and not stats.level.costs


def test_level_parsing() -> None:
    assert parse_level("auto") == "auto"
    assert parse_level("off") is None and parse_level(None) is None
    assert parse_level("19") == 19 and parse_level(-3) == -3
    for bad in ("fast", "99", 23):
        with pytest.raises(ConfigError):
            parse_level(bad)
    with pytest.raises(ConfigError):
        decide(COSTS, -1)
    assert fixed(3).reason == "zstd level 3, as requested"


def test_encoder_reports_its_decision() -> None:
    data = (b"the quick brown fox %d " * 50000)[:1 << 20]
    _, stats = hde.encode(data, None, level="auto", link_bps=1e6)
    assert stats.level is not None and stats.level.level is not None  # 1 Mbit/s: compress
    assert stats.level.costs and stats.to_json()["level"]["reason"] == stats.level.reason
    _, stats = hde.encode(data, None, level=None)
    assert stats.level is not None and stats.level.level is None
