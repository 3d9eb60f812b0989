"""Telemetry sources without privileges: TCP_INFO parsing, the pyroute2 field mapping, TcpInfoSource
and InetDiagSource on loopback in our own namespace, and the choice between sources."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from dwcp.errors import CapabilityError, ConfigError
from dwcp.telemetry import FlowFilter, InetDiagSource, TcpInfoSource, open_source, source_info
from dwcp.telemetry.inet_diag import info_from_pyroute2
from dwcp.telemetry.sources import FlowSource
from dwcp.telemetry.tcp_info import netns_inode, parse_tcp_info, sample_from_info, socket_cookie
from tests.conftest import tcp_pairs


def raw_tcp_info(**fields: int) -> bytes:
    buf = bytearray(280)
    offsets = {"state": ("B", 0), "rate_flags": ("B", 7), "snd_mss": ("I", 16), "lost": ("I", 32),
               "rtt_us": ("I", 68), "snd_cwnd": ("I", 80), "total_retrans": ("I", 100),
               "bytes_acked": ("Q", 120), "bytes_received": ("Q", 128), "min_rtt_us": ("I", 148),
               "delivery_rate": ("Q", 160), "bytes_sent": ("Q", 200)}
    for name, value in fields.items():
        fmt, off = offsets[name]
        struct.pack_into("<" + fmt, buf, off, value)
    return bytes(buf)


def test_parse_tcp_info_fields_and_units() -> None:
    info = parse_tcp_info(raw_tcp_info(state=1, rate_flags=0x01, snd_mss=1448, rtt_us=2500, snd_cwnd=40,
                                       total_retrans=7, bytes_acked=10**9, min_rtt_us=2000,
                                       delivery_rate=125_000_000))
    assert info["delivery_rate_bps"] == 10**9          # bytes/s from the kernel -> bits/s
    assert info["delivery_rate_app_limited"] == 1
    s = sample_from_info(info, cookie=5, saddr="a", sport=1, daddr="b", dport=2, timestamp_ns=1,
                         source="tcp_info", netns=9)
    assert (s.state, s.srtt_us, s.min_rtt_us, s.cwnd, s.retrans, s.mss, s.bytes_acked) == \
        ("ESTABLISHED", 2500, 2000, 40, 7, 1448, 10**9)
    assert s.delivery_app_limited and s.delivery_rate_bps == 10**9


def test_parse_short_tcp_info_yields_fewer_fields() -> None:
    info = parse_tcp_info(raw_tcp_info(rtt_us=100)[:104])
    assert info.get("rtt_us") == 100 and "bytes_acked" not in info.fields


def test_no_delivery_sample_reads_zero() -> None:
    info = parse_tcp_info(raw_tcp_info(delivery_rate=0xFFFFFFFFFFFFFFFF))
    s = sample_from_info(info, cookie=1, saddr="a", sport=1, daddr="b", dport=2, timestamp_ns=0,
                         source="x", netns=0)
    assert s.delivery_rate_bps == 0


def test_pyroute2_mapping_matches_our_parser() -> None:
    nla = {"tcpi_state": 1, "tcpi_delivery_rate_app_limited": 1, "tcpi_rtt": 300, "tcpi_min_rtt": 200,
           "tcpi_snd_cwnd": 12, "tcpi_total_retrans": 3, "tcpi_bytes_acked": 99, "tcpi_delivery_rate": 1000,
           "tcpi_snd_mss": 1448}
    info = info_from_pyroute2(nla)
    assert info["delivery_rate_bps"] == 8000 and info["rtt_us"] == 300 and info["min_rtt_us"] == 200
    assert info["delivery_rate_app_limited"] == 1 and info["snd_cwnd"] == 12


def test_tcp_info_source_add_snapshot_events() -> None:
    a, b = tcp_pairs(2)
    try:
        src = TcpInfoSource()
        assert isinstance(src, FlowSource)
        cookies = [src.add(s) for s in a]
        assert src.add(a[0]) == cookies[0]            # idempotent
        a[0].sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(b[0].recv(1 << 20))
        snap = {s.cookie: s for s in src.snapshot()}
        assert set(snap) == set(cookies)
        s0 = snap[socket_cookie(a[0])]
        assert 100_000 <= s0.bytes_acked <= 100_001 and s0.netns == netns_inode() and s0.pid == os.getpid()
        assert (s0.saddr, s0.sport) == a[0].getsockname() and s0.min_rtt_us > 0
        assert [e.kind for e in src.events()] == ["open", "open"]
        src.remove(a[1])
        a[0].close()
        assert src.snapshot() == []
        ev = src.events()
        assert sorted(e.kind for e in ev) == ["close", "close"] and {e.cookie for e in ev} == set(cookies)
        src.close()
        with pytest.raises(ConfigError):
            src.snapshot()
    finally:
        for s in a + b:
            s.close()


def test_tcp_info_source_rejects_unconnected_socket() -> None:
    with socket.socket() as s, TcpInfoSource() as src, pytest.raises(ConfigError):
        src.add(s)


def test_inet_diag_own_namespace_sees_flow_and_events() -> None:
    with InetDiagSource() as src:
        a, b = tcp_pairs(1)
        try:
            a[0].sendall(b"y" * 50_000)
            got = 0
            while got < 50_000:
                got += len(b[0].recv(1 << 20))
            cookie = socket_cookie(a[0])
            snap = {s.cookie: s for s in src.snapshot()}
            assert cookie in snap and 50_000 <= snap[cookie].bytes_acked <= 50_001
            assert snap[cookie].source == "inet_diag" and snap[cookie].netns == netns_inode()
            opened = {e.cookie for e in src.events() if e.kind == "open"}
            assert cookie in opened and socket_cookie(b[0]) in opened
        finally:
            for s in a + b:
                s.close()
        closed = {e.cookie for e in src.events() if e.kind == "close"}
        assert cookie in closed


def test_inet_diag_filters_by_port_and_pid() -> None:
    a, b = tcp_pairs(1)
    try:
        port = a[0].getpeername()[1]
        with InetDiagSource(FlowFilter(ports=frozenset({port}))) as src:
            assert {s.cookie for s in src.snapshot()} == {socket_cookie(a[0]), socket_cookie(b[0])}
        with InetDiagSource(FlowFilter(ports=frozenset({port}), pid=os.getpid())) as src:
            assert len(src.snapshot()) == 2
        with InetDiagSource(FlowFilter(ports=frozenset({port}), pid=1)) as src:
            assert src.snapshot() == []
    finally:
        for s in a + b:
            s.close()


def test_inet_diag_unknown_netns_is_config_error() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        InetDiagSource(netns="dwcp-no-such-namespace")


def test_source_info_states_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DWCP_TELEMETRY", raising=False)
    info = source_info()
    assert info["source"] in ("ebpf", "inet_diag") and info["reason"] and not info["forced"]
    assert set(info["alternatives"]) == {"ebpf", "inet_diag", "tcp_info"} - {info["source"]}
    monkeypatch.setenv("DWCP_TELEMETRY", "tcp_info")
    info = source_info()
    assert info["source"] == "tcp_info" and info["forced"] and "DWCP_TELEMETRY" in info["reason"]
    with open_source() as src:
        assert src.name == "tcp_info"


def test_forcing_unknown_source_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWCP_TELEMETRY", "pcap")
    with pytest.raises(ConfigError, match="choose one of"):
        open_source()
    with pytest.raises(ConfigError):
        source_info()


def test_forcing_unusable_ebpf_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import dwcp.telemetry.sources as sources

    def broken() -> object:
        raise ImportError("dwcp._ebpf not built")

    monkeypatch.setattr(sources, "_ebpf_module", broken)
    monkeypatch.setenv("DWCP_TELEMETRY", "ebpf")
    info = source_info()
    assert info["source"] is None and "inet_diag" in info["reason"]
    with pytest.raises(CapabilityError, match="DWCP_TELEMETRY=ebpf.*not available.*inet_diag"):
        open_source()
    monkeypatch.delenv("DWCP_TELEMETRY")
    with open_source() as src:                       # automatic choice falls back
        assert src.name == "inet_diag"
