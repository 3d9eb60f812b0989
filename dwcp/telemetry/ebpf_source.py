"""The eBPF telemetry source: every TCP flow of every namespace, sampled per ACK by kernel programs.

:class:`EbpfSource` loads ``ebpf/flowstats.bpf.c`` (through the ``dwcp._ebpf`` extension over libbpf),
attaches it with bpf_links, and turns the per-flow map and the open/close ring buffer into
:class:`FlowSample` and :class:`FlowEvent`. Programs and maps live exactly as long as the source: they
are gone after :meth:`EbpfSource.close`, and the kernel removes them by itself if the process dies
(nothing is pinned).

What is attached (see ebpf/README.md and docs/telemetry.md):

- ``tcp_probe`` (``tp_btf`` when the kernel accepts it, else the classic tracepoint; ``hook=`` forces
  one): per-segment update of the flow's counters, keyed by socket cookie;
- ``sock/inet_sock_set_state``: open events (a flow reaching ESTABLISHED, or first seen by
  tcp_probe if it existed before) and close events (TCP_CLOSE, with the final counters);
- ``iter/tcp`` (tp_btf mode), walked once at open: the flows that already existed in this process's
  namespace, so they are in the first snapshot;
- a ``sockops`` program on a cgroup v2 directory (default: the cgroup2 root, so every process): per-ACK
  RTT/rate updates right after the ACK is processed. It only sees connections established after it was
  attached; the tracepoints see the older ones.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import socket
import threading
import time
from types import TracebackType
from typing import Any

from dwcp.errors import CapabilityError, ConfigError
from dwcp.telemetry.sample import FlowEvent, FlowFilter, FlowSample
from dwcp.telemetry.tcp_info import TCP_STATES

log = logging.getLogger(__name__)

HOOKS = ("tp_btf", "tracepoint")
#: Forces the tcp_probe hook kind when ``hook=`` is not given ("tp_btf" or "tracepoint").
ENV_HOOK = "DWCP_EBPF_HOOK"

_TCP_CLOSE = 7
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_PERFMON = 38
_CAP_BPF = 39
# A CLOSE entry whose close event never reached us (ring buffer full) is dropped after this long.
_STALE_CLOSED_NS = 10_000_000_000
_FINAL_KEEP = 4096


def _missing_toolchain() -> list[str]:
    missing = [t for t in ("clang", "llvm-strip", "bpftool")
               if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]
    missing += [f for f in ("/usr/include/bpf/libbpf.h", "/usr/include/gelf.h", "/usr/include/zlib.h",
                            "/sys/kernel/btf/vmlinux") if not os.path.exists(f)]
    return missing


def _effective_caps() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def _may_attach_sockops() -> bool:
    """sockops is a networking program type: loading it needs CAP_NET_ADMIN (or CAP_SYS_ADMIN)."""
    caps = _effective_caps()
    if caps is None:
        return os.geteuid() == 0
    return bool(caps >> _CAP_NET_ADMIN & 1 or caps >> _CAP_SYS_ADMIN & 1)


def _privilege_problem() -> str | None:
    caps = _effective_caps()
    if caps is None:
        return None if os.geteuid() == 0 else "cannot read this process's capabilities and it is not root"
    if caps >> _CAP_SYS_ADMIN & 1 or (caps >> _CAP_BPF & 1 and caps >> _CAP_PERFMON & 1):
        return None
    return (f"loading tracing programs needs root, or CAP_BPF and CAP_PERFMON (this process: euid "
            f"{os.geteuid()}, effective capabilities {caps:#x})")


def ebpf_available() -> tuple[bool, str]:
    """(usable, reason): whether :class:`EbpfSource` can work here, without loading the programs.

    Checks that the ``dwcp._ebpf`` extension was built, that this process may load tracing programs
    (root, or CAP_BPF + CAP_PERFMON), that the kernel exposes BTF, and that it creates a BPF ring
    buffer. Cheap (one throwaway map). Loading can still fail later (verifier, lockdown): then
    :class:`EbpfSource` raises :class:`CapabilityError` with the kernel's reason."""
    try:
        from dwcp import _ebpf
    except ImportError as e:
        missing = _missing_toolchain()
        why = (f"the build lacked {', '.join(missing)}; install them (Debian: clang llvm bpftool libbpf-dev "
               "libelf-dev zlib1g-dev) and rerun ./scripts/install.sh" if missing
               else "rerun ./scripts/install.sh to build it")
        return False, f"the eBPF extension dwcp._ebpf is not built ({e}): {why}"
    problem = _privilege_problem()
    if problem:
        return False, problem
    ok, why = _ebpf.probe()
    if not ok:
        return False, why
    return True, "dwcp._ebpf built, BPF privileges, kernel BTF and ring buffers present"


