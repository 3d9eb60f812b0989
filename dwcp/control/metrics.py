"""One Prometheus registry for DWCP: per-peer link, transport, compression and control metrics.

    reg = default_registry()
    remove = reg.add_source("sessions", lambda: [PeerMetrics("10.0.0.2", sent_bytes=n, streams=8)])
    reg.count_decision("10.0.0.2", "streams")
    reg.observe_sample("rtt_seconds", "10.0.0.2", 0.0042)
    with start_metrics_server(9464):            # http://127.0.0.1:9464/metrics
        ...

Nothing here runs on the data path. Components that own counters (sessions, the link monitor) are
*sources*: callables registered with :meth:`MetricsRegistry.add_source` that report
:class:`PeerMetrics` when somebody reads the metrics (a scrape, :meth:`MetricsRegistry.render`,
:meth:`MetricsRegistry.snapshot`). The reports are merged per peer (counters and stream counts add up,
path properties: the latest report wins), cached for ``cache_ttl_s`` so several readers within the TTL
don't call the sources again, and exported by one collector that computes on scrape (client_python's
custom-collector pattern). Events that have no owner to ask later (decisions, bytes of finished
transfers) are counted with the event methods; high-frequency values go through
:meth:`MetricsRegistry.observe_sample` into fixed-bucket histograms (bounded memory, O(log buckets)).

Per-peer series are capped at ``max_peers`` distinct peers (first come, for the registry's life);
later peers are folded into ``peer="other"``. Process-wide totals (``dwcp_process_*``) cover every
peer, folded or not. docs/metrics.md lists every metric, its labels and what it means.
"""

from __future__ import annotations

import bisect
import errno as _errno
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client import generate_latest, make_wsgi_app
from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily, Metric)

from dwcp.errors import ConfigError, DWCPError

if TYPE_CHECKING:
    from dwcp.transport.session import Session

log = logging.getLogger(__name__)

#: The label value every peer beyond the cap is folded into.
OTHER_PEER = "other"
#: What a histogram's name must look like: dwcp_<subsystem>_<name>_<unit>.
_SAMPLE_METRIC_RE = re.compile(r"dwcp(_[a-z0-9]+){2,}")
#: Distinct ``what`` values of the decisions counter (they come from code, not data; a cap anyway).
MAX_DECISION_KINDS = 64


# ---- what sources report -----------------------------------------------------------------------
@dataclass(frozen=True)
class PeerMetrics:
    """What one source knows about one peer; every field but ``peer`` is optional (None = unknown).

    Counters (``sent_bytes``, ``received_bytes``, ``retransmits``) are cumulative since the source
    began; reports of the same peer add up. ``streams`` adds up too (two sessions to one peer have both
    sets of streams). The path properties (bottleneck, throughput, RTT, loss, tier, compression) are
    taken from the latest report: the one with the highest ``timestamp_s`` (on the registry's clock),
    where a report without a timestamp counts as read now, and ties go to the later-registered source."""

    peer: str
    timestamp_s: float | None = None
    # path properties (latest wins)
    bottleneck_bps: float | None = None
    throughput_bps: float | None = None
    min_rtt_us: float | None = None
    loss_ratio: float | None = None
    tier: int | None = None
    compression_ratio: float | None = None
    compression_level: int | None = None
    # additive
    streams: int | None = None
    sent_bytes: int | None = None
    received_bytes: int | None = None
    retransmits: int | None = None


@dataclass(frozen=True)
class _Field:
    """How one PeerMetrics field is merged and exported."""

    attr: str
    metric: str               # the per-peer family (label peer)
    kind: str                 # "gauge" or "counter"
    additive: bool            # True: sum over reports; False: the latest report wins
    scale: float              # multiplies the field into the metric's base unit
    documentation: str
    process_metric: str | None = None  # the process-wide total over all peers (additive fields only)
    process_documentation: str = ""


