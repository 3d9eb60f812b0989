# cython: language_level=3
"""The eBPF telemetry loader (csrc/ebpf/loader.c over libbpf, programs from ebpf/flowstats.bpf.c).

Bare primitives: :class:`Programs` loads and attaches the programs, reads the per-flow map as dicts of
raw kernel values, drains the open/close ring buffer, and detaches everything on :meth:`Programs.close`.
:class:`dwcp.telemetry.ebpf_source.EbpfSource` turns this into ``FlowSample``/``FlowEvent``."""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport strerror

from dwcp.includes.ebpf cimport *

import os
import threading

from dwcp.errors import CapabilityError, ConfigError

HOOK_AUTO = DWCP_EBPF_HOOK_AUTO
HOOK_TP_BTF = DWCP_EBPF_HOOK_TP_BTF
HOOK_TRACEPOINT = DWCP_EBPF_HOOK_TRACEPOINT
MAX_FILTER_PORTS = DWCP_MAX_FILTER_PORTS
FLOWS_MAX_ENTRIES = DWCP_FLOWS_MAX_ENTRIES
FLOW_APP_LIMITED = DWCP_FLOW_APP_LIMITED
FLOW_OPEN_SENT = DWCP_FLOW_OPEN_SENT
FLOW_BY_PROBE = DWCP_FLOW_BY_PROBE
FLOW_BY_SOCKOPS = DWCP_FLOW_BY_SOCKOPS
FLOW_BY_STATE = DWCP_FLOW_BY_STATE
EV_OPEN = DWCP_EV_OPEN
EV_CLOSE = DWCP_EV_CLOSE
PROGRAM_PREFIX = "dwcp_"

cdef enum:
    ERR_BYTES = 1024


def probe():
    """(True, reason) when kernel BTF exists and a BPF ring buffer can be created, else (False, why).
    Does not load any program: cheap enough for feature reports."""
    cdef char err[ERR_BYTES]
    cdef int rc
    err[0] = 0
    rc = dwcp_ebpf_probe(err, ERR_BYTES)
    if rc:
        return False, err.decode("utf-8", "replace")
    return True, "kernel BTF present and BPF maps can be created"


cdef dict _flow_dict(const dwcp_flow *f):
    return {
        "cookie": f.cookie, "ts_ns": f.ts_ns, "bytes_acked": f.bytes_acked,
        "bytes_received": f.bytes_received, "bytes_sent": f.bytes_sent, "netns": f.netns,
        "pid": f.pid, "srtt_us": f.srtt_us, "min_rtt_us": f.min_rtt_us,
        "rate_delivered": f.rate_delivered, "rate_interval_us": f.rate_interval_us,
        "total_retrans": f.total_retrans, "lost_out": f.lost_out, "snd_cwnd": f.snd_cwnd,
        "mss": f.mss, "updates": f.updates, "family": f.family, "sport": f.sport, "dport": f.dport,
        "state": f.state, "flags": f.flags,
        "saddr": PyBytes_FromStringAndSize(<const char *>f.saddr, 16),
        "daddr": PyBytes_FromStringAndSize(<const char *>f.daddr, 16),
    }


