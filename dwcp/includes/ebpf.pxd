# C declarations of csrc/include/dwcp/ebpf.h (the eBPF telemetry loader) and ebpf/flowstats.h.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "dwcp/ebpf.h" nogil:
    enum:
        DWCP_EBPF_HOOK_AUTO
        DWCP_EBPF_HOOK_TP_BTF
        DWCP_EBPF_HOOK_TRACEPOINT
        DWCP_EBPF_MAX_IDS
        DWCP_MAX_FILTER_PORTS
        DWCP_FLOWS_MAX_ENTRIES
        DWCP_FLOW_APP_LIMITED
        DWCP_FLOW_OPEN_SENT
        DWCP_FLOW_BY_PROBE
        DWCP_FLOW_BY_SOCKOPS
        DWCP_FLOW_BY_STATE
        DWCP_EV_OPEN
        DWCP_EV_CLOSE

    struct dwcp_flow:
        uint64_t cookie
        uint64_t ts_ns
        uint64_t bytes_acked
        uint64_t bytes_received
        uint64_t bytes_sent
        uint32_t netns
        uint32_t pid
        uint32_t srtt_us
        uint32_t min_rtt_us
        uint32_t rate_delivered
        uint32_t rate_interval_us
        uint32_t total_retrans
        uint32_t lost_out
        uint32_t snd_cwnd
        uint32_t mss
        uint32_t updates
        uint16_t family
        uint16_t sport
        uint16_t dport
        uint8_t state
        uint8_t flags
        uint8_t saddr[16]
        uint8_t daddr[16]

    struct dwcp_event:
        uint8_t kind
        uint8_t oldstate
        uint8_t newstate
        dwcp_flow flow

    struct dwcp_ebpf:
        pass

    struct dwcp_ebpf_opts:
        int hook
        const char *cgroup
        uint32_t netns
        uint32_t nports
        uint16_t ports[8]
        uint32_t flows_max

    int dwcp_ebpf_open(const dwcp_ebpf_opts *opts, dwcp_ebpf **out, char *err, size_t errlen)
    void dwcp_ebpf_close(dwcp_ebpf *h)
    int dwcp_ebpf_hook(const dwcp_ebpf *h)
    const char *dwcp_ebpf_hook_reason(const dwcp_ebpf *h)
    int dwcp_ebpf_has_sockops(const dwcp_ebpf *h)
    int dwcp_ebpf_read_flows(dwcp_ebpf *h, const dwcp_flow **flows, size_t *n)
    int dwcp_ebpf_seed(dwcp_ebpf *h)
    int dwcp_ebpf_forget(dwcp_ebpf *h, uint64_t cookie)
    int dwcp_ebpf_poll(dwcp_ebpf *h, int timeout_ms, const dwcp_event **events, size_t *n)
    uint64_t dwcp_ebpf_events_dropped(const dwcp_ebpf *h)
    int dwcp_ebpf_ids(const dwcp_ebpf *h, uint32_t *prog_ids, size_t *nprogs,
                      uint32_t *map_ids, size_t *nmaps)
    int dwcp_ebpf_probe(char *err, size_t errlen)
