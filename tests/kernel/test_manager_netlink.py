"""The Manager hears the kernel's own network events (rtnetlink via pyroute2): a link going down or up
under a peer's route re-decides that peer and tells subscribers to re-probe."""

from __future__ import annotations

import pytest

from dwcp.control.config import load_config
from dwcp.control.manager import Manager, ManagerEvent
from dwcp.control.metrics import MetricsRegistry
from tests.kernel.conftest import wait_for

pytestmark = pytest.mark.kernel


def test_link_down_and_up_under_a_peer_are_events_for_that_peer(wan_link) -> None:  # type: ignore[no-untyped-def]
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    lab = wan_link(rtt_ms=10, rate_mbit=100)
    cfg = load_config(env={}, runtime={"enabled": True}, use_system_file=False)
    events: list[ManagerEvent] = []
    with Manager(cfg, metrics=MetricsRegistry(), features=frozenset(), rdma_reason="", netlink=lab.a.ns) as mgr:
        mgr.subscribe(events.append)
        mgr.plan(lab.b.addr)
        assert mgr._watcher is not None
        oif = mgr._watcher.route_oif(lab.b.addr)
        assert oif is not None, "the lab routes b's address through an interface of a"
        with IPRoute(netns=lab.a.ns) as ip:
            ip.link("set", index=oif, state="down")

            def seen(kind: str) -> list[ManagerEvent]:
                return [e for e in events if e.kind == kind and e.peer == lab.b.addr]
            down = wait_for(lambda: seen("link_down"), "a link_down event for the peer")
            assert down[0].reprobe and "affects the path" in down[0].detail
            ip.link("set", index=oif, state="up")
            # The route comes back with the link: the peer is routed through it again.
            wait_for(lambda: [e for e in events if e.kind == "link_up"], "a link_up event")
    # a route event was reported for the namespace too (the link's routes went away with it)
    assert [e for e in events if e.kind in ("route_removed", "route_added")]
