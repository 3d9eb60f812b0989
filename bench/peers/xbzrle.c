/* xbzrle: a standalone XBZRLE-style page delta encoder/decoder, the baseline peer of bench/hde.
 *
 * The page codec follows the algorithm QEMU uses for live migration (migration/xbzrle.c, described in
 * docs/devel/migration/xbzrle.rst): for each page of the new image that differs from the same page of
 * the old image (the "cache"), compare byte by byte and emit alternating runs
 *     ULEB128(zero-run length)  ULEB128(nonzero-run length)  <the new bytes of the nonzero run>
 * where a zero run is a stretch of bytes equal in both versions (their XOR is zero) and a nonzero run a
 * stretch that differs; a trailing zero run is not emitted. If the encoding would not fit in one page
 * the page is sent raw (QEMU's "overflow"). Like QEMU's RAM save path, an all-zero dirty page is sent as
 * a zero-page marker before XBZRLE is tried, and unchanged pages are not sent at all. There is no
 * entropy coding. The whole old image plays the role of QEMU's XBZRLE cache (the best case: QEMU's
 * cache is bounded, 64 MiB by default, and a miss sends the page raw). This is independent code, not
 * QEMU's.
 *
 * Container (little-endian):
 *   header  "XBZ1" | u32 page_bytes | u64 new_bytes
 *   records u8 type | u32 page_index | payload, in increasing page order, then one u8 0xFF
 *           type 0 zero page (no payload), 1 xbzrle (u16 length + encoded bytes), 2 raw (the page)
 * Decoding starts from the old image, cut or zero-padded to new_bytes, and applies the records.
 *
 *   xbzrle encode OLD NEW OUT [page_bytes]     xbzrle decode OLD DELTA OUT
 * Exit status 0 on success; 1 with a message on stderr otherwise (a bad delta is always an error,
 * never a crash or a wrong write).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

enum { REC_ZERO = 0, REC_XBZRLE = 1, REC_RAW = 2, REC_END = 0xFF };
#define MAX_PAGE_BYTES 65536u

typedef struct {
    const uint8_t *p;
    size_t n;
} map_t;

static int die(const char *what, const char *path)
{
    fprintf(stderr, "xbzrle: %s%s%s%s%s\n", what, path ? " " : "", path ? path : "", errno ? ": " : "",
            errno ? strerror(errno) : "");
    return 1;
}

static int map_file(const char *path, map_t *m)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    m->n = (size_t)st.st_size;
    m->p = NULL;
    if (m->n > 0) {
        void *p = mmap(NULL, m->n, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
        if (p == MAP_FAILED) {
            close(fd);
            return -1;
        }
        m->p = p;
    }
    close(fd);
    return 0;
}

/* Write a ULEB128 value at dst[*d], within dlen; -1 if it does not fit. */
static int put_uleb(uint8_t *dst, size_t *d, size_t dlen, uint32_t v)
{
    do {
        if (*d >= dlen)
            return -1;
        uint8_t b = v & 0x7f;
        v >>= 7;
        dst[(*d)++] = (uint8_t)(b | (v ? 0x80 : 0));
    } while (v);
    return 0;
}

