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

from typing import TYPE_CHECKING, Any

from dwcp._lazy import lazy_attr

if TYPE_CHECKING:
    from dwcp.telemetry.ebpf_source import EbpfSource, ebpf_available
    from dwcp.telemetry.inet_diag import InetDiagSource
    from dwcp.telemetry.monitor import LinkMonitor, PeerEstimate
    from dwcp.telemetry.sample import FlowEvent, FlowFilter, FlowSample
    from dwcp.telemetry.sources import SOURCES, FlowSource, open_source, source_info
    from dwcp.telemetry.tcp_info import TcpInfoSource
    from dwcp.telemetry.tier import Tier, TierDecision, TierDetector, TierThresholds

# Everything loads on first use: a Session imports dwcp.telemetry.tcp_info, and should not pay for
# the monitor and pyroute2 with it. EbpfSource and ebpf_available also need the compiled dwcp._ebpf
# extension (an ImportError then says the eBPF build is missing).
_LAZY = {
    "EbpfSource": "dwcp.telemetry.ebpf_source", "ebpf_available": "dwcp.telemetry.ebpf_source",
    "InetDiagSource": "dwcp.telemetry.inet_diag",
    "LinkMonitor": "dwcp.telemetry.monitor", "PeerEstimate": "dwcp.telemetry.monitor",
    "FlowEvent": "dwcp.telemetry.sample", "FlowFilter": "dwcp.telemetry.sample",
    "FlowSample": "dwcp.telemetry.sample",
    "SOURCES": "dwcp.telemetry.sources", "FlowSource": "dwcp.telemetry.sources",
    "open_source": "dwcp.telemetry.sources", "source_info": "dwcp.telemetry.sources",
    "TcpInfoSource": "dwcp.telemetry.tcp_info",
    "Tier": "dwcp.telemetry.tier", "TierDecision": "dwcp.telemetry.tier",
    "TierDetector": "dwcp.telemetry.tier", "TierThresholds": "dwcp.telemetry.tier",
}

__all__ = ["SOURCES", "FlowEvent", "FlowFilter", "FlowSample", "FlowSource", "InetDiagSource", "LinkMonitor",
           "PeerEstimate", "TcpInfoSource", "Tier", "TierDecision", "TierDetector", "TierThresholds",
           "open_source", "source_info"]


def __getattr__(name: str) -> Any:
    return lazy_attr(globals(), __name__, _LAZY, name)
