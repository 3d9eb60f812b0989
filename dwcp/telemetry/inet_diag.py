"""inet_diag (sock_diag netlink, what `ss -ti` uses): TCP_INFO of every TCP flow of a network namespace.

No privileges are needed for the caller's own namespace. Another namespace (``netns="NAME"``, a name
under /run/netns as `ip netns` keeps them) needs CAP_SYS_ADMIN: setns(CLONE_NEWNET) is per thread, so a
short-lived thread enters the namespace, opens the netlink socket there and exits; a netlink socket
stays bound to the namespace it was created in, so every later query sees that namespace's flows.

The socket cookie in each answer (``idiag_cookie``) is the same value as SO_COOKIE and BPF's
``bpf_get_socket_cookie``, so samples from this source and the others share their flow key.
Open/close events are inferred: a cookie that appears in a snapshot is "open", one that disappears is
"close" (a flow that lives and dies between two snapshots is never seen; eBPF sees those).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from dwcp._netns import run_in_netns
from dwcp.errors import CapabilityError, ConfigError, DWCPError
from dwcp.telemetry.sample import FlowEvent, FlowFilter, FlowSample
from dwcp.telemetry.tcp_info import TcpInfo, netns_inode, sample_from_info

log = logging.getLogger(__name__)

INET_DIAG_INFO = 2
#: Every state of a connection that carries data or is winding down; not LISTEN, TIME_WAIT or
#: NEW_SYN_RECV (request socks have no tcp_info).
_STATES = [1, 2, 3, 4, 5, 7, 8, 9, 11]
STATE_MASK = sum(1 << s for s in _STATES)

#: pyroute2's tcp_info field names -> ours (parse_tcp_info's), so one builder makes every FlowSample.
_FIELD_MAP = {
    "tcpi_state": "state", "tcpi_delivery_rate_app_limited": "delivery_rate_app_limited",
    "tcpi_rto": "rto_us", "tcpi_snd_mss": "snd_mss", "tcpi_rcv_mss": "rcv_mss",
    "tcpi_unacked": "unacked", "tcpi_lost": "lost", "tcpi_retrans": "retrans", "tcpi_pmtu": "pmtu",
    "tcpi_rtt": "rtt_us", "tcpi_rttvar": "rttvar_us", "tcpi_snd_ssthresh": "snd_ssthresh",
    "tcpi_snd_cwnd": "snd_cwnd", "tcpi_total_retrans": "total_retrans",
    "tcpi_pacing_rate": "pacing_rate_bps", "tcpi_bytes_acked": "bytes_acked",
    "tcpi_bytes_received": "bytes_received", "tcpi_segs_out": "segs_out", "tcpi_segs_in": "segs_in",
    "tcpi_notsent_bytes": "notsent_bytes", "tcpi_min_rtt": "min_rtt_us",
    "tcpi_delivery_rate": "delivery_rate_bps", "tcpi_busy_time": "busy_time_us",
    "tcpi_rwnd_limited": "rwnd_limited_us", "tcpi_sndbuf_limited": "sndbuf_limited_us",
    "tcpi_bytes_sent": "bytes_sent", "tcpi_bytes_retrans": "bytes_retrans",
}
_UNSET = 0xFFFFFFFFFFFFFFFF
EVENT_RESCAN_NS = 10_000_000


def info_from_pyroute2(nla: Any) -> TcpInfo:
    """Our TcpInfo (bits per second, our names) from pyroute2's decoded INET_DIAG_INFO."""
    out: dict[str, int] = {}
    for theirs, ours in _FIELD_MAP.items():
        try:
            value = nla[theirs]
        except (KeyError, TypeError):
            continue
        if value is None:
            continue
        out[ours] = int(value)
    # pyroute2 decodes the bitfield byte as `byte & 1` (bit 0 on little-endian: app_limited).
    out["delivery_rate_app_limited"] = out.get("delivery_rate_app_limited", 0) & 1
    for name in ("pacing_rate_bps", "delivery_rate_bps"):
        if name in out and out[name] != _UNSET:
            out[name] *= 8
    return TcpInfo(out)


def netns_path(name: str) -> str:
    """A namespace name (as `ip netns` keeps them) or a path such as /proc/PID/ns/net."""
    if "/" in name:
        return name
    return f"/run/netns/{name}"


NETLINK_SOCK_DIAG = 4


def _raw_diag_socket() -> int:
    """A sock_diag netlink socket of the calling thread's namespace, as a detached fd."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG).detach()


def _open_diag_socket(fileno: int | None = None) -> Any:
    """pyroute2's DiagSocket, over ``fileno`` when given (a socket made inside another namespace:
    pyroute2 opens its socket lazily, possibly in another thread, so the fd must exist first)."""
    try:
        from pyroute2 import DiagSocket  # type: ignore[import-untyped]  # no stubs
        from pyroute2.netlink.diag import MarshalDiag  # type: ignore[import-untyped]
        from pyroute2.netlink.nlsocket import NetlinkSocket  # type: ignore[import-untyped]
    except ImportError as e:
        if fileno is not None:
            os.close(fileno)
        raise CapabilityError(f"the inet_diag source needs pyroute2 ({e}); pip install pyroute2") from e
    if fileno is None:
        ds = DiagSocket()
    else:
        ds = DiagSocket.__new__(DiagSocket)
        NetlinkSocket.__init__(ds, NETLINK_SOCK_DIAG, fileno=fileno)
        ds.set_marshal(MarshalDiag())
    try:
        ds.bind()
    except BaseException:
        ds.close()
        raise
    return ds


def _pid_inodes(pid: int) -> set[int]:
    """Socket inodes held by process ``pid`` (its fds that are `socket:[N]`)."""
    out: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def cgroup_id(path: str) -> int:
    """A cgroup v2 directory's id (its inode number), as INET_DIAG_CGROUP_ID and BPF report it."""
    try:
        return os.stat(path).st_ino
    except OSError as e:
        raise ConfigError(f"cgroup {path}: {e.strerror}; give a cgroup v2 directory such as "
                          "/sys/fs/cgroup/unified/system.slice") from e


