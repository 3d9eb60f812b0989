"""The Manager: per peer, tier -> transport mode -> stream count -> compression level, re-decided on events.

It listens to three things and decides nothing on its own timer:

* the link monitor's estimates (``LinkMonitor.subscribe``): a tier change, or a link that degraded
  (its saturated bottleneck fell by ``degrade_fraction`` below the best seen since the last decision),
  or a bottleneck that moved far from the one the current plan assumed;
* configuration changes (``Config.subscribe``): every peer is re-decided, nothing restarts;
* the kernel's network events (``netlink=True``): a link going down or a route changing re-decides
  the peers routed through it, before telemetry could notice (a stalled flow sends no samples).

Each decision is a :class:`~dwcp.control.decision.Decision` (what, value, reason, inputs) that is
logged, kept (``decisions()``, ``stats()``), counted in metrics and published to subscribers as a
``ManagerEvent`` together with the event that caused it, so a stream tuner or an application can react.
Time comes from an injectable clock.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dwcp._listeners import Listeners
from dwcp.control.decision import Decision
from dwcp.control.plan import LinkView, PeerPlan, PlanInputs, make_plan
from dwcp.errors import ConfigError

if TYPE_CHECKING:
    from dwcp.control.channel import Channel, ChannelListener
    from dwcp.control.config import Config, ConfigChange
    from dwcp.control.metrics import MetricsRegistry
    from dwcp.control.netevents import NetEvent, NetlinkWatcher
    from dwcp.telemetry.monitor import LinkMonitor, PeerEstimate

log = logging.getLogger(__name__)

#: A bottleneck this far from the one the plan assumed re-decides the plan (its compression level
#: depends on the rate) without being a "degraded" event.
REPLAN_RATE_CHANGE = 0.3


@dataclass(frozen=True)
class ManagerEvent:
    kind: str                    # "tier_changed" | "link_degraded" | "config_changed" | "link_up" |
                                 # "link_down" | "route_added" | "route_removed" | "kill_switch" | "decision"
    peer: str = ""               # "" when it concerns every peer
    detail: str = ""
    at_s: float = 0.0
    decision: Decision | None = None   # kind "decision": the new decision
    cause: str = ""              # kind "decision": the event kind that led to it
    reprobe: bool = False        # the path may have changed: adaptive loops should measure again

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "peer": self.peer, "detail": self.detail, "at_s": round(self.at_s, 6),
                "cause": self.cause, "reprobe": self.reprobe,
                "decision": self.decision.to_json() if self.decision is not None else None}


@dataclass
class _PeerState:
    link: LinkView = field(default_factory=LinkView)
    plan: PeerPlan | None = None
    planned_bps: float = 0.0        # the bottleneck the current plan saw
    reference_bps: float = 0.0      # best saturated bottleneck since the last decision
    degraded: bool = False
    oif: int | None = None          # interface the kernel routes this peer through (netlink)


def peer_key(address: str) -> str:
    """The Manager's (and LinkMonitor's) name for a peer: its IP address, from 'host', 'host:port',
    '[v6]:port' or an IP."""
    host = address
    if address.startswith("["):
        host = address[1:address.index("]")]
    elif address.count(":") == 1:
        host = address.rsplit(":", 1)[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except OSError as e:
        raise ConfigError(f"peer {address!r}: cannot resolve {host!r} ({e.strerror or e})") from e


class Manager:
    """Decides, per peer, how DWCP moves data; see the module doc.

    config: a :class:`~dwcp.control.config.Config` (default: ``load_config()``: defaults, the system
    file, the environment). monitor: a running LinkMonitor whose estimates drive tier and degradation
    events (optional: without one, peers keep the plan made from configuration alone). metrics: the
    registry decisions are counted in (default: the process-wide one). features: what the host can do
    (default: ``dwcp.backend_features``; tests pass a set). netlink: watch link/route events (True, or a
    network namespace name)."""

    def __init__(self, config: Config | None = None, *, monitor: LinkMonitor | None = None,
                 metrics: MetricsRegistry | None = None, features: frozenset[str] | None = None,
                 rdma_reason: str | None = None, netlink: bool | str = False,
                 clock: Callable[[], float] = time.monotonic, degrade_fraction: float = 0.3,
                 history: int = 1000, cores: int | None = None) -> None:
        if not 0 < degrade_fraction < 1:
            raise ConfigError(f"degrade_fraction {degrade_fraction}: a fraction in (0, 1)")
        if config is None:
            from dwcp.control.config import load_config
            config = load_config()
        self.config = config
        self.clock = clock
        self.degrade_fraction = degrade_fraction
        if features is None or rdma_reason is None:
            from dwcp._features import backend_features, feature_report
            features = backend_features() if features is None else features
            rdma_reason = str(feature_report().get("rdma", {}).get("reason", "")) if rdma_reason is None else rdma_reason
        self.features = frozenset(features)
        self.rdma_reason = rdma_reason
        self.cores = cores or len(os.sched_getaffinity(0))
        if metrics is None:
            from dwcp.control.metrics import default_registry
            metrics = default_registry()
        self.metrics = metrics
        self._lock = threading.RLock()
        self._peers: dict[str, _PeerState] = {}
        self._history: deque[Decision] = deque(maxlen=history)
        self._events: deque[ManagerEvent] = deque(maxlen=history)
        self._listeners: Listeners[ManagerEvent] = Listeners("Manager", log)
        self._killed: str | None = None
        self._closed = False
        self._unsubscribe: list[Callable[[], None]] = [config.subscribe(self._on_config_change)]
        self.monitor = monitor
        if monitor is not None and config.features.telemetry:
            # features.telemetry: false keeps the plan to configuration alone (no tier, no degradation).
            self._unsubscribe.append(monitor.subscribe(self.on_estimate))
        self._watcher: NetlinkWatcher | None = None
        if netlink:
            from dwcp.control.netevents import NetlinkWatcher
            self._watcher = NetlinkWatcher(self.on_net_event, netns=netlink if isinstance(netlink, str) else None,
                                           clock=clock)
        self._remove_source = self.metrics.add_source("manager", self._metric_rows)

    # ---- life cycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop listening (the monitor and config stay the caller's)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._remove_source()
        if self._watcher is not None:
            self._watcher.close()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- subscriptions -------------------------------------------------------------------------------
    def subscribe(self, listener: Callable[[ManagerEvent], None]) -> Callable[[], None]:
        """listener(ManagerEvent) for every event and every changed decision, called in the thread that
        caused it (monitor, netlink, or the one that changed the config); returns unsubscribe."""
        return self._listeners.subscribe(listener)

    def _publish(self, events: list[ManagerEvent]) -> None:
        with self._lock:
            self._events.extend(events)
        for e in events:
            if e.kind != "decision":
                log.info("%s%s: %s", e.kind, f" ({e.peer})" if e.peer else "", e.detail)
            self._listeners.notify(e)

    # ---- queries ---------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.config.enabled)

    @property
    def killed(self) -> str | None:
        """The kill switch's reason while it is engaged, else None."""
        return self._killed

    def plan(self, peer: str) -> PeerPlan:
        """The current plan for peer ('host', 'host:port' or an IP); decided now if there is none."""
        key = peer_key(peer)
        events: list[ManagerEvent] = []
        self._track(key)
        with self._lock:
            state = self._peers[key]
            if state.plan is None:
                events = self._replan(key, state, cause="first use")
            plan = state.plan
        self._publish(events)
        assert plan is not None
        return plan

    def peers(self) -> dict[str, PeerPlan]:
        with self._lock:
            return {k: s.plan for k, s in self._peers.items() if s.plan is not None}

    def decisions(self, peer: str | None = None) -> list[Decision]:
        """Decisions made so far (oldest first), for one peer or all."""
        key = peer_key(peer) if peer is not None else None
        with self._lock:
            return [d for d in self._history if key is None or d.peer == key]

    def events(self) -> list[ManagerEvent]:
        with self._lock:
            return list(self._events)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"enabled": self.enabled, "killed": self._killed,
                    "features": sorted(self.features),
                    "peers": {k: s.plan.to_json() for k, s in self._peers.items() if s.plan is not None},
                    "decisions": [d.to_json() for d in list(self._history)[-50:]]}

    # ---- inputs ----------------------------------------------------------------------------------------
    def on_estimate(self, est: PeerEstimate) -> None:
        """Feed one link estimate (the monitor calls this for every poll with samples)."""
        key = est.peer
        link = LinkView(tier=est.tier, tier_reason=est.tier_reason, bottleneck_bps=est.bottleneck_bps,
                        min_rtt_us=est.min_rtt_us, loss_rate=est.loss_rate, confidence=est.confidence)
        self._track(key)
        now = self.clock()
        events: list[ManagerEvent] = []
        with self._lock:
            if self._closed:
                return
            state = self._peers[key]
            old = state.link
            state.link = link
            cause = ""
            if link.tier is not None and link.tier != old.tier:
                detail = (f"{old.tier} -> {link.tier}: {link.tier_reason}" if old.tier is not None
                          else f"first decision {link.tier}: {link.tier_reason}")
                events.append(ManagerEvent("tier_changed", key, detail, now, reprobe=old.tier is not None))
                cause = "tier_changed"
                state.reference_bps = 0.0
                state.degraded = False
            if est.saturated and not est.app_limited:
                if (state.reference_bps > 0 and not state.degraded
                        and est.bottleneck_bps < (1 - self.degrade_fraction) * state.reference_bps):
                    state.degraded = True
                    events.append(ManagerEvent(
                        "link_degraded", key,
                        f"bottleneck {est.bottleneck_bps / 1e6:,.1f} Mbit/s, down from {state.reference_bps / 1e6:,.1f} "
                        f"({100 * (1 - est.bottleneck_bps / state.reference_bps):.0f} % less; loss {est.loss_rate:.2%})",
                        now, reprobe=True))
                    cause = cause or "link_degraded"
                    state.reference_bps = est.bottleneck_bps
                elif est.bottleneck_bps >= state.reference_bps:
                    state.reference_bps = est.bottleneck_bps
                    state.degraded = False
            moved = (state.planned_bps > 0 and link.bottleneck_bps > 0
                     and abs(link.bottleneck_bps - state.planned_bps) > REPLAN_RATE_CHANGE * state.planned_bps)
            if state.plan is None or cause or moved or (state.planned_bps == 0 and link.bottleneck_bps > 0):
                events += self._replan(key, state, cause=cause or ("rate_changed" if moved else "estimate"))
        self._publish(events)

    def _track(self, key: str) -> None:
        """Make sure peer key has a state; a new one learns which interface the kernel routes it
        through (a netlink round trip, so outside the lock), to tell which peers a link event touches."""
        with self._lock:
            if key in self._peers:
                return
        oif = self._watcher.route_oif(key) if self._watcher is not None else None
        with self._lock:
            self._peers.setdefault(key, _PeerState(oif=oif))

    def on_net_event(self, event: NetEvent) -> None:
        """A link or route changed (the netlink watcher calls this)."""
        events: list[ManagerEvent] = []
        with self._lock:
            if self._closed:
                return
            peers = list(self._peers)
        # Route lookups are netlink round trips: outside the lock.
        routes = {p: (self._watcher.route_oif(p) if self._watcher is not None else None) for p in peers}
        now = self.clock()
        with self._lock:
            affected = []
            for p in peers:
                state = self._peers.get(p)
                if state is None:
                    continue
                oif = routes[p]
                if event.kind.startswith("link") and (state.oif == event.ifindex or oif == event.ifindex):
                    affected.append(p)
                elif event.kind.startswith("route") and oif != state.oif:
                    affected.append(p)
                state.oif = oif
            events.append(ManagerEvent(event.kind, "", str(event), now, reprobe=bool(affected)))
            for p in affected:
                state = self._peers[p]
                events.append(ManagerEvent(event.kind, p, f"{event} affects the path to {p}", now, reprobe=True))
                state.reference_bps = 0.0
                events += self._replan(p, state, cause=event.kind)
        self._publish(events)

    def _on_config_change(self, change: ConfigChange) -> None:
        now = self.clock()
        events = [ManagerEvent("config_changed", "", f"{change.key}: {change.old!r} -> {change.new!r} ({change.source})",
                               now)]
        with self._lock:
            if self._closed:
                return
            for p, state in self._peers.items():
                events += self._replan(p, state, cause="config_changed")
        self._publish(events)

    # ---- kill switch -----------------------------------------------------------------------------------
    def kill_switch(self, reason: str = "engaged by operator") -> None:
        """From now on open_channel() gives plain TCP channels; transfers already running finish on
        their DWCP sessions."""
        self._set_killed(reason or "engaged by operator")

    def release_kill_switch(self) -> None:
        self._set_killed(None)

    def _set_killed(self, reason: str | None) -> None:
        now = self.clock()
        with self._lock:
            if self._killed == reason:
                return
            self._killed = reason
            events = [ManagerEvent("kill_switch", "", f"engaged: {reason}" if reason else "released", now)]
            for p, state in self._peers.items():
                events += self._replan(p, state, cause="kill_switch")
        self._publish(events)

    # ---- deciding ----------------------------------------------------------------------------------------
    def _inputs(self) -> PlanInputs:
        cfg = self.config
        t, c, f = cfg.transport, cfg.compression, cfg.features
        return PlanInputs(enabled=bool(cfg.enabled), killed=self._killed, features=self.features,
                          rdma_device=t.rdma_device, rdma_reason=self.rdma_reason, min_streams=t.min_streams,
                          max_streams=t.max_streams, initial_streams=t.initial_streams,
                          compression_enabled=c.enabled, compression_level=c.level,
                          adaptive_compression=f.adaptive_compression, cores=self.cores)

    def _replan(self, peer: str, state: _PeerState, *, cause: str) -> list[ManagerEvent]:
        """New plan for peer (lock held); the decisions that changed, as events."""
        now = self.clock()
        plan = make_plan(peer, state.link, self._inputs(), now)
        old = state.plan
        state.plan = plan
        state.planned_bps = state.link.bottleneck_bps
        events = []
        for what, d in plan.decisions.items():
            if old is not None and old.decisions[what].value == d.value:
                continue
            self._history.append(d)
            log.info("decision (%s): %s", cause, d)
            self.metrics.count_decision(peer, what)
            events.append(ManagerEvent("decision", peer, str(d), now, decision=d, cause=cause))
        return events

    def _metric_rows(self) -> list[Any]:
        from dwcp.control.metrics import PeerMetrics
        rows = []
        with self._lock:
            for p, s in self._peers.items():
                if s.plan is None:
                    continue
                # Streams are the sessions' to report (they add up per peer); the plan's count is a
                # decision, counted with the others.
                rows.append(PeerMetrics(peer=p, tier=int(s.plan.tier) if s.plan.tier is not None else None,
                                        compression_level=s.plan.compression_level,
                                        bottleneck_bps=s.link.bottleneck_bps or None,
                                        min_rtt_us=s.link.min_rtt_us or None))
        return rows

    # ---- channels ----------------------------------------------------------------------------------------
    def open_channel(self, address: str | tuple[str, int], **kwargs: Any) -> Channel:
        """A channel to address: a DWCP session when DWCP is enabled, the kill switch is off and the
        peer speaks DWCP; otherwise a plain TCP channel with the same send/recv API. The choice and
        why is ``channel.decision``. kwargs go to dwcp.connect() (key, key_file, insecure, ...)."""
        from dwcp.control.channel import open_channel
        return open_channel(self, address, **kwargs)

    def listen_channels(self, address: str | tuple[str, int] = ("127.0.0.1", 0), **kwargs: Any) -> ChannelListener:
        """Accept channels on address: DWCP sessions and plain TCP channels alike (told apart by their
        first bytes). kwargs go to dwcp.listen()."""
        from dwcp.control.channel import ChannelListener
        return ChannelListener(self, address, **kwargs)

    def note_channel(self, peer: str, decision: Decision) -> None:
        """Record a channel decision made by open_channel (kept and counted like the others)."""
        with self._lock:
            self._history.append(decision)
        self.metrics.count_decision(peer, decision.what)
        self._publish([ManagerEvent("decision", peer, str(decision), decision.at_s, decision=decision,
                                    cause="open_channel")])

