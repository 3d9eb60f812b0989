/* HDE page-mode and buffer-mode kernels (see dwcp/hde.h for the classes and the frame layout, and
 * docs/hde.md for the normative format). Everything here runs without the GIL on caller buffers.
 *
 * Batch body (decoded), little-endian (format 2: flag DWCP_HDE_FLAG_REFS; format 1 has no refs_len and
 * no refs section):
 *   0       u32 lits_len
 *   4       u32 runs_len
 *   8       u32 refs_len
 *   12      u8  class[page_count]
 *   ...     lits: for each RAW page its bytes, for each PATCH/PATCH_FROM page the new bytes of its runs
 *   ...     runs: for each PATCH/PATCH_FROM page: varint nruns, then nruns x (varint gap, varint len)
 *   ...     refs: in page order, for the first page of each run of COPY pages: varint zigzag(disp - last),
 *           varint count; for each PATCH_FROM page: varint zigzag(disp - last). disp is the source base
 *           page minus the page's own index (mod 2^64), last the previous entry's disp (0 at the start).
 * Sections rather than interleaved records: class bytes are long runs of one value, run headers are
 * small integers and literals are data; zstd models each far better when they are not interleaved. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zstd.h>

#include "dwcp/frame.h"
#include "dwcp/hde.h"
#include "util.h"

#define BODY_PREFIX_V1 8u
#define BODY_PREFIX 12u
#define ERR_BYTES 160
/* A refs entry: two varints, a zigzagged 64-bit displacement (<= 10 bytes) and a count (<= 5). */
#define REF_MAX 15u
/* A file writer's unit: small enough to stay in cache between being rebuilt and being written (the
 * kernel's copy into the page cache then reads it from cache), large enough that the write calls cost
 * nothing next to the copy. At least one page (pages are <= 64 KiB). */
#define DECODE_CHUNK (1u << 20)
#define NO_DISP (1ull << 63) /* "no match" in the per-page displacement arrays. Never a real one: page
                              * numbers are below 2^55 (pages >= 512 bytes), so g + 2^63 (mod 2^64) is
                              * never a page, while -1 (UINT64_MAX) is the most common displacement. */

struct dwcp_hde_ctx {
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    size_t max_batch_bytes;
    size_t max_pages;
    uint8_t *body;   /* 8 + max_pages + max_batch_bytes */
    uint8_t *runs;   /* max_batch_bytes + 16 (a page's run headers are staged behind a 5-byte gap) */
    uint8_t *hashes; /* 8 * max_pages */
    uint8_t *refs;   /* REF_MAX * max_pages */
    uint64_t *disp;  /* per page of the batch being encoded: the displacement of its exact match */
    uint64_t *near;  /* per page: displacement of the nearest exact match after it (NO_DISP: none) */
    uint8_t *chunk;  /* DECODE_CHUNK: pages rebuilt for a file writer, written a chunk at a time */
    char err[ERR_BYTES];
};

