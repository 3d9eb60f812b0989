/* AMST: the striped multi-stream transfer engine.
 *
 * A dwcp_streams object owns the per-stream state of one session's data connections (the fds stay
 * owned by the caller, who closes them after dwcp_streams_free). It persists across transfers because
 * a stream can be in the middle of a frame when a transfer completes (a duplicate chunk re-sent after
 * another stream died): that frame's tail is finished (sender: from a private copy) or discarded
 * (receiver) by the next call, so the caller's buffer is never touched after a call returns. Likewise a
 * receiver that meets a frame of the next transfer (the sender moves on once it holds every ACK) keeps
 * its header for the next call.
 *
 * Both calls block until the transfer is complete, fails, or makes no progress for timeout_ms; they
 * never take the GIL. */
#ifndef DWCP_AMST_H
#define DWCP_AMST_H

#include <stddef.h>
#include <stdint.h>

#include "dwcp/frame.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DWCP_MAX_STREAMS 256

typedef struct dwcp_streams dwcp_streams;

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
    int timeout_ms;         /* max time without progress (any byte moved on any stream); <=0: 30000 */
    int zerocopy;           /* enum dwcp_zerocopy_mode (sender only) */
    uint32_t zc_min_bytes;  /* payloads below this are copied (pinning costs more); 0: 32 KiB */
    int64_t deadline_ns;    /* sender only: CLOCK_MONOTONIC ns after which no new chunk is started and
                               the transfer is truncated at the next chunk boundary; 0 = none */
} dwcp_xfer_opts;

/* Counters of one stream set, cumulative over its life. Updated with relaxed atomics by the engine so
 * another thread may read them while a transfer runs (progress displays). */
typedef struct dwcp_stats {
    uint64_t bytes_payload;      /* payload bytes moved (sent or received and verified) */
    uint64_t bytes_wire;         /* header + payload bytes written/read on the sockets */
    uint64_t chunks;             /* chunks completed (acked on the sender, verified on the receiver) */
    uint64_t chunks_resent;      /* sender: chunks sent again after a stream death or NACK */
    uint64_t chunks_duplicate;   /* receiver: chunks received again and discarded */
    uint64_t checksum_errors;    /* receiver: payloads that failed their checksum (NACKed) */
    uint64_t streams_failed;     /* streams that died */
    uint64_t zc_sends;           /* sendmsg calls with MSG_ZEROCOPY */
    uint64_t zc_completions;     /* completion notifications reaped */
    uint64_t zc_copied;          /* ... of which the kernel reported it copied anyway */
    uint64_t zc_fallback;        /* 1 once zero-copy was abandoned because the kernel copies */
    uint64_t last_errno;         /* errno of the last failed syscall (for TransportError) */
    uint64_t last_failed_stream; /* index of the last stream that died */
    uint64_t truncated_at;       /* receiver/sender: logical length after a TRUNCATE, else 0 */
} dwcp_stats;

/* fds: n connected TCP sockets (any blocking mode: the engine sets O_NONBLOCK and TCP_NODELAY, the
 * latter because ACK frames are small writes that Nagle would hold back behind unacknowledged data).
 * One set may carry transfers in both directions, one call at a time (Session does): transfer ids
 * must grow per direction (DWCP_E_INVAL otherwise), and late frames of the other direction (ACK/DONE
 * of an earlier send while receiving, DATA of an earlier receive while sending) are dropped as stale.
 * Stream i sends and expects frames with stream index i.
 * Returns NULL on bad arguments, duplicate or non-pollable fds, or out of memory. */
dwcp_streams *dwcp_streams_new(const int *fds, int n);
void dwcp_streams_free(dwcp_streams *s);
int dwcp_streams_count(const dwcp_streams *s);
/* 1 if stream i is still usable. */
int dwcp_streams_alive(const dwcp_streams *s, int i);
int dwcp_streams_alive_count(const dwcp_streams *s);
/* Mark a stream dead (tests kill a stream this way too: the engine also shuts the socket down). */
void dwcp_streams_kill(dwcp_streams *s, int i);
/* Snapshot of the counters (consistent enough for display; each field is read atomically). */
void dwcp_streams_stats(const dwcp_streams *s, dwcp_stats *out);

/* Send buf[0..buf_len) as transfer opts->transfer_id. When opts->length > buf_len the logical byte
 * offset o is read from buf[o % buf_len] (memory-to-memory benchmarks); buf_len must then be a
 * multiple of chunk_bytes. Returns 0 once every chunk is acknowledged (or the receiver said DONE) and
 * every zero-copy completion is reaped, so the caller may reuse buf; else DWCP_E_*. On success
 * *sent_length is the logical length actually transferred (< opts->length after a deadline). */
int dwcp_send_transfer(dwcp_streams *s, const void *buf, uint64_t buf_len, const dwcp_xfer_opts *opts,
                       uint64_t *sent_length);

/* Receive transfer opts->transfer_id into buf (same wrapping rule). Returns 0 when every chunk is in
 * place and verified and DONE has been sent on every live stream; *recv_length is the logical length
 * (smaller than opts->length if the sender truncated). */
int dwcp_recv_transfer(dwcp_streams *s, void *buf, uint64_t buf_len, const dwcp_xfer_opts *opts,
                       uint64_t *recv_length);

/* Ask a running transfer on s to stop with DWCP_E_CLOSED as soon as possible (thread-safe). An
 * interrupt that arrives while no transfer runs stops the next one at its start (so a close racing
 * with the start of a transfer is never lost); the call that returns DWCP_E_CLOSED consumes it. */
void dwcp_streams_interrupt(dwcp_streams *s);

/* 1 if SO_ZEROCOPY can be set on a TCP socket on this host (MSG_ZEROCOPY available). */
int dwcp_zerocopy_supported(void);

/* Resource counters of builds with DWCP_DEBUG_COUNTERS (tests assert they balance at teardown). */
typedef struct dwcp_debug_counts {
    int64_t live_stream_sets; /* dwcp_streams_new minus dwcp_streams_free */
    int64_t zc_pending;       /* MSG_ZEROCOPY sends whose completion has not been reaped */
    int64_t carry_buffers;    /* private copies of frames cut off by the end of a call */
} dwcp_debug_counts;

/* Fills *out and returns 0 in builds with DWCP_DEBUG_COUNTERS; returns DWCP_E_INVAL otherwise. */
int dwcp_debug_counters(dwcp_debug_counts *out);

#ifdef __cplusplus
}
#endif
#endif
