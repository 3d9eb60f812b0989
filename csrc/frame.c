/* Frame header codec (docs/protocol.md, "Frame header").
 *
 * The decoder's check order is part of the contract: dwcp/wire/frames.py decode_header reports the
 * same first failure for the same bytes, and the fuzz tests compare the two. The header CRC is checked
 * right after the magic so that a torn stream is reported as such rather than as some odd field. */
#include <string.h>

#include "dwcp/frame.h"
#include "util.h"

void dwcp_frame_encode(const dwcp_frame *h, uint8_t out[DWCP_HEADER_BYTES])
{
    dwcp_st32(out + 0, DWCP_MAGIC);
    out[4] = h->version;
    out[5] = h->type;
    dwcp_st16(out + 6, h->flags);
    dwcp_st16(out + 8, h->stream);
    dwcp_st16(out + 10, 0);
    dwcp_st32(out + 12, h->length);
    dwcp_st64(out + 16, h->transfer_id);
    dwcp_st64(out + 24, h->offset);
    dwcp_st64(out + 32, h->checksum);
    dwcp_st32(out + 40, dwcp_crc32c(0, out, 40));
    dwcp_st32(out + 44, 0);
}

static int known_type(uint8_t t)
{
    return (t >= DWCP_T_DATA && t <= DWCP_T_TRUNCATE) || (t >= DWCP_T_HELLO && t <= DWCP_T_ERROR);
}

int dwcp_frame_decode(const uint8_t in[DWCP_HEADER_BYTES], uint32_t max_payload, dwcp_frame *out)
{
    if (dwcp_ld32(in) != DWCP_MAGIC)
        return DWCP_E_MAGIC;
    if (dwcp_ld32(in + 40) != dwcp_crc32c(0, in, 40))
        return DWCP_E_HEADER_CRC;
    uint8_t version = in[4];
    if (version != DWCP_VERSION)
        return DWCP_E_VERSION;
    if (dwcp_ld16(in + 10) != 0 || dwcp_ld32(in + 44) != 0)
        return DWCP_E_RESERVED;
    uint8_t type = in[5];
    if (!known_type(type))
        return DWCP_E_TYPE;
    uint16_t flags = dwcp_ld16(in + 6);
    const uint16_t csum = DWCP_FLAG_CSUM_CRC32C | DWCP_FLAG_CSUM_XXH3;
    if ((flags & ~DWCP_FLAGS_KNOWN) || (flags & csum) == csum ||
        ((flags & DWCP_FLAG_SEALED) && (flags & csum)))
        return DWCP_E_FLAGS;
    uint32_t length = dwcp_ld32(in + 12);
    if (length > max_payload)
        return DWCP_E_LENGTH;
    out->version = version;
    out->type = type;
    out->flags = flags;
    out->stream = dwcp_ld16(in + 8);
    out->length = length;
    out->transfer_id = dwcp_ld64(in + 16);
    out->offset = dwcp_ld64(in + 24);
    out->checksum = dwcp_ld64(in + 32);
    return DWCP_OK;
}
