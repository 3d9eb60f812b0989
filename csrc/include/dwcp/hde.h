/* HDE (hybrid delta encoding): the C kernels of page mode and buffer mode.
 *
 * Page mode cuts the new image into batches of whole pages. Each page of a batch gets a class:
 *   UNCHANGED  equal to the base page (or clean per the caller's dirty map): nothing is sent
 *   ZERO       all zero bytes: nothing but the class is sent
 *   PATCH      runs of bytes that differ from the base page: (gap, length) pairs plus the NEW bytes of
 *              each run (not the XOR: new bytes look like the rest of the data, so zstd finds matches
 *              for them across pages; XOR noise it cannot)
 *   RAW        the page itself (no base, or the patch would not be smaller)
 *   COPY       equal to a base page somewhere else (the content moved): the source is named by its
 *              displacement in pages; consecutive copies with one displacement are one run
 *   PATCH_FROM a PATCH against a base page somewhere else (a moved page that also changed)
 * Moved pages are found through an index of the base (dwcp_hde_index): a hash of every base page for
 * exact matches, and hashes of each page's quarters to find the page a changed page most resembles.
 * The batch body is sections -- the class bytes, the literal bytes, the run headers, the page
 * references (format 2) -- so that each compresses as its own kind of data; then the whole body goes through zstd once, which is where
 * most of the ratio comes from (matches across pages).
 *
 * Batch frame (64 bytes, little-endian; normative table in docs/hde.md):
 *   0  u32 magic "HDEB"     4  u8 codec   5  i8 level   6  u16 flags (DWCP_HDE_FLAG_*; format 1: 0)
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
    DWCP_HDE_COPY = 4,       /* format 2 */
    DWCP_HDE_PATCH_FROM = 5, /* format 2 */
};

/* Batch frame flags. A format-1 batch has none: its body has no refs section and only classes 0..3. */
#define DWCP_HDE_FLAG_REFS 0x1u         /* body has a refs section (format 2): COPY and PATCH_FROM allowed */
#define DWCP_HDE_FLAG_REFS_OUTSIDE 0x2u /* some COPY/PATCH_FROM reads a base page outside the batch's own
                                         * region: an in-place apply must decode this batch before any other
                                         * batch overwrites the base */
#define DWCP_HDE_FLAGS_KNOWN (DWCP_HDE_FLAG_REFS | DWCP_HDE_FLAG_REFS_OUTSIDE)

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
    DWCP_HDE_E_IO = -50,       /* a file write failed (dwcp_hde_decode_batch_fd) */
};

typedef struct dwcp_hde_counts {
    uint64_t unchanged, zero, patch, raw; /* pages per class */
    uint64_t copy, patch_from;            /* moved pages: exact, and patched */
    uint64_t copy_runs;                   /* refs entries that start a run of COPY pages */
    uint64_t patch_runs;                  /* runs in PATCH and PATCH_FROM pages */
    uint64_t literal_bytes;               /* new bytes carried by PATCH, PATCH_FROM and RAW pages */
    uint64_t body_bytes;                  /* decoded body size */
    uint64_t stored_bytes;                /* stored (compressed) body size */
} dwcp_hde_counts;

