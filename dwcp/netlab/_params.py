"""Link parameters: validation, defaults (queue = 1 BDP, TCP buffers sized to the link) and traces.

Everything here is pure computation; a bad value raises :class:`dwcp.errors.ConfigError` naming the
parameter and the accepted range, before anything touches the kernel."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from dwcp.errors import ConfigError

#: The benchmarking range (RFC 2544) that netlab hosts may use: never routable, never somebody's network.
ALLOWED_V4 = ipaddress.ip_network("198.18.0.0/15")
DEFAULT_SUBNET = "198.18.0.0/24"
MIN_RTT_MS, MAX_RTT_MS = 0.2, 500.0
MIN_RATE_MBIT, MAX_RATE_MBIT = 0.01, 10_000.0
#: Floor for the default queue: at low rate x RTT one BDP is a handful of packets, which no real
#: bottleneck has; 32 KiB (~21 full packets) keeps slow links from dropping on the first burst.
MIN_DEFAULT_QUEUE_BYTES = 32 * 1024
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,23}$")


def bdp_bytes(rate_mbit: float, rtt_ms: float) -> int:
    """Bandwidth-delay product in bytes."""
    return int(rate_mbit * 1e6 * rtt_ms / 1e3 / 8)


def check_name(name: str) -> str:
    """Lab names become namespace names (dwcp-NAME-a) and a directory: keep them short and plain."""
    if not NAME_RE.match(name):
        raise ConfigError(f"lab name {name!r}: use 1-24 characters of a-z, 0-9, '-', '_', "
                          "starting with a letter or digit")
    return name


def load_trace(path: str) -> list[tuple[float, float]]:
    """Read a bandwidth trace: one ``seconds Mbit/s`` pair per line (whitespace-separated, '#' comments),
    seconds strictly increasing, rates >= 0. The same format as ``shared/data/bandwidth-traces``."""
    try:
        with open(path, encoding="ascii") as f:
            lines = f.readlines()
    except OSError as e:
        raise ConfigError(f"trace {path}: cannot read it ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"trace {path}: not a text file of 'seconds Mbit/s' lines") from e
    samples: list[tuple[float, float]] = []
    for no, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        try:
            t, mbit = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise ConfigError(f"trace {path}:{no}: expected 'seconds Mbit/s', got {line.strip()!r}") from None
        if t < 0 or mbit < 0 or (samples and t <= samples[-1][0]):
            raise ConfigError(f"trace {path}:{no}: seconds must increase and rates be >= 0")
        samples.append((t, mbit))
    if not samples:
        raise ConfigError(f"trace {path}: no samples")
    if max(m for _, m in samples) <= 0:
        raise ConfigError(f"trace {path}: every rate is 0, nothing would ever pass")
    return samples


def trace_period_s(samples: list[tuple[float, float]]) -> float:
    """The replay loops after the last sample, which lasts as long as the gap before it."""
    if len(samples) == 1:
        return 1.0
    t0 = samples[0][0]
    return samples[-1][0] - t0 + (samples[-1][0] - samples[-2][0])


@dataclass(frozen=True)
class LinkParams:
    """A validated link description. Rates in Mbit/s (10^6 bit/s), RTT in ms, loss as a fraction.

    ``queue_bytes`` is per direction; None means one BDP of that direction (at least 32 KiB).
    With a ``trace``, both directions follow it unless ``rate_mbit_reverse`` fixes the b->a rate."""

    rtt_ms: float
    rate_mbit: float
    loss: float = 0.0
    queue_bytes: int | None = None
    rate_mbit_reverse: float | None = None
    trace: str | None = None
    subnet: str = DEFAULT_SUBNET
    trace_samples: list[tuple[float, float]] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not MIN_RTT_MS <= self.rtt_ms <= MAX_RTT_MS:
            raise ConfigError(f"rtt_ms={self.rtt_ms}: must be between {MIN_RTT_MS} and {MAX_RTT_MS} ms")
        for label, rate in (("rate_mbit", self.rate_mbit), ("rate_mbit_reverse", self.rate_mbit_reverse)):
            if rate is not None and not MIN_RATE_MBIT <= rate <= MAX_RATE_MBIT:
                raise ConfigError(f"{label}={rate}: must be between {MIN_RATE_MBIT} and {MAX_RATE_MBIT} "
                                  "Mbit/s (this machine sustains about 4000)")
        if not 0.0 <= self.loss < 1.0:
            raise ConfigError(f"loss={self.loss}: a fraction in [0, 1) (0.001 is 0.1 %)")
        if self.queue_bytes is not None and self.queue_bytes < 1500:
            raise ConfigError(f"queue_bytes={self.queue_bytes}: must hold at least one 1500-byte packet")
        net = self.network  # validates
        if net.version != 4 or not net.subnet_of(ALLOWED_V4):  # type: ignore[arg-type]
            raise ConfigError(f"subnet {self.subnet}: netlab hosts only use the benchmarking range "
                              f"{ALLOWED_V4} (e.g. 198.18.1.0/24)")
        if net.num_addresses < 4:
            raise ConfigError(f"subnet {self.subnet}: needs at least a /30 (two host addresses)")
        if self.trace is not None and not self.trace_samples:
            object.__setattr__(self, "trace", os.path.abspath(self.trace))
            object.__setattr__(self, "trace_samples", load_trace(self.trace))

    @property
    def network(self) -> ipaddress.IPv4Network:
        try:
            net = ipaddress.ip_network(self.subnet, strict=False)
        except ValueError as e:
            raise ConfigError(f"subnet {self.subnet!r}: not a CIDR ({e})") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise ConfigError(f"subnet {self.subnet}: IPv4 only (inside {ALLOWED_V4})")
        return net

    @property
    def addr_a(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def addr_b(self) -> str:
        return str(self.network.network_address + 2)

    @property
    def peak_rate_mbit(self) -> float:
        """The highest forward rate the link will run at (the trace's peak when replaying one)."""
        if self.trace_samples:
            return max(m for _, m in self.trace_samples)
        return self.rate_mbit

    @property
    def reverse_rate_mbit(self) -> float:
        return self.rate_mbit_reverse if self.rate_mbit_reverse is not None else self.peak_rate_mbit

    def queue_limits(self) -> tuple[int, int]:
        """Bottleneck queue per direction (a->b, b->a) in bytes."""
        if self.queue_bytes is not None:
            return self.queue_bytes, self.queue_bytes
        return (max(bdp_bytes(self.peak_rate_mbit, self.rtt_ms), MIN_DEFAULT_QUEUE_BYTES),
                max(bdp_bytes(self.reverse_rate_mbit, self.rtt_ms), MIN_DEFAULT_QUEUE_BYTES))

    def tcp_buffer_max(self) -> int:
        """Max of tcp_rmem/tcp_wmem inside the namespaces: 4 BDP (at least 16 MiB, at most 512 MiB).

        Autotuning needs about 2 BDP of receive buffer (half goes to overhead by tcp_adv_win_scale) plus
        room for the queue; the inherited 4 MiB caps one stream at ~400 Mbit/s on 1 Gbit/s x 50 ms."""
        bdp = bdp_bytes(max(self.peak_rate_mbit, self.reverse_rate_mbit), self.rtt_ms)
        return min(max(4 * bdp + sum(self.queue_limits()), 16 << 20), 512 << 20)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("trace_samples")
        d["queue_bytes_a_to_b"], d["queue_bytes_b_to_a"] = self.queue_limits()
        d["addr_a"], d["addr_b"] = self.addr_a, self.addr_b
        if self.trace_samples:
            d["trace_period_s"] = trace_period_s(self.trace_samples)
        return d
