"""Session: one control connection plus N data streams, moving whole buffers and files.

A session carries one transfer at a time; either side may send, the other must be receiving. After the
handshake every connection is a *link* of the engine (docs/protocol.md "Links"): XFER_BEGIN travels
ahead of the data on each link that carries some, ABORT and CLOSE go out on every link, and the engine
watches all of them in its own event loop, so an ABORT or CLOSE from the peer stops a transfer at once
and no thread or timer sits between the caller and the wire. The session survives losing any
connection, the control one included, while one is left.

A failed transfer leaves the links in an unknown state (a frame may be half written), so any transfer
error closes the session; open a new one to retry.
"""

from __future__ import annotations

import logging
import mmap
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dwcp._buffers import byte_view
from dwcp.errors import (ConfigError, DWCPError, PeerClosedError, ProtocolError, SessionClosedError,
                         TransferAborted, TransferTimeout, TransportError)
from dwcp.telemetry.tcp_info import tcp_info
from dwcp.transport.engine import make_stream_set
from dwcp.transport.options import SessionOptions, is_loopback
from dwcp.transport import segments
from dwcp.transport.recvpool import RecvPool
from dwcp.transport.segments import FEATURE_SEGMENTS
from dwcp.wire import messages
from dwcp.wire.frames import Flag, FrameType
from dwcp.wire.handshake import SessionParams

log = logging.getLogger(__name__)

BENCH_RATE_BOUND_BPS = 400e9  # faster than any link a benchmark transfer here will see
BENCH_MAX_CHUNKS = 1 << 22
FAREWELL_TIMEOUT_S = 1.0      # how long ABORT/CLOSE may take to leave: the peer may be gone


def _abort_reason(payload: bytes) -> str:
    try:
        return messages.decode_abort(payload).reason
    except ProtocolError as e:
        return f"(unreadable reason: {e})"


