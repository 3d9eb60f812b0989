/* Sealed frames with libcrypto's EVP (see dwcp/aead.h for the construction).
 *
 * EVP rather than our own AES/GHASH: Debian's OpenSSL picks the stitched AES-NI/VAES + PCLMULQDQ
 * (or AVX2 ChaCha20) code for this CPU at run time and is audited; the engine only decides keys,
 * nonces and what the associated data is. One EVP_CIPHER_CTX per link and direction: the cipher is
 * bound once, the key only when the epoch changes, and each frame sets just its 12-byte nonce. */
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/crypto.h>
#include <string.h>

#include "dwcp/aead.h"
#include "dwcp/frame.h"
#include "util.h"

static const EVP_CIPHER *evp_cipher(int cipher)
{
    switch (cipher) {
    case DWCP_CIPHER_AES128GCM:
        return EVP_aes_128_gcm();
    case DWCP_CIPHER_AES256GCM:
        return EVP_aes_256_gcm();
    case DWCP_CIPHER_CHACHA20POLY1305:
        return EVP_chacha20_poly1305();
    default:
        return NULL;
    }
}

int dwcp_cipher_key_bytes(int cipher)
{
    switch (cipher) {
    case DWCP_CIPHER_AES128GCM:
        return 16;
    case DWCP_CIPHER_AES256GCM:
    case DWCP_CIPHER_CHACHA20POLY1305:
        return 32;
    default:
        return 0;
    }
}

const char *dwcp_cipher_name(int cipher)
{
    switch (cipher) {
    case DWCP_CIPHER_AES128GCM:
        return "aes-128-gcm";
    case DWCP_CIPHER_AES256GCM:
        return "aes-256-gcm";
    case DWCP_CIPHER_CHACHA20POLY1305:
        return "chacha20-poly1305";
    default:
        return NULL;
    }
}

int dwcp_hkdf_expand_sha256(const uint8_t *prk, size_t prk_len, const uint8_t *info, size_t info_len,
                            uint8_t *out, size_t out_len)
{
    /* RFC 5869 section 2.3: T(i) = HMAC(PRK, T(i-1) | info | i). */
    uint8_t t[32], in[32 + 256 + 1];
    size_t tlen = 0, done = 0;
    if (out_len > 255 * 32 || info_len > 256)
        return DWCP_E_INVAL;
    for (uint8_t i = 1; done < out_len; i++) {
        size_t n = 0;
        memcpy(in, t, tlen);
        n += tlen;
        if (info_len)
            memcpy(in + n, info, info_len);
        n += info_len;
        in[n++] = i;
        unsigned int mlen = 0;
        if (!HMAC(EVP_sha256(), prk, (int)prk_len, in, n, t, &mlen) || mlen != 32)
            return DWCP_E_INVAL;
        tlen = 32;
        size_t take = out_len - done < 32 ? out_len - done : 32;
        memcpy(out + done, t, take);
        done += take;
    }
    OPENSSL_cleanse(t, sizeof t);
    OPENSSL_cleanse(in, sizeof in);
    return 0;
}

static void make_nonce(uint8_t nonce[DWCP_NONCE_BYTES], uint8_t dir, uint16_t link, uint64_t ctr)
{
    nonce[0] = dir;
    nonce[1] = 0;
    dwcp_st16(nonce + 2, link);
    dwcp_st64(nonce + 4, ctr);
}

int dwcp_seal_init(dwcp_seal *s, int cipher, int encrypt, const uint8_t secret[DWCP_SECRET_BYTES], uint8_t dir,
                   uint16_t link, uint64_t rekey_bytes)
{
    memset(s, 0, sizeof *s);
    s->keyed_epoch = -1;
    const EVP_CIPHER *ev = evp_cipher(cipher);
    if (!ev)
        return DWCP_E_INVAL;
    s->keyed_epoch2 = -1;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new(), *ctx2 = EVP_CIPHER_CTX_new();
    if (!ctx || !ctx2) {
        EVP_CIPHER_CTX_free(ctx);
        EVP_CIPHER_CTX_free(ctx2);
        return DWCP_E_NOMEM;
    }
    for (int i = 0; i < 2; i++) {
        EVP_CIPHER_CTX *c = i ? ctx2 : ctx;
        if (EVP_CipherInit_ex(c, ev, NULL, NULL, NULL, encrypt ? 1 : 0) != 1 ||
            EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_IVLEN, (int)DWCP_NONCE_BYTES, NULL) != 1) {
            EVP_CIPHER_CTX_free(ctx);
            EVP_CIPHER_CTX_free(ctx2);
            return DWCP_E_INVAL;
        }
    }
    s->ctx = ctx;
    s->ctx2 = ctx2;
    s->cipher = cipher;
    s->encrypt = encrypt ? 1 : 0;
    s->dir = dir;
    s->link = link;
    memcpy(s->secret, secret, DWCP_SECRET_BYTES);
    s->rekey_bytes = rekey_bytes ? rekey_bytes : DWCP_REKEY_BYTES_DEFAULT;
    return 0;
}

