/* HDE (hybrid delta encoding): the C kernels of page mode and buffer mode.
 *
 * Page mode cuts the new image into batches of whole pages. Each page of a batch gets a class:
 *   UNCHANGED  equal to the base page (or clean per the caller's dirty map): nothing is sent
 *   ZERO       all zero bytes: nothing but the class is sent
 *   PATCH      runs of bytes that differ from the base page: (gap, length) pairs plus the NEW bytes of
 *              each run (not the XOR: new bytes look like the rest of the data, so zstd finds matches
 *              for them across pages; XOR noise it cannot)
 *   RAW        the page itself (no base, or the patch would not be smaller)
 * The batch body is three sections -- the class bytes, the literal bytes, the run headers -- so that
 * each compresses as its own kind of data; then the whole body goes through zstd once, which is where
 * most of the ratio comes from (matches across pages).
 *
 * Batch frame (64 bytes, little-endian; normative table in docs/hde.md):
 *   0  u32 magic "HDEB"     4  u8 codec   5  i8 level   6  u16 flags (0)
 *   8  u64 first            first page of the batch (buffer mode: 0)
 *  16  u32 page_count       pages in the batch (buffer mode: 0)
 *  20  u32 reserved (0)
 *  24  u64 body_len         decoded body bytes (buffer mode: the new image's length)
 *  32  u64 stored_len       bytes of the stored body that follow the header
 *  40  u64 stored_xxh3      XXH3-64 of the stored bytes (checked before anything decodes them)
 *  48  u64 result_xxh3      page mode: XXH3-64 of the array of XXH3-64s of every page the batch
 *                           writes (class != UNCHANGED); buffer mode: XXH3-64 of the whole new image
 *  56  u32 header_crc       CRC32C of bytes 0..55
 *  60  u32 reserved (0)
 *
 * Every length and offset in a frame is checked against the header and the caller's buffers before it
 * is used; a bad frame is DWCP_HDE_E_* and never a write outside the destination. */
#ifndef DWCP_HDE_H
#define DWCP_HDE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DWCP_HDE_BATCH_MAGIC 0x42454448u /* "HDEB" as bytes */
#define DWCP_HDE_BATCH_HEADER_BYTES 64u
#define DWCP_HDE_MIN_PAGE 512u
#define DWCP_HDE_MAX_PAGE 65536u
#define DWCP_HDE_MAX_BATCH_PAGES 65536u
#define DWCP_HDE_MAX_BATCH_BYTES (64u << 20) /* page_count * page_size of one batch */

enum dwcp_hde_class {
    DWCP_HDE_UNCHANGED = 0,
    DWCP_HDE_ZERO = 1,
    DWCP_HDE_PATCH = 2,
    DWCP_HDE_RAW = 3,
};

enum dwcp_hde_codec {
    DWCP_HDE_STORED = 0,    /* body stored as is */
    DWCP_HDE_ZSTD = 1,      /* body is one zstd frame */
    DWCP_HDE_ZSTD_BASE = 2, /* buffer mode: one zstd frame made with the base as its prefix */
};

/* Errors (negative); the Python layer turns them into ProtocolError/ConfigError with context. */
enum dwcp_hde_err {
    DWCP_HDE_OK = 0,
    DWCP_HDE_E_HEADER = -40,   /* magic, reserved field, unknown codec or header CRC */
    DWCP_HDE_E_TRUNCATED = -41,/* fewer bytes than the header says */
    DWCP_HDE_E_STORED = -42,   /* stored bytes fail their checksum (corrupt in transit or on disk) */
    DWCP_HDE_E_BODY = -43,     /* decoded body malformed: sizes, classes, runs out of range */
    DWCP_HDE_E_BASE = -44,     /* a page needs base bytes the caller did not provide */
    DWCP_HDE_E_RESULT = -45,   /* rebuilt bytes fail result_xxh3: wrong base or corrupt delta */
    DWCP_HDE_E_ZSTD = -46,     /* zstd failed (message from dwcp_hde_ctx_error) */
    DWCP_HDE_E_SPACE = -47,    /* output capacity too small */
    DWCP_HDE_E_INVAL = -48,    /* bad argument from the caller */
    DWCP_HDE_E_NOMEM = -49,
};

typedef struct dwcp_hde_counts {
    uint64_t unchanged, zero, patch, raw; /* pages per class */
    uint64_t patch_runs;                  /* runs in PATCH pages */
    uint64_t literal_bytes;               /* new bytes carried by PATCH and RAW pages */
    uint64_t body_bytes;                  /* decoded body size */
    uint64_t stored_bytes;                /* stored (compressed) body size */
} dwcp_hde_counts;

