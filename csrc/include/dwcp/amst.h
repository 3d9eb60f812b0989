/* AMST: the striped multi-stream transfer engine.
 *
 * A dwcp_streams object owns the per-connection state of one session: its N data streams and, when
 * given, its control connection (the fds stay owned by the caller, who closes them after
 * dwcp_streams_free). Every connection is a *link*: after the handshake any link may carry any frame
 * (docs/protocol.md "Links"), so a session keeps working while at least one link is left. DATA goes on
 * the data streams; the control connection carries it only when no data stream is left.
 *
 * The state persists across calls because a link can be in the middle of a frame when a call ends (a
 * duplicate chunk re-sent after another stream died): that frame's tail is finished (sender: from a
 * private copy) or discarded (receiver) by the next call, so the caller's buffer is never touched after
 * a call returns. Bytes read ahead of the call that needs them (a frame of the next transfer, the
 * peer's next XFER_BEGIN) are kept for that call.
 *
 * Threads: large transfers are driven by io_threads threads (the calling thread plus helpers that the
 * set starts once and keeps), each with its own epoll set and a fixed share of the links, pulling
 * chunks from one shared queue so that faster links still carry more. Small transfers, and the calls
 * that wait for or send control frames, run in the calling thread alone: waking helpers would cost
 * more than the transfer. No call ever takes the GIL. */
#ifndef DWCP_AMST_H
#define DWCP_AMST_H

#include <stddef.h>
#include <stdint.h>

#include "dwcp/frame.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DWCP_MAX_STREAMS 256
#define DWCP_MAX_IO_THREADS 64
/* Stream index the frames on the control connection carry once the handshake is over (data streams
 * use 0..N-1): every frame names the link it travels on, so a frame moved to another link is caught. */
#define DWCP_STREAM_CONTROL 0xFFFFu
/* Send buffers on short paths (see dwcp_set_opts.sndbuf_bytes). The kernel autotunes a loopback or
 * LAN connection's send buffer up to tcp_wmem's maximum (4 MiB here) although its bandwidth-delay
 * product is a few hundred KiB at most; with several streams the data queued in those buffers no
 * longer fits the caches, and every byte goes through DRAM twice more (loopback, 4 streams: 29 ->
 * 62 Gbit/s with this cap). 512 KiB asks for 1 MiB (the kernel doubles it), enough for 40 Gbit/s per
 * stream at 200 us. */
#define DWCP_LAN_RTT_US 200
#define DWCP_LAN_SNDBUF_BYTES (512 << 10)
/* Transfers at least this long (and with at least two chunks per thread) use the I/O threads. */
#define DWCP_MT_MIN_BYTES (4u << 20)

typedef struct dwcp_streams dwcp_streams;

typedef struct dwcp_set_opts {
    int control_fd;  /* the session's control connection, or -1 */
    int io_threads;  /* threads driving large transfers: 0 = as many as usable CPUs; capped at the
                        number of data streams and DWCP_MAX_IO_THREADS */
    int sndbuf_bytes; /* send buffer of every link: 0 = auto (links with a smoothed RTT under
                         DWCP_LAN_RTT_US get DWCP_LAN_SNDBUF_BYTES, others keep the kernel's
                         autotuning), < 0 = leave the kernel's autotuning, > 0 = this size */
    int busy_poll_us; /* a call on a small transfer (< DWCP_MT_MIN_BYTES) or waiting for a control
                         frame polls without sleeping for up to this long in all before it sleeps
                         (0..1000000; 0 = never): waking a sleeping task costs more than a small
                         transfer's round trip on a VM */
    /* Sealed frames (dwcp/aead.h): cipher != DWCP_CIPHER_NONE seals every frame on every link with
     * keys derived from tx_secret (frames this side sends) and rx_secret (frames it receives). dir is
     * this side's direction byte in the nonce: 0 for the client, 1 for the server. rekey_bytes: data
     * one key may seal before its link moves to the next epoch (0: DWCP_REKEY_BYTES_DEFAULT). */
    int cipher;
    int dir;
    const uint8_t *tx_secret;
    const uint8_t *rx_secret;
    uint64_t rekey_bytes;
} dwcp_set_opts;

enum dwcp_zerocopy_mode {
    DWCP_ZC_OFF = 0,
    DWCP_ZC_ON = 1, /* MSG_ZEROCOPY for payloads >= zc_min_bytes; falls back when the kernel copies */
};

