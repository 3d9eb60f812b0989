/*
 * dwcp-delayline: the WAN link emulator behind dwcp.netlab.
 *
 * One single-threaded process holds one TUN device in each of two network namespaces ("a" and "b").
 * Every packet read from one TUN goes through, per direction:
 *
 *   random loss  ->  bottleneck FIFO (tail drop at queue_bytes, served at the link rate)
 *                ->  propagation delay of RTT/2  ->  written to the other TUN.
 *
 * The link rate is constant, or follows a trace ("seconds Mbit/s" per line, looped). Departure times
 * are computed from the previous departure (a virtual clock), not from when we happened to wake up,
 * so a late wake-up delivers a small burst instead of slowing the link down.
 *
 * Why TUN opened after setns(): a TUN device is created in the network namespace of the process at
 * TUNSETIFF time, and stays there while its file descriptor lives. So we enter each namespace, create
 * the device, and return; the two descriptors then move packets between namespaces with no veth and no
 * persistent device: when this process dies, both devices vanish with it.
 *
 * Offloads: we never call TUNSETOFFLOAD, so the devices advertise no TSO/GSO and the kernel segments
 * GSO super-packets before handing them to us: each read() is one MTU-sized packet, and loss is per
 * packet, not per GSO batch (max_packet_bytes in the stats shows it).
 *
 * Stats are rewritten atomically (tmp + rename) as JSON every --stats-interval-ms and on exit.
 *
 * Subcommands:
 *   dwcp-delayline run --ns-a PATH --ns-b PATH --rtt-us N --rate-bps N [options]
 *   dwcp-delayline nsexec NSPATH CMD [ARG...]     run CMD in the namespace (setns + execvp)
 *   dwcp-delayline sysctl NSPATH KEY=VALUE...     write /proc/sys/KEY inside the namespace
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_PKT 65536           /* a TUN read never returns more than this */
#define READ_BURST 256          /* packets read per wake-up per device, so timers stay prompt */
#define LATE_NS 1000000ull      /* a packet written more than 1 ms after its due time is "late" */
#define NS_PER_S 1000000000ull

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS_PER_S + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "dwcp-delayline: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail(const char *msg)
{
    fprintf(stderr, "dwcp-delayline: %s\n", msg);
    exit(2);
}

/* ---------------------------------------------------------------- random loss (splitmix64) */

static uint64_t rng_state;

static double rng_uniform(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

/* ---------------------------------------------------------------- rate trace */

struct trace {
    size_t n;
    uint64_t *t_ns;     /* start of each step, relative to the trace start; t_ns[0] == 0 */
    uint64_t *rate_bps; /* rate during that step */
    uint64_t period_ns; /* the trace loops with this period */
};

/* Reads "seconds Mbit/s" lines. Times are shifted so the first sample starts at 0; the last sample lasts
 * as long as the gap before it (one sample interval), then the trace loops. */
static void trace_load(struct trace *tr, const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        die(path);
    size_t cap = 256;
    tr->n = 0;
    tr->t_ns = malloc(cap * sizeof(uint64_t));
    tr->rate_bps = malloc(cap * sizeof(uint64_t));
    if (!tr->t_ns || !tr->rate_bps)
        die("malloc");
    char line[512];
    double t0 = 0, prev = -1;
    unsigned lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '\n' || *p == '\0' || *p == '#')
            continue;
        char *end;
        double t = strtod(p, &end);
        if (end == p)
            goto bad;
        p = end;
        double mbit = strtod(p, &end);
        if (end == p || mbit < 0 || t < 0)
            goto bad;
        if (tr->n == 0)
            t0 = t;
        if (t <= prev)
            goto bad;
        prev = t;
        if (tr->n == cap) {
            cap *= 2;
            tr->t_ns = realloc(tr->t_ns, cap * sizeof(uint64_t));
            tr->rate_bps = realloc(tr->rate_bps, cap * sizeof(uint64_t));
            if (!tr->t_ns || !tr->rate_bps)
                die("realloc");
        }
        tr->t_ns[tr->n] = (uint64_t)((t - t0) * 1e9);
        tr->rate_bps[tr->n] = (uint64_t)(mbit * 1e6);
        tr->n++;
        continue;
    bad:
        fprintf(stderr, "dwcp-delayline: %s:%u: expected 'seconds Mbit/s' with increasing seconds\n",
                path, lineno);
        exit(2);
    }
    fclose(f);
    if (tr->n == 0)
        fail("trace file has no samples");
    if (tr->n == 1)
        tr->period_ns = NS_PER_S; /* a constant rate */
    else
        tr->period_ns = tr->t_ns[tr->n - 1] + (tr->t_ns[tr->n - 1] - tr->t_ns[tr->n - 2]);
}

