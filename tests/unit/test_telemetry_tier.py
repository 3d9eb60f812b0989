"""TierDetector: rules, first decision (lower bound / confidence / deadline), hysteresis, config checks.

Pure computation on synthetic PeerEstimates; time is the estimates' own timestamps."""

from __future__ import annotations

import pytest

from dwcp.errors import ConfigError
from dwcp.telemetry import PeerEstimate, Tier, TierDetector, TierThresholds

G = 1e9


def est(t: float, bw: float, rtt_us: int, conf: float = 1.0, active: bool = True,
        since: float | None = 0.0) -> PeerEstimate:
    return PeerEstimate(peer="p", timestamp_s=t, bottleneck_bps=bw, min_rtt_us=rtt_us, confidence=conf,
                        active=active, active_since_s=since)


@pytest.mark.parametrize("rtt_us,bw,tier", [
    (50, 20 * G, Tier.TIER1), (9_000, 10 * G, Tier.TIER1),
    (10_000, 20 * G, Tier.TIER2),           # RTT on the boundary is not < 10 ms
    (50, 9.9 * G, Tier.TIER2), (99_000, 1 * G, Tier.TIER2),
    (50, 0.99 * G, Tier.TIER3), (100_000, 50 * G, Tier.TIER3), (200_000, 0.1 * G, Tier.TIER3),
])
def test_classify_rules(rtt_us: int, bw: float, tier: Tier) -> None:
    assert TierThresholds().classify(rtt_us, bw) == tier


def test_custom_thresholds() -> None:
    th = TierThresholds(tier1_max_rtt_us=1000, tier1_min_bottleneck_bps=40 * G,
                        tier2_max_rtt_us=20_000, tier2_min_bottleneck_bps=5 * G)
    assert th.classify(500, 20 * G) == Tier.TIER2
    assert th.classify(30_000, 20 * G) == Tier.TIER3


@pytest.mark.parametrize("kw", [{"tier1_max_rtt_us": 200_000}, {"tier2_min_bottleneck_bps": 20e9},
                                {"hysteresis": 1.5}, {"min_confidence": 0}, {"deadline_safety": 2}])
def test_bad_thresholds_raise(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        TierThresholds(**kw)


def test_no_decision_without_evidence() -> None:
    d = TierDetector()
    assert d.update(est(0.0, 0, 0)).tier is None
    # Growing, unsaturated, below every threshold: a lower bound proves nothing yet.
    assert d.update(est(0.5, 0.3 * G, 20_000, conf=0.2)).tier is None


def test_lower_bound_above_threshold_decides_at_once() -> None:
    d = TierDetector()
    dec = d.update(est(0.1, 12 * G, 50, conf=0.1, since=0.0))
    assert dec.tier == Tier.TIER1 and dec.confidence == 1.0
    assert dec.time_to_decision_s == pytest.approx(0.1)


def test_lower_bound_inside_margin_waits() -> None:
    d = TierDetector()
    assert d.update(est(0.1, 10.5 * G, 50, conf=0.1)).tier is None  # < 10 G x 1.1


def test_rtt_alone_decides_tier3() -> None:
    dec = TierDetector().update(est(0.05, 0.01 * G, 150_000, conf=0.0))
    assert dec.tier == Tier.TIER3 and dec.confidence == 1.0


def test_saturated_estimate_decides() -> None:
    d = TierDetector()
    assert d.update(est(0.3, 0.5 * G, 20_000, conf=0.3)).tier is None
    dec = d.update(est(0.6, 0.5 * G, 20_000, conf=0.9))
    assert dec.tier == Tier.TIER3 and dec.confidence == 0.9


def test_deadline_forces_a_low_confidence_decision() -> None:
    d = TierDetector()
    th = d.thresholds
    limit = th.deadline_safety * th.deadline_s(1000)
    assert d.update(est(limit - 0.01, 5 * G, 1000, conf=0.3)).tier is None
    dec = d.update(est(limit, 5 * G, 1000, conf=0.3))
    assert dec.tier == Tier.TIER2 and dec.confidence <= 0.5
    assert "deadline" in dec.reason


def test_deadline_scales_with_rtt() -> None:
    th = TierThresholds()
    assert th.deadline_s(1000) == 2.0
    assert th.deadline_s(200_000) == pytest.approx(4.0)


def test_hysteresis_keeps_tier_near_boundary() -> None:
    d = TierDetector()
    d.update(est(0.1, 12 * G, 50))
    assert d.decision.tier == Tier.TIER1
    # 9 Gbit/s is below 10 but inside the 20 % band: stays Tier 1, however long.
    for i in range(50):
        assert d.update(est(0.2 + i * 0.1, 9 * G, 50)).tier == Tier.TIER1


def test_change_needs_hold_time() -> None:
    d = TierDetector()
    d.update(est(0.1, 12 * G, 50))
    t = 1.0
    d.update(est(t, 3 * G, 50))                     # candidate Tier 2
    assert d.decision.tier == Tier.TIER1
    d.update(est(t + 0.5, 3 * G, 50))
    assert d.decision.tier == Tier.TIER1
    dec = d.update(est(t + 1.0, 3 * G, 50))         # held for hold_s = 1 s
    assert dec.tier == Tier.TIER2 and dec.changed_at_s == t + 1.0 and dec.decided_at_s == 0.1


def test_flapping_estimate_never_changes_tier() -> None:
    d = TierDetector()
    d.update(est(0.1, 12 * G, 50))
    for i in range(40):
        bw = 3 * G if i % 2 else 12 * G                  # crosses the boundary every 0.2 s
        assert d.update(est(0.2 + i * 0.2, bw, 50)).tier == Tier.TIER1


def test_unconfident_contrary_evidence_is_ignored() -> None:
    d = TierDetector()
    d.update(est(0.1, 12 * G, 50))
    for i in range(30):
        assert d.update(est(0.2 + i * 0.1, 0.5 * G, 50, conf=0.2)).tier == Tier.TIER1


def test_reset_forgets() -> None:
    d = TierDetector()
    d.update(est(0.1, 12 * G, 50))
    d.reset()
    assert d.decision.tier is None
    assert d.decision.to_json()["tier"] is None
