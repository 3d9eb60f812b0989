/* The eBPF telemetry loader: see csrc/include/dwcp/ebpf.h. */
#include "dwcp/ebpf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <linux/magic.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "flowstats.skel.h"   /* generated at build time by bpftool gen skeleton (build/ebpf/) */

struct dwcp_ebpf {
	struct dwcp_fs *skel;
	struct ring_buffer *rb;
	int hook;
	int sockops;
	char reason[1024];
	char tracefs_note[160];    /* set when this open mounted tracefs */
	struct dwcp_flow *flows;
	size_t flows_cap;
	struct dwcp_event *events;
	size_t events_len, events_cap;
	uint64_t user_dropped;
};

/* libbpf's log lines, collected per thread while one of our calls runs (else dropped, so a failed
 * tp_btf attempt does not spill verifier output on stderr). Kept: the first line that says what failed,
 * the verifier's verdict when a program was rejected, and the tail of everything. */
#define LOG_BYTES 2048
#define LINE_BYTES 240
struct logbuf {
	char text[LOG_BYTES];
	size_t len;
	char failure[LINE_BYTES];
	char verdict[LINE_BYTES];
};
static __thread struct logbuf *tls_log;

static void copy_line(char *dst, const char *src, size_t n)
{
	size_t i;

	if (n >= LINE_BYTES)
		n = LINE_BYTES - 1;
	for (i = 0; i < n; i++)
		dst[i] = (src[i] == '\t') ? ' ' : src[i];
	dst[n] = '\0';
}

/* The verifier's verdict in a "-- BEGIN PROG LOAD LOG --" message: the last non-empty line before the
 * "processed N insns" statistics line, else the last non-empty line before the END marker. */
static void find_verdict(struct logbuf *lb, const char *msg)
{
	const char *end = strstr(msg, "-- END PROG LOAD LOG --");
	const char *p = msg, *prev = NULL, *last = NULL;
	size_t prev_n = 0, last_n = 0;

	if (!end || lb->verdict[0])
		return;
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);

		if (n && strncmp(p, "processed ", 10) == 0 && prev) {
			copy_line(lb->verdict, prev, prev_n);
			return;
		}
		if (n && !strstr(p, "-- BEGIN PROG LOAD LOG --")) {
			prev = p;
			prev_n = n;
			last = p;
			last_n = n;
		}
		if (!nl)
			break;
		p = nl + 1;
	}
	if (last)
		copy_line(lb->verdict, last, last_n);
}

static int print_fn(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	struct logbuf *lb = tls_log;
	char *msg = NULL;
	const char *tail, *f;
	size_t len;
	int n;

	if (!lb || level == LIBBPF_DEBUG)
		return 0;
	n = vasprintf(&msg, fmt, ap);
	if (n <= 0 || !msg) {
		free(msg);
		return 0;
	}
	len = (size_t)n;
	f = strstr(msg, "failed");
	if (f && !lb->failure[0]) {
		const char *b = f, *e = strchr(f, '\n');

		while (b > msg && b[-1] != '\n')
			b--;
		if (strncmp(b, "libbpf: ", 8) == 0)
			b += 8;
		copy_line(lb->failure, b, e ? (size_t)(e - b) : strlen(b));
	}
	find_verdict(lb, msg);
	tail = msg;
	if (len >= LOG_BYTES / 2) {
		tail = msg + len - LOG_BYTES / 2;
		len = LOG_BYTES / 2;
	}
	if (lb->len + len >= LOG_BYTES) {
		/* keep the newest part */
		size_t keep = LOG_BYTES / 2 - 1 < lb->len ? LOG_BYTES / 2 - 1 : lb->len;

		memmove(lb->text, lb->text + lb->len - keep, keep);
		lb->len = keep;
	}
	memcpy(lb->text + lb->len, tail, len);
	lb->len += len;
	lb->text[lb->len] = '\0';
	free(msg);
	return 0;
}

