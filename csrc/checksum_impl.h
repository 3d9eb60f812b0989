/* Private: CPU-specific checksum kernels selected at runtime by checksum.c. */
#ifndef DWCP_CHECKSUM_IMPL_H
#define DWCP_CHECKSUM_IMPL_H

#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define DWCP_HAVE_XXH3_AVX2 1
uint64_t dwcp_xxh3_avx2(const void *buf, size_t len);
/* XXH3_64bits_update on an XXH3_state_t (passed as void * so this header needs no xxhash.h). */
void dwcp_xxh3_avx2_update(void *state, const void *buf, size_t len);
#endif

#endif