void dwcp_seal_free(dwcp_seal *s)
{
    if (s->ctx)
        EVP_CIPHER_CTX_free((EVP_CIPHER_CTX *)s->ctx);
    if (s->ctx2)
        EVP_CIPHER_CTX_free((EVP_CIPHER_CTX *)s->ctx2);
    OPENSSL_cleanse(s->secret, sizeof s->secret);
    s->ctx = s->ctx2 = NULL;
}

uint64_t dwcp_seal_next(dwcp_seal *s, uint64_t len)
{
    uint64_t ctr = s->next;
    uint64_t low = ctr & (DWCP_EPOCH_FRAMES - 1);
    /* A frame over the byte budget on its own still gets a fresh epoch to itself. */
    if (low == DWCP_EPOCH_FRAMES - 1 || (low && s->epoch_bytes + len > s->rekey_bytes)) {
        ctr = ((ctr >> 32) + 1) << 32;
        s->epoch_bytes = 0;
    }
    s->epoch_bytes += len;
    s->next = ctr + 1;
    return ctr;
}

int dwcp_seal_acceptable(const dwcp_seal *s, uint64_t ctr)
{
    return ctr == s->next || ctr == ((s->next >> 32) + 1) << 32;
}

void dwcp_seal_accept(dwcp_seal *s, uint64_t ctr)
{
    s->next = ctr + 1;
}

/* Keys evp (one of the seal's two contexts, whose keyed epoch is *keyed) for the epoch of counter ctr,
 * unless it already has that key. */
static int key_for_counter(dwcp_seal *s, void *evp, int64_t *keyed, uint64_t ctr)
{
    uint32_t epoch = (uint32_t)(ctr >> 32);
    if ((int64_t)epoch == *keyed)
        return 0;
    uint8_t info[32], key[32];
    static const char label[] = "dwcp v2 frame key"; /* followed by its NUL */
    size_t n = sizeof label;
    memcpy(info, label, n);
    info[n++] = (uint8_t)s->cipher;
    dwcp_st16(info + n, s->link);
    n += 2;
    dwcp_st32(info + n, epoch);
    n += 4;
    int klen = dwcp_cipher_key_bytes(s->cipher);
    int rc = dwcp_hkdf_expand_sha256(s->secret, DWCP_SECRET_BYTES, info, n, key, (size_t)klen);
    if (rc == 0 && EVP_CipherInit_ex((EVP_CIPHER_CTX *)evp, NULL, NULL, key, NULL, s->encrypt) != 1)
        rc = DWCP_E_INVAL;
    OPENSSL_cleanse(key, sizeof key);
    if (rc == 0) {
        /* One count per epoch entered, whichever context gets there first. */
        if (epoch > s->keyed_epoch && epoch > s->keyed_epoch2 && (s->keyed_epoch >= 0 || s->keyed_epoch2 >= 0))
            __atomic_fetch_add(&s->rekeys, 1, __ATOMIC_RELAXED); /* read by stats from any thread */
        *keyed = epoch;
    }
    return rc;
}

int dwcp_seal_begin(dwcp_seal *s, uint64_t ctr, const uint8_t *hdr, size_t hdr_len)
{
    EVP_CIPHER_CTX *ctx = (EVP_CIPHER_CTX *)s->ctx;
    int rc = key_for_counter(s, s->ctx, &s->keyed_epoch, ctr);
    if (rc)
        return rc;
    uint8_t nonce[DWCP_NONCE_BYTES];
    make_nonce(nonce, s->dir, s->link, ctr);
    int outl = 0;
    if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, s->encrypt) != 1 ||
        (hdr_len && EVP_CipherUpdate(ctx, NULL, &outl, hdr, (int)hdr_len) != 1))
        return DWCP_E_INVAL;
    return 0;
}

