"""LinkMonitor with synthetic FlowSamples and a fake clock: aggregation, windows, app-limited samples,
registration, subscribers, the polling thread and closing the source on every path."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from dwcp.errors import DWCPError
from dwcp.telemetry import FlowEvent, FlowSample, LinkMonitor, PeerEstimate, Tier

G = 1e9


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeSource:
    """A FlowSource whose snapshots the test scripts."""

    name: str = "fake"
    batches: list[list[FlowSample]] = field(default_factory=list)
    closed: int = 0
    fail: bool = False

    def snapshot(self) -> list[FlowSample]:
        if self.fail:
            raise DWCPError("source broke")
        return self.batches.pop(0) if self.batches else []

    def events(self) -> list[FlowEvent]:
        return []

    def close(self) -> None:
        self.closed += 1

    def __enter__(self) -> FakeSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Flow:
    """A synthetic flow that moves ``rate_bps`` of acknowledged bytes per second of fake time."""

    def __init__(self, cookie: int, daddr: str = "198.18.0.2", rtt_us: int = 20_000, mss: int = 1448) -> None:
        self.cookie, self.daddr, self.rtt_us, self.mss = cookie, daddr, rtt_us, mss
        self.acked = 0
        self.received = 0
        self.sent = 0
        self.retrans = 0
        self.delivery_rate_bps = 0.0  # the kernel's latest per-ACK sample: the rate of the last advance()

    def sample(self, t: float, app_limited: bool = False) -> FlowSample:
        return FlowSample(cookie=self.cookie, saddr="198.18.0.1", sport=40000 + self.cookie, daddr=self.daddr,
                          dport=5301, timestamp_ns=int(t * 1e9), source="fake", srtt_us=self.rtt_us + 500,
                          min_rtt_us=self.rtt_us, delivery_rate_bps=int(self.delivery_rate_bps),
                          delivery_app_limited=app_limited,
                          bytes_acked=self.acked, bytes_received=self.received, bytes_sent=self.sent,
                          retrans=self.retrans, mss=self.mss, cwnd=10)

    def advance(self, dt: float, rate_bps: float, loss: float = 0.0) -> None:
        b = int(rate_bps * dt / 8)
        self.delivery_rate_bps = rate_bps
        self.acked += b
        self.sent += b
        self.retrans += int(b / self.mss * loss)


def drive(mon: LinkMonitor, clock: Clock, flows: list[Flow], rate_bps: float, seconds: float,
          dt: float = 0.1, app_limited: bool = False, loss: float = 0.0) -> PeerEstimate:
    """Advance fake time in poll steps; every flow carries rate_bps / len(flows)."""
    out: dict[str, PeerEstimate] = {}
    for _ in range(round(seconds / dt)):
        clock.t += dt
        for f in flows:
            f.advance(dt, rate_bps / len(flows), loss)
        out = mon.ingest([f.sample(clock.t, app_limited) for f in flows])
    return next(iter(out.values()))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **kw: Any) -> LinkMonitor:
    return LinkMonitor(FakeSource(), clock=clock, **kw)


def test_sum_over_streams_of_one_peer(clock: Clock) -> None:
    mon = make(clock)
    flows = [Flow(i) for i in range(8)]
    e = drive(mon, clock, flows, 4 * G, 2.0)
    assert e.peer == "198.18.0.2" and e.flows == 8
    assert e.bottleneck_bps == pytest.approx(4 * G, rel=0.01)
    assert e.min_rtt_us == 20_000
    assert e.srtt_us == 20_500


def test_peers_are_separate(clock: Clock) -> None:
    mon = make(clock)
    a, b = Flow(1, "198.18.0.2"), Flow(2, "198.18.0.3")
    for _ in range(20):
        clock.t += 0.1
        a.advance(0.1, 2 * G)
        b.advance(0.1, 0.5 * G)
        mon.ingest([a.sample(clock.t), b.sample(clock.t)])
    ests = mon.estimates()
    assert ests["198.18.0.2"].bottleneck_bps == pytest.approx(2 * G, rel=0.01)
    assert ests["198.18.0.3"].bottleneck_bps == pytest.approx(0.5 * G, rel=0.01)


def test_windowed_max_forgets_after_window(clock: Clock) -> None:
    mon = make(clock, window_s=2.0)
    f = Flow(1)
    assert drive(mon, clock, [f], 5 * G, 1.0).bottleneck_bps == pytest.approx(5 * G, rel=0.01)
    assert drive(mon, clock, [f], 1 * G, 1.0).bottleneck_bps == pytest.approx(5 * G, rel=0.01)
    assert drive(mon, clock, [f], 1 * G, 2.5).bottleneck_bps == pytest.approx(1 * G, rel=0.01)


def test_windowed_min_rtt(clock: Clock) -> None:
    mon = make(clock, window_s=1.0)
    f = Flow(1, rtt_us=5000)
    drive(mon, clock, [f], 1 * G, 0.5)
    f.rtt_us = 8000
    assert drive(mon, clock, [f], 1 * G, 0.5).min_rtt_us == 5000
    assert drive(mon, clock, [f], 1 * G, 1.5).min_rtt_us == 8000


def test_rate_is_measured_over_several_rtts(clock: Clock) -> None:
    # 150 ms RTT: bursts of ACKs between polls must not read as the rate. The rate span is 1.2 s.
    mon = make(clock)
    f = Flow(1, rtt_us=150_000)
    for i in range(30):
        clock.t += 0.1
        if i % 3 == 0:                       # all bytes of 0.3 s acknowledged in one poll
            f.advance(0.3, 0.4 * G)
        e = mon.ingest([f.sample(clock.t)])["198.18.0.2"]
    assert e.bottleneck_bps <= 0.4 * G * 1.6


def test_app_limited_samples_are_ignored_when_better_exist(clock: Clock) -> None:
    mon = make(clock)
    f = Flow(1)
    drive(mon, clock, [f], 2 * G, 1.0)
    e = drive(mon, clock, [f], 1 * G, 1.0, app_limited=True)
    assert e.bottleneck_bps == pytest.approx(2 * G, rel=0.01) and not e.app_limited


def test_app_limited_only_is_a_lower_bound(clock: Clock) -> None:
    mon = make(clock)
    e = drive(mon, clock, [Flow(1)], 0.3 * G, 2.0, app_limited=True)
    assert e.bottleneck_bps == pytest.approx(0.3 * G, rel=0.01)
    assert e.app_limited and e.samples == 0 and e.confidence == 0.0


def test_receiver_side_goodput_counts_as_lower_bound(clock: Clock) -> None:
    mon = make(clock)
    f = Flow(1)
    for _ in range(10):
        clock.t += 0.1
        f.received += int(1 * G * 0.1 / 8)
        e = mon.ingest([f.sample(clock.t)])["198.18.0.2"]
    assert e.bottleneck_bps == pytest.approx(1 * G, rel=0.01) and e.app_limited and e.active


def test_loss_rate(clock: Clock) -> None:
    mon = make(clock)
    e = drive(mon, clock, [Flow(1)], 1 * G, 2.0, loss=0.01)
    assert e.loss_rate == pytest.approx(0.01, rel=0.2)
    assert e.retrans > 0


def test_confidence_grows_with_plateau(clock: Clock) -> None:
    mon = make(clock)
    f = Flow(1)
    # Slow start: doubling every 0.1 s from 10 Mbit/s.
    rate = 10e6
    confs = []
    for _ in range(8):
        clock.t += 0.1
        f.advance(0.1, rate)
        rate *= 2
        confs.append(mon.ingest([f.sample(clock.t)])["198.18.0.2"].confidence)
    assert max(confs) <= 0.4
    e = drive(mon, clock, [f], rate, 1.0)
    assert e.saturated and e.confidence == 1.0


def test_tier_decided_within_deadline(clock: Clock) -> None:
    mon = make(clock)
    f = Flow(1, rtt_us=30_000)
    start = clock.t
    decided_at = None
    for _ in range(30):
        clock.t += 0.1
        f.advance(0.1, 0.5 * G)
        e = mon.ingest([f.sample(clock.t)])["198.18.0.2"]
        if e.tier is not None and decided_at is None:
            decided_at = clock.t
    assert e.tier == Tier.TIER3
    assert decided_at is not None and decided_at - start <= 2.0
    assert e.time_to_decision_s is not None and e.time_to_decision_s <= 2.0


def test_registered_flows_group_under_session_peer(clock: Clock) -> None:
    mon = make(clock, registered_only=True)
    mine, other = Flow(1, "127.0.0.1"), Flow(2, "127.0.0.1")
    mon.register_flow(1, "session-peer")
    for _ in range(10):
        clock.t += 0.1
        mine.advance(0.1, 1 * G)
        other.advance(0.1, 5 * G)
        mon.ingest([mine.sample(clock.t), other.sample(clock.t)])
    assert set(mon.estimates()) == {"session-peer"}
    assert mon.estimate("session-peer").bottleneck_bps == pytest.approx(1 * G, rel=0.01)  # type: ignore[union-attr]
    assert [s.cookie for s in mon.flows()] == [1]


def test_register_session_uses_data_sockets() -> None:
    from tests.conftest import tcp_pairs
    from dwcp.telemetry import TcpInfoSource

    a, b = tcp_pairs(3)

    class FakeSession:
        peer = ("127.0.0.1", 1234)

        def data_sockets(self) -> list[Any]:
            return list(a)

    try:
        src = TcpInfoSource()
        with LinkMonitor(src, registered_only=True) as mon:
            assert mon.register_session(FakeSession()) == "127.0.0.1"
            assert len(src.cookies()) == 3
            mon.poll()
            assert {s.cookie for s in mon.flows()} == set(src.cookies())
    finally:
        for s in a + b:
            s.close()


def test_subscribers_get_estimates_and_bad_ones_are_isolated(clock: Clock) -> None:
    mon = make(clock)
    got: list[PeerEstimate] = []

    def bad(e: PeerEstimate) -> None:
        raise RuntimeError("subscriber bug")

    mon.subscribe(bad)
    unsub = mon.subscribe(got.append)
    drive(mon, clock, [Flow(1)], 1 * G, 0.5)
    assert len(got) == 5
    unsub()
    drive(mon, clock, [Flow(1)], 1 * G, 0.2)
    assert len(got) == 5


def test_idle_flows_are_dropped(clock: Clock) -> None:
    mon = make(clock, idle_s=0.5)
    f = Flow(1)
    drive(mon, clock, [f], 1 * G, 0.3)
    assert len(mon.flows()) == 1
    for _ in range(10):
        clock.t += 0.1
        mon.ingest([])
    assert mon.flows() == []


def test_close_closes_source_once_and_context_manager() -> None:
    src = FakeSource()
    with LinkMonitor(src) as mon:
        pass
    mon.close()
    assert src.closed == 1 and mon.closed
    with pytest.raises(DWCPError):
        mon.poll()


def test_background_thread_polls_and_closes_source_on_error() -> None:
    src = FakeSource()
    f = Flow(1)
    for i in range(1, 4):
        f.advance(0.01, 1 * G)
        src.batches.append([f.sample(i * 0.01)])
    seen = threading.Event()
    mon = LinkMonitor(src, interval_s=0.01)
    mon.subscribe(lambda e: seen.set())
    mon.start()
    assert seen.wait(10)
    src.fail = True
    mon._thread.join(10)  # type: ignore[union-attr]  # the thread ends on the source's error
    assert isinstance(mon.error, DWCPError) and src.closed == 1
    mon.close()
    assert src.closed == 1


def test_to_json_has_int_tier(clock: Clock) -> None:
    mon = make(clock)
    e = drive(mon, clock, [Flow(1, rtt_us=150_000)], 0.1 * G, 0.5)
    assert e.to_json()["tier"] == 3