static size_t body_capacity(size_t npages, size_t batch_bytes)
{
    /* Per page, PATCH is chosen only when its literals plus run headers are smaller than the page,
     * PATCH_FROM only when those plus its refs entry are, otherwise RAW (the page's bytes); a COPY run
     * costs one refs entry (REF_MAX < the smallest page): so lits + runs + refs never exceed the
     * batch's bytes. */
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
    c->refs = malloc(REF_MAX * c->max_pages);
    c->disp = malloc(sizeof(uint64_t) * c->max_pages);
    c->near = malloc(sizeof(uint64_t) * c->max_pages);
    c->chunk = malloc(DECODE_CHUNK);
    c->cctx = ZSTD_createCCtx();
    c->dctx = ZSTD_createDCtx();
    if (!c->body || !c->runs || !c->hashes || !c->refs || !c->disp || !c->near || !c->chunk || !c->cctx || !c->dctx) {
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
    free(c->refs);
    free(c->disp);
    free(c->near);
    free(c->chunk);
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

static inline size_t varint64_put(uint8_t *o, uint64_t v)
{
    size_t k = 0;
    while (v >= 0x80) {
        o[k++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    o[k++] = (uint8_t)v;
    return k;
}

static inline size_t varint64_len(uint64_t v)
{
    size_t k = 1;
    while (v >= 0x80) {
        v >>= 7;
        k++;
    }
    return k;
}

/* Reads a varint of up to 64 bits; 0 on success, -1 if it runs past end or over 64 bits. */
static inline int varint64_get(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    uint64_t v = 0;
    for (unsigned shift = 0; shift < 70; shift += 7) {
        if (p >= end)
            return -1;
        uint8_t b = *p++;
        if (shift == 63 && (b & 0x7e))
            return -1;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return 0;
        }
    }
    return -1;
}

/* Displacements are differences of page numbers mod 2^64 (unsigned arithmetic: no overflow to
 * worry about); zigzag makes the small negative ones (content moved toward the start) small too. */
static inline uint64_t zigzag(uint64_t d)
{
    return (d << 1) ^ (0 - (d >> 63));
}

static inline uint64_t unzigzag(uint64_t z)
{
    return (z >> 1) ^ (0 - (z & 1));
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
        /* Bail out inside a long run too: against the wrong page the first run is the whole page. */
        while (j + 8 <= n && ldw(p + j) != ldw(b + j)) {
            j += 8;
            if (cost + (j - start) >= limit)
                return -1;
        }
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

/* ------------------------------------------------------------------------------------ base and index */

static int valid_page_size(uint32_t ps)
{
    return ps >= DWCP_HDE_MIN_PAGE && ps <= DWCP_HDE_MAX_PAGE && (ps & (ps - 1)) == 0;
}


/* n bytes of the base at image offset off, or NULL when they are not all there (past the end, or in
 * an absent segment). Segments are whole pages, so a page never straddles two. */
static const uint8_t *base_at(const dwcp_hde_base *b, uint64_t off, size_t n)
{
    if (!b || off >= b->length || n > b->length - off)
        return NULL;
    uint64_t s = off / b->seg_bytes;
    size_t in = (size_t)(off % b->seg_bytes);
    if (s >= b->nseg || !b->segs[s] || n > b->seg_bytes - in)
        return NULL;
    return b->segs[s] + in;
}

static int valid_base(const dwcp_hde_base *b, uint32_t page_size)
{
    return b && b->seg_bytes > 0 && b->seg_bytes % page_size == 0 && (b->nseg == 0 || b->segs) &&
           (b->length == 0 || (b->length - 1) / b->seg_bytes < b->nseg);
}

#define QUARTERS 4u
#define NO_PAGE UINT32_MAX
#define MAX_PROBES 16

typedef struct ix_slot {
    uint32_t tag;  /* high half of the hash */
    uint32_t page; /* NO_PAGE: empty */
} ix_slot;

struct dwcp_hde_index {
    dwcp_hde_base base;
    const uint8_t **segs;   /* the base's segment pointers, copied */
    uint32_t ps;
    uint64_t npages;        /* indexed pages: whole pages of the base, below NO_PAGE */
    uint64_t *page_hash;    /* XXH3 of each page; 0 = not indexed (absent or all zero) */
    uint64_t *quarter_hash; /* XXH3 of each quarter (seeded by its position); 0 = not indexed. Freed
                             * by finish: only the tables are needed afterwards. */
    ix_slot *pages_tab, *quarters_tab;
    uint64_t pages_mask, quarters_mask;
    int finished;
};

/* 0 marks "no hash" in the arrays: a real hash of 0 becomes 1 (one value in 2^64 less to tell apart). */
static inline uint64_t nonzero(uint64_t h)
{
    return h ? h : 1;
}

/* Quarter hashes are keyed by position so that quarter 0 of one page never matches quarter 2 of
 * another: a page that moved keeps its bytes at the same offsets inside the page. */
static inline uint64_t quarter_key(uint64_t h, unsigned q)
{
    return nonzero(h ^ (0x9E3779B97F4A7C15ull * (q + 1)));
}

dwcp_hde_index *dwcp_hde_index_new(const dwcp_hde_base *base, uint32_t page_size)
{
    if (!valid_page_size(page_size) || !valid_base(base, page_size))
        return NULL;
    dwcp_hde_index *ix = calloc(1, sizeof(*ix));
    if (!ix)
        return NULL;
    ix->ps = page_size;
    ix->base = *base;
    uint64_t whole = base->length / page_size;
    ix->npages = whole < NO_PAGE ? whole : NO_PAGE;
    ix->segs = calloc(base->nseg ? base->nseg : 1, sizeof(*ix->segs));
    ix->page_hash = calloc(ix->npages ? ix->npages : 1, sizeof(uint64_t));
    ix->quarter_hash = calloc(ix->npages ? ix->npages * QUARTERS : 1, sizeof(uint64_t));
    if (!ix->segs || !ix->page_hash || !ix->quarter_hash) {
        dwcp_hde_index_free(ix);
        return NULL;
    }
    if (base->nseg)
        memcpy(ix->segs, base->segs, base->nseg * sizeof(*ix->segs));
    ix->base.segs = ix->segs;
    return ix;
}

uint64_t dwcp_hde_index_pages(const dwcp_hde_index *ix)
{
    return ix ? ix->npages : 0;
}

int dwcp_hde_index_hash(dwcp_hde_index *ix, uint64_t first_page, uint64_t npages)
{
    if (!ix || ix->finished || first_page > ix->npages || npages > ix->npages - first_page)
        return DWCP_HDE_E_INVAL;
    const size_t ps = ix->ps, qs = ps / QUARTERS;
    for (uint64_t j = first_page; j < first_page + npages; j++) {
        const uint8_t *p = base_at(&ix->base, j * ps, ps);
        if (!p || dwcp_hde_is_zero(p, ps))
            continue; /* zero pages are their own class; absent ones may not be referred to */
        ix->page_hash[j] = nonzero(dwcp_xxh3(p, ps));
        for (unsigned q = 0; q < QUARTERS; q++)
            if (!dwcp_hde_is_zero(p + q * qs, qs))
                ix->quarter_hash[j * QUARTERS + q] = quarter_key(dwcp_xxh3(p + q * qs, qs), q);
    }
    return DWCP_HDE_OK;
}

static uint64_t table_slots(uint64_t entries)
{
    uint64_t n = 64;
    while (n < 2 * entries)
        n <<= 1;
    return n;
}

/* Insert keeps the first page of equal content (the earliest in the base). For pages, "equal" is
 * judged by the full 64-bit hash; for quarters by the key (position included). */
static void table_insert(ix_slot *tab, uint64_t mask, uint64_t key, uint32_t page, const uint64_t *keys,
                         unsigned stride, unsigned which)
{
    uint32_t tag = (uint32_t)(key >> 32);
    for (uint64_t i = key & mask;; i = (i + 1) & mask) {
        if (tab[i].page == NO_PAGE) {
            tab[i].tag = tag;
            tab[i].page = page;
            return;
        }
        if (tab[i].tag == tag && keys[(uint64_t)tab[i].page * stride + which] == key)
            return;
    }
}

int dwcp_hde_index_finish(dwcp_hde_index *ix)
{
    if (!ix || ix->finished)
        return DWCP_HDE_E_INVAL;
    uint64_t np = 0, nq = 0;
    for (uint64_t j = 0; j < ix->npages; j++) {
        np += ix->page_hash[j] != 0;
        for (unsigned q = 0; q < QUARTERS; q++)
            nq += ix->quarter_hash[j * QUARTERS + q] != 0;
    }
    uint64_t ps_n = table_slots(np), qs_n = table_slots(nq);
    ix->pages_tab = malloc(ps_n * sizeof(ix_slot));
    ix->quarters_tab = malloc(qs_n * sizeof(ix_slot));
    if (!ix->pages_tab || !ix->quarters_tab)
        return DWCP_HDE_E_NOMEM;
    memset(ix->pages_tab, 0xff, ps_n * sizeof(ix_slot));
    memset(ix->quarters_tab, 0xff, qs_n * sizeof(ix_slot));
    ix->pages_mask = ps_n - 1;
    ix->quarters_mask = qs_n - 1;
    for (uint64_t j = 0; j < ix->npages; j++) {
        if (ix->page_hash[j])
            table_insert(ix->pages_tab, ix->pages_mask, ix->page_hash[j], (uint32_t)j, ix->page_hash, 1, 0);
        for (unsigned q = 0; q < QUARTERS; q++) {
            uint64_t k = ix->quarter_hash[j * QUARTERS + q];
            if (k)
                table_insert(ix->quarters_tab, ix->quarters_mask, k, (uint32_t)j, ix->quarter_hash,
                             QUARTERS, q);
        }
    }
    free(ix->quarter_hash);
    ix->quarter_hash = NULL;
    ix->finished = 1;
    return DWCP_HDE_OK;
}

void dwcp_hde_index_free(dwcp_hde_index *ix)
{
    if (!ix)
        return;
    free(ix->segs);
    free(ix->page_hash);
    free(ix->quarter_hash);
    free(ix->pages_tab);
    free(ix->quarters_tab);
    free(ix);
}

/* A base page whose bytes equal p (hash h), other than page `not`; NO_PAGE if none. Every candidate
 * is confirmed byte for byte: the hash only finds it. */
static uint32_t ix_find_page(const dwcp_hde_index *ix, const uint8_t *p, uint64_t h, uint64_t not)
{
    uint32_t tag = (uint32_t)(h >> 32);
    uint64_t i = h & ix->pages_mask;
    for (int probe = 0; probe < MAX_PROBES; probe++, i = (i + 1) & ix->pages_mask) {
        const ix_slot *s = &ix->pages_tab[i];
        if (s->page == NO_PAGE)
            break;
        if (s->tag != tag || ix->page_hash[s->page] != h || s->page == not)
            continue;
        const uint8_t *b = base_at(&ix->base, (uint64_t)s->page * ix->ps, ix->ps);
        if (b && memcmp(b, p, ix->ps) == 0)
            return s->page;
    }
    return NO_PAGE;
}

/* The base page that shares the most quarters (same position, same bytes) with p; NO_PAGE if none
 * shares any. */
static uint32_t ix_similar_page(const dwcp_hde_index *ix, const uint8_t *p)
{
    const size_t qs = ix->ps / QUARTERS;
    uint32_t cand[QUARTERS];
    unsigned votes[QUARTERS], n = 0;
    for (unsigned q = 0; q < QUARTERS; q++) {
        const uint8_t *qp = p + q * qs;
        if (dwcp_hde_is_zero(qp, qs))
            continue;
        uint64_t key = quarter_key(dwcp_xxh3(qp, qs), q);
        uint32_t tag = (uint32_t)(key >> 32);
        uint64_t i = key & ix->quarters_mask;
        for (int probe = 0; probe < MAX_PROBES; probe++, i = (i + 1) & ix->quarters_mask) {
            const ix_slot *s = &ix->quarters_tab[i];
            if (s->page == NO_PAGE)
                break;
            if (s->tag != tag)
                continue;
            const uint8_t *b = base_at(&ix->base, (uint64_t)s->page * ix->ps, ix->ps);
            if (!b || memcmp(b + q * qs, qp, qs) != 0)
                continue;
            unsigned k = 0;
            while (k < n && cand[k] != s->page)
                k++;
            if (k == n) {
                cand[n] = s->page;
                votes[n++] = 0;
            }
            votes[k]++;
            break;
        }
    }
    uint32_t best = NO_PAGE;
    unsigned best_votes = 0;
    for (unsigned k = 0; k < n; k++)
        if (votes[k] > best_votes) {
            best = cand[k];
            best_votes = votes[k];
        }
    return best;
}

/* A batch's counts join the caller's only once the batch has succeeded. */
static void add_counts(dwcp_hde_counts *to, const dwcp_hde_counts *k)
{
    to->unchanged += k->unchanged;
    to->zero += k->zero;
    to->patch += k->patch;
    to->raw += k->raw;
    to->copy += k->copy;
    to->patch_from += k->patch_from;
    to->copy_runs += k->copy_runs;
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
    dwcp_st16(o + 6, h->flags);
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
    uint16_t flags = dwcp_ld16(in + 6);
    if ((flags & ~DWCP_HDE_FLAGS_KNOWN) || ((flags & DWCP_HDE_FLAG_REFS_OUTSIDE) && !(flags & DWCP_HDE_FLAG_REFS)) ||
        dwcp_ld32(in + 20) != 0 || dwcp_ld32(in + 60) != 0 || in[4] > DWCP_HDE_ZSTD_BASE)
        return DWCP_HDE_E_HEADER;
    h->flags = flags;
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

/* The smallest patch of p among the candidate base pages: same offset (disp 0) first, then the moved
 * candidates. Returns the index in cands of the winner, or -1 when none is cheaper than limit. Its
 * literals and run headers are left at lits/runs. */
struct patch_cand {
    const uint8_t *page;
    uint64_t disp;
    size_t extra; /* bytes of its refs entry */
};

/* The best patch so far: which candidate (-1: none), its whole cost (literals + run headers + refs
 * entry; starts as the page size, the cost of RAW) and the sizes of what it left at lits/runs. */
struct patch_pick {
    int won;
    size_t cost, lits, runs;
    uint32_t nruns;
};

/* Tries cands[from, ncand) against the best so far; each attempt stops once it costs as much as the
 * winner. Whoever wins, its literals and run headers are at lits/runs on return (a losing attempt after
 * the winner overwrote them, so the winner is written again). */
static void best_patch(const uint8_t *p, size_t n, const struct patch_cand *cands, int from, int ncand,
                       uint8_t *lits, uint8_t *runs, struct patch_pick *pick)
{
    int last = -1;
    for (int k = from; k < ncand; k++) {
        if (cands[k].extra >= pick->cost)
            continue;
        size_t used = 0;
        uint32_t nr = 0;
        int64_t l = patch_encode(p, cands[k].page, n, pick->cost - cands[k].extra, lits, runs, &used, &nr);
        last = k;
        if (l >= 0)
            *pick = (struct patch_pick){k, (size_t)l + used + cands[k].extra, (size_t)l, used, nr};
    }
    if (pick->won >= 0 && last >= 0 && last != pick->won)
        (void)patch_encode(p, cands[pick->won].page, n, SIZE_MAX, lits, runs, &pick->runs, &pick->nruns);
}

/* Adds the base page at displacement d from page g as a patch candidate, unless there is none, it is the
 * same offset (the caller adds that one), or it is already a candidate. */
static void add_cand(struct patch_cand *cands, int *ncand, const dwcp_hde_base *base,
                     const dwcp_hde_index *ix, uint64_t g, uint64_t d, uint64_t ref_last)
{
    if (d == NO_DISP || d == 0 || g + d >= ix->npages)
        return;
    for (int q = 0; q < *ncand; q++)
        if (cands[q].disp == d)
            return;
    const uint8_t *m = base_at(base, (g + d) * ix->ps, ix->ps);
    if (m)
        cands[(*ncand)++] = (struct patch_cand){m, d, varint64_len(zigzag(d - ref_last))};
}

int64_t dwcp_hde_encode_batch(dwcp_hde_ctx *c, uint64_t first, const uint8_t *new_, size_t new_len,
                              const dwcp_hde_base *base, const dwcp_hde_index *ix, const uint8_t *dirty,
                              uint32_t page_size, int level, uint8_t *out, size_t out_cap,
                              dwcp_hde_counts *counts)
{
    if (!c || !new_ || !out || !counts || !valid_page_size(page_size) || new_len == 0 ||
        new_len > c->max_batch_bytes || (base && !valid_base(base, page_size)) ||
        (ix && (!ix->finished || ix->ps != page_size)))
        return DWCP_HDE_E_INVAL;
    const size_t ps = page_size;
    size_t npages = (new_len + ps - 1) / ps;
    if (npages > DWCP_HDE_MAX_BATCH_PAGES || npages > c->max_pages || first > UINT64_MAX / ps - npages)
        return DWCP_HDE_E_INVAL;
    if (out_cap < dwcp_hde_batch_bound((uint32_t)npages, page_size))
        return DWCP_HDE_E_SPACE;
    if (!base)
        ix = NULL;

    uint8_t *classes = c->body + BODY_PREFIX;
    uint8_t *lits = classes + npages;
    uint64_t *disp = c->disp, *near = c->near;
    size_t lit_n = 0, runs_n = 0, refs_n = 0;
    uint16_t flags = DWCP_HDE_FLAG_REFS;
    dwcp_hde_counts k = {0};
    const uint8_t PENDING = 0xff;

    /* Pass 1: what is settled without patching: unchanged, zero, or an exact copy of a base page
     * elsewhere. A copy tries first to continue the previous page's displacement (a shifted region is
     * then one run), then the index. Page hashes are kept for the batch's result checksum. */
    uint64_t last_disp = NO_DISP;
    for (size_t pg = 0; pg < npages; pg++) {
        size_t off = pg * ps;
        size_t n = new_len - off < ps ? new_len - off : ps;
        const uint8_t *p = new_ + off;
        uint64_t g = first + pg;
        disp[pg] = NO_DISP;
        if (dirty && !dirty[pg]) {
            classes[pg] = DWCP_HDE_UNCHANGED;
            disp[pg] = last_disp = 0;
            continue;
        }
        const uint8_t *b = base_at(base, g * ps, n);
        int settled = settled_class(p, b, n);
        if (settled == DWCP_HDE_UNCHANGED) {
            classes[pg] = DWCP_HDE_UNCHANGED;
            disp[pg] = last_disp = 0;
            continue;
        }
        uint64_t h = dwcp_xxh3(p, n);
        dwcp_st64(c->hashes + 8 * pg, h);
        classes[pg] = settled == DWCP_HDE_ZERO ? DWCP_HDE_ZERO : PENDING;
        if (settled == DWCP_HDE_ZERO || !ix || n != ps)
            continue;
        if (last_disp != NO_DISP && last_disp != 0) {
            const uint8_t *m = base_at(base, (g + last_disp) * ps, ps);
            if (m && g + last_disp < ix->npages && memcmp(m, p, ps) == 0) {
                classes[pg] = DWCP_HDE_COPY;
                disp[pg] = last_disp;
                continue;
            }
        }
        uint32_t src = ix_find_page(ix, p, nonzero(h), g);
        if (src != NO_PAGE) {
            classes[pg] = DWCP_HDE_COPY;
            disp[pg] = last_disp = (uint64_t)src - g;
        }
    }
    uint64_t next_disp = NO_DISP;
    for (size_t pg = npages; pg-- > 0;) {
        near[pg] = next_disp;
        if (disp[pg] != NO_DISP)
            next_disp = disp[pg];
    }

    /* Pass 2, in page order (refs entries depend on the previous one): COPY runs become refs entries;
     * every other unsettled page is patched against the cheapest of its candidates -- the base page at
     * the same offset, the pages the nearest exact matches before and after it point to (a changed page
     * inside a shifted region), and the base page sharing most of its quarters -- or sent RAW. */
    uint64_t ref_last = 0, prev_disp = NO_DISP;
    for (size_t pg = 0; pg < npages; pg++) {
        size_t off = pg * ps;
        size_t n = new_len - off < ps ? new_len - off : ps;
        const uint8_t *p = new_ + off;
        uint64_t g = first + pg;
        uint8_t cls = classes[pg];
        if (cls == DWCP_HDE_COPY) {
            if (!(pg > 0 && classes[pg - 1] == DWCP_HDE_COPY && disp[pg - 1] == disp[pg])) {
                size_t run = 1;
                while (pg + run < npages && classes[pg + run] == DWCP_HDE_COPY && disp[pg + run] == disp[pg])
                    run++;
                refs_n += varint64_put(c->refs + refs_n, zigzag(disp[pg] - ref_last));
                refs_n += varint64_put(c->refs + refs_n, run);
                ref_last = disp[pg];
                k.copy_runs++;
            }
            uint64_t src = g + disp[pg];
            if (src < first || src >= first + npages)
                flags |= DWCP_HDE_FLAG_REFS_OUTSIDE;
            prev_disp = disp[pg];
            k.copy++;
            continue;
        }
        if (disp[pg] != NO_DISP)
            prev_disp = disp[pg];
        if (cls != PENDING) {
            if (cls == DWCP_HDE_UNCHANGED)
                k.unchanged++;
            else
                k.zero++;
            continue;
        }
        /* Candidates in the order most likely to win, so that a good patch found early makes every
         * later attempt stop at its first few differing words: inside a shifted region the
         * neighbours' displacement; else the same offset. The quarter vote (four hashes and lookups)
         * only when neither gave a small patch. */
        struct patch_cand cands[4];
        int ncand = 0;
        const uint8_t *b = base_at(base, g * ps, n);
        if (ix && n == ps) {
            const uint64_t tries[2] = {prev_disp, near[pg]};
            for (int t = 0; t < 2; t++)
                add_cand(cands, &ncand, base, ix, g, tries[t], ref_last);
        }
        if (b)
            cands[ncand++] = (struct patch_cand){b, 0, 0};
        struct patch_pick pick = {-1, n, 0, 0, 0};
        best_patch(p, n, cands, 0, ncand, lits + lit_n, c->runs + runs_n, &pick);
        if (ix && n == ps && pick.cost > ps / 8) {
            uint32_t sim = ix_similar_page(ix, p);
            int before = ncand;
            if (sim != NO_PAGE)
                add_cand(cands, &ncand, base, ix, g, (uint64_t)sim - g, ref_last);
            best_patch(p, n, cands, before, ncand, lits + lit_n, c->runs + runs_n, &pick);
        }
        int won = pick.won;
        if (won < 0) {
            cls = DWCP_HDE_RAW;
            memcpy(lits + lit_n, p, n);
            lit_n += n;
            k.literal_bytes += n;
            k.raw++;
        } else {
            lit_n += pick.lits;
            runs_n += pick.runs;
            k.patch_runs += pick.nruns;
            k.literal_bytes += pick.lits;
            uint64_t d = cands[won].disp;
            if (d == 0) {
                cls = DWCP_HDE_PATCH;
                k.patch++;
            } else {
                cls = DWCP_HDE_PATCH_FROM;
                refs_n += varint64_put(c->refs + refs_n, zigzag(d - ref_last));
                ref_last = d;
                if (g + d < first || g + d >= first + npages)
                    flags |= DWCP_HDE_FLAG_REFS_OUTSIDE;
                k.patch_from++;
            }
        }
        classes[pg] = cls;
    }
    /* Result checksum: the hashes of the pages the batch writes, in order (pass 1 stored them at
     * their page's slot; compact them). */
    size_t nhash = 0;
    for (size_t pg = 0; pg < npages; pg++)
        if (classes[pg] != DWCP_HDE_UNCHANGED) {
            if (nhash != pg)
                memmove(c->hashes + 8 * nhash, c->hashes + 8 * pg, 8);
            nhash++;
        }
    memcpy(lits + lit_n, c->runs, runs_n);
    memcpy(lits + lit_n + runs_n, c->refs, refs_n);
    dwcp_st32(c->body, (uint32_t)lit_n);
    dwcp_st32(c->body + 4, (uint32_t)runs_n);
    dwcp_st32(c->body + 8, (uint32_t)refs_n);
    size_t body_len = BODY_PREFIX + npages + lit_n + runs_n + refs_n;

    dwcp_hde_header h = {0};
    h.flags = flags;
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

/* Writes all of buf at off of fd (pwrite may write less, or be interrupted). */
static int write_all(dwcp_hde_ctx *c, int fd, const uint8_t *buf, size_t len, uint64_t off)
{
    while (len) {
        ssize_t k = pwrite(fd, buf, len, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            snprintf(c->err, sizeof(c->err), "write at offset %llu: %s", (unsigned long long)off,
                     k < 0 ? strerror(errno) : "no progress");
            return DWCP_HDE_E_IO;
        }
        buf += k;
        len -= (size_t)k;
        off += (uint64_t)k;
    }
    return DWCP_HDE_OK;
}

static int decode_impl(dwcp_hde_ctx *c, const uint8_t *in, size_t in_len, uint32_t page_size,
                       const uint8_t *base, size_t base_len, uint8_t *dst, size_t dst_len, uint8_t *commit,
                       int fd, uint64_t fd_off, dwcp_hde_counts *counts);

int dwcp_hde_decode_batch(dwcp_hde_ctx *c, const uint8_t *in, size_t in_len, uint32_t page_size,
                          const uint8_t *base, size_t base_len, uint8_t *dst, size_t dst_len,
                          uint8_t *commit, dwcp_hde_counts *counts)
{
    if (!dst)
        return DWCP_HDE_E_INVAL;
    if (base && ranges_overlap(dst, dst_len, base, base_len))
        return DWCP_HDE_E_INVAL;
    if (commit && ranges_overlap(dst, dst_len, commit, dst_len))
        return DWCP_HDE_E_INVAL;
    return decode_impl(c, in, in_len, page_size, base, base_len, dst, dst_len, commit, -1, 0, counts);
}

int dwcp_hde_decode_batch_fd(dwcp_hde_ctx *c, const uint8_t *in, size_t in_len, uint32_t page_size,
                             const uint8_t *base, size_t base_len, size_t image_bytes, int fd, uint64_t fd_off,
                             dwcp_hde_counts *counts)
{
    if (fd < 0)
        return DWCP_HDE_E_INVAL;
    return decode_impl(c, in, in_len, page_size, base, base_len, NULL, image_bytes, NULL, fd, fd_off, counts);
}

/* dst_len is the batch's bytes in the image. With fd >= 0, dst is unused: pages are rebuilt into the
 * context's chunk buffer and written to fd at fd_off + their offset in the batch, a chunk at a time. */
static int decode_impl(dwcp_hde_ctx *c, const uint8_t *in, size_t in_len, uint32_t page_size,
                       const uint8_t *base, size_t base_len, uint8_t *dst, size_t dst_len, uint8_t *commit,
                       int fd, uint64_t fd_off, dwcp_hde_counts *counts)
{
    if (!c || !in || !counts || !valid_page_size(page_size) || dst_len == 0 ||
        dst_len > c->max_batch_bytes || (!base && base_len))
        return DWCP_HDE_E_INVAL;
    size_t chunk_start = 0, chunk_used = 0;
    dwcp_hde_header h;
    int rc = dwcp_hde_parse_header(in, in_len, &h);
    if (rc)
        return rc;
    const size_t ps = page_size;
    size_t npages = (dst_len + ps - 1) / ps;
    const int v2 = (h.flags & DWCP_HDE_FLAG_REFS) != 0;
    const size_t prefix = v2 ? BODY_PREFIX : BODY_PREFIX_V1;
    if (h.codec == DWCP_HDE_ZSTD_BASE || h.page_count != npages || h.first > UINT64_MAX / ps - npages)
        return DWCP_HDE_E_BODY;
    if (h.body_len < prefix + npages || h.body_len > body_capacity(npages, dst_len))
        return DWCP_HDE_E_BODY;
    const uint8_t *body = NULL;
    rc = open_body(c, in, in_len, &h, c->body, body_capacity(c->max_pages, c->max_batch_bytes), NULL, 0,
                   &body);
    if (rc)
        return rc;

    uint64_t lits_len = dwcp_ld32(body), runs_len = dwcp_ld32(body + 4);
    uint64_t refs_len = v2 ? dwcp_ld32(body + 8) : 0;
    if (prefix + npages + lits_len + runs_len + refs_len != h.body_len)
        return DWCP_HDE_E_BODY;
    const uint8_t *classes = body + prefix;
    const uint8_t *lit = classes + npages, *lit_end = lit + lits_len;
    const uint8_t *run = lit_end, *run_end = run + runs_len;
    const uint8_t *ref = run_end, *ref_end = ref + refs_len;
    const uint64_t base_pages = base_len / ps; /* whole pages a COPY/PATCH_FROM may name */
    const uint64_t own_off = h.first * ps;
    uint64_t ref_last = 0, copy_left = 0;
    int outside = 0;
    size_t nhash = 0;
    dwcp_hde_counts k = {0};

    for (size_t pg = 0; pg < npages; pg++) {
        size_t off = pg * ps;
        size_t n = dst_len - off < ps ? dst_len - off : ps;
        uint64_t g = h.first + pg;
        const uint8_t *b = base && own_off + off <= base_len && n <= base_len - (own_off + off)
                               ? base + own_off + off : NULL;
        uint8_t *d;
        if (fd >= 0) {
            if (chunk_used + n > DECODE_CHUNK) {
                if ((rc = write_all(c, fd, c->chunk, chunk_used, fd_off + chunk_start)) != 0)
                    return rc;
                chunk_start = off;
                chunk_used = 0;
            }
            d = c->chunk + chunk_used;
            chunk_used += n;
        } else {
            d = dst + off;
        }
        uint8_t cls = classes[pg];
        if (cls > DWCP_HDE_RAW && !v2)
            return DWCP_HDE_E_BODY;
        if (cls == DWCP_HDE_COPY || cls == DWCP_HDE_PATCH_FROM) {
            /* The source page: a run continues, or a refs entry names it. Every step is checked
             * against the refs section and the base before any byte is read. */
            if (n != ps)
                return DWCP_HDE_E_BODY;
            if (cls == DWCP_HDE_PATCH_FROM || copy_left == 0) {
                uint64_t z;
                if (copy_left != 0 || varint64_get(&ref, ref_end, &z))
                    return DWCP_HDE_E_BODY;
                ref_last += unzigzag(z);
                if (cls == DWCP_HDE_COPY) {
                    if (varint64_get(&ref, ref_end, &copy_left) || copy_left == 0)
                        return DWCP_HDE_E_BODY;
                    k.copy_runs++;
                }
            }
            uint64_t src = g + ref_last;
            if (!base)
                return DWCP_HDE_E_BASE;
            if (src >= base_pages)
                return src >= UINT64_MAX / ps ? DWCP_HDE_E_BODY : DWCP_HDE_E_BASE;
            outside |= src < h.first || src >= h.first + npages;
            b = base + src * ps;
            if (cls == DWCP_HDE_COPY) {
                copy_left--;
                k.copy++;
                memcpy(d, b, n);
                dwcp_st64(c->hashes + 8 * nhash++, dwcp_xxh3(d, n));
                continue;
            }
            k.patch_from++;
        } else if (copy_left != 0) {
            return DWCP_HDE_E_BODY; /* a COPY run's count covers only COPY pages */
        }
        switch (cls) {
        case DWCP_HDE_UNCHANGED:
            k.unchanged++;
            if (!commit) { /* (a file writer has no commit either: the page goes to the file) */
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
        case DWCP_HDE_PATCH:
        case DWCP_HDE_PATCH_FROM: {
            if (cls == DWCP_HDE_PATCH)
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
    if (lit != lit_end || run != run_end || ref != ref_end || copy_left != 0)
        return DWCP_HDE_E_BODY;
    /* The flag lets an in-place apply order its batches; one that lies about it would let a batch
     * read bytes another had already overwritten. */
    if (outside && !(h.flags & DWCP_HDE_FLAG_REFS_OUTSIDE))
        return DWCP_HDE_E_BODY;
    if (dwcp_xxh3(c->hashes, 8 * nhash) != h.result_xxh3)
        return DWCP_HDE_E_RESULT;
    if (fd >= 0 && chunk_used && (rc = write_all(c, fd, c->chunk, chunk_used, fd_off + chunk_start)) != 0)
        return rc;
    if (commit) {
        for (size_t pg = 0; pg < npages; pg++) {
            if (classes[pg] == DWCP_HDE_UNCHANGED)
                continue;
            size_t off = pg * ps;
            size_t n = dst_len - off < ps ? dst_len - off : ps;
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
