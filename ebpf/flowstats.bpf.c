// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* flowstats: per-flow TCP statistics keyed by socket cookie, flow open/close events, and per-ACK
 * samples from a cgroup sockops program. See ebpf/README.md.
 *
 * Two variants of the tracing programs are compiled into one object; the loader enables one pair at
 * load time (bpf_program__set_autoload):
 *   - tp_btf:     dwcp_probe_btf + dwcp_state_btf, typed BTF tracepoints (direct loads of tcp_sock
 *                 fields, cheapest);
 *   - tracepoint: dwcp_probe_tp + dwcp_state_tp, the classic tracepoints reading the socket with CO-RE
 *                 bpf_probe_read_kernel (the fallback when tp_btf cannot load).
 * dwcp_sockops is optional (attached to a cgroup v2 directory). */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "flowstats.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Settings, written by the loader between open and load (rodata: the verifier sees them as constants,
 * so disabled filters cost nothing). */
const volatile __u32 filter_netns = 0;      /* 0: any namespace */
const volatile __u32 filter_nports = 0;     /* 0: any port */
const volatile __u16 filter_ports[DWCP_MAX_FILTER_PORTS] = {};

/* Ring-buffer records lost because user space did not drain it in time. */
__u64 events_dropped = 0;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DWCP_FLOWS_MAX_ENTRIES);
	__type(key, __u64);
	__type(value, struct dwcp_flow);
} dwcp_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, DWCP_EVENTS_RING_BYTES);
} dwcp_events SEC(".maps");

static __always_inline bool admit_ports(__u16 sport, __u16 dport)
{
	if (!filter_nports)
		return true;
	for (int i = 0; i < DWCP_MAX_FILTER_PORTS; i++) {
		if (i >= filter_nports)
			break;
		if (filter_ports[i] == sport || filter_ports[i] == dport)
			return true;
	}
	return false;
}

/* Read sk's addresses, ports and namespace into f; false when the filters reject the flow. At
 * SYN_SENT the local port is not bound yet (check_ports false): the entry is re-read and filtered
 * again when the socket becomes established. CO-RE probe reads work in both program variants. */
