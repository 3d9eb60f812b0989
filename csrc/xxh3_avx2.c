/* XXH3 compiled for AVX2, chosen at runtime by checksum.c.
 *
 * The receiver hashes every payload byte once more after the kernel copied it in, so the hash runs at
 * a good fraction of the data rate: the AVX2 kernel is about twice as fast as the SSE2 one that a
 * baseline x86-64 build gets. It lives in its own translation unit because the target pragma must
 * cover xxhash.h's inline functions, and the rest of the core must stay runnable on any x86-64. */
#include <stddef.h>
#include <stdint.h>

#include "checksum_impl.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2")
#define XXH_INLINE_ALL
#define XXH_VECTOR 2 /* XXH_AVX2 */
#include <xxhash.h>

uint64_t dwcp_xxh3_avx2(const void *buf, size_t len)
{
    return (uint64_t)XXH3_64bits(buf, len);
}

void dwcp_xxh3_avx2_update(void *state, const void *buf, size_t len)
{
    (void)XXH3_64bits_update((XXH3_state_t *)state, buf, len);
}
#pragma GCC pop_options
#endif