typedef struct dwcp_xfer_opts {
    uint64_t transfer_id;
    uint64_t length;        /* logical transfer length in bytes (may exceed buf_len when wrapping) */
    uint32_t chunk_bytes;   /* chunk size; every chunk but the last is exactly this long */
    uint16_t csum_flags;    /* DWCP_FLAG_CSUM_CRC32C or DWCP_FLAG_CSUM_XXH3 (or 0: no payload checksum) */
    uint16_t frame_flags;   /* extra flags copied into every DATA frame (e.g. DWCP_FLAG_COMPRESSED) */
    int timeout_ms;         /* max time without progress (any byte moved on any link); <=0: 30000 */
    int zerocopy;           /* enum dwcp_zerocopy_mode (sender only) */
    uint32_t zc_min_bytes;  /* payloads below this are copied (pinning costs more); 0: 32 KiB */
    int64_t deadline_ns;    /* sender only: CLOCK_MONOTONIC ns after which no new chunk is started and
                               the transfer is truncated at the next chunk boundary; 0 = none */
    const uint8_t *begin;   /* sender only: XFER_BEGIN payload (<= 64 KiB) announcing the transfer, or
                               NULL. Sent on every link ahead of that link's first frame of the
                               transfer (and alone when there is no data), so a receiver never meets
                               a transfer's data before its announcement on the same link. */
    uint32_t begin_len;
    int sink;               /* receiver, wrap mode only (benchmarks): each thread lands its chunks
                               round-robin in its own share of buf instead of at offset % buf_len,
                               as iperf gives each stream its own buffer. Every payload is still
                               received in full and verified; chunks arriving at once on different
                               threads never share cache lines (they would bounce between cores). */
} dwcp_xfer_opts;

/* Counters of one stream set, cumulative over its life, merged over its threads. Each thread keeps
 * its own (no shared cache line on the data path); a read while a transfer runs is consistent enough
 * for progress displays. */
typedef struct dwcp_stats {
    uint64_t bytes_payload;      /* payload bytes moved (sent or received and verified) */
    uint64_t bytes_wire;         /* frame bytes written/read on the sockets */
    uint64_t chunks;             /* chunks completed (acked on the sender, verified on the receiver) */
    uint64_t chunks_resent;      /* sender: chunks sent again after a link death or NACK */
    uint64_t chunks_duplicate;   /* receiver: chunks received again and discarded */
    uint64_t checksum_errors;    /* receiver: payloads that failed their checksum (NACKed) */
    uint64_t streams_failed;     /* links that died (data streams and the control connection) */
    uint64_t zc_sends;           /* sendmsg calls with MSG_ZEROCOPY */
    uint64_t zc_completions;     /* completion notifications reaped */
    uint64_t zc_copied;          /* ... of which the kernel reported it copied anyway */
    uint64_t zc_fallback;        /* 1 once zero-copy was abandoned because the kernel copies */
    uint64_t last_errno;         /* errno of the last failed syscall (for TransportError) */
    uint64_t last_failed_stream; /* index of the last link that died (N = the control connection) */
    uint64_t truncated_at;       /* receiver/sender: logical length after a TRUNCATE, else 0 */
    uint64_t control_frames;     /* XFER_BEGIN/ABORT/CLOSE frames received and delivered */
    uint64_t mt_transfers;       /* transfers driven by more than one thread */
    uint64_t auth_failures;      /* sealed frames that failed authentication (their link died) */
    uint64_t rekeys;             /* epochs entered after the first, both directions, all links */
} dwcp_stats;

/* fds: n connected TCP sockets (any blocking mode: the engine sets O_NONBLOCK and TCP_NODELAY, the
 * latter because ACK frames are small writes that Nagle would hold back behind unacknowledged data).
 * One set may carry transfers in both directions, one call at a time (Session does): transfer ids
 * must grow per direction (DWCP_E_INVAL otherwise), and late frames of the other direction (ACK/DONE
 * of an earlier send while receiving, DATA of an earlier receive while sending) are dropped as stale.
 * Stream i sends and expects frames with stream index i; the control link uses DWCP_STREAM_CONTROL.
 * opts may be NULL (no control link, automatic thread count).
 * Returns NULL on bad arguments, duplicate or non-pollable fds, or out of memory. */
dwcp_streams *dwcp_streams_new(const int *fds, int n, const dwcp_set_opts *opts);
/* Stops the helper threads and frees everything (not the fds). No call may be running. */
void dwcp_streams_free(dwcp_streams *s);
int dwcp_streams_count(const dwcp_streams *s);
/* Threads a large transfer on this set uses (1 = only the calling thread). */
int dwcp_streams_io_threads(const dwcp_streams *s);
/* 1 if data stream i is still usable; i == count names the control link (0 if there is none). */
int dwcp_streams_alive(const dwcp_streams *s, int i);
/* Usable data streams (the control link not counted). */
int dwcp_streams_alive_count(const dwcp_streams *s);
/* Pause (paused != 0) or resume data stream i as a sender (thread-safe, also while a transfer runs):
 * a paused stream starts no new chunk, while the frame it is writing and the ACKs it reads go on, and
 * it still carries chunks when every stream left is paused. The receiver needs no notice: any stream
 * may carry any chunk. This is how a stream-count tuner retires and adds streams within a session.
 * Returns 0, or DWCP_E_INVAL for a bad index. */
int dwcp_streams_pause(dwcp_streams *s, int i, int paused);
/* 1 if data stream i is paused. */
int dwcp_streams_paused(const dwcp_streams *s, int i);
/* Mark a link dead (i == count: the control link); the engine also shuts the socket down. */
void dwcp_streams_kill(dwcp_streams *s, int i);
/* The SO_SNDBUF the set gave its links (0: left to the kernel's autotuning) and, in auto mode, the
 * largest smoothed RTT of its links at that moment (0 if not measured). */
