/* AMST engine: the links of one session (data streams + control connection) driven by edge-triggered
 * epoll, by the calling thread alone or by a fixed team of I/O threads.
 *
 * Design notes (the why; the protocol itself is docs/protocol.md "Transfers" and "Links"):
 * - Every link keeps its readiness flags across calls (edge-triggered epoll: interest never changes,
 *   so there is no epoll_ctl per chunk). A flag is cleared only by EAGAIN or a short read/write: the
 *   kernel then raises a new edge when that changes. After a FIN no new edge comes, so once an event
 *   carried RDHUP/HUP the link is read until EAGAIN or EOF. Each fd sits in two epoll sets, the
 *   single-thread one and its I/O thread's; an edge seen by one set is a spurious wakeup in the other
 *   (one EAGAIN), never a lost one.
 * - Reads go into a per-link buffer (RBUF_BYTES) and frames are parsed out of it, so many ACKs cost
 *   one recv; a payload is received straight into the destination with the link buffer as a second
 *   iovec for whatever follows it. Bytes of a later call (the next transfer's frames) stay in that
 *   buffer: the link is *parked* on the header and the next call starts from it.
 * - Writes go out as one sendmsg of up to four pieces, in wire order: the tail of a frame an earlier
 *   call cut off (carry), a started DATA frame, the small-frame queue (ACK/NACK/DONE/TRUNCATE and
 *   control frames), a DATA frame not yet started. XFER_BEGIN is queued ahead of a link's first frame
 *   of a transfer, so it shares that frame's sendmsg and no link ever carries a transfer's data before
 *   its announcement: a receiver waiting for the announcement can park a link on data it cannot place
 *   yet without ever blocking the announcement behind it.
 * - Per-chunk state is one uint16 (0 = untouched, 1..257 = in flight on link v-1, QUEUED, DONE) in
 *   pages of 64 Ki entries allocated when first touched: benchmarks announce lengths of millions of
 *   chunks and stop at a deadline. Threads change it with compare-and-swap; the re-send queue, the
 *   next fresh chunk and truncation are under the transfer's mutex (taken once per chunk, never per
 *   syscall).
 * - A receiver hashes each slice of a payload right after the recvmsg that brought it (incremental
 *   XXH3/CRC32C), while the bytes are still in cache, instead of re-reading the whole chunk at its end.
 * - MSG_ZEROCOPY pins every byte of the sendmsg until completion; the header and queued frames live in
 *   link memory that is rewritten for the next chunk, so in zero-copy mode everything before the
 *   payload goes out in its own (copying, MSG_MORE) send and only the payload is sent zero-copy.
 * - Counters are per thread (no shared cache line on the data path) and summed when read. */
#include <errno.h>
#include <fcntl.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "dwcp/aead.h"
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
#define SP_SHIFT 16 /* chunk states per page: 64 Ki */
#define SP_SIZE (1u << SP_SHIFT)
#define MAX_CHUNKS ((uint64_t)1 << 36)
#define EV_WAKE 0xffffffffu
#define RBUF_BYTES (16u << 10)
#define SCRATCH_BYTES (256u << 10)
#define RX_BUDGET_BYTES (4u << 20) /* per link per loop: keeps links fair and ACKs flowing */
#define TX_BUDGET_FRAMES 8
#define ZC_PROBE_RANGES 8 /* completions looked at before deciding the kernel always copies */
#define INBOX_MAX 16
#define ACK_FLUSH_BATCH 16 /* ACKs a receiving link holds back before it writes them */      /* control frames a peer may have outstanding; more is a protocol error */
#define PROGRESS_PUBLISH_NS 1000000
#define CT_SLICE (256u << 10) /* sealed DATA: payload encrypted this much at a time, sent while in cache */

enum { RX_HDR = 0, RX_DEST, RX_DISCARD, RX_CTL };

#ifdef DWCP_DEBUG_COUNTERS
static int64_t g_live_sets, g_zc_pending, g_carry_buffers, g_io_threads;
#define DBG_ADD(var, v) __atomic_fetch_add(&(var), (int64_t)(v), __ATOMIC_RELAXED)
#else
#define DBG_ADD(var, v) ((void)0)
#endif

#define LOAD(p) __atomic_load_n(&(p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n(&(p), (v), __ATOMIC_RELEASE)

typedef struct lnk {
    int fd;
    int idx;       /* 0..n-1 data streams, n the control connection */
    uint16_t wire; /* the stream index its frames carry */
    int is_ctl;
    int owner;     /* I/O thread that drives it in multi-thread calls */
    int alive;     /* atomic */
    int kill_req;  /* atomic: set by dwcp_streams_kill from any thread, applied by the owner */
    int paused;    /* atomic, under s->pause_mu when written: takes no new chunk (dwcp_streams_pause) */
    int readable, writable, hup;
    int parked;    /* the header at the front of rb belongs to a later call */
    uint64_t begun_tid; /* XFER_BEGIN of this transfer is queued on (or went out on) this link */
    int begun;
    uint64_t seen_tid;  /* receiver: the newest transfer whose frames (or XFER_BEGIN) came on this link */

    /* outgoing, in wire order: carry, [started DATA], wq, [DATA not started] */
    uint8_t *carry;
    size_t carry_len, carry_off;
    uint8_t *wq;
    size_t wq_len, wq_off, wq_cap;
    unsigned wq_acks;  /* ACKs queued since the last flush; wq_urgent: something else is queued */
    int wq_urgent;
    int tx_active;
    uint64_t tx_chunk;
    uint8_t tx_hdr[DWCP_HEADER_BYTES];
    const uint8_t *tx_pay;
    size_t tx_pay_len;
    size_t tx_sent; /* bytes of header + payload written */

    /* incoming */
    uint8_t *rb;
    size_t rb_head, rb_tail;
    int rx_mode;
    dwcp_frame rx_f;
    uint8_t *rx_dst;
    uint64_t rx_len, rx_got, rx_chunk;
    int rx_dup_ack;    /* discarded duplicate of a verified chunk: ACK it so the sender can finish */
    int rx_current;    /* the discarded frame belongs to the current transfer (counts as duplicate) */
    int rx_done_reply; /* late chunk of the last transfer received: answer DONE again */
    dwcp_csum rx_sum;
    uint8_t *rx_ctl;   /* payload of a control frame (allocated at first use) */

    /* MSG_ZEROCOPY bookkeeping: the kernel numbers successful zero-copy sendmsg calls per socket */
    uint64_t zc_issued, zc_done;

    /* Sealed frames (dwcp/aead.h). Counters must follow wire order, so a frame is sealed (gets its
     * counter) only when it is handed to sendmsg, and from then on it must go out: wq_sealed bytes
     * of the queue are sealed, and wq_ahead of them go before the sealed DATA frame. */
    int sealed;
    dwcp_seal tx_seal, rx_seal;
    size_t wq_sealed, wq_ahead;
    int tx_sealed;     /* the DATA frame's header is sealed */
    uint8_t *tx_ct;    /* ciphertext of the DATA frame's current slice (the tag after the last) */
    uint64_t ct_lo;    /* payload offset of that slice */
    size_t ct_n;       /* bytes in tx_ct */
    uint8_t rx_tag[DWCP_TAG_BYTES];
    unsigned rx_tag_got;
    int rx_bad;        /* decryption of this frame failed: it cannot verify */
} lnk;

typedef struct worker {
    struct dwcp_streams *s;
    int id;
    int ep;   /* the links this thread owns in multi-thread calls, and evfd */
    int evfd; /* wakes this thread: interrupt, kill, re-queued chunks, the end of the transfer */
    pthread_t th;
    int started;
    uint8_t *scratch;
    dwcp_stats st; /* written by this thread only */
    char pad[64];  /* keep the next worker's counters off this cache line */
} worker;

typedef struct ctlmsg {
    uint8_t type;
    uint64_t tid;
    uint32_t len;
    uint8_t payload[];
} ctlmsg;

struct xfer;

struct dwcp_streams {
    int n;  /* data streams */
    int nl; /* links: n, plus the control connection */
    int T;  /* threads a large transfer uses (worker 0 is the caller) */
    int64_t busy_poll_ns; /* per call, for small transfers and control waits */
    int sealed;           /* every frame is sealed (dwcp_set_opts.cipher) */
    uint64_t auth_failures; /* atomic */
    int sndbuf_set;       /* SO_SNDBUF given to the links (0: the kernel's autotuning) */
    uint32_t path_rtt_us; /* the largest smoothed RTT of the links when they were sized (auto mode) */
    lnk *l;
    worker *w;
    int solo_ep, solo_evfd;
    int interrupt, busy, kills; /* atomic */
    int n_alive, n_alive_data;  /* atomic */
    /* Data streams alive and not paused (atomic reads). Written under pause_mu by pausing and by a
     * data stream's death, so a pause racing with a death never leaves it counting a dead link: a
     * count too high would let paused links stand aside while no stream carries anything. */
    pthread_mutex_t pause_mu;
    int n_carriers;

    pthread_mutex_t mu; /* helper threads: job hand-off */
    pthread_cond_t go_cv, done_cv;
    unsigned gen;
    int active, stop, threads_ok;
    struct xfer *job;

    pthread_mutex_t inbox_mu; /* control frames waiting for dwcp_next_control; the stop frame */
    ctlmsg *inbox[INBOX_MAX];
    int inbox_head, inbox_n;
    uint64_t last_begin_id;
    int have_begin_id;
    ctlmsg *stop_msg;

    uint64_t last_send_id, last_recv_id;
    int have_send_id, have_recv_id;
    uint64_t done_recv_id, done_recv_len; /* the last transfer received completely */
    int have_done_recv;

    int zc_sockopt;
    int zc_fallback;  /* atomic: kernel copies anyway, stop asking for zero-copy for this set's life */
    int zc_confirmed; /* atomic: a real zero-copy completion was seen: never fall back */
    unsigned zc_ranges, zc_copied_ranges; /* atomic */

    uint64_t last_errno, last_failed_stream, truncated_at, streams_failed; /* atomic */
};

/* An ACK or NACK waiting for the thread that can send it (receiver): on link via when that is alive,
 * else on any live link. */
struct pending {
    uint64_t chunk;
    uint8_t type;
    int via;
};

/* A duplicate dropped because another link was writing the chunk (receiver). */
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
    int sink;
    uint64_t length, chunk, K;
    int mt;
    uint16_t **pages;
    uint64_t npages;
    pthread_mutex_t mu;  /* re-send queue, next, truncation, drop notes, pending NACKs */
    pthread_mutex_t pmu; /* page allocation */
    uint64_t next;       /* sender: first never-started chunk (written under mu, read atomically) */
    uint64_t *rq;        /* sender: ring of chunks to send again, front first */
    uint64_t rq_head, rq_n, rq_cap;
    uint64_t Keff;       /* chunks after truncation (atomic reads) */
    int truncated;       /* atomic */
    uint64_t trunc_len;
    int begin_acked;     /* atomic: a frame of this transfer came back, so XFER_BEGIN arrived */
    int begun_links;     /* atomic: live links that carried XFER_BEGIN of this transfer */
    drop_note *drops;
    size_t ndrops, drops_cap; /* ndrops read atomically */
    struct pending *pend;     /* receiver: ACK/NACKs for another thread's links, or that no link of
                                 the thread that needed them could carry */
    size_t npend, pend_cap;   /* npend read atomically */
    uint64_t touched;         /* receiver: 1 + highest chunk started (atomic max) */
    uint64_t ndone, done_bytes; /* atomic: chunks acknowledged (sender) / verified (receiver) */
    int got_done;             /* atomic */
    int state;                /* atomic: 0 running, 1 complete, < 0 failed with that code */
    int flush_rc;             /* under s->mu: a thread could not flush its links at the end */
    int64_t last_progress;    /* atomic */
    int proto_err;            /* atomic: the last protocol violation (reported if no link is left) */
    int64_t timeout_ns, deadline;
    int use_zc;
    uint32_t zc_min;
} xfer;

/* What one thread does in one call. */
typedef struct wctx {
    dwcp_streams *s;
    xfer *x; /* NULL in dwcp_next_control / dwcp_send_control */
    worker *w;
    int ep;
    int all; /* this thread drives every link (single-thread calls) */
    int again;
    int trunc_pushed;
    int64_t published; /* last progress time written to x->last_progress */
    uint64_t sink_next; /* sink mode: chunks this thread has placed */
    int idle_rc;       /* idle calls: an error met while reading (reported if nothing else) */
    int64_t spin_ns;   /* busy-poll budget left in this call (see wait_events) */
} wctx;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int is_alive(const lnk *t)
{
    return __atomic_load_n(&t->alive, __ATOMIC_RELAXED);
}

static int owns(const wctx *c, const lnk *t)
{
    return c->all || t->owner == c->w->id;
}

static void wake(int evfd)
{
    uint64_t one = 1;
    ssize_t r = write(evfd, &one, sizeof one);
    (void)r;
}

/* Wake every thread of a multi-thread call but the caller of this function. */
static void wake_others(wctx *c)
{
    if (!c->x || !c->x->mt)
        return;
    for (int i = 0; i < c->s->T; i++)
        if (i != c->w->id)
            wake(c->s->w[i].evfd);
}

static void progress(wctx *c, size_t n)
{
    DWCP_ADD(c->w->st.bytes_wire, n);
    if (c->x) {
        int64_t t = now_ns();
        if (t - c->published >= PROGRESS_PUBLISH_NS || !c->x->mt) {
            c->published = t;
            __atomic_store_n(&c->x->last_progress, t, __ATOMIC_RELAXED);
        }
    }
}

static void set_state(wctx *c, int state)
{
    int expect = 0;
    if (c->x && __atomic_compare_exchange_n(&c->x->state, &expect, state, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE))
        wake_others(c);
}

static int state_of(const xfer *x)
{
    return __atomic_load_n(&x->state, __ATOMIC_ACQUIRE);
}

/* ---------------------------------------------------------------- chunk states */

static uint16_t st_get(const xfer *x, uint64_t c)
{
    if (c >= x->K)
        return 0;
    uint16_t *page = __atomic_load_n(&x->pages[c >> SP_SHIFT], __ATOMIC_ACQUIRE);
    return page ? __atomic_load_n(&page[c & (SP_SIZE - 1)], __ATOMIC_ACQUIRE) : 0;
}

