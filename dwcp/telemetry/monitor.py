"""LinkMonitor: the single source of truth for link metrics, per peer.

It polls a :class:`~dwcp.telemetry.sources.FlowSource` (in a background thread, or by calling
:meth:`LinkMonitor.poll` / :meth:`LinkMonitor.ingest` yourself) and keeps, per peer (remote address):

* **bottleneck_bps**: windowed max (``window_s``) of the peer's *aggregate* delivery rate (a DWCP
  session stripes one transfer over many streams, so the path carries the sum). One rate sample per
  poll, measured one of two ways depending on the path's min RTT:

  - **min RTT >= kernel_rate_min_rtt_us (5 ms): the kernel's delivery rate.** The sum, over the
    peer's flows that moved data since the previous poll, of each flow's latest per-ACK delivery-rate
    sample (``tcpi_delivery_rate``: segments *delivered* over the interval they took, at least one
    min RTT long; SACKed data counts when it is SACKed). The sample is the median of these sums over
    the last max(``kernel_rate_span_s`` (0.5), ``kernel_rate_span_rtts`` (4) min RTTs), taken once the
    peer has been active that long, so odd polls (the first ACKs of a ramp, ACKs compressed by a
    delay line catching up after the CPU stalled it) are outvoted: on 10-50 ms paths a median over
    0.2 s (2-3 polls) still read up to 12 % high under contention. Acknowledged *bytes* cannot be used on such a path once it loses packets: the
    cumulative ACK stands still while a hole is repaired (SACKs keep arriving) and then jumps by
    everything SACKed meanwhile, up to several BDPs; a short-span byte rate then reads far above the
    link and the windowed max latches it (measured on the delay line: 0.72 Gbit/s on a 0.5 Gbit/s
    x 100 ms link, 0.15 on 0.1 x 200 ms, even over 8-RTT spans, because a BBR sender with four
    streams keeps the 1-BDP queue overflowing: thousands of repairs, ~6000 segments SACKed ahead of
    the cumulative ACK at any time).
  - **shorter paths: acknowledged bytes over a span.** Bytes acknowledged on all the peer's flows
    over the last rate span, max(``rate_span_s``, ``rate_span_rtts`` (8) min RTTs) on the monitor's
    clock. There the kernel's per-ACK sample is measured over microseconds and reads 3-10x the
    goodput (100-400 Gbit/s on loopback when the goodput is 15; 40-120 on an unshaped veth at 10),
    while the cumulative-ACK jump after a repair is one RTT's worth of data, tiny against a 0.2 s span.

  A sample is app-limited when the kernel marked the latest delivery-rate sample of every active
  flow app-limited; app-limited samples are ignored, unless the window holds no other or they exceed
  the estimate (then the path demonstrably carried that much: a lower bound). A receiving-only host
  sees no acknowledgements; its received goodput counts as an app-limited (lower-bound) sample.
* **min_rtt_us**: windowed min of the kernel's per-flow min RTT (``tcpi_min_rtt``, itself a windowed
  min); a flow without an RTT sample yet (the kernel reports ~0U) does not count.
* **loss_rate**: retransmitted segments / segments sent over the window.
* **confidence** (0..1) = samples x time x saturation: at least ``min_samples`` rate samples, data in
  flight for at least max(``min_active_s``, 10 RTTs), and the estimate has stopped growing (a
  plateau: less than ``plateau_growth`` growth over max(``plateau_min_s``, 8 RTTs)); an estimate that
  is still growing is a lower bound and gets at most 0.4.
* **tier**: a :class:`~dwcp.telemetry.tier.TierDetector` per peer, fed every estimate.

Each poll publishes the updated :class:`PeerEstimate` of every peer that had samples to the
subscribers (callables). Flows of a session registered with :meth:`register_session` (or cookies with
:meth:`register_flow`) are grouped under that session's peer; with ``registered_only=True`` nothing
else counts (useful on loopback, where unrelated flows share the peer address).

Time comes from an injectable ``clock`` (seconds, monotonic), so tests drive it deterministically.
The monitor owns its source: :meth:`close` (also on leaving the ``with`` block, and when the polling
thread dies of an exception) closes it, which detaches BPF programs.
"""

