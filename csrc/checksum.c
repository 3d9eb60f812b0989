/* Payload and header checksums.
 *
 * CRC32C: the SSE4.2 crc32 instruction has a 3-cycle latency but 1-cycle throughput, so one dependency
 * chain runs at a third of the possible speed. Long buffers are therefore split into three lanes whose
 * CRCs are computed in parallel and then combined by "appending zeros" to the earlier lanes (a linear
 * operator on the CRC register, precomputed as four 256-entry tables per lane length; the method of
 * Mark Adler's crc32c.c). The instruction is chosen at runtime so one build runs on any x86-64; other
 * CPUs use slicing-by-8 tables.
 *
 * XXH3: libxxhash's header inlined (XXH_INLINE_ALL) so the data path calls no shared library; an AVX2
 * build of it (xxh3_avx2.c) is used when the CPU has AVX2. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "checksum_impl.h"
#include "dwcp/frame.h"

#define POLY 0x82f63b78u

static uint32_t crc_table[8][256];

#if defined(__x86_64__) || defined(__i386__)
#define DWCP_HAVE_X86 1
#include <nmmintrin.h>
#define LONG_LANE 8192
#define SHORT_LANE 256
static uint32_t crc_long[4][256];
static uint32_t crc_short[4][256];
#endif

static int crc_hw;
static int xxh_avx2;

static uint32_t gf2_matrix_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void gf2_matrix_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_matrix_times(mat, mat[n]);
}

#ifdef DWCP_HAVE_X86
/* Operator that appends len zero bytes to a CRC register. */
static void crc_zeros_op(uint32_t *even, size_t len)
{
    uint32_t odd[32];
    odd[0] = POLY;
    uint32_t row = 1;
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    gf2_matrix_square(even, odd); /* 2 zero bits */
    gf2_matrix_square(odd, even); /* 4 zero bits */
    /* each squaring doubles the zeros: start at one byte (8 bits) */
    do {
        gf2_matrix_square(even, odd);
        len >>= 1;
        if (len == 0)
            return;
        gf2_matrix_square(odd, even);
        len >>= 1;
    } while (len);
    memcpy(even, odd, sizeof odd);
}

static void crc_zeros(uint32_t zeros[4][256], size_t len)
{
    uint32_t op[32];
    crc_zeros_op(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        zeros[0][n] = gf2_matrix_times(op, n);
        zeros[1][n] = gf2_matrix_times(op, n << 8);
        zeros[2][n] = gf2_matrix_times(op, n << 16);
        zeros[3][n] = gf2_matrix_times(op, n << 24);
    }
}

static inline uint32_t crc_shift(uint32_t zeros[4][256], uint32_t crc)
{
    return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^ zeros[2][(crc >> 16) & 0xff] ^
           zeros[3][crc >> 24];
}

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const uint8_t *next,
                                                                size_t len)
{
    uint64_t crc0 = crc ^ 0xffffffffu, crc1, crc2;
    while (len && ((uintptr_t)next & 7)) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    while (len >= LONG_LANE * 3) {
        crc1 = 0;
        crc2 = 0;
        const uint8_t *end = next + LONG_LANE;
        do {
            crc0 = _mm_crc32_u64(crc0, load64(next));
            crc1 = _mm_crc32_u64(crc1, load64(next + LONG_LANE));
            crc2 = _mm_crc32_u64(crc2, load64(next + 2 * LONG_LANE));
            next += 8;
        } while (next < end);
        crc0 = crc_shift(crc_long, (uint32_t)crc0) ^ crc1;
        crc0 = crc_shift(crc_long, (uint32_t)crc0) ^ crc2;
        next += 2 * LONG_LANE;
        len -= 3 * LONG_LANE;
    }
    while (len >= SHORT_LANE * 3) {
        crc1 = 0;
        crc2 = 0;
        const uint8_t *end = next + SHORT_LANE;
        do {
            crc0 = _mm_crc32_u64(crc0, load64(next));
            crc1 = _mm_crc32_u64(crc1, load64(next + SHORT_LANE));
            crc2 = _mm_crc32_u64(crc2, load64(next + 2 * SHORT_LANE));
            next += 8;
        } while (next < end);
        crc0 = crc_shift(crc_short, (uint32_t)crc0) ^ crc1;
        crc0 = crc_shift(crc_short, (uint32_t)crc0) ^ crc2;
        next += 2 * SHORT_LANE;
        len -= 3 * SHORT_LANE;
    }
    while (len >= 8) {
        crc0 = _mm_crc32_u64(crc0, load64(next));
        next += 8;
        len -= 8;
    }
    while (len) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    return (uint32_t)crc0 ^ 0xffffffffu;
}
#endif

