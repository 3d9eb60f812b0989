# cython: language_level=3
"""The compiled core: frame codec, checksums, the striped multi-stream transfer engine and the HDE
delta kernels (csrc/).

Bare primitives for the layers above (dwcp.wire, dwcp.transport): every call validates its arguments
and raises :mod:`dwcp.errors` exceptions; transfers run without the GIL."""

from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_Resize
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from dwcp.includes.frame cimport *
from dwcp.includes.amst cimport *
from dwcp.includes.aead cimport *

import math

from dwcp.errors import (CapabilityError, ConfigError, DWCPError, ProtocolError, TransferTimeout,
                         TransportError, convert_error)

HEADER_BYTES = DWCP_HEADER_BYTES
MAX_CHUNK_BYTES = DWCP_MAX_CHUNK_BYTES
MAX_STREAMS = DWCP_MAX_STREAMS
FLAG_CSUM_CRC32C = DWCP_FLAG_CSUM_CRC32C
FLAG_CSUM_XXH3 = DWCP_FLAG_CSUM_XXH3
FLAG_COMPRESSED = DWCP_FLAG_COMPRESSED
FLAG_SEALED = DWCP_FLAG_SEALED
TAG_BYTES = DWCP_TAG_BYTES
#: Sealed-frame ciphers by wire name (dwcp/aead.h); the handshake negotiates one of these names.
CIPHERS = {"aes-128-gcm": DWCP_CIPHER_AES128GCM, "aes-256-gcm": DWCP_CIPHER_AES256GCM,
           "chacha20-poly1305": DWCP_CIPHER_CHACHA20POLY1305}

# Checksumming small inputs is cheaper than dropping and re-taking the GIL.
cdef Py_ssize_t _NOGIL_BYTES = 64 * 1024
cdef uint64_t _U64_MAX = 0xFFFFFFFFFFFFFFFF


cdef int _get_buffer(object obj, Py_buffer *view, bint writable, str what) except -1:
    cdef int flags = PyBUF_C_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0)
    try:
        PyObject_GetBuffer(obj, view, flags)
    except (BufferError, TypeError, ValueError) as e:
        need = "a writable, C-contiguous" if writable else "a C-contiguous"
        raise ConfigError(
            f"{what} must be {need} buffer (bytearray, memoryview, numpy array, mmap); got "
            f"{type(obj).__name__}: {e}. Copy it with bytearray(...) or numpy.ascontiguousarray(...)"
        ) from None
    return 0


