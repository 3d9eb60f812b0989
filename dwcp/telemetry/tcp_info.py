"""TCP_INFO of our own sockets (no privileges needed).

Offsets follow struct tcp_info in include/uapi/linux/tcp.h; the kernel returns as many bytes as it
knows (280 here) and we only read fields that fit in what it returned, so older kernels just yield
fewer fields instead of garbage.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_TCP_INFO_BYTES = 280

# (name, struct format, byte offset) for the fields we use.
_FIELDS = (
    ("state", "B", 0),
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
