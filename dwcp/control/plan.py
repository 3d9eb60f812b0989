"""The per-peer plan: tier -> transport mode -> stream count -> compression level, each a Decision.

Pure functions over what the Manager knows (configuration values, the latest link estimate, the host's
features), so every rule is testable without sockets. The Manager calls :func:`make_plan` whenever
something it depends on changes and publishes the decisions that changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dwcp.control.decision import Decision
from dwcp.control.mode import TransportMode, select_mode
from dwcp.telemetry.tier import Tier

#: Initial data streams per tier when transport.initial_streams is "auto". From BENCHMARKS.md's wan
#: table: one stream fills a short fat link whose windows are not capped (-P 1 reaches 100 % at 10 ms,
#: 1 Gbit/s, where -P 16 loses 27 % and -P 64 43 %); 4 keep a metro link full with room for a loss;
#: 8 reach 95-100 % of every uncapped long link of the grid. Capped windows need more, which only the
#: stream tuner can see (the receiver's window is the peer's setting), so it climbs from here.
INITIAL_STREAMS_BY_TIER: dict[Tier | None, int] = {Tier.TIER1: 1, Tier.TIER2: 4, Tier.TIER3: 8, None: 4}

#: zstd input rates per core (bytes/s) by level, measured by bench/hde on process snapshots with this
#: machine's libzstd (zstd -1: 296 MB/s, -3: 231 MB/s on one thread), and the ratios zstd typically
#: reaches on compressible bulk data. Priors only: the compression loop measures the real ratio and
#: rate of the data it sends and re-decides.
PRIOR_ENCODE_BPS_PER_CORE: dict[int, float] = {1: 300e6, 3: 230e6, 6: 90e6}
PRIOR_RATIO: dict[int, float] = {1: 2.8, 3: 3.0, 6: 3.2}


@dataclass(frozen=True)
class LinkView:
    """What the plan reads about one peer's link (from LinkMonitor's PeerEstimate)."""
    tier: Tier | None = None
    tier_reason: str = ""
    bottleneck_bps: float = 0.0
    min_rtt_us: int = 0
    loss_rate: float = 0.0
    confidence: float = 0.0


@dataclass(frozen=True)
class PlanInputs:
    enabled: bool
    killed: str | None
    features: frozenset[str]
    rdma_device: str | None
    rdma_reason: str
    min_streams: int
    max_streams: int
    initial_streams: int | str       # an int, or "auto"
    compression_enabled: bool
    compression_level: int | str     # a zstd level, or "auto"
    adaptive_compression: bool
    cores: int


@dataclass(frozen=True)
class PeerPlan:
    peer: str
    tier: Tier | None
    mode: TransportMode
    streams: int
    compression_level: int | None    # None: no compression
    decisions: dict[str, Decision] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "tier": int(self.tier) if self.tier is not None else None,
                "mode": self.mode.value, "streams": self.streams, "compression_level": self.compression_level,
                "decisions": {k: d.to_json() for k, d in self.decisions.items()}}


def make_plan(peer: str, link: LinkView, p: PlanInputs, now_s: float) -> PeerPlan:
    inputs_link = {"tier": int(link.tier) if link.tier is not None else None,
                   "bottleneck_bps": link.bottleneck_bps, "min_rtt_us": link.min_rtt_us,
                   "loss_rate": link.loss_rate}

    def d(what: str, value: Any, reason: str, **inputs: Any) -> Decision:
        return Decision(what, value, reason, peer=peer, at_s=now_s, inputs=inputs)

    tier_d = d("tier", int(link.tier) if link.tier is not None else None,
               link.tier_reason or ("no link estimate yet" if link.tier is None else str(link.tier)),
               bottleneck_bps=link.bottleneck_bps, min_rtt_us=link.min_rtt_us, confidence=link.confidence)
    mode, why = select_mode(enabled=p.enabled, killed=p.killed, tier=link.tier, features=p.features,
                            rdma_device=p.rdma_device, rdma_reason=p.rdma_reason)
    mode_d = d("mode", mode.value, why, tier=inputs_link["tier"], rdma_device=p.rdma_device,
               rdma="rdma" in p.features, enabled=p.enabled, killed=p.killed)
    streams, why = initial_streams(link, p, mode)
    streams_d = d("streams", streams, why, tier=inputs_link["tier"], min_streams=p.min_streams,
                  max_streams=p.max_streams, initial_streams=p.initial_streams)
    level, why = compression_level(link, p, mode)
    level_d = d("compression_level", level, why, bottleneck_bps=link.bottleneck_bps, tier=inputs_link["tier"],
                configured=p.compression_level, cores=p.cores)
    return PeerPlan(peer, link.tier, mode, streams, level,
                    {"tier": tier_d, "mode": mode_d, "streams": streams_d, "compression_level": level_d})


def initial_streams(link: LinkView, p: PlanInputs, mode: TransportMode) -> tuple[int, str]:
    if mode is TransportMode.PLAIN:
        return 1, "plain TCP carries one connection"
    if isinstance(p.initial_streams, int):
        n = min(max(p.initial_streams, p.min_streams), p.max_streams)
        return n, f"transport.initial_streams = {p.initial_streams}" + (
            f", clamped to [{p.min_streams}, {p.max_streams}]" if n != p.initial_streams else "")
    base = INITIAL_STREAMS_BY_TIER[link.tier]
    n = min(max(base, p.min_streams), p.max_streams)
    what = f"{link.tier}" if link.tier is not None else "an unknown tier"
    reason = f"{base} for {what} (initial_streams: auto)"
    if n != base:
        reason += f", clamped to transport.min_streams..max_streams [{p.min_streams}, {p.max_streams}]"
    return n, reason + "; the stream tuner adjusts it while data flows"


def compression_level(link: LinkView, p: PlanInputs, mode: TransportMode) -> tuple[int | None, str]:
    if mode is TransportMode.PLAIN:
        return None, "plain TCP sends bytes as they are"
    if not p.compression_enabled:
        return None, "compression.enabled is false"
    if isinstance(p.compression_level, int):
        return p.compression_level, f"compression.level = {p.compression_level}"
    if not p.adaptive_compression:
        return 3, "compression.level auto but features.adaptive_compression is off: zstd's default, 3"
    if link.bottleneck_bps <= 0:
        return 1, "no link rate known yet: the fastest level (1) until the link is measured"
    # The model of compression/level.py with priors in place of a calibration: data moves at
    # min(encode rate, link rate x ratio); off moves at the link rate.
    link_Bps = link.bottleneck_bps / 8
    best_level: int | None = None
    best_rate = link_Bps
    for level in sorted(PRIOR_ENCODE_BPS_PER_CORE):
        rate = min(PRIOR_ENCODE_BPS_PER_CORE[level] * p.cores, link_Bps * PRIOR_RATIO[level])
        if rate > best_rate * 1.05:
            best_level, best_rate = level, rate
    gbit = link.bottleneck_bps / 1e9
    if best_level is None:
        return None, (f"off: on a {gbit:.3g} Gbit/s link no zstd level on {p.cores} core(s) is expected to beat "
                      f"sending as is (level 1 encodes ~{PRIOR_ENCODE_BPS_PER_CORE[1] * p.cores * 8 / 1e9:.2g} Gbit/s)")
    return best_level, (f"zstd level {best_level}: expected to move {best_rate * 8 / 1e9:.3g} Gbit/s of data over a "
                        f"{gbit:.3g} Gbit/s link on {p.cores} core(s) (priors; the compression loop re-measures)")
