/* Private helpers of the C core: explicit little-endian loads/stores (wire bytes are never cast to
 * structs: alignment and endianness stay the codec's business) and relaxed atomics for counters. */
#ifndef DWCP_UTIL_H
#define DWCP_UTIL_H

#include <stdint.h>
#include <string.h>

static inline uint16_t dwcp_ld16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (uint16_t)p[1] << 8);
}

static inline uint32_t dwcp_ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t dwcp_ld64(const uint8_t *p)
{
    return (uint64_t)dwcp_ld32(p) | (uint64_t)dwcp_ld32(p + 4) << 32;
}

static inline void dwcp_st16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void dwcp_st32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void dwcp_st64(uint8_t *p, uint64_t v)
{
    dwcp_st32(p, (uint32_t)v);
    dwcp_st32(p + 4, (uint32_t)(v >> 32));
}

#define DWCP_ADD(field, v) __atomic_fetch_add(&(field), (uint64_t)(v), __ATOMIC_RELAXED)
#define DWCP_SET(field, v) __atomic_store_n(&(field), (uint64_t)(v), __ATOMIC_RELAXED)
#define DWCP_GET(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)

#endif