int dwcp_streams_sndbuf(const dwcp_streams *s, uint32_t *path_rtt_us);
/* Snapshot of the counters. */
void dwcp_streams_stats(const dwcp_streams *s, dwcp_stats *out);

/* Send buf[0..buf_len) as transfer opts->transfer_id. When opts->length > buf_len the logical byte
 * offset o is read from buf[o % buf_len] (memory-to-memory benchmarks); buf_len must then be a
 * multiple of chunk_bytes. Returns 0 once every chunk is acknowledged (or the receiver said DONE) and
 * every zero-copy completion is reaped, so the caller may reuse buf; else DWCP_E_*. With a begin
 * payload the call also waits for the receiver's DONE when there is no chunk to acknowledge. On
 * success *sent_length is the logical length actually transferred (< opts->length after a deadline).
 * DWCP_E_PEER_ABORT / DWCP_E_PEER_CLOSE: the peer sent ABORT / CLOSE (see dwcp_streams_stop_frame). */
int dwcp_send_transfer(dwcp_streams *s, const void *buf, uint64_t buf_len, const dwcp_xfer_opts *opts,
                       uint64_t *sent_length);

/* Receive transfer opts->transfer_id into buf (same wrapping rule). Returns 0 when every chunk is in
 * place and verified and DONE has been sent on every live link; *recv_length is the logical length
 * (smaller than opts->length if the sender truncated). */
int dwcp_recv_transfer(dwcp_streams *s, void *buf, uint64_t buf_len, const dwcp_xfer_opts *opts,
                       uint64_t *recv_length);

/* The next control frame (XFER_BEGIN, ABORT or CLOSE) the peer sent on any link. Waits up to
 * timeout_ms (< 0: no limit) while reading every link: late frames of earlier transfers are drained
 * (a late chunk of the last transfer received is answered with DONE again, in case the sender lost
 * the first one), frames of a transfer not yet announced stay where they are. Duplicate XFER_BEGINs
 * (a sender announces on every link it uses) are delivered once.
 * Returns 0 with *type, *transfer_id, the payload in buf[0..*len) (cap >= DWCP_MAX_CONTROL_BYTES);
 * DWCP_E_TIMEOUT when nothing arrived (the set stays usable); DWCP_E_ALL_STREAMS when no link is
 * left; DWCP_E_CLOSED after dwcp_streams_interrupt; a protocol error code when the peer sent data of
 * a transfer it never announced on every link it has. */
int dwcp_next_control(dwcp_streams *s, int timeout_ms, uint8_t *type, uint64_t *transfer_id, uint8_t *buf,
                      uint32_t cap, uint32_t *len);

/* Send a control frame (ABORT or CLOSE) on every live link, after any frame cut off by an earlier
 * call, within timeout_ms. Returns the number of links it was written on (0: none), or DWCP_E_*.
 * Ignores (and keeps) a pending interrupt, so a closing session can still say goodbye. */
int dwcp_send_control(dwcp_streams *s, uint8_t type, uint64_t transfer_id, const uint8_t *payload,
                      uint32_t len, int timeout_ms);

/* The ABORT or CLOSE frame that stopped the last call with DWCP_E_PEER_ABORT / DWCP_E_PEER_CLOSE:
 * its type and payload (copied into buf, at most cap bytes). Returns 0, or DWCP_E_INVAL if none. */
int dwcp_streams_stop_frame(const dwcp_streams *s, uint8_t *type, uint8_t *buf, uint32_t cap, uint32_t *len);

/* Ask a running call on s to stop with DWCP_E_CLOSED as soon as possible (thread-safe). An
 * interrupt that arrives while no call runs stops the next transfer or dwcp_next_control at its
 * start (so a close racing with the start of a transfer is never lost); the call that returns
 * DWCP_E_CLOSED consumes it. */
void dwcp_streams_interrupt(dwcp_streams *s);

/* 1 if SO_ZEROCOPY can be set on a TCP socket on this host (MSG_ZEROCOPY available). */
int dwcp_zerocopy_supported(void);

/* Usable CPUs of this process (sched_getaffinity), at least 1. */
int dwcp_usable_cpus(void);

/* Resource counters of builds with DWCP_DEBUG_COUNTERS (tests assert they balance at teardown). */
typedef struct dwcp_debug_counts {
    int64_t live_stream_sets; /* dwcp_streams_new minus dwcp_streams_free */
    int64_t zc_pending;       /* MSG_ZEROCOPY sends whose completion has not been reaped */
    int64_t carry_buffers;    /* private copies of frames cut off by the end of a call */
    int64_t io_threads;       /* helper threads running */
} dwcp_debug_counts;

/* Fills *out and returns 0 in builds with DWCP_DEBUG_COUNTERS; returns DWCP_E_INVAL otherwise. */
int dwcp_debug_counters(dwcp_debug_counts *out);

#ifdef __cplusplus
}
#endif
#endif
