/* DWCP frame header: the fixed 48-byte prefix of every frame on every connection.
 *
 * Byte layout (all integers little-endian; see docs/protocol.md for the normative table):
 *   0  u32 magic          0x50435744 ("DWCP" in ASCII when read as bytes)
 *   4  u8  version        protocol version of this frame (1)
 *   5  u8  type           enum dwcp_frame_type
 *   6  u16 flags          DWCP_FLAG_* bits; unknown bits are an error
 *   8  u16 stream         index of the data stream that carries the frame (0 on the control connection)
 *  10  u16 reserved0      must be 0
 *  12  u32 length         payload bytes that follow the header
 *  16  u64 transfer_id
 *  24  u64 offset         byte offset of the payload inside the transfer
 *  32  u64 checksum       payload checksum (algorithm in flags), 0 when length == 0
 *  40  u32 header_crc     CRC32C of bytes 0..39
 *  44  u32 reserved1      must be 0
 *
 * Little-endian because every host we target is; the decoder never casts the wire bytes to a struct
 * (alignment and endianness are handled by explicit loads), so the layout stays portable. */
#ifndef DWCP_FRAME_H
#define DWCP_FRAME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DWCP_MAGIC 0x50435744u
#define DWCP_VERSION 1u
#define DWCP_HEADER_BYTES 48u

/* Upper bounds a receiver enforces before it reads a payload. */
#define DWCP_MAX_CHUNK_BYTES (64u << 20)   /* data frame payload */
#define DWCP_MAX_CONTROL_BYTES (64u << 10) /* control frame payload */

enum dwcp_frame_type {
    /* data connections */
    DWCP_T_DATA = 1,     /* payload = bytes [offset, offset+length) of the transfer */
    DWCP_T_ACK = 2,      /* receiver -> sender: chunk at offset arrived and verified */
    DWCP_T_NACK = 3,     /* receiver -> sender: chunk at offset failed its checksum, send again */
    DWCP_T_DONE = 4,     /* receiver -> sender: every chunk of transfer_id is in place */
    DWCP_T_TRUNCATE = 5, /* sender -> receiver: transfer ends at offset (time-bounded transfers) */
    /* control connection and stream join (payload layouts in docs/protocol.md) */
    DWCP_T_HELLO = 16,
    DWCP_T_CHALLENGE = 17,
    DWCP_T_PROOF = 18,
    DWCP_T_WELCOME = 19,
    DWCP_T_JOIN = 20,
    DWCP_T_JOINED = 21,
    DWCP_T_XFER_BEGIN = 22,
    DWCP_T_ABORT = 23,
    DWCP_T_CLOSE = 24,
    DWCP_T_ERROR = 25,
};

enum dwcp_frame_flags {
    DWCP_FLAG_CSUM_CRC32C = 1u << 0, /* checksum = CRC32C of payload (zero-extended) */
    DWCP_FLAG_CSUM_XXH3 = 1u << 1,   /* checksum = XXH3-64 of payload */
    DWCP_FLAG_COMPRESSED = 1u << 2,  /* payload was compressed by HDE; nothing below compresses it */
    DWCP_FLAG_SEALED = 1u << 3,      /* sealed frame (dwcp/aead.h): checksum = frame counter, payload
                                        encrypted, a 16-byte tag follows it; no checksum bit with it */
};
#define DWCP_FLAGS_KNOWN 0x000fu

typedef struct dwcp_frame {
    uint8_t version;
    uint8_t type;
    uint16_t flags;
    uint16_t stream;
    uint32_t length;
    uint64_t transfer_id;
    uint64_t offset;
    uint64_t checksum;
} dwcp_frame;

/* Error codes shared by the C core (negative return values). convert_error() in Python maps them. */
enum dwcp_err {
    DWCP_OK = 0,
    DWCP_E_MAGIC = -1,       /* not a DWCP frame */
    DWCP_E_VERSION = -2,     /* unsupported protocol version */
    DWCP_E_TYPE = -3,        /* unknown or unexpected frame type */
    DWCP_E_FLAGS = -4,       /* unknown flag bits or checksum flags inconsistent */
    DWCP_E_RESERVED = -5,    /* reserved field not zero */
    DWCP_E_HEADER_CRC = -6,  /* header checksum mismatch */
    DWCP_E_LENGTH = -7,      /* length over the limit for this frame type / transfer */
    DWCP_E_RANGE = -8,       /* offset/length outside the transfer or not on a chunk boundary */
    DWCP_E_STREAM = -9,      /* stream index out of range */
    DWCP_E_CHECKSUM = -10,   /* payload checksum mismatch */
    DWCP_E_SYSCALL = -11,    /* a system call failed; errno is in the stats/err field */
    DWCP_E_TIMEOUT = -12,    /* no progress within the timeout */
    DWCP_E_ALL_STREAMS = -13,/* every data stream died */
    DWCP_E_NOMEM = -14,
    DWCP_E_INVAL = -15,      /* bad argument from the caller */
    DWCP_E_PEER = -16,       /* peer sent a frame that breaks the protocol (after validation) */
    DWCP_E_CLOSED = -17,     /* the stream set was closed locally */
    DWCP_E_PEER_ABORT = -18, /* the peer sent ABORT: it gave up the transfer */
    DWCP_E_PEER_CLOSE = -19, /* the peer sent CLOSE: it ended the session */
    DWCP_E_AUTH = -20,       /* a sealed frame failed authentication, or its counter is not the next */
};

/* Encode hdr into out[DWCP_HEADER_BYTES] (computes header_crc). */
void dwcp_frame_encode(const dwcp_frame *hdr, uint8_t out[DWCP_HEADER_BYTES]);

/* Decode and validate the fixed fields: magic, version, known type, known flags, at most one checksum
 * flag, reserved fields zero, header CRC, and length <= max_payload. Returns DWCP_OK or DWCP_E_*. */
int dwcp_frame_decode(const uint8_t in[DWCP_HEADER_BYTES], uint32_t max_payload, dwcp_frame *out);

/* Checksums. crc32c uses SSE4.2 when the CPU has it (checked once at runtime), else a table. */
uint32_t dwcp_crc32c(uint32_t crc, const void *buf, size_t len);
/* The portable table implementation (tests cross-check it against the hardware one). */
uint32_t dwcp_crc32c_sw(uint32_t crc, const void *buf, size_t len);
/* 1 when dwcp_crc32c uses the SSE4.2 instruction on this CPU. */
int dwcp_crc32c_hw(void);
uint64_t dwcp_xxh3(const void *buf, size_t len);
/* Checksum of a payload as named by flags (DWCP_FLAG_CSUM_*); 0 when neither flag is set. */
uint64_t dwcp_payload_checksum(uint16_t flags, const void *buf, size_t len);

/* The same checksum computed piece by piece, so a receiver can hash each slice of a payload right
 * after the kernel copied it in (while it is still in cache). The digest equals
 * dwcp_payload_checksum over the concatenated pieces. */
typedef struct dwcp_csum {
    uint16_t flags;
    uint32_t crc;
    void *xxh; /* XXH3 streaming state (64-byte aligned, owned) */
} dwcp_csum;
/* 0, or DWCP_E_NOMEM. */
int dwcp_csum_init(dwcp_csum *c);
void dwcp_csum_free(dwcp_csum *c);
void dwcp_csum_reset(dwcp_csum *c, uint16_t flags);
void dwcp_csum_update(dwcp_csum *c, const void *buf, size_t len);
uint64_t dwcp_csum_digest(const dwcp_csum *c);

#ifdef __cplusplus
}
#endif
#endif
