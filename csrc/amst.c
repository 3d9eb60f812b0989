/* AMST engine: one thread drives all data streams of a transfer through one edge-triggered epoll set.
 *
 * Design notes (the why; the protocol itself is docs/protocol.md "Transfers"):
 * - Edge-triggered epoll with per-stream readable/writable flags: interest never changes, so there is
 *   no epoll_ctl per chunk. A short read/write is treated like EAGAIN: the kernel set SOCK_NOSPACE (or
 *   emptied the receive queue) and will signal a new edge when that changes, saving one syscall per
 *   batch. Except after a FIN: a recv returns the data queued before it and the FIN itself raises no
 *   new edge, so once an event carried RDHUP/HUP the stream is read until EAGAIN or EOF.
 * - Per-chunk state is one uint16 (0 = untouched, 1..256 = in flight/being written on stream v-1,
 *   QUEUED, DONE) in an array that grows (doubling) with the highest chunk touched: benchmarks ask for
 *   petabyte logical lengths in wrap mode and stop at a deadline, so nothing is sized by length.
 * - The receiver reads the payload into the destination and, in the same recvmsg, the next frame's
 *   header into the stream's header buffer (a second iovec), saving one recv per chunk.
 * - MSG_ZEROCOPY pins every byte of the sendmsg, header included, until completion; the header lives
 *   in the stream struct and is rewritten for the next chunk, so in zero-copy mode the header goes out
 *   in its own (copying, MSG_MORE) send and only the payload is sent with MSG_ZEROCOPY. */
#include <errno.h>
#include <fcntl.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "dwcp/amst.h"
#include "util.h"

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif
#ifndef SO_EE_ORIGIN_ZEROCOPY
#define SO_EE_ORIGIN_ZEROCOPY 5
#endif
#ifndef SO_EE_CODE_ZEROCOPY_COPIED
#define SO_EE_CODE_ZEROCOPY_COPIED 1
#endif

#define ST_DONE 0xffffu
#define ST_QUEUED 0xfffeu
#define EV_INTERRUPT 0xffffffffu
#define SCRATCH_BYTES (256u << 10)
#define RX_BUDGET_BYTES (4u << 20) /* per stream per loop: keeps streams fair and ACKs flowing */
#define TX_BUDGET_FRAMES 8
#define ZC_PROBE_RANGES 8 /* completions looked at before deciding the kernel always copies */
#define ACK_BATCH 128     /* ACK-side frames parsed per recv */

enum { RX_HDR = 0, RX_DEST = 1, RX_DISCARD = 2 };

#ifdef DWCP_DEBUG_COUNTERS
static int64_t g_live_sets, g_zc_pending, g_carry_buffers;
#define DBG_ADD(var, v) __atomic_fetch_add(&(var), (int64_t)(v), __ATOMIC_RELAXED)
#else
#define DBG_ADD(var, v) ((void)0)
#endif

typedef struct stream {
    int fd;
    int idx;
    int alive;    /* atomic: read by other threads through dwcp_streams_alive */
    int kill_req; /* atomic: set by dwcp_streams_kill from any thread, applied by the engine */
    int readable; /* edge-triggered readiness not yet consumed */
    int writable;
    int hup;      /* an event reported RDHUP/HUP: a short read no longer means "drained" */

    /* outgoing data frame (sender) */
    int tx_active;
    uint64_t tx_chunk;
    uint8_t tx_hdr[DWCP_HEADER_BYTES];
    const uint8_t *tx_pay;
    size_t tx_pay_len;
    size_t tx_sent;    /* bytes of header+payload written */
    uint8_t *tx_carry; /* private copy of a frame's unsent tail that outlived its call */
    size_t tx_carry_len;

    /* outgoing small frames (receiver: ACK/NACK/DONE; sender: TRUNCATE), whole frames only */
    uint8_t *ctl;
    size_t ctl_len, ctl_off, ctl_cap;

    /* incoming */
    uint8_t rx_hdr[DWCP_HEADER_BYTES];
    size_t rx_hdr_got;
    int rx_mode;
    dwcp_frame rx_f;
    uint8_t *rx_dst;
    uint64_t rx_len, rx_got;
    uint64_t rx_chunk;
    int rx_dup_ack; /* discarded duplicate of a verified chunk: ACK it so the sender can finish */
    int rx_current; /* the discarded frame belongs to the current transfer (counts as duplicate) */
    int rx_parked;  /* holds a header of the next transfer: read no further in this call */

    /* MSG_ZEROCOPY bookkeeping: the kernel numbers successful zero-copy sendmsg calls per socket */
    uint64_t zc_issued, zc_done;
} stream;

struct dwcp_streams {
    int n;
    int ep;
    int evfd;
    int interrupt; /* atomic */
    int busy;      /* atomic */
    int kills;     /* atomic: some kill_req is pending */
    stream *st;
    dwcp_stats stats;
    int zc_sockopt;    /* SO_ZEROCOPY set on every socket */
    int zc_fallback;   /* kernel copies anyway: stop asking for zero-copy for this set's life */
    int zc_confirmed;  /* a real zero-copy completion was seen: never fall back */
    unsigned zc_ranges;
    unsigned zc_copied_ranges;
    uint8_t *scratch;
    /* Session uses one set for both directions: late frames of the other direction are recognised
     * as stale by comparing with the newest id this set sent / received (ids grow per direction). */
    uint64_t last_send_id, last_recv_id;
    int have_send_id, have_recv_id;
};

/* A duplicate dropped because another stream was writing the chunk (receiver). */
typedef struct drop_note {
    uint64_t chunk;
    int via;
} drop_note;