_FIELDS: tuple[_Field, ...] = (
    _Field("bottleneck_bps", "dwcp_link_bottleneck_bits_per_second", "gauge", False, 1.0,
           "Estimated bottleneck bandwidth of the path to the peer (windowed max of the delivery rate)."),
    _Field("throughput_bps", "dwcp_link_throughput_bits_per_second", "gauge", False, 1.0,
           "Goodput to the peer over the latest rate span."),
    _Field("min_rtt_us", "dwcp_link_min_rtt_seconds", "gauge", False, 1e-6,
           "Windowed minimum round-trip time to the peer."),
    _Field("loss_ratio", "dwcp_link_loss_ratio", "gauge", False, 1.0,
           "Retransmitted / sent segments to the peer over the estimate window (0..1)."),
    _Field("tier", "dwcp_link_tier", "gauge", False, 1.0,
           "Link tier of the peer: 1 (short and fat) .. 3 (long or thin); absent until decided."),
    _Field("compression_ratio", "dwcp_compression_ratio", "gauge", False, 1.0,
           "Uncompressed / compressed bytes of the latest transfers to the peer (>1 saves bytes)."),
    _Field("compression_level", "dwcp_compression_level", "gauge", False, 1.0,
           "Compression level in use for the peer."),
    _Field("streams", "dwcp_transport_streams", "gauge", True, 1.0,
           "Open data streams (TCP connections) to the peer, over all its sessions.",
           "dwcp_process_streams", "Open data streams of this process, over all peers."),
    _Field("sent_bytes", "dwcp_transport_sent_bytes", "counter", True, 1.0,
           "Payload bytes of completed transfers sent to the peer.",
           "dwcp_process_sent_bytes", "Payload bytes of completed transfers this process sent, to all peers."),
    _Field("received_bytes", "dwcp_transport_received_bytes", "counter", True, 1.0,
           "Payload bytes of completed transfers received from the peer.",
           "dwcp_process_received_bytes",
           "Payload bytes of completed transfers this process received, from all peers."),
    _Field("retransmits", "dwcp_link_retransmits", "counter", True, 1.0,
           "TCP segments retransmitted to the peer.",
           "dwcp_process_retransmits", "TCP segments this process retransmitted, to all peers."),
)
_FIELD_BY_ATTR = {f.attr: f for f in _FIELDS}
_INT_FIELDS = frozenset({"tier", "compression_level", "streams", "sent_bytes", "received_bytes",
                         "retransmits"})


# ---- high-frequency samples --------------------------------------------------------------------
def _decades(lo_exp: int, hi_exp: int) -> tuple[float, ...]:
    """1, 2.5, 5 x 10^k from 10^lo_exp up to 10^hi_exp: readable `le` values, ~2x apart."""
    out = [float(f"{m}e{e}") for e in range(lo_exp, hi_exp) for m in ("1", "2.5", "5")]
    return (*out, float(f"1e{hi_exp}"))


def _le(bound: float) -> str:
    """A bucket bound as the `le` label value (Prometheus spells infinity +Inf)."""
    return "+Inf" if bound == math.inf else repr(bound)


@dataclass(frozen=True)
class SampleKind:
    """A histogram that :meth:`MetricsRegistry.observe_sample` feeds: its metric name (label peer),
    help text and bucket upper bounds (base units, increasing; +Inf is implied)."""

    metric: str
    documentation: str
    buckets: tuple[float, ...]


#: The sample kinds every registry knows; add more with :meth:`MetricsRegistry.define_sample`.
SAMPLE_KINDS: dict[str, SampleKind] = {
    "rtt_seconds": SampleKind(
        "dwcp_link_rtt_seconds", "Round-trip time samples to the peer (e.g. one per chunk).",
        _decades(-5, 1)),                                   # 10 us .. 10 s
    "goodput_bits_per_second": SampleKind(
        "dwcp_transport_goodput_bits_per_second",
        "Goodput samples to the peer (e.g. one per chunk or per transfer).",
        _decades(6, 11)),                                   # 1 Mbit/s .. 100 Gbit/s
}


class _Histogram:
    """Cumulative bucket counts and the sum of one (kind, peer) series: memory fixed by the buckets."""

    __slots__ = ("counts", "total")

    def __init__(self, n_buckets: int) -> None:
        self.counts = [0] * (n_buckets + 1)   # the last one is +Inf
        self.total = 0.0


# ---- the registry ------------------------------------------------------------------------------
@dataclass
class _Source:
    name: str
    fn: Callable[[], Iterable[PeerMetrics]]
    order: int
    last_good: list[PeerMetrics]
    failing: bool = False


@dataclass(frozen=True)
class _SourceSnapshot:
    """The merged source reports, cached for the TTL."""

    peers: dict[str, PeerMetrics]     # by label (a peer or OTHER_PEER)
    distinct_peers: int               # before folding