from __future__ import annotations

import logging
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dwcp._listeners import Listeners
from dwcp.errors import ConfigError, DWCPError
from dwcp.telemetry.sample import FlowSample
from dwcp.telemetry.sources import FlowSource
from dwcp.telemetry.tcp_info import socket_cookie
from dwcp.telemetry.tier import Tier, TierDetector, TierThresholds

log = logging.getLogger(__name__)

#: What TCP_INFO (``tcpi_min_rtt``) and ``tcp_sock.rtt_min`` hold before the first RTT sample (~0U).
_NO_RTT_US = 0xFFFFFFFF


@dataclass(frozen=True)
class PeerEstimate:
    """What the monitor believes about the path to one peer, at ``timestamp_s`` (monitor clock)."""

    peer: str
    timestamp_s: float
    bottleneck_bps: float = 0.0     # windowed max of the aggregate delivery rate (see the module doc)
    throughput_bps: float = 0.0     # aggregate goodput over the last rate span
    min_rtt_us: int = 0             # windowed min RTT
    srtt_us: int = 0                # mean smoothed RTT of the active flows
    loss_rate: float = 0.0          # retransmitted / sent segments over the window
    retrans: int = 0                # retransmitted segments over the window
    flows: int = 0                  # flows seen in the latest poll
    samples: int = 0                # rate samples in the window (not app-limited)
    saturated: bool = False         # the estimate has stopped growing (a plateau)
    app_limited: bool = True        # every rate sample in the window was app-limited (a lower bound)
    confidence: float = 0.0         # 0..1, see the module doc
    active: bool = False            # data moved since the previous poll
    active_since_s: float | None = None
    tier: Tier | None = None
    tier_confidence: float = 0.0
    tier_reason: str = ""
    time_to_decision_s: float | None = None
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tier"] = int(self.tier) if self.tier is not None else None
        return d


@dataclass
class _Flow:
    peer: str
    last: FlowSample
    last_poll_s: float


@dataclass
class _Peer:
    rates: deque[tuple[float, float, bool]] = field(default_factory=deque)   # (t, bps, app_limited)
    rtts: deque[tuple[float, int]] = field(default_factory=deque)            # (t, min_rtt_us)
    losses: deque[tuple[float, int, float]] = field(default_factory=deque)   # (t, retrans, segs sent)
    history: deque[tuple[float, float]] = field(default_factory=deque)       # (t, bottleneck)
    counters: deque[tuple[float, int, int]] = field(default_factory=deque)   # (t, acked, received)
    kernel_rates: deque[tuple[float, float, bool]] = field(default_factory=deque)  # (t, sum bps, app_limited)
    acked_total: int = 0
    recv_total: int = 0
    active_since_s: float | None = None
    last_active_s: float | None = None
    detector: TierDetector | None = None
    estimate: PeerEstimate | None = None


