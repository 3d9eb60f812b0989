# cython: language_level=3
"""The compiled core: frame codec, checksums, the striped multi-stream transfer engine and the HDE
delta kernels (csrc/).

Bare primitives for the layers above (dwcp.wire, dwcp.transport): every call validates its arguments
and raises :mod:`dwcp.errors` exceptions; transfers run without the GIL."""

from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from dwcp.includes.frame cimport *
from dwcp.includes.amst cimport *

import math

from dwcp.errors import (CapabilityError, ConfigError, DWCPError, ProtocolError, TransportError,
                         convert_error)

HEADER_BYTES = DWCP_HEADER_BYTES
MAX_CHUNK_BYTES = DWCP_MAX_CHUNK_BYTES
MAX_STREAMS = DWCP_MAX_STREAMS
FLAG_CSUM_CRC32C = DWCP_FLAG_CSUM_CRC32C
FLAG_CSUM_XXH3 = DWCP_FLAG_CSUM_XXH3
FLAG_COMPRESSED = DWCP_FLAG_COMPRESSED

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


def features():
    """What this build and host can do."""
    cdef dwcp_debug_counts dc
    return {
        "crc32c_hw": bool(dwcp_crc32c_hw()),
        "xxh3": True,
        "zerocopy": bool(dwcp_zerocopy_supported()),
        "debug_counters": dwcp_debug_counters(&dc) == 0,
    }


def debug_counters():
    """Engine resource counters (builds with DWCP_DEBUG=1): live stream sets, un-reaped zero-copy
    sends and carried frame copies. Tests assert they return to their start values."""
    cdef dwcp_debug_counts dc
    if dwcp_debug_counters(&dc) != 0:
        raise CapabilityError("debug counters need a debug build: DWCP_DEBUG=1 python3 setup.py "
                              "build_ext --inplace --force")
    return {"live_stream_sets": dc.live_stream_sets, "zc_pending": dc.zc_pending,
            "carry_buffers": dc.carry_buffers}


_STAT_FIELDS = ("bytes_payload", "bytes_wire", "chunks", "chunks_resent", "chunks_duplicate",
                "checksum_errors", "streams_failed", "zc_sends", "zc_completions", "zc_copied",
                "zc_fallback", "last_errno", "last_failed_stream", "truncated_at")


cdef int _timeout_ms(object timeout_s) except -1:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise ConfigError(f"timeout_s must be a number of seconds, got {type(timeout_s).__name__}")
    if not math.isfinite(timeout_s) or timeout_s <= 0 or timeout_s > 86400 * 24:
        raise ConfigError(f"timeout_s must be > 0 and finite (seconds without progress), got "
                          f"{timeout_s}")
    return max(1, <int>math.ceil(timeout_s * 1000))


