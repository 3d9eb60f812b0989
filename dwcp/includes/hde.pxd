# C declarations of csrc/include/dwcp/hde.h (HDE page-mode and buffer-mode kernels).
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "dwcp/hde.h" nogil:
    enum:
        DWCP_HDE_BATCH_HEADER_BYTES
        DWCP_HDE_MIN_PAGE
        DWCP_HDE_MAX_PAGE
        DWCP_HDE_MAX_BATCH_PAGES
        DWCP_HDE_MAX_BATCH_BYTES
        DWCP_HDE_LEVEL_OFF

    enum dwcp_hde_class:
        DWCP_HDE_UNCHANGED
        DWCP_HDE_ZERO
        DWCP_HDE_PATCH
        DWCP_HDE_RAW
        DWCP_HDE_COPY
        DWCP_HDE_PATCH_FROM

    enum:
        DWCP_HDE_FLAG_REFS
        DWCP_HDE_FLAG_REFS_OUTSIDE

    enum dwcp_hde_codec:
        DWCP_HDE_STORED
        DWCP_HDE_ZSTD
        DWCP_HDE_ZSTD_BASE

    enum dwcp_hde_err:
        DWCP_HDE_OK
        DWCP_HDE_E_HEADER
        DWCP_HDE_E_TRUNCATED
        DWCP_HDE_E_STORED
        DWCP_HDE_E_BODY
        DWCP_HDE_E_BASE
        DWCP_HDE_E_RESULT
        DWCP_HDE_E_ZSTD
        DWCP_HDE_E_SPACE
        DWCP_HDE_E_INVAL
        DWCP_HDE_E_NOMEM
        DWCP_HDE_E_IO

    ctypedef struct dwcp_hde_counts:
        uint64_t unchanged, zero, patch, raw
        uint64_t copy, patch_from
        uint64_t copy_runs
        uint64_t patch_runs
        uint64_t literal_bytes
        uint64_t body_bytes
        uint64_t stored_bytes

    ctypedef struct dwcp_hde_header:
        uint8_t codec
        int8_t level
        uint16_t flags
        uint64_t first
        uint32_t page_count
        uint64_t body_len
        uint64_t stored_len
        uint64_t stored_xxh3
        uint64_t result_xxh3

    ctypedef struct dwcp_hde_ctx:
        pass

    ctypedef struct dwcp_hde_base:
        const uint8_t *const *segs
        size_t nseg
        size_t seg_bytes
        uint64_t length

    ctypedef struct dwcp_hde_index:
        pass

    dwcp_hde_index *dwcp_hde_index_new(const dwcp_hde_base *base, uint32_t page_size)
    uint64_t dwcp_hde_index_pages(const dwcp_hde_index *ix)
    int dwcp_hde_index_hash(dwcp_hde_index *ix, uint64_t first_page, uint64_t npages)
    int dwcp_hde_index_finish(dwcp_hde_index *ix)
    void dwcp_hde_index_free(dwcp_hde_index *ix)

    dwcp_hde_ctx *dwcp_hde_ctx_new(size_t max_batch_bytes)
    void dwcp_hde_ctx_free(dwcp_hde_ctx *ctx)
    const char *dwcp_hde_ctx_error(const dwcp_hde_ctx *ctx)
    size_t dwcp_hde_batch_bound(uint32_t npages, uint32_t page_size)
    int64_t dwcp_hde_encode_batch(dwcp_hde_ctx *ctx, uint64_t first, const uint8_t *new_, size_t new_len,
                                  const dwcp_hde_base *base, const dwcp_hde_index *ix, const uint8_t *dirty,
                                  uint32_t page_size, int level, uint8_t *out, size_t out_cap,
                                  dwcp_hde_counts *counts)
    int dwcp_hde_parse_header(const uint8_t *inp, size_t in_len, dwcp_hde_header *hdr)
    int dwcp_hde_decode_batch(dwcp_hde_ctx *ctx, const uint8_t *inp, size_t in_len, uint32_t page_size,
                              const uint8_t *base, size_t base_len, uint8_t *dst, size_t dst_len,
                              uint8_t *commit, dwcp_hde_counts *counts)
    int dwcp_hde_decode_batch_fd(dwcp_hde_ctx *ctx, const uint8_t *inp, size_t in_len, uint32_t page_size,
                                 const uint8_t *base, size_t base_len, size_t image_bytes, int fd,
                                 uint64_t fd_off, dwcp_hde_counts *counts)
    size_t dwcp_hde_buffer_bound(size_t new_len)
    int64_t dwcp_hde_encode_buffer(dwcp_hde_ctx *ctx, const uint8_t *new_, size_t new_len,
                                   const uint8_t *base, size_t base_len, int level, int workers,
                                   uint8_t *out, size_t out_cap)
    int dwcp_hde_decode_buffer(dwcp_hde_ctx *ctx, const uint8_t *inp, size_t in_len, const uint8_t *base,
                               size_t base_len, uint8_t *dst, size_t dst_len)
    int dwcp_hde_is_zero(const uint8_t *p, size_t n)
    int dwcp_hde_classify(const uint8_t *page, const uint8_t *base, size_t n)
