"""dwcp.control.metrics: merging, TTL caching, the peer cap, decisions, samples, failing sources, and
sessions as a source. Every check reads the real text exposition through prometheus_client's parser."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dwcp.control.metrics import (OTHER_PEER, SAMPLE_KINDS, MetricsRegistry, PeerMetrics, SampleKind,
                                  SessionSource, default_registry)
from dwcp.errors import ConfigError


class FakeClock:
    """The registry's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(reg: MetricsRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a render: (sample name, sorted labels) -> value."""
    out = {}
    for fam in text_string_to_metric_families(reg.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(reg: MetricsRegistry, name: str, **labels: str) -> float | None:
    return samples(reg).get((name, tuple(sorted(labels.items()))))


class CountingSource:
    """A source that returns what it is told and counts its calls."""

    def __init__(self, *reports: PeerMetrics) -> None:
        self.reports = list(reports)
        self.calls = 0

    def __call__(self) -> Iterable[PeerMetrics]:
        self.calls += 1
        return list(self.reports)


# ---- merging -----------------------------------------------------------------------------------
def test_reports_of_one_peer_merge_counters_add_and_the_latest_gauge_wins() -> None:
    reg = MetricsRegistry(cache_ttl_s=0)
    reg.add_source("old", lambda: [PeerMetrics("10.0.0.2", timestamp_s=5.0, sent_bytes=100, streams=4,
                                               min_rtt_us=2000, tier=2, retransmits=3)])
    reg.add_source("new", lambda: [PeerMetrics("10.0.0.2", timestamp_s=9.0, sent_bytes=50, streams=2,
                                               min_rtt_us=3000, received_bytes=7)])
    assert value(reg, "dwcp_transport_sent_bytes_total", peer="10.0.0.2") == 150
    assert value(reg, "dwcp_transport_received_bytes_total", peer="10.0.0.2") == 7
    assert value(reg, "dwcp_transport_streams", peer="10.0.0.2") == 6
    assert value(reg, "dwcp_link_retransmits_total", peer="10.0.0.2") == 3
    assert value(reg, "dwcp_link_min_rtt_seconds", peer="10.0.0.2") == pytest.approx(0.003)  # newer
    assert value(reg, "dwcp_link_tier", peer="10.0.0.2") == 2  # only the older report knows it


def test_a_report_without_timestamp_counts_as_read_now_and_ties_go_to_the_later_source() -> None:
    reg = MetricsRegistry(cache_ttl_s=0)
    reg.add_source("live", lambda: [PeerMetrics("p", bottleneck_bps=1e9, compression_level=3)])
    reg.add_source("stamped", lambda: [PeerMetrics("p", timestamp_s=1e12, bottleneck_bps=5e9)])
    reg.add_source("live2", lambda: [PeerMetrics("p", compression_level=7, compression_ratio=2.5)])
    assert value(reg, "dwcp_link_bottleneck_bits_per_second", peer="p") == 1e9
    assert value(reg, "dwcp_compression_level", peer="p") == 7
    assert value(reg, "dwcp_compression_ratio", peer="p") == 2.5


def test_event_counters_add_to_the_sources_and_process_totals_cover_every_peer() -> None:
    reg = MetricsRegistry(cache_ttl_s=0)
    reg.add_source("s", lambda: [PeerMetrics("a", sent_bytes=10, streams=3),
                                 PeerMetrics("b", received_bytes=4, streams=1)])
    reg.add_bytes("a", sent=5, received=2)
    reg.add_bytes("c", sent=1)
    reg.add_retransmits("b", 9)
    assert value(reg, "dwcp_transport_sent_bytes_total", peer="a") == 15
    assert value(reg, "dwcp_transport_received_bytes_total", peer="a") == 2
    assert value(reg, "dwcp_transport_sent_bytes_total", peer="c") == 1
    assert value(reg, "dwcp_process_sent_bytes_total") == 16
    assert value(reg, "dwcp_process_received_bytes_total") == 6
    assert value(reg, "dwcp_process_retransmits_total") == 9
    assert value(reg, "dwcp_process_streams") == 4
    assert value(reg, "dwcp_process_peers") == 2  # the peers the sources reported
    snap = reg.snapshot()
    assert snap["a"].sent_bytes == 15 and snap["b"].retransmits == 9 and snap["c"].sent_bytes == 1


def test_counts_only_grow() -> None:
    reg = MetricsRegistry()
    with pytest.raises(ConfigError, match="only grow"):
        reg.add_bytes("a", sent=-1)
    with pytest.raises(ConfigError, match="only grows"):
        reg.add_retransmits("a", -2)
    with pytest.raises(ConfigError, match="non-empty string"):
        reg.add_bytes("", sent=1)


# ---- TTL caching -------------------------------------------------------------------------------
def test_readers_within_the_ttl_share_one_read_of_the_sources() -> None:
    clock = FakeClock()
    reg = MetricsRegistry(cache_ttl_s=1.0, clock=clock)
    src = CountingSource(PeerMetrics("p", sent_bytes=1))
    reg.add_source("s", src)
    reg.render()
    reg.snapshot()
    clock.now += 0.99
    reg.render()
    assert src.calls == 1
    src.reports = [PeerMetrics("p", sent_bytes=2)]
    assert value(reg, "dwcp_transport_sent_bytes_total", peer="p") == 1  # cached
    clock.now += 0.01
    assert value(reg, "dwcp_transport_sent_bytes_total", peer="p") == 2
    assert src.calls == 2


def test_events_are_live_within_the_ttl_and_a_new_source_is_read_at_once() -> None:
    clock = FakeClock()
    reg = MetricsRegistry(cache_ttl_s=60.0, clock=clock)
    first = CountingSource(PeerMetrics("p", sent_bytes=1))
    reg.add_source("first", first)
    reg.render()
    reg.add_bytes("p", sent=10)
    reg.count_decision("p", "tier")
    assert value(reg, "dwcp_transport_sent_bytes_total", peer="p") == 11
    assert value(reg, "dwcp_control_decisions_total", peer="p", what="tier") == 1
    remove = reg.add_source("second", CountingSource(PeerMetrics("q", received_bytes=3)))
    assert value(reg, "dwcp_transport_received_bytes_total", peer="q") == 3
    remove()
    assert value(reg, "dwcp_transport_received_bytes_total", peer="q") is None
    remove()  # idempotent
    assert first.calls == 3  # once per change of the source list, not per render


def test_concurrent_readers_call_a_source_once_per_ttl() -> None:
    reg = MetricsRegistry(cache_ttl_s=3600.0)
    calls = 0
    gate = threading.Event()

    def slow() -> list[PeerMetrics]:
        nonlocal calls
        calls += 1
        gate.wait(10)
        return [PeerMetrics("p", sent_bytes=1)]

    reg.add_source("slow", slow)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(reg.render())) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert calls == 1 and len(results) == 4 and len(set(results)) == 1


