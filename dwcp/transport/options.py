"""Validated session options shared by connect() and listen()."""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass, field

from dwcp.errors import ConfigError
from dwcp.wire.negotiation import CIPHERS

MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 64 << 20
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_STREAMS = 256
CHECKSUMS = ("xxh3", "crc32c")


def parse_address(addr: str | tuple[str, int], *, default_host: str = "",
                  default_port: int | None = None) -> tuple[str, int]:
    """'host:port', '[v6]:port', ':port' or (host, port) → (host, port), with a clear error.

    With ``default_port``, a bare host is accepted too ('host', '198.18.0.2', '::1', '[::1]'), as
    iperf users type it."""
    if isinstance(addr, tuple):
        if len(addr) != 2:
            raise ConfigError(f"address tuple must be (host, port), got {addr!r}")
        host, port = addr
    elif isinstance(addr, str):
        expected = "'host:port'" + (" or 'host'" if default_port is not None else "")
        if addr.startswith("["):
            host, sep, rest = addr[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")) or (not rest and default_port is None):
                raise ConfigError(f"bad address {addr!r}: expected '[ipv6]:port'")
            port_s = rest[1:] if rest else str(default_port)
        elif default_port is not None and (":" not in addr or addr.count(":") > 1):
            # A bare host: a name, an IPv4 address, or an IPv6 address without brackets (which
            # cannot carry a port, its colons being its own).
            host, port_s = addr, str(default_port)
        else:
            host, sep, port_s = addr.rpartition(":")
            if not sep:
                raise ConfigError(f"bad address {addr!r}: expected {expected}")
            if ":" in host:
                raise ConfigError(f"bad address {addr!r}: write IPv6 addresses as '[addr]:port'")
        try:
            port = int(port_s)
        except ValueError:
            raise ConfigError(f"bad port in address {addr!r}") from None
    else:
        raise ConfigError(f"address must be 'host:port' or (host, port), got {type(addr).__name__}")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be 0..65535, got {port!r}")
    return (host or default_host, port)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SessionOptions:
    """What a session may use. The handshake settles the actual values (SessionParams).

    timeout_s: a transfer fails if no byte moves on any stream for this long.
    zerocopy: "auto" (MSG_ZEROCOPY for non-loopback peers; the engine drops it by itself once the
    kernel reports it copied anyway), "on", or "off".
    max_recv_bytes: largest transfer recv() will allocate for (a peer cannot make us allocate more).
    io_threads: threads the C engine drives a large transfer with (0: one per usable CPU, never more
    than streams; 1: the calling thread only).
    recv_pool_bytes: recv() results that nobody references any more are kept (up to this many bytes)
    and reused, already faulted in, for the next large recv() (0: no pooling).
    busy_poll_us: a small transfer, or a wait for the next one, polls for up to this long before it
    sleeps (C engine): a sleeping task's wakeup costs tens of microseconds on a VM, more than a small
    transfer's round trip. 0 turns it off (no CPU spent polling, higher latency).
    sndbuf_bytes: send buffer of every connection. 0 (auto): connections whose round trip is under
    200 us (loopback, LAN) get 1 MiB instead of the kernel's autotuned several MiB, which would push
    the queued data out of the caches; longer paths keep the kernel's autotuning. -1 always leaves it
    to the kernel, a positive value sets it (the kernel doubles it).
    encrypt: seal every frame after the handshake (AEAD, docs/transport.md "Sealed frames") when a key
    is configured. On by default ($DWCP_ENCRYPT=0 turns the default off): frames go in plaintext
    (checksummed) only if both ends say encrypt=False, or over TLS (which encrypts already); an
    insecure session is never sealed.
    ciphers: the AEAD ciphers this side accepts, preferred first.
    rekey_bytes: bytes one key may seal before its link moves to a fresh key (0: 16 GiB).
    """

    streams: int = 4
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    checksums: tuple[str, ...] = CHECKSUMS
    zerocopy: str = "auto"
    zc_min_bytes: int = 32 << 10
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    max_recv_bytes: int = 64 << 30
    io_threads: int = 0
    recv_pool_bytes: int = 1 << 30
    busy_poll_us: int = 200
    sndbuf_bytes: int = 0
    backend: str = field(default_factory=lambda: os.environ.get("DWCP_BACKEND", "c"))
    encrypt: bool = field(default_factory=lambda: os.environ.get("DWCP_ENCRYPT", "1") != "0")
    ciphers: tuple[str, ...] = CIPHERS
    rekey_bytes: int = 0

    def protections(self, *, insecure: bool) -> tuple[str, ...]:
        """What this side offers for the data path, preferred first (negotiation.Offer.checksums):
        ciphers only when it insists on sealing, checksums first when it does not."""
        if insecure or self.tls is not None:
            return self.checksums
        if self.encrypt:
            return self.ciphers
        return self.checksums + self.ciphers

    def __post_init__(self) -> None:
        if not isinstance(self.streams, int) or not 1 <= self.streams <= MAX_STREAMS:
            raise ConfigError(f"streams must be an integer 1..{MAX_STREAMS}, got {self.streams!r}")
        if not isinstance(self.chunk_bytes, int) or not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, "
                              f"got {self.chunk_bytes!r}")
        if not self.timeout_s > 0 or not self.connect_timeout_s > 0:
            raise ConfigError("timeout_s and connect_timeout_s must be > 0 seconds")
        unknown = [c for c in self.checksums if c not in CHECKSUMS]
        if not self.checksums or unknown:
            raise ConfigError(f"checksums must be a non-empty list from {CHECKSUMS}, got {self.checksums!r}")
        if self.zerocopy not in ("auto", "on", "off"):
            raise ConfigError(f"zerocopy must be 'auto', 'on' or 'off', got {self.zerocopy!r}")
        if not isinstance(self.encrypt, bool):
            raise ConfigError(f"encrypt must be True or False, got {self.encrypt!r}")
        bad = [c for c in self.ciphers if c not in CIPHERS]
        if not self.ciphers or bad or len(set(self.ciphers)) != len(self.ciphers):
            raise ConfigError(f"ciphers must be distinct names from {CIPHERS}, got {self.ciphers!r}")
        if isinstance(self.rekey_bytes, bool) or not isinstance(self.rekey_bytes, int) or \
                not 0 <= self.rekey_bytes <= 1 << 40:
            raise ConfigError(f"rekey_bytes must be an int 0..2**40 (0: 16 GiB), got {self.rekey_bytes!r}")
        if self.backend not in ("c", "python"):
            raise ConfigError(f"backend (DWCP_BACKEND) must be 'c' or 'python', got {self.backend!r}")
        if self.max_recv_bytes < 0:
            raise ConfigError("max_recv_bytes must be >= 0")
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or \
                not 0 <= self.io_threads <= 64:
            raise ConfigError(f"io_threads must be an int 0..64 (0: one per usable CPU), got {self.io_threads!r}")
        if isinstance(self.busy_poll_us, bool) or not isinstance(self.busy_poll_us, int) or \
                not 0 <= self.busy_poll_us <= 1_000_000:
            raise ConfigError(f"busy_poll_us must be an int 0..1000000 (0: never poll), got {self.busy_poll_us!r}")
        if isinstance(self.sndbuf_bytes, bool) or not isinstance(self.sndbuf_bytes, int) or \
                not -1 <= self.sndbuf_bytes <= 1 << 30:
            raise ConfigError(f"sndbuf_bytes must be -1 (kernel), 0 (auto) or a size up to 1 GiB, "
                              f"got {self.sndbuf_bytes!r}")
        if isinstance(self.recv_pool_bytes, bool) or not isinstance(self.recv_pool_bytes, int) or \
                self.recv_pool_bytes < 0:
            raise ConfigError(f"recv_pool_bytes must be an int >= 0 (0: no pooling), got {self.recv_pool_bytes!r}")