/* Index of the step in effect at offset pos (0 <= pos < period). */
static size_t trace_step(const struct trace *tr, uint64_t pos)
{
    size_t lo = 0, hi = tr->n; /* invariant: t_ns[lo] <= pos, answer in [lo, hi) */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (tr->t_ns[mid] <= pos)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* ---------------------------------------------------------------- one direction of the link */

struct pkt {
    uint64_t arrival_ns;
    uint64_t deliver_ns; /* departure from the bottleneck + one-way delay; valid once "served" */
    uint32_t len;
    unsigned char *data;
};

struct stats {
    uint64_t rx_packets, rx_bytes;             /* read from the ingress TUN */
    uint64_t tx_packets, tx_bytes;             /* written to the egress TUN */
    uint64_t drop_loss_packets, drop_loss_bytes;   /* random loss */
    uint64_t drop_queue_packets, drop_queue_bytes; /* tail drop at the bottleneck queue */
    uint64_t late_packets, late_ns_max, late_ns_sum;
    uint64_t queue_bytes_max, max_packet_bytes, write_errors;
};

struct dir {
    const char *name;
    int in_fd, out_fd;
    struct pkt *ring;   /* FIFO: [head, served) wait for delivery, [served, tail) wait in the queue */
    uint64_t cap, head, served, tail; /* counters; slot = counter & (cap - 1) */
    uint64_t link_free_ns;            /* when the bottleneck finishes its current packet */
    uint64_t base_rate_bps;
    int follows_trace;
    uint64_t rate_bps_now;            /* the rate used for the last packet served (for stats) */
    uint64_t queue_limit, queue_bytes;
    struct stats st;
};

struct link {
    struct dir d[2];
    uint64_t owd_ns;
    double loss;
    struct trace tr;
    int has_trace;
    uint64_t start_ns;
};

static void dir_grow(struct dir *d)
{
    uint64_t ncap = d->cap ? d->cap * 2 : 1024;
    struct pkt *nr = malloc(ncap * sizeof *nr);
    if (!nr)
        die("malloc");
    for (uint64_t k = d->head; k != d->tail; k++)
        nr[k & (ncap - 1)] = d->ring[k & (d->cap - 1)];
    free(d->ring);
    d->ring = nr;
    d->cap = ncap;
}

/* Rate at time t; when the rate there is 0, *resume gets when the next step starts. */
static uint64_t rate_at(const struct link *l, const struct dir *d, uint64_t t, uint64_t *resume)
{
    if (!d->follows_trace)
        return d->base_rate_bps;
    uint64_t pos = (t - l->start_ns) % l->tr.period_ns;
    size_t i = trace_step(&l->tr, pos);
    uint64_t next = i + 1 < l->tr.n ? l->tr.t_ns[i + 1] : l->tr.period_ns;
    *resume = t + (next - pos);
    return l->tr.rate_bps[i];
}

static void enqueue(struct link *l, struct dir *d, const unsigned char *buf, uint32_t len, uint64_t now)
{
    d->st.rx_packets++;
    d->st.rx_bytes += len;
    if (len > d->st.max_packet_bytes)
        d->st.max_packet_bytes = len;
    if (l->loss > 0 && rng_uniform() < l->loss) {
        d->st.drop_loss_packets++;
        d->st.drop_loss_bytes += len;
        return;
    }
    if (d->queue_bytes + len > d->queue_limit) {
        d->st.drop_queue_packets++;
        d->st.drop_queue_bytes += len;
        return;
    }
    if (d->tail - d->head == d->cap)
        dir_grow(d);
    struct pkt *p = &d->ring[d->tail & (d->cap - 1)];
    p->data = malloc(len);
    if (!p->data)
        die("malloc");
    memcpy(p->data, buf, len);
    p->len = len;
    p->arrival_ns = now;
    p->deliver_ns = 0;
    d->tail++;
    d->queue_bytes += len;
    if (d->queue_bytes > d->st.queue_bytes_max)
        d->st.queue_bytes_max = d->queue_bytes;
}

/* Serve the bottleneck up to now, deliver what is due, and return the next time we must act
 * (UINT64_MAX when idle). A packet counts against the queue until its transmission ends. */
static uint64_t dir_advance(struct link *l, struct dir *d, uint64_t now)
{
    while (d->served != d->tail) {
        struct pkt *p = &d->ring[d->served & (d->cap - 1)];
        if (p->deliver_ns == 0) { /* not in service yet: start it when the link is free */
            uint64_t start = p->arrival_ns > d->link_free_ns ? p->arrival_ns : d->link_free_ns;
            if (start > now)
                break;
            uint64_t resume = 0;
            uint64_t rate = rate_at(l, d, start, &resume);
            if (rate == 0) {
                d->link_free_ns = resume; /* the trace says the link is down until its next step */
                d->rate_bps_now = 0;
                continue;
            }
            d->rate_bps_now = rate;
            d->link_free_ns = start + ((uint64_t)p->len * 8u * NS_PER_S) / rate;
            p->deliver_ns = d->link_free_ns + l->owd_ns;
        }
        if (d->link_free_ns > now)
            break; /* being transmitted: still occupies the queue */
        d->queue_bytes -= p->len;
        d->served++;
    }
    while (d->head != d->served) {
        struct pkt *p = &d->ring[d->head & (d->cap - 1)];
        if (p->deliver_ns > now)
            break;
        if (write(d->out_fd, p->data, p->len) != (ssize_t)p->len)
            d->st.write_errors++;
        else {
            d->st.tx_packets++;
            d->st.tx_bytes += p->len;
        }
        uint64_t late = now - p->deliver_ns;
        d->st.late_ns_sum += late;
        if (late > d->st.late_ns_max)
            d->st.late_ns_max = late;
        if (late > LATE_NS)
            d->st.late_packets++;
        free(p->data);
        d->head++;
    }
    uint64_t next = UINT64_MAX;
    if (d->head != d->served)
        next = d->ring[d->head & (d->cap - 1)].deliver_ns;
    if (d->served != d->tail) {
        /* the packet in service ends at link_free_ns; a waiting one starts then (or at arrival) */
        uint64_t t = d->link_free_ns;
        if (t < next)
            next = t;
    }
    return next;
}

static void dir_read(struct link *l, struct dir *d, unsigned char *buf)
{
    for (int i = 0; i < READ_BURST; i++) {
        ssize_t n = read(d->in_fd, buf, MAX_PKT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            die("read tun");
        }
        if (n == 0)
            return;
        enqueue(l, d, buf, (uint32_t)n, mono_ns());
    }
}

/* ---------------------------------------------------------------- stats */

static int dir_json(char *out, size_t cap, const struct dir *d)
{
    const struct stats *s = &d->st;
    uint64_t delivered = s->tx_packets + s->write_errors;
    return snprintf(out, cap,
        "\"%s\": {\"rx_packets\": %llu, \"rx_bytes\": %llu, \"tx_packets\": %llu, \"tx_bytes\": %llu, "
        "\"drop_loss_packets\": %llu, \"drop_loss_bytes\": %llu, "
        "\"drop_queue_packets\": %llu, \"drop_queue_bytes\": %llu, "
        "\"late_packets\": %llu, \"late_us_max\": %.1f, \"late_us_mean\": %.2f, "
        "\"queue_bytes\": %llu, \"queue_bytes_max\": %llu, \"queue_limit_bytes\": %llu, "
        "\"in_flight_packets\": %llu, \"max_packet_bytes\": %llu, \"write_errors\": %llu, "
        "\"rate_bps\": %llu}",
        d->name, (unsigned long long)s->rx_packets, (unsigned long long)s->rx_bytes,
        (unsigned long long)s->tx_packets, (unsigned long long)s->tx_bytes,
        (unsigned long long)s->drop_loss_packets, (unsigned long long)s->drop_loss_bytes,
        (unsigned long long)s->drop_queue_packets, (unsigned long long)s->drop_queue_bytes,
        (unsigned long long)s->late_packets, (double)s->late_ns_max / 1e3,
        delivered ? (double)s->late_ns_sum / 1e3 / (double)delivered : 0.0,
        (unsigned long long)d->queue_bytes, (unsigned long long)s->queue_bytes_max,
        (unsigned long long)d->queue_limit, (unsigned long long)(d->tail - d->head),
        (unsigned long long)s->max_packet_bytes, (unsigned long long)s->write_errors,
        (unsigned long long)d->rate_bps_now);
}

static void write_stats(const struct link *l, const char *path, uint64_t now)
{
    char buf[4096];
    int n = snprintf(buf, sizeof buf, "{\"pid\": %ld, \"uptime_s\": %.6f, \"owd_us\": %.1f, \"loss\": %.9g, ",
                     (long)getpid(), (double)(now - l->start_ns) / 1e9, (double)l->owd_ns / 1e3, l->loss);
    if (l->has_trace)
        n += snprintf(buf + n, sizeof buf - (size_t)n, "\"trace_period_s\": %.6f, \"trace_position_s\": %.6f, ",
                      (double)l->tr.period_ns / 1e9, (double)((now - l->start_ns) % l->tr.period_ns) / 1e9);
    n += snprintf(buf + n, sizeof buf - (size_t)n, "\"directions\": {");
    n += dir_json(buf + n, sizeof buf - (size_t)n, &l->d[0]);
    n += snprintf(buf + n, sizeof buf - (size_t)n, ", ");
    n += dir_json(buf + n, sizeof buf - (size_t)n, &l->d[1]);
    n += snprintf(buf + n, sizeof buf - (size_t)n, "}}\n");
    if (n <= 0 || (size_t)n >= sizeof buf)
        fail("stats record too long");
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        fail("stats path too long");
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die(tmp);
    if (write(fd, buf, (size_t)n) != n)
        die("write stats");
    close(fd);
    if (rename(tmp, path) < 0)
        die("rename stats");
}

/* ---------------------------------------------------------------- namespaces */

static void enter_ns(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die(path);
    if (setns(fd, CLONE_NEWNET) < 0)
        die("setns (needs CAP_SYS_ADMIN)");
    close(fd);
}

static int open_tun_in(const char *nspath, const char *dev, int home_ns)
{
    enter_ns(nspath);
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF (needs CAP_NET_ADMIN)");
    if (setns(home_ns, CLONE_NEWNET) < 0)
        die("setns back");
    return fd;
}

static int cmd_nsexec(int argc, char **argv)
{
    if (argc < 3)
        fail("usage: dwcp-delayline nsexec NSPATH CMD [ARG...]");
    enter_ns(argv[1]);
    execvp(argv[2], argv + 2);
    fprintf(stderr, "dwcp-delayline: exec %s: %s\n", argv[2], strerror(errno));
    return 127;
}

static int cmd_sysctl(int argc, char **argv)
{
    if (argc < 2)
        fail("usage: dwcp-delayline sysctl NSPATH KEY=VALUE...");
    /* /proc/sys/net resolves to the opener's network namespace at open() time */
    enter_ns(argv[1]);
    for (int i = 2; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq)
            fail("sysctl arguments are KEY=VALUE");
        char path[512];
        int n = snprintf(path, sizeof path, "/proc/sys/%.*s", (int)(eq - argv[i]), argv[i]);
        if (n < 0 || (size_t)n >= sizeof path)
            fail("sysctl key too long");
        for (char *c = path + 10; *c; c++)
            if (*c == '.')
                *c = '/';
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd < 0)
            die(path);
        size_t len = strlen(eq + 1);
        if (write(fd, eq + 1, len) != (ssize_t)len)
            die(path);
        close(fd);
    }
    return 0;
}