# ---- the peer cap ------------------------------------------------------------------------------
def test_peers_beyond_the_cap_fold_into_other() -> None:
    reg = MetricsRegistry(cache_ttl_s=0, max_peers=2)
    reg.add_source("s", lambda: [PeerMetrics(f"10.0.0.{i}", sent_bytes=i, streams=1, min_rtt_us=1000 * i)
                                 for i in range(1, 6)])
    got = samples(reg)
    peers = {dict(k[1])["peer"] for k in got if k[0] == "dwcp_transport_sent_bytes_total"}
    assert peers == {"10.0.0.1", "10.0.0.2", OTHER_PEER}
    assert value(reg, "dwcp_transport_sent_bytes_total", peer=OTHER_PEER) == 3 + 4 + 5
    assert value(reg, "dwcp_transport_streams", peer=OTHER_PEER) == 3
    # path properties of different peers don't mix: no RTT for "other"
    assert value(reg, "dwcp_link_min_rtt_seconds", peer=OTHER_PEER) is None
    assert value(reg, "dwcp_link_min_rtt_seconds", peer="10.0.0.2") == pytest.approx(0.002)
    assert value(reg, "dwcp_process_sent_bytes_total") == 15
    assert value(reg, "dwcp_process_peers") == 5
    assert value(reg, "dwcp_metrics_labelled_peers") == 2
    assert value(reg, "dwcp_metrics_max_peers") == 2
    # events respect the cap too, and a peer that got a label keeps it
    reg.count_decision("10.0.0.9", "mode")
    reg.add_bytes("10.0.0.1", received=1)
    reg.observe_sample("rtt_seconds", "10.0.0.8", 0.01)
    assert value(reg, "dwcp_control_decisions_total", peer=OTHER_PEER, what="mode") == 1
    assert value(reg, "dwcp_transport_received_bytes_total", peer="10.0.0.1") == 1
    assert value(reg, "dwcp_link_rtt_seconds_count", peer=OTHER_PEER) == 1


def test_the_cap_holds_under_many_peers() -> None:
    reg = MetricsRegistry(cache_ttl_s=0, max_peers=256)
    for i in range(1000):
        reg.add_bytes(f"peer-{i}", sent=1)
    series = [k for k in samples(reg) if k[0] == "dwcp_transport_sent_bytes_total"]
    assert len(series) == 257
    assert value(reg, "dwcp_transport_sent_bytes_total", peer=OTHER_PEER) == 1000 - 256
    assert value(reg, "dwcp_process_sent_bytes_total") == 1000


