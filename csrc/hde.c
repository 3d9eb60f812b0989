/* HDE page-mode and buffer-mode kernels (see dwcp/hde.h for the classes and the frame layout, and
 * docs/hde.md for the normative format). Everything here runs without the GIL on caller buffers.
 *
 * Batch body (decoded), little-endian:
 *   0       u32 lits_len
 *   4       u32 runs_len
 *   8       u8  class[page_count]
 *   ...     lits: for each RAW page its bytes, for each PATCH page the new bytes of its runs (page order)
 *   ...     runs: for each PATCH page: varint nruns, then nruns x (varint gap, varint len)
 * Sections rather than interleaved records: class bytes are long runs of one value, run headers are
 * small integers and literals are data; zstd models each far better when they are not interleaved. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>

#include "dwcp/frame.h"
#include "dwcp/hde.h"
#include "util.h"

#define BODY_PREFIX 8u
#define ERR_BYTES 160

struct dwcp_hde_ctx {
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    size_t max_batch_bytes;
    size_t max_pages;
    uint8_t *body;   /* 8 + max_pages + max_batch_bytes */
    uint8_t *runs;   /* max_batch_bytes + 16 (a page's run headers are staged behind a 5-byte gap) */
    uint8_t *hashes; /* 8 * max_pages */
    char err[ERR_BYTES];
};

static size_t body_capacity(size_t npages, size_t batch_bytes)
{
    /* Per page, PATCH is chosen only when its literals plus run headers are smaller than the page,
     * otherwise RAW (the page's bytes): so lits + runs never exceed the batch's bytes. */
    return BODY_PREFIX + npages + batch_bytes;
}

dwcp_hde_ctx *dwcp_hde_ctx_new(size_t max_batch_bytes)
{
    if (max_batch_bytes == 0 || max_batch_bytes > DWCP_HDE_MAX_BATCH_BYTES)
        return NULL;
    dwcp_hde_ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->max_batch_bytes = max_batch_bytes;
    c->max_pages = max_batch_bytes / DWCP_HDE_MIN_PAGE + 1;
    c->body = malloc(body_capacity(c->max_pages, max_batch_bytes));
    c->runs = malloc(max_batch_bytes + 16);
    c->hashes = malloc(8 * c->max_pages);
    c->cctx = ZSTD_createCCtx();
    c->dctx = ZSTD_createDCtx();
    if (!c->body || !c->runs || !c->hashes || !c->cctx || !c->dctx) {
        dwcp_hde_ctx_free(c);
        return NULL;
    }
    return c;
}

void dwcp_hde_ctx_free(dwcp_hde_ctx *c)
{
    if (!c)
        return;
    ZSTD_freeCCtx(c->cctx);
    ZSTD_freeDCtx(c->dctx);
    free(c->body);
    free(c->runs);
    free(c->hashes);
    free(c);
}

const char *dwcp_hde_ctx_error(const dwcp_hde_ctx *c)
{
    return c ? c->err : "";
}

static int zstd_fail(dwcp_hde_ctx *c, const char *what, size_t code)
{
    snprintf(c->err, sizeof(c->err), "%s: %s", what, ZSTD_getErrorName(code));
    return DWCP_HDE_E_ZSTD;
}

size_t dwcp_hde_batch_bound(uint32_t npages, uint32_t page_size)
{
    size_t bytes = (size_t)npages * page_size;
    return DWCP_HDE_BATCH_HEADER_BYTES + ZSTD_compressBound(body_capacity(npages, bytes));
}

size_t dwcp_hde_buffer_bound(size_t new_len)
{
    return DWCP_HDE_BATCH_HEADER_BYTES + ZSTD_compressBound(new_len);
}

