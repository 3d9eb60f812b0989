"""`dwcp diag`: live per-flow and per-peer link telemetry, like tcptop / `ss -ti`.

Everything shown comes from the library: the source from :func:`dwcp.telemetry.open_source` (with
:func:`dwcp.telemetry.source_info` saying why), flows and peer estimates (tier, bottleneck, min RTT,
confidence) from a :class:`dwcp.telemetry.LinkMonitor`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from dwcp.errors import DWCPError
from dwcp.telemetry import FlowFilter, FlowSample, LinkMonitor, PeerEstimate, open_source, source_info
from dwcp.telemetry.sources import SOURCES

if TYPE_CHECKING:
    from dwcp.control.metrics import PeerMetrics

#: How often the monitor samples the source (the screen refreshes every --interval).
POLL_S = 0.1
BPF_HINT = ("eBPF (all flows, per-ACK samples, open/close events) needs root (CAP_BPF + CAP_PERFMON), "
            "a kernel with BTF and dwcp built with the eBPF toolchain (`dwcp features` says which is "
            "missing); without it inet_diag shows the flows of one namespace (--netns NAME for another), "
            "and tcp_info only a process's own registered sockets")


def _rate(bps: float) -> str:
    for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("Kbit/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.2f} {unit}"
    return f"{bps:.0f} bit/s"


def _bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def _ep(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def flow_json(s: FlowSample) -> dict[str, Any]:
    return {"saddr": s.saddr, "sport": s.sport, "daddr": s.daddr, "dport": s.dport, "state": s.state,
            "srtt_us": s.srtt_us, "min_rtt_us": s.min_rtt_us, "delivery_rate_bps": s.delivery_rate_bps,
            "delivery_app_limited": s.delivery_app_limited, "bytes_acked": s.bytes_acked,
            "bytes_received": s.bytes_received, "retrans": s.retrans, "lost": s.lost, "cwnd": s.cwnd,
            "mss": s.mss, "netns": s.netns, "cookie": s.cookie, "pid": s.pid}


def peer_json(e: PeerEstimate) -> dict[str, Any]:
    return {"peer": e.peer, "tier": int(e.tier) if e.tier is not None else None,
            "bottleneck_bps": e.bottleneck_bps, "min_rtt_us": e.min_rtt_us,
            "confidence": e.tier_confidence if e.tier is not None else e.confidence,
            "estimate_confidence": e.confidence, "throughput_bps": e.throughput_bps,
            "loss_rate": e.loss_rate, "flows": e.flows, "saturated": e.saturated,
            "time_to_decision_s": e.time_to_decision_s, "tier_reason": e.tier_reason}


def refresh_json(monitor: LinkMonitor, info: dict[str, Any]) -> dict[str, Any]:
    flows = sorted(monitor.flows(), key=lambda s: (s.daddr, s.dport, s.saddr, s.sport))
    peers = sorted(monitor.estimates().values(), key=lambda e: e.peer)
    return {"timestamp": time.time(), "source": monitor.source.name, "source_reason": info["reason"],
            "alternatives": info["alternatives"], "flows": [flow_json(s) for s in flows],
            "peers": [peer_json(e) for e in peers]}


def render(doc: dict[str, Any]) -> str:
    out = [f"source: {doc['source']} ({doc['source_reason']})"]
    if doc["source"] != "ebpf":
        out.append(f"note: {BPF_HINT}")
    out.append("")
    out.append(f"{'LOCAL':>24} {'REMOTE':>24} {'STATE':11} {'RTT ms':>8} {'MINRTT':>8} {'DELIVERY':>14} "
               f"{'RETR':>6} {'CWND':>6} {'ACKED':>10} {'RECEIVED':>10}")
    for f in doc["flows"]:
        out.append(f"{_ep(f['saddr'], f['sport']):>24} {_ep(f['daddr'], f['dport']):>24} {f['state'][:11]:11} "
                   f"{f['srtt_us'] / 1000:8.3f} {f['min_rtt_us'] / 1000:8.3f} "
                   f"{_rate(f['delivery_rate_bps']) + ('*' if f['delivery_app_limited'] else ' '):>14} "
                   f"{f['retrans']:6d} {f['cwnd']:6d} {_bytes(f['bytes_acked']):>10} {_bytes(f['bytes_received']):>10}")
    if not doc["flows"]:
        out.append("  (no flows" + (": tcp_info sees only sockets a process registered itself)"
                                    if doc["source"] == "tcp_info" else " match)"))
    out.append("  (* = the kernel marked that delivery-rate sample app-limited)")
    out.append("")
    out.append(f"{'PEER':>24} {'TIER':>5} {'BOTTLENECK':>14} {'THROUGHPUT':>14} {'MIN RTT ms':>10} "
               f"{'LOSS %':>7} {'FLOWS':>5} {'CONF':>5}")
    for p in doc["peers"]:
        tier = str(p["tier"]) if p["tier"] is not None else "?"
        out.append(f"{p['peer']:>24} {tier:>5} {_rate(p['bottleneck_bps']):>14} {_rate(p['throughput_bps']):>14} "
                   f"{p['min_rtt_us'] / 1000:10.3f} {p['loss_rate'] * 100:7.3f} {p['flows']:5d} "
                   f"{p['confidence']:5.2f}")
    return "\n".join(out)


def peer_metrics(e: PeerEstimate) -> PeerMetrics:
    """The monitor's estimate of one peer as metrics (0 bottleneck or RTT: not measured yet)."""
    from dwcp.control.metrics import PeerMetrics

    return PeerMetrics(e.peer, timestamp_s=e.timestamp_s, bottleneck_bps=e.bottleneck_bps or None,
                       throughput_bps=e.throughput_bps, min_rtt_us=e.min_rtt_us or None,
                       loss_ratio=e.loss_rate, tier=int(e.tier) if e.tier is not None else None)