typedef struct dwcp_hde_header {
    uint8_t codec;
    int8_t level;
    uint64_t first;
    uint32_t page_count;
    uint64_t body_len;
    uint64_t stored_len;
    uint64_t stored_xxh3;
    uint64_t result_xxh3;
} dwcp_hde_header;

/* A reusable per-thread context: a zstd compression and decompression context plus scratch space for
 * batches of up to max_batch_bytes. Not thread-safe; one per thread. */
typedef struct dwcp_hde_ctx dwcp_hde_ctx;

dwcp_hde_ctx *dwcp_hde_ctx_new(size_t max_batch_bytes);
void dwcp_hde_ctx_free(dwcp_hde_ctx *ctx);
/* Text of the last zstd error of this context ("" if none). */
const char *dwcp_hde_ctx_error(const dwcp_hde_ctx *ctx);

/* Bytes an encoded batch of npages pages can take at most (header included). */
size_t dwcp_hde_batch_bound(uint32_t npages, uint32_t page_size);

/* Encode pages [first, first + npages) of an image whose batch bytes are new_[0 .. new_len): every page
 * is page_size bytes except possibly the last (new_len need not be a multiple of page_size).
 * base/base_len: the same region of the version the peer holds (NULL/0 when there is none; pages past
 * base_len have no base). dirty: NULL, or npages bytes, 0 = the caller guarantees the page did not
 * change since the base (it is sent as UNCHANGED without comparing). level: zstd level, or
 * DWCP_HDE_LEVEL_OFF to store the body. Writes one batch frame to out (out_cap >=
 * dwcp_hde_batch_bound) and returns its length, or a DWCP_HDE_E_* code. counts accumulate. */
#define DWCP_HDE_LEVEL_OFF (-128)
int64_t dwcp_hde_encode_batch(dwcp_hde_ctx *ctx, uint64_t first, const uint8_t *new_, size_t new_len,
                              const uint8_t *base, size_t base_len, const uint8_t *dirty,
                              uint32_t page_size, int level, uint8_t *out, size_t out_cap,
                              dwcp_hde_counts *counts);

/* Validate and decode the fixed fields of a batch frame header (no payload access). */
int dwcp_hde_parse_header(const uint8_t *in, size_t in_len, dwcp_hde_header *hdr);

/* Decode one page-mode batch frame (header + stored bytes, exactly in_len bytes) whose pages cover
 * dst[0 .. dst_len) (dst_len = the batch's bytes in the new image). base/base_len: the same region of
 * the base (NULL/0 if none; a page that needs base bytes beyond base_len is DWCP_HDE_E_BASE).
 * If commit is NULL, every page of dst is written (UNCHANGED pages copied from base) and dst may not
 * overlap base. If commit is non-NULL (it may be base itself: in-place apply), dst is scratch: pages are
 * rebuilt there, checked against result_xxh3, and only then the changed pages are copied to commit --
 * so a bad batch leaves commit untouched. counts accumulate. */
int dwcp_hde_decode_batch(dwcp_hde_ctx *ctx, const uint8_t *in, size_t in_len, uint32_t page_size,
                          const uint8_t *base, size_t base_len, uint8_t *dst, size_t dst_len,
                          uint8_t *commit, dwcp_hde_counts *counts);

/* Buffer mode: the whole new image as one zstd frame, with base (if base_len > 0) as the prefix the
 * matches may refer to (long-distance matching on, window sized to base + new, as zstd --patch-from).
 * workers > 1 uses zstd's worker threads. Writes one batch frame; returns its length or an error. */
size_t dwcp_hde_buffer_bound(size_t new_len);
int64_t dwcp_hde_encode_buffer(dwcp_hde_ctx *ctx, const uint8_t *new_, size_t new_len, const uint8_t *base,
                               size_t base_len, int level, int workers, uint8_t *out, size_t out_cap);
/* Decode a buffer-mode frame into dst (dst_len must equal the header's body_len). */
int dwcp_hde_decode_buffer(dwcp_hde_ctx *ctx, const uint8_t *in, size_t in_len, const uint8_t *base,
                           size_t base_len, uint8_t *dst, size_t dst_len);

/* Kernels, exposed for tests and the adaptive-level calibration. */
int dwcp_hde_is_zero(const uint8_t *p, size_t n);
/* Class the encoder's first checks give a page (no output): UNCHANGED, ZERO, else PATCH when there is
 * a base (the encoder still sends it RAW if the patch would not be smaller) or RAW. */
int dwcp_hde_classify(const uint8_t *page, const uint8_t *base, size_t n);

#ifdef __cplusplus
}
#endif
#endif