typedef struct xfer {
    dwcp_streams *s;
    int sender;
    const dwcp_xfer_opts *o;
    uint8_t *buf;
    uint64_t buf_len;
    int wrap;
    uint64_t length, chunk, K, Keff;
    uint16_t *st;
    uint64_t st_cap; /* entries allocated; chunks at or beyond are untouched (0) */
    uint64_t next;  /* sender: first never-started chunk */
    uint64_t ndone; /* chunks acknowledged (sender) / verified (receiver) */
    uint64_t done_bytes;
    uint64_t *rq;   /* sender: ring of chunks to send again, front first */
    uint64_t rq_head, rq_n, rq_cap;
    uint64_t *csum_cache; /* sender, wrap mode: checksum per buffer slot (+1 valid bit array) */
    uint8_t *csum_valid;
    drop_note *drops;
    size_t ndrops, drops_cap;
    int truncated;
    uint64_t trunc_len;
    int got_done;
    int done_queued;
    uint64_t touched; /* receiver: 1 + highest chunk index written or being written */
    int64_t last_progress, timeout_ns, deadline;
    int proto_err;
    int again;
    int use_zc;
    uint32_t zc_min;
} xfer;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int is_alive(const stream *t)
{
    return __atomic_load_n(&t->alive, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------- small frames */

static int ctl_push(stream *t, uint8_t type, uint64_t tid, uint64_t offset)
{
    if (t->ctl_len + DWCP_HEADER_BYTES > t->ctl_cap) {
        size_t cap = t->ctl_cap ? t->ctl_cap * 2 : 64 * DWCP_HEADER_BYTES;
        uint8_t *p = realloc(t->ctl, cap);
        if (!p)
            return DWCP_E_NOMEM;
        t->ctl = p;
        t->ctl_cap = cap;
    }
    dwcp_frame f = {.version = DWCP_VERSION, .type = type, .stream = (uint16_t)t->idx,
                    .transfer_id = tid, .offset = offset};
    dwcp_frame_encode(&f, t->ctl + t->ctl_len);
    t->ctl_len += DWCP_HEADER_BYTES;
    return 0;
}

static int ctl_pending(const stream *t)
{
    return t->ctl_off < t->ctl_len;
}

/* Drop frames that were queued but never started; finish only the one already on the wire, so the
 * byte stream stays framed but the next call does not send stale ACKs for nothing. */
static void ctl_trim(stream *t)
{
    if (!ctl_pending(t)) {
        t->ctl_len = t->ctl_off = 0;
        return;
    }
    size_t keep_end = (t->ctl_off + DWCP_HEADER_BYTES - 1) / DWCP_HEADER_BYTES * DWCP_HEADER_BYTES;
    if (t->ctl_off % DWCP_HEADER_BYTES == 0)
        keep_end = t->ctl_off;
    if (keep_end < t->ctl_len)
        t->ctl_len = keep_end;
    if (t->ctl_off == t->ctl_len)
        t->ctl_len = t->ctl_off = 0;
}

/* ---------------------------------------------------------------- stream death */

static void tx_clear(stream *t)
{
    if (t->tx_carry) {
        free(t->tx_carry);
        t->tx_carry = NULL;
        DBG_ADD(g_carry_buffers, -1);
    }
    t->tx_active = 0;
    t->tx_sent = 0;
}

static void stream_reset_io(stream *t)
{
    tx_clear(t);
    t->ctl_len = t->ctl_off = 0;
    t->rx_hdr_got = 0;
    t->rx_mode = RX_HDR;
    t->readable = t->writable = 0;
}

static void mark_dead(dwcp_streams *s, stream *t, int err)
{
    if (!is_alive(t))
        return;
    __atomic_store_n(&t->alive, 0, __ATOMIC_RELAXED);
    /* Shut down so the peer learns at once (its reads see EOF) instead of waiting for a timeout. */
    shutdown(t->fd, SHUT_RDWR);
    epoll_ctl(s->ep, EPOLL_CTL_DEL, t->fd, NULL);
    DWCP_ADD(s->stats.streams_failed, 1);
    DWCP_SET(s->stats.last_failed_stream, t->idx);
    if (err > 0)
        DWCP_SET(s->stats.last_errno, err);
    stream_reset_io(t);
}

static void rq_push(xfer *x, uint64_t c, int front);
static int drop_take(xfer *x, uint64_t c);
static uint16_t st_get(const xfer *x, uint64_t c);

/* A stream died during a transfer: give its chunks back (sender) or forget its half-written chunk
 * (receiver). err > 0 is an errno, err < 0 a DWCP_E_* protocol code, 0 a plain EOF or kill. */
static void stream_die(xfer *x, stream *t, int err)
{
    if (!is_alive(t))
        return;
    int in_flight = t->rx_mode == RX_DEST;
    uint64_t rx_chunk = t->rx_chunk;
    mark_dead(x->s, t, err > 0 ? err : 0);
    if (err < 0)
        x->proto_err = err;
    uint16_t me = (uint16_t)(t->idx + 1);
    if (x->sender) {
        for (uint64_t c = 0; c < x->next; c++) {
            if (x->st[c] == me) {
                x->st[c] = ST_QUEUED;
                rq_push(x, c, 0);
            }
        }
    } else if (in_flight && st_get(x, rx_chunk) == me) {
        x->st[rx_chunk] = 0;
        int via = drop_take(x, rx_chunk);
        if (via >= 0) {
            /* A copy of this chunk arrived on another stream meanwhile and was dropped; the sender
             * counts that copy as outstanding on a live stream and will not resend on its own, so
             * ask for it ("offset = chunk to send again"), preferably where the copy came in. */
            stream *target = NULL;
            if (is_alive(&x->s->st[via]))
                target = &x->s->st[via];
            for (int i = 0; !target && i < x->s->n; i++)
                if (is_alive(&x->s->st[i]))
                    target = &x->s->st[i];
            if (target && ctl_push(target, DWCP_T_NACK, x->o->transfer_id, rx_chunk * x->chunk) < 0)
                x->proto_err = DWCP_E_NOMEM;
        }
    }
    x->again = 1;
}

static void apply_kills(xfer *x)
{
    dwcp_streams *s = x->s;
    if (!__atomic_exchange_n(&s->kills, 0, __ATOMIC_ACQ_REL))
        return;
    for (int i = 0; i < s->n; i++)
        if (__atomic_load_n(&s->st[i].kill_req, __ATOMIC_RELAXED))
            stream_die(x, &s->st[i], 0);
}

static void progress(xfer *x, dwcp_streams *s, size_t n)
{
    x->last_progress = now_ns();
    DWCP_ADD(s->stats.bytes_wire, n);
}

/* Any other errno from a data socket means the stream is gone (reset, broken pipe, ...). */
static int would_block(int e)
{
    return e == EAGAIN || e == EWOULDBLOCK;
}

enum { RECV_GOT, RECV_RETRY, RECV_STOP };

/* What a non-blocking recv()/recvmsg() result means for stream t: bytes arrived (RECV_GOT), try again
 * (EINTR), or stop reading now -- the socket is drained (t->readable cleared) or the stream died (EOF
 * or an error; stream_die has run). One place, so every read path treats EOF and errors alike. */
static int recv_result(xfer *x, stream *t, ssize_t n)
{
    if (n > 0)
        return RECV_GOT;
    if (n < 0 && errno == EINTR)
        return RECV_RETRY;
    if (n < 0 && would_block(errno)) {
        t->readable = 0;
        return RECV_STOP;
    }
    stream_die(x, t, n < 0 ? errno : 0);
    return RECV_STOP;
}

static int flush_ctl(xfer *x, stream *t)
{
    while (ctl_pending(t) && t->writable) {
        size_t want = t->ctl_len - t->ctl_off;
        ssize_t n = send(t->fd, t->ctl + t->ctl_off, want, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (would_block(errno)) {
                t->writable = 0;
                break;
            }
            stream_die(x, t, errno);
            return -1;
        }
        t->ctl_off += (size_t)n;
        progress(x, x->s, (size_t)n);
        if ((size_t)n < want)
            t->writable = 0;
    }
    if (!ctl_pending(t))
        t->ctl_len = t->ctl_off = 0;
    return 0;
}

/* ---------------------------------------------------------------- zero-copy completions */

static void zc_reap(dwcp_streams *s, stream *t)
{
    for (;;) {
        uint8_t cbuf[256];
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_control = cbuf;
        msg.msg_controllen = sizeof cbuf;
        ssize_t r = recvmsg(t->fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (!((cm->cmsg_level == SOL_IP && cm->cmsg_type == IP_RECVERR) ||
                  (cm->cmsg_level == SOL_IPV6 && cm->cmsg_type == IPV6_RECVERR)))
                continue;
            struct sock_extended_err ee;
            memcpy(&ee, CMSG_DATA(cm), sizeof ee);
            if (ee.ee_origin != SO_EE_ORIGIN_ZEROCOPY || ee.ee_errno != 0)
                continue;
            /* [ee_info, ee_data] is an inclusive range of send numbers (u32, may wrap). */
            uint32_t cnt = ee.ee_data - ee.ee_info + 1;
            t->zc_done += cnt;
            DBG_ADD(g_zc_pending, -(int64_t)cnt);
            DWCP_ADD(s->stats.zc_completions, cnt);
            int copied = (ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED) != 0;
            if (copied)
                DWCP_ADD(s->stats.zc_copied, cnt);
            if (!s->zc_confirmed && !s->zc_fallback) {
                s->zc_ranges++;
                if (!copied) {
                    s->zc_confirmed = 1;
                } else if (++s->zc_copied_ranges >= ZC_PROBE_RANGES) {
                    /* The kernel copies every send on this path (loopback, veth, no SG device):
                     * pinning only adds the notification cost, so plain sends are faster. */
                    s->zc_fallback = 1;
                    DWCP_SET(s->stats.zc_fallback, 1);
                }
            }
        }
    }
}

static int zc_outstanding(const dwcp_streams *s)
{
    for (int i = 0; i < s->n; i++)
        if (s->st[i].zc_issued != s->st[i].zc_done)
            return 1;
    return 0;
}

/* The caller may reuse its buffer only after the kernel released every pinned page: wait for the
 * completions (POLLERR is raised while the error queue is non-empty, also on dead streams). */
static int zc_drain(dwcp_streams *s, int timeout_ms)
{
    int64_t end = now_ns() + (int64_t)timeout_ms * 1000000;
    struct pollfd *pf = NULL;
    int rc = 0;
    while (zc_outstanding(s)) {
        if (!pf) {
            pf = calloc((size_t)s->n, sizeof *pf);
            if (!pf)
                return DWCP_E_NOMEM;
        }
        int m = 0;
        for (int i = 0; i < s->n; i++) {
            stream *t = &s->st[i];
            if (t->zc_issued != t->zc_done) {
                zc_reap(s, t);
                if (t->zc_issued != t->zc_done) {
                    pf[m].fd = t->fd;
                    pf[m].events = 0;
                    pf[m].revents = 0;
                    m++;
                }
            }
        }
        if (!m)
            break;
        int64_t left = end - now_ns();
        if (left <= 0) {
            rc = DWCP_E_TIMEOUT;
            break;
        }
        int w = poll(pf, (nfds_t)m, (int)(left / 1000000) + 1);
        if (w < 0 && errno != EINTR) {
            DWCP_SET(s->stats.last_errno, errno);
            rc = DWCP_E_SYSCALL;
            break;
        }
    }
    free(pf);
    return rc;
}

/* ---------------------------------------------------------------- sender */

static uint16_t st_get(const xfer *x, uint64_t c)
{
    return c < x->st_cap ? x->st[c] : 0;
}

static int st_reserve(xfer *x, uint64_t c)
{
    if (c < x->st_cap)
        return 0;
    uint64_t cap = x->st_cap ? x->st_cap : 4096;
    while (cap <= c)
        cap *= 2;
    if (cap > x->K)
        cap = x->K;
    uint16_t *p = realloc(x->st, (size_t)cap * sizeof *p);
    if (!p)
        return DWCP_E_NOMEM;
    memset(p + x->st_cap, 0, (size_t)(cap - x->st_cap) * sizeof *p);
    x->st = p;
    x->st_cap = cap;
    return 0;
}

static void rq_push(xfer *x, uint64_t c, int front)
{
    if (x->rq_n == x->rq_cap) {
        /* Each chunk sits in the ring at most once while QUEUED, so it stays small; grow it by
         * doubling and unwrap the old contents to the front. */
        uint64_t cap = x->rq_cap ? x->rq_cap * 2 : 256;
        uint64_t *p = malloc((size_t)cap * sizeof *p);
        if (!p) {
            x->proto_err = DWCP_E_NOMEM;
            return;
        }
        for (uint64_t i = 0; i < x->rq_n; i++)
            p[i] = x->rq[(x->rq_head + i) % x->rq_cap];
        free(x->rq);
        x->rq = p;
        x->rq_cap = cap;
        x->rq_head = 0;
    }
    if (front) {
        x->rq_head = (x->rq_head + x->rq_cap - 1) % x->rq_cap;
        x->rq[x->rq_head] = c;
    } else {
        x->rq[(x->rq_head + x->rq_n) % x->rq_cap] = c;
    }
    x->rq_n++;
}

static uint64_t chunk_len(const xfer *x, uint64_t c)
{
    uint64_t off = c * x->chunk;
    uint64_t rest = x->length - off;
    return rest < x->chunk ? rest : x->chunk;
}

static uint8_t *chunk_ptr(const xfer *x, uint64_t c)
{
    uint64_t off = c * x->chunk;
    return x->buf + (x->wrap ? off % x->buf_len : off);
}

static int truncate_now(xfer *x)
{
    x->truncated = 1;
    x->Keff = x->next;
    uint64_t tl = x->next * x->chunk;
    x->trunc_len = tl < x->length ? tl : x->length;
    DWCP_SET(x->s->stats.truncated_at, x->trunc_len);
    for (int i = 0; i < x->s->n; i++) {
        stream *t = &x->s->st[i];
        if (is_alive(t) && ctl_push(t, DWCP_T_TRUNCATE, x->o->transfer_id, x->trunc_len) < 0)
            return DWCP_E_NOMEM;
    }
    x->again = 1;
    return 0;
}

static uint64_t chunk_checksum(xfer *x, const uint8_t *p, size_t len)
{
    if (!x->o->csum_flags)
        return 0;
    if (x->csum_cache && len == x->chunk) {
        /* Wrap mode sends the same buffer slots again and again; the caller may not modify the
         * buffer during the call, so a slot's checksum is computed once. */
        uint64_t slot = (uint64_t)(p - x->buf) / x->chunk;
        if (!x->csum_valid[slot]) {
            x->csum_cache[slot] = dwcp_payload_checksum(x->o->csum_flags, p, len);
            x->csum_valid[slot] = 1;
        }
        return x->csum_cache[slot];
    }
    return dwcp_payload_checksum(x->o->csum_flags, p, len);
}

static void tx_setup(xfer *x, stream *t, uint64_t c)
{
    x->st[c] = (uint16_t)(t->idx + 1);
    uint8_t *p = chunk_ptr(x, c);
    size_t len = (size_t)chunk_len(x, c);
    dwcp_frame f = {
        .version = DWCP_VERSION,
        .type = DWCP_T_DATA,
        .flags = (uint16_t)(x->o->csum_flags | x->o->frame_flags),
        .stream = (uint16_t)t->idx,
        .length = (uint32_t)len,
        .transfer_id = x->o->transfer_id,
        .offset = c * x->chunk,
        .checksum = chunk_checksum(x, p, len),
    };
    dwcp_frame_encode(&f, t->tx_hdr);
    t->tx_active = 1;
    t->tx_chunk = c;
    t->tx_pay = p;
    t->tx_pay_len = len;
    t->tx_sent = 0;
}

/* Pull the next chunk for stream t: re-sends first (NACKed or orphaned by a dead stream), then new
 * chunks until the deadline. Returns 1 if t now has a frame to send. */
static int tx_pull(xfer *x, stream *t)
{
    while (x->rq_n) {
        uint64_t c = x->rq[x->rq_head];
        x->rq_head = (x->rq_head + 1) % x->rq_cap;
        x->rq_n--;
        if (x->st[c] == ST_QUEUED) {
            DWCP_ADD(x->s->stats.chunks_resent, 1);
            tx_setup(x, t, c);
            return 1;
        }
    }
    if (x->truncated || x->next >= x->K)
        return 0;
    if (x->deadline && now_ns() >= x->deadline) {
        if (truncate_now(x) < 0)
            return -1;
        return 0;
    }
    if (st_reserve(x, x->next) < 0) {
        x->proto_err = DWCP_E_NOMEM;
        return -1;
    }
    tx_setup(x, t, x->next++);
    return 1;
}

static int tx_has_work(const xfer *x, const stream *t)
{
    return t->tx_active || ctl_pending(t) || x->rq_n || (!x->truncated && x->next < x->K);
}

/* One send step for t's current frame. Returns -1 if the stream died, 0 if it would block, 1 to go
 * on. */
static int tx_step(xfer *x, stream *t)
{
    dwcp_streams *s = x->s;
    ssize_t n;
    size_t want;
    int zc = 0;
    if (t->tx_carry) {
        want = t->tx_carry_len - t->tx_sent;
        n = send(t->fd, t->tx_carry + t->tx_sent, want, MSG_NOSIGNAL | MSG_DONTWAIT);
    } else if (x->use_zc && !s->zc_fallback && t->tx_pay_len >= x->zc_min) {
        if (t->tx_sent < DWCP_HEADER_BYTES) {
            want = DWCP_HEADER_BYTES - t->tx_sent;
            n = send(t->fd, t->tx_hdr + t->tx_sent, want, MSG_NOSIGNAL | MSG_DONTWAIT | MSG_MORE);
        } else {
            size_t po = t->tx_sent - DWCP_HEADER_BYTES;
            want = t->tx_pay_len - po;
            n = send(t->fd, t->tx_pay + po, want, MSG_NOSIGNAL | MSG_DONTWAIT | MSG_ZEROCOPY);
            zc = 1;
            if (n < 0 && errno == ENOBUFS) {
                /* Too many un-reaped notifications (optmem_max): reap and send this one copied. */
                zc_reap(s, t);
                zc = 0;
                n = send(t->fd, t->tx_pay + po, want, MSG_NOSIGNAL | MSG_DONTWAIT);
            }
        }
    } else {
        struct iovec iov[2];
        int niov = 0;
        if (t->tx_sent < DWCP_HEADER_BYTES) {
            iov[niov].iov_base = t->tx_hdr + t->tx_sent;
            iov[niov].iov_len = DWCP_HEADER_BYTES - t->tx_sent;
            niov++;
            iov[niov].iov_base = (void *)t->tx_pay;
            iov[niov].iov_len = t->tx_pay_len;
        } else {
            size_t po = t->tx_sent - DWCP_HEADER_BYTES;
            iov[niov].iov_base = (void *)(t->tx_pay + po);
            iov[niov].iov_len = t->tx_pay_len - po;
        }
        niov++;
        want = 0;
        for (int i = 0; i < niov; i++)
            want += iov[i].iov_len;
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)niov;
        n = sendmsg(t->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    if (n < 0) {
        if (errno == EINTR)
            return 1;
        if (would_block(errno)) {
            t->writable = 0;
            return 0;
        }
        stream_die(x, t, errno);
        return -1;
    }
    if (zc && n > 0) {
        t->zc_issued++;
        DBG_ADD(g_zc_pending, 1);
        DWCP_ADD(s->stats.zc_sends, 1);
    }
    t->tx_sent += (size_t)n;
    progress(x, s, (size_t)n);
    size_t total = t->tx_carry ? t->tx_carry_len : DWCP_HEADER_BYTES + t->tx_pay_len;
    if (t->tx_sent == total)
        tx_clear(t);
    if ((size_t)n < want) {
        t->writable = 0;
        return 0;
    }
    return 1;
}

static void tx_write(xfer *x, stream *t)
{
    int frames = 0;
    while (is_alive(t) && t->writable) {
        if (!t->tx_active) {
            if (ctl_pending(t)) {
                if (flush_ctl(x, t) < 0 || ctl_pending(t))
                    return;
                continue;
            }
            if (frames >= TX_BUDGET_FRAMES) {
                x->again = 1;
                return;
            }
            int p = tx_pull(x, t);
            if (p <= 0)
                return;
            frames++;
        }
        if (tx_step(x, t) <= 0)
            return;
    }
}

static int tx_frame(xfer *x, stream *t, const uint8_t *b)
{
    dwcp_frame f;
    dwcp_streams *s = x->s;
    int rc = dwcp_frame_decode(b, DWCP_MAX_CHUNK_BYTES, &f);
    if (rc)
        return rc;
    if ((f.type == DWCP_T_DATA || f.type == DWCP_T_TRUNCATE) && s->have_recv_id &&
        f.transfer_id <= s->last_recv_id) {
        /* A late re-send of a transfer this set received earlier: drain and drop it. */
        if (f.type == DWCP_T_TRUNCATE && f.length)
            return DWCP_E_LENGTH;
        if (f.length) {
            t->rx_mode = RX_DISCARD;
            t->rx_len = f.length;
            t->rx_got = 0;
            t->rx_dup_ack = 0;
            t->rx_current = 0;
        }
        return 0;
    }
    if (f.type == DWCP_T_DATA || f.type == DWCP_T_TRUNCATE)
        return 1; /* the peer's next transfer towards us: keep it for that receive call */
    if (f.type != DWCP_T_ACK && f.type != DWCP_T_NACK && f.type != DWCP_T_DONE)
        return DWCP_E_TYPE;
    if (f.length)
        return DWCP_E_LENGTH;
    if (f.stream != t->idx)
        return DWCP_E_STREAM;
    if (f.transfer_id < x->o->transfer_id)
        return 0; /* late ACK/DONE of an earlier transfer */
    if (f.transfer_id > x->o->transfer_id)
        return DWCP_E_PEER;
    if (f.type == DWCP_T_DONE) {
        if (!x->got_done) {
            /* DONE vouches for every chunk, including those whose ACK is still in flight. */
            uint64_t len = x->truncated ? x->trunc_len : x->length;
            DWCP_ADD(x->s->stats.chunks, x->Keff - x->ndone);
            DWCP_ADD(x->s->stats.bytes_payload, len - x->done_bytes);
            x->got_done = 1;
        }
        return 0;
    }
    if (x->got_done)
        return 0;
    if (f.offset % x->chunk || f.offset >= x->length)
        return DWCP_E_RANGE;
    uint64_t c = f.offset / x->chunk;
    uint16_t v = st_get(x, c);
    if (v == 0)
        return DWCP_E_PEER; /* acknowledges a chunk never sent */
    if (v == ST_DONE)
        return 0;
    if (f.type == DWCP_T_ACK) {
        x->st[c] = ST_DONE;
        x->ndone++;
        x->done_bytes += chunk_len(x, c);
        DWCP_ADD(x->s->stats.chunks, 1);
        DWCP_ADD(x->s->stats.bytes_payload, chunk_len(x, c));
    } else if (v != ST_QUEUED) {
        x->st[c] = ST_QUEUED;
        rq_push(x, c, 1);
        x->again = 1;
    }
    return 0;
}

static void tx_read(xfer *x, stream *t)
{
    uint8_t b[ACK_BATCH * DWCP_HEADER_BYTES];
    if (t->rx_parked)
        return;
    while (is_alive(t) && t->readable) {
        if (t->rx_mode != RX_HDR && t->rx_len - t->rx_got >= sizeof b) {
            /* Draining a stale payload: read it in big pieces, not ACK-batch-sized ones. */
            uint64_t rem = t->rx_len - t->rx_got;
            size_t want = rem < SCRATCH_BYTES ? (size_t)rem : SCRATCH_BYTES;
            ssize_t n = recv(t->fd, x->s->scratch, want, MSG_DONTWAIT);
            int outcome = recv_result(x, t, n);
            if (outcome == RECV_RETRY)
                continue;
            if (outcome == RECV_STOP)
                return;
            progress(x, x->s, (size_t)n);
            t->rx_got += (uint64_t)n;
            if (t->rx_got == t->rx_len)
                t->rx_mode = RX_HDR;
            if ((size_t)n < want && !t->hup)
                t->readable = 0;
            continue;
        }
        size_t have = t->rx_mode == RX_HDR ? t->rx_hdr_got : 0;
        memcpy(b, t->rx_hdr, have);
        size_t want = sizeof b - have;
        /* Peek, then consume only what was processed: once its receive call is complete the peer
         * may start a transfer towards us on the same streams, and that DATA header and payload
         * must stay in the socket for our next receive call. ACK batches are few (one per several
         * chunks), so the second recv is cheap. */
        ssize_t n = recv(t->fd, b + have, want, MSG_DONTWAIT | MSG_PEEK);
        int outcome = recv_result(x, t, n);
        if (outcome == RECV_RETRY)
            continue;
        if (outcome == RECV_STOP)
            return;
        size_t old = have;
        have += (size_t)n;
        size_t off = 0;
        int parked = 0, err = 0;
        while (off < have) {
            if (t->rx_mode != RX_HDR) {
                uint64_t rem = t->rx_len - t->rx_got;
                size_t take = rem < have - off ? (size_t)rem : have - off;
                t->rx_got += take;
                off += take;
                if (t->rx_got == t->rx_len)
                    t->rx_mode = RX_HDR;
                continue;
            }
            if (have - off < DWCP_HEADER_BYTES)
                break;
            int rc = tx_frame(x, t, b + off);
            off += DWCP_HEADER_BYTES;
            if (rc < 0) {
                err = rc;
                break;
            }
            if (rc == 1) {
                parked = 1;
                break;
            }
        }
        size_t used = parked || err ? off : have;
        if (parked) {
            memcpy(t->rx_hdr, b + off - DWCP_HEADER_BYTES, DWCP_HEADER_BYTES);
            t->rx_hdr_got = DWCP_HEADER_BYTES;
            t->rx_parked = 1;
        } else if (!err) {
            t->rx_hdr_got = have - off;
            memcpy(t->rx_hdr, b + off, t->rx_hdr_got);
        }
        size_t consume = used - old;
        while (consume) {
            ssize_t r = recv(t->fd, x->s->scratch, consume, MSG_DONTWAIT);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                stream_die(x, t, r < 0 ? errno : 0);
                return;
            }
            progress(x, x->s, (size_t)r);
            consume -= (size_t)r;
        }
        if (err) {
            stream_die(x, t, err);
            return;
        }
        if (parked)
            return;
        if ((size_t)n < want && !t->hup)
            t->readable = 0;
    }
}

/* ---------------------------------------------------------------- receiver */

static int drop_take(xfer *x, uint64_t c)
{
    for (size_t i = 0; i < x->ndrops; i++) {
        if (x->drops[i].chunk == c) {
            int via = x->drops[i].via;
            x->drops[i] = x->drops[--x->ndrops];
            return via;
        }
    }
    return -1;
}

static int drop_note_add(xfer *x, uint64_t c, int via)
{
    for (size_t i = 0; i < x->ndrops; i++) {
        if (x->drops[i].chunk == c) {
            x->drops[i].via = via;
            return 0;
        }
    }
    if (x->ndrops == x->drops_cap) {
        size_t cap = x->drops_cap ? x->drops_cap * 2 : 16;
        drop_note *p = realloc(x->drops, cap * sizeof *p);
        if (!p)
            return DWCP_E_NOMEM;
        x->drops = p;
        x->drops_cap = cap;
    }
    x->drops[x->ndrops].chunk = c;
    x->drops[x->ndrops].via = via;
    x->ndrops++;
    return 0;
}

static int rx_header(xfer *x, stream *t)
{
    dwcp_frame *f = &t->rx_f;
    int rc = dwcp_frame_decode(t->rx_hdr, DWCP_MAX_CHUNK_BYTES, f);
    if (rc)
        return rc;
    if ((f->type == DWCP_T_ACK || f->type == DWCP_T_NACK || f->type == DWCP_T_DONE) &&
        x->s->have_send_id && f->transfer_id <= x->s->last_send_id) {
        /* ACK/DONE of a transfer this set sent earlier, arriving after that call returned. */
        t->rx_hdr_got = 0;
        return f->length ? DWCP_E_LENGTH : 0;
    }
    if (f->type != DWCP_T_DATA && f->type != DWCP_T_TRUNCATE)
        return DWCP_E_TYPE;
    if (f->stream != t->idx)
        return DWCP_E_STREAM;
    if (f->type == DWCP_T_TRUNCATE && f->length != 0)
        return DWCP_E_LENGTH;
    if (f->transfer_id > x->o->transfer_id) {
        /* The sender starts its next transfer as soon as it has every ACK, while this side may still
         * be flushing DONE: keep the header for the next call and stop reading this stream. */
        t->rx_parked = 1;
        return 0;
    }
    t->rx_hdr_got = 0;
    if (f->transfer_id < x->o->transfer_id) {
        /* A frame of an earlier transfer (a re-send that lost the race): drain its payload. */
        if (f->length) {
            t->rx_mode = RX_DISCARD;
            t->rx_len = f->length;
            t->rx_got = 0;
            t->rx_dup_ack = 0;
            t->rx_current = 0;
        }
        return 0;
    }
    uint64_t limit = x->truncated ? x->trunc_len : x->length;
    if (f->type == DWCP_T_TRUNCATE) {
        uint64_t tl = f->offset;
        if (tl > x->length || (tl % x->chunk && tl != x->length))
            return DWCP_E_RANGE;
        uint64_t keff = tl / x->chunk + (tl % x->chunk != 0);
        if (x->truncated)
            return tl == x->trunc_len ? 0 : DWCP_E_PEER;
        if (x->touched > keff)
            return DWCP_E_RANGE; /* would cut off chunks the sender already started */
        x->truncated = 1;
        x->trunc_len = tl;
        x->Keff = keff;
        DWCP_SET(x->s->stats.truncated_at, tl);
        return 0;
    }
    if ((f->flags & (DWCP_FLAG_CSUM_CRC32C | DWCP_FLAG_CSUM_XXH3)) != x->o->csum_flags)
        return DWCP_E_FLAGS;
    if (f->offset % x->chunk || f->offset >= limit)
        return DWCP_E_RANGE;
    uint64_t c = f->offset / x->chunk;
    if (f->length != chunk_len(x, c))
        return DWCP_E_LENGTH;
    t->rx_chunk = c;
    t->rx_len = f->length;
    t->rx_got = 0;
    t->rx_current = 1;
    uint16_t v = st_get(x, c);
    if (v == 0) {
        if (st_reserve(x, c) < 0)
            return DWCP_E_NOMEM;
        x->st[c] = (uint16_t)(t->idx + 1);
        if (c + 1 > x->touched)
            x->touched = c + 1;
        t->rx_mode = RX_DEST;
        t->rx_dst = chunk_ptr(x, c);
    } else {
        /* Verified already, or being written by another live stream: never let a duplicate touch
         * the destination. */
        t->rx_mode = RX_DISCARD;
        t->rx_dup_ack = v == ST_DONE;
        if (v != ST_DONE && drop_note_add(x, c, t->idx) < 0)
            return DWCP_E_NOMEM;
    }
    return 0;
}

static int rx_payload_done(xfer *x, stream *t)
{
    dwcp_streams *s = x->s;
    uint64_t tid = x->o->transfer_id;
    int mode = t->rx_mode;
    t->rx_mode = RX_HDR;
    if (mode == RX_DEST) {
        uint64_t c = t->rx_chunk;
        if (x->ndrops)
            drop_take(x, c); /* settled by the ACK or NACK below */
        int ok = !x->o->csum_flags ||
                 dwcp_payload_checksum(x->o->csum_flags, t->rx_dst, (size_t)t->rx_len) == t->rx_f.checksum;
        if (ok) {
            x->st[c] = ST_DONE;
            x->ndone++;
            DWCP_ADD(s->stats.chunks, 1);
            DWCP_ADD(s->stats.bytes_payload, t->rx_len);
            return ctl_push(t, DWCP_T_ACK, tid, t->rx_f.offset);
        }
        x->st[c] = 0;
        DWCP_ADD(s->stats.checksum_errors, 1);
        return ctl_push(t, DWCP_T_NACK, tid, t->rx_f.offset);
    }
    if (t->rx_current) {
        DWCP_ADD(s->stats.chunks_duplicate, 1);
        if (t->rx_dup_ack)
            return ctl_push(t, DWCP_T_ACK, tid, t->rx_f.offset);
    }
    return 0;
}

static void rx_read(xfer *x, stream *t)
{
    dwcp_streams *s = x->s;
    size_t budget = RX_BUDGET_BYTES;
    if (t->rx_parked)
        return;
    while (is_alive(t) && t->readable) {
        if (x->done_queued)
            return; /* complete: what follows belongs to later calls */
        if (budget == 0) {
            x->again = 1;
            return;
        }
        if (t->rx_mode == RX_HDR && t->rx_hdr_got == DWCP_HEADER_BYTES) {
            int rc = rx_header(x, t);
            if (rc < 0) {
                stream_die(x, t, rc);
                return;
            }
            if (t->rx_parked)
                return;
            continue;
        }
        struct iovec iov[2];
        int niov = 1;
        if (t->rx_mode == RX_HDR) {
            iov[0].iov_base = t->rx_hdr + t->rx_hdr_got;
            iov[0].iov_len = DWCP_HEADER_BYTES - t->rx_hdr_got;
        } else {
            uint64_t rem = t->rx_len - t->rx_got;
            if (t->rx_mode == RX_DEST) {
                iov[0].iov_base = t->rx_dst + t->rx_got;
                iov[0].iov_len = (size_t)rem;
            } else {
                iov[0].iov_base = s->scratch;
                iov[0].iov_len = rem < SCRATCH_BYTES ? (size_t)rem : SCRATCH_BYTES;
            }
            if (iov[0].iov_len == rem) {
                iov[1].iov_base = t->rx_hdr;
                iov[1].iov_len = DWCP_HEADER_BYTES;
                niov = 2;
            }
        }
        size_t want = iov[0].iov_len + (niov == 2 ? iov[1].iov_len : 0);
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)niov;
        ssize_t n = recvmsg(t->fd, &msg, MSG_DONTWAIT);
        int outcome = recv_result(x, t, n);
        if (outcome == RECV_RETRY)
            continue;
        if (outcome == RECV_STOP)
            return;
        progress(x, s, (size_t)n);
        budget = (size_t)n >= budget ? 0 : budget - (size_t)n;
        if (t->rx_mode == RX_HDR) {
            t->rx_hdr_got += (size_t)n;
        } else {
            size_t pay = (size_t)n < iov[0].iov_len ? (size_t)n : iov[0].iov_len;
            t->rx_got += pay;
            if (t->rx_got == t->rx_len) {
                t->rx_hdr_got = (size_t)n - pay;
                if (rx_payload_done(x, t) < 0) {
                    x->proto_err = DWCP_E_NOMEM;
                    return;
                }
            }
        }
        if ((size_t)n < want && !t->hup)
            t->readable = 0;
    }
}

/* The tail of a frame this set was sending when its last send call ended goes out before any ACK, or
 * the peer would read the ACK as payload. */
static void rx_flush(xfer *x, stream *t)
{
    while (t->tx_carry && is_alive(t) && t->writable)
        if (tx_step(x, t) <= 0)
            return;
    if (!t->tx_carry && is_alive(t))
        flush_ctl(x, t);
}

/* ---------------------------------------------------------------- driver */

static int xfer_complete(xfer *x)
{
    dwcp_streams *s = x->s;
    if (x->sender) {
        if (x->got_done)
            return 1;
        if (x->ndone < x->Keff)
            return 0;
        for (int i = 0; i < s->n; i++)
            if (is_alive(&s->st[i]) && ctl_pending(&s->st[i]))
                return 0; /* the receiver only learns the truncated length from TRUNCATE */
        return 1;
    }
    if (!x->done_queued) {
        if (x->ndone < x->Keff)
            return 0;
        uint64_t len = x->truncated ? x->trunc_len : x->length;
        for (int i = 0; i < s->n; i++)
            if (is_alive(&s->st[i]) && ctl_push(&s->st[i], DWCP_T_DONE, x->o->transfer_id, len) < 0)
                return -1;
        x->done_queued = 1;
        x->again = 1;
    }
    for (int i = 0; i < s->n; i++)
        if (is_alive(&s->st[i]) && ctl_pending(&s->st[i]))
            return 0;
    return 1;
}

static int run(xfer *x)
{
    dwcp_streams *s = x->s;
    struct epoll_event evs[64];
    for (;;) {
        apply_kills(x);
        if (__atomic_load_n(&s->interrupt, __ATOMIC_ACQUIRE))
            return DWCP_E_CLOSED;
        int c = xfer_complete(x);
        if (c < 0)
            return DWCP_E_NOMEM;
        if (c)
            return DWCP_OK;
        if (x->proto_err == DWCP_E_NOMEM)
            return DWCP_E_NOMEM;
        if (dwcp_streams_alive_count(s) == 0)
            return x->proto_err ? x->proto_err : DWCP_E_ALL_STREAMS;
        int64_t now = now_ns();
        if (now - x->last_progress >= x->timeout_ns)
            return DWCP_E_TIMEOUT;
        int64_t wait_ns = x->last_progress + x->timeout_ns - now;
        if (x->sender && x->deadline && !x->truncated && x->next < x->K) {
            if (now >= x->deadline) {
                if (truncate_now(x) < 0)
                    return DWCP_E_NOMEM;
                wait_ns = 0;
            } else if (x->deadline - now < wait_ns) {
                wait_ns = x->deadline - now;
            }
        }
        int wait_ms = x->again ? 0 : (int)((wait_ns + 999999) / 1000000);
        x->again = 0;
        int nev = epoll_wait(s->ep, evs, 64, wait_ms);
        if (nev < 0) {
            if (errno == EINTR)
                continue;
            DWCP_SET(s->stats.last_errno, errno);
            return DWCP_E_SYSCALL;
        }
        for (int i = 0; i < nev; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == EV_INTERRUPT) {
                uint64_t v;
                ssize_t r = read(s->evfd, &v, sizeof v);
                (void)r;
                continue;
            }
            stream *t = &s->st[id];
            uint32_t e = evs[i].events;
            if (e & EPOLLERR && (t->zc_issued != t->zc_done))
                zc_reap(s, t);
            /* HUP/ERR: let the next recv/send report EOF or the socket error. */
            if (e & (EPOLLHUP | EPOLLRDHUP))
                t->hup = 1;
            if (e & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))
                t->readable = 1;
            if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR))
                t->writable = 1;
        }
        for (int i = 0; i < s->n; i++) {
            stream *t = &s->st[i];
            if (!is_alive(t))
                continue;
            if (x->sender) {
                if (t->readable)
                    tx_read(x, t);
                if (is_alive(t) && t->writable && tx_has_work(x, t))
                    tx_write(x, t);
            } else {
                if (t->readable)
                    rx_read(x, t);
                if (is_alive(t) && t->writable && (t->tx_carry || ctl_pending(t)))
                    rx_flush(x, t);
            }
        }
    }
}