/* Read a ULEB128 value (≤ 32 bits) from src[*s], within slen; -1 if truncated or too long. */
static int get_uleb(const uint8_t *src, size_t *s, size_t slen, uint32_t *out)
{
    uint32_t v = 0;
    for (unsigned shift = 0; shift < 35; shift += 7) {
        if (*s >= slen)
            return -1;
        uint8_t b = src[(*s)++];
        if (shift == 28 && (b & 0x70))
            return -1;
        v |= (uint32_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

/* XBZRLE-encode new against old (len bytes each) into dst (capacity dlen). Returns the encoded length,
 * or -1 if it would exceed dlen. */
static long xbzrle_encode(const uint8_t *old, const uint8_t *new, size_t len, uint8_t *dst, size_t dlen)
{
    size_t i = 0, d = 0;
    while (i < len) {
        size_t zrun = 0;
        while (i + 8 <= len) { /* equal bytes, a word at a time */
            uint64_t a, b;
            memcpy(&a, old + i, 8);
            memcpy(&b, new + i, 8);
            if (a != b)
                break;
            i += 8;
            zrun += 8;
        }
        while (i < len && old[i] == new[i]) {
            i++;
            zrun++;
        }
        if (i == len)
            break; /* trailing unchanged bytes are implied */
        if (put_uleb(dst, &d, dlen, (uint32_t)zrun) < 0)
            return -1;
        size_t start = i;
        while (i < len && old[i] != new[i])
            i++;
        size_t nzrun = i - start;
        if (put_uleb(dst, &d, dlen, (uint32_t)nzrun) < 0 || nzrun > dlen - d)
            return -1;
        memcpy(dst + d, new + start, nzrun);
        d += nzrun;
    }
    return (long)d;
}

/* Apply an XBZRLE encoding to page (len bytes, holding the old version). -1 if malformed. */
static int xbzrle_decode(const uint8_t *src, size_t slen, uint8_t *page, size_t len)
{
    size_t s = 0, i = 0;
    while (s < slen) {
        uint32_t zrun, nzrun;
        if (get_uleb(src, &s, slen, &zrun) < 0 || zrun > len - i)
            return -1;
        i += zrun;
        if (get_uleb(src, &s, slen, &nzrun) < 0 || nzrun == 0 || nzrun > len - i || nzrun > slen - s)
            return -1;
        memcpy(page + i, src + s, nzrun);
        i += nzrun;
        s += nzrun;
    }
    return 0;
}

static int is_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

static void put_u32(uint8_t *b, uint32_t v)
{
    for (int k = 0; k < 4; k++)
        b[k] = (uint8_t)(v >> (8 * k));
}

static uint32_t get_u32(const uint8_t *b)
{
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static int encode(const char *old_path, const char *new_path, const char *out_path, size_t page)
{
    map_t old, new;
    if (map_file(old_path, &old) < 0)
        return die("cannot map", old_path);
    if (map_file(new_path, &new) < 0)
        return die("cannot map", new_path);
    if ((new.n + page - 1) / page > UINT32_MAX) {
        errno = 0;
        return die("new image has too many pages for a u32 page index:", new_path);
    }
    FILE *out = fopen(out_path, "wb");
    if (!out)
        return die("cannot create", out_path);
    setvbuf(out, NULL, _IOFBF, 1 << 20);
    uint8_t hdr[16] = {'X', 'B', 'Z', '1'};
    put_u32(hdr + 4, (uint32_t)page);
    for (int k = 0; k < 8; k++)
        hdr[8 + k] = (uint8_t)((uint64_t)new.n >> (8 * k));
    fwrite(hdr, 1, sizeof hdr, out);
    static uint8_t enc[MAX_PAGE_BYTES], oldpage[MAX_PAGE_BYTES];
    size_t npages = (new.n + page - 1) / page;
    for (size_t pi = 0; pi < npages; pi++) {
        size_t off = pi * page, len = new.n - off < page ? new.n - off : page;
        const uint8_t *np = new.p + off, *op;
        /* the old page, cut or zero-padded to this page's length */
        if (off + len <= old.n) {
            op = old.p + off;
        } else {
            size_t have = off < old.n ? old.n - off : 0;
            memset(oldpage, 0, len);
            if (have)
                memcpy(oldpage, old.p + off, have);
            op = oldpage;
        }
        if (memcmp(np, op, len) == 0)
            continue;
        uint8_t rec[7];
        put_u32(rec + 1, (uint32_t)pi);
        if (is_zero(np, len)) {
            rec[0] = REC_ZERO;
            fwrite(rec, 1, 5, out);
            continue;
        }
        long n = xbzrle_encode(op, np, len, enc, len - 1 < 0xFFFF ? len - 1 : 0xFFFF);
        if (n > 0) {
            rec[0] = REC_XBZRLE;
            rec[5] = (uint8_t)(n & 0xff);
            rec[6] = (uint8_t)(n >> 8);
            fwrite(rec, 1, 7, out);
            fwrite(enc, 1, (size_t)n, out);
        } else {
            rec[0] = REC_RAW;
            fwrite(rec, 1, 5, out);
            fwrite(np, 1, len, out);
        }
    }
    uint8_t end = REC_END;
    fwrite(&end, 1, 1, out);
    if (ferror(out) || fclose(out) != 0)
        return die("write failed:", out_path);
    return 0;
}

static int bad(const char *why, size_t at)
{
    fprintf(stderr, "xbzrle: malformed delta at byte %zu: %s\n", at, why);
    return 1;
}

static int decode(const char *old_path, const char *delta_path, const char *out_path)
{
    map_t old, dl;
    if (map_file(old_path, &old) < 0)
        return die("cannot map", old_path);
    if (map_file(delta_path, &dl) < 0)
        return die("cannot map", delta_path);
    const uint8_t *s = dl.p;
    size_t n = dl.n, pos = 16;
    if (n < 17 || memcmp(s, "XBZ1", 4) != 0)
        return bad("no XBZ1 header", 0);
    size_t page = get_u32(s + 4);
    uint64_t new_bytes = 0;
    for (int k = 0; k < 8; k++)
        new_bytes |= (uint64_t)s[8 + k] << (8 * k);
    if (page == 0 || page > MAX_PAGE_BYTES || new_bytes > ((uint64_t)1 << 40))
        return bad("page size or image size out of range", 4);
    uint8_t *img = calloc(1, new_bytes ? (size_t)new_bytes : 1);
    if (!img)
        return die("out of memory for the output image", NULL);
    memcpy(img, old.p, old.n < new_bytes ? old.n : (size_t)new_bytes);
    size_t npages = ((size_t)new_bytes + page - 1) / page;
    long last = -1;
    for (;;) {
        if (pos >= n)
            return bad("truncated (no end record)", pos);
        uint8_t type = s[pos];
        if (type == REC_END) {
            if (pos + 1 != n)
                return bad("bytes after the end record", pos);
            break;
        }
        if (n - pos < 5)
            return bad("truncated record header", pos);
        uint32_t pi = get_u32(s + pos + 1);
        if (pi >= npages || (long)pi <= last)
            return bad("page index out of range or out of order", pos + 1);
        last = (long)pi;
        size_t off = (size_t)pi * page, len = (size_t)new_bytes - off < page ? (size_t)new_bytes - off : page;
        pos += 5;
        if (type == REC_ZERO) {
            memset(img + off, 0, len);
        } else if (type == REC_RAW) {
            if (n - pos < len)
                return bad("truncated raw page", pos);
            memcpy(img + off, s + pos, len);
            pos += len;
        } else if (type == REC_XBZRLE) {
            if (n - pos < 2)
                return bad("truncated xbzrle length", pos);
            size_t elen = (size_t)s[pos] | (size_t)s[pos + 1] << 8;
            pos += 2;
            if (n - pos < elen || xbzrle_decode(s + pos, elen, img + off, len) < 0)
                return bad("bad xbzrle page encoding", pos);
            pos += elen;
        } else {
            return bad("unknown record type", pos - 5);
        }
    }
    FILE *out = fopen(out_path, "wb");
    if (!out)
        return die("cannot create", out_path);
    if ((new_bytes && fwrite(img, 1, (size_t)new_bytes, out) != new_bytes) || fclose(out) != 0)
        return die("write failed:", out_path);
    free(img);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 5 && argc <= 6 && strcmp(argv[1], "encode") == 0) {
        unsigned long page = argc == 6 ? strtoul(argv[5], NULL, 10) : 4096;
        if (page == 0 || page > MAX_PAGE_BYTES) {
            fprintf(stderr, "xbzrle: page size must be 1..%u\n", MAX_PAGE_BYTES);
            return 2;
        }
        return encode(argv[2], argv[3], argv[4], page);
    }
    if (argc == 5 && strcmp(argv[1], "decode") == 0)
        return decode(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: xbzrle encode OLD NEW OUT [page_bytes]\n       xbzrle decode OLD DELTA OUT\n");
    return 2;
}