class BufferTooSmall(ConfigError):
    """recv_into() was given a buffer smaller than the incoming transfer.

    Nothing was consumed: call recv() or recv_into() with at least ``needed_bytes`` to receive it."""

    def __init__(self, message: str, needed_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes


class Session:
    """A connected DWCP session. Use as a context manager; see connect() and listen()."""

    def __init__(self, control: Any, data: list[Any], params: SessionParams, options: SessionOptions, *,
                 role: str, peer: tuple[str, int]) -> None:
        self._control = control
        self._data = data
        self.params = params
        self.options = options
        self.role = role
        self.peer = peer
        self._engine, self.backend = make_stream_set(data, control=control, backend=options.backend,
                                                     tls=isinstance(control, ssl.SSLSocket),
                                                     io_threads=options.io_threads,
                                                     busy_poll_us=options.busy_poll_us,
                                                     sndbuf_bytes=options.sndbuf_bytes,
                                                     cipher=params.cipher,
                                                     direction=0 if role == "client" else 1,
                                                     traffic_secrets=params.traffic_secrets,
                                                     rekey_bytes=options.rekey_bytes)
        self._zerocopy, self.zerocopy_reason = self._choose_zerocopy()
        self._tid_counter = 0
        self._last_recv_tid = 0
        self._pending: messages.XferBegin | None = None  # announced, not yet received
        self._pool = RecvPool(options.recv_pool_bytes)
        self._lock = threading.Lock()  # one transfer at a time
        self._closed = False
        self._peer_closed = False
        self._counts = {"transfers_sent": 0, "transfers_received": 0, "bytes_sent": 0,
                        "bytes_received": 0}
        self._last_stats: dict[str, int] = {}
        # Helpers that live as long as the session (the control plane's stream tuner): stopped when
        # it closes, their stats() shown in ours. The transport only keeps them; it never decides.
        self._attached: dict[str, Any] = {}
        self.last_compression: dict[str, Any] | None = None   # what send(compress=...) did, and why

    # ---- context manager and lifecycle -------------------------------------------------------
    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<dwcp.Session {self.role} peer={self.peer[0]}:{self.peer[1]} "
                f"streams={self.params.streams} backend={self.backend} {state}>")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the session (idempotent). A transfer running in another thread fails with
        SessionClosedError."""
        self._stop_attached()
        if not self._closed:
            self._shut(FrameType.CLOSE, b"", wait_for_transfer=True)

    def attach(self, name: str, helper: Any) -> None:
        """Keep helper (an object with stop() and stats()) for the session's life: its stats() appear
        under stats()["attached"][name], and it is stopped when the session closes."""
        self._attached[name] = helper

    def attached(self, name: str) -> Any:
        return self._attached.get(name)

    def _stop_attached(self) -> None:
        for name, helper in list(self._attached.items()):
            try:
                helper.stop()
            except Exception:
                log.exception("stopping %s of a session failed", name)

    def _fail(self, exc: DWCPError, *, level: int = logging.WARNING) -> DWCPError:
        """Close after a failed transfer (links may be mid-frame) and return the error to raise.
        Called from inside the transfer that failed, so it must not wait for the transfer lock."""
        log.log(level, "session with %s:%s failed: %s", self.peer[0], self.peer[1], exc)
        self._stop_attached()
        if not self._closed:
            self._shut(FrameType.ABORT, messages.encode_abort(messages.Abort(str(exc))),
                       wait_for_transfer=False)
        return exc

    def _shut(self, ftype: int, payload: bytes, *, wait_for_transfer: bool) -> None:
        """Interrupt the engine, tell the peer on every live link (best effort: it may be gone),
        free everything."""
        self._closed = True
        self._engine.interrupt()
        if wait_for_transfer:
            with self._lock:  # a transfer in another thread notices the interrupt and returns
                self._farewell(ftype, payload)
        else:
            self._farewell(ftype, payload)
        self._pool.clear()
        for s in [self._control, *self._data]:
            try:
                s.close()
            except OSError:
                pass

    def _farewell(self, ftype: int, payload: bytes) -> None:
        if not self._peer_closed:
            try:
                self._engine.send_control(ftype, 0, payload, timeout_s=FAREWELL_TIMEOUT_S)
            except DWCPError:
                pass
        self._last_stats = self._engine.stats()
        self._engine.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError("the session is closed; open a new one with dwcp.connect()")

    # ---- policy --------------------------------------------------------------------------------
    def _choose_zerocopy(self) -> tuple[bool, str]:
        mode = self.options.zerocopy
        if self.backend != "c":
            return False, "the Python engine (TLS or DWCP_BACKEND=python) cannot track zero-copy completions"
        if mode == "off":
            return False, "disabled by option"
        from dwcp._core import features
        if not features().get("zerocopy"):
            return False, "the kernel refuses SO_ZEROCOPY"
        if mode == "on":
            return True, "enabled by option (falls back if the kernel copies)"
        if is_loopback(self.peer[0]):
            return False, "loopback peer: the kernel copies MSG_ZEROCOPY sends on lo, which is slower"
        return True, "auto: non-loopback peer (falls back if the kernel copies)"

    def _peek_tid(self) -> int:
        """The id the next transfer will get (a message's segments name their first one's).

        Ids grow across both directions (the next one is above every id this session has seen) and
        client ids are odd, server ids even, so the engines can treat any frame with a smaller id as
        a late leftover of an earlier transfer, whichever side sent it."""
        parity = 1 if self.role == "client" else 0
        tid = max(self._tid_counter, self._last_recv_tid) + 1
        return tid + 1 if tid % 2 != parity else tid

    def _next_tid(self) -> int:
        self._tid_counter = self._peek_tid()
        return self._tid_counter

    def _engine_error(self, exc: DWCPError) -> DWCPError:
        """The error a failed engine call ends the session with, in the session's words."""
        if isinstance(exc, TransferAborted):
            err: DWCPError = TransferAborted("peer aborted the transfer: " + _abort_reason(exc.payload),
                                             payload=exc.payload)
            err.__cause__ = exc
            self._peer_closed = True  # it closes right after ABORT
            return self._fail(err)
        if isinstance(exc, SessionClosedError):
            return exc
        return self._fail(exc)

    # ---- sending ----------------------------------------------------------------------------------
    def send(self, buffer: Any, *, compressed: bool = False, compress: int | str | None = None) -> int:
        """Send the whole buffer. Returns its length once every byte is acknowledged by the peer, so the
        buffer may be reused or freed at once.

        compressed=True marks the transfer as HDE output (dwcp.compression): every DATA frame carries the
        COMPRESSED flag, nothing below compresses it again, and the receiver sees
        ``peek().compressed`` so it knows to decode it.

        compress="auto" (or a zstd level) has the session compress the buffer on the way, as a run of
        segments whose level follows the measured ratio, link rate and CPU (compression/adaptive.py:
        off on links faster than compression, and for incompressible data); the receiver's recv()
        returns the original bytes. Needs a peer that lists the zstd-segments feature; otherwise, or
        for data already compressed (compressed=True), the buffer goes as it is.
        ``last_compression`` says what was done and why."""
        mv = byte_view(buffer, what="send() buffer")
        if compress not in (None, "off") and not compressed and len(mv):
            from dwcp.compression.level import parse_level
            lvl = parse_level(compress)
            if lvl is not None:
                if FEATURE_SEGMENTS in self.params.features:
                    return self._send_segments(mv, lvl)
                self.last_compression = {"level": None, "reason": "the peer does not receive compressed segments "
                                         f"(no {FEATURE_SEGMENTS} feature): sent as it is", "decisions": []}
        return self._send(mv, messages.XferKind.BUFFER, name="", length=len(mv), deadline=None,
                          frame_flags=int(Flag.COMPRESSED) if compressed else 0)

    def _send_segments(self, mv: memoryview, lvl: int | str) -> int:
        """The buffer as a run of SEGMENT transfers, each compressed (or stored) by the plan, the next
        one compressed while the previous is on the wire."""
        from concurrent.futures import ThreadPoolExecutor

        from dwcp import _core
        from dwcp.compression.adaptive import AdaptiveCompression, SegmentPlan, SegmentResult
        self._check_open()
        if not self._lock.acquire(blocking=False):
            raise TransportError("another transfer is running on this session; a session carries one "
                                 "transfer at a time (open more sessions for parallel transfers)")
        try:
            self._check_open()
            total = len(mv)
            cores = max(1, len(os.sched_getaffinity(0)))
            ctx = _core.HdeContext(1 << 20)
            loop = AdaptiveCompression(total, cores, rtt_s=self._engine.sndbuf[1] / 1e6)
            if isinstance(lvl, str):   # "auto": a fixed level needs no sample
                if is_loopback(self.peer[0]):
                    self.last_compression = {"level": None, "decisions": [], "reason": (
                        "off: a loopback peer is reached faster than any zstd level compresses")}
                    return self._send_locked(mv, messages.XferKind.BUFFER, name="", length=total, deadline=None)
                scratch = bytearray(_core.hde_buffer_bound(4 << 20))

                def sample(level: int, data: bytes) -> tuple[int, float]:
                    t = time.perf_counter()
                    n = ctx.encode_buffer(data, None, level, 1, scratch)
                    return n, time.perf_counter() - t
                loop.calibrate(mv, sample)
                if loop.off:
                    # Incompressible: one ordinary transfer, straight from the caller's buffer.
                    loop.first()
                    self.last_compression = {"level": None, "reason": loop.decisions[-1]["reason"],
                                             "decisions": loop.decisions}
                    return self._send_locked(mv, messages.XferKind.BUFFER, name="", length=total, deadline=None)

            def plan_at(offset: int) -> SegmentPlan:
                if isinstance(lvl, int):
                    return SegmentPlan(lvl, min(total - offset, 64 << 20), f"zstd level {lvl}, as requested")
                return loop.first() if offset == 0 else loop.next(offset)

            def build(plan: SegmentPlan, offset: int, message_id: int) -> tuple[bytearray, int, float]:
                raw = mv[offset:offset + plan.raw_bytes]
                last = offset + plan.raw_bytes == total
                t = time.perf_counter()
                if plan.level is None:
                    out = bytearray(segments.HEADER_BYTES + len(raw))
                    out[segments.HEADER_BYTES:] = raw
                    codec, level_used = segments.CODEC_STORED, 0
                else:
                    out = bytearray(segments.HEADER_BYTES + _core.hde_buffer_bound(len(raw)))
                    n = ctx.encode_buffer(raw, None, plan.level, cores, memoryview(out)[segments.HEADER_BYTES:])
                    del out[segments.HEADER_BYTES + n:]
                    codec, level_used = segments.CODEC_HDE_BUFFER, plan.level
                seconds = time.perf_counter() - t
                out[:segments.HEADER_BYTES] = segments.SegmentHeader(
                    codec, last, level_used, message_id, total, offset, len(raw)).pack()
                return out, len(raw), seconds

            message_id = self._peek_tid()
            offset = 0
            plan = plan_at(0)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dwcp-compress") as pool:
                pending = pool.submit(build, plan, 0, message_id)
                wire_total = 0
                while True:
                    body, raw_len, encode_s = pending.result()
                    this_plan = plan
                    nxt = offset + raw_len
                    if nxt < total:
                        # Decide the next segment now and compress it while this one is on the wire
                        # (the decision sees the segments measured so far: it lags by one).
                        plan = plan_at(nxt)
                        pending = pool.submit(build, plan, nxt, message_id)
                    t = time.perf_counter()
                    self._send_locked(memoryview(body), messages.XferKind.SEGMENT, name="", length=len(body),
                                      deadline=None, message_bytes=total)
                    send_s = time.perf_counter() - t
                    wire_total += len(body)
                    if not isinstance(lvl, int):
                        loop.observe(SegmentResult(this_plan.level, raw_len, len(body), encode_s, send_s))
                    offset = nxt
                    if offset >= total:
                        break
            self.last_compression = {
                "level": lvl if isinstance(lvl, int) else (loop.decisions[-1]["level"] if loop.decisions else None),
                "ratio": total / max(wire_total, 1), "wire_bytes": wire_total,
                "reason": loop.decisions[-1]["reason"] if loop.decisions else f"zstd level {lvl}, as requested",
                "decisions": loop.decisions, "link_bps": loop.link_bps}
            return total
        finally:
            self._lock.release()

    def send_file(self, path: str | os.PathLike[str]) -> int:
        """Send a regular file (memory-mapped, so it is never copied in user space)."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not os.path.isfile(path):
                raise ConfigError(f"send_file needs a regular file, {os.fspath(path)!r} is not one")
            name = os.path.basename(os.fspath(path))
            if st.st_size == 0:
                return self._send(memoryview(b""), messages.XferKind.FILE, name=name, length=0,
                                  deadline=None, mode=st.st_mode & 0o7777)
            with mmap.mmap(f.fileno(), st.st_size, prot=mmap.PROT_READ) as m:
                m.madvise(mmap.MADV_SEQUENTIAL)
                mv = memoryview(m)
                try:
                    return self._send(mv, messages.XferKind.FILE, name=name, length=st.st_size,
                                      deadline=None, mode=st.st_mode & 0o7777)
                finally:
                    mv.release()

    def _send(self, mv: memoryview, kind: messages.XferKind, *, name: str, length: int,
              deadline: float | None, mode: int | None = None, frame_flags: int = 0) -> int:
        self._check_open()
        if not self._lock.acquire(blocking=False):
            raise TransportError("another transfer is running on this session; a session carries one "
                                 "transfer at a time (open more sessions for parallel transfers)")
        try:
            return self._send_locked(mv, kind, name=name, length=length, deadline=deadline, mode=mode,
                                     frame_flags=frame_flags)
        finally:
            self._lock.release()

    def _send_locked(self, mv: memoryview, kind: messages.XferKind, *, name: str, length: int,
                     deadline: float | None, mode: int | None = None, frame_flags: int = 0,
                     message_bytes: int = 0) -> int:
        """One transfer; the caller holds the transfer lock."""
        self._check_open()
        tid = self._next_tid()
        wrap = message_bytes if kind == messages.XferKind.SEGMENT else (len(mv) if length > len(mv) else 0)
        begin = messages.encode_xfer_begin(messages.XferBegin(
            transfer_id=tid, length=length, chunk_bytes=self.params.chunk_bytes, kind=kind,
            wrap_bytes=wrap, frame_flags=frame_flags, name=name, mode=mode))
        try:
            sent = self._engine.send(mv, transfer_id=tid, chunk_bytes=self.params.chunk_bytes,
                                     csum_flags=self.params.csum_flags, length=length,
                                     frame_flags=frame_flags, timeout_s=self.options.timeout_s,
                                     zerocopy=self._zerocopy, zc_min_bytes=self.options.zc_min_bytes,
                                     deadline=deadline, begin=begin)
        except DWCPError as e:
            raise self._engine_error(e) from e
        self._counts["transfers_sent"] += 1
        self._counts["bytes_sent"] += sent
        return sent

    # ---- receiving --------------------------------------------------------------------------------
    def _await_begin(self, timeout_s: float | None) -> messages.XferBegin:
        """The next XFER_BEGIN (kept as pending, so a too-small buffer loses nothing)."""
        if self._pending is not None:
            return self._pending
        try:
            ftype, tid, payload = self._engine.next_control(timeout_s)
        except TransferTimeout:
            # Nothing arrived: no byte of a frame was consumed, the session stays intact.
            raise TransferTimeout(f"no transfer arrived within {timeout_s:g} s") from None
        except SessionClosedError:
            raise
        except DWCPError as e:
            if isinstance(e, PeerClosedError):
                e = PeerClosedError(f"the peer is gone: {e}", errno=e.errno)
            raise self._fail(e) from e
        if ftype == FrameType.XFER_BEGIN:
            try:
                b = messages.decode_xfer_begin(payload)
            except ProtocolError as e:
                raise self._fail(e) from e
            if b.transfer_id != tid:
                raise self._fail(ProtocolError(f"XFER_BEGIN header names transfer {tid} but its payload "
                                               f"{b.transfer_id}"))
            self._pending = b
            return b
        if ftype == FrameType.CLOSE:
            # The orderly end of a session, not a failure worth a warning.
            self._peer_closed = True
            raise self._fail(PeerClosedError("the peer closed the session"), level=logging.INFO)
        if ftype == FrameType.ABORT:
            self._peer_closed = True
            raise self._fail(TransferAborted("peer aborted: " + _abort_reason(payload), payload=payload))
        raise self._fail(ProtocolError(f"unexpected control frame type {ftype} while waiting for a "
                                       "transfer"))

    def _validate_begin(self, b: messages.XferBegin) -> None:
        if b.transfer_id % 2 == (1 if self.role == "client" else 0):
            raise self._fail(ProtocolError(f"transfer id {b.transfer_id} has this side's parity; the peer "
                                           "announced an id it may not use"))
        newest = max(self._last_recv_tid, self._tid_counter)
        if b.transfer_id <= newest:
            raise self._fail(ProtocolError(f"transfer id {b.transfer_id} is not newer than the last one "
                                           f"({newest}): replayed or reordered announcement"))
        if b.chunk_bytes != self.params.chunk_bytes:
            raise self._fail(ProtocolError(f"transfer announces chunk size {b.chunk_bytes}, the session "
                                           f"negotiated {self.params.chunk_bytes}"))
        if b.wrap_bytes and b.kind not in (messages.XferKind.BENCH, messages.XferKind.SEGMENT):
            raise self._fail(ProtocolError("only benchmark transfers may wrap around their buffer"))
        if b.kind == messages.XferKind.SEGMENT and FEATURE_SEGMENTS not in self.params.features:
            raise self._fail(ProtocolError(f"the peer sent a compressed segment without the {FEATURE_SEGMENTS} "
                                           "feature having been agreed"))

    def _recv_message(self, b: messages.XferBegin, view: memoryview) -> int:
        """Receive what b announced into view: one transfer, or a compressed message's segments."""
        if b.kind == messages.XferKind.SEGMENT:
            return self._recv_segments(b, view)
        return self._recv_transfer(b, view)

    def _recv_segments(self, first: messages.XferBegin, target: memoryview) -> int:
        """Every segment of the message first starts, decoded into target[:message length]. Each
        header is checked against the message and the one before it before its body is decoded."""
        from dwcp import _core
        total = first.message_length
        limit = segments.HEADER_BYTES + _core.hde_buffer_bound(segments.MAX_SEGMENT_BYTES)
        ctx = _core.HdeContext(1 << 20)
        scratch = bytearray()
        asm: segments.Assembler | None = None
        b = first
        while True:
            if b.length > limit or b.length < segments.HEADER_BYTES:
                raise self._fail(ProtocolError(f"segment transfer of {b.length} bytes: outside "
                                               f"{segments.HEADER_BYTES}..{limit}"))
            if len(scratch) < b.length:
                scratch = bytearray(b.length)
            body = memoryview(scratch)[:b.length]
            try:
                self._recv_transfer(b, body)
                try:
                    h = segments.parse_header(body)
                    if asm is None:
                        asm = segments.Assembler(h, total, first.transfer_id)
                    asm.accept(h)
                    dst = target[h.offset:h.offset + h.raw_len]
                    payload = body[segments.HEADER_BYTES:]
                    if h.codec == segments.CODEC_STORED:
                        dst[:] = payload
                    else:
                        ctx.decode_buffer(payload, None, dst)
                except ProtocolError as e:
                    raise self._fail(ProtocolError(f"compressed message from the peer: {e}")) from e
                except DWCPError as e:  # the HDE decoder's verdict on a corrupt body
                    raise self._fail(ProtocolError(f"compressed message from the peer: segment at {h.offset} does "
                                                   f"not decode: {e}")) from e
            finally:
                body.release()
            if h.last:
                return total
            b = self._await_begin(self.options.timeout_s)
            self._validate_begin(b)
            if b.kind != messages.XferKind.SEGMENT or b.message_length != total:
                raise self._fail(ProtocolError("a compressed message was cut off by another transfer"))

    def _recv_transfer(self, b: messages.XferBegin, view: memoryview) -> int:
        self._pending = None
        self._last_recv_tid = b.transfer_id
        try:
            n = self._engine.recv_into(view, transfer_id=b.transfer_id, length=b.length,
                                       chunk_bytes=b.chunk_bytes, csum_flags=self.params.csum_flags,
                                       timeout_s=self.options.timeout_s,
                                       sink=b.kind == messages.XferKind.BENCH and b.length > len(view))
        except DWCPError as e:
            raise self._engine_error(e) from e
        self._counts["transfers_received"] += 1
        self._counts["bytes_received"] += n
        return n

    @contextmanager
    def _receiving(self) -> Iterator[None]:
        self._check_open()
        if not self._lock.acquire(blocking=False):
            raise TransportError("another transfer is running on this session; a session carries one "
                                 "transfer at a time")
        try:
            self._check_open()
            yield
        finally:
            self._lock.release()

    def peek(self, timeout_s: float | None = None) -> messages.XferBegin:
        """Describe the next incoming transfer (length, kind, name) without consuming it, so the caller
        can choose where to receive it."""
        with self._receiving():
            return self._await_begin(timeout_s)

    def recv(self, timeout_s: float | None = None) -> bytearray:
        """Receive the next transfer into a new bytearray. timeout_s bounds the wait for it to start
        (None: wait forever); once started, the session's timeout_s bounds progress.

        The bytearray comes from the session's pool: memory of an earlier result that nobody holds any
        more is reused (already faulted in, huge-page backed when large), so receiving many large
        transfers runs as fast as recv_into() a reused buffer."""
        with self._receiving():
            b = self._await_begin(timeout_s)
            self._validate_begin(b)
            size = b.message_length
            if size > self.options.max_recv_bytes:
                raise self._fail(ProtocolError(
                    f"peer announced {size} bytes, over max_recv_bytes={self.options.max_recv_bytes}; "
                    "raise max_recv_bytes or use recv_into()/recv_file()"))
            if b.wrap_bytes and b.kind == messages.XferKind.BENCH:
                raise self._fail(ProtocolError("a benchmark transfer needs recv_into() with a buffer"))
            out = self._pool.take(size)
            view = memoryview(out)
            try:
                n = self._recv_message(b, view)
            finally:
                view.release()
            if n < size:
                del out[n:]
            return out

    def recv_into(self, buffer: Any, timeout_s: float | None = None) -> int:
        """Receive the next transfer into buffer; returns its length. If the buffer is too small,
        raises BufferTooSmall and consumes nothing (call again with a large enough buffer)."""
        view = byte_view(buffer, writable=True, what="recv_into() buffer")
        try:
            with self._receiving():
                b = self._await_begin(timeout_s)
                self._validate_begin(b)
                bench_wrap = bool(b.wrap_bytes) and b.kind == messages.XferKind.BENCH
                if bench_wrap:
                    if len(view) == 0 or len(view) % b.chunk_bytes:
                        raise ConfigError(f"a benchmark transfer wraps around the buffer, whose size must "
                                          f"be a non-zero multiple of the chunk size {b.chunk_bytes}")
                elif b.message_length > len(view):
                    raise BufferTooSmall(f"incoming transfer is {b.message_length} bytes but the buffer holds "
                                         f"{len(view)}; nothing was consumed, call again with a bigger "
                                         "buffer", b.message_length)
                target = view[:b.message_length] if not bench_wrap else view
                try:
                    return self._recv_message(b, target)
                finally:
                    target.release()
        finally:
            view.release()

    def recv_file(self, path: str | os.PathLike[str], timeout_s: float | None = None) -> int:
        """Receive the next transfer into a file at path. The data lands in a temporary file beside it,
        which replaces path only once every byte is verified, so a failed transfer never leaves a
        truncated file behind (nor clobbers an existing one)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        with self._receiving():
            b = self._await_begin(timeout_s)
            self._validate_begin(b)
            if b.wrap_bytes and b.kind == messages.XferKind.BENCH:
                raise self._fail(ProtocolError("a benchmark transfer cannot be received into a file"))
            size = b.message_length
            fd, tmp = tempfile.mkstemp(prefix=".dwcp-", suffix=".partial", dir=directory)
            try:
                if size:
                    try:
                        # Reserve the blocks first: writing through a mapping of a file the disk
                        # cannot hold raises SIGBUS instead of an error.
                        os.posix_fallocate(fd, 0, size)
                    except OSError as e:
                        reason = f"receiver cannot store {size} bytes in {directory}: {e.strerror}"
                        # Refuse the transfer before any data is read; the sender gets the reason.
                        raise self._fail(TransportError(reason, errno=e.errno)) from e
                    with mmap.mmap(fd, size, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
                        mv = memoryview(m)
                        try:
                            n = self._recv_message(b, mv)
                        finally:
                            mv.release()
                        m.flush()
                else:
                    n = self._recv_transfer(b, memoryview(bytearray(0)))
                if b.mode is not None:
                    # Permission bits only: set-id bits from a peer are not ours to grant.
                    os.fchmod(fd, b.mode & 0o777)
                os.fsync(fd)
                os.close(fd)
                fd = -1
                os.replace(tmp, path)
                return n
            finally:
                if fd >= 0:
                    os.close(fd)
                if os.path.exists(tmp):
                    os.unlink(tmp)

    # ---- benchmarks -------------------------------------------------------------------------------
    def send_for(self, buffer: Any, seconds: float) -> int:
        """Memory-to-memory benchmark: send buffer over and over for about `seconds` as one transfer;
        returns the bytes moved. The buffer size must be a multiple of the chunk size."""
        mv = byte_view(buffer, what="send_for() buffer")
        if len(mv) == 0 or len(mv) % self.params.chunk_bytes:
            raise ConfigError(f"send_for needs a buffer whose size is a non-zero multiple of the chunk "
                              f"size ({self.params.chunk_bytes})")
        # Each transfer announces a length no link here finishes within the time (the deadline
        # truncates it), yet small enough that the receiver's per-chunk state stays a few MB; should
        # a transfer complete early, the next one continues until the deadline.
        deadline = time.monotonic() + seconds
        chunk = self.params.chunk_bytes
        length = min(int(seconds * BENCH_RATE_BOUND_BPS / 8), BENCH_MAX_CHUNKS * chunk)
        length = max(chunk, length // chunk * chunk)
        moved = 0
        while time.monotonic() < deadline:
            moved += self._send(mv, messages.XferKind.BENCH, name="", length=length, deadline=deadline)
        return moved

    # ---- introspection ----------------------------------------------------------------------------
    @property
    def io_threads(self) -> int:
        """Threads the engine drives a large transfer with (1 for the Python engine)."""
        return int(getattr(self._engine, "io_threads", 1))

    def live_stats(self) -> dict[str, int]:
        """Engine counters only (cheap; safe to call from another thread during a transfer)."""
        if self._closed:
            return dict(self._last_stats)
        try:
            return self._engine.stats()
        except DWCPError:
            return dict(self._last_stats)  # closed by another thread in the meantime

    # ---- stream count ------------------------------------------------------------------------------
    @property
    def active_streams(self) -> int:
        """Data streams that take new chunks when this side sends (the others stand by, paused)."""
        if self._closed:
            return 0
        alive, paused = self._engine.alive(), self._engine.paused()
        return sum(1 for a, p in zip(alive, paused) if a and not p)

    def set_active_streams(self, n: int) -> int:
        """Send new chunks on n of the session's data streams (1..streams) and pause the others, also
        while a transfer runs: a paused stream finishes the frame it is writing and starts no new one,
        so the change takes effect within a chunk. The receiver needs no notice (any stream may carry
        any chunk). Live streams are preferred; returns the number active. This is the knob the stream
        tuner turns (dwcp.control.tuner)."""
        self._check_open()
        total = self.params.streams
        if not 1 <= n <= total:
            raise ConfigError(f"active streams must be 1..{total} (the streams this session opened), got {n}")
        alive = self._engine.alive()
        order = [i for i in range(total) if alive[i]] + [i for i in range(total) if not alive[i]]
        active = set(order[:n])
        # Resume before pausing, so some stream can always take chunks.
        for i in sorted(active):
            self._engine.pause(i, False)
        for i in range(total):
            if i not in active:
                self._engine.pause(i, True)
        return self.active_streams

    def data_sockets(self) -> list[Any]:
        """The data streams' sockets (a copy of the list), for telemetry: e.g.
        ``LinkMonitor.register_session`` reads their cookies. Do not read from or write to them."""
        return list(self._data)

    def control_socket(self) -> Any:
        """The control connection's socket, for telemetry and tests. Do not read from or write to it."""
        return self._control

    def tcp_retransmits(self) -> int:
        total = 0
        for s in self._data:
            try:
                total += tcp_info(s).get("total_retrans")
            except OSError:
                pass
        return total

    def stats(self) -> dict[str, Any]:
        """Counters and negotiated parameters of the session."""
        engine = self.live_stats()
        alive = 0 if self._closed else self._engine.alive_count()
        control_alive = False if self._closed else self._engine.control_alive()
        return {
            **self._counts,
            "engine": engine,
            "backend": self.backend,
            "role": self.role,
            "peer": f"{self.peer[0]}:{self.peer[1]}",
            "streams": self.params.streams,
            "streams_alive": alive,
            "streams_active": 0 if self._closed else self.active_streams,
            "control_alive": control_alive,
            "io_threads": self.io_threads,
            "sndbuf_bytes": self._engine.sndbuf[0] if not self._closed else 0,
            "path_rtt_us": self._engine.sndbuf[1] if not self._closed else 0,
            "chunk_bytes": self.params.chunk_bytes,
            "checksum": self.params.checksum if self.params.cipher is None else None,
            # What protects frames on the wire: an AEAD cipher (sealed frames), "tls", or "none"
            # (plaintext with a checksum; an insecure or encrypt=False session).
            "cipher": self.params.cipher or ("tls" if isinstance(self._control, ssl.SSLSocket) else "none"),
            "version": self.params.version,
            "features": sorted(self.params.features),
            "tls": isinstance(self._control, ssl.SSLSocket),
            "insecure": self.params.insecure,
            "zerocopy": self._zerocopy and not engine.get("zc_fallback", 0),
            "zerocopy_reason": ("kernel copied MSG_ZEROCOPY sends; fell back to plain sends"
                                if engine.get("zc_fallback") else self.zerocopy_reason),
            "tcp_retransmits": 0 if self._closed else self.tcp_retransmits(),
            "recv_pool": self._pool.stats(),
            "attached": {name: h.stats() for name, h in self._attached.items()},
        }
