"""Tier detection: which class of link a peer sits behind, decided from the link monitor's estimates.

=======  =======================================================  ==================================
tier     rule (defaults, :class:`TierThresholds`)                 typical link
=======  =======================================================  ==================================
TIER1    min RTT < 10 ms and bottleneck >= 10 Gbit/s               same rack / data centre fabric
TIER2    min RTT < 100 ms and bottleneck >= 1 Gbit/s (not Tier 1)  metro / regional, good WAN
TIER3    everything else                                          long-haul or thin links
=======  =======================================================  ==================================

How a decision is made (pure computation over :class:`PeerEstimate` values; time comes from the
estimates, so tests are deterministic):

* **Evidence.** The bottleneck estimate is a windowed max of delivery rates, so while a flow ramps up
  it is a *lower bound*: a measured rate above a threshold proves that threshold is met, one below
  proves nothing until the flow has saturated the path. The first decision is therefore taken

  - at once when the lower bound already clears the bandwidth threshold of the best tier the RTT
    allows (``upgrade_margin`` above it, so one noisy sample does not count), or the min RTT alone
    rules out every tier but Tier 3;
  - when the estimate's confidence reaches ``min_confidence`` (the link monitor raises it when the
    rate stops growing or losses show the path is full);
  - at the latest ``decision_deadline_s`` = max(``deadline_min_s``, ``deadline_rtts`` x min RTT)
    after the first sample with data in flight, with whatever the estimate says then (low confidence).

  No active probing: a saturating DWCP transfer is its own probe (its streams fill the path within a
  few RTTs), and the decision is only needed while one runs; an idle peer keeps its last decision.

* **Hysteresis.** Once decided, the tier changes only when the estimate lies beyond the boundary by
  ``hysteresis`` (a fraction: 0.2 means 20 % past the threshold, in the direction of the change) and
  keeps doing so for ``hold_s`` (and at least ``hold_rtts`` RTTs). Estimates that oscillate around a
  threshold therefore keep the current tier.

* **Confidence** of a decision: the estimate's confidence, raised to 1.0 when the decision follows
  from a lower bound that clears a threshold by the margin or from the RTT alone, and capped at 0.5
  for a decision forced by the deadline on an unsaturated estimate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dwcp.errors import ConfigError

if TYPE_CHECKING:
    from dwcp.telemetry.monitor import PeerEstimate


class Tier(enum.IntEnum):
    """Link class: lower is better (shorter and fatter)."""

    TIER1 = 1
    TIER2 = 2
    TIER3 = 3

    def __str__(self) -> str:
        return f"tier{int(self)}"


@dataclass(frozen=True)
class TierThresholds:
    """Configurable defaults of the tier rules, decision timing and hysteresis (see module doc)."""

    tier1_max_rtt_us: float = 10_000.0
    tier1_min_bottleneck_bps: float = 10e9
    tier2_max_rtt_us: float = 100_000.0
    tier2_min_bottleneck_bps: float = 1e9
    upgrade_margin: float = 0.1        # a lower bound must clear a bandwidth threshold by this fraction
    hysteresis: float = 0.2            # how far past a boundary an estimate must be to change tier
    hold_s: float = 1.0                # ... and for how long
    hold_rtts: float = 20.0
    min_confidence: float = 0.6
    deadline_min_s: float = 2.0
    deadline_rtts: float = 20.0
    deadline_safety: float = 0.8       # decide at this fraction of the deadline at the latest

    def __post_init__(self) -> None:
        if not 0 < self.tier1_max_rtt_us <= self.tier2_max_rtt_us:
            raise ConfigError("tier thresholds: need 0 < tier1_max_rtt_us <= tier2_max_rtt_us")
        if not 0 < self.tier2_min_bottleneck_bps <= self.tier1_min_bottleneck_bps:
            raise ConfigError("tier thresholds: need 0 < tier2_min_bottleneck_bps <= tier1_min_bottleneck_bps")
        for name in ("upgrade_margin", "hysteresis"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"tier thresholds: {name} is a fraction in [0, 1)")
        if not 0 < self.min_confidence <= 1:
            raise ConfigError("tier thresholds: min_confidence in (0, 1]")
        if not 0 < self.deadline_safety <= 1:
            raise ConfigError("tier thresholds: deadline_safety in (0, 1]")

    def classify(self, min_rtt_us: float, bottleneck_bps: float, *, slack: float = 0.0,
                 toward: Tier | None = None) -> Tier:
        """The tier of (min RTT, bottleneck). With ``slack`` > 0 and a current tier ``toward``,
        boundaries move by that fraction in the current tier's favour (the hysteresis band)."""
        def rtt_ok(limit: float, tier: Tier) -> bool:
            if toward is None or slack == 0:
                return min_rtt_us < limit
            # Staying in (or moving to) a tier at least as good as the current one is easier.
            return min_rtt_us < (limit * (1 + slack) if tier >= toward else limit * (1 - slack))

        def bw_ok(limit: float, tier: Tier) -> bool:
            if toward is None or slack == 0:
                return bottleneck_bps >= limit
            return bottleneck_bps >= (limit * (1 - slack) if tier >= toward else limit * (1 + slack))

        if rtt_ok(self.tier1_max_rtt_us, Tier.TIER1) and bw_ok(self.tier1_min_bottleneck_bps, Tier.TIER1):
            return Tier.TIER1
        if rtt_ok(self.tier2_max_rtt_us, Tier.TIER2) and bw_ok(self.tier2_min_bottleneck_bps, Tier.TIER2):
            return Tier.TIER2
        return Tier.TIER3

    def deadline_s(self, min_rtt_us: float) -> float:
        """The longest a first decision may take: max(deadline_min_s, deadline_rtts RTTs)."""
        return max(self.deadline_min_s, self.deadline_rtts * min_rtt_us / 1e6)