class LinkMonitor:
    """Per-peer link estimates from a flow source; see the module doc.

    ``source`` is any FlowSource (``dwcp.telemetry.open_source()`` picks one). ``interval_s`` is the
    polling period of :meth:`start`'s thread."""

    def __init__(self, source: FlowSource, *, interval_s: float = 0.1, window_s: float = 10.0,
                 registered_only: bool = False, thresholds: TierThresholds | None = None,
                 clock: Callable[[], float] = time.monotonic, min_samples: int = 5,
                 min_active_s: float = 0.3, rate_span_s: float = 0.2, rate_span_rtts: float = 8.0,
                 plateau_min_s: float = 0.3, plateau_growth: float = 0.1,
                 idle_s: float = 1.0, kernel_rate_min_rtt_us: int = 5000,
                 kernel_rate_span_s: float = 0.5, kernel_rate_span_rtts: float = 4.0) -> None:
        if interval_s <= 0 or window_s <= 0:
            raise ConfigError("LinkMonitor: interval_s and window_s must be > 0")
        if kernel_rate_min_rtt_us < 0 or kernel_rate_span_s < 0 or kernel_rate_span_rtts < 0:
            raise ConfigError("LinkMonitor: kernel_rate_min_rtt_us, kernel_rate_span_s and kernel_rate_span_rtts "
                              "must be >= 0")
        self.source = source
        self.interval_s = interval_s
        self.window_s = window_s
        self.registered_only = registered_only
        self.thresholds = thresholds or TierThresholds()
        self.clock = clock
        self.min_samples = min_samples
        self.min_active_s = min_active_s
        self.rate_span_s = rate_span_s
        self.rate_span_rtts = rate_span_rtts
        self.plateau_min_s = plateau_min_s
        self.plateau_growth = plateau_growth
        self.idle_s = idle_s
        self.kernel_rate_min_rtt_us = kernel_rate_min_rtt_us
        self.kernel_rate_span_s = kernel_rate_span_s
        self.kernel_rate_span_rtts = kernel_rate_span_rtts
        self._lock = threading.RLock()
        self._flows: dict[int, _Flow] = {}
        self._peers: dict[str, _Peer] = {}
        self._registered: dict[int, str] = {}
        self._subscribers: Listeners[PeerEstimate] = Listeners("link monitor", log)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self.error: BaseException | None = None
        self.events: deque[Any] = deque(maxlen=1000)  # latest FlowEvents from the source

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> LinkMonitor:
        """Poll in a background thread every ``interval_s`` (idempotent)."""
        if self._closed:
            raise ConfigError("LinkMonitor is closed; make a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dwcp-link-monitor", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.poll()
        except BaseException as e:
            self.error = e
            log.error("link monitor stopped: %s", e, exc_info=True)
            self._close_source()

    def close(self) -> None:
        """Stop polling and close the source (detaching BPF programs). Idempotent."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
        self._close_source()

    def _close_source(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.source.close()
        except Exception as e:
            log.warning("closing telemetry source %s failed: %s", self.source.name, e)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> LinkMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    # ---- registration and subscribers --------------------------------------------------------------
    def subscribe(self, callback: Callable[[PeerEstimate], None]) -> Callable[[], None]:
        """Call ``callback(estimate)`` after every poll for each peer with samples; returns an
        unsubscribe function. Callbacks run in the polling thread: keep them short."""
        return self._subscribers.subscribe(callback)

    def register_flow(self, cookie: int, peer: str) -> None:
        """Count the flow with this socket cookie under ``peer``."""
        with self._lock:
            self._registered[cookie] = peer

    def register_socket(self, sock: socket.socket, peer: str | None = None) -> int:
        """Register a connected TCP socket (and watch it, if the source is a TcpInfoSource)."""
        add = getattr(self.source, "add", None)
        cookie = add(sock) if callable(add) else socket_cookie(sock)
        self.register_flow(int(cookie), peer or str(sock.getpeername()[0]))
        return int(cookie)

    def register_session(self, session: Any) -> str:
        """Register every data stream of a :class:`dwcp.Session` under the session's peer address, so
        the peer's estimate combines all its streams. Returns the peer key."""
        peer = str(session.peer[0])
        for s in session.data_sockets():
            try:
                self.register_socket(s, peer)
            except OSError as e:  # a stream that already died
                log.debug("not registering a closed stream of %r: %s", session, e)
        return peer

    def unregister(self, cookie: int) -> None:
        with self._lock:
            self._registered.pop(cookie, None)
        remove = getattr(self.source, "remove", None)
        if callable(remove):
            remove(cookie)

    # ---- reading ------------------------------------------------------------------------------------
    def estimates(self) -> dict[str, PeerEstimate]:
        with self._lock:
            return {p: st.estimate for p, st in self._peers.items() if st.estimate is not None}

    def estimate(self, peer: str) -> PeerEstimate | None:
        with self._lock:
            st = self._peers.get(peer)
            return st.estimate if st else None

    def flows(self) -> list[FlowSample]:
        """The latest sample of every flow the monitor counts."""
        with self._lock:
            return [f.last for f in self._flows.values()]

    # ---- the work -------------------------------------------------------------------------------------
    def poll(self) -> dict[str, PeerEstimate]:
        """Take one snapshot from the source and update (and publish) the estimates."""
        if self._closed:
            raise DWCPError("LinkMonitor is closed (its source too); make a new one")
        samples = self.source.snapshot()
        try:
            self.events.extend(self.source.events())
        except DWCPError as e:
            log.debug("events from %s: %s", self.source.name, e)
        return self.ingest(samples)

    def ingest(self, samples: Iterable[FlowSample], now: float | None = None) -> dict[str, PeerEstimate]:
        """Update the estimates with one poll's worth of samples (what :meth:`poll` does with the
        source's snapshot; tests feed synthetic samples here)."""
        now = self.clock() if now is None else now
        per_peer: dict[str, list[tuple[FlowSample, FlowSample | None]]] = {}
        with self._lock:
            seen: set[int] = set()
            for s in samples:
                peer = self._registered.get(s.cookie)
                if peer is None:
                    if self.registered_only:
                        continue
                    peer = s.peer
                prev = self._flows.get(s.cookie)
                self._flows[s.cookie] = _Flow(peer, s, now)
                seen.add(s.cookie)
                per_peer.setdefault(peer, []).append((s, prev.last if prev else None))
            # Flows not seen for a while are gone (closed, or filtered out now).
            for cookie in [c for c, f in self._flows.items() if c not in seen and now - f.last_poll_s > self.idle_s]:
                del self._flows[cookie]
            out = {peer: self._update_peer(peer, pairs, now) for peer, pairs in per_peer.items()}
        for est in out.values():
            self._subscribers.notify(est)
        return out

    def _update_peer(self, peer: str, pairs: list[tuple[FlowSample, FlowSample | None]],
                     now: float) -> PeerEstimate:
        st = self._peers.get(peer)
        if st is None:
            st = self._peers[peer] = _Peer(detector=TierDetector(self.thresholds))
        all_app_limited = True
        d_acked_sum = 0
        d_recv_sum = 0
        retrans = 0
        segs = 0.0
        active = False
        srtts: list[int] = []
        kernel_sum = 0.0
        kernel_app_limited = True
        for s, prev in pairs:
            if 0 < s.min_rtt_us < _NO_RTT_US:
                st.rtts.append((now, s.min_rtt_us))
            if prev is None:
                continue
            d_acked = max(0, s.bytes_acked - prev.bytes_acked)
            d_recv = max(0, s.bytes_received - prev.bytes_received)
            d_sent = max(0, s.bytes_sent - prev.bytes_sent)
            if (d_acked > 0 or d_sent > 0) and s.delivery_rate_bps > 0:
                # A flow that moved data since the last poll: its latest per-ACK sample is current.
                kernel_sum += s.delivery_rate_bps
                kernel_app_limited = kernel_app_limited and s.delivery_app_limited
            if d_acked > 0:
                active = True
                d_acked_sum += d_acked
                if s.srtt_us > 0:
                    srtts.append(s.srtt_us)
                all_app_limited = all_app_limited and s.delivery_app_limited
            if d_recv > 0:
                active = True
                d_recv_sum += d_recv
            retrans += max(0, s.retrans - prev.retrans)
            if d_sent > 0:
                segs += d_sent / max(s.mss, 536)
        if active:
            st.last_active_s = now
            if st.active_since_s is None:
                st.active_since_s = now
                st.counters.clear()  # a new ramp: rates are measured from its start
                st.kernel_rates.clear()
        elif st.last_active_s is not None and now - st.last_active_s > self.idle_s:
            st.active_since_s = None  # the next burst starts a new ramp
        # Delivery rate over the last rate span (at least max(rate_span_s, rate_span_rtts RTTs), so that bursts of
        # ACKs on long paths average out): cumulative bytes on the monitor's clock.
        st.acked_total += d_acked_sum
        st.recv_total += d_recv_sum
        st.counters.append((now, st.acked_total, st.recv_total))
        min_rtt_now = min((r for _, r in st.rtts), default=0)
        span = max(self.rate_span_s, self.rate_span_rtts * min_rtt_now / 1e6)
        goodput = recv_goodput = 0.0
        base = None
        for c in st.counters:
            if c[0] <= now - span:
                base = c
            else:
                break
        if base is not None:
            while st.counters and st.counters[0][0] < base[0]:
                st.counters.popleft()
            dt = now - base[0]
            goodput = (st.acked_total - base[1]) * 8 / dt
            recv_goodput = (st.recv_total - base[2]) * 8 / dt
        if kernel_sum > 0:
            st.kernel_rates.append((now, kernel_sum, kernel_app_limited))
        # A long path whose source reports per-ACK rates: they are the rate samples (none until the
        # first kernel span is complete); else acknowledged bytes over the rate span (module doc).
        if min_rtt_now >= self.kernel_rate_min_rtt_us and st.kernel_rates:
            kernel_rate = self._kernel_rate(st, now, min_rtt_now)
            if kernel_rate is not None:
                st.rates.append((now, *kernel_rate))
        elif goodput > 0:
            st.rates.append((now, goodput, all_app_limited))
        elif recv_goodput > 0:
            st.rates.append((now, recv_goodput, True))
        if retrans or segs:
            st.losses.append((now, retrans, segs))
        horizon = now - self.window_s
        for dq in (st.rates, st.rtts, st.losses, st.history, st.kernel_rates):
            while dq and dq[0][0] < horizon:
                dq.popleft()

        full = [r for _, r, app in st.rates if not app]
        limited = [r for _, r, app in st.rates if app]
        bottleneck = max(full, default=0.0)
        if not full or max(limited, default=0.0) > bottleneck:
            bottleneck = max(bottleneck, max(limited, default=0.0))
        min_rtt = min((r for _, r in st.rtts), default=0)
        st.history.append((now, bottleneck))
        rtt_s = min_rtt / 1e6
        # Plateau: the estimate grew less than plateau_growth over the last plateau span.
        span = max(self.plateau_min_s, 8 * rtt_s)
        saturated = False
        if st.active_since_s is not None and now - st.active_since_s >= span and bottleneck > 0:
            older = [b for t, b in st.history if t <= now - span]
            if older and bottleneck <= older[-1] * (1 + self.plateau_growth):
                saturated = True
        total_retrans = sum(r for _, r, _ in st.losses)
        total_segs = sum(sg for _, _, sg in st.losses)
        active_s = now - st.active_since_s if st.active_since_s is not None else 0.0
        f_samples = min(1.0, len(full) / self.min_samples)
        f_time = min(1.0, active_s / max(self.min_active_s, 10 * rtt_s))
        f_sat = 1.0 if saturated else 0.4
        est = PeerEstimate(
            peer=peer, timestamp_s=now, bottleneck_bps=bottleneck, throughput_bps=goodput or recv_goodput,
            min_rtt_us=min_rtt, srtt_us=int(sum(srtts) / len(srtts)) if srtts else 0,
            loss_rate=total_retrans / total_segs if total_segs else 0.0, retrans=total_retrans,
            flows=len(pairs), samples=len(full), saturated=saturated, app_limited=not full,
            confidence=round(f_samples * f_time * f_sat, 3), active=active,
            active_since_s=st.active_since_s, source=pairs[0][0].source if pairs else "")
        assert st.detector is not None
        d = st.detector.update(est)
        est = replace(est, tier=d.tier, tier_confidence=d.confidence, tier_reason=d.reason,
                      time_to_decision_s=d.time_to_decision_s)
        st.estimate = est
        return est

    def _kernel_rate(self, st: _Peer, now: float, min_rtt_us: int) -> tuple[float, bool] | None:
        """(bps, app_limited): the median of the per-poll sums of the kernel's delivery rates over the
        last kernel span, once the peer has been active that long; None before (or without samples).
        The median is over the samples that were not app-limited if there are any."""
        span = max(self.kernel_rate_span_s, self.kernel_rate_span_rtts * min_rtt_us / 1e6)
        if st.active_since_s is None or now - st.active_since_s < span:
            return None
        recent = [(bps, app) for t, bps, app in st.kernel_rates if t > now - span]
        full = [bps for bps, app in recent if not app]
        if full:
            return statistics.median(full), False
        if recent:
            return statistics.median(bps for bps, _ in recent), True
        return None
