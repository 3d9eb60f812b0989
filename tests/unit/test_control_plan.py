"""The per-peer plan: mode selection, initial streams and compression level, as pure rules."""

from __future__ import annotations

import dataclasses

import pytest

from dwcp.control.mode import TransportMode, select_mode
from dwcp.control.plan import INITIAL_STREAMS_BY_TIER, LinkView, PlanInputs, make_plan
from dwcp.telemetry.tier import Tier

BASE = PlanInputs(enabled=True, killed=None, features=frozenset({"cext", "zerocopy"}), rdma_device=None,
                  rdma_reason="pyverbs not installed", min_streams=1, max_streams=256, initial_streams="auto",
                  compression_enabled=True, compression_level="auto", adaptive_compression=True, cores=2)


def plan(link: LinkView = LinkView(), **changes: object):  # type: ignore[no-untyped-def]
    return make_plan("10.0.0.2", link, dataclasses.replace(BASE, **changes), 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("tier,features,device,mode,words", [
    (Tier.TIER1, frozenset(), None, TransportMode.TCP_AMST, "no RDMA on this host"),
    (Tier.TIER1, frozenset({"rdma"}), None, TransportMode.HYBRID, "Hybrid"),
    (Tier.TIER1, frozenset({"rdma"}), "mlx5_0", TransportMode.RDMA, "mlx5_0"),
    (Tier.TIER2, frozenset({"rdma"}), None, TransportMode.TCP_AMST, "tier 2"),
    (Tier.TIER3, frozenset(), None, TransportMode.TCP_AMST, "aggressive compression"),
    (None, frozenset(), None, TransportMode.TCP_AMST, "not known yet"),
    (Tier.TIER3, frozenset(), "mlx5_0", TransportMode.TCP_AMST, "rdma_device='mlx5_0' is set but"),
])
def test_mode_from_tier_features_and_device(tier, features, device, mode, words):  # type: ignore[no-untyped-def]
    got, reason = select_mode(enabled=True, killed=None, tier=tier, features=features, rdma_device=device,
                              rdma_reason="no device")
    assert got is mode
    assert words in reason


def test_disabled_and_killed_are_plain_whatever_the_tier():
    for tier in (Tier.TIER1, Tier.TIER3, None):
        assert select_mode(enabled=False, killed=None, tier=tier, features=frozenset({"rdma"}), rdma_device=None)[0] \
            is TransportMode.PLAIN
        mode, reason = select_mode(enabled=True, killed="incident 42", tier=tier, features=frozenset(), rdma_device=None)
        assert mode is TransportMode.PLAIN and "incident 42" in reason
    p = plan(enabled=False)
    assert p.mode is TransportMode.PLAIN and p.streams == 1 and p.compression_level is None


def test_initial_streams_follow_the_tier_when_auto():
    for tier, n in INITIAL_STREAMS_BY_TIER.items():
        p = plan(LinkView(tier=tier))
        assert p.streams == n
        assert "tuner" in p.decisions["streams"].reason


def test_an_operator_who_sets_16_gets_16():
    assert plan(LinkView(tier=Tier.TIER1), initial_streams=16).streams == 16
    assert plan(LinkView(tier=Tier.TIER1), min_streams=16).streams == 16
    p = plan(LinkView(tier=Tier.TIER3), max_streams=2)
    assert p.streams == 2 and "clamped" in p.decisions["streams"].reason


@pytest.mark.parametrize("bps,level", [(10e9, None), (1e9, 3), (100e6, 6)])
def test_auto_compression_level_follows_the_link_rate(bps, level):  # type: ignore[no-untyped-def]
    p = plan(LinkView(tier=Tier.TIER3, bottleneck_bps=bps))
    assert p.compression_level == level, p.decisions["compression_level"].reason


def test_compression_settings_are_obeyed():
    assert plan(LinkView(bottleneck_bps=100e6), compression_enabled=False).compression_level is None
    assert plan(LinkView(bottleneck_bps=10e9), compression_level=9).compression_level == 9
    assert plan(LinkView(bottleneck_bps=100e6), adaptive_compression=False).compression_level == 3
    assert plan(LinkView()).compression_level == 1  # nothing measured yet: the cheapest level


def test_every_decision_names_its_inputs_and_serialises():
    p = plan(LinkView(tier=Tier.TIER2, bottleneck_bps=2e9, min_rtt_us=20_000))
    j = p.to_json()
    assert j["mode"] == "tcp-amst" and j["tier"] == 2
    for what, d in j["decisions"].items():
        assert d["what"] == what and d["reason"] and d["peer"] == "10.0.0.2"
    assert j["decisions"]["compression_level"]["inputs"]["bottleneck_bps"] == 2e9