class MetricsRegistry:
    """A Prometheus ``CollectorRegistry`` (``registry``) with DWCP's metrics; see the module doc.

    ``cache_ttl_s``: how long merged source reports are reused. ``max_peers``: distinct peers that get
    their own label. ``clock``: seconds, monotonic (the TTL, and what ``PeerMetrics.timestamp_s`` means).
    Thread-safe: event methods may be called from any thread while another scrapes."""

    def __init__(self, *, cache_ttl_s: float = 1.0, max_peers: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not cache_ttl_s >= 0:
            raise ConfigError(f"MetricsRegistry: cache_ttl_s must be >= 0, not {cache_ttl_s!r}")
        if max_peers < 1:
            raise ConfigError(f"MetricsRegistry: max_peers must be >= 1, not {max_peers!r}")
        self.cache_ttl_s = cache_ttl_s
        self.max_peers = max_peers
        self.clock = clock
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()          # events, labels, sources
        self._refresh_lock = threading.Lock()  # one reader recomputes, the others wait for its result
        self._labelled: set[str] = set()
        self._sources: dict[str, _Source] = {}
        self._next_order = 0
        self._source_errors: dict[str, int] = {}
        self._cache: _SourceSnapshot | None = None
        self._cache_at = 0.0
        self._sent: dict[str, int] = {}
        self._received: dict[str, int] = {}
        self._retransmits: dict[str, int] = {}
        self._decisions: dict[tuple[str, str], int] = {}
        self._decision_kinds: set[str] = set()
        self._kinds: dict[str, SampleKind] = dict(SAMPLE_KINDS)
        self._histograms: dict[tuple[str, str], _Histogram] = {}
        self.registry.register(_DWCPCollector(self))

    # ---- sources ---------------------------------------------------------------------------------
    def add_source(self, name: str, fn: Callable[[], Iterable[PeerMetrics]]) -> Callable[[], None]:
        """Register ``fn``, called on read (at most once per TTL) for its :class:`PeerMetrics`.

        Returns a function that removes the source. A source that raises or returns something else is
        logged and counted in ``dwcp_metrics_source_errors_total{source=name}``; its last good report
        stands in meanwhile (so its counters don't drop). Removing a source drops its counters: fold
        them into the event counters first (:meth:`add_bytes`, :meth:`add_retransmits`) if they must
        stay, as :class:`SessionSource` does."""
        if not name or not isinstance(name, str):
            raise ConfigError("add_source: a source needs a non-empty name (it becomes a label value)")
        if not callable(fn):
            raise ConfigError(f"add_source({name!r}): fn must be callable, got {type(fn).__name__}")
        with self._lock:
            if name in self._sources:
                raise ConfigError(f"add_source: a metrics source named {name!r} is already registered; "
                                  "remove it first or pick another name")
            src = _Source(name, fn, self._next_order, [])
            self._next_order += 1
            self._sources[name] = src
            self._source_errors.setdefault(name, 0)
            self._cache = None

        def remove() -> None:
            with self._lock:
                if self._sources.get(name) is src:
                    del self._sources[name]
                    self._cache = None
        return remove

    # ---- events ------------------------------------------------------------------------------------
    def count_decision(self, peer: str, what: str) -> None:
        """Count one control decision about ``peer`` (``what``: "tier", "mode", "streams", ...)."""
        if not what or not isinstance(what, str):
            raise ConfigError("count_decision: `what` must name the decision (e.g. 'streams')")
        with self._lock:
            label = self._label(peer)
            if what not in self._decision_kinds:
                if len(self._decision_kinds) >= MAX_DECISION_KINDS:
                    what = "other"
                self._decision_kinds.add(what)
            key = (label, what)
            self._decisions[key] = self._decisions.get(key, 0) + 1

    def add_bytes(self, peer: str, sent: int = 0, received: int = 0) -> None:
        """Add payload bytes sent to / received from ``peer`` (e.g. a finished session's totals)."""
        if sent < 0 or received < 0:
            raise ConfigError(f"add_bytes({peer!r}): byte counts only grow (sent={sent}, received={received})")
        with self._lock:
            label = self._label(peer)
            if sent:
                self._sent[label] = self._sent.get(label, 0) + sent
            if received:
                self._received[label] = self._received.get(label, 0) + received

    def add_retransmits(self, peer: str, segments: int) -> None:
        """Add retransmitted TCP segments to ``peer`` (e.g. a finished session's total)."""
        if segments < 0:
            raise ConfigError(f"add_retransmits({peer!r}): the count only grows (got {segments})")
        with self._lock:
            label = self._label(peer)
            self._retransmits[label] = self._retransmits.get(label, 0) + segments

    def define_sample(self, name: str, kind: SampleKind) -> None:
        """Make ``name`` a sample kind of this registry (a histogram ``kind.metric`` with label peer)."""
        if not _SAMPLE_METRIC_RE.fullmatch(kind.metric):
            raise ConfigError(f"define_sample({name!r}): metric name {kind.metric!r} does not read "
                              "dwcp_<subsystem>_<name>_<unit> (lower case, digits and underscores)")
        b = kind.buckets
        if not b or any(not math.isfinite(x) for x in b) or any(x >= y for x, y in zip(b, b[1:])):
            raise ConfigError(f"define_sample({name!r}): buckets must be finite and increasing, got {b!r}")
        with self._lock:
            old = self._kinds.get(name)
            if old is not None and old != kind:
                raise ConfigError(f"define_sample: sample kind {name!r} already exists as {old.metric}")
            if old is None and (kind.metric in _FIXED_FAMILIES
                                or any(k.metric == kind.metric for k in self._kinds.values())):
                raise ConfigError(f"define_sample({name!r}): metric {kind.metric} is already taken")
            self._kinds[name] = kind

    def observe_sample(self, name: str, peer: str, value: float) -> None:
        """Record one high-frequency sample (base units) in the ``name`` histogram of ``peer``.

        Cheap enough for many calls a second (a lock and a bisect); memory is the buckets, whatever the
        rate. Known kinds: :data:`SAMPLE_KINDS`, plus :meth:`define_sample`."""
        kind = self._kinds.get(name)
        if kind is None:
            raise ConfigError(f"observe_sample: unknown sample kind {name!r}; known: "
                              f"{', '.join(sorted(self._kinds))} (or define_sample() it first)")
        if not math.isfinite(value):
            raise ConfigError(f"observe_sample({name!r}, {peer!r}): value must be finite, got {value!r}")
        i = bisect.bisect_left(kind.buckets, value)   # first bound >= value: `le` is inclusive
        with self._lock:
            key = (name, self._label(peer))
            h = self._histograms.get(key)
            if h is None:
                h = self._histograms[key] = _Histogram(len(kind.buckets))
            h.counts[i] += 1
            h.total += value

    # ---- reading -----------------------------------------------------------------------------------
    def render(self) -> bytes:
        """The metrics in Prometheus' text exposition format (what /metrics serves)."""
        return bytes(generate_latest(self.registry))

    def snapshot(self) -> dict[str, PeerMetrics]:
        """Merged per-peer metrics (by label: a peer, or ``"other"``), sources (cached for the TTL)
        and event counters together: what the per-peer series show."""
        peers, _ = self._merged()
        return peers

    def _merged(self) -> tuple[dict[str, PeerMetrics], int]:
        # _refresh_lock spans the source snapshot and the event counters: a source that folds a
        # finished session into the event counters (SessionSource) does so inside a refresh, so no
        # reader can pair an older snapshot (still holding that session) with the folded counters.
        with self._refresh_lock:
            snap = self._source_snapshot()
            with self._lock:
                peers = dict(snap.peers)
                for attr, counts in (("sent_bytes", self._sent), ("received_bytes", self._received),
                                     ("retransmits", self._retransmits)):
                    for label, n in counts.items():
                        pm = peers.get(label) or PeerMetrics(label)
                        total: dict[str, Any] = {attr: (getattr(pm, attr) or 0) + n}
                        peers[label] = replace(pm, **total)
        return peers, snap.distinct_peers

    def _label(self, peer: str) -> str:
        """The label value of ``peer`` (call with ``_lock`` held)."""
        if not peer or not isinstance(peer, str):
            raise ConfigError(f"metrics: a peer must be a non-empty string (an address), got {peer!r}")
        if peer in self._labelled or peer == OTHER_PEER:
            return peer
        if len(self._labelled) >= self.max_peers:
            return OTHER_PEER
        self._labelled.add(peer)
        return peer

    def _source_snapshot(self) -> _SourceSnapshot:
        """The merged source reports, recomputed when older than the TTL (``_refresh_lock`` held)."""
        with self._lock:
            cached = self._cache
            if cached is not None and self.clock() - self._cache_at < self.cache_ttl_s:
                return cached
            sources = sorted(self._sources.values(), key=lambda s: s.order)
        # Sources run without _lock: they may call the event methods (SessionSource does).
        reports: list[tuple[int, int, PeerMetrics]] = []
        for src in sources:
            got = self._call_source(src)
            reports.extend((src.order, i, pm) for i, pm in enumerate(got))
        snap = self._merge(reports)
        with self._lock:
            self._cache, self._cache_at = snap, self.clock()
        return snap

    def _call_source(self, src: _Source) -> list[PeerMetrics]:
        try:
            got = [_checked(pm) for pm in src.fn()]
        except Exception as e:  # a scrape must never fail because of one source
            with self._lock:
                self._source_errors[src.name] = self._source_errors.get(src.name, 0) + 1
            # The first failure in a row gets a warning with the traceback; repeats only a debug line.
            log.log(logging.DEBUG if src.failing else logging.WARNING,
                    "metrics source %r failed (its last good report stands in): %s", src.name, e,
                    exc_info=not src.failing)
            src.failing = True
            return src.last_good
        if src.failing:
            log.info("metrics source %r works again", src.name)
        src.failing = False
        src.last_good = got
        return got

    def _merge(self, reports: list[tuple[int, int, PeerMetrics]]) -> _SourceSnapshot:
        by_label: dict[str, list[tuple[int, int, PeerMetrics]]] = {}
        with self._lock:
            for r in reports:
                by_label.setdefault(self._label(r[2].peer), []).append(r)
        distinct = len({r[2].peer for r in reports})
        now = math.inf  # a report without a timestamp was read just now: newer than any timestamp
        peers: dict[str, PeerMetrics] = {}
        for label, group in by_label.items():
            values: dict[str, Any] = {}
            latest = sorted(group, key=lambda r: (now if r[2].timestamp_s is None else r[2].timestamp_s,
                                                  r[0], r[1]))
            for f in _FIELDS:
                if f.additive:
                    vals = [getattr(r[2], f.attr) for r in group if getattr(r[2], f.attr) is not None]
                    if vals:
                        values[f.attr] = sum(vals)
                elif label != OTHER_PEER:  # path properties of different peers don't mix
                    for r in reversed(latest):
                        v = getattr(r[2], f.attr)
                        if v is not None:
                            values[f.attr] = v
                            break
            stamps = [r[2].timestamp_s for r in group if r[2].timestamp_s is not None]
            peers[label] = PeerMetrics(label, timestamp_s=max(stamps) if stamps else None, **values)
        return _SourceSnapshot(peers, distinct)

    # ---- export ------------------------------------------------------------------------------------
    def _families(self) -> Iterator[Metric]:
        peers, distinct = self._merged()
        per_peer: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        process: dict[str, float] = {}
        for f in _FIELDS:
            cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
            per_peer[f.attr] = cls(f.metric, f.documentation, labels=["peer"])
        for label in sorted(peers):
            pm = peers[label]
            for f in _FIELDS:
                v = getattr(pm, f.attr)
                if v is None:
                    continue
                per_peer[f.attr].add_metric([label], float(v) * f.scale)
                if f.process_metric:
                    process[f.attr] = process.get(f.attr, 0.0) + float(v) * f.scale
        yield from per_peer.values()
        for f in _FIELDS:
            if f.process_metric:
                cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
                yield cls(f.process_metric, f.process_documentation, value=process.get(f.attr, 0.0))
        yield GaugeMetricFamily("dwcp_process_peers", "Distinct peers in the sources' latest reports, "
                                "folded ones included (not capped).", value=distinct)

        with self._lock:
            decisions = dict(self._decisions)
            histograms = {k: (list(h.counts), h.total) for k, h in self._histograms.items()}
            kinds = dict(self._kinds)
            errors = dict(self._source_errors)
            labelled = len(self._labelled)
        fam = CounterMetricFamily("dwcp_control_decisions", "Control decisions per peer and what was "
                                  "decided (tier, mode, streams, compression_level, ...).",
                                  labels=["peer", "what"])
        by_what: dict[str, int] = {}
        for (label, what), n in sorted(decisions.items()):
            fam.add_metric([label, what], n)
            by_what[what] = by_what.get(what, 0) + n
        yield fam
        fam = CounterMetricFamily("dwcp_process_decisions", "Control decisions over all peers, by what "
                                  "was decided.", labels=["what"])
        for what, n in sorted(by_what.items()):
            fam.add_metric([what], n)
        yield fam
        for name, kind in sorted(kinds.items()):
            hist = HistogramMetricFamily(kind.metric, kind.documentation, labels=["peer"])
            for (hname, label), (counts, total) in sorted(histograms.items()):
                if hname != name:
                    continue
                cumulative, buckets = 0, []
                for bound, n in zip((*kind.buckets, math.inf), counts):
                    cumulative += n
                    buckets.append((_le(bound), float(cumulative)))
                hist.add_metric([label], buckets, total)
            yield hist
        fam = CounterMetricFamily("dwcp_metrics_source_errors", "Reads of a metrics source that raised "
                                  "or returned something other than PeerMetrics.", labels=["source"])
        for name, n in sorted(errors.items()):
            fam.add_metric([name], n)
        yield fam
        yield GaugeMetricFamily("dwcp_metrics_labelled_peers", "Peers with their own peer label; at "
                                "dwcp_metrics_max_peers, new peers go to peer=\"other\".", value=labelled)
        yield GaugeMetricFamily("dwcp_metrics_max_peers", "The cap on distinct peer labels.",
                                value=self.max_peers)


def _checked(pm: object) -> PeerMetrics:
    """``pm`` if it is a well-formed PeerMetrics (numbers where numbers belong), else TypeError."""
    if not isinstance(pm, PeerMetrics):
        raise TypeError(f"a metrics source must yield PeerMetrics, got {type(pm).__name__}")
    if not pm.peer or not isinstance(pm.peer, str):
        raise TypeError(f"PeerMetrics.peer must be a non-empty string, got {pm.peer!r}")
    for f in fields(pm):
        v = getattr(pm, f.name)
        if f.name == "peer" or v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"PeerMetrics.{f.name} of {pm.peer!r} must be a finite number, got {v!r}")
        if f.name in _INT_FIELDS and v < 0:
            raise TypeError(f"PeerMetrics.{f.name} of {pm.peer!r} must be >= 0, got {v!r}")
    return pm