# ---- decisions ---------------------------------------------------------------------------------
def test_decisions_count_per_peer_and_what() -> None:
    reg = MetricsRegistry()
    for what in ("tier", "streams", "streams", "compression_level"):
        reg.count_decision("10.0.0.2", what)
    reg.count_decision("10.0.0.3", "streams")
    assert value(reg, "dwcp_control_decisions_total", peer="10.0.0.2", what="streams") == 2
    assert value(reg, "dwcp_control_decisions_total", peer="10.0.0.2", what="tier") == 1
    assert value(reg, "dwcp_control_decisions_total", peer="10.0.0.3", what="streams") == 1
    assert value(reg, "dwcp_process_decisions_total", what="streams") == 3
    assert value(reg, "dwcp_process_decisions_total", what="compression_level") == 1
    with pytest.raises(ConfigError, match="what"):
        reg.count_decision("10.0.0.2", "")


def test_decision_kinds_are_capped() -> None:
    from dwcp.control.metrics import MAX_DECISION_KINDS
    reg = MetricsRegistry()
    for i in range(MAX_DECISION_KINDS + 5):
        reg.count_decision("p", f"kind{i}")
    whats = {dict(k[1])["what"] for k in samples(reg) if k[0] == "dwcp_control_decisions_total"}
    assert len(whats) == MAX_DECISION_KINDS + 1 and "other" in whats


# ---- samples -----------------------------------------------------------------------------------
def test_samples_become_a_histogram_with_inclusive_bounds() -> None:
    reg = MetricsRegistry()
    for v in (0.001, 0.001, 0.004, 20.0):
        reg.observe_sample("rtt_seconds", "p", v)
    assert value(reg, "dwcp_link_rtt_seconds_count", peer="p") == 4
    assert value(reg, "dwcp_link_rtt_seconds_sum", peer="p") == pytest.approx(20.006)
    assert value(reg, "dwcp_link_rtt_seconds_bucket", peer="p", le="0.0005") == 0
    assert value(reg, "dwcp_link_rtt_seconds_bucket", peer="p", le="0.001") == 2  # le is inclusive
    assert value(reg, "dwcp_link_rtt_seconds_bucket", peer="p", le="0.005") == 3
    assert value(reg, "dwcp_link_rtt_seconds_bucket", peer="p", le="10.0") == 3
    assert value(reg, "dwcp_link_rtt_seconds_bucket", peer="p", le="+Inf") == 4
    buckets = [k for k in samples(reg) if k[0] == "dwcp_link_rtt_seconds_bucket"]
    assert len(buckets) == len(SAMPLE_KINDS["rtt_seconds"].buckets) + 1  # memory is fixed by the buckets


def test_samples_from_many_threads_are_all_counted() -> None:
    reg = MetricsRegistry()

    def feed() -> None:
        for i in range(5000):
            reg.observe_sample("goodput_bits_per_second", "p", 1e9 + i)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert value(reg, "dwcp_transport_goodput_bits_per_second_count", peer="p") == 20000


def test_sample_kinds_are_checked_and_can_be_added() -> None:
    reg = MetricsRegistry()
    with pytest.raises(ConfigError, match="unknown sample kind 'chunk_seconds'"):
        reg.observe_sample("chunk_seconds", "p", 0.1)
    with pytest.raises(ConfigError, match="finite"):
        reg.observe_sample("rtt_seconds", "p", math.nan)
    with pytest.raises(ConfigError, match="increasing"):
        reg.define_sample("bad", SampleKind("dwcp_test_bad_seconds", "x", (1.0, 0.5)))
    with pytest.raises(ConfigError, match="already taken"):
        reg.define_sample("rtt2", SampleKind("dwcp_link_rtt_seconds", "x", (1.0,)))
    with pytest.raises(ConfigError, match="already taken"):
        reg.define_sample("tier", SampleKind("dwcp_link_tier", "x", (1.0,)))
    with pytest.raises(ConfigError, match="dwcp_<subsystem>"):
        reg.define_sample("bad name", SampleKind("dwcp link seconds", "x", (1.0,)))
    reg.define_sample("chunk_seconds", SampleKind("dwcp_transport_chunk_seconds", "Chunk times.",
                                                  (0.01, 0.1, 1.0)))
    reg.observe_sample("chunk_seconds", "p", 0.05)
    assert value(reg, "dwcp_transport_chunk_seconds_bucket", peer="p", le="0.1") == 1
    assert "chunk_seconds" not in SAMPLE_KINDS  # per registry, not global