static void log_reset(struct logbuf *lb)
{
	lb->len = 0;
	lb->text[0] = '\0';
	lb->failure[0] = '\0';
	lb->verdict[0] = '\0';
}

static void log_begin(struct logbuf *lb)
{
	static int print_set;

	log_reset(lb);
	if (!__atomic_exchange_n(&print_set, 1, __ATOMIC_SEQ_CST))
		libbpf_set_print(print_fn);
	tls_log = lb;
}

static void log_end(void)
{
	tls_log = NULL;
}

/* The last non-empty line of the log, flattened. */
static void log_last_line(const struct logbuf *lb, char *out)
{
	size_t end = lb->len, start;

	while (end > 0 && (lb->text[end - 1] == '\n' || lb->text[end - 1] == ' '))
		end--;
	start = end;
	while (start > 0 && lb->text[start - 1] != '\n')
		start--;
	copy_line(out, lb->text + start, end - start);
}

static void seterr(char *err, size_t errlen, const struct logbuf *lb, const char *fmt, ...)
{
	va_list ap;
	char last[LINE_BYTES];
	int n;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	n = vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= errlen || !lb)
		return;
	if (lb->failure[0] && lb->verdict[0])
		snprintf(err + n, errlen - (size_t)n, " (libbpf: %s; verifier: %s)", lb->failure, lb->verdict);
	else if (lb->failure[0])
		snprintf(err + n, errlen - (size_t)n, " (libbpf: %s)", lb->failure);
	else {
		log_last_line(lb, last);
		if (last[0])
			snprintf(err + n, errlen - (size_t)n, " (libbpf: %s)", last);
	}
}

static const char *hook_name(int hook)
{
	return hook == DWCP_EBPF_HOOK_TP_BTF ? "tp_btf" : "tracepoint";
}

static int ev_cb(void *ctx, void *data, size_t size)
{
	struct dwcp_ebpf *h = ctx;

	if (size < sizeof(struct dwcp_event))
		return 0;   /* not ours: cannot happen with a matching skeleton */
	if (h->events_len == h->events_cap) {
		size_t cap = h->events_cap ? h->events_cap * 2 : 256;
		struct dwcp_event *p = realloc(h->events, cap * sizeof(*p));

		if (!p) {
			h->user_dropped++;
			return 0;
		}
		h->events = p;
		h->events_cap = cap;
	}
	memcpy(&h->events[h->events_len++], data, sizeof(struct dwcp_event));
	return 0;
}

/* The classic tracepoints are attached by id, which libbpf reads from tracefs
 * (events/<category>/<name>/id under /sys/kernel/tracing, or under /sys/kernel/debug/tracing when that
 * exists). A freshly booted machine of ours has tracefs mounted nowhere (no systemd mounts it), so the
 * attach fails with ENOENT. As root we mount it where the kernel provides the mount point; tp_btf needs
 * none of this (it attaches by BTF id). */
#define TRACEFS_DIR "/sys/kernel/tracing"
#define DEBUGFS_TRACING_DIR "/sys/kernel/debug/tracing"

static int tracefs_has_tcp_probe(void)
{
	/* libbpf looks under the debugfs path whenever that directory exists, else under tracefs. */
	if (access(DEBUGFS_TRACING_DIR, F_OK) == 0)
		return access(DEBUGFS_TRACING_DIR "/events/tcp/tcp_probe/id", R_OK) == 0;
	return access(TRACEFS_DIR "/events/tcp/tcp_probe/id", R_OK) == 0;
}