cdef class StreamSet:
    """The data streams of one session, driven by the C engine.

    ``fds`` are connected TCP sockets (ints); stream i carries frames with stream index i. The engine
    makes them non-blocking and sets TCP_NODELAY; the fds stay yours: close them after close().
    One transfer at a time per set, in either direction (late frames of the other direction are
    dropped as stale); transfer ids must grow per direction. send/recv release the GIL for the whole
    transfer."""

    cdef dwcp_streams *_s
    cdef int _n
    cdef bint _busy
    cdef bint _close_pending
    cdef object _last_send_id
    cdef object _last_recv_id

    def __cinit__(self, fds):
        cdef int *arr = NULL
        cdef int i
        self._s = NULL
        self._last_send_id = None
        self._last_recv_id = None
        fds = list(fds)
        n = len(fds)
        if n < 1 or n > DWCP_MAX_STREAMS:
            raise ConfigError(f"a StreamSet needs 1..{DWCP_MAX_STREAMS} sockets, got {n}")
        for fd in fds:
            if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
                raise ConfigError(f"fds must be non-negative ints (use sock.fileno()), got {fd!r}")
        if len(set(fds)) != n:
            raise ConfigError("fds contains the same socket twice; pass each connection once")
        arr = <int *>malloc(n * sizeof(int))
        if arr == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                arr[i] = fds[i]
            self._s = dwcp_streams_new(arr, n)
        finally:
            free(arr)
        if self._s == NULL:
            raise ConfigError("could not create the stream set: every fd must be an open, connected "
                              "socket (epoll refused one) — or memory ran out")
        self._n = n

    def __dealloc__(self):
        if self._s != NULL:
            dwcp_streams_free(self._s)
            self._s = NULL

    cdef int _enter(self, str what) except -1:
        if self._s == NULL or self._close_pending:
            raise convert_error(DWCP_E_CLOSED, context=what)
        if self._busy:
            raise TransportError(f"{what}: this StreamSet is already running a transfer in another "
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
        dwcp_streams_stats(self._s, &st)
        stream = None
        if rc not in (DWCP_E_TIMEOUT, DWCP_E_CLOSED, DWCP_E_NOMEM, DWCP_E_INVAL) and st.streams_failed:
            stream = <int>st.last_failed_stream
        return convert_error(rc, errno=<int>st.last_errno, stream=stream, context=what)

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
        return 0

    cdef int _check_length(self, dwcp_xfer_opts *o, object length, Py_ssize_t buf_len) except -1:
        o.length = _uint(length, "length", _U64_MAX)
        if o.length > <uint64_t>buf_len:
            if buf_len == 0 or buf_len % o.chunk_bytes:
                raise ConfigError(
                    f"length {o.length} exceeds the buffer ({buf_len} bytes): that is wrap mode, "
                    f"which needs a non-empty buffer whose size is a multiple of chunk_bytes "
                    f"({o.chunk_bytes})")
        return 0

    def send(self, buffer, *, transfer_id, chunk_bytes, csum_flags, length=None, frame_flags=0,
             timeout_s=30.0, zerocopy=False, zc_min_bytes=0, deadline=None):
        """Send buffer as transfer transfer_id; returns the logical length sent (smaller than length
        when deadline, a time.monotonic() value, cut it short). length > len(buffer) wraps around
        the buffer (benchmarks). Blocks until every chunk is acknowledged."""
        cdef dwcp_xfer_opts o
        cdef Py_buffer view
        cdef uint64_t out = 0
        cdef int rc
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

    def recv_into(self, buffer, *, transfer_id, length, chunk_bytes, csum_flags, timeout_s=30.0):
        """Receive transfer transfer_id of length bytes into buffer (writable, C-contiguous); returns
        the logical length received (smaller if the sender truncated at its deadline)."""
        cdef dwcp_xfer_opts o
        cdef Py_buffer view
        cdef uint64_t out = 0
        cdef int rc
        self._fill_opts(&o, transfer_id, chunk_bytes, csum_flags, timeout_s)
        _get_buffer(buffer, &view, True, "buffer")
        try:
            self._check_length(&o, length, view.len)
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

    def stats(self):
        """Cumulative counters (safe to call from another thread during a transfer)."""
        cdef dwcp_stats st
        self._check_open()
        dwcp_streams_stats(self._s, &st)
        return {"bytes_payload": st.bytes_payload, "bytes_wire": st.bytes_wire, "chunks": st.chunks,
                "chunks_resent": st.chunks_resent, "chunks_duplicate": st.chunks_duplicate,
                "checksum_errors": st.checksum_errors, "streams_failed": st.streams_failed,
                "zc_sends": st.zc_sends, "zc_completions": st.zc_completions,
                "zc_copied": st.zc_copied, "zc_fallback": st.zc_fallback,
                "last_errno": st.last_errno, "last_failed_stream": st.last_failed_stream,
                "truncated_at": st.truncated_at}

    cdef int _check_open(self) except -1:
        if self._s == NULL:
            raise convert_error(DWCP_E_CLOSED, context="stream set")
        return 0

    cdef int _index(self, object i) except -1:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self._n:
            raise ConfigError(f"stream index must be an int in 0..{self._n - 1}, got {i!r}")
        return <int>i

    def alive(self):
        """Per stream: still usable?"""
        self._check_open()
        return [bool(dwcp_streams_alive(self._s, i)) for i in range(self._n)]

    def alive_count(self):
        self._check_open()
        return dwcp_streams_alive_count(self._s)

    def kill(self, i):
        """Mark stream i dead and shut its socket down (a running transfer re-queues its chunks)."""
        self._check_open()
        dwcp_streams_kill(self._s, self._index(i))

    def interrupt(self):
        """Make the running (or the next) transfer stop with SessionClosedError. Thread-safe."""
        if self._s != NULL:
            dwcp_streams_interrupt(self._s)

    def close(self):
        """Free the engine state (not the fds). A transfer running in another thread is interrupted
        and the state is freed when it returns."""
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
        return self._n

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
