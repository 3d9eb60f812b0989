/* Sealed frames: authenticated encryption of every post-handshake frame (docs/protocol.md, "Sealed
 * frames"; docs/adr/0009-sealed-frames.md).
 *
 * A sealed frame is the 48-byte header (flag DWCP_FLAG_SEALED, `checksum` = the frame counter), the
 * payload encrypted in place of the plaintext (`length` bytes), then a 16-byte tag. The header is the
 * associated data, so every field of it (type, stream, transfer, offset, length, counter) is
 * authenticated along with the payload.
 *
 * Keys: each direction of a session has a 32-byte traffic secret (derived in Python from the session
 * key and both handshake nonces). Each link of that direction has its own key per epoch:
 *     key = HKDF-Expand-SHA256(secret, "dwcp v2 frame key" 0x00 | u8 cipher | u16 link | u32 epoch, len)
 * Nonce (12 bytes): u8 direction | u8 0 | u16 link | u64 counter (little-endian); the counter's upper
 * 32 bits are the epoch. A sender counts frames per link from 0 and moves to the next epoch (a new key,
 * counter = epoch << 32) before the low 32 bits would wrap or the key has sealed rekey_bytes, so a
 * (key, nonce) pair is never used twice. A receiver accepts on each link only the next counter or the
 * first counter of the next epoch: a replayed, dropped, reordered or moved frame fails before or at
 * its tag. */
#ifndef DWCP_AEAD_H
#define DWCP_AEAD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum dwcp_cipher {
    DWCP_CIPHER_NONE = 0,
    DWCP_CIPHER_AES128GCM = 1,
    DWCP_CIPHER_AES256GCM = 2,
    DWCP_CIPHER_CHACHA20POLY1305 = 3,
};

#define DWCP_TAG_BYTES 16u
#define DWCP_SECRET_BYTES 32u
#define DWCP_NONCE_BYTES 12u
/* Default per-key data limit. AES-GCM's confidentiality bound degrades with the blocks one key
 * encrypts; 2^34 bytes (16 GiB) per key keeps the advantage far below 2^-60 for any frame size we
 * send (ChaCha20-Poly1305 gets the same limit: one rule is easier to audit). */
#define DWCP_REKEY_BYTES_DEFAULT (1ull << 34)
#define DWCP_EPOCH_FRAMES (1ull << 32)

/* One direction of one link: the sealing side (sender) or the opening side (receiver). */
typedef struct dwcp_seal {
    void *ctx;  /* EVP_CIPHER_CTX of the frame being sealed or opened piece by piece */
    void *ctx2; /* ... of whole small frames sealed meanwhile (dwcp_seal_small), same key schedule */
    int64_t keyed_epoch2;
    int cipher;
    int encrypt;
    uint8_t dir;
    uint16_t link;
    uint8_t secret[DWCP_SECRET_BYTES];
    uint64_t rekey_bytes;
    uint64_t next;        /* the next counter this side seals / accepts */
    uint64_t epoch_bytes; /* sender: bytes sealed under the current epoch's key */
    int64_t keyed_epoch;  /* epoch whose key ctx holds; -1: none yet */
    uint64_t rekeys;      /* epochs entered after the first */
} dwcp_seal;

/* Bytes of key for the cipher, 0 if unknown. */
int dwcp_cipher_key_bytes(int cipher);
/* Short stable name ("aes-128-gcm", ...), NULL if unknown. */
const char *dwcp_cipher_name(int cipher);

/* 0, DWCP_E_INVAL (unknown cipher, rekey_bytes 0) or DWCP_E_NOMEM. rekey_bytes 0 means the default. */
int dwcp_seal_init(dwcp_seal *s, int cipher, int encrypt, const uint8_t secret[DWCP_SECRET_BYTES], uint8_t dir,
                   uint16_t link, uint64_t rekey_bytes);
void dwcp_seal_free(dwcp_seal *s);

/* Sender: the counter for the next frame of `len` payload bytes (moves to the next epoch first when
 * this frame would pass the epoch's frame or byte budget). Put it in the header's checksum field. */
uint64_t dwcp_seal_next(dwcp_seal *s, uint64_t len);
/* Receiver: 1 when `ctr` is what this link may carry next (the next counter, or the first of the next
 * epoch), else 0. dwcp_seal_accept then records it as used. */
int dwcp_seal_acceptable(const dwcp_seal *s, uint64_t ctr);
void dwcp_seal_accept(dwcp_seal *s, uint64_t ctr);

/* One frame: begin with its encoded header (the AAD; its checksum field holds ctr), then update over
 * the payload in pieces (out may equal in), then finish. 0 or a negative DWCP_E_* (DWCP_E_AUTH when
 * the tag does not verify). */
int dwcp_seal_begin(dwcp_seal *s, uint64_t ctr, const uint8_t *hdr, size_t hdr_len);
int dwcp_seal_update(dwcp_seal *s, uint8_t *out, const uint8_t *in, size_t n);
int dwcp_seal_finish(dwcp_seal *s, uint8_t tag[DWCP_TAG_BYTES]);           /* sender: writes tag */
int dwcp_seal_verify(dwcp_seal *s, const uint8_t tag[DWCP_TAG_BYTES]);     /* receiver: checks it */

/* Seal a whole frame at once (sender), in place, with the second context: a small frame queued while
 * a large one is still being sealed piece by piece on the same link. hdr carries ctr already. */
int dwcp_seal_small(dwcp_seal *s, uint64_t ctr, const uint8_t *hdr, size_t hdr_len, uint8_t *buf, size_t n,
                    uint8_t tag[DWCP_TAG_BYTES]);

/* Building blocks, exported for known-answer tests. */
int dwcp_hkdf_expand_sha256(const uint8_t *prk, size_t prk_len, const uint8_t *info, size_t info_len,
                            uint8_t *out, size_t out_len);
/* One-shot AEAD: encrypt (out = ciphertext, tag) or decrypt (out = plaintext; DWCP_E_AUTH on a bad
 * tag). nonce is 12 bytes. */
int dwcp_aead_oneshot(int cipher, int encrypt, const uint8_t *key, const uint8_t nonce[DWCP_NONCE_BYTES],
                      const uint8_t *aad, size_t aad_len, const uint8_t *in, size_t n, uint8_t *out,
                      uint8_t tag[DWCP_TAG_BYTES]);

#ifdef __cplusplus
}
#endif
#endif