int dwcp_seal_small(dwcp_seal *s, uint64_t ctr, const uint8_t *hdr, size_t hdr_len, uint8_t *buf, size_t n,
                    uint8_t tag[DWCP_TAG_BYTES])
{
    EVP_CIPHER_CTX *ctx = (EVP_CIPHER_CTX *)s->ctx2;
    int rc = key_for_counter(s, s->ctx2, &s->keyed_epoch2, ctr);
    if (rc)
        return rc;
    uint8_t nonce[DWCP_NONCE_BYTES], dummy[32];
    make_nonce(nonce, s->dir, s->link, ctr);
    int outl = 0;
    if (n > (1u << 30) || EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 1) != 1 ||
        (hdr_len && EVP_CipherUpdate(ctx, NULL, &outl, hdr, (int)hdr_len) != 1) ||
        (n && (EVP_CipherUpdate(ctx, buf, &outl, buf, (int)n) != 1 || outl != (int)n)) ||
        EVP_CipherFinal_ex(ctx, dummy, &outl) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, (int)DWCP_TAG_BYTES, tag) != 1)
        return DWCP_E_INVAL;
    return 0;
}

int dwcp_seal_update(dwcp_seal *s, uint8_t *out, const uint8_t *in, size_t n)
{
    EVP_CIPHER_CTX *ctx = (EVP_CIPHER_CTX *)s->ctx;
    while (n) {
        /* EVP takes int lengths; GCM and ChaCha20-Poly1305 are stream modes, so every byte in comes
         * out at once (checked: the in-place callers rely on it). */
        int piece = n > (1u << 30) ? 1 << 30 : (int)n;
        int outl = 0;
        if (EVP_CipherUpdate(ctx, out, &outl, in, piece) != 1 || outl != piece)
            return DWCP_E_INVAL;
        out += piece;
        in += piece;
        n -= (size_t)piece;
    }
    return 0;
}

int dwcp_seal_finish(dwcp_seal *s, uint8_t tag[DWCP_TAG_BYTES])
{
    EVP_CIPHER_CTX *ctx = (EVP_CIPHER_CTX *)s->ctx;
    uint8_t dummy[32];
    int outl = 0;
    if (EVP_CipherFinal_ex(ctx, dummy, &outl) != 1 || outl != 0 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, (int)DWCP_TAG_BYTES, tag) != 1)
        return DWCP_E_INVAL;
    return 0;
}

int dwcp_seal_verify(dwcp_seal *s, const uint8_t tag[DWCP_TAG_BYTES])
{
    EVP_CIPHER_CTX *ctx = (EVP_CIPHER_CTX *)s->ctx;
    uint8_t dummy[32], t[DWCP_TAG_BYTES];
    memcpy(t, tag, sizeof t);
    int outl = 0;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, (int)DWCP_TAG_BYTES, t) != 1)
        return DWCP_E_INVAL;
    /* EVP compares the tag in constant time. */
    if (EVP_CipherFinal_ex(ctx, dummy, &outl) != 1 || outl != 0)
        return DWCP_E_AUTH;
    return 0;
}

int dwcp_aead_oneshot(int cipher, int encrypt, const uint8_t *key, const uint8_t nonce[DWCP_NONCE_BYTES],
                      const uint8_t *aad, size_t aad_len, const uint8_t *in, size_t n, uint8_t *out,
                      uint8_t tag[DWCP_TAG_BYTES])
{
    const EVP_CIPHER *ev = evp_cipher(cipher);
    if (!ev || n > (1u << 30) || aad_len > (1u << 30))
        return DWCP_E_INVAL;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx)
        return DWCP_E_NOMEM;
    int rc = DWCP_E_INVAL, outl = 0;
    uint8_t dummy[32];
    if (EVP_CipherInit_ex(ctx, ev, NULL, NULL, NULL, encrypt) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, (int)DWCP_NONCE_BYTES, NULL) != 1 ||
        EVP_CipherInit_ex(ctx, NULL, NULL, key, nonce, encrypt) != 1)
        goto out;
    if (aad_len && EVP_CipherUpdate(ctx, NULL, &outl, aad, (int)aad_len) != 1)
        goto out;
    if (n && (EVP_CipherUpdate(ctx, out, &outl, in, (int)n) != 1 || outl != (int)n))
        goto out;
    if (encrypt) {
        if (EVP_CipherFinal_ex(ctx, dummy, &outl) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, (int)DWCP_TAG_BYTES, tag) != 1)
            goto out;
        rc = 0;
    } else {
        if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, (int)DWCP_TAG_BYTES, tag) != 1)
            goto out;
        rc = EVP_CipherFinal_ex(ctx, dummy, &outl) == 1 ? 0 : DWCP_E_AUTH;
    }
out:
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}