@dataclass(frozen=True)
class TierDecision:
    """The detector's current answer for one peer."""

    tier: Tier | None              # None until decided
    confidence: float              # 0..1
    reason: str
    decided_at_s: float | None     # clock time of the first decision
    changed_at_s: float | None     # clock time of the latest change (first decision included)
    time_to_decision_s: float | None  # first decision minus the first sample with data in flight

    def to_json(self) -> dict[str, object]:
        return {"tier": int(self.tier) if self.tier is not None else None, "confidence": self.confidence,
                "reason": self.reason, "time_to_decision_s": self.time_to_decision_s}


@dataclass
class TierDetector:
    """Tier of one peer, fed with that peer's successive :class:`PeerEstimate` values (``update``)."""

    thresholds: TierThresholds = field(default_factory=TierThresholds)
    _tier: Tier | None = None
    _confidence: float = 0.0
    _reason: str = "no estimate yet"
    _start_s: float | None = None
    _decided_s: float | None = None
    _changed_s: float | None = None
    _candidate: Tier | None = None
    _candidate_since_s: float | None = None

    @property
    def decision(self) -> TierDecision:
        ttd = (self._decided_s - self._start_s
               if self._decided_s is not None and self._start_s is not None else None)
        return TierDecision(self._tier, self._confidence, self._reason, self._decided_s, self._changed_s, ttd)

    def reset(self) -> None:
        """Forget the decision (e.g. the peer's route changed)."""
        self.__init__(self.thresholds)  # type: ignore[misc]

    def update(self, est: PeerEstimate) -> TierDecision:
        """Feed the peer's latest estimate; returns the (possibly new) decision."""
        now = est.timestamp_s
        if est.min_rtt_us <= 0 and est.bottleneck_bps <= 0:
            return self.decision
        if self._start_s is None and est.active:
            self._start_s = est.active_since_s if est.active_since_s is not None else now
        if self._tier is None:
            self._first_decision(est, now)
        else:
            self._maybe_change(est, now)
        return self.decision

    def _first_decision(self, est: PeerEstimate, now: float) -> None:
        th = self.thresholds
        rtt, bw = est.min_rtt_us, est.bottleneck_bps
        if rtt <= 0:
            return
        if rtt >= th.tier2_max_rtt_us * (1 + th.upgrade_margin):
            self._decide(Tier.TIER3, 1.0, f"min RTT {rtt / 1000:.1f} ms rules out Tier 1 and 2", now)
            return
        best_by_rtt = Tier.TIER1 if rtt < th.tier1_max_rtt_us else Tier.TIER2
        floor = (th.tier1_min_bottleneck_bps if best_by_rtt == Tier.TIER1 else th.tier2_min_bottleneck_bps)
        if bw >= floor * (1 + th.upgrade_margin):
            self._decide(best_by_rtt, 1.0, f"measured {bw / 1e9:.2f} Gbit/s already clears the "
                         f"{floor / 1e9:g} Gbit/s threshold at min RTT {rtt / 1000:.2f} ms", now)
            return
        tier = th.classify(rtt, bw)
        if est.confidence >= th.min_confidence:
            self._decide(tier, est.confidence, f"saturated estimate: {bw / 1e9:.2f} Gbit/s, "
                         f"min RTT {rtt / 1000:.2f} ms", now)
            return
        if self._start_s is not None and est.active:
            limit = th.deadline_safety * th.deadline_s(rtt)
            if now - self._start_s >= limit:
                self._decide(tier, min(est.confidence, 0.5), f"deadline {limit:.2f} s reached: "
                             f"{bw / 1e9:.2f} Gbit/s, min RTT {rtt / 1000:.2f} ms (not saturated)", now)

    def _decide(self, tier: Tier, confidence: float, reason: str, now: float) -> None:
        self._tier, self._confidence, self._reason = tier, confidence, reason
        self._decided_s = self._changed_s = now
        if self._start_s is None:
            self._start_s = now
        self._candidate = self._candidate_since_s = None

    def _maybe_change(self, est: PeerEstimate, now: float) -> None:
        th = self.thresholds
        assert self._tier is not None
        rtt, bw = est.min_rtt_us, est.bottleneck_bps
        if rtt <= 0 or bw <= 0:
            return
        tier = th.classify(rtt, bw, slack=th.hysteresis, toward=self._tier)
        if tier == self._tier:
            self._candidate = self._candidate_since_s = None
            self._confidence = max(self._confidence, est.confidence)
            return
        if est.confidence < th.min_confidence:
            return  # evidence against the current tier must itself be solid
        if tier != self._candidate:
            self._candidate, self._candidate_since_s = tier, now
            return
        assert self._candidate_since_s is not None
        hold = max(th.hold_s, th.hold_rtts * rtt / 1e6)
        if now - self._candidate_since_s >= hold:
            old = self._tier
            self._tier, self._confidence = tier, est.confidence
            self._reason = (f"changed from {old} after {hold:.2f} s beyond the boundary: "
                            f"{bw / 1e9:.2f} Gbit/s, min RTT {rtt / 1000:.2f} ms")
            self._changed_s = now
            self._candidate = self._candidate_since_s = None