static __always_inline bool read_identity(struct dwcp_flow *f, const struct sock *sk, bool check_ports)
{
	f->sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	f->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (check_ports && !admit_ports(f->sport, f->dport))
		return false;
	f->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	if (filter_netns && f->netns != filter_netns)
		return false;
	f->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (f->family == AF_INET6) {
		BPF_CORE_READ_INTO(&f->saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&f->daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	} else {
		BPF_CORE_READ_INTO((__u32 *)f->saddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO((__u32 *)f->daddr, sk, __sk_common.skc_daddr);
	}
	return true;
}

/* A new map entry for sk, or NULL when the filters reject it. */
static __always_inline struct dwcp_flow *create_flow(__u64 cookie, const struct sock *sk, __u8 state)
{
	struct dwcp_flow init = {};

	if (!read_identity(&init, sk, state != TCP_SYN_SENT))
		return NULL;
	init.cookie = cookie;
	init.state = state;
	bpf_map_update_elem(&dwcp_flows, &cookie, &init, BPF_NOEXIST);
	return bpf_map_lookup_elem(&dwcp_flows, &cookie);
}

static __always_inline void emit(struct dwcp_flow *f, __u8 kind, int oldstate, int newstate)
{
	struct dwcp_event *e = bpf_ringbuf_reserve(&dwcp_events, sizeof(*e), 0);

	if (!e) {
		__sync_fetch_and_add(&events_dropped, 1);
		return;
	}
	if (kind == DWCP_EV_OPEN)
		f->flags |= DWCP_FLOW_OPEN_SENT;
	e->kind = kind;
	e->oldstate = (__u8)oldstate;
	e->newstate = (__u8)newstate;
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	__builtin_memcpy(&e->flow, f, sizeof(*f));
	bpf_ringbuf_submit(e, 0);
}

/* The counters of tcp_sock tp into f. RD(p, field) is a direct load (tp_btf) or a CO-RE probe read. */
#define DEFINE_FILL(NAME, RD, RDBITS)                                                      \
static __always_inline void NAME(struct dwcp_flow *f, struct tcp_sock *tp)                 \
{                                                                                          \
	__u32 ivl = RD(tp, rate_interval_us);                                              \
                                                                                           \
	f->srtt_us = RD(tp, srtt_us) >> 3;                                                 \
	f->min_rtt_us = RD(tp, rtt_min.s[0].v);                                            \
	f->bytes_acked = RD(tp, bytes_acked);                                              \
	f->bytes_received = RD(tp, bytes_received);                                        \
	f->bytes_sent = RD(tp, bytes_sent);                                                \
	f->total_retrans = RD(tp, total_retrans);                                          \
	f->lost_out = RD(tp, lost_out);                                                    \
	f->snd_cwnd = RD(tp, snd_cwnd);                                                    \
	f->mss = RD(tp, mss_cache);                                                        \
	if (ivl) {                                                                         \
		f->rate_delivered = RD(tp, rate_delivered);                                \
		f->rate_interval_us = ivl;                                                 \
		if (RDBITS(tp, rate_app_limited))                                          \
			f->flags |= DWCP_FLOW_APP_LIMITED;                                 \
		else                                                                       \
			f->flags &= ~DWCP_FLOW_APP_LIMITED;                                \
	}                                                                                  \
}

/* tp_btf: direct loads from the typed pointers (the verifier allows reading inside skb->cb[] and the
 * byte holding a bitfield); tracepoint: CO-RE bpf_probe_read_kernel. */
#define RD_BTF(p, field) ((p)->field)
#define RD_CORE(p, field) BPF_CORE_READ(p, field)
#define RDBITS_BTF(p, field) BPF_CORE_READ_BITFIELD(p, field)
#define RDBITS_CORE(p, field) BPF_CORE_READ_BITFIELD_PROBED(p, field)

DEFINE_FILL(fill_btf, RD_BTF, RDBITS_BTF)
DEFINE_FILL(fill_core, RD_CORE, RDBITS_CORE)

/* tcp_probe fires at the entry of tcp_rcv_established, before the segment is processed: the socket's
 * counters lag one segment. Add what this segment will acknowledge / deliver in order, so that a
 * snapshot taken after the last ACK of a transfer shows all of it. */
#define DEFINE_PROBE(NAME, RD, FILL)                                                       \
static __always_inline int NAME(__u64 cookie, struct sock *sk, struct tcp_sock *tp,        \
				const struct sk_buff *skb)                                 \
{                                                                                          \
	struct dwcp_flow *f = bpf_map_lookup_elem(&dwcp_flows, &cookie);                   \
	const struct tcp_skb_cb *tcb;                                                      \
	__u32 una, nxt, rnxt, ack, seq, end, d;                                            \
                                                                                           \
	if (!f) {                                                                          \
		f = create_flow(cookie, sk, TCP_ESTABLISHED);                              \
		if (!f)                                                                    \
			return 0;                                                          \
	}                                                                                  \
	FILL(f, tp);                                                                       \
	una = RD(tp, snd_una);                                                             \
	nxt = RD(tp, snd_nxt);                                                             \
	rnxt = RD(tp, rcv_nxt);                                                            \
	tcb = (const void *)&skb->cb[0];                                                   \
	ack = RD(tcb, ack_seq);                                                            \
	seq = RD(tcb, seq);                                                                \
	end = RD(tcb, end_seq);                                                            \
	d = ack - una;                                                                     \
	if ((__s32)d > 0 && d <= nxt - una)                                                \
		f->bytes_acked += d;                                                       \
	if ((__s32)(end - rnxt) > 0 && (__s32)(seq - rnxt) <= 0)                           \
		f->bytes_received += end - rnxt;                                           \
	/* no clock read here: it was ~10 % of this per-segment program's cost; the reader   \
	 * stamps samples when it reads the map, ts_ns stays the last state change */        \
	f->updates++;                                                                      \
	f->flags |= DWCP_FLOW_BY_PROBE;                                                    \
	if (!(f->flags & DWCP_FLOW_OPEN_SENT))                                             \
		emit(f, DWCP_EV_OPEN, 0, f->state);                                        \
	return 0;                                                                          \
}

DEFINE_PROBE(probe_btf, RD_BTF, fill_btf)
DEFINE_PROBE(probe_core, RD_CORE, fill_core)

/* A state change: create the entry at SYN_SENT (to learn the connecting process) or ESTABLISHED,
 * refresh the counters, send open (first time established) and close (TCP_CLOSE) events. */
#define DEFINE_STATE(NAME, FILL)                                                           \
static __always_inline int NAME(__u64 cookie, const struct sock *sk, struct tcp_sock *tp,  \
				int oldstate, int newstate)                                \
{                                                                                          \
	struct dwcp_flow *f = bpf_map_lookup_elem(&dwcp_flows, &cookie);                   \
                                                                                           \
	if (!f) {                                                                          \
		if (newstate != TCP_SYN_SENT && newstate != TCP_ESTABLISHED)               \
			return 0;                                                          \
		f = create_flow(cookie, sk, (__u8)newstate);                               \
		if (!f)                                                                    \
			return 0;                                                          \
		if (newstate == TCP_SYN_SENT)                                              \
			f->pid = bpf_get_current_pid_tgid() >> 32;                         \
	} else if (oldstate == TCP_SYN_SENT && newstate == TCP_ESTABLISHED) {              \
		if (!read_identity(f, sk, true)) {                                         \
			bpf_map_delete_elem(&dwcp_flows, &cookie);                         \
			return 0;                                                          \
		}                                                                          \
	}                                                                                  \
	f->state = (__u8)newstate;                                                         \
	if (newstate == TCP_SYN_SENT)                                                      \
		return 0;                                                                  \
	if (newstate == TCP_CLOSE && !(f->flags & DWCP_FLOW_OPEN_SENT)) {                  \
		/* never established (refused, timed out): nothing to report */            \
		bpf_map_delete_elem(&dwcp_flows, &cookie);                                 \
		return 0;                                                                  \
	}                                                                                  \
	FILL(f, tp);                                                                       \
	f->ts_ns = bpf_ktime_get_ns();                                                     \
	f->updates++;                                                                      \
	f->flags |= DWCP_FLOW_BY_STATE;                                                    \
	if (newstate == TCP_CLOSE)                                                         \
		emit(f, DWCP_EV_CLOSE, oldstate, newstate);                                \
	else if (!(f->flags & DWCP_FLOW_OPEN_SENT))                                        \
		emit(f, DWCP_EV_OPEN, oldstate, newstate);                                 \
	return 0;                                                                          \
}

DEFINE_STATE(state_btf, fill_btf)
DEFINE_STATE(state_core, fill_core)

static __always_inline bool state_wanted(int oldstate, int newstate)
{
	/* listeners and half-open children are not flows yet */
	return newstate != TCP_LISTEN && oldstate != TCP_LISTEN && newstate != TCP_SYN_RECV &&
	       newstate != TCP_NEW_SYN_RECV;
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(dwcp_probe_btf, struct sock *sk, const struct sk_buff *skb)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);

	if (!tp)
		return 0;
	return probe_btf(bpf_get_socket_cookie(sk), sk, tp, skb);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(dwcp_state_btf, const struct sock *sk, const int oldstate, const int newstate)
{
	struct tcp_sock *tp;

	if (!state_wanted(oldstate, newstate))
		return 0;
	tp = bpf_skc_to_tcp_sock((void *)sk);
	if (!tp)
		return 0;
	return state_btf(bpf_get_socket_cookie((void *)sk), sk, tp, oldstate, newstate);
}

SEC("tracepoint/tcp/tcp_probe")
int dwcp_probe_tp(struct trace_event_raw_tcp_probe *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;

	if (!ctx->sock_cookie)
		return 0;
	return probe_core(ctx->sock_cookie, sk, (struct tcp_sock *)sk, ctx->skbaddr);
}

SEC("tracepoint/sock/inet_sock_set_state")
int dwcp_state_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	const struct sock *sk = ctx->skaddr;
	int oldstate = ctx->oldstate, newstate = ctx->newstate;
	__u64 cookie;

	if (ctx->protocol != IPPROTO_TCP || !state_wanted(oldstate, newstate))
		return 0;
	/* The classic tracepoint cannot generate a cookie: use the socket's if something (tcp_probe,
	 * SO_COOKIE, inet_diag, sockops) already did; else the first tcp_probe creates the entry. */
	cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
	if (!cookie)
		return 0;
	return state_core(cookie, sk, (struct tcp_sock *)sk, oldstate, newstate);
}

/* One pass over the TCP sockets of the reader's network namespace (the loader reads this iterator once
 * after attaching): flows that existed before the programs were attached get their entry and open
 * event at once instead of at their next segment. Loaded with the tp_btf variant only. */
SEC("iter/tcp")
int dwcp_seed(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct dwcp_flow *f;
	struct tcp_sock *tp;
	__u64 cookie;
	int state;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;      /* request and time-wait sockets */
	state = skc->skc_state;
	if (state == TCP_LISTEN || state == TCP_SYN_SENT || state == TCP_SYN_RECV || state == TCP_CLOSE)
		return 0;
	cookie = bpf_get_socket_cookie(skc);
	f = bpf_map_lookup_elem(&dwcp_flows, &cookie);
	if (!f) {
		f = create_flow(cookie, (const struct sock *)tp, (__u8)state);
		if (!f)
			return 0;
	}
	f->state = (__u8)state;
	fill_btf(f, tp);
	f->ts_ns = bpf_ktime_get_ns();
	f->updates++;
	f->flags |= DWCP_FLOW_BY_STATE;
	if (!(f->flags & DWCP_FLOW_OPEN_SENT))
		emit(f, DWCP_EV_OPEN, 0, state);
	return 0;
}

/* Per-ACK samples for sockets of the cgroup this program is attached to. RTT callbacks must be
 * enabled per socket when it becomes established, so sockets that existed before attaching are never
 * seen here (the tracepoints still see them). Only flows the tracepoints admitted are updated. */
SEC("sockops")
int dwcp_sockops(struct bpf_sock_ops *skops)
{
	struct dwcp_flow *f;
	__u64 cookie;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (admit_ports((__u16)skops->local_port, (__u16)bpf_ntohl(skops->remote_port)))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_RTT_CB_FLAG);
		return 1;
	case BPF_SOCK_OPS_RTT_CB:
		break;
	default:
		return 1;
	}
	cookie = bpf_get_socket_cookie(skops);
	f = bpf_map_lookup_elem(&dwcp_flows, &cookie);
	if (!f)
		return 1;
	f->srtt_us = skops->srtt_us >> 3;
	f->min_rtt_us = skops->rtt_min;
	f->bytes_acked = skops->bytes_acked;
	f->bytes_received = skops->bytes_received;
	f->total_retrans = skops->total_retrans;
	f->lost_out = skops->lost_out;
	f->snd_cwnd = skops->snd_cwnd;
	f->mss = skops->mss_cache;
	if (skops->rate_interval_us) {
		f->rate_delivered = skops->rate_delivered;
		f->rate_interval_us = skops->rate_interval_us;
	}
	f->updates++; /* per ACK: no clock read (see the tcp_probe program) */
	f->flags |= DWCP_FLOW_BY_SOCKOPS;
	return 1;
}
