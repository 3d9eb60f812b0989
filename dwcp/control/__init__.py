"""The control plane: configuration, the Manager and its decisions, metrics.

    from dwcp import control
    cfg = control.load_config()                      # defaults < runtime API < file < environment
    mgr = control.Manager(cfg)
    with mgr.open_channel("host:7000", key=KEY) as ch:  # DWCP when enabled and spoken, plain TCP if not
        ch.send(buffer)
    control.start_metrics_server(9464)

Mechanism lives below (transport, compression, telemetry expose knobs); policy lives here. Every decision
is a small object with what was decided, the value, the reason and the inputs it saw. See
docs/configuration.md and docs/tuning.md.
"""

from typing import TYPE_CHECKING, Any

from dwcp._lazy import lazy_attr

if TYPE_CHECKING:
    from dwcp.control.channel import Channel, ChannelListener, DwcpChannel, PlainChannel
    from dwcp.control.config import Config, ConfigChange, load_config
    from dwcp.control.decision import Decision
    from dwcp.control.manager import Manager, ManagerEvent
    from dwcp.control.metrics import MetricsRegistry, PeerMetrics, default_registry, start_metrics_server
    from dwcp.control.mode import TransportMode
    from dwcp.control.plan import PeerPlan

_LAZY = {
    "Channel": "dwcp.control.channel", "ChannelListener": "dwcp.control.channel",
    "DwcpChannel": "dwcp.control.channel", "PlainChannel": "dwcp.control.channel",
    "Config": "dwcp.control.config", "ConfigChange": "dwcp.control.config", "load_config": "dwcp.control.config",
    "Decision": "dwcp.control.decision",
    "Manager": "dwcp.control.manager", "ManagerEvent": "dwcp.control.manager",
    "MetricsRegistry": "dwcp.control.metrics", "PeerMetrics": "dwcp.control.metrics",
    "default_registry": "dwcp.control.metrics", "start_metrics_server": "dwcp.control.metrics",
    "TransportMode": "dwcp.control.mode", "PeerPlan": "dwcp.control.plan",
}

__all__ = ["Channel", "ChannelListener", "Config", "ConfigChange", "Decision", "DwcpChannel", "Manager",
           "ManagerEvent", "MetricsRegistry", "PeerMetrics", "PeerPlan", "PlainChannel", "TransportMode",
           "default_registry", "load_config", "start_metrics_server"]


def __getattr__(name: str) -> Any:
    return lazy_attr(globals(), __name__, _LAZY, name)
