"""`FlowSample`: the one record every telemetry source (eBPF, inet_diag, TCP_INFO) produces.

Units are in the names (`_us`, `_bps`, `_bytes`). A source fills what it can see and leaves the rest at
its default (0, or None where 0 would be a plausible value); `source` says which source made the sample
so a reader knows which fields are meaningful (see docs/telemetry.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FlowSample:
    """One observation of one TCP flow, as seen from this host.

    `cookie` is the kernel's socket cookie (`SO_COOKIE`, BPF `bpf_get_socket_cookie`, inet_diag
    `idiag_cookie`): the same value in all three sources, so it is the flow key. `netns` is the
    network namespace inode number (`stat -L /proc/PID/ns/net`), 0 if the source cannot tell.
    `timestamp_ns` is CLOCK_MONOTONIC when the sample was taken (kernel time for eBPF).
    """

    cookie: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    timestamp_ns: int
    source: str                     # "ebpf", "inet_diag" or "tcp_info"
    netns: int = 0
    state: str = "ESTABLISHED"
    srtt_us: int = 0                # smoothed RTT
    min_rtt_us: int = 0             # the kernel's windowed min RTT (tcp_sock.rtt_min)
    delivery_rate_bps: int = 0      # the kernel's latest delivery-rate sample, bits per second
    delivery_app_limited: bool = False  # that sample was app-limited: not a bottleneck estimate
    bytes_acked: int = 0            # bytes this socket sent that the peer acknowledged
    bytes_received: int = 0
    bytes_sent: int = 0             # including retransmissions
    retrans: int = 0                # total retransmitted segments
    lost: int = 0                   # segments currently considered lost
    cwnd: int = 0                   # congestion window, segments
    mss: int = 0                    # sender MSS, bytes
    pid: int | None = None          # owning process when the source knows it (inet_diag does not)

    @property
    def peer(self) -> str:
        """The remote address: what the link monitor aggregates by."""
        return self.daddr

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FlowEvent:
    """A flow opening or closing (from `sock/inet_sock_set_state`, or inferred by a polling source
    when a cookie appears in or disappears from its snapshots)."""

    kind: str                       # "open" or "close"
    cookie: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    timestamp_ns: int
    source: str
    netns: int = 0
    old_state: str = ""
    new_state: str = ""
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FlowFilter:
    """Which flows a source reports; None means "any". `ports` matches either endpoint's port."""

    ports: frozenset[int] | None = None
    peer: str | None = None         # remote address
    netns: int | None = None        # namespace inode
    pid: int | None = None          # owning process (sources that cannot tell ignore flows they cannot attribute)
    cgroup: str | None = None       # cgroup v2 path (sockops scope); sources without cgroup info ignore it

    def matches(self, s: FlowSample | FlowEvent) -> bool:
        if self.ports is not None and s.sport not in self.ports and s.dport not in self.ports:
            return False
        if self.peer is not None and s.daddr != self.peer:
            return False
        if self.netns is not None and s.netns != self.netns:
            return False
        if self.pid is not None and s.pid is not None and s.pid != self.pid:
            return False
        return True
