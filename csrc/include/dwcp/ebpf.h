/* The eBPF telemetry loader (csrc/ebpf/loader.c): loads ebpf/flowstats.bpf.c from its embedded
 * skeleton, attaches it with bpf_links (no pinning: the kernel detaches everything when the last fd
 * closes, also when the process dies), reads the per-flow map and drains the event ring buffer.
 * Built only into the dwcp._ebpf extension (links libbpf), never into the core library.
 *
 * Every function returns 0 or a negative errno; functions taking (err, errlen) also write a
 * human-readable reason there (libbpf's own log lines included when it gave any). */
#ifndef DWCP_EBPF_H
#define DWCP_EBPF_H

#include <stddef.h>
#include <stdint.h>
#include <linux/types.h>

#include "flowstats.h"   /* ebpf/flowstats.h: the ABI shared with the BPF programs */

#define DWCP_EBPF_HOOK_AUTO 0
#define DWCP_EBPF_HOOK_TP_BTF 1
#define DWCP_EBPF_HOOK_TRACEPOINT 2

#define DWCP_EBPF_MAX_IDS 16

struct dwcp_ebpf;

struct dwcp_ebpf_opts {
	int hook;                  /* DWCP_EBPF_HOOK_*: AUTO tries tp_btf, then the classic tracepoint */
	const char *cgroup;        /* cgroup v2 directory for the sockops program; NULL: no sockops */
	uint32_t netns;            /* only flows of this namespace inode; 0: any */
	uint32_t nports;           /* only flows with one of these ports at either end; 0: any */
	uint16_t ports[DWCP_MAX_FILTER_PORTS];
	uint32_t flows_max;        /* size of the per-flow LRU map; 0: DWCP_FLOWS_MAX_ENTRIES */
};

int dwcp_ebpf_open(const struct dwcp_ebpf_opts *opts, struct dwcp_ebpf **out, char *err, size_t errlen);
/* Detach every program and free every map (idempotent on NULL). */
void dwcp_ebpf_close(struct dwcp_ebpf *h);

int dwcp_ebpf_hook(const struct dwcp_ebpf *h);
const char *dwcp_ebpf_hook_reason(const struct dwcp_ebpf *h);
int dwcp_ebpf_has_sockops(const struct dwcp_ebpf *h);

/* All entries of the per-flow map into a buffer owned by h (valid until the next call). */
int dwcp_ebpf_read_flows(struct dwcp_ebpf *h, const struct dwcp_flow **flows, size_t *n);
/* Walk the TCP sockets of the caller's network namespace once (iter/tcp, tp_btf mode only; a no-op in
 * tracepoint mode) so that flows older than the programs appear at once. dwcp_ebpf_open does it. */
int dwcp_ebpf_seed(struct dwcp_ebpf *h);
/* Remove one flow from the map (after its close event was delivered). -ENOENT if absent. */
int dwcp_ebpf_forget(struct dwcp_ebpf *h, uint64_t cookie);
/* Drain the ring buffer, waiting up to timeout_ms (0: don't wait) for the first record. Records go
 * into a buffer owned by h (valid until the next call). */
int dwcp_ebpf_poll(struct dwcp_ebpf *h, int timeout_ms, const struct dwcp_event **events, size_t *n);
/* Records lost: ring buffer full (counted by the programs) + user-space allocation failures. */
uint64_t dwcp_ebpf_events_dropped(const struct dwcp_ebpf *h);
/* Kernel ids of our loaded programs and maps (for checks that nothing is left after close). */
int dwcp_ebpf_ids(const struct dwcp_ebpf *h, uint32_t *prog_ids, size_t *nprogs,
		  uint32_t *map_ids, size_t *nmaps);

/* Cheap capability check without loading the programs: kernel BTF present and a ring-buffer map can
 * be created (needs CAP_BPF or root). */
int dwcp_ebpf_probe(char *err, size_t errlen);

#endif
