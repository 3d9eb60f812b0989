"""TCP_INFO of our own sockets (no privileges needed), and :class:`TcpInfoSource`, the telemetry
source built on it.

Offsets follow struct tcp_info in include/uapi/linux/tcp.h; the kernel returns as many bytes as it
knows (280 here) and we only read fields that fit in what it returned, so older kernels just yield
fewer fields instead of garbage.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dwcp.errors import ConfigError
from dwcp.telemetry.sample import FlowEvent, FlowFilter, FlowSample

_TCP_INFO_BYTES = 280

# (name, struct format, byte offset) for the fields we use.
_FIELDS = (
    ("state", "B", 0),
    ("rate_flags", "B", 7),     # bit 0: tcpi_delivery_rate_app_limited (little-endian bitfield)
    ("rto_us", "I", 8),
    ("snd_mss", "I", 16),
    ("rcv_mss", "I", 20),
    ("unacked", "I", 24),
    ("lost", "I", 32),
    ("retrans", "I", 36),
    ("pmtu", "I", 60),
    ("rtt_us", "I", 68),
    ("rttvar_us", "I", 72),
    ("snd_ssthresh", "I", 76),
    ("snd_cwnd", "I", 80),
    ("total_retrans", "I", 100),
    ("pacing_rate_bps", "Q", 104),
    ("bytes_acked", "Q", 120),
    ("bytes_received", "Q", 128),
    ("segs_out", "I", 136),
    ("segs_in", "I", 140),
    ("notsent_bytes", "I", 144),
    ("min_rtt_us", "I", 148),
    ("delivery_rate_bps", "Q", 160),
    ("busy_time_us", "Q", 168),
    ("rwnd_limited_us", "Q", 176),
    ("sndbuf_limited_us", "Q", 184),
    ("bytes_sent", "Q", 200),
    ("bytes_retrans", "Q", 208),
)


@dataclass(frozen=True)
class TcpInfo:
    fields: dict[str, int]

    def __getitem__(self, name: str) -> int:
        return self.fields[name]

    def get(self, name: str, default: int = 0) -> int:
        return self.fields.get(name, default)


def parse_tcp_info(raw: bytes) -> TcpInfo:
    out: dict[str, int] = {}
    for name, fmt, off in _FIELDS:
        size = struct.calcsize(fmt)
        if off + size <= len(raw):
            (value,) = struct.unpack_from("<" + fmt, raw, off)
            out[name] = value
    # The kernel reports pacing and delivery rates in bytes per second; we name units in bits.
    for name in ("pacing_rate_bps", "delivery_rate_bps"):
        if name in out and out[name] != 0xFFFFFFFFFFFFFFFF:
            out[name] *= 8
    if "rate_flags" in out:
        out["delivery_rate_app_limited"] = out["rate_flags"] & 1
    return TcpInfo(out)


def tcp_info(sock: socket.socket | int) -> TcpInfo:
    """TCP_INFO of a connected TCP socket (object or fd)."""
    if isinstance(sock, int):
        s = socket.socket(fileno=sock)
        try:
            raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
        finally:
            s.detach()
    else:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    return parse_tcp_info(raw)


# ---- FlowSample construction shared by the polling sources (TCP_INFO and inet_diag) ---------------
#: Kernel TCP states (include/net/tcp_states.h), by number.
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
              12: "NEW_SYN_RECV"}
SO_COOKIE = 57  # include/uapi/asm-generic/socket.h; not in Python's socket module
_NO_RATE = 0xFFFFFFFFFFFFFFFF  # "no sample yet" as the kernel reports it (left unscaled by parse_tcp_info)


def netns_inode(path: str = "/proc/self/ns/net") -> int:
    """The network namespace's inode number (what `stat -L /proc/PID/ns/net` and BPF's
    ``net->ns.inum`` report): 0 if it cannot be read."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's socket cookie (SO_COOKIE), the flow key shared with inet_diag and BPF."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
    return int.from_bytes(raw, "little")


def sample_from_info(info: TcpInfo, *, cookie: int, saddr: str, sport: int, daddr: str, dport: int,
                     timestamp_ns: int, source: str, netns: int, state: int | None = None,
                     pid: int | None = None) -> FlowSample:
    """A FlowSample from parsed TCP_INFO fields (units as :func:`parse_tcp_info` leaves them)."""
    rate = info.get("delivery_rate_bps")
    st = info.get("state") if state is None else state
    return FlowSample(
        cookie=cookie, saddr=saddr, sport=sport, daddr=daddr, dport=dport, timestamp_ns=timestamp_ns,
        source=source, netns=netns, state=TCP_STATES.get(st, str(st)),
        srtt_us=info.get("rtt_us"), min_rtt_us=info.get("min_rtt_us"),
        delivery_rate_bps=0 if rate == _NO_RATE else rate,
        delivery_app_limited=bool(info.get("delivery_rate_app_limited")),
        bytes_acked=info.get("bytes_acked"), bytes_received=info.get("bytes_received"),
        bytes_sent=info.get("bytes_sent"), retrans=info.get("total_retrans"), lost=info.get("lost"),
        cwnd=info.get("snd_cwnd"), mss=info.get("snd_mss"), pid=pid)