typedef struct dwcp_hde_header {
    uint8_t codec;
    int8_t level;
    uint16_t flags;
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

/* The base (the version the peer holds) as the encoder sees it: fixed-size segments, any of which may be
 * absent (evicted from the sender's baseline store; its pages are never referred to). A contiguous base
 * is one segment with seg_bytes >= length. seg_bytes is a multiple of the page size. */
typedef struct dwcp_hde_base {
    const uint8_t *const *segs; /* nseg pointers; NULL = segment absent */
    size_t nseg;
    size_t seg_bytes;
    uint64_t length;
} dwcp_hde_base;

/* An index of a base's pages: a hash table of whole pages (exact moves) and one of page quarters
 * (to find the base page a changed page most resembles). Built in two steps so that the hashing, which
 * reads the whole base, runs on many threads: dwcp_hde_index_hash on disjoint page ranges in parallel,
 * then dwcp_hde_index_finish once. After finish it is read-only and may be shared by any number of
 * encoder threads. It keeps pointers into the base's segments: they must outlive it.
 * Pages at or past 2^32 - 1 are not indexed (they are still sent, just never found as moved). */
typedef struct dwcp_hde_index dwcp_hde_index;
dwcp_hde_index *dwcp_hde_index_new(const dwcp_hde_base *base, uint32_t page_size);
uint64_t dwcp_hde_index_pages(const dwcp_hde_index *ix);
int dwcp_hde_index_hash(dwcp_hde_index *ix, uint64_t first_page, uint64_t npages);
int dwcp_hde_index_finish(dwcp_hde_index *ix);
void dwcp_hde_index_free(dwcp_hde_index *ix);

/* Encode pages [first, first + npages) of an image whose batch bytes are new_[0 .. new_len): every page
 * is page_size bytes except possibly the last (new_len need not be a multiple of page_size).
 * base: the whole version the peer holds (NULL when there is none); page first + i is compared with the
 * base at the same image offset, and, through ix (NULL: no moved-page search), with any base page.
 * dirty: NULL, or npages bytes, 0 = the caller guarantees the page did not change since the base (it is
 * sent as UNCHANGED without comparing). level: zstd level, or DWCP_HDE_LEVEL_OFF to store the body.
 * Writes one batch frame to out (out_cap >= dwcp_hde_batch_bound) and returns its length, or a
 * DWCP_HDE_E_* code. counts accumulate. */
#define DWCP_HDE_LEVEL_OFF (-128)
int64_t dwcp_hde_encode_batch(dwcp_hde_ctx *ctx, uint64_t first, const uint8_t *new_, size_t new_len,
                              const dwcp_hde_base *base, const dwcp_hde_index *ix, const uint8_t *dirty,
                              uint32_t page_size, int level, uint8_t *out, size_t out_cap,
                              dwcp_hde_counts *counts);

/* Validate and decode the fixed fields of a batch frame header (no payload access). */
int dwcp_hde_parse_header(const uint8_t *in, size_t in_len, dwcp_hde_header *hdr);

/* Decode one page-mode batch frame (header + stored bytes, exactly in_len bytes) whose pages cover
 * dst[0 .. dst_len) (dst_len = the batch's bytes in the new image, which starts at page `first` of the
 * header). base/base_len: the WHOLE base (NULL/0 if none); a page that needs base bytes beyond
 * base_len is DWCP_HDE_E_BASE. dst may never overlap base.
 * If commit is NULL, every page of dst is written (UNCHANGED pages copied from base). If commit is
 * non-NULL (it may be the batch's own region of base: in-place apply), dst is scratch: pages are
 * rebuilt there, checked against result_xxh3, and only then the changed pages are copied to commit --
 * so a bad batch leaves commit untouched. In place, a batch flagged DWCP_HDE_FLAG_REFS_OUTSIDE reads
 * other regions of base, so it must be decoded before any other batch commits. counts accumulate. */
int dwcp_hde_decode_batch(dwcp_hde_ctx *ctx, const uint8_t *in, size_t in_len, uint32_t page_size,
                          const uint8_t *base, size_t base_len, uint8_t *dst, size_t dst_len,
                          uint8_t *commit, dwcp_hde_counts *counts);

/* As dwcp_hde_decode_batch without commit, for file writers: the batch's image_bytes are rebuilt a
 * chunk at a time in the context and written to fd at fd_off onwards (pwrite; several threads may write
 * their batches to one fd). A failed check may come after some of the batch is written: write to a
 * temporary file and keep it only if every batch returned OK. DWCP_HDE_E_IO: a write failed (errno text
 * in dwcp_hde_ctx_error). */
int dwcp_hde_decode_batch_fd(dwcp_hde_ctx *ctx, const uint8_t *in, size_t in_len, uint32_t page_size,
                             const uint8_t *base, size_t base_len, size_t image_bytes, int fd, uint64_t fd_off,
                             dwcp_hde_counts *counts);

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