/* The state slot of chunk c (< K), allocating its page if needed; NULL when out of memory. */
static uint16_t *st_ref(xfer *x, uint64_t c)
{
    uint16_t **pp = &x->pages[c >> SP_SHIFT];
    uint16_t *page = __atomic_load_n(pp, __ATOMIC_ACQUIRE);
    if (!page) {
        pthread_mutex_lock(&x->pmu);
        page = *pp;
        if (!page) {
            uint64_t first = c & ~(uint64_t)(SP_SIZE - 1);
            uint64_t cnt = x->K - first < SP_SIZE ? x->K - first : SP_SIZE;
            page = calloc((size_t)cnt, sizeof *page);
            if (page)
                __atomic_store_n(pp, page, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&x->pmu);
    }
    return page ? &page[c & (SP_SIZE - 1)] : NULL;
}

static int st_cas(uint16_t *slot, uint16_t from, uint16_t to)
{
    return __atomic_compare_exchange_n(slot, &from, to, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
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

/* Sink mode: this thread's next slot, round-robin within its own share of the buffer. */
static uint8_t *sink_ptr(wctx *c)
{
    const xfer *x = c->x;
    uint64_t slots = x->buf_len / x->chunk;
    uint64_t nth = x->mt ? (uint64_t)c->s->T : 1;
    uint64_t first, count;
    if (slots >= nth) {
        count = slots / nth;
        first = (uint64_t)c->w->id * count;
    } else {
        count = 1;
        first = (uint64_t)c->w->id % slots;
    }
    return x->buf + (first + c->sink_next++ % count) * x->chunk;
}

/* ---------------------------------------------------------------- the small-frame queue */

static int wq_reserve(lnk *t, size_t more)
{
    if (t->wq_off && t->wq_off == t->wq_len)
        t->wq_off = t->wq_len = t->wq_sealed = 0;
    if (t->wq_len + more <= t->wq_cap)
        return 0;
    if (t->wq_off) { /* no iovec points into the queue between syscalls: compact it */
        memmove(t->wq, t->wq + t->wq_off, t->wq_len - t->wq_off);
        t->wq_len -= t->wq_off;
        t->wq_sealed -= t->wq_off; /* sent bytes were sealed */
        t->wq_off = 0;
        if (t->wq_len + more <= t->wq_cap)
            return 0;
    }
    size_t cap = t->wq_cap ? t->wq_cap : 64 * DWCP_HEADER_BYTES;
    while (cap < t->wq_len + more)
        cap *= 2;
    uint8_t *p = realloc(t->wq, cap);
    if (!p)
        return DWCP_E_NOMEM;
    t->wq = p;
    t->wq_cap = cap;
    return 0;
}

static int wq_pending(const lnk *t)
{
    return t->wq_off < t->wq_len;
}

/* Queue a frame: header-only (ACK/NACK/DONE/TRUNCATE: flags and checksum 0) or a control frame whose
 * payload is CRC32C-checksummed. */
static int wq_frame(lnk *t, uint8_t type, uint64_t tid, uint64_t offset, const uint8_t *payload,
                    uint32_t len)
{
    size_t tag = t->sealed ? DWCP_TAG_BYTES : 0;
    if (wq_reserve(t, DWCP_HEADER_BYTES + len + tag) < 0)
        return DWCP_E_NOMEM;
    dwcp_frame f = {.version = DWCP_VERSION, .type = type, .stream = t->wire, .length = len,
                    .transfer_id = tid, .offset = offset};
    if (t->sealed) {
        /* Plaintext until wq_seal gives it its counter; the tag's room is reserved now. */
        f.flags = DWCP_FLAG_SEALED;
        dwcp_frame_encode(&f, t->wq + t->wq_len);
        if (len)
            memcpy(t->wq + t->wq_len + DWCP_HEADER_BYTES, payload, len);
        t->wq_len += DWCP_HEADER_BYTES + len + tag;
        return 0;
    }
    if (len) {
        f.flags = DWCP_FLAG_CSUM_CRC32C;
        f.checksum = dwcp_crc32c(0, payload, len);
    }
    dwcp_frame_encode(&f, t->wq + t->wq_len);
    if (len)
        memcpy(t->wq + t->wq_len + DWCP_HEADER_BYTES, payload, len);
    t->wq_len += DWCP_HEADER_BYTES + len;
    return 0;
}

/* Drop queued frames that never started; finish only the one already partly on the wire, so the byte
 * stream stays framed but a later call sends no stale ACKs for nothing. */
static void wq_trim(lnk *t)
{
    if (!wq_pending(t)) {
        t->wq_len = t->wq_off = t->wq_sealed = 0;
        t->wq_acks = 0;
        t->wq_urgent = 0;
        return;
    }
    /* Sealed frames already hold their counters: they go out, or the peer would see a gap. */
    size_t keep = t->wq_off > t->wq_sealed ? t->wq_off : t->wq_sealed;
    size_t tag = t->sealed ? DWCP_TAG_BYTES : 0;
    size_t pos = 0;
    while (pos < keep)
        pos += DWCP_HEADER_BYTES + dwcp_ld32(t->wq + pos + 12) + tag;
    t->wq_len = pos;
    if (t->wq_off == t->wq_len)
        t->wq_len = t->wq_off = t->wq_sealed = 0;
    t->wq_acks = 0;
    t->wq_urgent = wq_pending(t); /* the rest of a frame already started must not wait */
}

/* ---------------------------------------------------------------- link death */

static void carry_free(lnk *t)
{
    if (t->carry) {
        free(t->carry);
        t->carry = NULL;
        DBG_ADD(g_carry_buffers, -1);
    }
    t->carry_len = t->carry_off = 0;
}

static void mark_dead(dwcp_streams *s, lnk *t, int err)
{
    if (!is_alive(t))
        return;
    if (!t->is_ctl)
        pthread_mutex_lock(&s->pause_mu);
    __atomic_store_n(&t->alive, 0, __ATOMIC_RELEASE);
    __atomic_fetch_sub(&s->n_alive, 1, __ATOMIC_ACQ_REL);
    if (!t->is_ctl) {
        __atomic_fetch_sub(&s->n_alive_data, 1, __ATOMIC_ACQ_REL);
        if (!__atomic_load_n(&t->paused, __ATOMIC_ACQUIRE))
            __atomic_fetch_sub(&s->n_carriers, 1, __ATOMIC_ACQ_REL);
        pthread_mutex_unlock(&s->pause_mu);
    }
    /* Shut down so the peer learns at once (its reads see EOF) instead of waiting for a timeout. */
    shutdown(t->fd, SHUT_RDWR);
    epoll_ctl(s->solo_ep, EPOLL_CTL_DEL, t->fd, NULL);
    epoll_ctl(s->w[t->owner].ep, EPOLL_CTL_DEL, t->fd, NULL);
    DWCP_ADD(s->streams_failed, 1);
    DWCP_SET(s->last_failed_stream, t->idx);
    if (err > 0)
        DWCP_SET(s->last_errno, err);
    carry_free(t);
    t->wq_len = t->wq_off = t->wq_sealed = t->wq_ahead = 0;
    t->wq_acks = 0;
    t->wq_urgent = 0;
    t->tx_active = 0;
    t->tx_sealed = 0;
    t->tx_sent = 0;
    t->rb_head = t->rb_tail = 0;
    t->rx_mode = RX_HDR;
    t->readable = t->writable = 0;
    t->parked = 0;
}

static void rq_push(xfer *x, uint64_t c, int front);
static int drop_take(xfer *x, uint64_t c);
static int ctl_push(lnk *t, uint8_t type, uint64_t tid, uint64_t offset);

static int pend_add(xfer *x, uint8_t type, uint64_t chunk, int via)
{
    pthread_mutex_lock(&x->mu);
    if (x->npend == x->pend_cap) {
        size_t cap = x->pend_cap ? x->pend_cap * 2 : 16;
        struct pending *p = realloc(x->pend, cap * sizeof *p);
        if (!p) {
            pthread_mutex_unlock(&x->mu);
            return DWCP_E_NOMEM;
        }
        x->pend = p;
        x->pend_cap = cap;
    }
    x->pend[x->npend] = (struct pending){.chunk = chunk, .type = type, .via = via};
    __atomic_store_n(&x->npend, x->npend + 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&x->mu);
    return 0;
}

/* Send an ACK or NACK for chunk c on link via while it lives (the sender holds the chunk as
 * outstanding there), else on any live link; a link another thread drives gets it through that
 * thread (drain_pending). */
static void answer_somewhere(wctx *c, uint8_t type, uint64_t chunk, int via)
{
    dwcp_streams *s = c->s;
    xfer *x = c->x;
    lnk *target = NULL;
    if (via >= 0 && is_alive(&s->l[via])) {
        if (!owns(c, &s->l[via])) {
            if (pend_add(x, type, chunk, via) < 0)
                set_state(c, DWCP_E_NOMEM);
            wake_others(c);
            return;
        }
        target = &s->l[via];
    }
    for (int i = 0; !target && i < s->nl; i++)
        if (is_alive(&s->l[i]) && owns(c, &s->l[i]))
            target = &s->l[i];
    if (target) {
        if (ctl_push(target, type, x->o->transfer_id, chunk * x->chunk) < 0)
            set_state(c, DWCP_E_NOMEM);
        return;
    }
    if (pend_add(x, type, chunk, -1) < 0)
        set_state(c, DWCP_E_NOMEM);
    wake_others(c);
}

/* The NACKs a dying link had not finished writing: the sender still waits on their chunks. */
static size_t unsent_nacks(const lnk *t, uint64_t chunk_bytes, uint64_t *out, size_t cap)
{
    size_t n = 0, pos = 0;
    while (pos + DWCP_HEADER_BYTES <= t->wq_len) {
        size_t end = pos + DWCP_HEADER_BYTES + dwcp_ld32(t->wq + pos + 12);
        if (end > t->wq_off && t->wq[pos + 5] == DWCP_T_NACK && n < cap)
            out[n++] = dwcp_ld64(t->wq + pos + 24) / chunk_bytes;
        pos = end;
    }
    return n;
}

/* A link died: give its chunks back (sender) or forget its half-written chunk (receiver). err > 0 is
 * an errno, err < 0 a DWCP_E_* protocol code, 0 a plain EOF or kill. */
static void link_die(wctx *c, lnk *t, int err)
{
    if (!is_alive(t))
        return;
    dwcp_streams *s = c->s;
    xfer *x = c->x;
    int in_flight = t->rx_mode == RX_DEST;
    uint64_t rx_chunk = t->rx_chunk;
    int had_begin = x && t->begun && t->begun_tid == x->o->transfer_id;
    uint64_t renack[64];
    size_t nrenack = x && !x->sender ? unsent_nacks(t, x->chunk, renack, 64) : 0;
    mark_dead(s, t, err > 0 ? err : 0);
    if (err < 0) {
        if (x)
            __atomic_store_n(&x->proto_err, err, __ATOMIC_RELAXED);
        else
            c->idle_rc = err;
    }
    if (!x)
        return;
    for (size_t i = 0; i < nrenack; i++)
        answer_somewhere(c, DWCP_T_NACK, renack[i], -1);
    uint16_t me = (uint16_t)(t->idx + 1);
    if (x->sender) {
        if (had_begin)
            __atomic_fetch_sub(&x->begun_links, 1, __ATOMIC_ACQ_REL);
        pthread_mutex_lock(&x->mu);
        uint64_t next = x->next;
        for (uint64_t p = 0; p * SP_SIZE < next; p++) {
            uint16_t *page = __atomic_load_n(&x->pages[p], __ATOMIC_ACQUIRE);
            if (!page)
                continue;
            uint64_t end = next - p * SP_SIZE < SP_SIZE ? next - p * SP_SIZE : SP_SIZE;
            for (uint64_t j = 0; j < end; j++)
                if (__atomic_load_n(&page[j], __ATOMIC_RELAXED) == me && st_cas(&page[j], me, ST_QUEUED))
                    rq_push(x, p * SP_SIZE + j, 0);
        }
        pthread_mutex_unlock(&x->mu);
    } else if (in_flight && st_get(x, rx_chunk) == me) {
        uint16_t *slot = st_ref(x, rx_chunk);
        int via = -1;
        pthread_mutex_lock(&x->mu); /* against rx_header noting a dropped copy meanwhile */
        if (slot && st_cas(slot, me, 0))
            via = drop_take(x, rx_chunk);
        pthread_mutex_unlock(&x->mu);
        if (via >= 0) {
            /* A copy of this chunk arrived on another link meanwhile and was dropped; the sender
             * counts that copy as outstanding on a live link and will not resend on its own, so
             * ask for it ("offset = chunk to send again"), preferably where the copy came in. */
            answer_somewhere(c, DWCP_T_NACK, rx_chunk, via);
        }
    }
    c->again = 1;
    wake_others(c);
}

/* Between calls (no engine thread runs): drop the "some kill is pending" flag once every requested
 * kill has been applied, so later calls stop looking.  dwcp_streams_kill may run concurrently on any
 * thread: it stores kill_req and then kills, so the flag is cleared first and the requests read after
 * (both seq_cst): a request this scan misses is stored after it, and its kills=1 lands after our 0. */
static void settle_kills(dwcp_streams *s)
{
    if (!__atomic_load_n(&s->kills, __ATOMIC_SEQ_CST))
        return;
    __atomic_store_n(&s->kills, 0, __ATOMIC_SEQ_CST);
    for (int i = 0; i < s->nl; i++)
        if (is_alive(&s->l[i]) && __atomic_load_n(&s->l[i].kill_req, __ATOMIC_SEQ_CST)) {
            __atomic_store_n(&s->kills, 1, __ATOMIC_SEQ_CST);
            return;
        }
}

static void apply_kills(wctx *c)
{
    dwcp_streams *s = c->s;
    if (!__atomic_load_n(&s->kills, __ATOMIC_ACQUIRE))
        return;
    for (int i = 0; i < s->nl; i++) {
        lnk *t = &s->l[i];
        if (owns(c, t) && is_alive(t) && __atomic_load_n(&t->kill_req, __ATOMIC_ACQUIRE))
            link_die(c, t, 0);
    }
}

/* Any other errno from a socket means the link is gone (reset, broken pipe, ...). */
static int would_block(int e)
{
    return e == EAGAIN || e == EWOULDBLOCK;
}

/* ---------------------------------------------------------------- zero-copy completions */

static void zc_reap(dwcp_streams *s, lnk *t, dwcp_stats *st)
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
            DWCP_ADD(st->zc_completions, cnt);
            int copied = (ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED) != 0;
            if (copied)
                DWCP_ADD(st->zc_copied, cnt);
            if (!LOAD(s->zc_confirmed) && !LOAD(s->zc_fallback)) {
                __atomic_fetch_add(&s->zc_ranges, 1, __ATOMIC_RELAXED);
                if (!copied) {
                    STORE(s->zc_confirmed, 1);
                } else if (__atomic_add_fetch(&s->zc_copied_ranges, 1, __ATOMIC_RELAXED) >= ZC_PROBE_RANGES) {
                    /* The kernel copies every send on this path (loopback, veth, no SG device):
                     * pinning only adds the notification cost, so plain sends are faster. */
                    STORE(s->zc_fallback, 1);
                }
            }
        }
    }
}