/* Leave every stream framed and independent of the caller's buffer before returning. */
static void finish_call(xfer *x)
{
    dwcp_streams *s = x->s;
    for (int i = 0; i < s->n; i++) {
        stream *t = &s->st[i];
        if (!is_alive(t))
            continue;
        ctl_trim(t);
        if (x->sender && t->tx_active && !t->tx_carry) {
            if (t->tx_sent == 0) {
                tx_clear(t);
            } else {
                /* A frame cut off mid-way (completion via DONE, error, interrupt): the receiver's
                 * framing needs its remaining bytes, but the caller owns the buffer from now on. */
                size_t total = DWCP_HEADER_BYTES + t->tx_pay_len;
                size_t rem = total - t->tx_sent;
                uint8_t *p = malloc(rem);
                if (!p) {
                    mark_dead(s, t, ENOMEM);
                    continue;
                }
                size_t o = 0;
                if (t->tx_sent < DWCP_HEADER_BYTES) {
                    o = DWCP_HEADER_BYTES - t->tx_sent;
                    memcpy(p, t->tx_hdr + t->tx_sent, o);
                    memcpy(p + o, t->tx_pay, t->tx_pay_len);
                } else {
                    memcpy(p, t->tx_pay + (t->tx_sent - DWCP_HEADER_BYTES), rem);
                }
                t->tx_carry = p;
                t->tx_carry_len = rem;
                t->tx_sent = 0;
                t->tx_pay = NULL;
                DBG_ADD(g_carry_buffers, 1);
            }
        }
        if (!x->sender && t->rx_mode == RX_DEST) {
            /* The rest of this payload must never land in a buffer the caller got back. */
            t->rx_mode = RX_DISCARD;
            t->rx_dup_ack = 0;
            t->rx_current = 0;
        }
    }
}

