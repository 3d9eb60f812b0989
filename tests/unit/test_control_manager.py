"""The Manager: decisions per peer, re-decided on tier changes, degradation, config changes and the
kill switch; events reach subscribers; decisions are kept and counted."""

from __future__ import annotations

from typing import Any

import pytest

from dwcp.control.config import load_config
from dwcp.control.manager import Manager, ManagerEvent, peer_key
from dwcp.control.metrics import MetricsRegistry
from dwcp.telemetry.monitor import PeerEstimate
from dwcp.telemetry.tier import Tier

PEER = "10.1.2.3"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(**runtime: Any) -> tuple[Manager, list[ManagerEvent], Clock]:
    clock = Clock()
    cfg = load_config(env={}, runtime={"enabled": True, **runtime}, use_system_file=False)
    mgr = Manager(cfg, metrics=MetricsRegistry(), features=frozenset({"cext"}), rdma_reason="no device",
                  clock=clock, cores=2)
    events: list[ManagerEvent] = []
    mgr.subscribe(events.append)
    return mgr, events, clock


def est(bps: float, tier: Tier | None, *, saturated: bool = True, rtt_us: int = 50_000, t: float = 0.0) -> PeerEstimate:
    return PeerEstimate(peer=PEER, timestamp_s=t, bottleneck_bps=bps, throughput_bps=bps, min_rtt_us=rtt_us,
                        saturated=saturated, app_limited=False, confidence=0.9 if saturated else 0.3,
                        tier=tier, tier_reason=f"measured {bps / 1e6:g} Mbit/s" if tier else "")


def decisions(events: list[ManagerEvent], what: str) -> list[Any]:
    return [e.decision.value for e in events if e.kind == "decision" and e.decision and e.decision.what == what]


def test_peer_key_accepts_addresses_in_every_form():
    assert peer_key("10.1.2.3") == peer_key("10.1.2.3:7000") == "10.1.2.3"
    assert peer_key("[::1]:7000") == peer_key("::1") == "::1"
    assert peer_key("localhost:1") in ("127.0.0.1", "::1")


def test_first_plan_without_telemetry_comes_from_config():
    mgr, events, _ = make()
    p = mgr.plan(PEER + ":7000")
    assert p.mode.value == "tcp-amst" and p.streams == 4 and p.tier is None
    assert {e.decision.what for e in events if e.decision} == {"tier", "mode", "streams", "compression_level"}
    assert all(e.cause == "first use" for e in events)
    assert len(mgr.decisions(PEER)) == 4


def test_tier_change_redecides_and_reports_it_once():
    mgr, events, clock = make()
    mgr.on_estimate(est(100e6, Tier.TIER3))
    assert [e.kind for e in events if e.kind == "tier_changed"] == ["tier_changed"]
    assert decisions(events, "streams") == [8]
    events.clear()
    clock.t += 1
    mgr.on_estimate(est(100e6, Tier.TIER3))   # same tier, same rate: nothing new
    assert events == []
    mgr.on_estimate(est(2e9, Tier.TIER2, rtt_us=20_000))
    changed = [e for e in events if e.kind == "tier_changed"]
    assert len(changed) == 1 and changed[0].reprobe and "tier3 -> tier2" in changed[0].detail
    assert decisions(events, "streams") == [4]
    assert decisions(events, "tier") == [2]


def test_a_degraded_link_is_an_event_with_numbers():
    mgr, events, _ = make()
    mgr.on_estimate(est(900e6, Tier.TIER3))
    events.clear()
    mgr.on_estimate(est(400e6, Tier.TIER3))
    deg = [e for e in events if e.kind == "link_degraded"]
    assert len(deg) == 1 and "400.0 Mbit/s, down from 900.0" in deg[0].detail and deg[0].reprobe
    events.clear()
    mgr.on_estimate(est(390e6, Tier.TIER3))  # still degraded: not reported again
    assert not [e for e in events if e.kind == "link_degraded"]


def test_an_unsaturated_estimate_is_not_degradation():
    mgr, events, _ = make()
    mgr.on_estimate(est(900e6, Tier.TIER3))
    mgr.on_estimate(est(100e6, Tier.TIER3, saturated=False))
    assert not [e for e in events if e.kind == "link_degraded"]


def test_config_change_redecides_every_peer_without_restarting():
    mgr, events, _ = make()
    mgr.on_estimate(est(100e6, Tier.TIER3))
    mgr.plan("10.9.9.9")
    events.clear()
    mgr.config.set("transport.initial_streams", 16)
    assert events[0].kind == "config_changed" and "transport.initial_streams" in events[0].detail
    assert decisions(events, "streams") == [16, 16]
    assert mgr.plan(PEER).streams == 16
    events.clear()
    mgr.config.set("compression.enabled", False)
    assert decisions(events, "compression_level") == [None, None]


def test_kill_switch_turns_new_channels_plain_and_back():
    mgr, events, _ = make()
    mgr.plan(PEER)
    events.clear()
    mgr.kill_switch("incident 7")
    assert mgr.killed == "incident 7"
    assert events[0].kind == "kill_switch"
    assert decisions(events, "mode") == ["plain"]
    assert "incident 7" in mgr.plan(PEER).decisions["mode"].reason
    mgr.release_kill_switch()
    assert mgr.plan(PEER).mode.value == "tcp-amst"


def test_disabled_by_default():
    cfg = load_config(env={}, use_system_file=False)
    mgr = Manager(cfg, metrics=MetricsRegistry(), features=frozenset(), rdma_reason="")
    assert not mgr.enabled
    p = mgr.plan(PEER)
    assert p.mode.value == "plain" and "disabled" in p.decisions["mode"].reason


def test_decisions_are_counted_in_metrics_and_kept_in_stats():
    mgr, _, _ = make()
    mgr.on_estimate(est(100e6, Tier.TIER3))
    text = mgr.metrics.render().decode()
    assert 'dwcp_control_decisions_total{peer="10.1.2.3",what="streams"} 1.0' in text
    s = mgr.stats()
    assert s["peers"][PEER]["streams"] == 8 and s["decisions"][0]["peer"] == PEER


def test_a_failing_listener_does_not_stop_the_others():
    mgr, events, _ = make()

    def bad(e: ManagerEvent) -> None:
        raise RuntimeError("listener bug")
    mgr.subscribe(bad)
    seen: list[ManagerEvent] = []
    mgr.subscribe(seen.append)
    mgr.plan(PEER)
    assert len(seen) == 4


def test_closed_manager_ignores_late_estimates():
    mgr, events, _ = make()
    mgr.close()
    mgr.on_estimate(est(100e6, Tier.TIER3))
    assert events == []
    with pytest.raises(Exception):
        mgr.config.set("transport.min_streams", 0)


def test_telemetry_flag_off_ignores_the_monitor() -> None:
    class Monitor:
        subscribed = False

        def subscribe(self, cb):  # type: ignore[no-untyped-def]
            Monitor.subscribed = True
            return lambda: None
    cfg = load_config(env={}, runtime={"enabled": True, "features.telemetry": False}, use_system_file=False)
    Manager(cfg, monitor=Monitor(), metrics=MetricsRegistry(), features=frozenset(), rdma_reason="")  # type: ignore[arg-type]
    assert not Monitor.subscribed
    cfg.set("features.telemetry", True)
    Manager(cfg, monitor=Monitor(), metrics=MetricsRegistry(), features=frozenset(), rdma_reason="")  # type: ignore[arg-type]
    assert Monitor.subscribed
