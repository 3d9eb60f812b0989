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
HDE_COPY = DWCP_HDE_COPY
HDE_PATCH_FROM = DWCP_HDE_PATCH_FROM
HDE_FLAG_REFS = DWCP_HDE_FLAG_REFS
HDE_FLAG_REFS_OUTSIDE = DWCP_HDE_FLAG_REFS_OUTSIDE
HDE_STORED = DWCP_HDE_STORED
HDE_ZSTD = DWCP_HDE_ZSTD
HDE_ZSTD_BASE = DWCP_HDE_ZSTD_BASE

_HDE_CORRUPT = {
    DWCP_HDE_E_HEADER: "batch header is not valid (magic, reserved field, codec or header CRC): the delta is "
                       "corrupt or not an HDE delta",
    DWCP_HDE_E_TRUNCATED: "the delta is truncated: a batch header promises more bytes than remain",
    DWCP_HDE_E_STORED: "batch payload fails its XXH3 checksum: the delta was corrupted in transit or on "
                       "disk; fetch it again",
    DWCP_HDE_E_BODY: "batch body is malformed (sizes, page classes, runs or page references out of range): the "
                     "delta is corrupt",
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
    return {"codec": h.codec, "level": h.level, "flags": h.flags, "first": h.first, "page_count": h.page_count,
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


_COUNT_FIELDS = ("unchanged", "zero", "patch", "raw", "copy", "patch_from", "copy_runs", "patch_runs",
                 "literal_bytes", "body_bytes", "stored_bytes")


cdef class HdeBase:
    """The base an encoder compares against: segments of seg_bytes (a whole number of pages), any of
    which may be None (absent: its pages are never referred to). A contiguous base is [buffer] with
    seg_bytes >= its length. Holds the segments' buffers for as long as it lives."""
    cdef dwcp_hde_base b
    cdef list _bufs
    cdef const uint8_t **_ptrs
    cdef readonly uint64_t length
    cdef readonly size_t seg_bytes

    def __cinit__(self, segments, size_t seg_bytes, uint64_t length):
        cdef _OptBuffer ob
        cdef size_t i, n = len(segments)
        if seg_bytes == 0:
            raise ConfigError("segment size must be positive")
        if length and (length - 1) // seg_bytes >= n:
            raise ConfigError(f"{n} segments of {seg_bytes} bytes cannot hold a base of {length} bytes")
        self._bufs = []
        self._ptrs = <const uint8_t **>malloc((n if n else 1) * sizeof(uint8_t *))
        if self._ptrs == NULL:
            raise MemoryError("cannot allocate the base's segment table")
        for i in range(n):
            ob = _OptBuffer()
            ob.acquire(segments[i], False, "base segment")
            want = min(seg_bytes, length - i * seg_bytes) if i * seg_bytes < length else 0
            if ob.held and ob.size() < want:
                raise ConfigError(f"base segment {i} has {ob.size()} bytes, expected {want}")
            self._bufs.append(ob)
            self._ptrs[i] = ob.ptr()
        self.b.segs = self._ptrs
        self.b.nseg = n
        self.b.seg_bytes = seg_bytes
        self.b.length = length
        self.length = length
        self.seg_bytes = seg_bytes

    def __dealloc__(self):
        free(self._ptrs)
        self._ptrs = NULL


cdef class HdeIndex:
    """An index of an HdeBase's pages for the moved-page search. hash(first, n) on disjoint page ranges
    may run on many threads at once (the GIL is released); then finish() once; then it is read-only
    and any number of encoder threads may share it."""
    cdef dwcp_hde_index *ix
    cdef readonly HdeBase base
    cdef readonly uint32_t page_size

    def __cinit__(self, HdeBase base not None, uint32_t page_size):
        self.ix = dwcp_hde_index_new(&base.b, page_size)
        if self.ix == NULL:
            raise ConfigError(f"cannot index a base of {base.length} bytes in {page_size}-byte pages (page size "
                              f"a power of two in {DWCP_HDE_MIN_PAGE}..{DWCP_HDE_MAX_PAGE}, segments of whole pages)")
        self.base = base
        self.page_size = page_size

    def __dealloc__(self):
        if self.ix != NULL:
            dwcp_hde_index_free(self.ix)
            self.ix = NULL

    @property
    def pages(self):
        """Base pages the index covers (whole pages)."""
        return dwcp_hde_index_pages(self.ix)

    def hash(self, uint64_t first_page, uint64_t npages):
        cdef int r
        with nogil:
            r = dwcp_hde_index_hash(self.ix, first_page, npages)
        if r < 0:
            raise ConfigError(f"index pages {first_page}+{npages}: outside the base's {self.pages} pages, "
                              "or the index is already finished")

    def finish(self):
        cdef int r
        with nogil:
            r = dwcp_hde_index_finish(self.ix)
        if r == DWCP_HDE_E_NOMEM:
            raise MemoryError("out of memory building the HDE page index")
        if r < 0:
            raise ConfigError("the HDE page index is already finished")


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
                "raw": self.c.raw, "copy": self.c.copy, "patch_from": self.c.patch_from,
                "copy_runs": self.c.copy_runs, "patch_runs": self.c.patch_runs,
                "literal_bytes": self.c.literal_bytes,
                "body_bytes": self.c.body_bytes, "stored_bytes": self.c.stored_bytes}

    def reset_counts(self):
        memset(&self.c, 0, sizeof(self.c))

    def encode_batch(self, uint64_t first, new, HdeBase base, HdeIndex index, dirty, uint32_t page_size,
                     int level, out):
        """Encode the pages of `new` (one batch; page `first` of the image) against `base` (the whole
        version the peer holds, or None) into `out`; `index` (an HdeIndex of that base, finished, or
        None) lets pages be found where they moved. Returns the frame's length. `dirty`: None or one
        byte per page, 0 = unchanged for sure. `level`: zstd level or HDE_LEVEL_OFF."""
        cdef _OptBuffer n = _OptBuffer()
        cdef _OptBuffer d = _OptBuffer()
        cdef _OptBuffer o = _OptBuffer()
        cdef int64_t r
        cdef const dwcp_hde_base *bp = &base.b if base is not None else NULL
        cdef const dwcp_hde_index *ip = index.ix if index is not None else NULL
        if index is not None and index.base is not base:
            raise ConfigError("the index was built over a different base")
        n.acquire(new, False, "new")
        d.acquire(dirty, False, "dirty")
        o.acquire(out, True, "out")
        if n.size() == 0:
            raise ConfigError("a batch needs at least one byte")
        if d.held and d.size() != (n.size() + page_size - 1) // page_size:
            raise ConfigError(f"dirty map has {d.size()} entries for {(n.size() + page_size - 1) // page_size} pages")
        with nogil:
            r = dwcp_hde_encode_batch(self.ctx, first, n.ptr(), n.size(), bp, ip, d.ptr(),
                                      page_size, level, <uint8_t *>o.ptr(), o.size(), &self.c)
        if r < 0:
            raise _hde_error(<int>r, self.ctx, f"encode batch at page {first}")
        return r

    def decode_batch(self, frame, uint32_t page_size, base, dst, commit=None):
        """Rebuild a batch's pages into dst (its region of the new image) from `frame` (exactly one batch
        frame) and `base` (the WHOLE base, or None; dst may not overlap it). With `commit` (may be the
        batch's region of the base itself), dst is scratch and the changed pages are copied to commit only
        after they verify."""
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

    def decode_batch_to_fd(self, frame, uint32_t page_size, base, size_t image_bytes, int fd, uint64_t offset):
        """Rebuild a batch (image_bytes of the image) and write it to the file fd at offset, a chunk at a
        time, as it is rebuilt. The batch is verified before this returns, but a bad batch may already
        have written part of its bytes: write to a temporary file, keep it only if every batch succeeded."""
        cdef _OptBuffer f = _OptBuffer()
        cdef _OptBuffer b = _OptBuffer()
        cdef int r
        f.acquire(frame, False, "frame")
        b.acquire(base, False, "base")
        with nogil:
            r = dwcp_hde_decode_batch_fd(self.ctx, f.ptr(), f.size(), page_size, b.ptr(), b.size(), image_bytes,
                                         fd, offset, &self.c)
        if r == DWCP_HDE_E_IO:
            raise OSError(f"decode batch: {(<bytes>dwcp_hde_ctx_error(self.ctx)).decode('utf-8', 'replace')}")
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