static int ensure_tracefs(struct dwcp_ebpf *h, char *err, size_t errlen)
{
	struct statfs fs;

	if (tracefs_has_tcp_probe())
		return 0;
	if (access(DEBUGFS_TRACING_DIR, F_OK) == 0 ||
	    (statfs(TRACEFS_DIR, &fs) == 0 && (unsigned long)fs.f_type == TRACEFS_MAGIC)) {
		seterr(err, errlen, NULL, "tracefs is mounted but has no tcp/tcp_probe tracepoint (kernel "
		       "built without it?): use the tp_btf hook");
		return -ENOENT;
	}
	if (mount("tracefs", TRACEFS_DIR, "tracefs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
		int e = errno;

		seterr(err, errlen, NULL, "the classic tracepoints need tracefs, which is not mounted, and "
		       "mounting it at " TRACEFS_DIR " failed: %s; mount it (mount -t tracefs tracefs "
		       TRACEFS_DIR ") or use the tp_btf hook", strerror(e));
		return -e;
	}
	snprintf(h->tracefs_note, sizeof(h->tracefs_note), "; mounted tracefs at " TRACEFS_DIR
		 " (it was not mounted)");
	if (!tracefs_has_tcp_probe()) {
		seterr(err, errlen, NULL, "tracefs mounted at " TRACEFS_DIR " has no tcp/tcp_probe "
		       "tracepoint: use the tp_btf hook");
		return -ENOENT;
	}
	return 0;
}

/* The sockops program's cgroup, checked before anything is loaded so that a bad path is reported as
 * such (not as whatever the last hook kind tried failed with). Returns an O_RDONLY fd or -errno. */
static int open_cgroup(const char *path, char *err, size_t errlen)
{
	struct statfs fs;
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd < 0) {
		int e = errno;

		seterr(err, errlen, NULL, "opening cgroup %s for the sockops program failed: %s (pass a "
		       "cgroup v2 directory)", path, strerror(e));
		return -e;
	}
	if (fstatfs(fd, &fs) != 0 || (unsigned long)fs.f_type != CGROUP2_SUPER_MAGIC) {
		seterr(err, errlen, NULL, "cgroup %s for the sockops program is not a cgroup v2 directory "
		       "(pass one under the cgroup2 mount)", path);
		close(fd);
		return -ENOTDIR;
	}
	return fd;
}

/* Open, configure, load and attach the programs of one hook kind. */
static int load_attach(struct dwcp_ebpf *h, const struct dwcp_ebpf_opts *o, int hook, int cgfd,
		       char *err, size_t errlen, struct logbuf *lb)
{
	struct dwcp_fs *s;
	int btf = hook == DWCP_EBPF_HOOK_TP_BTF;
	int rc;
	uint32_t i;

	log_reset(lb);
	if (!btf) {
		rc = ensure_tracefs(h, err, errlen);
		if (rc)
			return rc;
	}
	s = dwcp_fs__open();
	if (!s) {
		rc = -errno;
		seterr(err, errlen, lb, "opening the BPF object failed: %s", strerror(-rc));
		return rc ? rc : -EINVAL;
	}
	s->rodata->filter_netns = o->netns;
	s->rodata->filter_nports = o->nports;
	for (i = 0; i < o->nports && i < DWCP_MAX_FILTER_PORTS; i++)
		s->rodata->filter_ports[i] = o->ports[i];
	bpf_program__set_autoload(s->progs.dwcp_probe_btf, btf);
	bpf_program__set_autoload(s->progs.dwcp_state_btf, btf);
	bpf_program__set_autoload(s->progs.dwcp_probe_tp, !btf);
	bpf_program__set_autoload(s->progs.dwcp_state_tp, !btf);
	bpf_program__set_autoload(s->progs.dwcp_seed, btf);
	bpf_program__set_autoload(s->progs.dwcp_sockops, o->cgroup != NULL);
	rc = bpf_map__set_max_entries(s->maps.dwcp_flows, o->flows_max ? o->flows_max : DWCP_FLOWS_MAX_ENTRIES);
	if (rc) {
		seterr(err, errlen, lb, "sizing the flow map failed: %s", strerror(-rc));
		goto fail;
	}
	rc = dwcp_fs__load(s);
	if (rc) {
		seterr(err, errlen, lb, "loading the %s programs failed: %s", hook_name(hook), strerror(-rc));
		goto fail;
	}
	if (btf) {
		s->links.dwcp_probe_btf = bpf_program__attach(s->progs.dwcp_probe_btf);
		s->links.dwcp_state_btf = bpf_program__attach(s->progs.dwcp_state_btf);
		rc = !s->links.dwcp_probe_btf || !s->links.dwcp_state_btf ? -errno : 0;
	} else {
		s->links.dwcp_probe_tp = bpf_program__attach(s->progs.dwcp_probe_tp);
		s->links.dwcp_state_tp = bpf_program__attach(s->progs.dwcp_state_tp);
		rc = !s->links.dwcp_probe_tp || !s->links.dwcp_state_tp ? -errno : 0;
	}
	if (rc) {
		seterr(err, errlen, lb, "attaching the %s programs failed: %s", hook_name(hook), strerror(-rc));
		goto fail;
	}
	if (cgfd >= 0) {
		s->links.dwcp_sockops = bpf_program__attach_cgroup(s->progs.dwcp_sockops, cgfd);
		rc = s->links.dwcp_sockops ? 0 : -errno;
		if (rc) {
			seterr(err, errlen, lb, "attaching the sockops program to %s failed: %s "
			       "(it must be a cgroup v2 directory)", o->cgroup, strerror(-rc));
			goto fail;
		}
	}
	h->skel = s;
	return 0;
fail:
	dwcp_fs__destroy(s);
	return rc ? rc : -EINVAL;
}