class _DWCPCollector:
    """The one collector: computes every DWCP family on scrape."""

    def __init__(self, owner: MetricsRegistry) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._owner._families())
        except Exception:  # a bug here must not take the other collectors' metrics down with it
            log.exception("computing the DWCP metrics failed; this scrape has none of them")
            return []

    def describe(self) -> Iterable[Metric]:
        """The fixed families (names only), so the registry refuses a collector that clashes."""
        return [Metric(name, "", typ) for name, typ in _FIXED_FAMILIES.items()]


#: Every family the collector always yields, with its type (define_sample must not reuse a name).
_FIXED_FAMILIES: dict[str, str] = {
    **{f.metric: f.kind for f in _FIELDS},
    **{f.process_metric: f.kind for f in _FIELDS if f.process_metric},
    "dwcp_process_peers": "gauge", "dwcp_control_decisions": "counter",
    "dwcp_process_decisions": "counter", "dwcp_metrics_source_errors": "counter",
    "dwcp_metrics_labelled_peers": "gauge", "dwcp_metrics_max_peers": "gauge",
    **{k.metric: "histogram" for k in SAMPLE_KINDS.values()},
}


_default: MetricsRegistry | None = None
_default_lock = threading.Lock()


def default_registry() -> MetricsRegistry:
    """The process-wide registry (created on first use), with client_python's process, platform and
    GC collectors beside DWCP's own (CPU seconds, memory, open fds of this process)."""
    global _default
    with _default_lock:
        if _default is None:
            reg = MetricsRegistry()
            ProcessCollector(registry=reg.registry)
            PlatformCollector(registry=reg.registry)
            GCCollector(registry=reg.registry)
            _default = reg
        return _default