/* ---------------------------------------------------------------- run */

static uint64_t parse_u64(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') {
        fprintf(stderr, "dwcp-delayline: --%s wants a non-negative integer, got '%s'\n", opt, s);
        exit(2);
    }
    return (uint64_t)v;
}

static int cmd_run(int argc, char **argv)
{
    static const struct option opts[] = {
        {"ns-a", required_argument, 0, 'a'},       {"ns-b", required_argument, 0, 'b'},
        {"dev", required_argument, 0, 'd'},        {"rtt-us", required_argument, 0, 'r'},
        {"rate-bps", required_argument, 0, 'R'},   {"rate-bps-rev", required_argument, 0, 'V'},
        {"loss", required_argument, 0, 'l'},       {"queue-bytes", required_argument, 0, 'q'},
        {"queue-bytes-rev", required_argument, 0, 'Q'}, {"trace", required_argument, 0, 't'},
        {"stats", required_argument, 0, 's'},      {"stats-interval-ms", required_argument, 0, 'i'},
        {"seed", required_argument, 0, 'S'},       {"ready-fd", required_argument, 0, 'f'},
        {0, 0, 0, 0},
    };
    const char *ns_a = NULL, *ns_b = NULL, *dev = "wan0", *trace = NULL, *stats_path = NULL;
    uint64_t rtt_us = 0, rate = 0, rate_rev = 0, qa = 0, qb = 0, interval_ms = 100, seed = 0;
    double loss = 0;
    int ready_fd = -1, c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'a': ns_a = optarg; break;
        case 'b': ns_b = optarg; break;
        case 'd': dev = optarg; break;
        case 'r': rtt_us = parse_u64("rtt-us", optarg); break;
        case 'R': rate = parse_u64("rate-bps", optarg); break;
        case 'V': rate_rev = parse_u64("rate-bps-rev", optarg); break;
        case 'l': {
            char *end;
            loss = strtod(optarg, &end);
            if (end == optarg || *end || !(loss >= 0 && loss < 1))
                fail("--loss wants a fraction in [0, 1)");
            break;
        }
        case 'q': qa = parse_u64("queue-bytes", optarg); break;
        case 'Q': qb = parse_u64("queue-bytes-rev", optarg); break;
        case 't': trace = optarg; break;
        case 's': stats_path = optarg; break;
        case 'i': interval_ms = parse_u64("stats-interval-ms", optarg); break;
        case 'S': seed = parse_u64("seed", optarg); break;
        case 'f': ready_fd = (int)parse_u64("ready-fd", optarg); break;
        default: exit(2);
        }
    }
    if (!ns_a || !ns_b || (!rate && !trace) || strlen(dev) >= IFNAMSIZ)
        fail("usage: dwcp-delayline run --ns-a PATH --ns-b PATH --rtt-us N (--rate-bps N | --trace FILE) "
             "[--rate-bps-rev N] [--loss F] [--queue-bytes N] [--queue-bytes-rev N] [--stats FILE] "
             "[--stats-interval-ms N] [--seed N] [--ready-fd FD] [--dev NAME]");
    if (interval_ms == 0)
        interval_ms = 100;

    static struct link l;
    l.owd_ns = rtt_us * 1000 / 2;
    l.loss = loss;
    rng_state = seed ? seed : (mono_ns() ^ ((uint64_t)getpid() << 32));
    if (trace) {
        trace_load(&l.tr, trace);
        l.has_trace = 1;
    }
    /* The trace drives both directions unless the reverse direction has its own fixed rate. */
    l.d[0] = (struct dir){.name = "a_to_b", .base_rate_bps = rate, .follows_trace = trace != NULL,
                          .queue_limit = qa ? qa : 1u << 20};
    l.d[1] = (struct dir){.name = "b_to_a", .base_rate_bps = rate_rev ? rate_rev : rate,
                          .follows_trace = trace != NULL && !rate_rev, .queue_limit = qb ? qb : (qa ? qa : 1u << 20)};

    int home = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home < 0)
        die("/proc/self/ns/net");
    int fd_a = open_tun_in(ns_a, dev, home);
    int fd_b = open_tun_in(ns_b, dev, home);
    close(home);
    l.d[0].in_fd = fd_a;
    l.d[0].out_fd = fd_b;
    l.d[1].in_fd = fd_b;
    l.d[1].out_fd = fd_a;

    /* Signals are blocked except inside ppoll(), so a SIGTERM can never slip in between the check of
     * stop_requested and the wait. */
    sigset_t block, waitmask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGHUP);
    sigprocmask(SIG_BLOCK, &block, &waitmask);
    sigdelset(&waitmask, SIGTERM);
    sigdelset(&waitmask, SIGINT);
    sigdelset(&waitmask, SIGHUP);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* The default 50 us timer slack lets ppoll() wake up to 50 us late at every departure: on a
     * 0.2 ms RTT link that alone would be a quarter of the delay. Ask for 1 us. */
    if (prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL) < 0)
        die("prctl(PR_SET_TIMERSLACK)");

    l.start_ns = mono_ns();
    uint64_t interval_ns = interval_ms * 1000000ull, next_stats = l.start_ns;
    if (stats_path)
        write_stats(&l, stats_path, l.start_ns);
    if (ready_fd >= 0) {
        if (write(ready_fd, "ready\n", 6) != 6)
            die("ready-fd");
        close(ready_fd);
    }

    unsigned char *buf = malloc(MAX_PKT);
    if (!buf)
        die("malloc");
    struct pollfd pfd[2] = {{.fd = fd_a, .events = POLLIN}, {.fd = fd_b, .events = POLLIN}};
    while (!stop_requested) {
        uint64_t now = mono_ns();
        uint64_t next = dir_advance(&l, &l.d[0], now);
        uint64_t n1 = dir_advance(&l, &l.d[1], now);
        if (n1 < next)
            next = n1;
        if (stats_path) {
            if (now >= next_stats) {
                write_stats(&l, stats_path, now);
                next_stats = now + interval_ns;
            }
            if (next_stats < next)
                next = next_stats;
        }
        struct timespec ts, *tsp = NULL;
        if (next != UINT64_MAX) {
            uint64_t wait = next > now ? next - now : 0;
            ts.tv_sec = (time_t)(wait / NS_PER_S);
            ts.tv_nsec = (long)(wait % NS_PER_S);
            tsp = &ts;
        }
        int r = ppoll(pfd, 2, tsp, &waitmask);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("ppoll");
        }
        if (pfd[0].revents & POLLIN)
            dir_read(&l, &l.d[0], buf);
        if (pfd[1].revents & POLLIN)
            dir_read(&l, &l.d[1], buf);
        if ((pfd[0].revents | pfd[1].revents) & (POLLERR | POLLHUP | POLLNVAL))
            fail("tun device went away");
    }
    if (stats_path)
        write_stats(&l, stats_path, mono_ns());
    /* Free what is still queued, so a sanitizer build's leak check stays quiet at exit. */
    for (int k = 0; k < 2; k++) {
        struct dir *d = &l.d[k];
        for (uint64_t i = d->head; i != d->tail; i++)
            free(d->ring[i & (d->cap - 1)].data);
        free(d->ring);
    }
    free(l.tr.t_ns);
    free(l.tr.rate_bps);
    free(buf);
    close(fd_a);
    close(fd_b);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "run") == 0)
        return cmd_run(argc - 1, argv + 1);
    if (argc >= 2 && strcmp(argv[1], "nsexec") == 0)
        return cmd_nsexec(argc - 1, argv + 1);
    if (argc >= 2 && strcmp(argv[1], "sysctl") == 0)
        return cmd_sysctl(argc - 1, argv + 1);
    fail("usage: dwcp-delayline run|nsexec|sysctl ... (see the comment at the top of delayline.c)");
    return 2;
}