def crc32c(data, uint32_t crc=0):
    """CRC32C (Castagnoli) of data, continuing from crc (0 to start). Hardware-accelerated."""
    cdef Py_buffer view
    cdef uint32_t out
    _get_buffer(data, &view, False, "data")
    try:
        if view.len >= _NOGIL_BYTES:
            with nogil:
                out = dwcp_crc32c(crc, view.buf, <size_t>view.len)
        else:
            out = dwcp_crc32c(crc, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return out


def _crc32c_sw(data, uint32_t crc=0):
    """CRC32C by the portable table implementation (tests compare it with the hardware path)."""
    cdef Py_buffer view
    cdef uint32_t out
    _get_buffer(data, &view, False, "data")
    try:
        out = dwcp_crc32c_sw(crc, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return out


def xxh3(data):
    """XXH3-64 (seed 0) of data."""
    cdef Py_buffer view
    cdef uint64_t out
    _get_buffer(data, &view, False, "data")
    try:
        if view.len >= _NOGIL_BYTES:
            with nogil:
                out = dwcp_xxh3(view.buf, <size_t>view.len)
        else:
            out = dwcp_xxh3(view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return out


def payload_checksum(int flags, data):
    """Checksum of data by the algorithm flags names (FLAG_CSUM_XXH3 or FLAG_CSUM_CRC32C), else 0."""
    cdef Py_buffer view
    cdef uint64_t out
    if flags < 0 or flags > 0xFFFF:
        raise ConfigError(f"flags must be a 16-bit frame flags value, got {flags}")
    _get_buffer(data, &view, False, "data")
    try:
        with nogil:
            out = dwcp_payload_checksum(<uint16_t>flags, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return out


cdef uint64_t _uint(object value, str name, uint64_t maximum) except? 0xFFFFFFFFFFFFFFFF:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or value > maximum:
        raise ConfigError(f"{name} must be in 0..{maximum}, got {value}")
    return <uint64_t>value


def encode_header(type, flags, stream, length, transfer_id, offset, checksum, version=1):
    """The 48-byte frame header (docs/protocol.md) with its header CRC filled in."""
    cdef dwcp_frame f
    cdef uint8_t out[48]
    f.version = <uint8_t>_uint(version, "version", 0xFF)
    f.type = <uint8_t>_uint(type, "type", 0xFF)
    f.flags = <uint16_t>_uint(flags, "flags", 0xFFFF)
    f.stream = <uint16_t>_uint(stream, "stream", 0xFFFF)
    f.length = <uint32_t>_uint(length, "length", 0xFFFFFFFF)
    f.transfer_id = _uint(transfer_id, "transfer_id", _U64_MAX)
    f.offset = _uint(offset, "offset", _U64_MAX)
    f.checksum = _uint(checksum, "checksum", _U64_MAX)
    dwcp_frame_encode(&f, out)
    return PyBytes_FromStringAndSize(<char *>out, 48)


def decode_header(data, max_payload):
    """Validate a 48-byte header exactly like dwcp.wire.frames.decode_header.

    Returns (version, type, flags, stream, length, transfer_id, offset, checksum); raises
    ProtocolError (with .code, a DWCP_E_* value) naming the first bad field."""
    cdef Py_buffer view
    cdef dwcp_frame f
    cdef int rc
    cdef uint32_t mp = <uint32_t>_uint(max_payload, "max_payload", 0xFFFFFFFF)
    _get_buffer(data, &view, False, "data")
    try:
        if view.len != DWCP_HEADER_BYTES:
            raise convert_error(DWCP_E_LENGTH, context=f"decode header ({view.len} bytes, need 48)")
        rc = dwcp_frame_decode(<const uint8_t *>view.buf, mp, &f)
    finally:
        PyBuffer_Release(&view)
    if rc != 0:
        raise convert_error(rc, context="decode header")
    return (f.version, f.type, f.flags, f.stream, f.length, f.transfer_id, f.offset, f.checksum)


cdef int _cipher_id(object cipher) except -1:
    if cipher not in CIPHERS:
        raise ConfigError(f"cipher must be one of {sorted(CIPHERS)}, got {cipher!r}")
    return CIPHERS[cipher]


def hkdf_expand_sha256(prk, info, Py_ssize_t length):
    """HKDF-Expand (RFC 5869) with HMAC-SHA256, as the engine derives its frame keys."""
    cdef bytes p = bytes(prk), i = bytes(info)
    if length < 1 or length > 255 * 32 or len(i) > 256:
        raise ConfigError("hkdf_expand_sha256: length must be 1..8160 and info at most 256 bytes")
    out = bytearray(length)
    cdef unsigned char[::1] o = out
    if dwcp_hkdf_expand_sha256(<const uint8_t *>p, len(p), <const uint8_t *>i, len(i), &o[0], length):
        raise ConfigError("hkdf_expand_sha256 failed")
    return bytes(out)


cdef int _check_key_nonce(int cid, object cipher, bytes k, bytes n) except -1:
    if len(k) != dwcp_cipher_key_bytes(cid) or len(n) != DWCP_NONCE_BYTES:
        raise ConfigError(f"{cipher}: key must be {dwcp_cipher_key_bytes(cid)} bytes and nonce 12")
    return 0


def aead_seal(cipher, key, nonce, aad, plaintext):
    """One-shot AEAD encryption with the engine's code: ciphertext followed by the 16-byte tag."""
    cdef int cid = _cipher_id(cipher)
    cdef bytes k = bytes(key), n = bytes(nonce), a = bytes(aad), pt = bytes(plaintext)
    _check_key_nonce(cid, cipher, k, n)
    out = bytearray(len(pt) + DWCP_TAG_BYTES)
    cdef unsigned char[::1] o = out
    cdef int rc = dwcp_aead_oneshot(cid, 1, <const uint8_t *>k, <const uint8_t *>n, <const uint8_t *>a,
                                    len(a), <const uint8_t *>pt, len(pt), &o[0], &o[len(pt)])
    if rc:
        raise convert_error(rc, context="aead_seal")
    return bytes(out)


def aead_open(cipher, key, nonce, aad, sealed):
    """Inverse of aead_seal; ProtocolError (code E_AUTH) when the tag does not verify."""
    cdef int cid = _cipher_id(cipher)
    cdef bytes k = bytes(key), n = bytes(nonce), a = bytes(aad), ct = bytes(sealed)
    _check_key_nonce(cid, cipher, k, n)
    if len(ct) < DWCP_TAG_BYTES:
        raise convert_error(DWCP_E_AUTH, context="aead_open (shorter than a tag)")
    cdef Py_ssize_t m = len(ct) - DWCP_TAG_BYTES
    out = bytearray(m + 1)
    cdef unsigned char[::1] o = out
    cdef int rc = dwcp_aead_oneshot(cid, 0, <const uint8_t *>k, <const uint8_t *>n, <const uint8_t *>a,
                                    len(a), <const uint8_t *>ct, m, &o[0], <uint8_t *>(<const uint8_t *>ct + m))
    if rc:
        raise convert_error(rc, context="aead_open")
    return bytes(out[:m])


cdef class FrameSeal:
    """One direction of one link's sealed frames (dwcp/aead.h), for the Python engine and for tests:
    the same key schedule, nonces and counters as the C engine.

    ``seal(header48, payload)`` takes an encoded header whose checksum field is 0 and flags include
    SEALED; it returns the header with its counter (and CRC) filled in and the ciphertext+tag.
    ``open(header48, sealed)`` checks the counter is the next this link may carry and the tag, and
    returns the plaintext (ProtocolError with code E_AUTH otherwise)."""

    cdef dwcp_seal _st
    cdef bint _ok
    cdef readonly str cipher
    cdef readonly bint sealing

    def __cinit__(self, cipher, secret, *, sealing, direction, link, rekey_bytes=0):
        cdef int cid = _cipher_id(cipher)
        cdef bytes sec = bytes(secret)
        self._ok = False
        if len(sec) != DWCP_SECRET_BYTES:
            raise ConfigError(f"secret must be {DWCP_SECRET_BYTES} bytes")
        if direction not in (0, 1) or not 0 <= link <= 0xFFFF or rekey_bytes < 0:
            raise ConfigError("direction must be 0/1, link 0..65535, rekey_bytes >= 0")
        if dwcp_seal_init(&self._st, cid, 1 if sealing else 0, <const uint8_t *>sec, <uint8_t>direction,
                          <uint16_t>link, <uint64_t>rekey_bytes):
            raise MemoryError()
        self._ok = True
        self.cipher = cipher
        self.sealing = bool(sealing)

    def __dealloc__(self):
        if self._ok:
            dwcp_seal_free(&self._st)

    @property
    def next_counter(self):
        return self._st.next

    @property
    def rekeys(self):
        return self._st.rekeys

    def seal(self, header, payload=b""):
        if not self.sealing:
            raise ConfigError("this FrameSeal opens frames; make one with sealing=True to seal")
        cdef bytearray h = bytearray(header)
        cdef bytes pt = bytes(payload)
        if len(h) != DWCP_HEADER_BYTES:
            raise ConfigError("header must be 48 bytes")
        cdef uint64_t ctr = dwcp_seal_next(&self._st, len(pt))
        cdef unsigned char[::1] hv = h
        h[32:40] = ctr.to_bytes(8, "little")
        h[40:44] = dwcp_crc32c(0, &hv[0], 40).to_bytes(4, "little")
        out = bytearray(len(pt) + DWCP_TAG_BYTES)
        cdef unsigned char[::1] o = out
        cdef int rc = dwcp_seal_begin(&self._st, ctr, &hv[0], DWCP_HEADER_BYTES)
        cdef size_t m = len(pt)
        cdef const uint8_t *src = <const uint8_t *>pt
        cdef uint8_t *dst = &o[0]
        if not rc and m:
            with nogil:
                rc = dwcp_seal_update(&self._st, dst, src, m)
        if not rc:
            rc = dwcp_seal_finish(&self._st, &o[len(pt)])
        if rc:
            raise convert_error(rc, context="seal frame")
        return bytes(h), bytes(out)

    def acceptable(self, uint64_t counter):
        return bool(dwcp_seal_acceptable(&self._st, counter))

    # Piece-by-piece opening, for a reader that gets a payload in several reads (the Python engine):
    # begin(header) once the header's counter was found acceptable (it is used up here), update(buf)
    # on each piece in place, verify(tag) at the end.
    cdef uint64_t _next_counter_of(self, bytes h) except? 0xFFFFFFFFFFFFFFFF:
        """The counter in header h, which must be the next this link may carry (nothing is used up)."""
        cdef uint64_t ctr = int.from_bytes(h[32:40], "little")
        if not dwcp_seal_acceptable(&self._st, ctr):
            raise convert_error(DWCP_E_AUTH, context=f"open frame (counter {ctr} is not the next, "
                                f"{self._st.next}: replayed, reordered or dropped frame)")
        return ctr

    def begin(self, header):
        cdef bytes h = bytes(header)
        if len(h) != DWCP_HEADER_BYTES:
            raise ConfigError("header must be 48 bytes")
        cdef uint64_t ctr = self._next_counter_of(h)
        dwcp_seal_accept(&self._st, ctr)
        if dwcp_seal_begin(&self._st, ctr, <const uint8_t *>h, DWCP_HEADER_BYTES):
            raise convert_error(DWCP_E_AUTH, context="open frame")

    def update(self, buf):
        """Decrypt (opening) or encrypt (sealing) buf in place."""
        cdef Py_buffer view
        cdef int rc
        _get_buffer(buf, &view, True, "buf")
        try:
            with nogil:
                rc = dwcp_seal_update(&self._st, <uint8_t *>view.buf, <const uint8_t *>view.buf,
                                      <size_t>view.len)
        finally:
            PyBuffer_Release(&view)
        if rc:
            raise convert_error(DWCP_E_AUTH, context="open frame")

    def verify(self, tag):
        cdef bytes t = bytes(tag)
        if len(t) != DWCP_TAG_BYTES or dwcp_seal_verify(&self._st, <const uint8_t *>t):
            raise convert_error(DWCP_E_AUTH, context="open frame (tag does not verify)")

    def open(self, header, sealed):
        if self.sealing:
            raise ConfigError("this FrameSeal seals frames; make one with sealing=False to open")
        cdef bytes h = bytes(header), ct = bytes(sealed)
        if len(h) != DWCP_HEADER_BYTES or len(ct) < DWCP_TAG_BYTES:
            raise convert_error(DWCP_E_AUTH, context="open frame (truncated)")
        cdef uint64_t ctr = self._next_counter_of(h)
        cdef Py_ssize_t m = len(ct) - DWCP_TAG_BYTES
        out = bytearray(m + 1)
        cdef unsigned char[::1] o = out
        cdef int rc = dwcp_seal_begin(&self._st, ctr, <const uint8_t *>h, DWCP_HEADER_BYTES)
        if not rc and m:
            rc = dwcp_seal_update(&self._st, &o[0], <const uint8_t *>ct, m)
        if not rc:
            rc = dwcp_seal_verify(&self._st, <const uint8_t *>ct + m)
        if rc:
            raise convert_error(DWCP_E_AUTH, context="open frame")
        dwcp_seal_accept(&self._st, ctr)
        return bytes(out[:m])


def features():
    """What this build and host can do."""
    cdef dwcp_debug_counts dc
    return {
        "crc32c_hw": bool(dwcp_crc32c_hw()),
        "xxh3": True,
        "zerocopy": bool(dwcp_zerocopy_supported()),
        "debug_counters": dwcp_debug_counters(&dc) == 0,
    }


def usable_cpus():
    """CPUs this process may run on (its affinity mask): the default I/O thread count."""
    return dwcp_usable_cpus()


def debug_counters():
    """Engine resource counters (builds with DWCP_DEBUG=1): live stream sets, un-reaped zero-copy
    sends, carried frame copies and running I/O threads. Tests assert they return to their start
    values."""
    cdef dwcp_debug_counts dc
    if dwcp_debug_counters(&dc) != 0:
        raise CapabilityError("debug counters need a debug build: DWCP_DEBUG=1 python3 setup.py "
                              "build_ext --inplace --force")
    return {"live_stream_sets": dc.live_stream_sets, "zc_pending": dc.zc_pending,
            "carry_buffers": dc.carry_buffers, "io_threads": dc.io_threads}


cdef extern from "sys/mman.h" nogil:
    int madvise(void *addr, size_t length, int advice)
    enum:
        MADV_HUGEPAGE

cdef size_t _HUGE = 2 << 20


def alloc_bytearray(Py_ssize_t n):
    """A bytearray of n bytes whose contents are NOT initialised (the caller overwrites every byte
    before anyone reads it: a receive buffer). Large ones are advised onto transparent huge pages, so
    the first write faults them in 2 MiB at a time instead of 4 KiB (256 MiB: ~25 ms instead of ~170 ms
    for bytearray(n), which zero-fills page by page)."""
    cdef char *p
    cdef size_t start, end
    if n < 0:
        raise ConfigError(f"size must be >= 0, got {n}")
    out = PyByteArray_FromStringAndSize(NULL, n)
    if n >= 2 * _HUGE:
        p = PyByteArray_AS_STRING(out)
        start = (<size_t>p + _HUGE - 1) & ~(_HUGE - 1)
        end = (<size_t>p + <size_t>n) & ~(_HUGE - 1)
        if end > start:
            madvise(<void *>start, end - start, MADV_HUGEPAGE)  # advice only: failure is harmless
    return out


def set_bytearray_size(bytearray buf, Py_ssize_t n):
    """Resize buf to n bytes without initialising new bytes (they are overwritten by a receive). Within
    the allocation (``buf.__alloc__()``) and at least half of it, the memory is kept as it is."""
    if n < 0:
        raise ConfigError(f"size must be >= 0, got {n}")
    PyByteArray_Resize(buf, n)


STREAM_CONTROL = DWCP_STREAM_CONTROL
MT_MIN_BYTES = DWCP_MT_MIN_BYTES
MAX_IO_THREADS = DWCP_MAX_IO_THREADS

_STAT_FIELDS = ("bytes_payload", "bytes_wire", "chunks", "chunks_resent", "chunks_duplicate",
                "checksum_errors", "streams_failed", "zc_sends", "zc_completions", "zc_copied",
                "zc_fallback", "last_errno", "last_failed_stream", "truncated_at", "control_frames",
                "mt_transfers")


cdef int _timeout_ms(object timeout_s) except -2:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise ConfigError(f"timeout_s must be a number of seconds, got {type(timeout_s).__name__}")
    if not math.isfinite(timeout_s) or timeout_s <= 0 or timeout_s > 86400 * 24:
        raise ConfigError(f"timeout_s must be > 0 and finite (seconds without progress), got "
                          f"{timeout_s}")
    return max(1, <int>math.ceil(timeout_s * 1000))


cdef class StreamSet:
    """The links of one session, driven by the C engine: data streams and, optionally, the control
    connection (docs/protocol.md "Links": after the handshake any link may carry any frame).

    ``fds`` are connected TCP sockets (ints); stream i carries frames with stream index i.
    ``control`` is the control connection's fd (its frames carry STREAM_CONTROL), or None.
    ``io_threads``: threads a large transfer uses (0 = one per usable CPU, at most one per stream).
    ``busy_poll_us``: how long a call on a small transfer, or waiting for a control frame, may poll
    before it sleeps (see amst.h). ``sndbuf_bytes``: 0 caps the send buffers of short-RTT links
    (loopback, LAN), -1 leaves the kernel's autotuning, > 0 sets them.
    The engine makes the sockets non-blocking and sets TCP_NODELAY; the fds stay yours: close them
    after close(). One call at a time per set, in either direction (late frames of the other
    direction are dropped as stale); transfer ids must grow per direction. Every call releases the
    GIL for its whole duration."""

    cdef dwcp_streams *_s
    cdef int _n
    cdef bint _has_control
    cdef bint _busy
    cdef bint _close_pending
    cdef object _last_send_id
    cdef object _last_recv_id
    cdef bytearray _ctl_buf

    def __cinit__(self, fds, *, control=None, io_threads=0, busy_poll_us=0, sndbuf_bytes=0, cipher=None,
                  direction=0, tx_secret=None, rx_secret=None, rekey_bytes=0):
        cdef int *arr = NULL
        cdef int i
        cdef dwcp_set_opts opts
        cdef bytes txs, rxs
        memset(&opts, 0, sizeof(opts))
        self._s = NULL
        self._last_send_id = None
        self._last_recv_id = None
        fds = list(fds)
        n = len(fds)
        if n < 1 or n > DWCP_MAX_STREAMS:
            raise ConfigError(f"a StreamSet needs 1..{DWCP_MAX_STREAMS} sockets, got {n}")
        for fd in fds + ([] if control is None else [control]):
            if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
                raise ConfigError(f"fds must be non-negative ints (use sock.fileno()), got {fd!r}")
        if len(set(fds + ([] if control is None else [control]))) != n + (control is not None):
            raise ConfigError("fds (and control) contain the same socket twice; pass each connection once")
        if isinstance(io_threads, bool) or not isinstance(io_threads, int) or \
                not 0 <= io_threads <= DWCP_MAX_IO_THREADS:
            raise ConfigError(f"io_threads must be an int 0..{DWCP_MAX_IO_THREADS} (0: one per usable "
                              f"CPU), got {io_threads!r}")
        if isinstance(busy_poll_us, bool) or not isinstance(busy_poll_us, int) or \
                not 0 <= busy_poll_us <= 1000000:
            raise ConfigError(f"busy_poll_us must be an int 0..1000000 (0: never poll), got {busy_poll_us!r}")
        opts.control_fd = -1 if control is None else control
        opts.io_threads = io_threads
        opts.busy_poll_us = busy_poll_us
        if isinstance(sndbuf_bytes, bool) or not isinstance(sndbuf_bytes, int) or \
                not -1 <= sndbuf_bytes <= (1 << 30):
            raise ConfigError(f"sndbuf_bytes must be -1 (kernel autotuning), 0 (auto) or a size up to 1 GiB, "
                              f"got {sndbuf_bytes!r}")
        opts.sndbuf_bytes = sndbuf_bytes
        if cipher is not None:
            if cipher not in CIPHERS:
                raise ConfigError(f"cipher must be one of {sorted(CIPHERS)} or None, got {cipher!r}")
            for name, sec in (("tx_secret", tx_secret), ("rx_secret", rx_secret)):
                if not isinstance(sec, bytes) or len(sec) != DWCP_SECRET_BYTES:
                    raise ConfigError(f"{name} must be {DWCP_SECRET_BYTES} bytes for a sealed set")
            if direction not in (0, 1):
                raise ConfigError(f"direction must be 0 (client) or 1 (server), got {direction!r}")
            if isinstance(rekey_bytes, bool) or not isinstance(rekey_bytes, int) or rekey_bytes < 0:
                raise ConfigError(f"rekey_bytes must be an int >= 0 (0: the default), got {rekey_bytes!r}")
            txs, rxs = tx_secret, rx_secret
            opts.cipher = CIPHERS[cipher]
            opts.dir = direction
            opts.tx_secret = <const uint8_t *>txs
            opts.rx_secret = <const uint8_t *>rxs
            opts.rekey_bytes = rekey_bytes
        arr = <int *>malloc(n * sizeof(int))
        if arr == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                arr[i] = fds[i]
            self._s = dwcp_streams_new(arr, n, &opts)
        finally:
            free(arr)
        if self._s == NULL:
            raise ConfigError("could not create the stream set: every fd must be an open, connected "
                              "socket (epoll refused one) — or memory or threads ran out")
        self._n = n
        self._has_control = control is not None
        self._ctl_buf = bytearray(DWCP_MAX_CONTROL_BYTES)

    def __dealloc__(self):
        if self._s != NULL:
            dwcp_streams_free(self._s)
            self._s = NULL

    cdef int _enter(self, str what) except -1:
        if self._s == NULL or self._close_pending:
            raise convert_error(DWCP_E_CLOSED, context=what)
        if self._busy:
            raise TransportError(f"{what}: this StreamSet is already running a call in another "
                                 "thread; use one StreamSet per concurrent transfer")
        self._busy = True
        return 0

    cdef void _leave(self):
        self._busy = False
        if self._close_pending and self._s != NULL:
            dwcp_streams_free(self._s)
            self._s = NULL

    cdef object _error(self, int rc, str what):
        cdef dwcp_stats st
        cdef uint8_t ftype = 0
        cdef uint32_t flen = 0
        dwcp_streams_stats(self._s, &st)
        stream = None
        if rc not in (DWCP_E_TIMEOUT, DWCP_E_CLOSED, DWCP_E_NOMEM, DWCP_E_INVAL, DWCP_E_PEER_ABORT,
                      DWCP_E_PEER_CLOSE) and st.streams_failed:
            stream = <int>st.last_failed_stream
        err = convert_error(rc, errno=<int>st.last_errno, stream=stream, context=what)
        if rc == DWCP_E_PEER_ABORT:
            buf = bytearray(DWCP_MAX_CONTROL_BYTES)
            if dwcp_streams_stop_frame(self._s, &ftype, <uint8_t *>(<char *>buf), len(buf), &flen) == 0:
                err.payload = bytes(buf[:flen])
        return err

    cdef int _fill_opts(self, dwcp_xfer_opts *o, object transfer_id, object chunk_bytes,
                        object csum_flags, object timeout_s) except -1:
        o.transfer_id = _uint(transfer_id, "transfer_id", _U64_MAX)
        o.chunk_bytes = <uint32_t>_uint(chunk_bytes, "chunk_bytes", DWCP_MAX_CHUNK_BYTES)
        if o.chunk_bytes == 0:
            raise ConfigError(f"chunk_bytes must be 1..{DWCP_MAX_CHUNK_BYTES} (e.g. 1 << 20), got 0")
        cf = _uint(csum_flags, "csum_flags", 0xFFFF)
        if cf not in (0, DWCP_FLAG_CSUM_CRC32C, DWCP_FLAG_CSUM_XXH3):
            raise ConfigError(f"csum_flags must be FLAG_CSUM_XXH3 ({DWCP_FLAG_CSUM_XXH3}), "
                              f"FLAG_CSUM_CRC32C ({DWCP_FLAG_CSUM_CRC32C}) or 0, got {cf}")
        o.csum_flags = <uint16_t>cf
        o.frame_flags = 0
        o.timeout_ms = _timeout_ms(timeout_s)
        o.zerocopy = DWCP_ZC_OFF
        o.zc_min_bytes = 0
        o.deadline_ns = 0
        o.begin = NULL
        o.begin_len = 0
        o.sink = 0
        return 0

    cdef int _check_length(self, dwcp_xfer_opts *o, object length, Py_ssize_t buf_len) except -1:
        o.length = _uint(length, "length", _U64_MAX)
        if o.length > <uint64_t>buf_len:
            if buf_len == 0 or buf_len % o.chunk_bytes:
                raise ConfigError(
                    f"length {o.length} exceeds the buffer ({buf_len} bytes): that is wrap mode, "
                    f"which needs a non-empty buffer whose size is a multiple of chunk_bytes "
                    f"({o.chunk_bytes})")
        if (o.length + o.chunk_bytes - 1) // o.chunk_bytes > (<uint64_t>1 << 36):
            raise ConfigError(f"length {o.length} is more than 2**36 chunks of {o.chunk_bytes} bytes; "
                              "use a larger chunk size")
        return 0

    def send(self, buffer, *, transfer_id, chunk_bytes, csum_flags, length=None, frame_flags=0,
             timeout_s=30.0, zerocopy=False, zc_min_bytes=0, deadline=None, begin=None):
        """Send buffer as transfer transfer_id; returns the logical length sent (smaller than length
        when deadline, a time.monotonic() value, cut it short). length > len(buffer) wraps around
        the buffer (benchmarks). ``begin``: the XFER_BEGIN payload announcing the transfer (bytes,
        at most 64 KiB), sent ahead of each link's first frame of it. Blocks until every chunk is
        acknowledged (or, with nothing to acknowledge, until the receiver's DONE)."""
        cdef dwcp_xfer_opts o
        cdef Py_buffer view
        cdef uint64_t out = 0
        cdef int rc
        cdef const unsigned char[::1] bview
        self._fill_opts(&o, transfer_id, chunk_bytes, csum_flags, timeout_s)
        ff = _uint(frame_flags, "frame_flags", 0xFFFF)
        if ff & ~DWCP_FLAG_COMPRESSED:
            raise ConfigError(f"frame_flags may only add FLAG_COMPRESSED ({DWCP_FLAG_COMPRESSED}); "
                              f"the checksum goes in csum_flags; got {ff}")
        o.frame_flags = <uint16_t>ff
        o.zerocopy = DWCP_ZC_ON if zerocopy else DWCP_ZC_OFF
        o.zc_min_bytes = <uint32_t>_uint(zc_min_bytes, "zc_min_bytes", 0xFFFFFFFF)
        if deadline is not None:
            if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or \
                    not math.isfinite(deadline):
                raise ConfigError(f"deadline must be a time.monotonic() value, got {deadline!r}")
            o.deadline_ns = max(1, <int64_t>(deadline * 1e9))
        if begin is not None:
            if not isinstance(begin, bytes) or len(begin) > DWCP_MAX_CONTROL_BYTES:
                raise ConfigError(f"begin must be bytes of at most {DWCP_MAX_CONTROL_BYTES} (an "
                                  f"XFER_BEGIN payload), got {type(begin).__name__}")
            bview = begin
            o.begin_len = <uint32_t>len(begin)
            if o.begin_len:
                o.begin = &bview[0]
            else:
                o.begin = <const uint8_t *>b""
        _get_buffer(buffer, &view, False, "buffer")
        try:
            self._check_length(&o, view.len if length is None else length, view.len)
            self._enter("send")
            try:
                if self._last_send_id is not None and o.transfer_id <= self._last_send_id:
                    raise ConfigError(
                        f"transfer_id {o.transfer_id} is not above the last one sent on this set "
                        f"({self._last_send_id}); ids must grow per direction or late ACKs of the "
                        f"earlier transfer could be taken for this one's")
                self._last_send_id = o.transfer_id
                with nogil:
                    rc = dwcp_send_transfer(self._s, view.buf, <uint64_t>view.len, &o, &out)
                if rc != 0:
                    raise self._error(rc, "send")
            finally:
                self._leave()
        finally:
            PyBuffer_Release(&view)
        return out

    def recv_into(self, buffer, *, transfer_id, length, chunk_bytes, csum_flags, timeout_s=30.0,
                  sink=False):
        """Receive transfer transfer_id of length bytes into buffer (writable, C-contiguous); returns
        the logical length received (smaller if the sender truncated at its deadline).
        ``sink=True`` (wrap mode only, for benchmarks): every chunk is received and verified, but each
        I/O thread writes into its own share of the buffer, as iperf gives each stream its own
        buffer; the buffer's contents are then not the transfer in order."""
        cdef dwcp_xfer_opts o
        cdef Py_buffer view
        cdef uint64_t out = 0
        cdef int rc
        self._fill_opts(&o, transfer_id, chunk_bytes, csum_flags, timeout_s)
        _get_buffer(buffer, &view, True, "buffer")
        try:
            self._check_length(&o, length, view.len)
            if sink:
                if o.length <= <uint64_t>view.len:
                    raise ConfigError("sink=True is for wrap-mode (benchmark) receives, whose length "
                                      "exceeds the buffer")
                o.sink = 1
            self._enter("recv")
            try:
                if self._last_recv_id is not None and o.transfer_id <= self._last_recv_id:
                    raise ConfigError(
                        f"transfer_id {o.transfer_id} is not above the last one received on this "
                        f"set ({self._last_recv_id}); ids must grow per direction or late chunks of "
                        f"the earlier transfer could be taken for this one's")
                self._last_recv_id = o.transfer_id
                with nogil:
                    rc = dwcp_recv_transfer(self._s, view.buf, <uint64_t>view.len, &o, &out)
                if rc != 0:
                    raise self._error(rc, "recv")
            finally:
                self._leave()
        finally:
            PyBuffer_Release(&view)
        return out

    def next_control(self, timeout_s=None):
        """The next control frame the peer sent on any link: (type, transfer_id, payload bytes).
        Waits up to timeout_s (None: no limit) and raises TransferTimeout if none came (the set
        stays usable); PeerClosedError once no link is left; SessionClosedError after interrupt()."""
        cdef int tmo = -1
        cdef int rc
        cdef uint8_t ftype = 0
        cdef uint64_t tid = 0
        cdef uint32_t flen = 0
        cdef unsigned char[::1] buf = self._ctl_buf
        if timeout_s is not None:
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or \
                    not math.isfinite(timeout_s) or timeout_s < 0:
                raise ConfigError(f"timeout_s must be None or a number of seconds >= 0, got {timeout_s!r}")
            tmo = min(<int>math.ceil(timeout_s * 1000), 86400 * 24 * 1000)
        self._enter("wait for a control frame")
        try:
            with nogil:
                rc = dwcp_next_control(self._s, tmo, &ftype, &tid, &buf[0], <uint32_t>buf.shape[0], &flen)
            if rc == DWCP_E_TIMEOUT:
                raise TransferTimeout(f"no control frame arrived within {timeout_s:g} s")
            if rc != 0:
                raise self._error(rc, "wait for a control frame")
        finally:
            self._leave()
        return (ftype, tid, bytes(self._ctl_buf[:flen]))

    def send_control(self, int ftype, transfer_id=0, payload=b"", timeout_s=1.0):
        """Send a control frame (ABORT or CLOSE) on every live link; returns on how many it went out
        whole within timeout_s (0: none). Works after interrupt(), so a closing session can still
        say why."""
        cdef int rc
        cdef uint64_t tid = _uint(transfer_id, "transfer_id", _U64_MAX)
        cdef int tmo = _timeout_ms(timeout_s)
        cdef const unsigned char[::1] pv
        cdef const uint8_t *pp = NULL
        cdef uint32_t plen
        if not isinstance(payload, bytes) or len(payload) > DWCP_MAX_CONTROL_BYTES:
            raise ConfigError(f"payload must be bytes of at most {DWCP_MAX_CONTROL_BYTES}")
        plen = <uint32_t>len(payload)
        if plen:
            pv = payload
            pp = &pv[0]
        self._enter("send a control frame")
        try:
            with nogil:
                rc = dwcp_send_control(self._s, <uint8_t>ftype, tid, pp, plen, tmo)
            if rc < 0:
                raise self._error(rc, "send a control frame")
        finally:
            self._leave()
        return rc

    def stats(self):
        """Cumulative counters, summed over the set's threads (safe to call from another thread
        during a transfer)."""
        cdef dwcp_stats st
        self._check_open()
        dwcp_streams_stats(self._s, &st)
        return {"bytes_payload": st.bytes_payload, "bytes_wire": st.bytes_wire, "chunks": st.chunks,
                "chunks_resent": st.chunks_resent, "chunks_duplicate": st.chunks_duplicate,
                "checksum_errors": st.checksum_errors, "streams_failed": st.streams_failed,
                "zc_sends": st.zc_sends, "zc_completions": st.zc_completions,
                "zc_copied": st.zc_copied, "zc_fallback": st.zc_fallback,
                "last_errno": st.last_errno, "last_failed_stream": st.last_failed_stream,
                "truncated_at": st.truncated_at, "control_frames": st.control_frames,
                "mt_transfers": st.mt_transfers, "auth_failures": st.auth_failures,
                "rekeys": st.rekeys}

    cdef int _check_open(self) except -1:
        if self._s == NULL:
            raise convert_error(DWCP_E_CLOSED, context="stream set")
        return 0

    cdef int _index(self, object i) except -1:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self._n:
            raise ConfigError(f"stream index must be an int in 0..{self._n - 1}, got {i!r}")
        return <int>i

    def alive(self):
        """Per data stream: still usable?"""
        self._check_open()
        return [bool(dwcp_streams_alive(self._s, i)) for i in range(self._n)]

    def alive_count(self):
        """Usable data streams."""
        self._check_open()
        return dwcp_streams_alive_count(self._s)

    def control_alive(self):
        """Is the control connection still usable? (False when the set has none.)"""
        self._check_open()
        return bool(self._has_control and dwcp_streams_alive(self._s, self._n))

    def kill(self, i):
        """Mark data stream i dead and shut its socket down (a running transfer re-queues its chunks)."""
        self._check_open()
        dwcp_streams_kill(self._s, self._index(i))

    def pause(self, i, paused=True):
        """Pause (or resume) data stream i as a sender: it starts no new chunk while another stream
        can carry them (thread-safe; a running transfer adapts at once)."""
        self._check_open()
        dwcp_streams_pause(self._s, self._index(i), 1 if paused else 0)

    def paused(self):
        """Per data stream: paused?"""
        self._check_open()
        return [bool(dwcp_streams_paused(self._s, i)) for i in range(self._n)]

    def kill_control(self):
        """Mark the control connection dead and shut it down (the other links carry on)."""
        self._check_open()
        if not self._has_control:
            raise ConfigError("this stream set has no control connection")
        dwcp_streams_kill(self._s, self._n)

    def interrupt(self):
        """Make the running (or the next) transfer or next_control() stop with SessionClosedError.
        Thread-safe."""
        if self._s != NULL:
            dwcp_streams_interrupt(self._s)

    def close(self):
        """Free the engine state and stop its threads (not the fds). A call running in another thread
        is interrupted and the state is freed when it returns."""
        if self._s == NULL:
            return
        if self._busy:
            self._close_pending = True
            dwcp_streams_interrupt(self._s)
            return
        dwcp_streams_free(self._s)
        self._s = NULL

    @property
    def count(self):
        """Data streams."""
        return self._n

    @property
    def sndbuf(self):
        """(SO_SNDBUF given to the links or 0 if left to the kernel, largest link RTT in us measured
        for that choice or 0)."""
        cdef uint32_t rtt = 0
        if self._s == NULL:
            return (0, 0)
        v = dwcp_streams_sndbuf(self._s, &rtt)
        return (v, rtt)

    @property
    def io_threads(self):
        """Threads a large transfer on this set uses (1: only the calling thread)."""
        return dwcp_streams_io_threads(self._s) if self._s != NULL else 0

    @property
    def closed(self):
        return self._s == NULL or self._close_pending

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        state = "closed" if self.closed else f"{self.alive_count()} alive"
        return f"<dwcp._core.StreamSet {self._n} streams, {state}>"


include "_hde.pxi"
