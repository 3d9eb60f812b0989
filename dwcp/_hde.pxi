# HDE kernels (csrc/hde.c), included into _core.pyx. Bare primitives over caller buffers, GIL released
# for the work; dwcp.compression builds the friendly encoder/decoder on top.

from dwcp.includes.hde cimport *

HDE_BATCH_HEADER_BYTES = DWCP_HDE_BATCH_HEADER_BYTES
HDE_MIN_PAGE = DWCP_HDE_MIN_PAGE
HDE_MAX_PAGE = DWCP_HDE_MAX_PAGE
HDE_MAX_BATCH_PAGES = DWCP_HDE_MAX_BATCH_PAGES
HDE_MAX_BATCH_BYTES = DWCP_HDE_MAX_BATCH_BYTES
HDE_LEVEL_OFF = DWCP_HDE_LEVEL_OFF
HDE_UNCHANGED = DWCP_HDE_UNCHANGED
HDE_ZERO = DWCP_HDE_ZERO
HDE_PATCH = DWCP_HDE_PATCH
HDE_RAW = DWCP_HDE_RAW
HDE_STORED = DWCP_HDE_STORED
HDE_ZSTD = DWCP_HDE_ZSTD
HDE_ZSTD_BASE = DWCP_HDE_ZSTD_BASE

_HDE_CORRUPT = {
    DWCP_HDE_E_HEADER: "batch header is not valid (magic, reserved field, codec or header CRC): the delta is "
                       "corrupt or not an HDE delta",
    DWCP_HDE_E_TRUNCATED: "the delta is truncated: a batch header promises more bytes than remain",
    DWCP_HDE_E_STORED: "batch payload fails its XXH3 checksum: the delta was corrupted in transit or on "
                       "disk; fetch it again",
    DWCP_HDE_E_BODY: "batch body is malformed (sizes, page classes or runs out of range): the delta is corrupt",
    DWCP_HDE_E_BASE: "the delta needs base bytes that were not provided: decode it against the base it was "
                     "made from (same length)",
    DWCP_HDE_E_RESULT: "rebuilt bytes fail their checksum: the base is not the version the delta was made "
                       "against, or the delta is corrupt",
}


cdef object _hde_error(int code, dwcp_hde_ctx *ctx, str what):
    detail = ""
    if ctx != NULL:
        detail = (<bytes>dwcp_hde_ctx_error(ctx)).decode("utf-8", "replace")
    if code in _HDE_CORRUPT:
        msg = f"{what}: {_HDE_CORRUPT[code]}"
        if detail and code == DWCP_HDE_E_BODY:
            msg += f" ({detail})"
        return ProtocolError(msg, code=code)
    if code == DWCP_HDE_E_ZSTD:
        return DWCPError(f"{what}: zstd failed: {detail}")
    if code == DWCP_HDE_E_SPACE:
        return ConfigError(f"{what}: output buffer too small; size it with hde_batch_bound()/hde_buffer_bound()")
    if code == DWCP_HDE_E_NOMEM:
        return MemoryError(f"{what}: out of memory")
    return ConfigError(f"{what}: invalid argument (page size a power of two in {DWCP_HDE_MIN_PAGE}.."
                       f"{DWCP_HDE_MAX_PAGE}, batch within the context's size, buffers that do not overlap)")


cdef class _OptBuffer:
    """A buffer-protocol view that may be absent (None)."""
    cdef Py_buffer view
    cdef bint held

    cdef int acquire(self, object obj, bint writable, str what) except -1:
        if obj is None:
            return 0
        _get_buffer(obj, &self.view, writable, what)
        self.held = True
        return 0

    cdef const uint8_t *ptr(self) noexcept nogil:
        return <const uint8_t *>self.view.buf if self.held else NULL

    cdef size_t size(self) noexcept nogil:
        return <size_t>self.view.len if self.held else 0

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.view)
            self.held = False


def hde_batch_bound(uint32_t npages, uint32_t page_size):
    """Largest possible encoded batch (header included) of npages pages."""
    return dwcp_hde_batch_bound(npages, page_size)


def hde_buffer_bound(size_t new_len):
    """Largest possible buffer-mode frame for an image of new_len bytes."""
    return dwcp_hde_buffer_bound(new_len)


def hde_parse_header(data):
    """Validate a batch frame header (first 64 bytes) and return its fields as a dict."""
    cdef _OptBuffer b = _OptBuffer()
    cdef dwcp_hde_header h
    b.acquire(data, False, "data")
    rc = dwcp_hde_parse_header(b.ptr(), b.size(), &h)
    if rc != 0:
        raise _hde_error(rc, NULL, "parse batch header")
    return {"codec": h.codec, "level": h.level, "first": h.first, "page_count": h.page_count,
            "body_len": h.body_len, "stored_len": h.stored_len, "stored_xxh3": h.stored_xxh3,
            "result_xxh3": h.result_xxh3}


def hde_is_zero(data):
    """True when every byte of data is zero."""
    cdef _OptBuffer b = _OptBuffer()
    b.acquire(data, False, "data")
    return bool(dwcp_hde_is_zero(b.ptr(), b.size()))


def hde_classify(page, base=None):
    """The class (HDE_UNCHANGED/ZERO/PATCH/RAW) the encoder gives page against base (same length)."""
    cdef _OptBuffer p = _OptBuffer()
    cdef _OptBuffer b = _OptBuffer()
    p.acquire(page, False, "page")
    b.acquire(base, False, "base")
    if b.held and b.size() != p.size():
        raise ConfigError(f"base page has {b.size()} bytes, page has {p.size()}: they must be the same size")
    return dwcp_hde_classify(p.ptr(), b.ptr(), p.size())