# ---- failing sources ---------------------------------------------------------------------------
def test_a_failing_source_is_counted_and_its_last_good_report_stands_in(
        caplog: pytest.LogCaptureFixture) -> None:
    reg = MetricsRegistry(cache_ttl_s=0)
    state: dict[str, Any] = {"fail": False}

    def flaky() -> list[PeerMetrics]:
        if state["fail"]:
            raise RuntimeError("telemetry went away")
        return [PeerMetrics("p", sent_bytes=42)]

    reg.add_source("flaky", flaky)
    reg.add_source("fine", lambda: [PeerMetrics("q", sent_bytes=1)])
    assert value(reg, "dwcp_metrics_source_errors_total", source="flaky") == 0
    state["fail"] = True
    with caplog.at_level(logging.DEBUG, logger="dwcp.control.metrics"):
        reg.render()
        got = samples(reg)
    assert got[("dwcp_metrics_source_errors_total", (("source", "flaky"),))] == 2
    assert got[("dwcp_transport_sent_bytes_total", (("peer", "p"),))] == 42  # no drop, no reset
    assert got[("dwcp_transport_sent_bytes_total", (("peer", "q"),))] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "flaky" in warnings[0].getMessage()  # repeats are debug lines


@pytest.mark.parametrize("bad", [
    lambda: [("p", 1)],                                  # not PeerMetrics
    lambda: [PeerMetrics("p", sent_bytes="many")],       # type: ignore[arg-type]
    lambda: [PeerMetrics("p", min_rtt_us=math.inf)],
    lambda: [PeerMetrics("p", sent_bytes=-5)],
    lambda: [PeerMetrics("")],
    lambda: 42,                                          # not iterable
])
def test_malformed_reports_are_source_errors_not_scrape_errors(bad: Callable[[], Any]) -> None:
    reg = MetricsRegistry(cache_ttl_s=0)
    reg.add_source("bad", bad)
    assert value(reg, "dwcp_metrics_source_errors_total", source="bad") == 1
    assert value(reg, "dwcp_process_sent_bytes_total") == 0


def test_source_names_are_unique() -> None:
    reg = MetricsRegistry()
    reg.add_source("s", list)
    with pytest.raises(ConfigError, match="already registered"):
        reg.add_source("s", list)
    with pytest.raises(ConfigError, match="non-empty name"):
        reg.add_source("", list)


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="max_peers"):
        MetricsRegistry(max_peers=0)
    with pytest.raises(ConfigError, match="cache_ttl_s"):
        MetricsRegistry(cache_ttl_s=-1)


def test_the_default_registry_is_one_per_process_with_process_metrics() -> None:
    reg = default_registry()
    assert default_registry() is reg
    names = {fam.name for fam in text_string_to_metric_families(reg.render().decode())}
    assert {"process_cpu_seconds", "python_info", "dwcp_process_sent_bytes"} <= names


def test_names_follow_prometheus_practice() -> None:
    reg = MetricsRegistry()
    reg.observe_sample("rtt_seconds", "p", 0.1)
    units = ("_bytes", "_seconds", "_bits_per_second", "_ratio")
    for fam in text_string_to_metric_families(reg.render().decode()):
        assert fam.name.startswith("dwcp_")
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples)
        if any(u in fam.name for u in ("bytes", "seconds", "bits")):
            assert fam.name.endswith(units), fam.name


# ---- sessions as a source ----------------------------------------------------------------------
def test_session_source_reads_live_sessions_and_keeps_their_counts_when_they_close(
        session_pair: Any) -> None:
    reg = MetricsRegistry(cache_ttl_s=0)
    pair = session_pair(streams=3)
    src = SessionSource(reg)
    src.track(pair.client)
    src.track(pair.server)
    data = bytes(range(256)) * 4096  # 1 MiB
    t = threading.Thread(target=pair.client.send, args=(data,))
    t.start()
    got = pair.server.recv()
    t.join()
    assert len(got) == len(data)
    # both ends are on 127.0.0.1: one peer label, the two sessions add up
    assert value(reg, "dwcp_transport_sent_bytes_total", peer="127.0.0.1") == len(data)
    assert value(reg, "dwcp_transport_received_bytes_total", peer="127.0.0.1") == len(data)
    assert value(reg, "dwcp_transport_streams", peer="127.0.0.1") == 6
    pair.client.close()
    pair.server.close()
    assert value(reg, "dwcp_transport_sent_bytes_total", peer="127.0.0.1") == len(data)
    assert value(reg, "dwcp_transport_received_bytes_total", peer="127.0.0.1") == len(data)
    assert value(reg, "dwcp_transport_streams", peer="127.0.0.1") is None  # no open session
    assert src() == []  # retired: the source holds no session any more
    src.remove()
    assert value(reg, "dwcp_transport_sent_bytes_total", peer="127.0.0.1") == len(data)
