/* flowstats: the ABI shared by the BPF programs (ebpf/flowstats.bpf.c) and the user-space loader
 * (csrc/ebpf/loader.c). libbpf-tools style: fixed-size structs, explicit padding, no pointers.
 * Included by the BPF side after vmlinux.h and by the loader after <linux/types.h>. */
#ifndef DWCP_EBPF_FLOWSTATS_H
#define DWCP_EBPF_FLOWSTATS_H

#define DWCP_FLOWS_MAX_ENTRIES 16384   /* default size of the per-flow LRU map */
#define DWCP_EVENTS_RING_BYTES (256 * 1024)
#define DWCP_MAX_FILTER_PORTS 8

/* dwcp_flow.flags */
#define DWCP_FLOW_APP_LIMITED 0x01  /* the latest delivery-rate sample was app-limited */
#define DWCP_FLOW_OPEN_SENT   0x02  /* the open event for this flow went out */
#define DWCP_FLOW_BY_PROBE    0x04  /* updated by tcp_probe at least once */
#define DWCP_FLOW_BY_SOCKOPS  0x08  /* updated by the sockops program at least once */
#define DWCP_FLOW_BY_STATE    0x10  /* updated on a state change at least once */

/* dwcp_event.kind */
#define DWCP_EV_OPEN  1
#define DWCP_EV_CLOSE 2

/* One TCP socket, keyed by its socket cookie. Addresses in network byte order (4 bytes used for
 * AF_INET), ports in host order. Times from bpf_ktime_get_ns() (CLOCK_MONOTONIC). */
struct dwcp_flow {
	__u64 cookie;
	__u64 ts_ns;              /* last state change (the per-segment programs don't read the clock) */
	__u64 bytes_acked;        /* tcp_sock.bytes_acked (tcp_probe: + the ACK being processed) */
	__u64 bytes_received;     /* tcp_sock.bytes_received (tcp_probe: + the segment being processed) */
	__u64 bytes_sent;         /* tcp_sock.bytes_sent, retransmissions included */
	__u32 netns;              /* inode of the socket's network namespace */
	__u32 pid;                /* tgid that called connect(), 0 when unknown */
	__u32 srtt_us;            /* smoothed RTT (already >> 3) */
	__u32 min_rtt_us;         /* tcp_sock.rtt_min: windowed minimum */
	__u32 rate_delivered;     /* latest delivery-rate sample: segments ... */
	__u32 rate_interval_us;   /* ... over this interval (0: no sample yet) */
	__u32 total_retrans;      /* retransmitted segments */
	__u32 lost_out;           /* segments currently considered lost */
	__u32 snd_cwnd;           /* segments */
	__u32 mss;                /* tcp_sock.mss_cache, bytes */
	__u32 updates;            /* how many times a program updated this entry */
	__u16 family;             /* AF_INET or AF_INET6 */
	__u16 sport;
	__u16 dport;
	__u8 state;               /* TCP_* state */
	__u8 flags;               /* DWCP_FLOW_* */
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 _pad;
};

/* Ring-buffer record: a flow opened (first seen ESTABLISHED) or closed (reached TCP_CLOSE). The close
 * record carries the flow's final counters. */
struct dwcp_event {
	__u8 kind;                /* DWCP_EV_* */
	__u8 oldstate;            /* 0 when the open was inferred from the first tcp_probe */
	__u8 newstate;
	__u8 _pad[5];
	struct dwcp_flow flow;
};

#endif