_COUNT_FIELDS = ("unchanged", "zero", "patch", "raw", "patch_runs", "literal_bytes", "body_bytes",
                 "stored_bytes")


cdef class HdeContext:
    """Per-thread HDE state: zstd contexts and scratch for batches of up to max_batch_bytes.
    Not thread-safe: give each thread its own. Page-class counts accumulate in counts()."""
    cdef dwcp_hde_ctx *ctx
    cdef readonly size_t max_batch_bytes
    cdef dwcp_hde_counts c

    def __cinit__(self, size_t max_batch_bytes):
        if max_batch_bytes == 0 or max_batch_bytes > DWCP_HDE_MAX_BATCH_BYTES:
            raise ConfigError(f"max_batch_bytes must be 1..{DWCP_HDE_MAX_BATCH_BYTES}, got {max_batch_bytes}")
        self.ctx = dwcp_hde_ctx_new(max_batch_bytes)
        if self.ctx == NULL:
            raise MemoryError(f"cannot allocate an HDE context for {max_batch_bytes}-byte batches")
        self.max_batch_bytes = max_batch_bytes

    def __dealloc__(self):
        if self.ctx != NULL:
            dwcp_hde_ctx_free(self.ctx)
            self.ctx = NULL

    def counts(self):
        return {"unchanged": self.c.unchanged, "zero": self.c.zero, "patch": self.c.patch,
                "raw": self.c.raw, "patch_runs": self.c.patch_runs, "literal_bytes": self.c.literal_bytes,
                "body_bytes": self.c.body_bytes, "stored_bytes": self.c.stored_bytes}

    def reset_counts(self):
        memset(&self.c, 0, sizeof(self.c))

    def encode_batch(self, uint64_t first, new, base, dirty, uint32_t page_size, int level, out):
        """Encode the pages of `new` (one batch; page `first` of the image) against `base` (same region
        of the peer's version, or None) into `out`; returns the frame's length. `dirty`: None or one
        byte per page, 0 = unchanged for sure. `level`: zstd level or HDE_LEVEL_OFF."""
        cdef _OptBuffer n = _OptBuffer()
        cdef _OptBuffer b = _OptBuffer()
        cdef _OptBuffer d = _OptBuffer()
        cdef _OptBuffer o = _OptBuffer()
        cdef int64_t r
        n.acquire(new, False, "new")
        b.acquire(base, False, "base")
        d.acquire(dirty, False, "dirty")
        o.acquire(out, True, "out")
        if n.size() == 0:
            raise ConfigError("a batch needs at least one byte")
        if d.held and d.size() != (n.size() + page_size - 1) // page_size:
            raise ConfigError(f"dirty map has {d.size()} entries for {(n.size() + page_size - 1) // page_size} pages")
        with nogil:
            r = dwcp_hde_encode_batch(self.ctx, first, n.ptr(), n.size(), b.ptr(), b.size(), d.ptr(),
                                      page_size, level, <uint8_t *>o.ptr(), o.size(), &self.c)
        if r < 0:
            raise _hde_error(<int>r, self.ctx, f"encode batch at page {first}")
        return r

    def decode_batch(self, frame, uint32_t page_size, base, dst, commit=None):
        """Rebuild a batch's pages into dst (its region of the new image) from `frame` (exactly one batch
        frame) and `base` (the same region of the base, or None). With `commit` (may be the base
        itself), dst is scratch and the changed pages are copied to commit only after they verify."""
        cdef _OptBuffer f = _OptBuffer()
        cdef _OptBuffer b = _OptBuffer()
        cdef _OptBuffer d = _OptBuffer()
        cdef _OptBuffer c = _OptBuffer()
        cdef int r
        f.acquire(frame, False, "frame")
        b.acquire(base, False, "base")
        d.acquire(dst, True, "dst")
        c.acquire(commit, True, "commit")
        if c.held and c.size() < d.size():
            raise ConfigError(f"commit buffer has {c.size()} bytes, the batch needs {d.size()}")
        with nogil:
            r = dwcp_hde_decode_batch(self.ctx, f.ptr(), f.size(), page_size, b.ptr(), b.size(),
                                      <uint8_t *>d.ptr(), d.size(), <uint8_t *>c.ptr(), &self.c)
        if r < 0:
            raise _hde_error(r, self.ctx, "decode batch")

    def encode_buffer(self, new, base, int level, int workers, out):
        """Buffer mode: `new` as one zstd frame with `base` (or None) as prefix; returns the frame length."""
        cdef _OptBuffer n = _OptBuffer()
        cdef _OptBuffer b = _OptBuffer()
        cdef _OptBuffer o = _OptBuffer()
        cdef int64_t r
        n.acquire(new, False, "new")
        b.acquire(base, False, "base")
        o.acquire(out, True, "out")
        with nogil:
            r = dwcp_hde_encode_buffer(self.ctx, n.ptr(), n.size(), b.ptr(), b.size(), level, workers,
                                       <uint8_t *>o.ptr(), o.size())
        if r < 0:
            raise _hde_error(<int>r, self.ctx, "encode buffer")
        return r

    def decode_buffer(self, frame, base, dst):
        cdef _OptBuffer f = _OptBuffer()
        cdef _OptBuffer b = _OptBuffer()
        cdef _OptBuffer d = _OptBuffer()
        cdef int r
        f.acquire(frame, False, "frame")
        b.acquire(base, False, "base")
        d.acquire(dst, True, "dst")
        with nogil:
            r = dwcp_hde_decode_buffer(self.ctx, f.ptr(), f.size(), b.ptr(), b.size(), <uint8_t *>d.ptr(),
                                       d.size())
        if r < 0:
            raise _hde_error(r, self.ctx, "decode buffer")