class InetDiagSource:
    """All TCP flows (IPv4 and IPv6) of one network namespace, polled over sock_diag netlink.

    ``netns`` is None for the caller's namespace, else a name under /run/netns (or a /proc/PID/ns/net
    path). ``cgroup`` (a cgroup v2 directory) keeps only sockets created in that cgroup. With a
    ``pid`` in the filter, only sockets that process holds are reported (matched by inode)."""

    name = "inet_diag"

    def __init__(self, flow_filter: FlowFilter | None = None, *, netns: str | None = None,
                 cgroup: str | None = None, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._filter = flow_filter or FlowFilter(cgroup=cgroup)
        cg = cgroup or self._filter.cgroup
        self._cgroup_id = cgroup_id(cg) if cg else None
        self._clock_ns = clock_ns
        self.netns_name = netns
        if netns is None:
            self._netns = netns_inode()
            self._ds = _open_diag_socket()
        else:
            path = netns_path(netns)
            self._netns = netns_inode(path)
            if self._netns == 0:
                raise ConfigError(f"network namespace {netns!r} ({path}) does not exist; "
                                  "list them with `ip netns list`")
            self._ds = _open_diag_socket(run_in_netns(path, _raw_diag_socket))
        self._lock = threading.Lock()
        self._known: dict[int, FlowSample] = {}
        self._events: list[FlowEvent] = []
        self._last_scan_ns = 0
        self._scans = self._scans_at_events = 0
        self._closed = False
        self._baseline = True
        try:
            self.snapshot()  # the flows that exist now are the baseline, not "open" events
        except BaseException:
            self.close()
            raise

    @property
    def netns(self) -> int:
        """Inode of the namespace this source watches."""
        return self._netns

    def _messages(self) -> Iterator[Any]:
        for family in (socket.AF_INET, socket.AF_INET6):
            yield from self._ds.get_sock_stats(family=family, states=STATE_MASK,
                                               extensions=1 << (INET_DIAG_INFO - 1))

    def snapshot(self) -> list[FlowSample]:
        with self._lock:
            if self._closed:
                raise ConfigError("InetDiagSource is closed; open a new source")
            try:
                msgs = list(self._messages())
            except OSError as e:
                raise DWCPError(f"inet_diag query failed: {e}") from e
            now = self._clock_ns()
            pid = self._filter.pid
            inodes = _pid_inodes(pid) if pid is not None else None
            current: dict[int, FlowSample] = {}
            for m in msgs:
                info_nla = m.get_attr("INET_DIAG_INFO")
                if info_nla is None:
                    continue
                if self._cgroup_id is not None and m.get_attr("INET_DIAG_CGROUP_ID") != self._cgroup_id:
                    continue
                if inodes is not None and m["idiag_inode"] not in inodes:
                    continue
                s = sample_from_info(
                    info_from_pyroute2(info_nla), cookie=int(m["idiag_cookie"]), saddr=str(m["idiag_src"]),
                    sport=int(m["idiag_sport"]), daddr=str(m["idiag_dst"]), dport=int(m["idiag_dport"]),
                    timestamp_ns=now, source=self.name, netns=self._netns, state=int(m["idiag_state"]),
                    pid=pid if inodes is not None else None)
                if self._filter.matches(s):
                    current[s.cookie] = s
            if not self._baseline:
                self._infer_events(current, now)
            self._baseline = False
            self._known = current
            self._last_scan_ns = self._clock_ns()
            self._scans += 1
            return list(current.values())

    def _infer_events(self, current: dict[int, FlowSample], now: int) -> None:
        for cookie, s in current.items():
            if cookie not in self._known:
                self._events.append(FlowEvent("open", cookie, s.saddr, s.sport, s.daddr, s.dport, now,
                                              self.name, s.netns, "", s.state, s.pid))
        for cookie, s in self._known.items():
            if cookie not in current:
                self._events.append(FlowEvent("close", cookie, s.saddr, s.sport, s.daddr, s.dport, now,
                                              self.name, s.netns, s.state, "CLOSE", s.pid))

    def events(self) -> list[FlowEvent]:
        """Opens and closes seen since the last call. Rescans unless a snapshot was taken since the
        previous call and within ``EVENT_RESCAN_NS`` (so snapshot() then events() in one poll costs
        one netlink query)."""
        if self._scans_at_events == self._scans or self._clock_ns() - self._last_scan_ns > EVENT_RESCAN_NS:
            self.snapshot()
        with self._lock:
            out, self._events = self._events, []
            self._scans_at_events = self._scans
        return out

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._ds.close()

    def __enter__(self) -> InetDiagSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
