# C declarations of csrc/include/dwcp/frame.h (the frame codec and checksums).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "dwcp/frame.h" nogil:
    enum:
        DWCP_MAGIC
        DWCP_VERSION
        DWCP_HEADER_BYTES
        DWCP_MAX_CHUNK_BYTES
        DWCP_MAX_CONTROL_BYTES
        DWCP_FLAG_CSUM_CRC32C
        DWCP_FLAG_CSUM_XXH3
        DWCP_FLAG_COMPRESSED
        DWCP_FLAG_SEALED
        DWCP_FLAGS_KNOWN

    enum dwcp_err:
        DWCP_OK
        DWCP_E_MAGIC
        DWCP_E_VERSION
        DWCP_E_TYPE
        DWCP_E_FLAGS
        DWCP_E_RESERVED
        DWCP_E_HEADER_CRC
        DWCP_E_LENGTH
        DWCP_E_RANGE
        DWCP_E_STREAM
        DWCP_E_CHECKSUM
        DWCP_E_SYSCALL
        DWCP_E_TIMEOUT
        DWCP_E_ALL_STREAMS
        DWCP_E_NOMEM
        DWCP_E_INVAL
        DWCP_E_PEER
        DWCP_E_CLOSED
        DWCP_E_PEER_ABORT
        DWCP_E_PEER_CLOSE
        DWCP_E_AUTH

    ctypedef struct dwcp_frame:
        uint8_t version
        uint8_t type
        uint16_t flags
        uint16_t stream
        uint32_t length
        uint64_t transfer_id
        uint64_t offset
        uint64_t checksum

    void dwcp_frame_encode(const dwcp_frame *hdr, uint8_t *out)
    int dwcp_frame_decode(const uint8_t *inp, uint32_t max_payload, dwcp_frame *out)
    uint32_t dwcp_crc32c(uint32_t crc, const void *buf, size_t len)
    uint32_t dwcp_crc32c_sw(uint32_t crc, const void *buf, size_t len)
    int dwcp_crc32c_hw()
    uint64_t dwcp_xxh3(const void *buf, size_t len)
    uint64_t dwcp_payload_checksum(uint16_t flags, const void *buf, size_t len)

    ctypedef struct dwcp_csum:
        pass
    int dwcp_csum_init(dwcp_csum *c)
    void dwcp_csum_free(dwcp_csum *c)
    void dwcp_csum_reset(dwcp_csum *c, uint16_t flags)
    void dwcp_csum_update(dwcp_csum *c, const void *buf, size_t len)
    uint64_t dwcp_csum_digest(const dwcp_csum *c)