/* Run the iter/tcp program once over this namespace's sockets (it writes nothing: reading to EOF is
 * the walk). Only loaded in tp_btf mode. */
static int seed(struct dwcp_ebpf *h)
{
	struct bpf_link *link;
	char buf[256];
	ssize_t n;
	int fd, rc = 0;

	if (bpf_program__fd(h->skel->progs.dwcp_seed) < 0)
		return 0;
	link = bpf_program__attach_iter(h->skel->progs.dwcp_seed, NULL);
	if (!link)
		return -errno;
	fd = bpf_iter_create(bpf_link__fd(link));
	if (fd < 0) {
		rc = -errno;
	} else {
		while ((n = read(fd, buf, sizeof(buf))) != 0) {
			if (n < 0 && errno != EINTR) {
				rc = -errno;
				break;
			}
		}
		close(fd);
	}
	bpf_link__destroy(link);
	return rc;
}

int dwcp_ebpf_seed(struct dwcp_ebpf *h)
{
	struct logbuf lb;
	int rc;

	log_begin(&lb);
	rc = seed(h);
	log_end();
	return rc;
}

int dwcp_ebpf_open(const struct dwcp_ebpf_opts *o, struct dwcp_ebpf **out, char *err, size_t errlen)
{
	struct dwcp_ebpf *h;
	struct logbuf lb;
	char first[700];
	int rc, cgfd = -1;

	*out = NULL;
	if (o->nports > DWCP_MAX_FILTER_PORTS) {
		seterr(err, errlen, NULL, "at most %d filter ports (got %u)", DWCP_MAX_FILTER_PORTS, o->nports);
		return -EINVAL;
	}
	if (o->hook < DWCP_EBPF_HOOK_AUTO || o->hook > DWCP_EBPF_HOOK_TRACEPOINT) {
		seterr(err, errlen, NULL, "unknown hook %d", o->hook);
		return -EINVAL;
	}
	h = calloc(1, sizeof(*h));
	if (!h) {
		seterr(err, errlen, NULL, "out of memory");
		return -ENOMEM;
	}
	h->sockops = o->cgroup != NULL;
	if (o->cgroup) {
		cgfd = open_cgroup(o->cgroup, err, errlen);
		if (cgfd < 0) {
			free(h);
			return cgfd;
		}
	}
	log_begin(&lb);
	if (o->hook == DWCP_EBPF_HOOK_TRACEPOINT) {
		rc = load_attach(h, o, DWCP_EBPF_HOOK_TRACEPOINT, cgfd, err, errlen, &lb);
		h->hook = DWCP_EBPF_HOOK_TRACEPOINT;
		snprintf(h->reason, sizeof(h->reason), "tracepoint: forced by the caller%s", h->tracefs_note);
	} else {
		rc = load_attach(h, o, DWCP_EBPF_HOOK_TP_BTF, cgfd, first, sizeof(first), &lb);
		h->hook = DWCP_EBPF_HOOK_TP_BTF;
		if (rc == 0) {
			snprintf(h->reason, sizeof(h->reason), "tp_btf: %s",
				 o->hook == DWCP_EBPF_HOOK_TP_BTF ? "forced by the caller"
				 : "the kernel accepted the typed BTF tracepoints (direct tcp_sock loads, "
				   "cheapest)");
		} else if (o->hook == DWCP_EBPF_HOOK_TP_BTF) {
			snprintf(err, errlen, "%s", first);
		} else {
			rc = load_attach(h, o, DWCP_EBPF_HOOK_TRACEPOINT, cgfd, err, errlen, &lb);
			h->hook = DWCP_EBPF_HOOK_TRACEPOINT;
			snprintf(h->reason, sizeof(h->reason),
				 "tracepoint: tp_btf could not be used (%s); using the classic tracepoints "
				 "with CO-RE reads%s", first, h->tracefs_note);
		}
	}
	log_end();
	if (cgfd >= 0)
		close(cgfd);   /* the sockops link holds its own reference to the cgroup */
	if (rc)
		goto fail;
	h->rb = ring_buffer__new(bpf_map__fd(h->skel->maps.dwcp_events), ev_cb, h, NULL);
	if (!h->rb) {
		rc = -errno;
		seterr(err, errlen, NULL, "creating the ring-buffer reader failed: %s", strerror(-rc));
		goto fail;
	}
	rc = dwcp_ebpf_seed(h);
	if (rc) {
		seterr(err, errlen, NULL, "walking the existing TCP sockets (iter/tcp) failed: %s", strerror(-rc));
		goto fail;
	}
	*out = h;
	return 0;
fail:
	dwcp_ebpf_close(h);
	return rc ? rc : -EINVAL;
}