def _serve_metrics(stack: contextlib.ExitStack, monitor: LinkMonitor, port: int) -> None:
    """/metrics on 127.0.0.1:port over the monitor's estimates (read on scrape), closed with ``stack``."""
    from dwcp.control.metrics import default_registry, start_metrics_server

    registry = default_registry()
    stack.callback(registry.add_source(
        "link_monitor", lambda: [peer_metrics(e) for e in monitor.estimates().values()]))
    server = stack.enter_context(start_metrics_server(port, registry=registry))
    click.echo(f"dwcp diag: metrics at {server.url}", err=True)


@click.command()
@click.option("--once", is_flag=True, help="Print one refresh (after one --interval of sampling) and exit.")
@click.option("-i", "--interval", "interval_s", type=click.FloatRange(min=0.2), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per refresh (one per line).")
@click.option("--peer", default=None, help="Only flows to this remote address.")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True,
              help="Only flows with this local or remote port (repeatable).")
@click.option("--pid", type=int, default=None, help="Only sockets of this process.")
@click.option("--cgroup", default=None, help="Only sockets of this cgroup v2 directory.")
@click.option("--source", type=click.Choice(SOURCES), default=None,
              help="Force a telemetry source (default: the best available; also $DWCP_TELEMETRY).")
@click.option("--netns", default=None, help="Watch the flows of this network namespace (`ip netns` name).")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many refreshes.")
@click.option("--metrics-port", "metrics_port", type=click.IntRange(1, 65535), default=None,
              help="While refreshing every --interval, also serve the per-peer estimates as Prometheus "
                   "metrics at http://127.0.0.1:PORT/metrics (not with --once); see docs/metrics.md.")
def diag(once: bool, interval_s: float, as_json: bool, peer: str | None, ports: tuple[int, ...],
         pid: int | None, cgroup: str | None, source: str | None, netns: str | None, count: int | None,
         metrics_port: int | None) -> None:
    """Live link diagnostics: per-flow TCP state and per-peer tier, bottleneck and min RTT."""
    if once and metrics_port is not None:
        raise click.UsageError("--metrics-port serves the live estimates while diag refreshes every "
                               "--interval; --once exits after one refresh, before anything could scrape "
                               "it: drop one of the two")
    flt = FlowFilter(ports=frozenset(ports) if ports else None, peer=peer, pid=pid, cgroup=cgroup)
    try:
        info = source_info(source, netns=netns)
        if info["source"] is None:
            raise click.ClickException(f"{info['reason']}. {BPF_HINT}")
        src = open_source(flt, info["source"], netns=netns, cgroup=cgroup)
    except DWCPError as e:
        raise click.ClickException(f"{e}. {BPF_HINT}") from e
    if not as_json:
        click.echo(f"dwcp diag: source {src.name}: {info['reason']}", err=True)
    refreshes = 1 if once else count
    n = 0
    tty = sys.stdout.isatty() and not as_json
    try:
        with LinkMonitor(src, interval_s=POLL_S) as monitor, contextlib.ExitStack() as metrics:
            if metrics_port is not None:
                _serve_metrics(metrics, monitor, metrics_port)
            monitor.poll()
            monitor.start()
            while True:
                time.sleep(interval_s)
                if monitor.error is not None:
                    raise click.ClickException(f"telemetry stopped: {monitor.error}")
                doc = refresh_json(monitor, info)
                if as_json:
                    click.echo(json.dumps(doc))
                else:
                    click.echo(("\x1b[H\x1b[2J" if tty else "") + render(doc))
                sys.stdout.flush()
                n += 1
                if refreshes is not None and n >= refreshes:
                    return
    except KeyboardInterrupt:
        return
    except DWCPError as e:
        raise click.ClickException(str(e)) from e