def default_cgroup() -> str | None:
    """The cgroup v2 root (``/sys/fs/cgroup/unified`` on hybrid hosts, ``/sys/fs/cgroup`` on pure v2):
    the sockops program attached there sees the sockets of every process. None without cgroup2."""
    mounts: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    mounts.append(left.split()[4].replace("\\040", " "))
    except OSError:
        return None
    for preferred in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if preferred in mounts:
            return preferred
    return mounts[0] if mounts else None


def _addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntop(socket.AF_INET, raw[:4])


def _sample(f: dict[str, Any], now_ns: int) -> FlowSample:
    ivl = f["rate_interval_us"]
    # the kernel's tcp_info delivery rate: rate_delivered segments of mss_cache bytes per interval
    rate_bps = f["rate_delivered"] * f["mss"] * 8_000_000 // ivl if ivl else 0
    return FlowSample(
        cookie=f["cookie"], saddr=_addr(f["family"], f["saddr"]), sport=f["sport"],
        daddr=_addr(f["family"], f["daddr"]), dport=f["dport"], timestamp_ns=now_ns, source="ebpf",
        netns=f["netns"], state=TCP_STATES.get(f["state"], str(f["state"])), srtt_us=f["srtt_us"],
        min_rtt_us=f["min_rtt_us"], delivery_rate_bps=rate_bps,
        delivery_app_limited=bool(f["flags"] & 0x01), bytes_acked=f["bytes_acked"],
        bytes_received=f["bytes_received"], bytes_sent=f["bytes_sent"], retrans=f["total_retrans"],
        lost=f["lost_out"], cwnd=f["snd_cwnd"], mss=f["mss"], pid=f["pid"] or None)