cdef class Programs:
    """The loaded and attached flowstats programs.

    ``hook``: HOOK_AUTO (tp_btf, else the classic tracepoint), HOOK_TP_BTF or HOOK_TRACEPOINT.
    ``cgroup``: a cgroup v2 directory for the sockops program, or None for no sockops.
    ``ports`` (at most MAX_FILTER_PORTS) and ``netns`` (an inode, 0 = any) filter in the kernel.
    Raises CapabilityError when the kernel refuses (with libbpf's reason), ConfigError for bad options."""

    cdef dwcp_ebpf *_h
    cdef object _lock

    def __cinit__(self, *, int hook=DWCP_EBPF_HOOK_AUTO, cgroup=None, ports=(), uint32_t netns=0,
                  uint32_t flows_max=0):
        cdef dwcp_ebpf_opts opts
        cdef char err[ERR_BYTES]
        cdef bytes cg
        cdef int rc, i
        self._h = NULL
        self._lock = threading.Lock()
        ports = list(ports)
        if hook < DWCP_EBPF_HOOK_AUTO or hook > DWCP_EBPF_HOOK_TRACEPOINT:
            raise ConfigError(f"hook must be HOOK_AUTO, HOOK_TP_BTF or HOOK_TRACEPOINT, not {hook}")
        if len(ports) > DWCP_MAX_FILTER_PORTS:
            raise ConfigError(f"at most {DWCP_MAX_FILTER_PORTS} ports can be filtered in the kernel "
                              f"(got {len(ports)}); filter the rest in user space")
        opts.hook = hook
        opts.netns = netns
        opts.nports = len(ports)
        opts.flows_max = flows_max
        for i in range(DWCP_MAX_FILTER_PORTS):
            opts.ports[i] = 0
        for i, p in enumerate(ports):
            if not 0 < p < 65536:
                raise ConfigError(f"filter port {p} is not a TCP port (1..65535)")
            opts.ports[i] = p
        opts.cgroup = NULL
        if cgroup is not None:
            cg = os.fsencode(cgroup)
            opts.cgroup = cg
        err[0] = 0
        with nogil:
            rc = dwcp_ebpf_open(&opts, &self._h, err, ERR_BYTES)
        if rc:
            raise CapabilityError(err.decode("utf-8", "replace") or strerror(-rc).decode())

    def __dealloc__(self):
        if self._h is not NULL:
            dwcp_ebpf_close(self._h)
            self._h = NULL

    cdef dwcp_ebpf *_live(self) except NULL:
        if self._h is NULL:
            raise ConfigError("the eBPF programs were closed; open a new Programs")
        return self._h

    @property
    def closed(self):
        return self._h is NULL

    @property
    def hook(self):
        """'tp_btf' or 'tracepoint': the tcp_probe/inet_sock_set_state hook kind that was loaded."""
        return "tp_btf" if dwcp_ebpf_hook(self._live()) == DWCP_EBPF_HOOK_TP_BTF else "tracepoint"

    @property
    def hook_reason(self):
        return dwcp_ebpf_hook_reason(self._live()).decode("utf-8", "replace")

    @property
    def sockops(self):
        return bool(dwcp_ebpf_has_sockops(self._live()))

    @property
    def events_dropped(self):
        """Open/close records lost because the ring buffer was full (drain it with poll() more often)."""
        return dwcp_ebpf_events_dropped(self._live())

    def flows(self):
        """Every entry of the per-flow map: a list of dicts of raw values (see ebpf/flowstats.h)."""
        cdef const dwcp_flow *fl
        cdef size_t n, i
        cdef int rc
        with self._lock:
            rc = dwcp_ebpf_read_flows(self._live(), &fl, &n)
            if rc:
                raise CapabilityError(f"reading the eBPF flow map failed: {strerror(-rc).decode()}")
            return [_flow_dict(&fl[i]) for i in range(n)]

    def seed(self):
        """Walk the TCP sockets of this process's network namespace (iter/tcp) so that flows older
        than the programs get their entry and open event now. tp_btf mode only (no-op otherwise);
        the constructor already did it once."""
        cdef int rc = 0
        with self._lock:
            rc = dwcp_ebpf_seed(self._live())
        if rc:
            raise CapabilityError(f"walking the TCP sockets with iter/tcp failed: {strerror(-rc).decode()}")

    def forget(self, uint64_t cookie):
        """Delete one flow from the map; False when it was not there."""
        with self._lock:
            return dwcp_ebpf_forget(self._live(), cookie) == 0

    def poll(self, int timeout_ms=0):
        """Drain the ring buffer (waiting up to timeout_ms for a first record): a list of
        (kind, oldstate, newstate, flow dict)."""
        cdef const dwcp_event *ev
        cdef dwcp_ebpf *h
        cdef size_t n, i
        cdef int rc
        with self._lock:
            h = self._live()
            with nogil:
                rc = dwcp_ebpf_poll(h, timeout_ms, &ev, &n)
            if rc:
                raise CapabilityError(f"reading the eBPF event ring buffer failed: {strerror(-rc).decode()}")
            return [(ev[i].kind, ev[i].oldstate, ev[i].newstate, _flow_dict(&ev[i].flow)) for i in range(n)]

    def ids(self):
        """(program ids, map ids) of what this object loaded into the kernel."""
        cdef uint32_t progs[DWCP_EBPF_MAX_IDS]
        cdef uint32_t maps[DWCP_EBPF_MAX_IDS]
        cdef size_t np = DWCP_EBPF_MAX_IDS, nm = DWCP_EBPF_MAX_IDS, i
        cdef int rc = 0
        with self._lock:
            rc = dwcp_ebpf_ids(self._live(), progs, &np, maps, &nm)
        if rc:
            raise CapabilityError(f"querying the eBPF object ids failed: {strerror(-rc).decode()}")
        return [progs[i] for i in range(np)], [maps[i] for i in range(nm)]

    def close(self):
        """Detach every program and free every map. Idempotent."""
        with self._lock:
            if self._h is not NULL:
                dwcp_ebpf_close(self._h)
                self._h = NULL
