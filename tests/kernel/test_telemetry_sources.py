"""Telemetry sources and tier detection on real flows: with BPF forced off the fallbacks give the same
flows (inet_diag and tcp_info agree with each other and with eBPF), flows inside a netlab namespace are
seen through inet_diag's netns support, and dwcp-bench's `link` tier is right on a real delay-line
link (tier 3) and a real shaped veth link (tier 2).

Waits are bounded polls for a state the kernel reaches; nothing asserts how long something took.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dwcp.telemetry import FlowFilter, InetDiagSource, TcpInfoSource, open_source
from dwcp.telemetry.tcp_info import netns_inode, socket_cookie
from tests.conftest import tcp_pairs
from tests.kernel.conftest import wait_for

kernel = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")
SENT = 3_000_000


def transfer(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    a, b = tcp_pairs(2)
    for c, s in zip(a, b):
        c.sendall(b"q" * n)
        got = 0
        while got < n:
            got += len(s.recv(1 << 20))
    return a, b


@kernel
def test_fallbacks_and_ebpf_give_the_same_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same cookies, same byte counts: inet_diag == tcp_info exactly (both read tcp_info of a quiet
    socket); eBPF within one MSS (tcp_probe fires on ACK entry, one ACK behind)."""
    from dwcp.telemetry.ebpf_source import EbpfSource, ebpf_available
    ok, why = ebpf_available()
    if not ok:
        pytest.skip(f"eBPF unavailable: {why}")
    with EbpfSource() as ebpf:
        a, b = transfer(SENT)
        try:
            ports = frozenset(s.getsockname()[1] for s in b)
            flt = FlowFilter(ports=ports)
            cookies = {socket_cookie(s) for s in a + b}
            # BPF forced off: the automatic choice must fall back to inet_diag.
            monkeypatch.setenv("DWCP_TELEMETRY", "inet_diag")
            with open_source(flt) as forced:
                assert forced.name == "inet_diag"
                assert {s.cookie for s in forced.snapshot()} == cookies
            monkeypatch.delenv("DWCP_TELEMETRY")
            with TcpInfoSource(flt) as ti, InetDiagSource(flt) as diag:
                for s in a + b:
                    ti.add(s)
                by_ti = {s.cookie: s for s in ti.snapshot()}
                by_diag = {s.cookie: s for s in diag.snapshot()}
                by_ebpf = wait_for(lambda: (lambda d: d if cookies <= set(d) else None)(
                    {s.cookie: s for s in ebpf.snapshot() if s.cookie in cookies}), "eBPF sees the flows")
            assert set(by_ti) == set(by_diag) == cookies
            for c in cookies:
                t, d, e = by_ti[c], by_diag[c], by_ebpf[c]
                assert (t.saddr, t.sport, t.daddr, t.dport) == (d.saddr, d.sport, d.daddr, d.dport)
                assert (e.sport, e.dport) == (t.sport, t.dport)
                assert t.bytes_acked == d.bytes_acked and t.bytes_received == d.bytes_received
                assert t.netns == d.netns == netns_inode()
                mss = max(t.mss, 1)
                assert abs(e.bytes_acked - t.bytes_acked) <= mss
                assert t.min_rtt_us > 0 and d.min_rtt_us > 0
            senders = [by_ti[socket_cookie(s)] for s in a]
            assert all(SENT <= s.bytes_acked <= SENT + 1 for s in senders)
        finally:
            for s in a + b:
                s.close()


