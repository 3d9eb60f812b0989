"""Link telemetry: per-flow samples from the kernel, the link monitor and the tier detector.

    from dwcp import telemetry
    print(telemetry.source_info())                 # which source, and why
    with telemetry.LinkMonitor(telemetry.open_source()).start() as mon:
        mon.subscribe(lambda est: print(est.peer, est.tier, est.bottleneck_bps))
        ...

Sources (best first): ``ebpf`` (all flows, needs CAP_BPF), ``inet_diag`` (all flows of a namespace,
no privileges), ``tcp_info`` (registered sockets only). ``DWCP_TELEMETRY`` forces one. See
docs/telemetry.md.
"""

from typing import Any

from dwcp.telemetry.inet_diag import InetDiagSource
from dwcp.telemetry.monitor import LinkMonitor, PeerEstimate
from dwcp.telemetry.sample import FlowEvent, FlowFilter, FlowSample
from dwcp.telemetry.sources import SOURCES, FlowSource, open_source, source_info
from dwcp.telemetry.tcp_info import TcpInfoSource
from dwcp.telemetry.tier import Tier, TierDecision, TierDetector, TierThresholds

__all__ = ["SOURCES", "FlowEvent", "FlowFilter", "FlowSample", "FlowSource", "InetDiagSource", "LinkMonitor",
           "PeerEstimate", "TcpInfoSource", "Tier", "TierDecision", "TierDetector", "TierThresholds",
           "open_source", "source_info"]


def __getattr__(name: str) -> Any:
    """``EbpfSource`` and ``ebpf_available`` load the compiled ``dwcp._ebpf`` extension, so they are
    imported on first use (an ImportError then says the eBPF build is missing)."""
    if name in ("EbpfSource", "ebpf_available"):
        import importlib
        return getattr(importlib.import_module("dwcp.telemetry.ebpf_source"), name)
    raise AttributeError(f"module 'dwcp.telemetry' has no attribute {name!r}")