static int xfer_init(xfer *x, dwcp_streams *s, int sender, const void *buf, uint64_t buf_len,
                     const dwcp_xfer_opts *o)
{
    memset(x, 0, sizeof *x);
    x->s = s;
    x->sender = sender;
    x->o = o;
    if (!o || !o->chunk_bytes || o->chunk_bytes > DWCP_MAX_CHUNK_BYTES)
        return DWCP_E_INVAL;
    if (o->csum_flags & ~(DWCP_FLAG_CSUM_CRC32C | DWCP_FLAG_CSUM_XXH3) ||
        o->csum_flags == (DWCP_FLAG_CSUM_CRC32C | DWCP_FLAG_CSUM_XXH3))
        return DWCP_E_INVAL;
    if (o->frame_flags & ~DWCP_FLAG_COMPRESSED)
        return DWCP_E_INVAL;
    x->buf = (uint8_t *)buf;
    x->buf_len = buf_len;
    x->length = o->length;
    x->chunk = o->chunk_bytes;
    if (x->length > buf_len) {
        if (!buf_len || buf_len % x->chunk)
            return DWCP_E_INVAL;
        x->wrap = 1;
    }
    if (x->length && !buf)
        return DWCP_E_INVAL;
    x->K = x->length / x->chunk + (x->length % x->chunk != 0);
    x->Keff = x->K;
    if (sender && x->K) {
        if (x->wrap && o->csum_flags) {
            uint64_t slots = buf_len / x->chunk;
            x->csum_cache = malloc((size_t)slots * sizeof *x->csum_cache);
            x->csum_valid = calloc((size_t)slots, 1);
            if (!x->csum_cache || !x->csum_valid)
                return DWCP_E_NOMEM;
        }
    }
    x->timeout_ns = (int64_t)(o->timeout_ms > 0 ? o->timeout_ms : 30000) * 1000000;
    x->deadline = sender ? o->deadline_ns : 0;
    x->use_zc = sender && o->zerocopy == DWCP_ZC_ON;
    x->zc_min = o->zc_min_bytes ? o->zc_min_bytes : (32u << 10);
    x->last_progress = now_ns();
    return 0;
}