static int zc_outstanding(const dwcp_streams *s)
{
    for (int i = 0; i < s->nl; i++)
        if (s->l[i].zc_issued != s->l[i].zc_done)
            return 1;
    return 0;
}

/* The caller may reuse its buffer only after the kernel released every pinned page: wait for the
 * completions (POLLERR is raised while the error queue is non-empty, also on dead links). */
static int zc_drain(dwcp_streams *s, int timeout_ms)
{
    int64_t end = now_ns() + (int64_t)timeout_ms * 1000000;
    struct pollfd *pf = NULL;
    int rc = 0;
    while (zc_outstanding(s)) {
        if (!pf) {
            pf = calloc((size_t)s->nl, sizeof *pf);
            if (!pf)
                return DWCP_E_NOMEM;
        }
        int m = 0;
        for (int i = 0; i < s->nl; i++) {
            lnk *t = &s->l[i];
            if (t->zc_issued != t->zc_done) {
                zc_reap(s, t, &s->w[0].st);
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
            DWCP_SET(s->last_errno, errno);
            rc = DWCP_E_SYSCALL;
            break;
        }
    }
    free(pf);
    return rc;
}

/* ---------------------------------------------------------------- sender */

static void rq_push(xfer *x, uint64_t c, int front)
{
    if (x->rq_n == x->rq_cap) {
        /* Each chunk sits in the ring at most once while QUEUED, so it stays small; grow it by
         * doubling and unwrap the old contents to the front. */
        uint64_t cap = x->rq_cap ? x->rq_cap * 2 : 256;
        uint64_t *p = malloc((size_t)cap * sizeof *p);
        if (!p) {
            __atomic_store_n(&x->proto_err, DWCP_E_NOMEM, __ATOMIC_RELAXED);
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
    __atomic_store_n(&x->rq_n, x->rq_n + 1, __ATOMIC_RELEASE);
}

/* Under x->mu. */
static void truncate_locked(wctx *c)
{
    xfer *x = c->x;
    if (x->truncated)
        return;
    uint64_t tl = x->next * x->chunk;
    x->trunc_len = tl < x->length ? tl : x->length;
    __atomic_store_n(&x->Keff, x->next, __ATOMIC_RELEASE);
    __atomic_store_n(&x->truncated, 1, __ATOMIC_RELEASE);
    DWCP_SET(c->s->truncated_at, x->trunc_len);
    c->again = 1;
    wake_others(c);
}

/* XFER_BEGIN goes ahead of a link's first frame of the transfer (see the file comment). */
static int ensure_begun(wctx *c, lnk *t)
{
    xfer *x = c->x;
    if (!x->o->begin || (t->begun && t->begun_tid == x->o->transfer_id))
        return 0;
    if (wq_frame(t, DWCP_T_XFER_BEGIN, x->o->transfer_id, 0, x->o->begin, x->o->begin_len) < 0)
        return DWCP_E_NOMEM;
    t->begun = 1;
    t->begun_tid = x->o->transfer_id;
    __atomic_fetch_add(&x->begun_links, 1, __ATOMIC_ACQ_REL);
    return 0;
}

static void tx_setup(xfer *x, lnk *t, uint64_t c)
{
    uint8_t *p = chunk_ptr(x, c);
    size_t len = (size_t)chunk_len(x, c);
    dwcp_frame f = {
        .version = DWCP_VERSION,
        .type = DWCP_T_DATA,
        .flags = (uint16_t)(x->o->csum_flags | x->o->frame_flags),
        .stream = t->wire,
        .length = (uint32_t)len,
        .transfer_id = x->o->transfer_id,
        .offset = c * x->chunk,
    };
    if (t->sealed)
        f.flags = (uint16_t)(x->o->frame_flags | DWCP_FLAG_SEALED); /* counter: tx_step_sealed */
    else if (x->o->csum_flags)
        f.checksum = dwcp_payload_checksum(x->o->csum_flags, p, len);
    dwcp_frame_encode(&f, t->tx_hdr);
    t->tx_sealed = 0;
    t->tx_active = 1;
    t->tx_chunk = c;
    t->tx_pay = p;
    t->tx_pay_len = len;
    t->tx_sent = 0;
}

/* Whether t may carry chunks: the control connection only when no data stream is left; a paused
 * stream only when every stream left is paused (pausing is a preference, never a reason to stall). */
static int may_carry(const wctx *c, const lnk *t)
{
    if (t->is_ctl)
        return __atomic_load_n(&c->s->n_alive_data, __ATOMIC_ACQUIRE) == 0;
    return !__atomic_load_n(&t->paused, __ATOMIC_ACQUIRE) ||
           __atomic_load_n(&c->s->n_carriers, __ATOMIC_ACQUIRE) == 0;
}

static int begin_only_needed(const xfer *x)
{
    return x->o->begin && !__atomic_load_n(&x->begin_acked, __ATOMIC_ACQUIRE) &&
           __atomic_load_n(&x->begun_links, __ATOMIC_ACQUIRE) == 0;
}

/* Pull the next chunk for link t: re-sends first (NACKed or orphaned by a dead link), then new
 * chunks until the deadline. Returns 1 if t now has something to send, 0 if not, < 0 on error. */
static int tx_pull(wctx *c, lnk *t)
{
    xfer *x = c->x;
    if (!may_carry(c, t))
        return 0;
    uint16_t me = (uint16_t)(t->idx + 1);
    int have = 0, resent = 0;
    uint64_t chunk = 0;
    pthread_mutex_lock(&x->mu);
    while (x->rq_n) {
        uint64_t q = x->rq[x->rq_head];
        x->rq_head = (x->rq_head + 1) % x->rq_cap;
        __atomic_store_n(&x->rq_n, x->rq_n - 1, __ATOMIC_RELEASE);
        uint16_t *slot = st_ref(x, q);
        if (slot && st_cas(slot, ST_QUEUED, me)) {
            chunk = q;
            have = resent = 1;
            break;
        }
    }
    if (!have && !x->truncated && x->next < x->K) {
        if (x->deadline && now_ns() >= x->deadline) {
            truncate_locked(c);
        } else {
            uint16_t *slot = st_ref(x, x->next);
            if (!slot) {
                pthread_mutex_unlock(&x->mu);
                set_state(c, DWCP_E_NOMEM);
                return -1;
            }
            __atomic_store_n(slot, me, __ATOMIC_RELEASE);
            chunk = x->next;
            __atomic_store_n(&x->next, x->next + 1, __ATOMIC_RELEASE);
            have = 1;
        }
    }
    pthread_mutex_unlock(&x->mu);
    if (have) {
        if (resent)
            DWCP_ADD(c->w->st.chunks_resent, 1);
        if (ensure_begun(c, t) < 0) {
            set_state(c, DWCP_E_NOMEM);
            return -1;
        }
        tx_setup(x, t, chunk);
        return 1;
    }
    if (begin_only_needed(x)) {
        /* Nothing to carry the announcement (an empty transfer, or every chunk settled or in flight
         * on links that died with it): send it alone. */
        if (ensure_begun(c, t) < 0) {
            set_state(c, DWCP_E_NOMEM);
            return -1;
        }
        return 1;
    }
    return 0;
}

static int tx_has_work(const wctx *c, const lnk *t)
{
    if (t->carry || wq_pending(t) || t->tx_active)
        return 1;
    const xfer *x = c->x;
    if (!x || !x->sender || state_of(x) != 0 || !may_carry(c, t))
        return 0;
    return __atomic_load_n(&x->rq_n, __ATOMIC_ACQUIRE) ||
           (!__atomic_load_n(&x->truncated, __ATOMIC_ACQUIRE) &&
            __atomic_load_n(&x->next, __ATOMIC_ACQUIRE) < x->K) ||
           begin_only_needed(x);
}

static void link_read(wctx *c, lnk *t);

/* ---------------------------------------------------------------- sealed sending */

/* Give the header at h (its counter field still 0) its counter, fix its CRC and start its AEAD
 * operation: from here on the frame must reach the wire. */
static uint64_t seal_counter(lnk *t, uint8_t *h, uint64_t len)
{
    uint64_t ctr = dwcp_seal_next(&t->tx_seal, len);
    dwcp_st64(h + 32, ctr);
    dwcp_st32(h + 40, dwcp_crc32c(0, h, 40));
    return ctr;
}

static int seal_header(lnk *t, uint8_t *h, uint64_t len)
{
    return dwcp_seal_begin(&t->tx_seal, seal_counter(t, h, len), h, DWCP_HEADER_BYTES);
}

/* Seal the queued frames not sealed yet, in queue order (payload encrypted in place, tag after it),
 * each at once with the link's second context: the DATA frame may be half-sealed in the first. */
static int wq_seal(lnk *t)
{
    while (t->wq_sealed < t->wq_len) {
        uint8_t *h = t->wq + t->wq_sealed;
        uint32_t len = dwcp_ld32(h + 12);
        uint64_t ctr = seal_counter(t, h, len);
        int rc = dwcp_seal_small(&t->tx_seal, ctr, h, DWCP_HEADER_BYTES, h + DWCP_HEADER_BYTES, len,
                                 h + DWCP_HEADER_BYTES + len);
        if (rc)
            return rc;
        t->wq_sealed += DWCP_HEADER_BYTES + len + DWCP_TAG_BYTES;
    }
    return 0;
}

/* Encrypt the DATA frame's next slice into tx_ct, starting at payload offset lo (the tag follows the
 * last slice). */
static int tx_slice(lnk *t, uint64_t lo)
{
    if (!t->tx_ct && !(t->tx_ct = malloc(CT_SLICE + DWCP_TAG_BYTES)))
        return DWCP_E_NOMEM;
    size_t n = t->tx_pay_len - lo < CT_SLICE ? (size_t)(t->tx_pay_len - lo) : CT_SLICE;
    int rc = n ? dwcp_seal_update(&t->tx_seal, t->tx_ct, t->tx_pay + lo, n) : 0;
    t->ct_lo = lo;
    t->ct_n = n;
    if (!rc && lo + n == t->tx_pay_len) {
        rc = dwcp_seal_finish(&t->tx_seal, t->tx_ct + n);
        t->ct_n += DWCP_TAG_BYTES;
    }
    return rc;
}

static size_t tx_frame_bytes(const lnk *t)
{
    return DWCP_HEADER_BYTES + t->tx_pay_len + (t->sealed ? DWCP_TAG_BYTES : 0);
}

/* After a failed sendmsg on t: 1 to try again (EINTR), 0 if it would block, -1 if the link died (it
 * is read first, for a farewell frame). */
static int send_failed(wctx *c, lnk *t)
{
    if (errno == EINTR)
        return 1;
    if (would_block(errno)) {
        t->writable = 0;
        return 0;
    }
    /* The peer may have said why before it went away (an ABORT ahead of its FIN): what it sent is
     * still queued on our side of the reset connection, so read it before the link goes. */
    int e = errno;
    t->readable = t->hup = 1;
    link_read(c, t);
    link_die(c, t, e);
    return -1;
}

static size_t iov_bytes(const struct iovec *v, int nv)
{
    size_t n = 0;
    for (int i = 0; i < nv; i++)
        n += v[i].iov_len;
    return n;
}

static ssize_t sendv(int fd, struct iovec *v, int nv, int flags)
{
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = v;
    msg.msg_iovlen = (size_t)nv;
    return sendmsg(fd, &msg, flags);
}

/* What each piece of a sendmsg is (tx_step, tx_step_sealed). */
enum { TX_CARRY, TX_DATA, TX_AHEAD /* queued, goes before the sealed DATA frame */, TX_QUEUE };

/* Account n of want bytes written from pieces v of kinds vk. Returns 1 to go on, 0 when the socket
 * took less than offered (its buffer is full: wait for the next edge). */
static int tx_written(lnk *t, const struct iovec *v, const int *vk, int nv, size_t n, size_t want)
{
    size_t rest = n;
    for (int i = 0; i < nv && rest; i++) {
        size_t take = rest < v[i].iov_len ? rest : v[i].iov_len;
        rest -= take;
        if (vk[i] == TX_CARRY) {
            t->carry_off += take;
            if (t->carry_off == t->carry_len)
                carry_free(t);
        } else if (vk[i] == TX_DATA) {
            t->tx_sent += take;
            if (t->tx_sent == tx_frame_bytes(t)) {
                t->tx_active = 0;
                t->tx_sealed = 0;
                t->tx_sent = 0;
                t->wq_ahead = 0;
            }
        } else {
            if (vk[i] == TX_AHEAD)
                t->wq_ahead -= take;
            t->wq_off += take;
            if (t->wq_off == t->wq_len) {
                t->wq_off = t->wq_len = t->wq_sealed = 0;
                t->wq_acks = 0;
                t->wq_urgent = 0;
            }
        }
    }
    if (n < want) {
        t->writable = 0;
        return 0;
    }
    return 1;
}

/* tx_step for sealed links. Wire order: carry, the wq_ahead queued bytes, the DATA frame, the rest of
 * the queue. Everything is sealed right before its first sendmsg, queued frames first, so counters
 * follow that order; no zero-copy (the ciphertext buffer is reused at once). */
static int tx_step_sealed(wctx *c, lnk *t)
{
    if (wq_seal(t) < 0) {
        link_die(c, t, DWCP_E_AUTH);
        return -1;
    }
    if (t->tx_active && !t->tx_sealed) {
        if (seal_header(t, t->tx_hdr, t->tx_pay_len) < 0) {
            link_die(c, t, DWCP_E_AUTH);
            return -1;
        }
        t->tx_sealed = 1;
        t->ct_lo = 0;
        t->ct_n = 0;
        t->wq_ahead = t->wq_len - t->wq_off;
    }
    struct iovec v[5];
    int vk[5], nv = 0;
    if (t->carry) {
        v[nv].iov_base = t->carry + t->carry_off;
        v[nv].iov_len = t->carry_len - t->carry_off;
        vk[nv++] = TX_CARRY;
    }
    size_t ahead = t->tx_active ? t->wq_ahead : 0;
    if (ahead) {
        v[nv].iov_base = t->wq + t->wq_off;
        v[nv].iov_len = ahead;
        vk[nv++] = TX_AHEAD;
    }
    if (t->tx_active) {
        if (t->tx_sent < DWCP_HEADER_BYTES) {
            v[nv].iov_base = t->tx_hdr + t->tx_sent;
            v[nv].iov_len = DWCP_HEADER_BYTES - t->tx_sent;
            vk[nv++] = TX_DATA;
        }
        uint64_t p = t->tx_sent > DWCP_HEADER_BYTES ? t->tx_sent - DWCP_HEADER_BYTES : 0;
        if (p == t->ct_lo + t->ct_n && p < t->tx_pay_len + DWCP_TAG_BYTES) {
            int rc = tx_slice(t, p);
            if (rc == DWCP_E_NOMEM) {
                set_state(c, DWCP_E_NOMEM);
                return -1;
            }
            if (rc < 0) {
                link_die(c, t, rc);
                return -1;
            }
        }
        v[nv].iov_base = t->tx_ct + (p - t->ct_lo);
        v[nv].iov_len = t->ct_lo + t->ct_n - p;
        vk[nv++] = TX_DATA;
    }
    if (t->wq_len - t->wq_off > ahead) {
        v[nv].iov_base = t->wq + t->wq_off + ahead;
        v[nv].iov_len = t->wq_len - t->wq_off - ahead;
        vk[nv++] = TX_QUEUE;
    }
    if (!nv)
        return 0;
    size_t want = iov_bytes(v, nv);
    ssize_t n = sendv(t->fd, v, nv, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0)
        return send_failed(c, t);
    progress(c, (size_t)n);
    return tx_written(t, v, vk, nv, (size_t)n, want);
}

/* One send step of everything t has queued. Returns -1 if the link died, 0 if it would block, 1 to go
 * on. */
static int tx_step(wctx *c, lnk *t)
{
    if (t->sealed)
        return tx_step_sealed(c, t);
    dwcp_streams *s = c->s;
    struct iovec iov[4];
    int kind[4];
    int niov = 0;
    if (t->carry) {
        iov[niov].iov_base = t->carry + t->carry_off;
        iov[niov].iov_len = t->carry_len - t->carry_off;
        kind[niov++] = TX_CARRY;
    }
    int started = t->tx_active && t->tx_sent > 0;
    int data_at = -1;
    if (started) {
        data_at = niov;
        kind[niov++] = TX_DATA;
    }
    if (wq_pending(t)) {
        iov[niov].iov_base = t->wq + t->wq_off;
        iov[niov].iov_len = t->wq_len - t->wq_off;
        kind[niov++] = TX_QUEUE;
    }
    if (t->tx_active && !started) {
        data_at = niov;
        kind[niov++] = TX_DATA;
    }
    /* The data frame is two pieces (header rest, payload rest): expand it in place. */
    struct iovec v[5];
    int vk[5], nv = 0, pay_at = -1;
    for (int i = 0; i < niov; i++) {
        if (i != data_at) {
            v[nv] = iov[i];
            vk[nv++] = kind[i];
            continue;
        }
        if (t->tx_sent < DWCP_HEADER_BYTES) {
            v[nv].iov_base = t->tx_hdr + t->tx_sent;
            v[nv].iov_len = DWCP_HEADER_BYTES - t->tx_sent;
            vk[nv++] = TX_DATA;
            if (t->tx_pay_len) {
                v[nv].iov_base = (void *)t->tx_pay;
                v[nv].iov_len = t->tx_pay_len;
                pay_at = nv;
                vk[nv++] = TX_DATA;
            }
        } else {
            size_t po = t->tx_sent - DWCP_HEADER_BYTES;
            v[nv].iov_base = (void *)(t->tx_pay + po);
            v[nv].iov_len = t->tx_pay_len - po;
            pay_at = nv;
            vk[nv++] = TX_DATA;
        }
    }
    if (!nv)
        return 0;
    int flags = MSG_NOSIGNAL | MSG_DONTWAIT;
    int zc = 0;
    xfer *x = c->x;
    if (pay_at >= 0 && x && x->use_zc && !LOAD(s->zc_fallback) && t->tx_pay_len >= x->zc_min) {
        if (pay_at > 0) {
            nv = pay_at; /* everything before the payload, copied, then the payload alone */
            flags |= MSG_MORE;
        } else {
            nv = 1;
            flags |= MSG_ZEROCOPY;
            zc = 1;
        }
    }
    size_t want = iov_bytes(v, nv);
    ssize_t n = sendv(t->fd, v, nv, flags);
    if (n < 0 && zc && errno == ENOBUFS) {
        /* Too many un-reaped notifications (optmem_max): reap and send this one copied. */
        zc_reap(s, t, &c->w->st);
        zc = 0;
        n = sendv(t->fd, v, nv, flags & ~MSG_ZEROCOPY);
    }
    if (n < 0)
        return send_failed(c, t);
    if (zc && n > 0) {
        t->zc_issued++;
        DBG_ADD(g_zc_pending, 1);
        DWCP_ADD(c->w->st.zc_sends, 1);
    }
    progress(c, (size_t)n);
    return tx_written(t, v, vk, nv, (size_t)n, want);
}

static void link_write(wctx *c, lnk *t)
{
    int frames = 0;
    while (is_alive(t) && t->writable) {
        xfer *x = c->x;
        if (!t->tx_active && x && x->sender && state_of(x) == 0) {
            if (frames >= TX_BUDGET_FRAMES) {
                if (!t->carry && !wq_pending(t)) {
                    c->again = 1;
                    return;
                }
            } else {
                int p = tx_pull(c, t);
                if (p < 0)
                    return;
                frames += p;
            }
        }
        if (!t->carry && !wq_pending(t) && !t->tx_active)
            return;
        if (tx_step(c, t) <= 0)
            return;
    }
}

static int ctl_push(lnk *t, uint8_t type, uint64_t tid, uint64_t offset)
{
    if (type == DWCP_T_ACK)
        t->wq_acks++;
    else
        t->wq_urgent = 1;
    return wq_frame(t, type, tid, offset, NULL, 0);
}

/* Whether a receiving link's queue should go out now. ACKs wait for a batch (or for the thread to run
 * out of work, see flush_idle): each send of them costs a syscall here and, on loopback, the sender's
 * TCP receive path and often a wakeup of the sending thread, while the sender needs them only to free
 * its chunk state and to finish -- it keeps sending meanwhile. Anything else (NACK, DONE, a control
 * frame, the tail of a cut-off frame) goes at once. */
static int rx_wants_write(const lnk *t)
{
    return t->carry || t->wq_urgent || t->wq_acks >= ACK_FLUSH_BATCH;
}

/* An ACK, NACK or DONE on link t while this side sends transfer x. */
static int tx_frame(wctx *c, lnk *t, const dwcp_frame *f)
{
    xfer *x = c->x;
    (void)t;
    if (f->transfer_id < x->o->transfer_id)
        return 0; /* late ACK/DONE of an earlier transfer */
    if (f->transfer_id > x->o->transfer_id)
        return DWCP_E_PEER;
    __atomic_store_n(&x->begin_acked, 1, __ATOMIC_RELEASE);
    if (f->type == DWCP_T_DONE) {
        __atomic_store_n(&x->got_done, 1, __ATOMIC_RELEASE);
        return 0;
    }
    if (__atomic_load_n(&x->got_done, __ATOMIC_ACQUIRE))
        return 0;
    if (f->offset % x->chunk || f->offset >= x->length)
        return DWCP_E_RANGE;
    uint64_t ch = f->offset / x->chunk;
    uint16_t v = st_get(x, ch);
    if (v == 0)
        return DWCP_E_PEER; /* acknowledges a chunk never sent */
    if (v == ST_DONE)
        return 0;
    uint16_t *slot = st_ref(x, ch);
    if (!slot)
        return DWCP_E_NOMEM;
    if (f->type == DWCP_T_ACK) {
        if (__atomic_exchange_n(slot, (uint16_t)ST_DONE, __ATOMIC_ACQ_REL) != ST_DONE) {
            uint64_t len = chunk_len(x, ch);
            __atomic_fetch_add(&x->ndone, 1, __ATOMIC_ACQ_REL);
            __atomic_fetch_add(&x->done_bytes, len, __ATOMIC_RELAXED);
            DWCP_ADD(c->w->st.chunks, 1);
            DWCP_ADD(c->w->st.bytes_payload, len);
        }
    } else if (v != ST_QUEUED && st_cas(slot, v, ST_QUEUED)) {
        pthread_mutex_lock(&x->mu);
        rq_push(x, ch, 1);
        pthread_mutex_unlock(&x->mu);
        c->again = 1;
        wake_others(c);
    }
    return 0;
}

/* ---------------------------------------------------------------- receiver */

/* Under x->mu. */
static int drop_take(xfer *x, uint64_t c)
{
    for (size_t i = 0; i < x->ndrops; i++) {
        if (x->drops[i].chunk == c) {
            int via = x->drops[i].via;
            x->drops[i] = x->drops[x->ndrops - 1];
            __atomic_store_n(&x->ndrops, x->ndrops - 1, __ATOMIC_RELEASE);
            return via;
        }
    }
    return -1;
}

/* Under x->mu. */
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
    __atomic_store_n(&x->ndrops, x->ndrops + 1, __ATOMIC_RELEASE);
    return 0;
}

/* Sealed links: bytes a header at the front of rb needs before it can be looked at (a frame without
 * payload is checked with its tag). The length field is read unvalidated: it only picks 48 or 64. */
static size_t header_need(const lnk *t)
{
    if (t->sealed && dwcp_ld32(t->rb + t->rb_head + 12) == 0)
        return DWCP_HEADER_BYTES + DWCP_TAG_BYTES;
    return DWCP_HEADER_BYTES;
}

/* Sealed links: whether the frame whose header f decoded at h may be taken now: SEALED set, its
 * counter the next one this link may carry, and (no payload) its tag right. Nothing changes, so a
 * parked header is checked again by the next call. */
static int sealed_header_ok(lnk *t, const dwcp_frame *f, const uint8_t *h)
{
    if (!(f->flags & DWCP_FLAG_SEALED))
        return DWCP_E_FLAGS;
    if (!dwcp_seal_acceptable(&t->rx_seal, f->checksum))
        return DWCP_E_AUTH;
    if (f->length == 0 && (dwcp_seal_begin(&t->rx_seal, f->checksum, h, DWCP_HEADER_BYTES) < 0 ||
                           dwcp_seal_verify(&t->rx_seal, h + DWCP_HEADER_BYTES) < 0))
        return DWCP_E_AUTH;
    return 0;
}

/* Take the header at the front of rb. On sealed links its counter is used up here, and a frame with a
 * payload starts its decryption (the payload is opened slice by slice as it arrives). */
static int consume_header(lnk *t)
{
    const uint8_t *h = t->rb + t->rb_head;
    if (!t->sealed) {
        t->rb_head += DWCP_HEADER_BYTES;
        return 0;
    }
    uint64_t ctr = dwcp_ld64(h + 32);
    uint32_t len = dwcp_ld32(h + 12);
    dwcp_seal_accept(&t->rx_seal, ctr);
    t->rx_tag_got = 0;
    t->rx_bad = 0;
    if (len == 0) { /* verified by sealed_header_ok */
        t->rb_head += DWCP_HEADER_BYTES + DWCP_TAG_BYTES;
        return 0;
    }
    int rc = dwcp_seal_begin(&t->rx_seal, ctr, h, DWCP_HEADER_BYTES);
    t->rb_head += DWCP_HEADER_BYTES;
    return rc < 0 ? DWCP_E_AUTH : 0;
}

/* A DATA or TRUNCATE frame of a transfer this set received earlier (a re-send that lost the race):
 * drain it, and if it belongs to the last transfer received answer DONE again: the sender re-sends
 * only when it lost our DONE with the link that carried it. */
static int stale_data(wctx *c, lnk *t, const dwcp_frame *f)
{
    dwcp_streams *s = c->s;
    int reply = s->have_done_recv && f->transfer_id == s->done_recv_id;
    if (f->type == DWCP_T_DATA && f->length) {
        t->rx_f = *f;
        t->rx_mode = RX_DISCARD;
        t->rx_len = f->length;
        t->rx_got = 0;
        t->rx_dup_ack = 0;
        t->rx_current = 0;
        t->rx_done_reply = reply;
        return 0;
    }
    if (reply && ctl_push(t, DWCP_T_DONE, s->done_recv_id, s->done_recv_len) < 0)
        return DWCP_E_NOMEM;
    return 0;
}

/* A DATA or TRUNCATE header on link t while receiving transfer x. Returns 1 when t parks on it. */
static int rx_header(wctx *c, lnk *t, const dwcp_frame *f)
{
    xfer *x = c->x;
    if (f->transfer_id > x->o->transfer_id) {
        /* The sender starts its next transfer as soon as it has every ACK, while this side may still
         * be flushing DONE: keep the header for the next call and stop reading this link. */
        t->parked = 1;
        return 1;
    }
    int crc = consume_header(t);
    if (crc < 0)
        return crc;
    if (f->transfer_id < x->o->transfer_id)
        return stale_data(c, t, f);
    t->seen_tid = f->transfer_id;
    if (f->type == DWCP_T_TRUNCATE) {
        uint64_t tl = f->offset;
        if (tl > x->length || (tl % x->chunk && tl != x->length))
            return DWCP_E_RANGE;
        uint64_t keff = tl / x->chunk + (tl % x->chunk != 0);
        int rc = 0;
        pthread_mutex_lock(&x->mu);
        if (x->truncated) {
            rc = tl == x->trunc_len ? 0 : DWCP_E_PEER;
        } else if (__atomic_load_n(&x->touched, __ATOMIC_ACQUIRE) > keff) {
            rc = DWCP_E_RANGE; /* would cut off chunks the sender already started */
        } else {
            x->trunc_len = tl;
            __atomic_store_n(&x->Keff, keff, __ATOMIC_RELEASE);
            __atomic_store_n(&x->truncated, 1, __ATOMIC_RELEASE);
            DWCP_SET(c->s->truncated_at, tl);
        }
        pthread_mutex_unlock(&x->mu);
        c->again = 1;
        return rc;
    }
    if ((f->flags & (DWCP_FLAG_CSUM_CRC32C | DWCP_FLAG_CSUM_XXH3)) != x->o->csum_flags)
        return DWCP_E_FLAGS;
    uint64_t limit = __atomic_load_n(&x->truncated, __ATOMIC_ACQUIRE) ? x->trunc_len : x->length;
    if (f->offset % x->chunk || f->offset >= limit)
        return DWCP_E_RANGE;
    uint64_t ch = f->offset / x->chunk;
    if (f->length != chunk_len(x, ch))
        return DWCP_E_LENGTH;
    t->rx_f = *f;
    t->rx_chunk = ch;
    t->rx_len = f->length;
    t->rx_got = 0;
    t->rx_current = 1;
    t->rx_done_reply = 0;
    uint16_t *slot = st_ref(x, ch);
    if (!slot)
        return DWCP_E_NOMEM;
    uint16_t me = (uint16_t)(t->idx + 1);
    uint16_t v = 0;
    int mine = __atomic_compare_exchange_n(slot, &v, me, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    if (!mine && v != ST_DONE) {
        /* Another link is writing it. Decide under the mutex that link_die takes to give a dead
         * writer's chunk back: either the writer is gone (take the chunk), or this drop is noted
         * before the writer can die, so its death asks the sender for the chunk again. */
        pthread_mutex_lock(&x->mu);
        v = 0;
        mine = __atomic_compare_exchange_n(slot, &v, me, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        if (!mine && v != ST_DONE) {
            int rc = drop_note_add(x, ch, t->idx);
            if (rc < 0) {
                pthread_mutex_unlock(&x->mu);
                return rc;
            }
        }
        pthread_mutex_unlock(&x->mu);
    }
    if (mine) {
        uint64_t seen = __atomic_load_n(&x->touched, __ATOMIC_RELAXED);
        while (ch + 1 > seen &&
               !__atomic_compare_exchange_n(&x->touched, &seen, ch + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            ;
        t->rx_mode = RX_DEST;
        t->rx_dst = x->sink ? sink_ptr(c) : chunk_ptr(x, ch);
        dwcp_csum_reset(&t->rx_sum, x->o->csum_flags);
        return 0;
    }
    /* Verified already, or being written by another live link: never let a duplicate touch the
     * destination. */
    t->rx_mode = RX_DISCARD;
    t->rx_dup_ack = v == ST_DONE;
    return 0;
}

static int xfer_complete(const xfer *x);

/* ---------------------------------------------------------------- control frames */

static int inbox_push(dwcp_streams *s, const dwcp_frame *f, const uint8_t *payload)
{
    ctlmsg *m = malloc(sizeof *m + f->length);
    if (!m)
        return DWCP_E_NOMEM;
    m->type = f->type;
    m->tid = f->transfer_id;
    m->len = f->length;
    if (f->length)
        memcpy(m->payload, payload, f->length);
    if (s->inbox_n == INBOX_MAX) {
        free(m);
        return DWCP_E_PEER; /* a peer that floods us with control frames */
    }
    s->inbox[(s->inbox_head + s->inbox_n) % INBOX_MAX] = m;
    s->inbox_n++;
    return 0;
}

/* A complete control frame (XFER_BEGIN, ABORT, CLOSE) arrived on link t. */
static int ctl_done(wctx *c, lnk *t, const uint8_t *payload)
{
    dwcp_streams *s = c->s;
    const dwcp_frame *f = &t->rx_f;
    int rc = 0;
    pthread_mutex_lock(&s->inbox_mu);
    if (f->type == DWCP_T_XFER_BEGIN) {
        if (s->have_begin_id && f->transfer_id <= s->last_begin_id) {
            /* The same announcement on another link (senders announce on every link they use), or
             * a re-announcement by a sender that lost our DONE: answer that with DONE again. */
            if (s->have_done_recv && f->transfer_id == s->done_recv_id)
                rc = ctl_push(t, DWCP_T_DONE, s->done_recv_id, s->done_recv_len);
        } else {
            rc = inbox_push(s, f, payload);
            t->seen_tid = f->transfer_id;
            if (rc == 0) {
                s->last_begin_id = f->transfer_id;
                s->have_begin_id = 1;
                DWCP_ADD(c->w->st.control_frames, 1);
            }
        }
    } else if (c->x && !xfer_complete(c->x)) {
        /* ABORT or CLOSE during a transfer stops it; the frame is kept for the caller's error. A
         * peer that closes right after its receive completed wrote DONE ahead of CLOSE on this very
         * link, so a complete transfer lets the frame wait in the inbox for the next call. */
        if (!s->stop_msg) {
            s->stop_msg = malloc(sizeof *s->stop_msg + f->length);
            if (s->stop_msg) {
                s->stop_msg->type = f->type;
                s->stop_msg->tid = f->transfer_id;
                s->stop_msg->len = f->length;
                if (f->length)
                    memcpy(s->stop_msg->payload, payload, f->length);
            }
        }
        DWCP_ADD(c->w->st.control_frames, 1);
        pthread_mutex_unlock(&s->inbox_mu);
        set_state(c, f->type == DWCP_T_ABORT ? DWCP_E_PEER_ABORT : DWCP_E_PEER_CLOSE);
        return 0;
    } else {
        rc = inbox_push(s, f, payload);
        if (rc == 0)
            DWCP_ADD(c->w->st.control_frames, 1);
    }
    pthread_mutex_unlock(&s->inbox_mu);
    return rc;
}

/* ---------------------------------------------------------------- reading */

/* The header at the front of t->rb. Returns < 0 (the link dies), 0 (consumed) or 1 (t parks). */
static int on_header(wctx *c, lnk *t)
{
    dwcp_streams *s = c->s;
    xfer *x = c->x;
    dwcp_frame f;
    int rc = dwcp_frame_decode(t->rb + t->rb_head, DWCP_MAX_CHUNK_BYTES, &f);
    if (rc)
        return rc;
    if (f.stream != t->wire)
        return DWCP_E_STREAM;
    if (t->sealed) {
        rc = sealed_header_ok(t, &f, t->rb + t->rb_head);
        if (rc < 0) {
            if (rc == DWCP_E_AUTH)
                DWCP_ADD(s->auth_failures, 1);
            return rc;
        }
    } else if (f.flags & DWCP_FLAG_SEALED) {
        return DWCP_E_FLAGS;
    }
    switch (f.type) {
    case DWCP_T_XFER_BEGIN:
    case DWCP_T_ABORT:
    case DWCP_T_CLOSE:
        if (f.length > DWCP_MAX_CONTROL_BYTES || (f.type == DWCP_T_CLOSE && f.length))
            return DWCP_E_LENGTH;
        if (t->sealed ? f.flags != DWCP_FLAG_SEALED
                      : (f.length ? f.flags != DWCP_FLAG_CSUM_CRC32C : f.flags != 0))
            return DWCP_E_FLAGS;
        if (f.offset || (f.type == DWCP_T_CLOSE && f.transfer_id))
            return DWCP_E_RANGE;
        if ((rc = consume_header(t)) < 0)
            return rc;
        t->rx_f = f;
        if (!f.length)
            return ctl_done(c, t, NULL);
        if (!t->rx_ctl && !(t->rx_ctl = malloc(DWCP_MAX_CONTROL_BYTES)))
            return DWCP_E_NOMEM;
        t->rx_mode = RX_CTL;
        t->rx_len = f.length;
        t->rx_got = 0;
        return 0;
    case DWCP_T_ACK:
    case DWCP_T_NACK:
    case DWCP_T_DONE:
        if (f.length)
            return DWCP_E_LENGTH;
        if ((rc = consume_header(t)) < 0)
            return rc;
        if (x && x->sender)
            return tx_frame(c, t, &f);
        if (s->have_send_id && f.transfer_id <= s->last_send_id)
            return 0; /* ACK/DONE of a transfer this set sent earlier, arriving after that call */
        return DWCP_E_TYPE;
    case DWCP_T_DATA:
    case DWCP_T_TRUNCATE:
        if (f.type == DWCP_T_TRUNCATE && f.length)
            return DWCP_E_LENGTH;
        if (x && !x->sender)
            return rx_header(c, t, &f);
        if (s->have_recv_id && f.transfer_id <= s->last_recv_id) {
            if ((rc = consume_header(t)) < 0)
                return rc;
            return stale_data(c, t, &f);
        }
        t->parked = 1; /* the peer's next transfer towards us: keep it for that receive call */
        return 1;
    default:
        return DWCP_E_TYPE;
    }
}

static int payload_done(wctx *c, lnk *t)
{
    xfer *x = c->x;
    int mode = t->rx_mode;
    /* A sealed frame that fails its tag kills the link with the chunk still marked in flight on it,
     * so link_die gives the chunk back (the sender re-sends it on another link). */
    if (t->sealed && (t->rx_bad || dwcp_seal_verify(&t->rx_seal, t->rx_tag) < 0)) {
        /* GCM is malleable until the tag is checked: an attacker's bit flips reached the
         * destination with the in-place decryption. Wipe them, so a caller who uses the buffer of
         * a failed call still never sees bytes an attacker chose. */
        if (mode == RX_DEST)
            memset(t->rx_dst, 0, (size_t)t->rx_got);
        DWCP_ADD(c->s->auth_failures, 1);
        return DWCP_E_AUTH;
    }
    t->rx_mode = RX_HDR;
    if (mode == RX_CTL) {
        if (!t->sealed && dwcp_crc32c(0, t->rx_ctl, (size_t)t->rx_len) != t->rx_f.checksum)
            return DWCP_E_CHECKSUM;
        return ctl_done(c, t, t->rx_ctl);
    }
    if (mode == RX_DEST) {
        uint64_t ch = t->rx_chunk;
        uint64_t tid = x->o->transfer_id;
        int via = -1;
        if (__atomic_load_n(&x->ndrops, __ATOMIC_ACQUIRE)) {
            pthread_mutex_lock(&x->mu);
            via = drop_take(x, ch); /* settled by the ACK or NACK below */
            pthread_mutex_unlock(&x->mu);
        }
        uint16_t *slot = st_ref(x, ch);
        if (!slot)
            return DWCP_E_NOMEM;
        if (!x->o->csum_flags || dwcp_csum_digest(&t->rx_sum) == t->rx_f.checksum) {
            __atomic_store_n(slot, (uint16_t)ST_DONE, __ATOMIC_RELEASE);
            __atomic_fetch_add(&x->ndone, 1, __ATOMIC_ACQ_REL);
            DWCP_ADD(c->w->st.chunks, 1);
            DWCP_ADD(c->w->st.bytes_payload, t->rx_len);
            /* A copy dropped on another link is what the sender now waits on there (it re-sent the
             * chunk after losing this link's end, whose ACK may never reach it): ACK there too. */
            if (via >= 0 && via != t->idx)
                answer_somewhere(c, DWCP_T_ACK, ch, via);
            return ctl_push(t, DWCP_T_ACK, tid, t->rx_f.offset);
        }
        __atomic_store_n(slot, (uint16_t)0, __ATOMIC_RELEASE);
        DWCP_ADD(c->w->st.checksum_errors, 1);
        return ctl_push(t, DWCP_T_NACK, tid, t->rx_f.offset);
    }
    if (t->rx_current) {
        DWCP_ADD(c->w->st.chunks_duplicate, 1);
        if (t->rx_dup_ack)
            return ctl_push(t, DWCP_T_ACK, x->o->transfer_id, t->rx_f.offset);
    }
    if (t->rx_done_reply && c->s->have_done_recv && t->rx_f.transfer_id == c->s->done_recv_id)
        return ctl_push(t, DWCP_T_DONE, c->s->done_recv_id, c->s->done_recv_len);
    return 0;
}

/* What a non-blocking recv result means: bytes (1), retry (0), or stop reading now (-1): the socket is
 * drained (t->readable cleared) or the link died. One place, so every read treats EOF alike. */
static int recv_result(wctx *c, lnk *t, ssize_t n)
{
    if (n > 0)
        return 1;
    if (n < 0 && errno == EINTR)
        return 0;
    if (n < 0 && would_block(errno)) {
        t->readable = 0;
        return -1;
    }
    link_die(c, t, n < 0 ? errno : 0);
    return -1;
}

/* Whether t may be read now: it is readable and this visit's byte budget is not spent (then the loop
 * comes back to it, after the other links). */
static int may_read(wctx *c, const lnk *t, size_t budget)
{
    if (!t->readable)
        return 0;
    if (budget == 0) {
        c->again = 1;
        return 0;
    }
    return 1;
}

/* One non-blocking recvmsg on t into iov: bytes read (> 0), 0 to retry (EINTR), or -1 when reading
 * stops for now (drained, or the link died). Accounts progress and the visit's budget, and clears
 * the readiness flag on a short read. */
static ssize_t link_recv(wctx *c, lnk *t, struct iovec *iov, int niov, size_t *budget)
{
    size_t want = 0;
    for (int i = 0; i < niov; i++)
        want += iov[i].iov_len;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)niov;
    ssize_t n = recvmsg(t->fd, &msg, MSG_DONTWAIT);
    int r = recv_result(c, t, n);
    if (r <= 0)
        return r;
    progress(c, (size_t)n);
    *budget = (size_t)n >= *budget ? 0 : *budget - (size_t)n;
    if ((size_t)n < want && !t->hup)
        t->readable = 0;
    return n;
}

/* Sealed links: open n payload bytes at src into dst (either may be the other; decryption keeps the
 * tag state going even for a discarded payload, whose tag is checked like any other). */
static void rx_open(lnk *t, uint8_t *dst, const uint8_t *src, size_t n)
{
    if (!t->rx_bad && dwcp_seal_update(&t->rx_seal, dst, src, n) < 0)
        t->rx_bad = 1;
}

/* Payload bytes that were read into the link buffer. */
static void payload_bytes(wctx *c, lnk *t, const uint8_t *src, size_t n)
{
    if (t->rx_mode == RX_DEST) {
        if (t->sealed) {
            rx_open(t, t->rx_dst + t->rx_got, src, n);
        } else {
            memcpy(t->rx_dst + t->rx_got, src, n);
            dwcp_csum_update(&t->rx_sum, t->rx_dst + t->rx_got, n);
        }
    } else if (t->rx_mode == RX_CTL) {
        if (t->sealed)
            rx_open(t, t->rx_ctl + t->rx_got, src, n);
        else
            memcpy(t->rx_ctl + t->rx_got, src, n);
    } else if (t->sealed) {
        rx_open(t, c->w->scratch, src, n); /* n <= RBUF_BYTES < SCRATCH_BYTES */
    }
    t->rx_got += n;
}

/* Payload bytes the kernel wrote straight into their place (destination, control buffer, scratch). */
static void payload_in_place(lnk *t, uint8_t *at, size_t n)
{
    if (t->sealed)
        rx_open(t, at, at, n);
    else if (t->rx_mode == RX_DEST)
        dwcp_csum_update(&t->rx_sum, at, n);
}

static int receiving_done(const wctx *c)
{
    /* A complete receive reads nothing more: what follows belongs to later calls. */
    return c->x && !c->x->sender && state_of(c->x) != 0;
}

/* Read more into the link buffer (for a header, or a sealed frame's tag). -1: stop reading t now. */
static int rb_fill(wctx *c, lnk *t, size_t *budget)
{
    size_t avail = t->rb_tail - t->rb_head;
    if (!may_read(c, t, *budget))
        return -1;
    if (t->rb_head) {
        memmove(t->rb, t->rb + t->rb_head, avail);
        t->rb_head = 0;
        t->rb_tail = avail;
    }
    struct iovec iov = {.iov_base = t->rb + t->rb_tail, .iov_len = RBUF_BYTES - t->rb_tail};
    ssize_t n = link_recv(c, t, &iov, 1, budget);
    if (n < 0)
        return -1;
    t->rb_tail += (size_t)n;
    return 0;
}

static void link_read(wctx *c, lnk *t)
{
    size_t budget = RX_BUDGET_BYTES;
    while (is_alive(t) && !t->parked && !receiving_done(c)) {
        size_t avail = t->rb_tail - t->rb_head;
        if (t->rx_mode == RX_HDR) {
            if (avail >= DWCP_HEADER_BYTES && avail >= header_need(t)) {
                int rc = on_header(c, t);
                if (rc < 0) {
                    link_die(c, t, rc);
                    return;
                }
                continue;
            }
            if (rb_fill(c, t, &budget) < 0)
                return;
            continue;
        }
        uint64_t rem = t->rx_len - t->rx_got;
        if (rem == 0) { /* a sealed payload is in: its tag follows */
            if (!avail) {
                if (rb_fill(c, t, &budget) < 0)
                    return;
                continue;
            }
            size_t take = DWCP_TAG_BYTES - t->rx_tag_got;
            if (take > avail)
                take = avail;
            memcpy(t->rx_tag + t->rx_tag_got, t->rb + t->rb_head, take);
            t->rx_tag_got += (unsigned)take;
            t->rb_head += take;
            if (t->rb_head == t->rb_tail)
                t->rb_head = t->rb_tail = 0;
        } else if (avail) {
            size_t take = rem < avail ? (size_t)rem : avail;
            payload_bytes(c, t, t->rb + t->rb_head, take);
            t->rb_head += take;
            if (t->rb_head == t->rb_tail)
                t->rb_head = t->rb_tail = 0;
        } else {
            if (!may_read(c, t, budget))
                return;
            struct iovec iov[2];
            if (t->rx_mode == RX_DEST) {
                iov[0].iov_base = t->rx_dst + t->rx_got;
                iov[0].iov_len = (size_t)rem;
            } else if (t->rx_mode == RX_CTL) {
                iov[0].iov_base = t->rx_ctl + t->rx_got;
                iov[0].iov_len = (size_t)rem;
            } else {
                iov[0].iov_base = c->w->scratch;
                iov[0].iov_len = rem < SCRATCH_BYTES ? (size_t)rem : SCRATCH_BYTES;
            }
            int niov = 1;
            if (iov[0].iov_len == rem) { /* and whatever follows the payload into the link buffer */
                t->rb_head = t->rb_tail = 0;
                iov[1].iov_base = t->rb;
                iov[1].iov_len = RBUF_BYTES;
                niov = 2;
            }
            ssize_t n = link_recv(c, t, iov, niov, &budget);
            if (n < 0)
                return;
            size_t pay = (size_t)n < iov[0].iov_len ? (size_t)n : iov[0].iov_len;
            payload_in_place(t, iov[0].iov_base, pay);
            t->rx_got += pay;
            if (niov == 2)
                t->rb_tail = (size_t)n - pay;
        }
        if (t->rx_got == t->rx_len && (!t->sealed || t->rx_tag_got == DWCP_TAG_BYTES)) {
            int rc = payload_done(c, t);
            if (rc < 0) {
                if (rc == DWCP_E_NOMEM && c->x)
                    set_state(c, DWCP_E_NOMEM);
                link_die(c, t, rc);
                return;
            }
        }
    }
}

/* ---------------------------------------------------------------- driver */

static void handle_events(wctx *c, struct epoll_event *evs, int nev)
{
    dwcp_streams *s = c->s;
    for (int i = 0; i < nev; i++) {
        uint32_t id = evs[i].data.u32;
        if (id == EV_WAKE) {
            uint64_t v;
            ssize_t r = read(c->all ? s->solo_evfd : c->w->evfd, &v, sizeof v);
            (void)r;
            continue;
        }
        if (id >= (uint32_t)s->nl)
            continue;
        lnk *t = &s->l[id];
        if (!owns(c, t) || !is_alive(t))
            continue;
        uint32_t e = evs[i].events;
        if (e & EPOLLERR && t->zc_issued != t->zc_done)
            zc_reap(s, t, &c->w->st);
        /* HUP/ERR: let the next recv/send report EOF or the socket error. */
        if (e & (EPOLLHUP | EPOLLRDHUP))
            t->hup = 1;
        if (e & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))
            t->readable = 1;
        if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR))
            t->writable = 1;
    }
}

/* Wait for events. A call that may busy-poll (c->spin_ns > 0: small transfers and control waits)
 * first polls without sleeping, up to its budget: on a VM, waking a task that slept on another vCPU
 * costs tens of microseconds (an IPI and a VM exit on each side), more than a small transfer's whole
 * round trip, while the peer of a request/response exchange usually answers within that budget. */
static int wait_events(wctx *c, int wait_ms)
{
    struct epoll_event evs[64];
    int nev = 0;
    if (c->spin_ns > 0 && wait_ms != 0) {
        int64_t start = now_ns(), t = start;
        /* sched_yield: a peer on this very CPU (the scheduler puts partners together) must get to
         * run and answer while we poll. */
        while ((nev = epoll_wait(c->ep, evs, 64, 0)) == 0 && (t = now_ns()) - start < c->spin_ns)
            sched_yield();
        c->spin_ns -= (nev ? now_ns() : t) - start;
    }
    if (nev == 0)
        nev = epoll_wait(c->ep, evs, 64, wait_ms);
    if (nev < 0) {
        if (errno == EINTR)
            return 0;
        DWCP_SET(c->s->last_errno, errno);
        return DWCP_E_SYSCALL;
    }
    handle_events(c, evs, nev);
    return 0;
}

static void serve_links(wctx *c)
{
    dwcp_streams *s = c->s;
    for (int i = 0; i < s->nl; i++) {
        lnk *t = &s->l[i];
        if (!owns(c, t) || !is_alive(t))
            continue;
        if (t->readable || (t->rb_tail > t->rb_head && !t->parked))
            link_read(c, t);
        /* A receive that just completed writes nothing more here: the end of the call pushes DONE
         * behind the last ACK, and both leave in one send. */
        if (c->x && !c->x->sender && (xfer_complete(c->x) || !rx_wants_write(t)))
            continue;
        if (is_alive(t) && t->writable && tx_has_work(c, t))
            link_write(c, t);
    }
}

/* A receiving thread about to wait writes every ACK it held back. */
static void flush_idle(wctx *c)
{
    dwcp_streams *s = c->s;
    for (int i = 0; i < s->nl; i++) {
        lnk *t = &s->l[i];
        if (owns(c, t) && is_alive(t) && t->writable && wq_pending(t))
            link_write(c, t);
    }
}

static int xfer_complete(const xfer *x)
{
    uint64_t keff = __atomic_load_n(&x->Keff, __ATOMIC_ACQUIRE);
    uint64_t done = __atomic_load_n(&x->ndone, __ATOMIC_ACQUIRE);
    if (x->sender) {
        if (__atomic_load_n(&x->got_done, __ATOMIC_ACQUIRE))
            return 1;
        /* An announced transfer with nothing to acknowledge waits for DONE: it says the announcement
         * arrived. */
        return done >= keff && (keff > 0 || !x->o->begin);
    }
    return done >= keff;
}

static void push_truncates(wctx *c)
{
    dwcp_streams *s = c->s;
    xfer *x = c->x;
    c->trunc_pushed = 1;
    for (int i = 0; i < s->nl; i++) {
        lnk *t = &s->l[i];
        if (!owns(c, t) || !is_alive(t))
            continue;
        if (ensure_begun(c, t) < 0 || ctl_push(t, DWCP_T_TRUNCATE, x->o->transfer_id, x->trunc_len) < 0) {
            set_state(c, DWCP_E_NOMEM);
            return;
        }
    }
    c->again = 1;
}

static void drain_pending(wctx *c)
{
    dwcp_streams *s = c->s;
    xfer *x = c->x;
    int have_link = 0;
    for (int i = 0; i < s->nl && !have_link; i++)
        have_link = owns(c, &s->l[i]) && is_alive(&s->l[i]);
    if (!have_link)
        return; /* nothing this thread could carry them on: the others will */
    struct pending mine[32];
    size_t n = 0;
    pthread_mutex_lock(&x->mu);
    size_t keep = 0;
    int more = 0;
    for (size_t i = 0; i < x->npend; i++) {
        struct pending e = x->pend[i];
        int ok = e.via < 0 || !is_alive(&s->l[e.via]) || owns(c, &s->l[e.via]);
        if (ok && n < sizeof mine / sizeof *mine)
            mine[n++] = e;
        else
            x->pend[keep++] = e;
        more |= ok && n == sizeof mine / sizeof *mine;
    }
    __atomic_store_n(&x->npend, keep, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&x->mu);
    for (size_t i = 0; i < n; i++)
        answer_somewhere(c, mine[i].type, mine[i].chunk, mine[i].via);
    if (more)
        c->again = 1; /* the rest of ours in the next round */
}

static void run_share(wctx *c)
{
    dwcp_streams *s = c->s;
    xfer *x = c->x;
    c->again = 1; /* look at every link (and collect pending edges) before the first real wait */
    for (;;) {
        apply_kills(c);
        if (__atomic_load_n(&s->interrupt, __ATOMIC_ACQUIRE))
            set_state(c, DWCP_E_CLOSED);
        if (state_of(x) != 0)
            return;
        if (x->sender && !c->trunc_pushed && __atomic_load_n(&x->truncated, __ATOMIC_ACQUIRE))
            push_truncates(c);
        if (!x->sender && __atomic_load_n(&x->npend, __ATOMIC_ACQUIRE))
            drain_pending(c);
        if (__atomic_load_n(&x->proto_err, __ATOMIC_RELAXED) == DWCP_E_NOMEM) {
            set_state(c, DWCP_E_NOMEM);
            return;
        }
        if (xfer_complete(x)) {
            set_state(c, 1);
            return;
        }
        if (__atomic_load_n(&s->n_alive, __ATOMIC_ACQUIRE) == 0) {
            int pe = __atomic_load_n(&x->proto_err, __ATOMIC_RELAXED);
            set_state(c, pe ? pe : DWCP_E_ALL_STREAMS);
            return;
        }
        int64_t now = now_ns();
        int64_t last = __atomic_load_n(&x->last_progress, __ATOMIC_RELAXED);
        if (last < c->published)
            last = c->published;
        if (now - last >= x->timeout_ns) {
            set_state(c, DWCP_E_TIMEOUT);
            return;
        }
        int64_t wait_ns = last + x->timeout_ns - now;
        if (x->sender && x->deadline && !__atomic_load_n(&x->truncated, __ATOMIC_ACQUIRE) &&
            __atomic_load_n(&x->next, __ATOMIC_ACQUIRE) < x->K) {
            if (now >= x->deadline) {
                pthread_mutex_lock(&x->mu);
                truncate_locked(c);
                pthread_mutex_unlock(&x->mu);
                continue;
            }
            if (x->deadline - now < wait_ns)
                wait_ns = x->deadline - now;
        }
        int wait_ms = c->again ? 0 : (int)((wait_ns + 999999) / 1000000);
        c->again = 0;
        if (wait_ms && !x->sender)
            flush_idle(c);
        int rc = wait_events(c, wait_ms);
        if (rc) {
            set_state(c, rc);
            return;
        }
        serve_links(c);
    }
}

/* Push out what this thread's links still hold (DONE, ACKs, TRUNCATE, the rest of a started frame)
 * within the transfer's timeout. A DATA frame not yet started is dropped: its chunk no longer
 * matters. */
static int flush_links(wctx *c, int64_t timeout_ns, int *flushed)
{
    dwcp_streams *s = c->s;
    int64_t end = now_ns() + timeout_ns;
    for (;;) {
        int pending = 0;
        if (flushed)
            *flushed = 0;
        for (int i = 0; i < s->nl; i++) {
            lnk *t = &s->l[i];
            if (!owns(c, t) || !is_alive(t))
                continue;
            if (t->tx_active && t->tx_sent == 0)
                t->tx_active = 0;
            if (t->carry || wq_pending(t) || t->tx_active) {
                if (t->writable)
                    link_write(c, t);
                if (is_alive(t) && (t->carry || wq_pending(t) || t->tx_active))
                    pending = 1;
            }
            if (flushed && is_alive(t) && !t->carry && !wq_pending(t) && !t->tx_active)
                (*flushed)++;
        }
        if (!pending)
            return 0;
        apply_kills(c);
        int64_t left = end - now_ns();
        if (left <= 0)
            return DWCP_E_TIMEOUT;
        int rc = wait_events(c, (int)((left + 999999) / 1000000));
        if (rc)
            return rc;
    }
}

/* Leave every link framed and independent of the caller's buffer before the call returns. */
/* finish_links for a sealed DATA frame that has its counter: the queued frames that go ahead of it
 * and the rest of it (encrypted now, with its tag) become the carry. */
static int carry_sealed(lnk *t)
{
    size_t old = t->carry ? t->carry_len - t->carry_off : 0;
    size_t ahead = t->wq_ahead;
    uint64_t p = t->tx_sent > DWCP_HEADER_BYTES ? t->tx_sent - DWCP_HEADER_BYTES : 0;
    size_t hdr_rest = t->tx_sent < DWCP_HEADER_BYTES ? DWCP_HEADER_BYTES - t->tx_sent : 0;
    /* tx_ct holds [ct_lo, ct_lo + ct_n) of payload-then-tag; once the last slice is in it, so is the
     * tag. What is not encrypted yet is encrypted straight into the carry. */
    uint64_t end = t->ct_lo + t->ct_n;
    int finished = end > t->tx_pay_len;
    size_t in_slice = (size_t)(end - p);
    uint64_t lo = end;
    size_t later = finished ? 0 : (size_t)(t->tx_pay_len - end);
    size_t tag = finished ? 0 : DWCP_TAG_BYTES;
    uint8_t *q = malloc(old + ahead + hdr_rest + in_slice + later + tag);
    if (!q)
        return DWCP_E_NOMEM;
    size_t o = 0;
    if (old)
        memcpy(q, t->carry + t->carry_off, old);
    o += old;
    if (ahead)
        memcpy(q + o, t->wq + t->wq_off, ahead);
    o += ahead;
    if (hdr_rest)
        memcpy(q + o, t->tx_hdr + t->tx_sent, hdr_rest);
    o += hdr_rest;
    if (in_slice)
        memcpy(q + o, t->tx_ct + (p - t->ct_lo), in_slice);
    o += in_slice;
    int rc = later ? dwcp_seal_update(&t->tx_seal, q + o, t->tx_pay + lo, later) : 0;
    o += later;
    if (!rc && tag)
        rc = dwcp_seal_finish(&t->tx_seal, q + o);
    o += tag;
    if (rc) {
        free(q);
        return rc;
    }
    t->wq_off += ahead;
    t->wq_ahead = 0;
    if (!t->carry)
        DBG_ADD(g_carry_buffers, 1);
    free(t->carry);
    t->carry = q;
    t->carry_len = o;
    t->carry_off = 0;
    t->tx_active = 0;
    t->tx_sealed = 0;
    t->tx_sent = 0;
    t->tx_pay = NULL;
    return 0;
}

static void finish_links(wctx *c)
{
    dwcp_streams *s = c->s;
    for (int i = 0; i < s->nl; i++) {
        lnk *t = &s->l[i];
        if (!owns(c, t) || !is_alive(t))
            continue;
        wq_trim(t);
        if (t->tx_active && t->tx_sent == 0 && !t->tx_sealed)
            t->tx_active = 0;
        if (t->tx_active && t->sealed) {
            if (carry_sealed(t) < 0)
                mark_dead(s, t, ENOMEM);
            continue;
        }
        if (t->tx_active) {
            /* A frame cut off mid-way (completion via DONE, error, interrupt): the receiver's framing
             * needs its remaining bytes, but the caller owns the buffer from now on. It goes out
             * before anything else on this link: ahead of the queue, after an older carry. */
            size_t total = DWCP_HEADER_BYTES + t->tx_pay_len;
            size_t rem = total - t->tx_sent;
            size_t old = t->carry ? t->carry_len - t->carry_off : 0;
            uint8_t *p = malloc(old + rem);
            if (!p) {
                mark_dead(s, t, ENOMEM);
                continue;
            }
            if (old)
                memcpy(p, t->carry + t->carry_off, old);
            size_t o = old;
            if (t->tx_sent < DWCP_HEADER_BYTES) {
                size_t h = DWCP_HEADER_BYTES - t->tx_sent;
                memcpy(p + o, t->tx_hdr + t->tx_sent, h);
                memcpy(p + o + h, t->tx_pay, t->tx_pay_len);
            } else {
                memcpy(p + o, t->tx_pay + (t->tx_sent - DWCP_HEADER_BYTES), rem);
            }
            if (!t->carry)
                DBG_ADD(g_carry_buffers, 1);
            free(t->carry);
            t->carry = p;
            t->carry_len = old + rem;
            t->carry_off = 0;
            t->tx_active = 0;
            t->tx_sent = 0;
            t->tx_pay = NULL;
        }
        if (t->rx_mode == RX_DEST || t->rx_mode == RX_DISCARD) {
            /* The rest of this payload must never land in a buffer the caller got back, and a
             * duplicate of this call's transfer earns no ACK from a later call. */
            t->rx_mode = RX_DISCARD;
            t->rx_dup_ack = 0;
            t->rx_current = 0;
        }
    }
}

/* One thread's whole part of a transfer: its share of the event loop, then the end. */
static int run_thread_part(wctx *c)
{
    xfer *x = c->x;
    run_share(c);
    int rc = 0;
    int st = state_of(x);
    if (st == 1 && x->sender) {
        /* Complete by ACKs after a truncation: the receiver learns where the transfer ends only from
         * TRUNCATE, so it must leave (behind any frame already started on its link). With DONE the
         * receiver needs nothing more: a started duplicate is carried into the next call instead,
         * since the receiver no longer reads it and waiting for it could block until the timeout. */
        if (!__atomic_load_n(&x->got_done, __ATOMIC_ACQUIRE) && __atomic_load_n(&x->truncated, __ATOMIC_ACQUIRE))
            rc = flush_links(c, x->timeout_ns, NULL);
    } else if (st == 1) {
        /* DONE on every live link the transfer came on: the sender waits for ACKs there, and may lose
         * any one of those links. (If it loses all of them it re-sends their chunks elsewhere, which
         * this set answers with DONE again: stale_data.) With none of them left, on every live link. */
        uint64_t len = __atomic_load_n(&x->truncated, __ATOMIC_ACQUIRE) ? x->trunc_len : x->length;
        int any = 0;
        for (int i = 0; i < c->s->nl; i++)
            any |= is_alive(&c->s->l[i]) && c->s->l[i].seen_tid == x->o->transfer_id;
        for (int i = 0; i < c->s->nl && !rc; i++) {
            lnk *t = &c->s->l[i];
            if (owns(c, t) && is_alive(t) && (!any || t->seen_tid == x->o->transfer_id) &&
                ctl_push(t, DWCP_T_DONE, x->o->transfer_id, len) < 0)
                rc = DWCP_E_NOMEM;
        }
        if (!rc)
            rc = flush_links(c, x->timeout_ns, NULL);
    }
    finish_links(c);
    return rc;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    dwcp_streams *s = w->s;
    unsigned seen = 0;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->gen == seen && !s->stop)
            pthread_cond_wait(&s->go_cv, &s->mu);
        if (s->stop)
            break;
        seen = s->gen;
        xfer *x = s->job;
        pthread_mutex_unlock(&s->mu);
        wctx c = {.s = s, .x = x, .w = w, .ep = w->ep, .all = 0};
        int rc = run_thread_part(&c);
        pthread_mutex_lock(&s->mu);
        if (rc && !x->flush_rc)
            x->flush_rc = rc;
        if (--s->active == 0)
            pthread_cond_signal(&s->done_cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static int start_threads(dwcp_streams *s)
{
    if (s->threads_ok)
        return 1;
    for (int i = 1; i < s->T; i++) {
        if (s->w[i].started)
            continue;
        if (pthread_create(&s->w[i].th, NULL, worker_main, &s->w[i]) != 0)
            return 0;
        s->w[i].started = 1;
        DBG_ADD(g_io_threads, 1);
    }
    s->threads_ok = 1;
    return 1;
}

static int xfer_init(xfer *x, dwcp_streams *s, int sender, const void *buf, uint64_t buf_len,
                     const dwcp_xfer_opts *o)
{
    memset(x, 0, sizeof *x);
    x->s = s;
    x->sender = sender;
    x->o = o;
    pthread_mutex_init(&x->mu, NULL);
    pthread_mutex_init(&x->pmu, NULL);
    if (!o || !o->chunk_bytes || o->chunk_bytes > DWCP_MAX_CHUNK_BYTES)
        return DWCP_E_INVAL;
    if (o->csum_flags & ~(DWCP_FLAG_CSUM_CRC32C | DWCP_FLAG_CSUM_XXH3) ||
        o->csum_flags == (DWCP_FLAG_CSUM_CRC32C | DWCP_FLAG_CSUM_XXH3))
        return DWCP_E_INVAL;
    if (o->frame_flags & ~DWCP_FLAG_COMPRESSED)
        return DWCP_E_INVAL;
    if (o->begin_len > DWCP_MAX_CONTROL_BYTES || (o->begin_len && !o->begin))
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
    if (o->sink && (sender || !x->wrap))
        return DWCP_E_INVAL;
    x->sink = o->sink;
    x->K = x->length / x->chunk + (x->length % x->chunk != 0);
    if (x->K > MAX_CHUNKS)
        return DWCP_E_INVAL; /* more chunk states than we keep: use a larger chunk size */
    x->Keff = x->K;
    x->npages = (x->K + SP_SIZE - 1) / SP_SIZE;
    if (x->npages && !(x->pages = calloc((size_t)x->npages, sizeof *x->pages)))
        return DWCP_E_NOMEM;
    x->timeout_ns = (int64_t)(o->timeout_ms > 0 ? o->timeout_ms : 30000) * 1000000;
    x->deadline = sender ? o->deadline_ns : 0;
    x->use_zc = sender && o->zerocopy == DWCP_ZC_ON && !s->sealed; /* ciphertext buffers are reused */
    x->zc_min = o->zc_min_bytes ? o->zc_min_bytes : (32u << 10);
    x->last_progress = now_ns();
    return 0;
}

static void xfer_free(xfer *x)
{
    for (uint64_t p = 0; p < x->npages; p++)
        free(x->pages[p]);
    free(x->pages);
    free(x->rq);
    free(x->drops);
    free(x->pend);
    pthread_mutex_destroy(&x->mu);
    pthread_mutex_destroy(&x->pmu);
}

static int enable_zerocopy(dwcp_streams *s)
{
    if (s->zc_sockopt)
        return 1;
    int one = 1;
    for (int i = 0; i < s->nl; i++) {
        if (!is_alive(&s->l[i]))
            continue;
        if (setsockopt(s->l[i].fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) < 0)
            return 0;
    }
    s->zc_sockopt = 1;
    return 1;
}

static void unpark_all(dwcp_streams *s)
{
    for (int i = 0; i < s->nl; i++)
        s->l[i].parked = 0;
}

static void clear_stop_msg(dwcp_streams *s)
{
    pthread_mutex_lock(&s->inbox_mu);
    free(s->stop_msg);
    s->stop_msg = NULL;
    pthread_mutex_unlock(&s->inbox_mu);
}

static int use_threads(const dwcp_streams *s, const xfer *x)
{
    return s->T > 1 && x->length >= DWCP_MT_MIN_BYTES && x->K >= 2 * (uint64_t)s->T &&
           __atomic_load_n(&s->n_alive_data, __ATOMIC_ACQUIRE) > 1;
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
        clear_stop_msg(s);
        if (x.use_zc && !LOAD(s->zc_fallback) && !enable_zerocopy(s))
            x.use_zc = 0; /* the kernel refuses SO_ZEROCOPY: plain sends are the only option */
        unpark_all(s);
        x.mt = use_threads(s, &x) && start_threads(s);
        wctx c = {.s = s, .x = &x, .w = &s->w[0], .ep = x.mt ? s->w[0].ep : s->solo_ep, .all = !x.mt,
                  .spin_ns = !x.mt && x.length < DWCP_MT_MIN_BYTES ? s->busy_poll_ns : 0};
        if (x.mt) {
            DWCP_ADD(s->w[0].st.mt_transfers, 1);
            pthread_mutex_lock(&s->mu);
            s->job = &x;
            s->active = s->T - 1;
            s->gen++;
            pthread_cond_broadcast(&s->go_cv);
            pthread_mutex_unlock(&s->mu);
        }
        int frc = run_thread_part(&c);
        if (x.mt) {
            pthread_mutex_lock(&s->mu);
            while (s->active)
                pthread_cond_wait(&s->done_cv, &s->mu);
            s->job = NULL;
            if (!frc)
                frc = x.flush_rc;
            pthread_mutex_unlock(&s->mu);
        }
        int st = state_of(&x);
        rc = st == 1 ? frc : st;
        if (rc == DWCP_E_CLOSED)
            __atomic_store_n(&s->interrupt, 0, __ATOMIC_RELEASE);
        uint64_t len = __atomic_load_n(&x.truncated, __ATOMIC_ACQUIRE) ? x.trunc_len : x.length;
        if (st == 1 && sender) {
            /* DONE vouches for every chunk whose ACK never came: count them now that every thread
             * has stopped (exactly, with no ACK racing the count). */
            uint64_t keff = __atomic_load_n(&x.Keff, __ATOMIC_ACQUIRE);
            if (keff > x.ndone) {
                DWCP_ADD(s->w[0].st.chunks, keff - x.ndone);
                DWCP_ADD(s->w[0].st.bytes_payload, len - x.done_bytes);
            }
        }
        if (st == 1 && !sender) {
            s->done_recv_id = o->transfer_id;
            s->done_recv_len = len;
            s->have_done_recv = 1;
        }
        if (x.use_zc || zc_outstanding(s)) {
            int zr = zc_drain(s, rc == DWCP_OK ? (int)(x.timeout_ns / 1000000) : 1000);
            if (rc == DWCP_OK && zr)
                rc = zr;
        }
        if (rc == DWCP_OK && out_len)
            *out_len = len;
    }
    xfer_free(&x);
    settle_kills(s);
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

/* ---------------------------------------------------------------- control calls */

static int inbox_pop(dwcp_streams *s, uint8_t *type, uint64_t *tid, uint8_t *buf, uint32_t cap, uint32_t *len)
{
    pthread_mutex_lock(&s->inbox_mu);
    ctlmsg *m = NULL;
    if (s->inbox_n) {
        m = s->inbox[s->inbox_head];
        if (m->len > cap) {
            pthread_mutex_unlock(&s->inbox_mu);
            return DWCP_E_INVAL;
        }
        s->inbox_head = (s->inbox_head + 1) % INBOX_MAX;
        s->inbox_n--;
    }
    pthread_mutex_unlock(&s->inbox_mu);
    if (!m)
        return 1;
    *type = m->type;
    *tid = m->tid;
    *len = m->len;
    if (m->len)
        memcpy(buf, m->payload, m->len);
    free(m);
    return 0;
}

int dwcp_next_control(dwcp_streams *s, int timeout_ms, uint8_t *type, uint64_t *transfer_id, uint8_t *buf,
                      uint32_t cap, uint32_t *len)
{
    if (!s || !type || !transfer_id || !buf || !len || cap < DWCP_MAX_CONTROL_BYTES)
        return DWCP_E_INVAL;
    if (__atomic_exchange_n(&s->busy, 1, __ATOMIC_ACQUIRE))
        return DWCP_E_INVAL;
    int64_t end = timeout_ms < 0 ? 0 : now_ns() + (int64_t)timeout_ms * 1000000;
    wctx c = {.s = s, .x = NULL, .w = &s->w[0], .ep = s->solo_ep, .all = 1, .spin_ns = s->busy_poll_ns};
    int rc;
    unpark_all(s);
    c.again = 1;
    for (;;) {
        rc = inbox_pop(s, type, transfer_id, buf, cap, len);
        if (rc <= 0)
            break;
        apply_kills(&c);
        if (__atomic_load_n(&s->interrupt, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&s->interrupt, 0, __ATOMIC_RELEASE);
            rc = DWCP_E_CLOSED;
            break;
        }
        if (__atomic_load_n(&s->n_alive, __ATOMIC_ACQUIRE) == 0) {
            rc = c.idle_rc ? c.idle_rc : DWCP_E_ALL_STREAMS;
            break;
        }
        int wait_ms = -1;
        if (timeout_ms >= 0) {
            int64_t left = end - now_ns();
            if (left <= 0) {
                rc = DWCP_E_TIMEOUT;
                break;
            }
            wait_ms = (int)((left + 999999) / 1000000);
        }
        if (c.again)
            wait_ms = 0;
        c.again = 0;
        rc = wait_events(&c, wait_ms);
        if (rc)
            break;
        serve_links(&c);
        /* Data of a transfer that was never announced on the link it came on: a correct peer puts
         * XFER_BEGIN ahead of it there, so waiting for the announcement would wait forever. */
        for (int i = 0; i < s->nl; i++) {
            lnk *t = &s->l[i];
            if (!is_alive(t) || !t->parked)
                continue;
            uint64_t tid = dwcp_ld64(t->rb + t->rb_head + 16);
            pthread_mutex_lock(&s->inbox_mu);
            int announced = s->have_begin_id && tid <= s->last_begin_id;
            pthread_mutex_unlock(&s->inbox_mu);
            if (!announced)
                link_die(&c, t, DWCP_E_PEER);
        }
    }
    finish_links(&c);
    settle_kills(s);
    __atomic_store_n(&s->busy, 0, __ATOMIC_RELEASE);
    return rc;
}

int dwcp_send_control(dwcp_streams *s, uint8_t type, uint64_t transfer_id, const uint8_t *payload,
                      uint32_t len, int timeout_ms)
{
    if (!s || len > DWCP_MAX_CONTROL_BYTES || (len && !payload) ||
        (type != DWCP_T_ABORT && type != DWCP_T_CLOSE) || (type == DWCP_T_CLOSE && (len || transfer_id)))
        return DWCP_E_INVAL;
    if (__atomic_exchange_n(&s->busy, 1, __ATOMIC_ACQUIRE))
        return DWCP_E_INVAL;
    wctx c = {.s = s, .x = NULL, .w = &s->w[0], .ep = s->solo_ep, .all = 1};
    int rc = 0;
    for (int i = 0; i < s->nl && rc == 0; i++) {
        lnk *t = &s->l[i];
        if (is_alive(t) && !__atomic_load_n(&t->kill_req, __ATOMIC_ACQUIRE))
            rc = wq_frame(t, type, transfer_id, 0, payload, len);
    }
    int flushed = 0;
    if (rc == 0) {
        rc = flush_links(&c, (int64_t)(timeout_ms > 0 ? timeout_ms : 1) * 1000000, &flushed);
        if (rc == 0 || rc == DWCP_E_TIMEOUT)
            rc = flushed;
    }
    finish_links(&c);
    __atomic_store_n(&s->busy, 0, __ATOMIC_RELEASE);
    return rc;
}

int dwcp_streams_stop_frame(const dwcp_streams *s, uint8_t *type, uint8_t *buf, uint32_t cap, uint32_t *len)
{
    if (!s || !type || !len)
        return DWCP_E_INVAL;
    dwcp_streams *m = (dwcp_streams *)s;
    pthread_mutex_lock(&m->inbox_mu);
    int rc = DWCP_E_INVAL;
    if (m->stop_msg) {
        uint32_t n = m->stop_msg->len < cap ? m->stop_msg->len : cap;
        *type = m->stop_msg->type;
        if (n && buf)
            memcpy(buf, m->stop_msg->payload, n);
        *len = buf ? n : 0;
        rc = 0;
    }
    pthread_mutex_unlock(&m->inbox_mu);
    return rc;
}

/* ---------------------------------------------------------------- lifecycle */

int dwcp_usable_cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0)
            return n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static void free_set(dwcp_streams *s)
{
    if (s->w) {
        for (int i = 0; i < s->T; i++) {
            if (s->w[i].ep >= 0)
                close(s->w[i].ep);
            if (s->w[i].evfd >= 0)
                close(s->w[i].evfd);
            free(s->w[i].scratch);
        }
        free(s->w);
    }
    if (s->l) {
        for (int i = 0; i < s->nl; i++) {
            lnk *t = &s->l[i];
            carry_free(t);
            free(t->wq);
            free(t->rb);
            free(t->rx_ctl);
            free(t->tx_ct);
            dwcp_csum_free(&t->rx_sum);
            if (s->sealed) {
                dwcp_seal_free(&t->tx_seal);
                dwcp_seal_free(&t->rx_seal);
            }
        }
        free(s->l);
    }
    if (s->solo_ep >= 0)
        close(s->solo_ep);
    if (s->solo_evfd >= 0)
        close(s->solo_evfd);
    for (int i = 0; i < s->inbox_n; i++)
        free(s->inbox[(s->inbox_head + i) % INBOX_MAX]);
    free(s->stop_msg);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->inbox_mu);
    pthread_mutex_destroy(&s->pause_mu);
    pthread_cond_destroy(&s->go_cv);
    pthread_cond_destroy(&s->done_cv);
    free(s);
}

/* The send buffers (dwcp_set_opts.sndbuf_bytes). Auto mode reads each link's smoothed RTT, which the
 * handshake and JOIN round trips have already sampled; one slow link keeps the kernel's sizing for
 * all (they share the path). */
static void size_send_buffers(dwcp_streams *s, int want)
{
    if (want < 0)
        return;
    if (want == 0) {
        for (int i = 0; i < s->nl; i++) {
            struct tcp_info ti;
            socklen_t len = sizeof ti;
            memset(&ti, 0, sizeof ti);
            if (getsockopt(s->l[i].fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 || ti.tcpi_rtt == 0)
                return;
            if (ti.tcpi_rtt > s->path_rtt_us)
                s->path_rtt_us = ti.tcpi_rtt;
        }
        if (s->path_rtt_us >= DWCP_LAN_RTT_US)
            return;
        want = DWCP_LAN_SNDBUF_BYTES;
    }
    for (int i = 0; i < s->nl; i++)
        setsockopt(s->l[i].fd, SOL_SOCKET, SO_SNDBUF, &want, sizeof want); /* advice: errors harmless */
    s->sndbuf_set = want;
}

int dwcp_streams_sndbuf(const dwcp_streams *s, uint32_t *path_rtt_us)
{
    if (path_rtt_us)
        *path_rtt_us = s ? s->path_rtt_us : 0;
    return s ? s->sndbuf_set : 0;
}

static int add_fd(int ep, int fd, uint32_t id)
{
    struct epoll_event e = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.u32 = id};
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
}

dwcp_streams *dwcp_streams_new(const int *fds, int n, const dwcp_set_opts *opts)
{
    if (!fds || n < 1 || n > DWCP_MAX_STREAMS)
        return NULL;
    int ctl_fd = opts ? opts->control_fd : -1;
    if (opts && (opts->busy_poll_us < 0 || opts->busy_poll_us > 1000000))
        return NULL;
    int want = opts ? opts->io_threads : 0;
    if (want < 0 || want > DWCP_MAX_IO_THREADS)
        return NULL;
    dwcp_streams *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->n = n;
    s->nl = n + (ctl_fd >= 0);
    s->busy_poll_ns = opts ? (int64_t)opts->busy_poll_us * 1000 : 0;
    if (opts && opts->cipher != DWCP_CIPHER_NONE &&
        (!dwcp_cipher_key_bytes(opts->cipher) || !opts->tx_secret || !opts->rx_secret ||
         (opts->dir != 0 && opts->dir != 1))) {
        free(s);
        return NULL;
    }
    s->solo_ep = s->solo_evfd = -1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->inbox_mu, NULL);
    pthread_mutex_init(&s->pause_mu, NULL);
    pthread_cond_init(&s->go_cv, NULL);
    pthread_cond_init(&s->done_cv, NULL);
    int T = want ? want : dwcp_usable_cpus();
    if (T > n)
        T = n;
    if (T > DWCP_MAX_IO_THREADS)
        T = DWCP_MAX_IO_THREADS;
    if (T < 1)
        T = 1;
    s->T = T;
    s->l = calloc((size_t)s->nl, sizeof *s->l);
    s->w = calloc((size_t)T, sizeof *s->w);
    if (!s->l || !s->w)
        goto fail;
    for (int i = 0; i < T; i++) {
        worker *w = &s->w[i];
        w->s = s;
        w->id = i;
        w->ep = epoll_create1(EPOLL_CLOEXEC);
        w->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        w->scratch = malloc(SCRATCH_BYTES);
        if (w->ep < 0 || w->evfd < 0 || !w->scratch)
            goto fail;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = EV_WAKE};
        if (epoll_ctl(w->ep, EPOLL_CTL_ADD, w->evfd, &ev) < 0)
            goto fail;
    }
    s->solo_ep = epoll_create1(EPOLL_CLOEXEC);
    s->solo_evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->solo_ep < 0 || s->solo_evfd < 0)
        goto fail;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = EV_WAKE};
    if (epoll_ctl(s->solo_ep, EPOLL_CTL_ADD, s->solo_evfd, &ev) < 0)
        goto fail;
    for (int i = 0; i < s->nl; i++) {
        lnk *t = &s->l[i];
        t->fd = i < n ? fds[i] : ctl_fd;
        t->idx = i;
        t->is_ctl = i == n;
        t->wire = t->is_ctl ? (uint16_t)DWCP_STREAM_CONTROL : (uint16_t)i;
        t->owner = t->is_ctl ? 0 : i % T;
        t->readable = t->writable = 1; /* no edge seen yet: look, and let EAGAIN correct it */
        t->rb = malloc(RBUF_BYTES);
        if (t->fd < 0 || !t->rb || dwcp_csum_init(&t->rx_sum) < 0)
            goto fail;
        if (opts && opts->cipher != DWCP_CIPHER_NONE) {
            /* The peer's frames carry the other direction byte: a frame reflected back at its
             * sender never opens. */
            s->sealed = t->sealed = 1;
            if (dwcp_seal_init(&t->tx_seal, opts->cipher, 1, opts->tx_secret, (uint8_t)opts->dir, t->wire,
                               opts->rekey_bytes) < 0 ||
                dwcp_seal_init(&t->rx_seal, opts->cipher, 0, opts->rx_secret, (uint8_t)(1 - opts->dir),
                               t->wire, opts->rekey_bytes) < 0)
                goto fail;
        }
        int fl = fcntl(t->fd, F_GETFL);
        if (fl < 0 || fcntl(t->fd, F_SETFL, fl | O_NONBLOCK) < 0)
            goto fail;
        int one = 1;
        setsockopt(t->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (add_fd(s->solo_ep, t->fd, (uint32_t)i) < 0)
            goto fail; /* not pollable, or the same fd twice */
        if (add_fd(s->w[t->owner].ep, t->fd, (uint32_t)i) < 0)
            goto fail;
        t->alive = 1;
    }
    s->n_alive = s->nl;
    s->n_alive_data = n;
    s->n_carriers = n;
    size_send_buffers(s, opts ? opts->sndbuf_bytes : 0);
    DBG_ADD(g_live_sets, 1);
    return s;
fail:
    free_set(s);
    return NULL;
}

