# C declarations of csrc/include/dwcp/amst.h (the striped transfer engine).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t


cdef extern from "dwcp/amst.h" nogil:
    enum:
        DWCP_MAX_STREAMS
        DWCP_MAX_IO_THREADS
        DWCP_STREAM_CONTROL
        DWCP_MT_MIN_BYTES
        DWCP_ZC_OFF
        DWCP_ZC_ON

    ctypedef struct dwcp_set_opts:
        int control_fd
        int io_threads
        int sndbuf_bytes
        int busy_poll_us
        int cipher
        int dir
        const uint8_t *tx_secret
        const uint8_t *rx_secret
        uint64_t rekey_bytes

    ctypedef struct dwcp_streams:
        pass

    ctypedef struct dwcp_xfer_opts:
        uint64_t transfer_id
        uint64_t length
        uint32_t chunk_bytes
        uint16_t csum_flags
        uint16_t frame_flags
        int timeout_ms
        int zerocopy
        uint32_t zc_min_bytes
        int64_t deadline_ns
        const uint8_t *begin
        uint32_t begin_len
        int sink

    ctypedef struct dwcp_stats:
        uint64_t bytes_payload
        uint64_t bytes_wire
        uint64_t chunks
        uint64_t chunks_resent
        uint64_t chunks_duplicate
        uint64_t checksum_errors
        uint64_t streams_failed
        uint64_t zc_sends
        uint64_t zc_completions
        uint64_t zc_copied
        uint64_t zc_fallback
        uint64_t last_errno
        uint64_t last_failed_stream
        uint64_t truncated_at
        uint64_t control_frames
        uint64_t mt_transfers
        uint64_t auth_failures
        uint64_t rekeys

    ctypedef struct dwcp_debug_counts:
        int64_t live_stream_sets
        int64_t zc_pending
        int64_t carry_buffers
        int64_t io_threads

    dwcp_streams *dwcp_streams_new(const int *fds, int n, const dwcp_set_opts *opts)
    int dwcp_streams_io_threads(const dwcp_streams *s)
    int dwcp_streams_sndbuf(const dwcp_streams *s, uint32_t *path_rtt_us)
    void dwcp_streams_free(dwcp_streams *s)
    int dwcp_streams_count(const dwcp_streams *s)
    int dwcp_streams_alive(const dwcp_streams *s, int i)
    int dwcp_streams_alive_count(const dwcp_streams *s)
    void dwcp_streams_kill(dwcp_streams *s, int i)
    int dwcp_streams_pause(dwcp_streams *s, int i, int paused)
    int dwcp_streams_paused(const dwcp_streams *s, int i)
    void dwcp_streams_stats(const dwcp_streams *s, dwcp_stats *out)
    int dwcp_send_transfer(dwcp_streams *s, const void *buf, uint64_t buf_len,
                           const dwcp_xfer_opts *opts, uint64_t *sent_length)
    int dwcp_recv_transfer(dwcp_streams *s, void *buf, uint64_t buf_len,
                           const dwcp_xfer_opts *opts, uint64_t *recv_length)
    int dwcp_next_control(dwcp_streams *s, int timeout_ms, uint8_t *type, uint64_t *transfer_id,
                          uint8_t *buf, uint32_t cap, uint32_t *len)
    int dwcp_send_control(dwcp_streams *s, uint8_t type, uint64_t transfer_id, const uint8_t *payload,
                          uint32_t len, int timeout_ms)
    int dwcp_streams_stop_frame(const dwcp_streams *s, uint8_t *type, uint8_t *buf, uint32_t cap,
                                uint32_t *len)
    void dwcp_streams_interrupt(dwcp_streams *s)
    int dwcp_usable_cpus()
    int dwcp_zerocopy_supported()
    int dwcp_debug_counters(dwcp_debug_counts *out)