# ---- sessions as a source ----------------------------------------------------------------------
class SessionSource:
    """A metrics source over :class:`~dwcp.transport.session.Session` objects, read on scrape.

        src = SessionSource(reg)        # registers itself as source `name`
        src.track(session)              # after accept()/connect(); nothing else on the data path

    Each read calls ``Session.stats()`` of the tracked sessions: bytes of completed transfers, TCP
    retransmits and open streams, per peer address (sessions to one host add up). A session found
    closed is retired at that read: its final byte counts (and the retransmits last seen while it was
    open: a closed session's sockets are gone) move into the registry's event counters, so counters
    never drop; until then the source holds a reference to it."""

    def __init__(self, registry: MetricsRegistry, name: str = "sessions") -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._sessions: dict[int, tuple[Session, PeerMetrics]] = {}   # id -> (session, last report)
        self.remove = registry.add_source(name, self)

    def track(self, session: Session) -> None:
        with self._lock:
            self._sessions.setdefault(id(session), (session, PeerMetrics(str(session.peer[0]))))

    def _read(self, session: Session, last: PeerMetrics) -> PeerMetrics:
        try:
            st = session.stats()
        except DWCPError:  # closed by its own thread in the middle of the read: the last report
            return last
        # Active streams: an auto session keeps paused ones open (docs/control.md).
        return PeerMetrics(last.peer, streams=int(st.get("streams_active", st["streams_alive"])),
                           sent_bytes=int(st["bytes_sent"]),
                           received_bytes=int(st["bytes_received"]),
                           retransmits=max(last.retransmits or 0, int(st["tcp_retransmits"])))

    def __call__(self) -> list[PeerMetrics]:
        with self._lock:
            entries = list(self._sessions.items())
        out: list[PeerMetrics] = []
        for key, (session, last) in entries:
            # Closed first, then read: a closed session's counts are final, so folding them loses
            # nothing (read first, and a transfer could complete between the read and the check).
            closed = session.closed
            pm = self._read(session, last)
            if closed:
                with self._lock:
                    self._sessions.pop(key, None)
                self._registry.add_bytes(pm.peer, sent=pm.sent_bytes or 0, received=pm.received_bytes or 0)
                self._registry.add_retransmits(pm.peer, pm.retransmits or 0)
            else:
                with self._lock:
                    if key in self._sessions:
                        self._sessions[key] = (session, pm)
                out.append(pm)
        return out