void dwcp_streams_free(dwcp_streams *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_broadcast(&s->go_cv);
    pthread_mutex_unlock(&s->mu);
    for (int i = 1; i < s->T; i++) {
        if (s->w[i].started) {
            pthread_join(s->w[i].th, NULL);
            DBG_ADD(g_io_threads, -1);
        }
    }
    /* Completions still owed (a peer that never read): the pages stay pinned by the kernel, which
     * holds its own references, so this leaks nothing but the count. */
    free_set(s);
    DBG_ADD(g_live_sets, -1);
}

int dwcp_streams_count(const dwcp_streams *s)
{
    return s ? s->n : 0;
}

int dwcp_streams_io_threads(const dwcp_streams *s)
{
    return s ? s->T : 0;
}

int dwcp_streams_alive(const dwcp_streams *s, int i)
{
    if (!s || i < 0 || i >= s->nl)
        return 0;
    return is_alive(&s->l[i]) && !__atomic_load_n(&s->l[i].kill_req, __ATOMIC_RELAXED);
}

int dwcp_streams_alive_count(const dwcp_streams *s)
{
    int c = 0;
    for (int i = 0; s && i < s->n; i++)
        c += dwcp_streams_alive(s, i);
    return c;
}

int dwcp_streams_pause(dwcp_streams *s, int i, int paused)
{
    if (!s || i < 0 || i >= s->n)
        return DWCP_E_INVAL;
    lnk *t = &s->l[i];
    paused = paused != 0;
    pthread_mutex_lock(&s->pause_mu);
    int was = __atomic_exchange_n(&t->paused, paused, __ATOMIC_ACQ_REL);
    if (was != paused && is_alive(t))
        __atomic_fetch_add(&s->n_carriers, paused ? -1 : 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&s->pause_mu);
    if (was && !paused) {
        /* The stream's socket may have been writable all along (edge-triggered epoll reports no
         * new edge): wake the threads so they look at it again. */
        wake(s->solo_evfd);
        for (int k = 0; k < s->T; k++)
            wake(s->w[k].evfd);
    }
    return 0;
}