class EbpfSource:
    """Telemetry from kernel programs: all TCP flows of all namespaces (filtered by ``flow_filter``).

    ``cgroup``: the cgroup v2 directory whose sockets the sockops program samples per ACK (default
    ``flow_filter.cgroup``, else the cgroup2 root: every process). ``sockops=False`` attaches only
    the tracepoints. ``hook``: "tp_btf" or "tracepoint" forces the tcp_probe hook kind (default:
    ``$DWCP_EBPF_HOOK``, else tp_btf with the classic tracepoint as fallback; :attr:`hook_reason`
    says what happened). Port (up to 8) and namespace filters run in the kernel; the rest in Python.

    Raises :class:`CapabilityError` when the programs cannot be loaded (with the kernel's reason)."""

    name = "ebpf"

    def __init__(self, flow_filter: FlowFilter | None = None, *, cgroup: str | None = None,
                 hook: str | None = None, sockops: bool = True, flows_max: int = 0) -> None:
        self._filter = flow_filter or FlowFilter()
        hook = hook or os.environ.get(ENV_HOOK, "").strip() or None
        if hook is not None and hook not in HOOKS:
            raise ConfigError(f"eBPF hook {hook!r}: choose one of {', '.join(HOOKS)} (or leave it unset "
                              "to try tp_btf and fall back to the tracepoint)")
        if not 0 <= flows_max < 2**32:
            raise ConfigError(f"flows_max={flows_max}: the flow map holds 1..2**32-1 entries (0: the default 16384)")
        ok, why = ebpf_available()
        if not ok:
            raise CapabilityError(why)
        from dwcp import _ebpf

        cg: str | None = None
        if sockops:
            cg = cgroup or self._filter.cgroup or default_cgroup()
            if cg is None:
                log.info("ebpf: no cgroup v2 mount, attaching without the sockops program")
            elif not _may_attach_sockops():
                if cgroup is not None:
                    raise CapabilityError(f"the sockops program for cgroup {cgroup} needs CAP_NET_ADMIN; "
                                          "grant it or leave cgroup= unset")
                log.info("ebpf: no CAP_NET_ADMIN, attaching without the sockops program")
                cg = None
        elif cgroup is not None:
            raise ConfigError("cgroup= scopes the sockops program: it cannot be combined with sockops=False")
        ports = sorted(self._filter.ports) if self._filter.ports else []
        kernel_ports = ports if len(ports) <= _ebpf.MAX_FILTER_PORTS else []
        code = {None: _ebpf.HOOK_AUTO, "tp_btf": _ebpf.HOOK_TP_BTF, "tracepoint": _ebpf.HOOK_TRACEPOINT}[hook]
        try:
            self._p: Any = _ebpf.Programs(hook=code, cgroup=cg, ports=kernel_ports,
                                          netns=self._filter.netns or 0, flows_max=flows_max)
        except CapabilityError as e:
            raise CapabilityError(f"loading the eBPF telemetry programs failed: {e}; run as root on a "
                                  "kernel with BTF, or use DWCP_TELEMETRY=inet_diag") from None
        self._hook: str = self._p.hook
        self._hook_reason: str = self._p.hook_reason
        self._cgroup = cg
        self._lock = threading.Lock()
        self._final: collections.deque[FlowSample] = collections.deque(maxlen=_FINAL_KEEP)
        log.info("ebpf: attached (%s; sockops %s)", self._hook_reason, cg or "off")

    # -- what was chosen --------------------------------------------------------------------------
    @property
    def hook(self) -> str:
        """"tp_btf" or "tracepoint": the tcp_probe / inet_sock_set_state hook kind in use."""
        return self._hook

    @property
    def hook_reason(self) -> str:
        return self._hook_reason

    @property
    def cgroup(self) -> str | None:
        """The cgroup v2 directory the sockops program is attached to (None: no sockops)."""
        return self._cgroup

    @property
    def closed(self) -> bool:
        return bool(self._p.closed)

    @property
    def events_dropped(self) -> int:
        """Open/close events lost because events() was not called often enough (ring buffer full)."""
        return int(self._p.events_dropped)

    def kernel_ids(self) -> tuple[list[int], list[int]]:
        """(program ids, map ids) this source holds in the kernel, as ``bpftool prog/map show`` lists them."""
        ids: tuple[list[int], list[int]] = self._p.ids()
        return ids

    # -- data -------------------------------------------------------------------------------------
    def snapshot(self) -> list[FlowSample]:
        """The latest sample of every flow seen established. A closed flow stays (state "CLOSE", final
        counters) until :meth:`events` delivers its close event."""
        with self._lock:
            raw = self._p.flows()
            now = time.monotonic_ns()
            out: dict[int, FlowSample] = {}
            for f in raw:
                if not f["flags"] & 0x02:     # DWCP_FLOW_OPEN_SENT: not established yet
                    continue
                if f["state"] == _TCP_CLOSE and now - f["ts_ns"] > _STALE_CLOSED_NS:
                    self._p.forget(f["cookie"])   # its close event was lost (ring buffer overflow)
                    continue
                s = _sample(f, now)
                if self._filter.matches(s):
                    out[s.cookie] = s
            return list(out.values())

    def events(self) -> list[FlowEvent]:
        """Opens and closes since the previous call, oldest first. A flow that existed before the
        programs were attached gets an open event with ``old_state`` "": at once for this namespace in
        tp_btf mode (the iter/tcp walk at open), else when tcp_probe first sees it."""
        with self._lock:
            out: list[FlowEvent] = []
            for kind, old, new, f in self._p.poll(0):
                # state changes carry their kernel time (CLOCK_MONOTONIC, as time.monotonic_ns); an
                # open first seen by tcp_probe has none (that program reads no clock): stamp it now
                s = _sample(f, f["ts_ns"] or time.monotonic_ns())
                if kind == 2:                  # DWCP_EV_CLOSE: the final counters, then forget it
                    self._p.forget(f["cookie"])
                    if self._filter.matches(s):
                        self._final.append(s)
                ev = FlowEvent(kind="open" if kind == 1 else "close", cookie=s.cookie, saddr=s.saddr,
                               sport=s.sport, daddr=s.daddr, dport=s.dport, timestamp_ns=s.timestamp_ns,
                               source="ebpf", netns=s.netns, old_state=TCP_STATES.get(old, "") if old else "",
                               new_state=TCP_STATES.get(new, ""), pid=s.pid)
                if self._filter.matches(ev):
                    out.append(ev)
            return out

    def final_samples(self) -> list[FlowSample]:
        """The last sample (final byte counts) of every flow whose close event :meth:`events` delivered
        since the previous call."""
        with self._lock:
            out = list(self._final)
            self._final.clear()
            return out

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Detach every program and free every map. Idempotent."""
        p = getattr(self, "_p", None)
        if p is not None:
            p.close()

    def __enter__(self) -> EbpfSource:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EbpfSource hook={self._hook} sockops={self._cgroup or 'off'} closed={self.closed}>"