void dwcp_ebpf_close(struct dwcp_ebpf *h)
{
	if (!h)
		return;
	ring_buffer__free(h->rb);
	dwcp_fs__destroy(h->skel);   /* destroys the links (detach), then closes map and program fds */
	free(h->flows);
	free(h->events);
	free(h);
}

int dwcp_ebpf_hook(const struct dwcp_ebpf *h)
{
	return h->hook;
}

const char *dwcp_ebpf_hook_reason(const struct dwcp_ebpf *h)
{
	return h->reason;
}

int dwcp_ebpf_has_sockops(const struct dwcp_ebpf *h)
{
	return h->sockops;
}

int dwcp_ebpf_read_flows(struct dwcp_ebpf *h, const struct dwcp_flow **flows, size_t *n)
{
	int fd = bpf_map__fd(h->skel->maps.dwcp_flows);
	size_t max = bpf_map__max_entries(h->skel->maps.dwcp_flows);
	size_t count = 0, steps = 0;
	__u64 key, next;
	void *prev = NULL;

	*flows = NULL;
	*n = 0;
	if (!h->flows) {
		h->flows = calloc(max, sizeof(*h->flows));
		if (!h->flows)
			return -ENOMEM;
		h->flows_cap = max;
	}
	/* get_next_key restarts from the first key when the previous one was deleted meanwhile, so
	 * bound the walk; duplicates are possible and the caller keys by cookie. */
	while (count < h->flows_cap && steps < 2 * max + 16) {
		steps++;
		if (bpf_map_get_next_key(fd, prev, &next))
			break;   /* ENOENT: the end */
		key = next;
		prev = &key;
		if (bpf_map_lookup_elem(fd, &key, &h->flows[count]) == 0)
			count++;
	}
	*flows = h->flows;
	*n = count;
	return 0;
}