static void xfer_free(xfer *x)
{
    free(x->st);
    free(x->rq);
    free(x->csum_cache);
    free(x->csum_valid);
    free(x->drops);
}

static void arm_streams(dwcp_streams *s)
{
    /* Readiness edges may have been consumed by an earlier call or never delivered (the set is new):
     * assume ready and let EAGAIN correct it, at the cost of one syscall per stream. */
    for (int i = 0; i < s->n; i++) {
        s->st[i].readable = s->st[i].writable = 1;
        s->st[i].rx_parked = 0;
    }
}

static int enable_zerocopy(dwcp_streams *s)
{
    if (s->zc_sockopt)
        return 1;
    int one = 1;
    for (int i = 0; i < s->n; i++) {
        if (!is_alive(&s->st[i]))
            continue;
        if (setsockopt(s->st[i].fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) < 0)
            return 0;
    }
    s->zc_sockopt = 1;
    return 1;
}

static int transfer(dwcp_streams *s, int sender, const void *buf, uint64_t buf_len,
                    const dwcp_xfer_opts *o, uint64_t *out_len)
{
    if (!s)
        return DWCP_E_INVAL;
    if (__atomic_exchange_n(&s->busy, 1, __ATOMIC_ACQUIRE))
        return DWCP_E_INVAL;
    xfer x;
    int rc = xfer_init(&x, s, sender, buf, buf_len, o);
    if (rc == 0) {
        uint64_t *last = sender ? &s->last_send_id : &s->last_recv_id;
        int *have = sender ? &s->have_send_id : &s->have_recv_id;
        if (*have && o->transfer_id <= *last) {
            rc = DWCP_E_INVAL; /* stale-frame detection relies on ids growing per direction */
        } else {
            *last = o->transfer_id;
            *have = 1;
        }
    }
    if (rc == 0) {
        if (x.use_zc && !s->zc_fallback && !enable_zerocopy(s))
            x.use_zc = 0; /* the kernel refuses SO_ZEROCOPY: plain sends are the only option */
        arm_streams(s);
        x.again = 1; /* the edges may be gone: look at every stream before the first wait */
        rc = run(&x);
        if (rc == DWCP_E_CLOSED)
            __atomic_store_n(&s->interrupt, 0, __ATOMIC_RELEASE);
        finish_call(&x);
        if (x.use_zc || zc_outstanding(s)) {
            int zr = zc_drain(s, rc == DWCP_OK ? (int)(x.timeout_ns / 1000000) : 1000);
            if (rc == DWCP_OK && zr)
                rc = zr;
        }
        if (rc == DWCP_OK && out_len)
            *out_len = x.truncated ? x.trunc_len : x.length;
    }
    xfer_free(&x);
    __atomic_store_n(&s->busy, 0, __ATOMIC_RELEASE);
    return rc;
}