static uint32_t crc32c_sw(uint32_t crc, const uint8_t *p, size_t len)
{
    uint32_t c = crc ^ 0xffffffffu;
    while (len && ((uintptr_t)p & 7)) {
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        len--;
    }
    while (len >= 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                           (uint32_t)p[3] << 24);
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
            crc_table[4][lo >> 24] ^ crc_table[3][p[4]] ^ crc_table[2][p[5]] ^ crc_table[1][p[6]] ^
            crc_table[0][p[7]];
        p += 8;
        len -= 8;
    }
    while (len--)
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

/* Tables are built before main()/module init, so the hot path needs no once-guard. */
__attribute__((constructor)) static void crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc_table[0][n];
        for (int k = 1; k < 8; k++) {
            c = crc_table[0][c & 0xff] ^ (c >> 8);
            crc_table[k][n] = c;
        }
    }
#ifdef DWCP_HAVE_X86
    crc_zeros(crc_long, LONG_LANE);
    crc_zeros(crc_short, SHORT_LANE);
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#endif
#ifdef DWCP_HAVE_XXH3_AVX2
    xxh_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
#endif
}

int dwcp_crc32c_hw(void)
{
    return crc_hw;
}

uint32_t dwcp_crc32c(uint32_t crc, const void *buf, size_t len)
{
#ifdef DWCP_HAVE_X86
    if (crc_hw)
        return crc32c_sse42(crc, (const uint8_t *)buf, len);
#endif
    return crc32c_sw(crc, (const uint8_t *)buf, len);
}

uint32_t dwcp_crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    return crc32c_sw(crc, (const uint8_t *)buf, len);
}

uint64_t dwcp_xxh3(const void *buf, size_t len)
{
#ifdef DWCP_HAVE_XXH3_AVX2
    /* Short inputs take the scalar paths either way; skip the indirection for them. */
    if (xxh_avx2 && len > 240)
        return dwcp_xxh3_avx2(buf, len);
#endif
    return (uint64_t)XXH3_64bits(buf, len);
}

uint64_t dwcp_payload_checksum(uint16_t flags, const void *buf, size_t len)
{
    if (flags & DWCP_FLAG_CSUM_XXH3)
        return dwcp_xxh3(buf, len);
    if (flags & DWCP_FLAG_CSUM_CRC32C)
        return dwcp_crc32c(0, buf, len);
    return 0;
}

/* ---------------------------------------------------------------- incremental payload checksum */

int dwcp_csum_init(dwcp_csum *c)
{
    c->flags = 0;
    c->crc = 0;
    c->xxh = XXH3_createState(); /* aligned as XXH3_state_t requires */
    return c->xxh ? 0 : DWCP_E_NOMEM;
}

void dwcp_csum_free(dwcp_csum *c)
{
    if (c->xxh)
        XXH3_freeState((XXH3_state_t *)c->xxh);
    c->xxh = NULL;
}

void dwcp_csum_reset(dwcp_csum *c, uint16_t flags)
{
    c->flags = flags;
    c->crc = 0;
    if (flags & DWCP_FLAG_CSUM_XXH3)
        (void)XXH3_64bits_reset((XXH3_state_t *)c->xxh);
}

void dwcp_csum_update(dwcp_csum *c, const void *buf, size_t len)
{
    if (c->flags & DWCP_FLAG_CSUM_XXH3) {
#ifdef DWCP_HAVE_XXH3_AVX2
        if (xxh_avx2) {
            dwcp_xxh3_avx2_update(c->xxh, buf, len);
            return;
        }
#endif
        (void)XXH3_64bits_update((XXH3_state_t *)c->xxh, buf, len);
    } else if (c->flags & DWCP_FLAG_CSUM_CRC32C) {
        c->crc = dwcp_crc32c(c->crc, buf, len);
    }
}

uint64_t dwcp_csum_digest(const dwcp_csum *c)
{
    if (c->flags & DWCP_FLAG_CSUM_XXH3)
        return (uint64_t)XXH3_64bits_digest((const XXH3_state_t *)c->xxh);
    if (c->flags & DWCP_FLAG_CSUM_CRC32C)
        return c->crc;
    return 0;
}
