# C declarations of csrc/include/dwcp/amst.h (the striped transfer engine).
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t


cdef extern from "dwcp/amst.h" nogil:
    enum:
        DWCP_MAX_STREAMS
        DWCP_ZC_OFF
        DWCP_ZC_ON

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

    ctypedef struct dwcp_debug_counts:
        int64_t live_stream_sets
        int64_t zc_pending
        int64_t carry_buffers

    dwcp_streams *dwcp_streams_new(const int *fds, int n)
    void dwcp_streams_free(dwcp_streams *s)
    int dwcp_streams_count(const dwcp_streams *s)
    int dwcp_streams_alive(const dwcp_streams *s, int i)
    int dwcp_streams_alive_count(const dwcp_streams *s)
    void dwcp_streams_kill(dwcp_streams *s, int i)
    void dwcp_streams_stats(const dwcp_streams *s, dwcp_stats *out)
    int dwcp_send_transfer(dwcp_streams *s, const void *buf, uint64_t buf_len,
                           const dwcp_xfer_opts *opts, uint64_t *sent_length)
    int dwcp_recv_transfer(dwcp_streams *s, void *buf, uint64_t buf_len,
                           const dwcp_xfer_opts *opts, uint64_t *recv_length)
    void dwcp_streams_interrupt(dwcp_streams *s)
    int dwcp_zerocopy_supported()
    int dwcp_debug_counters(dwcp_debug_counts *out)