int dwcp_send_transfer(dwcp_streams *s, const void *buf, uint64_t buf_len, const dwcp_xfer_opts *opts,
                       uint64_t *sent_length)
{
    return transfer(s, 1, buf, buf_len, opts, sent_length);
}

int dwcp_recv_transfer(dwcp_streams *s, void *buf, uint64_t buf_len, const dwcp_xfer_opts *opts,
                       uint64_t *recv_length)
{
    return transfer(s, 0, buf, buf_len, opts, recv_length);
}

/* ---------------------------------------------------------------- lifecycle */

dwcp_streams *dwcp_streams_new(const int *fds, int n)
{
    if (!fds || n < 1 || n > DWCP_MAX_STREAMS)
        return NULL;
    dwcp_streams *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->n = n;
    s->ep = -1;
    s->evfd = -1;
    s->st = calloc((size_t)n, sizeof *s->st);
    s->scratch = malloc(SCRATCH_BYTES);
    if (!s->st || !s->scratch)
        goto fail;
    s->ep = epoll_create1(EPOLL_CLOEXEC);
    s->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->ep < 0 || s->evfd < 0)
        goto fail;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = EV_INTERRUPT};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->evfd, &ev) < 0)
        goto fail;
    for (int i = 0; i < n; i++) {
        stream *t = &s->st[i];
        t->fd = fds[i];
        t->idx = i;
        if (fds[i] < 0)
            goto fail;
        int fl = fcntl(t->fd, F_GETFL);
        if (fl < 0 || fcntl(t->fd, F_SETFL, fl | O_NONBLOCK) < 0)
            goto fail;
        int one = 1;
        setsockopt(t->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event e = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                .data.u32 = (uint32_t)i};
        if (epoll_ctl(s->ep, EPOLL_CTL_ADD, t->fd, &e) < 0)
            goto fail; /* not pollable, or the same fd twice */
        t->alive = 1;
    }
    DBG_ADD(g_live_sets, 1);
    return s;