def _endpoint(addr: Any) -> tuple[str, int]:
    return str(addr[0]), int(addr[1])


class TcpInfoSource:
    """FlowSamples of sockets you register (``add``/``remove``): getsockopt(TCP_INFO) on each, no
    privileges. It sees only this process's sockets, so it is the fallback when neither BPF nor
    inet_diag is usable, and the cheapest way to watch a session's own streams.

    Events: "open" when a socket is added, "close" when it is removed or found closed (fd gone or
    TCP state CLOSE)."""

    name = "tcp_info"

    def __init__(self, flow_filter: FlowFilter | None = None, *,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._filter = flow_filter or FlowFilter()
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        # cookie -> (socket, saddr, sport, daddr, dport)
        self._socks: dict[int, tuple[socket.socket, str, int, str, int]] = {}
        self._events: list[FlowEvent] = []
        self._netns = netns_inode()
        self._pid = os.getpid()
        self._closed = False

    def add(self, sock: socket.socket) -> int:
        """Watch a connected TCP socket; returns its cookie. Adding it again is a no-op."""
        try:
            cookie = socket_cookie(sock)
            saddr, sport = _endpoint(sock.getsockname())
            daddr, dport = _endpoint(sock.getpeername())
        except OSError as e:
            raise ConfigError(f"TcpInfoSource.add: {sock!r} is not a connected TCP socket ({e}); "
                              "add sockets after connect()/accept()") from e
        with self._lock:
            if cookie not in self._socks:
                self._socks[cookie] = (sock, saddr, sport, daddr, dport)
                self._event("open", cookie, saddr, sport, daddr, dport, "", "ESTABLISHED")
        return cookie

    def remove(self, sock: socket.socket | int) -> None:
        """Stop watching a socket (object or cookie); emits a "close" event if it was watched."""
        with self._lock:
            if isinstance(sock, int):
                cookie = sock
            else:
                found = [c for c, v in self._socks.items() if v[0] is sock]
                if not found:
                    return
                cookie = found[0]
            entry = self._socks.pop(cookie, None)
            if entry is not None:
                _, saddr, sport, daddr, dport = entry
                self._event("close", cookie, saddr, sport, daddr, dport, "ESTABLISHED", "CLOSE")

    def cookies(self) -> list[int]:
        with self._lock:
            return list(self._socks)

    def _event(self, kind: str, cookie: int, saddr: str, sport: int, daddr: str, dport: int,
               old: str, new: str) -> None:
        ev = FlowEvent(kind=kind, cookie=cookie, saddr=saddr, sport=sport, daddr=daddr, dport=dport,
                       timestamp_ns=self._clock_ns(), source=self.name, netns=self._netns,
                       old_state=old, new_state=new, pid=self._pid)
        if self._filter.matches(ev):
            self._events.append(ev)

    def snapshot(self) -> list[FlowSample]:
        if self._closed:
            raise ConfigError("TcpInfoSource is closed; open a new source")
        out: list[FlowSample] = []
        with self._lock:
            for cookie, (sock, saddr, sport, daddr, dport) in list(self._socks.items()):
                try:
                    info = tcp_info(sock)
                except (OSError, ValueError):  # closed socket (fd -1) or fd reused by something else
                    info = None
                if info is None or info.get("state") == 7:  # CLOSE
                    del self._socks[cookie]
                    self._event("close", cookie, saddr, sport, daddr, dport, "ESTABLISHED", "CLOSE")
                    continue
                s = sample_from_info(info, cookie=cookie, saddr=saddr, sport=sport, daddr=daddr,
                                     dport=dport, timestamp_ns=self._clock_ns(), source=self.name,
                                     netns=self._netns, pid=self._pid)
                if self._filter.matches(s):
                    out.append(s)
        return out

    def events(self) -> list[FlowEvent]:
        with self._lock:
            out, self._events = self._events, []
        return out

    def close(self) -> None:
        with self._lock:
            self._socks.clear()
            self._closed = True

    def __enter__(self) -> TcpInfoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
