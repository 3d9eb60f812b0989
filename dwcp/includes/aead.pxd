# C declarations of csrc/include/dwcp/aead.h (sealed frames).
from libc.stdint cimport uint8_t, uint16_t, uint64_t, int64_t


cdef extern from "dwcp/aead.h" nogil:
    enum:
        DWCP_CIPHER_NONE
        DWCP_CIPHER_AES128GCM
        DWCP_CIPHER_AES256GCM
        DWCP_CIPHER_CHACHA20POLY1305
        DWCP_TAG_BYTES
        DWCP_SECRET_BYTES
        DWCP_NONCE_BYTES

    ctypedef struct dwcp_seal:
        uint64_t next
        uint64_t rekeys
        int64_t keyed_epoch

    int dwcp_cipher_key_bytes(int cipher)
    const char *dwcp_cipher_name(int cipher)
    int dwcp_seal_init(dwcp_seal *s, int cipher, int encrypt, const uint8_t *secret, uint8_t dir,
                       uint16_t link, uint64_t rekey_bytes)
    void dwcp_seal_free(dwcp_seal *s)
    uint64_t dwcp_seal_next(dwcp_seal *s, uint64_t len)
    int dwcp_seal_acceptable(const dwcp_seal *s, uint64_t ctr)
    void dwcp_seal_accept(dwcp_seal *s, uint64_t ctr)
    int dwcp_seal_begin(dwcp_seal *s, uint64_t ctr, const uint8_t *hdr, size_t hdr_len)
    int dwcp_seal_update(dwcp_seal *s, uint8_t *out, const uint8_t *inp, size_t n)
    int dwcp_seal_finish(dwcp_seal *s, uint8_t *tag)
    int dwcp_seal_verify(dwcp_seal *s, const uint8_t *tag)
    int dwcp_hkdf_expand_sha256(const uint8_t *prk, size_t prk_len, const uint8_t *info, size_t info_len,
                                uint8_t *out, size_t out_len)
    int dwcp_aead_oneshot(int cipher, int encrypt, const uint8_t *key, const uint8_t *nonce,
                          const uint8_t *aad, size_t aad_len, const uint8_t *inp, size_t n, uint8_t *out,
                          uint8_t *tag)