@kernel
def test_inet_diag_sees_flows_in_a_netlab_namespace(wan_link: Callable[..., Any]) -> None:
    lab = wan_link(rtt_ms=10, rate_mbit=100)
    # A flow inside the lab: a listener in b, a client in a sending 1 MB and waiting.
    server = lab.b.popen([sys.executable, "-c", (
        "import socket,sys\n"
        f"l=socket.create_server(('{lab.b.addr}',5302)); print('up',flush=True)\n"
        "c,_=l.accept()\nn=0\n"
        "while n<1000000: n+=len(c.recv(1<<20))\n"
        "c.sendall(b'k'); c.recv(1)\n")], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "up"
    client = lab.a.popen([sys.executable, "-c", (
        "import socket,sys\n"
        f"s=socket.create_connection(('{lab.b.addr}',5302)); s.sendall(b'x'*1000000); s.recv(1)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE)
    try:
        with InetDiagSource(FlowFilter(ports=frozenset({5302})), netns=lab.a.ns) as src:
            assert src.netns == netns_inode(f"/run/netns/{lab.a.ns}") != netns_inode()
            flow = wait_for(lambda: next((s for s in src.snapshot() if s.bytes_acked >= 1_000_000), None),
                            "the lab's flow with all bytes acknowledged")
            assert (flow.saddr, flow.daddr, flow.dport) == (lab.a.addr, lab.b.addr, 5302)
            assert flow.netns == src.netns
            assert 9_000 <= flow.min_rtt_us <= 50_000          # the link's 10 ms, not loopback's µs
            assert [e.kind for e in src.events()] == ["open"]
        # Our own namespace does not see it.
        with InetDiagSource(FlowFilter(ports=frozenset({5302}))) as own:
            assert own.snapshot() == []
    finally:
        assert client.stdin is not None
        client.stdin.close()
        client.wait(10)
        server.wait(10)


def bench_link(lab: Any, seconds: float = 2.5) -> dict[str, Any]:
    """dwcp-bench client in host a against the server in host b; its `link` object."""
    env = {**os.environ, "DWCP_KEY": secrets.token_hex(32), "PYTHONPATH": str(ROOT)}
    server = lab.b.popen([sys.executable, "-m", "dwcp.cli.bench", "server", "--bind", f"{lab.b.addr}:5303",
                          "--once"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert server.stdout is not None and server.stdout.readline().startswith("listening")
        r = lab.a.run([sys.executable, "-m", "dwcp.cli.bench", "client", lab.b.addr, "-p", "5303", "-P", "4",
                       "-t", str(seconds), "--json"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        return {**out["link"], "session_sndbuf_bytes": out["sndbuf_bytes"]}
    finally:
        server.wait(10)


@kernel
def test_tier3_on_a_delay_line_link(wan_link: Callable[..., Any]) -> None:
    link = bench_link(wan_link(rtt_ms=30, rate_mbit=200))
    assert link["tier"] == 3, link
    # A 30 ms path keeps the kernel's send-buffer autotuning (the cap is for short paths only).
    assert link["session_sndbuf_bytes"] == 0, link
    assert 29_000 <= link["min_rtt_us"] <= 60_000
    assert link["bottleneck_bps"] < 1e9 and link["source"] in ("ebpf", "inet_diag", "tcp_info")
    assert link["time_to_decision_s"] is not None


@kernel
def test_tier2_on_a_shaped_veth_link(netlab_ready: None) -> None:
    from dwcp import netlab
    with netlab.veth(rate_mbit=2000, loss=0.001) as lab:
        assert lab.a.run(["ping", "-c", "1", "-W", "5", lab.b.addr], capture_output=True).returncode == 0
        link = bench_link(lab)
    assert link["tier"] == 2, link
    assert link["min_rtt_us"] < 10_000 and 1e9 <= link["bottleneck_bps"] < 10e9
    assert not os.path.exists(f"/run/netns/{lab.a.ns}")


@kernel
def test_veth_loss_drops_packets(netlab_ready: None) -> None:
    from dwcp import netlab
    with netlab.veth(loss=0.05) as lab:
        r = lab.a.run(["ping", "-c", "200", "-i", "0.002", "-q", lab.b.addr], capture_output=True, text=True)
        # 5 % of 200 pings is 10 expected; any loss at all shows the classifier runs (and not all).
        assert " 0% packet loss" not in r.stdout and "100% packet loss" not in r.stdout, r.stdout
