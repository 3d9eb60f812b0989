"""Transport mode selection: plain TCP, TCP with AMST striping, RDMA, or Hybrid (RDMA for bulk data, TCP
for control), from the tier, what this host can do and the configuration.

The seed's intent, kept: a high-speed local peer (Tier 1) gets Hybrid where RDMA exists; a high-speed
remote peer (Tier 2) gets TCP with AMST; a high-latency or thin peer (Tier 3) gets TCP with AMST and
aggressive compression (the compression decision does that part). With DWCP disabled, or the kill switch
engaged, every peer gets plain TCP.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from dwcp.telemetry.tier import Tier


class TransportMode(str, enum.Enum):
    PLAIN = "plain"        # one TCP connection, length-prefixed messages; no DWCP on the wire
    TCP_AMST = "tcp-amst"  # a DWCP session striped over N TCP streams
    RDMA = "rdma"          # ibverbs for bulk data and control
    HYBRID = "hybrid"      # RDMA for bulk data, the TCP session for control and small transfers

    def __str__(self) -> str:
        return self.value


def select_mode(*, enabled: bool, killed: str | None, tier: Tier | None, features: frozenset[str],
                rdma_device: str | None, rdma_reason: str = "") -> tuple[TransportMode, str]:
    """(mode, reason). ``killed``: the kill switch's reason when engaged. ``rdma_reason``: why RDMA is
    missing when it is (feature_report()'s words), so the decision can say it."""
    if not enabled:
        return TransportMode.PLAIN, "DWCP is disabled (enabled: false): plain TCP"
    if killed is not None:
        return TransportMode.PLAIN, f"kill switch engaged ({killed}): plain TCP for new channels"
    rdma = "rdma" in features
    no_rdma = f"no RDMA on this host ({rdma_reason or 'backend_features lacks rdma'})"
    if rdma_device and not rdma:
        return TransportMode.TCP_AMST, f"transport.rdma_device={rdma_device!r} is set but there is {no_rdma}: TCP with AMST"
    if tier is None:
        return TransportMode.TCP_AMST, "tier not known yet: TCP with AMST until telemetry decides"
    if tier == Tier.TIER1:
        if rdma and rdma_device:
            return TransportMode.RDMA, f"tier 1 peer and RDMA device {rdma_device!r} configured: RDMA"
        if rdma:
            return TransportMode.HYBRID, "tier 1 peer and an RDMA device: Hybrid (RDMA for bulk, TCP for control)"
        return TransportMode.TCP_AMST, f"tier 1 peer would take Hybrid, but there is {no_rdma}: TCP with AMST"
    if tier == Tier.TIER2:
        return TransportMode.TCP_AMST, "tier 2 peer (high-speed remote): TCP with AMST"
    return TransportMode.TCP_AMST, "tier 3 peer (long or thin link): TCP with AMST and aggressive compression"


def rdma_reason(report: Mapping[str, Mapping[str, object]]) -> str:
    entry = report.get("rdma", {})
    return str(entry.get("reason", ""))