/* Native-order word load for comparisons (equality does not care about byte order). */
static inline uint64_t ldw(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

int dwcp_hde_is_zero(const uint8_t *p, size_t n)
{
    size_t i = 0;
    /* 64 bytes per step, early exit: most non-zero pages are rejected in the first cache line. */
    for (; i + 64 <= n; i += 64) {
        uint64_t acc = ldw(p + i) | ldw(p + i + 8) | ldw(p + i + 16) | ldw(p + i + 24) |
                       ldw(p + i + 32) | ldw(p + i + 40) | ldw(p + i + 48) | ldw(p + i + 56);
        if (acc)
            return 0;
    }
    for (; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static inline size_t varint_put(uint8_t *o, uint32_t v)
{
    size_t k = 0;
    while (v >= 0x80) {
        o[k++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    o[k++] = (uint8_t)v;
    return k;
}

static inline size_t varint_len(uint32_t v)
{
    return v < (1u << 7) ? 1 : v < (1u << 14) ? 2 : v < (1u << 21) ? 3 : v < (1u << 28) ? 4 : 5;
}

/* Reads a varint from [*pp, end); 0 on success, -1 if it runs past end or over 32 bits. */
static inline int varint_get(const uint8_t **pp, const uint8_t *end, uint32_t *out)
{
    const uint8_t *p = *pp;
    uint32_t v = 0;
    for (unsigned shift = 0; shift < 35; shift += 7) {
        if (p >= end)
            return -1;
        uint8_t b = *p++;
        if (shift == 28 && (b & 0x70))
            return -1; /* more than 32 bits */
        v |= (uint32_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return 0;
        }
    }
    return -1;
}

/* Runs of bytes where p differs from b. Words are compared 8 bytes at a time; the ends of each run are
 * then trimmed to the exact differing byte. Equal bytes inside a run of differing words stay in the
 * run (at most 7 per word boundary): cheaper than a header per gap. Stops and returns -1 as soon as the
 * encoding would cost `limit` bytes or more (then the page goes RAW). `runs` needs limit + 5 bytes. */
static int64_t patch_encode(const uint8_t *p, const uint8_t *b, size_t n, size_t limit, uint8_t *lits,
                            uint8_t *runs, size_t *runs_used, uint32_t *nruns_out)
{
    /* nruns leads the page's run headers but is known only at the end: leave room for its longest
     * varint and move the headers down once it is written. */
    const size_t reserve = 5;
    size_t hdr_n = reserve, lit_n = 0, i = 0, prev = 0, cost = 0;
    uint32_t nruns = 0;
    while (i < n) {
        while (i + 8 <= n && ldw(p + i) == ldw(b + i))
            i += 8;
        while (i < n && p[i] == b[i])
            i++;
        if (i >= n)
            break;
        size_t start = i, j = i;
        while (j + 8 <= n && ldw(p + j) != ldw(b + j))
            j += 8;
        if (j + 8 > n)
            while (j < n && p[j] != b[j])
                j++;
        size_t end = j;
        while (end > start + 1 && p[end - 1] == b[end - 1])
            end--;
        uint32_t gap = (uint32_t)(start - prev), len = (uint32_t)(end - start);
        cost += varint_len(gap) + varint_len(len) + len;
        if (cost + varint_len(nruns + 1) >= limit)
            return -1;
        hdr_n += varint_put(runs + hdr_n, gap);
        hdr_n += varint_put(runs + hdr_n, len);
        memcpy(lits + lit_n, p + start, len);
        lit_n += len;
        nruns++;
        prev = end;
        i = j;
    }
    size_t k = varint_put(runs, nruns);
    memmove(runs + k, runs + reserve, hdr_n - reserve);
    *runs_used = k + hdr_n - reserve;
    *nruns_out = nruns;
    return (int64_t)lit_n;
}

/* The encoder's first two questions about a page: equal to its base page, or all zero? -1 when
 * neither (the page is then a patch candidate if it has a base, else raw). */
static inline int settled_class(const uint8_t *p, const uint8_t *b, size_t n)
{
    if (b && memcmp(p, b, n) == 0)
        return DWCP_HDE_UNCHANGED;
    if (dwcp_hde_is_zero(p, n))
        return DWCP_HDE_ZERO;
    return -1;
}

int dwcp_hde_classify(const uint8_t *page, const uint8_t *base, size_t n)
{
    int cls = settled_class(page, base, n);
    if (cls >= 0)
        return cls;
    return base ? DWCP_HDE_PATCH : DWCP_HDE_RAW;
}

/* A batch's counts join the caller's only once the batch has succeeded. */
static void add_counts(dwcp_hde_counts *to, const dwcp_hde_counts *k)
{
    to->unchanged += k->unchanged;
    to->zero += k->zero;
    to->patch += k->patch;
    to->raw += k->raw;
    to->patch_runs += k->patch_runs;
    to->literal_bytes += k->literal_bytes;
    to->body_bytes += k->body_bytes;
    to->stored_bytes += k->stored_bytes;
}

static void put_header(uint8_t *o, const dwcp_hde_header *h)
{
    dwcp_st32(o, DWCP_HDE_BATCH_MAGIC);
    o[4] = h->codec;
    o[5] = (uint8_t)h->level;
    dwcp_st16(o + 6, 0);
    dwcp_st64(o + 8, h->first);
    dwcp_st32(o + 16, h->page_count);
    dwcp_st32(o + 20, 0);
    dwcp_st64(o + 24, h->body_len);
    dwcp_st64(o + 32, h->stored_len);
    dwcp_st64(o + 40, h->stored_xxh3);
    dwcp_st64(o + 48, h->result_xxh3);
    dwcp_st32(o + 56, dwcp_crc32c(0, o, 56));
    dwcp_st32(o + 60, 0);
}

int dwcp_hde_parse_header(const uint8_t *in, size_t in_len, dwcp_hde_header *h)
{
    if (!in || !h)
        return DWCP_HDE_E_INVAL;
    if (in_len < DWCP_HDE_BATCH_HEADER_BYTES)
        return DWCP_HDE_E_TRUNCATED;
    if (dwcp_ld32(in) != DWCP_HDE_BATCH_MAGIC || dwcp_ld32(in + 56) != dwcp_crc32c(0, in, 56))
        return DWCP_HDE_E_HEADER;
    if (dwcp_ld16(in + 6) != 0 || dwcp_ld32(in + 20) != 0 || dwcp_ld32(in + 60) != 0 ||
        in[4] > DWCP_HDE_ZSTD_BASE)
        return DWCP_HDE_E_HEADER;
    h->codec = in[4];
    h->level = (int8_t)in[5];
    h->first = dwcp_ld64(in + 8);
    h->page_count = dwcp_ld32(in + 16);
    h->body_len = dwcp_ld64(in + 24);
    h->stored_len = dwcp_ld64(in + 32);
    h->stored_xxh3 = dwcp_ld64(in + 40);
    h->result_xxh3 = dwcp_ld64(in + 48);
    return DWCP_HDE_OK;
}

static int8_t level_byte(int level)
{
    if (level == DWCP_HDE_LEVEL_OFF)
        return 0;
    return (int8_t)(level < -127 ? -127 : level > 127 ? 127 : level);
}

static int valid_page_size(uint32_t ps)
{
    return ps >= DWCP_HDE_MIN_PAGE && ps <= DWCP_HDE_MAX_PAGE && (ps & (ps - 1)) == 0;
}

/* The smallest window (as a log2) covering `bytes`, within what this libzstd accepts (10..31 on 64-bit;
 * the ZSTD_WINDOWLOG_* macros are behind ZSTD_STATIC_LINKING_ONLY, so ask the library). */
static int window_log_for(size_t bytes)
{
    ZSTD_bounds b = ZSTD_cParam_getBounds(ZSTD_c_windowLog);
    int w = ZSTD_isError(b.error) ? 10 : b.lowerBound;
    int hi = ZSTD_isError(b.error) ? 27 : b.upperBound;
    while (w < hi && ((size_t)1 << w) < bytes)
        w++;
    return w;
}

static int window_log_max(void)
{
    ZSTD_bounds b = ZSTD_dParam_getBounds(ZSTD_d_windowLogMax);
    return ZSTD_isError(b.error) ? 27 : b.upperBound;
}

/* A fresh compression session at level (no parameters left from the previous frame); 0 or a zstd
 * error code. */
static size_t start_zstd(ZSTD_CCtx *z, int level)
{
    ZSTD_CCtx_reset(z, ZSTD_reset_session_and_parameters);
    size_t e = ZSTD_CCtx_setParameter(z, ZSTD_c_compressionLevel, level);
    return ZSTD_isError(e) ? e : 0;
}

/* Completes a frame whose payload goes at out + header. h->codec says what the caller left there:
 * STORED means raw is copied in now; otherwise zsize bytes of zstd frame are already in place. Fills
 * the header's level, lengths and stored checksum and writes it; returns the frame's length. */
static int64_t seal_frame(uint8_t *out, size_t out_cap, dwcp_hde_header *h, const uint8_t *raw,
                          size_t raw_len, size_t zsize, int level)
{
    uint8_t *dst = out + DWCP_HDE_BATCH_HEADER_BYTES;
    if (h->codec == DWCP_HDE_STORED) {
        if (raw_len > out_cap - DWCP_HDE_BATCH_HEADER_BYTES)
            return DWCP_HDE_E_SPACE;
        if (raw_len)
            memcpy(dst, raw, raw_len);
        zsize = raw_len;
    }
    h->level = h->codec == DWCP_HDE_STORED ? 0 : level_byte(level);
    h->body_len = raw_len;
    h->stored_len = zsize;
    h->stored_xxh3 = dwcp_xxh3(dst, zsize);
    put_header(out, h);
    return (int64_t)(DWCP_HDE_BATCH_HEADER_BYTES + zsize);
}

/* Compress (or store) body into out + header; fill the header's codec/stored fields. */
static int64_t store_body(dwcp_hde_ctx *c, const uint8_t *body, size_t body_len, int level, uint8_t *out,
                          size_t out_cap, dwcp_hde_header *h)
{
    uint8_t *dst = out + DWCP_HDE_BATCH_HEADER_BYTES;
    size_t cap = out_cap - DWCP_HDE_BATCH_HEADER_BYTES;
    size_t stored = 0;
    h->codec = DWCP_HDE_STORED;
    if (level != DWCP_HDE_LEVEL_OFF) {
        /* The window covers the whole body: zstd's level tables size it for generic input (2-8 MiB),
         * but a batch body is only as big as its changes and the decoder holds all of it anyway, so a
         * match anywhere in the batch costs the decoder nothing extra. */
        ZSTD_CCtx *z = c->cctx;
        size_t e;
        if ((e = start_zstd(z, level)) != 0)
            return zstd_fail(c, "set level", e);
        if (body_len > ((size_t)1 << 21)) {
            int wlog = window_log_for(body_len);
            if (wlog > 27)
                wlog = 27;
            if (ZSTD_isError(e = ZSTD_CCtx_setParameter(z, ZSTD_c_windowLog, wlog)))
                return zstd_fail(c, "set window", e);
        }
        size_t r = ZSTD_compress2(z, dst, cap, body, body_len);
        if (ZSTD_isError(r))
            return zstd_fail(c, "compress batch", r);
        if (r < body_len) {
            h->codec = DWCP_HDE_ZSTD;
            stored = r;
        }
    }
    return seal_frame(out, out_cap, h, body, body_len, stored, level);
}

int64_t dwcp_hde_encode_batch(dwcp_hde_ctx *c, uint64_t first, const uint8_t *new_, size_t new_len,
                              const uint8_t *base, size_t base_len, const uint8_t *dirty,
                              uint32_t page_size, int level, uint8_t *out, size_t out_cap,
                              dwcp_hde_counts *counts)
{
    if (!c || !new_ || !out || !counts || !valid_page_size(page_size) || new_len == 0 ||
        new_len > c->max_batch_bytes || (!base && base_len))
        return DWCP_HDE_E_INVAL;
    size_t npages = (new_len + page_size - 1) / page_size;
    if (npages > DWCP_HDE_MAX_BATCH_PAGES || npages > c->max_pages)
        return DWCP_HDE_E_INVAL;
    if (out_cap < dwcp_hde_batch_bound((uint32_t)npages, page_size))
        return DWCP_HDE_E_SPACE;

    uint8_t *classes = c->body + BODY_PREFIX;
    uint8_t *lits = classes + npages;
    size_t lit_n = 0, runs_n = 0, nhash = 0;
    dwcp_hde_counts k = {0};

    for (size_t pg = 0; pg < npages; pg++) {
        size_t off = pg * page_size;
        size_t n = new_len - off < page_size ? new_len - off : page_size;
        const uint8_t *p = new_ + off;
        const uint8_t *b = base && off + n <= base_len ? base + off : NULL;
        int settled = dirty && !dirty[pg] ? DWCP_HDE_UNCHANGED : settled_class(p, b, n);
        uint8_t cls;
        if (settled >= 0)
            cls = (uint8_t)settled;
        else {
            cls = DWCP_HDE_RAW;
            if (b) {
                size_t used = 0;
                uint32_t nruns = 0;
                int64_t l = patch_encode(p, b, n, n, lits + lit_n, c->runs + runs_n, &used, &nruns);
                if (l >= 0) {
                    cls = DWCP_HDE_PATCH;
                    lit_n += (size_t)l;
                    runs_n += used;
                    k.patch_runs += nruns;
                    k.literal_bytes += (uint64_t)l;
                }
            }
            if (cls == DWCP_HDE_RAW) {
                memcpy(lits + lit_n, p, n);
                lit_n += n;
                k.literal_bytes += n;
            }
        }
        classes[pg] = cls;
        switch (cls) {
        case DWCP_HDE_UNCHANGED: k.unchanged++; break;
        case DWCP_HDE_ZERO: k.zero++; break;
        case DWCP_HDE_PATCH: k.patch++; break;
        default: k.raw++; break;
        }
        if (cls != DWCP_HDE_UNCHANGED)
            dwcp_st64(c->hashes + 8 * nhash++, dwcp_xxh3(p, n));
    }
    memcpy(lits + lit_n, c->runs, runs_n);
    dwcp_st32(c->body, (uint32_t)lit_n);
    dwcp_st32(c->body + 4, (uint32_t)runs_n);
    size_t body_len = BODY_PREFIX + npages + lit_n + runs_n;

    dwcp_hde_header h = {0};
    h.first = first;
    h.page_count = (uint32_t)npages;
    h.result_xxh3 = dwcp_xxh3(c->hashes, 8 * nhash);
    int64_t r = store_body(c, c->body, body_len, level, out, out_cap, &h);
    if (r < 0)
        return r;
    k.body_bytes = body_len;
    k.stored_bytes = h.stored_len;
    add_counts(counts, &k);
    return r;
}

/* Checks a frame's stored bytes and makes its body available: *body points into `in` (stored) or into
 * zbuf (zstd, decompressed there; prefix is the zstd prefix of a ZSTD_BASE frame). */
static int open_body(dwcp_hde_ctx *c, const uint8_t *in, size_t in_len, const dwcp_hde_header *h,
                     uint8_t *zbuf, size_t zcap, const uint8_t *prefix, size_t prefix_len,
                     const uint8_t **body)
{
    if (h->stored_len > in_len - DWCP_HDE_BATCH_HEADER_BYTES)
        return DWCP_HDE_E_TRUNCATED;
    if (h->stored_len != in_len - DWCP_HDE_BATCH_HEADER_BYTES)
        return DWCP_HDE_E_INVAL; /* the caller hands over exactly one frame */
    const uint8_t *s = in + DWCP_HDE_BATCH_HEADER_BYTES;
    size_t slen = (size_t)h->stored_len;
    if (dwcp_xxh3(s, slen) != h->stored_xxh3)
        return DWCP_HDE_E_STORED;
    if (h->codec == DWCP_HDE_STORED) {
        if (h->stored_len != h->body_len)
            return DWCP_HDE_E_BODY;
        *body = s;
        return DWCP_HDE_OK;
    }
    if (h->codec == DWCP_HDE_ZSTD_BASE && !prefix_len)
        return DWCP_HDE_E_BASE;
    if (h->body_len > zcap)
        return DWCP_HDE_E_BODY;
    size_t fsz = ZSTD_findFrameCompressedSize(s, slen);
    if (ZSTD_isError(fsz) || fsz != slen || ZSTD_getFrameContentSize(s, slen) != h->body_len)
        return DWCP_HDE_E_BODY;
    ZSTD_DCtx *z = c->dctx;
    size_t e;
    ZSTD_DCtx_reset(z, ZSTD_reset_session_and_parameters);
    if (ZSTD_isError(e = ZSTD_DCtx_setParameter(z, ZSTD_d_windowLogMax, window_log_max())))
        return zstd_fail(c, "set window", e);
    if (h->codec == DWCP_HDE_ZSTD_BASE && ZSTD_isError(e = ZSTD_DCtx_refPrefix(z, prefix, prefix_len)))
        return zstd_fail(c, "reference base", e);
    size_t r = ZSTD_decompressDCtx(z, zbuf, (size_t)h->body_len, s, slen);
    ZSTD_DCtx_reset(z, ZSTD_reset_session_and_parameters);
    if (ZSTD_isError(r) || r != h->body_len) {
        if (ZSTD_isError(r))
            zstd_fail(c, "decompress", r);
        return DWCP_HDE_E_BODY;
    }
    *body = zbuf;
    return DWCP_HDE_OK;
}

static int ranges_overlap(const uint8_t *a, size_t an, const uint8_t *b, size_t bn)
{
    uintptr_t a0 = (uintptr_t)a, b0 = (uintptr_t)b;
    return a0 < b0 + bn && b0 < a0 + an;
}

int dwcp_hde_decode_batch(dwcp_hde_ctx *c, const uint8_t *in, size_t in_len, uint32_t page_size,
                          const uint8_t *base, size_t base_len, uint8_t *dst, size_t dst_len,
                          uint8_t *commit, dwcp_hde_counts *counts)
{
    if (!c || !in || !dst || !counts || !valid_page_size(page_size) || dst_len == 0 ||
        dst_len > c->max_batch_bytes || (!base && base_len))
        return DWCP_HDE_E_INVAL;
    if (!commit && base && ranges_overlap(dst, dst_len, base, base_len))
        return DWCP_HDE_E_INVAL;
    if (commit && ranges_overlap(dst, dst_len, commit, dst_len))
        return DWCP_HDE_E_INVAL;
    dwcp_hde_header h;
    int rc = dwcp_hde_parse_header(in, in_len, &h);
    if (rc)
        return rc;
    size_t npages = (dst_len + page_size - 1) / page_size;
    if (h.codec == DWCP_HDE_ZSTD_BASE || h.page_count != npages)
        return DWCP_HDE_E_BODY;
    if (h.body_len < BODY_PREFIX + npages || h.body_len > body_capacity(npages, dst_len))
        return DWCP_HDE_E_BODY;
    const uint8_t *body = NULL;
    rc = open_body(c, in, in_len, &h, c->body, body_capacity(c->max_pages, c->max_batch_bytes), NULL, 0,
                   &body);
    if (rc)
        return rc;

    uint64_t lits_len = dwcp_ld32(body), runs_len = dwcp_ld32(body + 4);
    if (BODY_PREFIX + npages + lits_len + runs_len != h.body_len)
        return DWCP_HDE_E_BODY;
    const uint8_t *classes = body + BODY_PREFIX;
    const uint8_t *lit = classes + npages, *lit_end = lit + lits_len;
    const uint8_t *run = lit_end, *run_end = run + runs_len;
    size_t nhash = 0;
    dwcp_hde_counts k = {0};

    for (size_t pg = 0; pg < npages; pg++) {
        size_t off = pg * page_size;
        size_t n = dst_len - off < page_size ? dst_len - off : page_size;
        const uint8_t *b = base && off + n <= base_len ? base + off : NULL;
        uint8_t *d = dst + off;
        switch (classes[pg]) {
        case DWCP_HDE_UNCHANGED:
            k.unchanged++;
            if (!commit) {
                if (!b)
                    return DWCP_HDE_E_BASE;
                memcpy(d, b, n);
            }
            continue;
        case DWCP_HDE_ZERO:
            k.zero++;
            memset(d, 0, n);
            break;
        case DWCP_HDE_RAW:
            k.raw++;
            if ((size_t)(lit_end - lit) < n)
                return DWCP_HDE_E_BODY;
            memcpy(d, lit, n);
            lit += n;
            k.literal_bytes += n;
            break;
        case DWCP_HDE_PATCH: {
            k.patch++;
            if (!b)
                return DWCP_HDE_E_BASE;
            memcpy(d, b, n);
            uint32_t nruns, gap, len;
            if (varint_get(&run, run_end, &nruns) || nruns == 0)
                return DWCP_HDE_E_BODY;
            size_t pos = 0;
            for (uint32_t r = 0; r < nruns; r++) {
                if (varint_get(&run, run_end, &gap) || varint_get(&run, run_end, &len) || len == 0)
                    return DWCP_HDE_E_BODY;
                if (gap > n - pos || len > n - pos - gap || len > (size_t)(lit_end - lit))
                    return DWCP_HDE_E_BODY;
                pos += gap;
                memcpy(d + pos, lit, len);
                lit += len;
                pos += len;
                k.literal_bytes += len;
            }
            k.patch_runs += nruns;
            break;
        }
        default:
            return DWCP_HDE_E_BODY;
        }
        dwcp_st64(c->hashes + 8 * nhash++, dwcp_xxh3(d, n));
    }
    if (lit != lit_end || run != run_end)
        return DWCP_HDE_E_BODY;
    if (dwcp_xxh3(c->hashes, 8 * nhash) != h.result_xxh3)
        return DWCP_HDE_E_RESULT;
    if (commit) {
        for (size_t pg = 0; pg < npages; pg++) {
            if (classes[pg] == DWCP_HDE_UNCHANGED)
                continue;
            size_t off = pg * page_size;
            size_t n = dst_len - off < page_size ? dst_len - off : page_size;
            memcpy(commit + off, dst + off, n);
        }
    }
    k.body_bytes = h.body_len;
    k.stored_bytes = h.stored_len;
    add_counts(counts, &k);
    return DWCP_HDE_OK;
}

int64_t dwcp_hde_encode_buffer(dwcp_hde_ctx *c, const uint8_t *new_, size_t new_len, const uint8_t *base,
                               size_t base_len, int level, int workers, uint8_t *out, size_t out_cap)
{
    if (!c || (!new_ && new_len) || !out || (!base && base_len))
        return DWCP_HDE_E_INVAL;
    if (out_cap < dwcp_hde_buffer_bound(new_len))
        return DWCP_HDE_E_SPACE;
    dwcp_hde_header h = {0};
    h.result_xxh3 = dwcp_xxh3(new_, new_len);
    uint8_t *dst = out + DWCP_HDE_BATCH_HEADER_BYTES;
    size_t cap = out_cap - DWCP_HDE_BATCH_HEADER_BYTES, stored = 0;
    h.codec = DWCP_HDE_STORED;
    if (level != DWCP_HDE_LEVEL_OFF) {
        ZSTD_CCtx *z = c->cctx;
        size_t e;
        if ((e = start_zstd(z, level)) != 0)
            return zstd_fail(c, "set level", e);
        /* Worker threads are an optimisation; a libzstd built without them just runs single-threaded. */
        if (workers > 1)
            (void)ZSTD_CCtx_setParameter(z, ZSTD_c_nbWorkers, workers);
        if (base_len) {
            /* As zstd --patch-from: a window covering base and new, long-distance matching so that
             * matches hundreds of MiB back (into the base) are found. */
            int wlog = window_log_for(base_len + new_len);
            if (ZSTD_isError(e = ZSTD_CCtx_setParameter(z, ZSTD_c_windowLog, wlog)) ||
                ZSTD_isError(e = ZSTD_CCtx_setParameter(z, ZSTD_c_enableLongDistanceMatching, 1)) ||
                ZSTD_isError(e = ZSTD_CCtx_refPrefix(z, base, base_len)))
                return zstd_fail(c, "prepare base prefix", e);
        }
        size_t r = ZSTD_compress2(z, dst, cap, new_, new_len);
        ZSTD_CCtx_reset(z, ZSTD_reset_session_and_parameters);
        if (ZSTD_isError(r))
            return zstd_fail(c, "compress buffer", r);
        if (r < new_len || (new_len == 0)) {
            h.codec = base_len ? DWCP_HDE_ZSTD_BASE : DWCP_HDE_ZSTD;
            stored = r;
        }
    }
    return seal_frame(out, out_cap, &h, new_, new_len, stored, level);
}

int dwcp_hde_decode_buffer(dwcp_hde_ctx *c, const uint8_t *in, size_t in_len, const uint8_t *base,
                           size_t base_len, uint8_t *dst, size_t dst_len)
{
    if (!c || !in || (!dst && dst_len) || (!base && base_len))
        return DWCP_HDE_E_INVAL;
    if (base && ranges_overlap(dst, dst_len, base, base_len))
        return DWCP_HDE_E_INVAL;
    dwcp_hde_header h;
    int rc = dwcp_hde_parse_header(in, in_len, &h);
    if (rc)
        return rc;
    if (h.first != 0 || h.page_count != 0 || h.body_len != dst_len)
        return DWCP_HDE_E_BODY;
    const uint8_t *body = NULL;
    rc = open_body(c, in, in_len, &h, dst, dst_len, base, base_len, &body);
    if (rc)
        return rc;
    if (body != dst && dst_len) /* stored: the body is the frame's payload */
        memcpy(dst, body, dst_len);
    if (dwcp_xxh3(dst, dst_len) != h.result_xxh3)
        return DWCP_HDE_E_RESULT;
    return DWCP_HDE_OK;
}