int dwcp_ebpf_forget(struct dwcp_ebpf *h, uint64_t cookie)
{
	__u64 key = cookie;

	if (bpf_map_delete_elem(bpf_map__fd(h->skel->maps.dwcp_flows), &key))
		return -errno;
	return 0;
}

int dwcp_ebpf_poll(struct dwcp_ebpf *h, int timeout_ms, const struct dwcp_event **events, size_t *n)
{
	int rc;

	h->events_len = 0;
	rc = timeout_ms > 0 ? ring_buffer__poll(h->rb, timeout_ms) : ring_buffer__consume(h->rb);
	*events = h->events;
	*n = h->events_len;
	if (rc < 0 && rc != -EINTR)
		return rc;
	return 0;
}

uint64_t dwcp_ebpf_events_dropped(const struct dwcp_ebpf *h)
{
	return __atomic_load_n(&h->skel->bss->events_dropped, __ATOMIC_RELAXED) + h->user_dropped;
}

static int obj_id(int fd, int is_prog, uint32_t *id)
{
	struct bpf_prog_info pi;
	struct bpf_map_info mi;
	__u32 len;
	int rc;

	if (is_prog) {
		memset(&pi, 0, sizeof(pi));
		len = sizeof(pi);
		rc = bpf_obj_get_info_by_fd(fd, &pi, &len);
		*id = pi.id;
	} else {
		memset(&mi, 0, sizeof(mi));
		len = sizeof(mi);
		rc = bpf_obj_get_info_by_fd(fd, &mi, &len);
		*id = mi.id;
	}
	return rc ? -errno : 0;
}

int dwcp_ebpf_ids(const struct dwcp_ebpf *h, uint32_t *prog_ids, size_t *nprogs, uint32_t *map_ids,
		  size_t *nmaps)
{
	struct bpf_program *p;
	struct bpf_map *m;
	size_t np = 0, nm = 0;
	int fd, rc;

	bpf_object__for_each_program(p, h->skel->obj) {
		fd = bpf_program__fd(p);
		if (fd < 0 || np >= *nprogs)
			continue;   /* not loaded (the other hook kind) */
		rc = obj_id(fd, 1, &prog_ids[np]);
		if (rc)
			return rc;
		np++;
	}
	bpf_object__for_each_map(m, h->skel->obj) {
		fd = bpf_map__fd(m);
		if (fd < 0 || nm >= *nmaps)
			continue;
		rc = obj_id(fd, 0, &map_ids[nm]);
		if (rc)
			return rc;
		nm++;
	}
	*nprogs = np;
	*nmaps = nm;
	return 0;
}

int dwcp_ebpf_probe(char *err, size_t errlen)
{
	struct logbuf lb;
	int fd, rc = 0;

	if (access("/sys/kernel/btf/vmlinux", R_OK) != 0) {
		rc = -errno;
		seterr(err, errlen, NULL, "no kernel BTF (/sys/kernel/btf/vmlinux: %s): the CO-RE programs "
		       "need a kernel built with CONFIG_DEBUG_INFO_BTF=y", strerror(-rc));
		return rc;
	}
	log_begin(&lb);
	fd = bpf_map_create(BPF_MAP_TYPE_RINGBUF, "dwcp_probe", 0, 0, 4096, NULL);
	log_end();
	if (fd < 0) {
		rc = -errno;
		seterr(err, errlen, NULL, "creating a BPF ring buffer failed: %s (needs root or CAP_BPF + "
		       "CAP_PERFMON, and a kernel >= 5.8)", strerror(-rc));
		return rc;
	}
	close(fd);
	return 0;
}