# ---- the HTTP endpoint -------------------------------------------------------------------------
class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        """Scrapes are not worth a log line each."""


class MetricsServer:
    """A running /metrics endpoint (see :func:`start_metrics_server`); close() stops it and frees
    the port. A context manager."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, address: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self.address = address
        self.port: int = httpd.server_address[1]
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()       # stops serve_forever
        self._httpd.server_close()   # frees the port
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url} {'closed' if self._closed else 'serving'}>"


def _metrics_only(app: Callable[..., Any]) -> Callable[..., Any]:
    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"DWCP serves its metrics at /metrics\n"]
    return route


def start_metrics_server(port: int, address: str = "127.0.0.1",
                         registry: MetricsRegistry | None = None) -> MetricsServer:
    """Serve ``registry`` (default: :func:`default_registry`) at ``http://address:port/metrics`` from
    a background thread. ``port`` 0 picks a free port (``.port`` says which). Loopback by default: the
    metrics name peers, so exposing them further is a choice to make explicitly. Raises ConfigError
    when the port is taken or the address can't be bound."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics port must be 0..65535, not {port}")
    reg = registry if registry is not None else default_registry()
    try:
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as e:
        raise ConfigError(f"metrics address {address!r} does not resolve ({e}); give an IP address such "
                          "as 127.0.0.1") from e

    class _Server(ThreadingMixIn, WSGIServer):
        # A thread per request, so one stalled client cannot hold up the scrapes; daemon threads
        # because close() must not wait for a client that never finishes its request.
        address_family = family
        daemon_threads = True

    try:
        httpd = make_server(address, port, _metrics_only(make_wsgi_app(reg.registry)), _Server,
                            handler_class=_QuietHandler)
    except OSError as e:
        if e.errno == _errno.EADDRINUSE:
            raise ConfigError(f"metrics port {port} on {address} is already in use: choose another port "
                              "(--metrics-port) or stop the program listening there") from e
        raise ConfigError(f"cannot serve metrics on {address}:{port}: {e.strerror or e}; choose another "
                          "address or port") from e
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"dwcp-metrics-{httpd.server_address[1]}", daemon=True)
    thread.start()
    server = MetricsServer(httpd, thread, address)
    log.info("serving metrics at %s", server.url)
    return server


__all__ = ["OTHER_PEER", "SAMPLE_KINDS", "MetricsRegistry", "MetricsServer", "PeerMetrics", "SampleKind",
           "SessionSource", "default_registry", "start_metrics_server"]