fail:
    if (s->ep >= 0)
        close(s->ep);
    if (s->evfd >= 0)
        close(s->evfd);
    free(s->st);
    free(s->scratch);
    free(s);
    return NULL;
}

void dwcp_streams_free(dwcp_streams *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n; i++) {
        stream *t = &s->st[i];
        tx_clear(t);
        free(t->ctl);
        /* Completions still owed (a peer that never read): the pages stay pinned by the kernel,
         * which holds its own references, so this leaks nothing but the count. */
    }
    close(s->ep);
    close(s->evfd);
    free(s->st);
    free(s->scratch);
    free(s);
    DBG_ADD(g_live_sets, -1);
}

int dwcp_streams_count(const dwcp_streams *s)
{
    return s ? s->n : 0;
}

int dwcp_streams_alive(const dwcp_streams *s, int i)
{
    if (!s || i < 0 || i >= s->n)
        return 0;
    return is_alive(&s->st[i]) && !__atomic_load_n(&s->st[i].kill_req, __ATOMIC_RELAXED);
}

int dwcp_streams_alive_count(const dwcp_streams *s)
{
    int c = 0;
    for (int i = 0; s && i < s->n; i++)
        c += dwcp_streams_alive(s, i);
    return c;
}

void dwcp_streams_kill(dwcp_streams *s, int i)
{
    if (!s || i < 0 || i >= s->n)
        return;
    stream *t = &s->st[i];
    if (__atomic_exchange_n(&t->kill_req, 1, __ATOMIC_ACQ_REL))
        return;
    /* The socket is shut down here (thread-safe) so a transfer blocked on it wakes up; its chunks
     * are re-queued by the engine thread, which owns the per-stream state. */
    shutdown(t->fd, SHUT_RDWR);
    __atomic_store_n(&s->kills, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t r = write(s->evfd, &one, sizeof one);
    (void)r;
}

void dwcp_streams_stats(const dwcp_streams *s, dwcp_stats *out)
{
    if (!s || !out)
        return;
    out->bytes_payload = DWCP_GET(s->stats.bytes_payload);
    out->bytes_wire = DWCP_GET(s->stats.bytes_wire);
    out->chunks = DWCP_GET(s->stats.chunks);
    out->chunks_resent = DWCP_GET(s->stats.chunks_resent);
    out->chunks_duplicate = DWCP_GET(s->stats.chunks_duplicate);
    out->checksum_errors = DWCP_GET(s->stats.checksum_errors);
    out->streams_failed = DWCP_GET(s->stats.streams_failed);
    out->zc_sends = DWCP_GET(s->stats.zc_sends);
    out->zc_completions = DWCP_GET(s->stats.zc_completions);
    out->zc_copied = DWCP_GET(s->stats.zc_copied);
    out->zc_fallback = DWCP_GET(s->stats.zc_fallback);
    out->last_errno = DWCP_GET(s->stats.last_errno);
    out->last_failed_stream = DWCP_GET(s->stats.last_failed_stream);
    out->truncated_at = DWCP_GET(s->stats.truncated_at);
}

void dwcp_streams_interrupt(dwcp_streams *s)
{
    if (!s)
        return;
    __atomic_store_n(&s->interrupt, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t r = write(s->evfd, &one, sizeof one);
    (void)r;
}

int dwcp_zerocopy_supported(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    int one = 1;
    int ok = setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) == 0;
    close(fd);
    return ok;
}

int dwcp_debug_counters(dwcp_debug_counts *out)
{
#ifdef DWCP_DEBUG_COUNTERS
    if (!out)
        return DWCP_E_INVAL;
    out->live_stream_sets = __atomic_load_n(&g_live_sets, __ATOMIC_RELAXED);
    out->zc_pending = __atomic_load_n(&g_zc_pending, __ATOMIC_RELAXED);
    out->carry_buffers = __atomic_load_n(&g_carry_buffers, __ATOMIC_RELAXED);
    return 0;
#else
    (void)out;
    return DWCP_E_INVAL;
#endif
}