int dwcp_streams_paused(const dwcp_streams *s, int i)
{
    if (!s || i < 0 || i >= s->n)
        return 0;
    return __atomic_load_n(&s->l[i].paused, __ATOMIC_ACQUIRE);
}

void dwcp_streams_kill(dwcp_streams *s, int i)
{
    if (!s || i < 0 || i >= s->nl)
        return;
    lnk *t = &s->l[i];
    if (__atomic_exchange_n(&t->kill_req, 1, __ATOMIC_SEQ_CST))
        return;
    /* The socket is shut down here (thread-safe) so a call blocked on it wakes up; its chunks are
     * re-queued by the thread that drives the link, which owns the per-link state. */
    shutdown(t->fd, SHUT_RDWR);
    __atomic_store_n(&s->kills, 1, __ATOMIC_SEQ_CST); /* after kill_req: see settle_kills */
    wake(s->solo_evfd);
    for (int k = 0; k < s->T; k++)
        wake(s->w[k].evfd);
}

void dwcp_streams_stats(const dwcp_streams *s, dwcp_stats *out)
{
    if (!s || !out)
        return;
    memset(out, 0, sizeof *out);
    for (int i = 0; i < s->T; i++) {
        const dwcp_stats *w = &s->w[i].st;
        out->bytes_payload += DWCP_GET(w->bytes_payload);
        out->bytes_wire += DWCP_GET(w->bytes_wire);
        out->chunks += DWCP_GET(w->chunks);
        out->chunks_resent += DWCP_GET(w->chunks_resent);
        out->chunks_duplicate += DWCP_GET(w->chunks_duplicate);
        out->checksum_errors += DWCP_GET(w->checksum_errors);
        out->zc_sends += DWCP_GET(w->zc_sends);
        out->zc_completions += DWCP_GET(w->zc_completions);
        out->zc_copied += DWCP_GET(w->zc_copied);
        out->control_frames += DWCP_GET(w->control_frames);
        out->mt_transfers += DWCP_GET(w->mt_transfers);
    }
    out->streams_failed = DWCP_GET(s->streams_failed);
    out->zc_fallback = (uint64_t)__atomic_load_n(&s->zc_fallback, __ATOMIC_RELAXED);
    out->last_errno = DWCP_GET(s->last_errno);
    out->last_failed_stream = DWCP_GET(s->last_failed_stream);
    out->truncated_at = DWCP_GET(s->truncated_at);
    out->auth_failures = DWCP_GET(s->auth_failures);
    for (int i = 0; s->sealed && i < s->nl; i++)
        out->rekeys += DWCP_GET(s->l[i].tx_seal.rekeys) + DWCP_GET(s->l[i].rx_seal.rekeys);
}

void dwcp_streams_interrupt(dwcp_streams *s)
{
    if (!s)
        return;
    __atomic_store_n(&s->interrupt, 1, __ATOMIC_RELEASE);
    wake(s->solo_evfd);
    for (int k = 0; k < s->T; k++)
        wake(s->w[k].evfd);
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
    out->io_threads = __atomic_load_n(&g_io_threads, __ATOMIC_RELAXED);
    return 0;
#else
    (void)out;
    return DWCP_E_INVAL;
#endif
}
