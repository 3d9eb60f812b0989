"""The pure-Python AMST engine: the same striped transfers as the C engine (``dwcp._core.StreamSet``).

Used for TLS sessions (no kernel TLS here, so bytes must pass through Python ``ssl`` objects), when
``DWCP_BACKEND=python``, and by the tests that run one suite against both engines and check that they
interoperate. It follows docs/protocol.md ("Frame header", "Transfers") byte for byte.

Design
------
Each ``send()``/``recv_into()`` call runs one selector loop in the calling thread over every live
stream, like the C engine's poll loop. A stream that is writable pulls the next chunk (re-queued
chunks first), so fast streams carry more; every readable stream is read frame by frame.

Why one thread and not a reader and a writer thread per stream: an ``ssl.SSLSocket`` must not be read
and written from two threads at once (OpenSSL's ``SSL`` object is not thread-safe, and TLS 1.3 reads
can trigger writes), and a single loop keeps every piece of transfer state owned by one thread, so
there are no locks on the data path. The socket syscalls release the GIL, so a sender and a
receiver in one process (tests) overlap.

Per-stream state (a half-read header, the rest of a payload to discard, a frame of a *future* transfer
whose header was already read, a half-written frame) lives in ``_Stream`` and survives across calls,
as amst.h requires: when a transfer completes while a stream is in the middle of sending a duplicate
chunk, the rest of that frame is copied into a private buffer and finished at the start of the next
call, so the caller's buffer is never touched after a call returns; a receiver that is in the middle
of a duplicate's payload discards the rest in the next call.

Transfer ids must increase per direction (docs/protocol.md "Transfers"): frames with an earlier id
are stale duplicates and are discarded, which is only safe if ids are never reused.

Choices where docs/protocol.md leaves room, made as the C engine makes them (the interop tests check
that both engines write identical bytes):
- ACK/NACK/DONE/TRUNCATE carry flags 0 and checksum 0; DONE's offset is the transfer's length.
- A DATA header of a later transfer is kept (the stream pauses) until the call for that transfer.
- A receiver stream that dies while writing chunk k, after a duplicate of k was dropped on another
  stream, makes the receiver NACK k: the sender holds that duplicate as outstanding on a live
  stream and would otherwise never send k again.
- When no stream is left and a protocol violation was among the causes, the call raises that
  ProtocolError (code, stream); otherwise PeerClosedError.
Not in the C engine: late ACK/DONE of this set's own earlier sends, read while it receives (and late
DATA of its earlier receives, read while it sends), are dropped as stale, since Session uses one
stream set for both directions.

Zero-copy: ``zerocopy``/``zc_min_bytes`` are accepted for API compatibility and ignored
(``zc_sends`` stays 0). MSG_ZEROCOPY needs ``sendmsg(MSG_ZEROCOPY)`` plus reaping completions from the
socket error queue before the caller may reuse its buffer; an ``SSLSocket`` encrypts into its own
buffers (so there is nothing to pin), and on plain sockets Python exposes no error-queue completion
parsing that would let us know when the kernel released the pages.
"""

from __future__ import annotations

import abc
import errno as _errno
import logging
import math
import numbers
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dwcp import errors
from dwcp._buffers import byte_view
from dwcp.errors import (ConfigError, PeerClosedError, ProtocolError, SessionClosedError,
                         TransferAborted, TransferTimeout, TransportError)
from dwcp._core import FrameSeal
from dwcp.wire.frames import (TAG_BYTES, HEADER_BYTES, LINK_CONTROL_TYPES, MAX_CHUNK_BYTES, MAX_CONTROL_BYTES,
                              STREAM_CONTROL, Flag, FrameType, Header, decode_header, encode_header,
                              payload_checksum)

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Buffer, Self

__all__ = ["PyStreamSet", "MAX_STREAMS"]

log = logging.getLogger(__name__)

MAX_STREAMS = 256
_CSUM_MASK = int(Flag.CSUM_CRC32C | Flag.CSUM_XXH3)
_CSUM_CHOICES = (0, int(Flag.CSUM_CRC32C), int(Flag.CSUM_XXH3))
_NO_PAYLOAD_TYPES = frozenset({FrameType.ACK, FrameType.NACK, FrameType.DONE, FrameType.TRUNCATE})
_RX_TYPES = frozenset({FrameType.DATA, FrameType.TRUNCATE})   # legal for a receiver to read
_TX_TYPES = frozenset({FrameType.ACK, FrameType.NACK, FrameType.DONE})  # legal for a sender to read

# Bytes one stream may move per loop visit before the loop serves the others (fairness; a stream
# whose socket keeps accepting data would otherwise starve the rest of the set).
_VISIT_BUDGET = 8 << 20
# Largest plaintext handed to one SSL write: bounded so the retry-with-the-same-buffer rule of a
# non-blocking SSL_write (see _Stream.send_frames) concerns a small, fixed slice.
_SSL_PIECE = 256 << 10
# Duplicates and stale payloads are read here and dropped (its content is never looked at).
_SCRATCH_BYTES = 1 << 20
# Header-only frames (ACK/NACK/DONE/TRUNCATE) coalesced into one write.
_MAX_COALESCE = 64
# Upper bound of one selector wait, so a lost wakeup can never stall a loop for long.
_MAX_WAIT_S = 1.0

_STAT_KEYS = ("bytes_payload", "bytes_wire", "chunks", "chunks_resent", "chunks_duplicate",
              "checksum_errors", "streams_failed", "zc_sends", "zc_completions", "zc_copied",
              "zc_fallback", "last_errno", "last_failed_stream", "truncated_at", "control_frames",
              "mt_transfers", "auth_failures", "rekeys")
# Control frames a peer may have waiting for next_control(); more is a protocol error (as in C).
_INBOX_MAX = 16

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _StreamDied(Exception):
    """Internal: stream ``index`` can no longer be used (EOF, socket error or protocol violation)."""

    def __init__(self, reason: str, *, errno: int = 0, error: Exception | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = errno
        self.error = error


def _violation(message: str, code: int, stream: int) -> _StreamDied:
    err = ProtocolError(f"stream {stream}: {message}", code=code, stream=stream)
    return _StreamDied(str(err), error=err)


class _OutFrame:
    """One frame queued on a stream: a 48-byte header and, for DATA, a view of the payload.

    ``borrowed`` means the payload views the caller's buffer; such a frame must be finished from a
    private copy (or dropped, if nothing of it was written yet) before the call returns."""

    __slots__ = ("header", "payload", "hpos", "ppos", "type", "transfer_id", "chunk", "borrowed",
                 "attempted", "sealed")

    def __init__(self, header: bytes, *, type: int, transfer_id: int, chunk: int = -1,
                 payload: memoryview | None = None) -> None:
        self.header = header
        self.payload = payload
        self.hpos = 0
        self.ppos = 0
        self.type = type
        self.transfer_id = transfer_id
        self.chunk = chunk
        self.borrowed = payload is not None
        # An SSL write that raised WANT_WRITE may already have committed (encrypted, partly sent)
        # some of the frame, which must then be completed with the same bytes: such a frame counts
        # as started even though hpos is still 0.
        self.attempted = False
        # Sealed sessions: the frame has its counter (sealed right before its first write, so
        # counters follow wire order) and must go out, or the peer would see a gap.
        self.sealed = False

    @property
    def started(self) -> bool:
        return self.hpos > 0 or self.attempted or self.sealed

    @property
    def done(self) -> bool:
        return self.hpos == len(self.header) and (self.payload is None or self.ppos == len(self.payload))

    def advance(self, n: int) -> int:
        """Account n written bytes; returns how many of them were left over for the next frame."""
        h = min(n, len(self.header) - self.hpos)
        self.hpos += h
        n -= h
        if self.payload is not None and n:
            p = min(n, len(self.payload) - self.ppos)
            self.ppos += p
            n -= p
        return n

    def seal(self, seal: FrameSeal) -> None:
        """Give the frame its counter and encrypt it (docs/protocol.md "Sealed frames"): the header is
        rebuilt with flag SEALED (COMPRESSED kept, no checksum bit); a payload becomes ciphertext
        plus tag (private memory), a frame without payload carries its tag after the header."""
        h = decode_header(self.header[:HEADER_BYTES], MAX_CHUNK_BYTES)
        inline = self.header[HEADER_BYTES:]  # control frames keep their payload after the header
        body = bytes(self.payload) if self.payload is not None else inline
        plain = encode_header(Header(type=h.type, flags=(h.flags & int(Flag.COMPRESSED)) | int(Flag.SEALED),
                                     stream=h.stream, length=h.length, transfer_id=h.transfer_id,
                                     offset=h.offset, checksum=0))
        header, sealed = seal.seal(plain, body)
        if self.payload is not None:
            self.payload.release()
        if body:
            self.header, self.payload = header, memoryview(sealed)
        else:
            self.header, self.payload = header + sealed, None
        self.borrowed = False
        self.sealed = True

    def detach(self) -> None:
        """Replace the borrowed payload by a private copy of its unwritten part (see module doc)."""
        if self.payload is not None and self.borrowed:
            rest = bytes(self.payload[self.ppos:])
            self.payload.release()
            self.payload = memoryview(rest)
            self.ppos = 0
            self.borrowed = False


class _Stream:
    """One data connection and its frame-level state, which outlives a single transfer."""

    def __init__(self, index: int, sock: socket.socket, *, control: bool = False) -> None:
        self.index = index
        self.is_control = control
        self.wire = STREAM_CONTROL if control else index   # the stream index its frames carry
        self.sock = sock
        self.paused = False    # as a sender: takes no new chunk while an unpaused stream is alive
        self.ssl_sock = sock if isinstance(sock, ssl.SSLSocket) else None
        self.alive = True
        self.kill_requested = False
        self.out: deque[_OutFrame] = deque()
        # Reader: a header being assembled, then (rx_header set) its payload.
        self.hbuf = bytearray(HEADER_BYTES)
        self.hview = memoryview(self.hbuf)
        self.hpos = 0
        self.rx_header: Header | None = None
        self.rx_remaining = 0
        self.rx_target: memoryview | None = None  # None: payload goes to scratch and is dropped
        self.rx_chunk = -1                        # chunk being written into the destination, or -1
        self.rx_ack_after_discard = False         # duplicate of a verified chunk: ACK it again
        self.rx_done_reply = False                # late chunk of the last transfer received: DONE again
        self.rx_ctl: bytearray | None = None      # payload of a control frame being read
        self.begun_tid = -1                       # XFER_BEGIN of this transfer queued on this link
        # A header of a later transfer read before its recv call: reading pauses until it can be
        # dispatched (the payload that follows must go to a destination we do not have yet).
        self.parked: Header | None = None
        self.outstanding: set[int] = set()        # sender: chunks pulled by this stream, not ACKed
        self.mask = 0                             # events currently registered with the selector
        # Sealed sessions (set by PyStreamSet): this link's sealing and opening state, and the tag of
        # the frame being read (rx_tag_for: its header, once the payload, if any, is in).
        self.tx_seal: FrameSeal | None = None
        self.rx_seal: FrameSeal | None = None
        self.tagbuf = bytearray(TAG_BYTES)
        self.tagpos = 0
        self.rx_tag_for: Header | None = None

    def rx_pending(self) -> bool:
        """Decrypted bytes wait inside the SSL object: the socket may never turn readable for them."""
        return self.ssl_sock is not None and self.parked is None and self.ssl_sock.pending() > 0

    def discard_rest(self) -> None:
        """Stop writing the current payload into the caller's buffer; drop the rest of it instead."""
        if self.rx_target is not None:
            self.rx_target.release()
            self.rx_target = None
        self.rx_chunk = -1
        self.rx_ack_after_discard = False
        self.rx_ctl = None

    def reset_reader(self) -> None:
        self.discard_rest()
        self.rx_done_reply = False
        self.hpos = 0
        self.rx_header = None
        self.rx_remaining = 0
        self.parked = None
        self.tagpos = 0
        self.rx_tag_for = None

    def send_frames(self) -> int:
        """Write as much of the queued frames as the socket takes now; returns bytes written.

        Raises a _WOULD_BLOCK exception when nothing could be written. Plain sockets write a DATA
        frame with one sendmsg of (header, payload view): no user-space copy. SSL sockets cannot
        sendmsg; their writes go through SSL_write, which after WANT_WRITE must be retried with the
        same bytes: we always retry with the same slice (positions only advance after a write
        returned), so the rule holds without bookkeeping, even after detach() moved the bytes."""
        head = self.out[0]
        if self.tx_seal is not None and not head.sealed:
            head.seal(self.tx_seal)
        if head.payload is None:
            frames: list[_OutFrame] = []
            for f in self.out:
                if self.tx_seal is not None and not f.sealed:
                    if f.payload is not None:  # a data frame stops the batch: seal it when it is head
                        break
                    f.seal(self.tx_seal)
                if f.payload is not None or len(frames) == _MAX_COALESCE:
                    break
                frames.append(f)
            parts = [memoryview(f.header)[f.hpos:] for f in frames]
            if self.ssl_sock is not None:
                n = self.sock.send(b"".join(parts))
            else:
                n = self.sock.sendmsg(parts)
            rest = n
            for f in frames:
                rest = f.advance(rest)
                if not f.done:
                    break
            return n
        payload = head.payload
        if self.ssl_sock is not None:
            head.attempted = True
            if head.hpos < len(head.header):
                n = self.sock.send(memoryview(head.header)[head.hpos:])
            else:
                n = self.sock.send(payload[head.ppos:head.ppos + _SSL_PIECE])
        elif head.hpos < len(head.header):
            n = self.sock.sendmsg([memoryview(head.header)[head.hpos:], payload[head.ppos:]])
        else:
            n = self.sock.send(payload[head.ppos:])
        head.advance(n)
        return n


class _Transfer(abc.ABC):
    """What one call wants from the loop. Subclasses implement the sender and receiver rules."""

    transfer_id: int
    csum_flags: int

    @abc.abstractmethod
    def on_header(self, st: _Stream, h: Header) -> None:
        """A validated header arrived on st: act on it, or set up st to read/discard its payload
        (st.rx_header) or park it (st.parked). Raises _StreamDied for a protocol violation."""

    def on_payload(self, st: _Stream) -> None:
        """The payload announced by st.rx_header is fully read (into the destination or scratch)."""

    def can_pull(self, st: _Stream) -> bool:
        return False

    def pull(self, st: _Stream) -> _OutFrame | None:
        return None

    def on_stream_dead(self, st: _Stream) -> None:
        """Release what the dead stream held (re-queue its chunks, free its chunk states)."""

    def tick(self, now: float) -> float | None:
        """Time-driven work (the sender's deadline); returns the next instant it needs, if any."""
        return None

    @abc.abstractmethod
    def complete(self) -> bool:
        """True once the call may return."""

    @abc.abstractmethod
    def progress(self) -> str:
        """Where the transfer stands, for error messages."""

    def data_complete(self) -> bool:
        """Every byte of the transfer is settled (the call may still be flushing courtesy frames)."""
        return self.complete()

    def header(self, st: _Stream, type: int, offset: int) -> _OutFrame:
        """A header-only frame of this transfer for stream st. Flags 0, as the C engine writes them:
        there is no payload to checksum, and the header has its own CRC."""
        return _small_frame(st, type, self.transfer_id, offset)

    #: A call that moves data (stops on the peer's ABORT/CLOSE), as opposed to waiting for control.
    moves_data = True


class _ChunkMap:
    """Which chunks are settled: a contiguous prefix plus a set of settled chunks above it.

    Chunks settle roughly in order, so this stays small even for a wrapping benchmark transfer of
    millions of chunks (a per-chunk array would not)."""

    def __init__(self) -> None:
        self.below = 0
        self.above: set[int] = set()

    def __contains__(self, k: int) -> bool:
        return k < self.below or k in self.above

    def add(self, k: int) -> bool:
        """Mark chunk k settled; False if it already was."""
        if k in self:
            return False
        self.above.add(k)
        while self.below in self.above:
            self.above.discard(self.below)
            self.below += 1
        return True

    def count(self) -> int:
        return self.below + len(self.above)


def _chunk_count(length: int, chunk_bytes: int) -> int:
    return -(-length // chunk_bytes)


class _Layout:
    """Where logical byte offsets of a transfer live in the caller's buffer (with wrapping)."""

    def __init__(self, view: memoryview, length: int, chunk_bytes: int, *, sink: bool = False) -> None:
        self.view = view
        self.length = length
        self.chunk_bytes = chunk_bytes
        self.sink = sink

    def place(self, k: int, size: int, stream: int) -> memoryview:
        """Where chunk k received on stream lands: at its offset, or (sink) in the stream's own slot
        of the buffer, which only its loop visits write (dwcp_xfer_opts.sink in amst.h)."""
        if not self.sink:
            return self.chunk_view(k, size)
        slot = stream % (len(self.view) // self.chunk_bytes)
        return self.view[slot * self.chunk_bytes:slot * self.chunk_bytes + size]

    def chunk_size(self, k: int) -> int:
        return min(self.chunk_bytes, self.length - k * self.chunk_bytes)

    def chunk_view(self, k: int, size: int) -> memoryview:
        start = (k * self.chunk_bytes) % len(self.view) if len(self.view) else 0
        return self.view[start:start + size]


class _SendTransfer(_Transfer):
    """Sender rules of docs/protocol.md "Transfers"."""

    def __init__(self, owner: PyStreamSet, layout: _Layout, *, transfer_id: int, csum_flags: int,
                 frame_flags: int, deadline: float | None, begin: bytes | None = None) -> None:
        self.owner = owner
        self.begin = begin
        self.begin_acked = False                  # a frame of this transfer came back
        self.layout = layout
        self.transfer_id = transfer_id
        self.csum_flags = csum_flags
        self.frame_flags = frame_flags
        self.deadline = deadline
        self.length = layout.length               # logical length; shrinks on truncation
        self.total = _chunk_count(self.length, layout.chunk_bytes)
        self.next_fresh = 0                       # chunks [0, next_fresh) have been started
        self.requeue: deque[int] = deque()        # chunks to send again, front first
        self.queued: set[int] = set()
        self.carrier: dict[int, int] = {}         # chunk -> stream whose outstanding set holds it
        self.acked = _ChunkMap()
        self.acked_bytes = 0
        self.done_received = False
        self.stop_new = False                     # deadline passed: no new chunk may start

    # -- the announcement ------------------------------------------------------------------------
    def ensure_begun(self, st: _Stream) -> None:
        """XFER_BEGIN goes ahead of a link's first frame of the transfer, so the receiver never meets
        data it cannot place yet ahead of the announcement on the same link (docs/protocol.md)."""
        if self.begin is None or st.begun_tid == self.transfer_id:
            return
        st.out.append(_OutFrame(_control_frame(st, FrameType.XFER_BEGIN, self.transfer_id, self.begin),
                                type=FrameType.XFER_BEGIN, transfer_id=self.transfer_id))
        st.begun_tid = self.transfer_id

    def _begin_only_needed(self) -> bool:
        return (self.begin is not None and not self.begin_acked
                and not any(s.begun_tid == self.transfer_id for s in self.owner._live()))

    def _may_carry(self, st: _Stream) -> bool:
        # The control connection carries chunks only when no data stream is left; a paused stream
        # only when every data stream left is paused (as in amst.c's may_carry).
        if st.is_control:
            return not any(s.alive and not s.is_control for s in self.owner._streams)
        return not st.paused or not any(s.alive and not s.is_control and not s.paused
                                        for s in self.owner._streams)

    # -- pulling chunks --------------------------------------------------------------------------
    def can_pull(self, st: _Stream) -> bool:
        if self.done_received or not self._may_carry(st):
            return False
        return (bool(self.requeue) or (not self.stop_new and self.next_fresh < self.total)
                or self._begin_only_needed())

    def pull(self, st: _Stream) -> _OutFrame | None:
        if self.done_received or not self._may_carry(st):
            return None
        frame = self._pull_chunk(st)
        if frame is not None:
            self.ensure_begun(st)
        elif self._begin_only_needed():
            self.ensure_begun(st)   # nothing to carry the announcement: it goes alone
        return frame

    def _pull_chunk(self, st: _Stream) -> _OutFrame | None:
        while self.requeue:
            k = self.requeue.popleft()
            self.queued.discard(k)
            if k in self.acked or k >= self.total:
                continue
            self.owner._stat("chunks_resent")
            return self._frame(st, k)
        if self.deadline is not None and not self.stop_new:
            self.tick(time.monotonic())  # no chunk may start after the deadline, even mid-visit
        if self.stop_new or self.next_fresh >= self.total:
            return None
        k = self.next_fresh
        self.next_fresh += 1
        return self._frame(st, k)

    def _frame(self, st: _Stream, k: int) -> _OutFrame:
        size = self.layout.chunk_size(k)
        payload = self.layout.chunk_view(k, size)
        h = Header(type=FrameType.DATA, flags=self.csum_flags | self.frame_flags, stream=st.wire,
                   length=size, transfer_id=self.transfer_id, offset=k * self.layout.chunk_bytes,
                   checksum=payload_checksum(self.csum_flags, payload))
        self._hand_to(st, k)
        return _OutFrame(encode_header(h), type=FrameType.DATA, transfer_id=self.transfer_id, chunk=k,
                         payload=payload)

    def _hand_to(self, st: _Stream, k: int) -> None:
        prev = self.carrier.get(k)
        if prev is not None:
            self.owner._streams[prev].outstanding.discard(k)
        self.carrier[k] = st.index
        st.outstanding.add(k)

    def _settle(self, k: int) -> None:
        prev = self.carrier.pop(k, None)
        if prev is not None:
            self.owner._streams[prev].outstanding.discard(k)

    def _push_front(self, ks: list[int]) -> None:
        for k in sorted(ks, reverse=True):
            if k not in self.queued and k not in self.acked and k < self.total:
                self.requeue.appendleft(k)
                self.queued.add(k)

    # -- frames from the receiver ----------------------------------------------------------------
    def on_header(self, st: _Stream, h: Header) -> None:
        owner = self.owner
        if h.type in _RX_TYPES and h.transfer_id <= owner._last_recv_id:
            # Leftovers of a transfer this set received earlier (one set used in both directions,
            # as Session does): stale, drop them.
            owner._discard_stale(st, h)
            return
        if h.type in _RX_TYPES:
            st.parked = h   # the peer's next transfer towards us: keep it for that receive call
            return
        if h.type not in _TX_TYPES:
            raise _violation(f"frame type {h.type} is not legal on a data stream of a sender",
                             errors.E_TYPE, st.index)
        if h.transfer_id < self.transfer_id:
            return  # ACK/DONE of an earlier transfer of ours, read late: stale
        if h.transfer_id > self.transfer_id:
            raise _violation(f"{FrameType(h.type).name} for transfer {h.transfer_id}, but transfer "
                             f"{self.transfer_id} is the newest one sent", errors.E_PEER, st.index)
        self.begin_acked = True
        if h.type == FrameType.DONE:
            self._all_done()
            return
        if self.done_received:
            return  # DONE already settled every chunk (and counted it): later ACKs/NACKs are moot
        c = self.layout.chunk_bytes
        if h.offset % c or h.offset // c >= self.next_fresh:
            raise _violation(f"{FrameType(h.type).name} for offset {h.offset}, which is not a chunk "
                             f"that was sent", errors.E_RANGE, st.index)
        k = h.offset // c
        if h.type == FrameType.ACK:
            if self.acked.add(k):
                self._settle(k)
                size = self.layout.chunk_size(k)
                self.acked_bytes += size
                owner._stat("chunks")
                owner._stat("bytes_payload", size)
        elif k not in self.acked:  # NACK: the receiver dropped it; send it again first
            self._settle(k)
            self._push_front([k])

    def _all_done(self) -> None:
        if self.done_received:
            return
        self.done_received = True
        # Count the chunks whose ACKs we will never read as acknowledged (arithmetically: a wrapping
        # transfer may have millions of chunks).
        self.owner._stat("chunks", self.total - self.acked.count())
        self.owner._stat("bytes_payload", self.length - self.acked_bytes)
        self.acked_bytes = self.length
        self.requeue.clear()
        self.queued.clear()

    def on_stream_dead(self, st: _Stream) -> None:
        lost = [k for k in st.outstanding if k not in self.acked]
        for k in st.outstanding:
            self.carrier.pop(k, None)
        st.outstanding.clear()
        self._push_front(lost)

    # -- deadline --------------------------------------------------------------------------------
    def tick(self, now: float) -> float | None:
        if self.deadline is None or self.stop_new:
            return None
        if now < self.deadline:
            return self.deadline
        self.stop_new = True
        started = min(self.next_fresh * self.layout.chunk_bytes, self.length)
        if started < self.length and not self.done_received:
            # Tell the receiver where the transfer now ends, on every live stream, behind whatever
            # frame each one is writing (so the TRUNCATE can never overtake a chunk below it).
            self.length = started
            self.total = self.next_fresh
            self.owner._stats["truncated_at"] = started
            for s in self.owner._live():
                self.ensure_begun(s)
                s.out.append(self.header(s, FrameType.TRUNCATE, started))
        return None

    def complete(self) -> bool:
        if not self.done_received and self.acked.below < self.total:
            return False
        if self.begin is not None and self.total == 0 and not self.done_received:
            return False   # nothing to acknowledge: DONE says the announcement arrived
        # A TRUNCATE still queued must reach the peer, or it would wait for chunks never sent.
        return not any(f.type == FrameType.TRUNCATE and f.transfer_id == self.transfer_id
                       for s in self.owner._live() for f in s.out)

    def progress(self) -> str:
        return f"{self.acked.count()}/{self.total} chunks acknowledged"


class _RecvTransfer(_Transfer):
    """Receiver rules of docs/protocol.md "Transfers"."""

    def __init__(self, owner: PyStreamSet, layout: _Layout, *, transfer_id: int,
                 csum_flags: int) -> None:
        self.owner = owner
        self.layout = layout
        self.transfer_id = transfer_id
        self.csum_flags = csum_flags
        self.length = layout.length
        self.total = _chunk_count(self.length, layout.chunk_bytes)
        self.verified = _ChunkMap()           # DONE chunks
        self.writing: dict[int, int] = {}     # WRITING chunks -> stream; absent from both: EMPTY
        self.dropped: dict[int, int] = {}     # WRITING chunks whose duplicate a stream dropped
        self.done_sent = False
        self.truncated = False
        self.touched = 0                      # chunks [0, touched) include every one ever started
        self._check_done()

    def on_header(self, st: _Stream, h: Header) -> None:
        owner = self.owner
        if h.type in _TX_TYPES and h.transfer_id <= owner._last_send_id:
            return  # ACK/NACK/DONE of a transfer this set sent earlier, read after that call returned
        if h.type not in _RX_TYPES:
            raise _violation(f"frame type {h.type} is not legal on a data stream of a receiver",
                             errors.E_TYPE, st.index)
        if h.transfer_id < self.transfer_id:
            owner._discard_stale(st, h)   # stale duplicate of an earlier transfer
            if h.type == FrameType.DATA:
                owner._stat("chunks_duplicate")
            return
        if h.transfer_id > self.transfer_id:
            st.parked = h           # the sender is already on a later transfer: keep it for that call
            return
        c = self.layout.chunk_bytes
        if h.type == FrameType.TRUNCATE:
            if h.offset > self.length or (h.offset % c and h.offset != self.length):
                raise _violation(f"TRUNCATE to {h.offset} bytes: not a chunk boundary within the "
                                 f"transfer of {self.length} bytes", errors.E_RANGE, st.index)
            if self.truncated:
                if h.offset == self.length:
                    return  # the same TRUNCATE, sent on every stream
                raise _violation(f"second TRUNCATE to {h.offset} bytes after one to {self.length}",
                                 errors.E_PEER, st.index)
            if self.touched > _chunk_count(h.offset, c):
                raise _violation(f"TRUNCATE to {h.offset} bytes cuts off chunks the sender already "
                                 "started", errors.E_RANGE, st.index)
            self.truncated = True
            self.length = h.offset
            self.layout.length = h.offset
            self.total = _chunk_count(h.offset, c)
            owner._stats["truncated_at"] = h.offset
            self._check_done()
            return
        if (h.flags & _CSUM_MASK) != self.csum_flags:
            raise _violation(f"DATA checksum flags 0x{h.flags & _CSUM_MASK:x} differ from the "
                             f"negotiated 0x{self.csum_flags:x}", errors.E_FLAGS, st.index)
        if h.offset % c or h.offset >= self.length:
            raise _violation(f"DATA at offset {h.offset}: not a chunk boundary inside the transfer of "
                             f"{self.length} bytes (chunk {c})", errors.E_RANGE, st.index)
        k = h.offset // c
        size = self.layout.chunk_size(k)
        if h.length != size:
            raise _violation(f"DATA at offset {h.offset} carries {h.length} bytes, the chunk there is "
                             f"{size} bytes", errors.E_LENGTH, st.index)
        if k in self.verified or k in self.writing:
            # A re-send after a stream death or NACK raced another copy: never let it touch bytes
            # that are verified or being written by another stream.
            owner._stat("chunks_duplicate")
            owner._discard(st, h)
            st.rx_ack_after_discard = k in self.verified
            if k not in self.verified:
                self.dropped[k] = st.index
            return
        self.writing[k] = st.index
        self.touched = max(self.touched, k + 1)
        st.rx_header = h
        st.rx_remaining = h.length
        st.rx_target = self.layout.place(k, size, st.index)
        st.rx_chunk = k

    def on_payload(self, st: _Stream) -> None:
        h = st.rx_header
        assert h is not None
        owner = self.owner
        if st.rx_target is None:
            if st.rx_ack_after_discard and h.transfer_id == self.transfer_id:
                # Repeat the ACK: the first one may have been lost with the stream that carried it.
                st.out.append(self.header(st, FrameType.ACK, h.offset))
            return
        k = st.rx_chunk
        self.writing.pop(k, None)
        via = self.dropped.pop(k, None)  # settled by the ACK or NACK below
        good = not self.csum_flags or payload_checksum(self.csum_flags, st.rx_target) == h.checksum
        if good:
            if self.verified.add(k):
                owner._stat("chunks")
                owner._stat("bytes_payload", h.length)
            st.out.append(self.header(st, FrameType.ACK, h.offset))
            if via is not None and via != st.index:
                # The copy dropped there is what the sender now waits on (it re-sent the chunk after
                # losing this stream's end, whose ACK may never reach it): ACK there too.
                self._answer(FrameType.ACK, k, via)
            self._check_done()
        else:
            owner._stat("checksum_errors")
            log.warning("stream %d: chunk at offset %d of transfer %d failed its checksum; NACKed",
                        st.index, h.offset, self.transfer_id)
            st.out.append(self.header(st, FrameType.NACK, h.offset))

    def _check_done(self) -> None:
        if not self.done_sent and self.verified.below >= self.total:
            self.done_sent = True
            for s in self.owner._live():
                s.out.append(self.header(s, FrameType.DONE, self.length))

    def _answer(self, type: int, k: int, via: int, dead: _Stream | None = None) -> None:
        """An ACK or NACK for chunk k on stream via while it lives (the sender holds the chunk as
        outstanding there), else on any other live stream."""
        live = [s for s in self.owner._live() if s is not dead]
        if live:
            target = next((s for s in live if s.index == via), live[0])
            target.out.append(self.header(target, type, k * self.layout.chunk_bytes))

    def on_stream_dead(self, st: _Stream) -> None:
        # NACKs it had not finished writing: the sender still waits on their chunks.
        for f in st.out:
            if f.type == FrameType.NACK and not f.done:
                self._answer(FrameType.NACK, decode_header(f.header, 0).offset // self.layout.chunk_bytes,
                             -1, st)
        for k in [k for k, i in self.writing.items() if i == st.index]:
            del self.writing[k]   # back to EMPTY: another stream's copy may now be written
            if k in self.dropped:
                # A copy that arrived on another stream meanwhile was dropped (this one was being
                # written). The sender holds that copy as outstanding on a live stream and will not
                # send it again by itself: ask for it with a NACK ("offset = chunk to send again").
                self._answer(FrameType.NACK, k, self.dropped.pop(k), st)

    def complete(self) -> bool:
        # Return only once DONE (and any ACKs) left on every live stream: the sender may need them.
        return self.done_sent and not any(s.out for s in self.owner._live())

    def data_complete(self) -> bool:
        # Every chunk is verified: a sender that read DONE on one link may close at once, before the
        # DONE queued on the others is written; its CLOSE then waits for the next call.
        return self.done_sent

    def progress(self) -> str:
        return f"{self.verified.count()}/{self.total} chunks verified"


class _Idle(_Transfer):
    """No transfer: next_control() waiting for the peer's next control frame, or send_control()
    pushing one out. Late frames of earlier transfers are drained; data of a transfer that was
    announced parks its link until that transfer's receive call."""

    transfer_id = 0
    csum_flags = 0
    moves_data = False

    def __init__(self, owner: PyStreamSet, *, want_inbox: bool) -> None:
        self.owner = owner
        self.want_inbox = want_inbox

    def on_header(self, st: _Stream, h: Header) -> None:
        owner = self.owner
        if h.type in _RX_TYPES:
            if h.transfer_id <= owner._last_recv_id:
                owner._discard_stale(st, h)
            elif h.transfer_id > owner._last_begin_id:
                # A correct peer puts XFER_BEGIN ahead of a transfer's data on every link, so waiting
                # for this transfer's announcement would wait forever.
                raise _violation(f"{FrameType(h.type).name} of transfer {h.transfer_id}, which was never "
                                 "announced on this link", errors.E_PEER, st.index)
            else:
                st.parked = h
            return
        if h.type in _TX_TYPES and h.transfer_id <= owner._last_send_id:
            return   # ACK/DONE of an earlier send, read after that call returned
        raise _violation(f"frame type {h.type} is not legal on a link between transfers",
                         errors.E_TYPE, st.index)

    def complete(self) -> bool:
        if self.want_inbox:
            return bool(self.owner._inbox)
        return not any(s.out for s in self.owner._live())

    def progress(self) -> str:
        return "waiting for a control frame" if self.want_inbox else "sending a control frame"


def _small_frame(st: _Stream, type: int, transfer_id: int, offset: int) -> _OutFrame:
    """A header-only frame (ACK/NACK/DONE/TRUNCATE) for link st: flags and checksum 0."""
    return _OutFrame(encode_header(Header(type=type, flags=0, stream=st.wire, transfer_id=transfer_id,
                                          offset=offset)), type=type, transfer_id=transfer_id)


def _control_frame(st: _Stream, type: int, transfer_id: int, payload: bytes) -> bytes:
    """A control frame (XFER_BEGIN/ABORT/CLOSE) for link st, its payload CRC32C-checksummed."""
    flags = int(Flag.CSUM_CRC32C) if payload else 0
    return encode_header(Header(type=type, flags=flags, stream=st.wire, length=len(payload),
                                transfer_id=transfer_id,
                                checksum=payload_checksum(flags, payload) if payload else 0)) + payload


class PyStreamSet:
    """The data streams of one session, driven by the pure-Python engine.

    ``socks`` are connected TCP sockets, plain or ``ssl.SSLSocket`` with the handshake done; stream
    ``i`` is ``socks[i]``. The engine makes them non-blocking and sets TCP_NODELAY (so ACKs are not
    held back by Nagle); they stay owned by the caller, who closes them after :meth:`close`.

    One transfer runs at a time (either direction); transfer ids must increase per direction.
    ``stats()``, ``alive()``, ``kill()``, ``interrupt()`` and ``close()`` may be called from other
    threads while a transfer runs."""

    def __init__(self, socks: Sequence[socket.socket], *, control: socket.socket | None = None,
                 sndbuf_bytes: int = 0, cipher: str | None = None, direction: int = 0,
                 tx_secret: bytes | None = None, rx_secret: bytes | None = None,
                 rekey_bytes: int = 0) -> None:
        if not 1 <= len(socks) <= MAX_STREAMS:
            raise ConfigError(f"a stream set needs 1 to {MAX_STREAMS} sockets, got {len(socks)}")
        fds = [s.fileno() for s in [*socks, *([control] if control is not None else [])]]
        if min(fds) < 0:
            raise ConfigError("a socket passed to PyStreamSet is closed; pass connected sockets")
        if len(set(fds)) != len(fds):
            raise ConfigError("socks (and control) contain the same socket twice; pass each connection once")
        self.count: int = len(socks)
        self.io_threads = 1
        self._streams = [_Stream(i, s) for i, s in enumerate(socks)]
        if control is not None:
            self._streams.append(_Stream(len(socks), control, control=True))
        self.sealed = cipher is not None
        if cipher is not None:
            if not tx_secret or not rx_secret or direction not in (0, 1):
                raise ConfigError("a sealed stream set needs tx_secret, rx_secret and direction 0 or 1")
            for st in self._streams:
                st.tx_seal = FrameSeal(cipher, tx_secret, sealing=True, direction=direction, link=st.wire,
                                       rekey_bytes=rekey_bytes)
                st.rx_seal = FrameSeal(cipher, rx_secret, sealing=False, direction=1 - direction,
                                       link=st.wire, rekey_bytes=rekey_bytes)
        self._inbox: deque[tuple[int, int, bytes]] = deque()   # control frames for next_control()
        self._last_begin_id = -1
        self._done_recv: tuple[int, int] | None = None         # (id, length) of the last receive done
        self._stop: tuple[int, bytes] | None = None             # ABORT/CLOSE that stops this call
        self._stats: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)
        self._lock = threading.Lock()         # guards _running, _closed, _interrupted, kills
        self._running = False
        self._closed = False
        self._interrupted = False
        self._last_send_id = -1
        self._last_recv_id = -1
        self._scratch = memoryview(bytearray(_SCRATCH_BYTES))
        self._last_error: str = ""
        self._call_protocol_error: ProtocolError | None = None  # last violation seen by this call
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        for st in self._streams:
            st.sock.setblocking(False)
            try:
                st.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP (a Unix socketpair in a test): nothing to tune
            st.mask = selectors.EVENT_READ
            self._sel.register(st.sock, st.mask, st)
        self.sndbuf = _size_send_buffers([st.sock for st in self._streams], sndbuf_bytes)

    # ---- public API --------------------------------------------------------------------------------
    def send(self, buffer: Buffer, *, transfer_id: int, chunk_bytes: int, csum_flags: int,
             length: int | None = None, frame_flags: int = 0, timeout_s: float = 30.0,
             zerocopy: bool = False, zc_min_bytes: int = 0, deadline: float | None = None,
             begin: bytes | None = None) -> int:
        """Send ``buffer`` (or its first ``length`` bytes; more than its size wraps around it) as
        transfer ``transfer_id``. Returns the logical length sent (shorter after ``deadline``, a
        ``time.monotonic()`` instant) once every chunk is acknowledged or the receiver said DONE;
        the buffer is no longer referenced then. ``begin``: the XFER_BEGIN payload, sent ahead of
        each link's first frame of the transfer. ``zerocopy``/``zc_min_bytes`` are ignored (see the
        module docstring)."""
        del zerocopy, zc_min_bytes
        view = byte_view(buffer)
        try:
            if length is None:
                length = len(view)
            _check_common(view, transfer_id=transfer_id, length=length, chunk_bytes=chunk_bytes,
                          csum_flags=csum_flags, timeout_s=timeout_s)
            if deadline is not None and (isinstance(deadline, bool) or
                                         not isinstance(deadline, (int, float)) or
                                         not math.isfinite(deadline)):
                raise ConfigError(f"deadline must be a time.monotonic() value, got {deadline!r}")
            if frame_flags & ~int(Flag.COMPRESSED):
                raise ConfigError(f"frame_flags 0x{frame_flags:x}: only COMPRESSED (0x4) may be added to "
                                  "DATA frames; the checksum is chosen by csum_flags")
            if begin is not None and (not isinstance(begin, bytes) or len(begin) > MAX_CONTROL_BYTES):
                raise ConfigError(f"begin must be bytes of at most {MAX_CONTROL_BYTES} (an XFER_BEGIN "
                                  f"payload), got {type(begin).__name__}")
            layout = _Layout(view, length, chunk_bytes)
            with self._call():
                if transfer_id <= self._last_send_id:
                    raise ConfigError(f"transfer id {transfer_id} is not above the last one sent "
                                      f"({self._last_send_id}); ids must increase or stale ACKs could "
                                      "be taken for this transfer's")
                self._last_send_id = transfer_id
                xfer = _SendTransfer(self, layout, transfer_id=transfer_id, csum_flags=csum_flags,
                                     frame_flags=frame_flags, deadline=deadline, begin=begin)
                try:
                    self._run(xfer, timeout_s)
                finally:
                    self._release_sender_frames()
                return xfer.length
        finally:
            view.release()

    def recv_into(self, buffer: Buffer, *, transfer_id: int, length: int, chunk_bytes: int,
                  csum_flags: int, timeout_s: float = 30.0, sink: bool = False) -> int:
        """Receive transfer ``transfer_id`` of ``length`` bytes into ``buffer`` (wrapping around it when
        ``length`` exceeds its size). Returns the logical length received (shorter if the sender
        truncated) once every chunk is verified and DONE went out on every live link. ``sink``
        (wrap mode, benchmarks): each stream lands its chunks in its own slot of the buffer."""
        view = byte_view(buffer, writable=True, what="recv_into() buffer")
        try:
            _check_common(view, transfer_id=transfer_id, length=length, chunk_bytes=chunk_bytes,
                          csum_flags=csum_flags, timeout_s=timeout_s)
            if sink and length <= len(view):
                raise ConfigError("sink=True is for wrap-mode (benchmark) receives, whose length exceeds "
                                  "the buffer")
            layout = _Layout(view, length, chunk_bytes, sink=sink)
            with self._call():
                if transfer_id <= self._last_recv_id:
                    raise ConfigError(f"transfer id {transfer_id} is not above the last one received "
                                      f"({self._last_recv_id}); ids must increase or stale chunks could "
                                      "be taken for this transfer's")
                self._last_recv_id = transfer_id
                xfer = _RecvTransfer(self, layout, transfer_id=transfer_id, csum_flags=csum_flags)
                try:
                    self._run(xfer, timeout_s)
                finally:
                    for st in self._streams:
                        if st.rx_target is not None:
                            st.discard_rest()  # a failed call leaves no view of the caller's buffer
                self._done_recv = (transfer_id, xfer.length)
                return xfer.length
        finally:
            view.release()

    def next_control(self, timeout_s: float | None = None) -> tuple[int, int, bytes]:
        """The next control frame (XFER_BEGIN, ABORT, CLOSE) the peer sent on any link:
        (type, transfer_id, payload). Waits up to ``timeout_s`` (None: no limit); TransferTimeout
        if none came (the set stays usable)."""
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not math.isfinite(timeout_s) or timeout_s < 0):
            raise ConfigError(f"timeout_s must be None or a number of seconds >= 0, got {timeout_s!r}")
        with self._call():
            if not self._inbox:
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
                try:
                    self._run(_Idle(self, want_inbox=True), None, deadline=deadline)
                except TransferTimeout:
                    raise TransferTimeout(f"no control frame arrived within {timeout_s:g} s") from None
            return self._inbox.popleft()

    def send_control(self, ftype: int, transfer_id: int = 0, payload: bytes = b"",
                     timeout_s: float = 1.0) -> int:
        """Send a control frame (ABORT or CLOSE) on every live link, behind any frame already on its
        way; returns on how many links it went out whole within ``timeout_s``."""
        if ftype not in (FrameType.ABORT, FrameType.CLOSE) or not isinstance(payload, bytes) \
                or len(payload) > MAX_CONTROL_BYTES or (ftype == FrameType.CLOSE and (payload or transfer_id)):
            raise ConfigError(f"send_control sends ABORT (with a payload) or CLOSE (empty), got type "
                              f"{ftype} with {len(payload)} payload bytes")
        with self._call():
            frames = []
            for st in self._live():
                if st.kill_requested:
                    continue
                f = _OutFrame(_control_frame(st, ftype, transfer_id, payload), type=ftype,
                              transfer_id=transfer_id)
                st.out.append(f)
                frames.append((st, f))
            try:
                self._run(_Idle(self, want_inbox=False), None, deadline=time.monotonic() + timeout_s,
                          honor_interrupt=False)
            except (TransferTimeout, PeerClosedError, ProtocolError):
                pass
            return sum(1 for st, f in frames if st.alive and f.done)

    def stats(self) -> dict[str, int]:
        """Counters over the set's life (same keys as the C engine's ``dwcp_stats``)."""
        out = dict(self._stats)
        out["rekeys"] = sum((st.tx_seal.rekeys + st.rx_seal.rekeys) for st in self._streams
                            if st.tx_seal is not None and st.rx_seal is not None)
        return out

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    def alive(self) -> list[bool]:
        """Per data stream: still usable?"""
        return [st.alive and not st.kill_requested for st in self._streams[:self.count]]

    def alive_count(self) -> int:
        return sum(self.alive())

    def control_alive(self) -> bool:
        """Is the control connection still usable? (False when the set has none.)"""
        return len(self._streams) > self.count and self._streams[-1].alive and \
            not self._streams[-1].kill_requested

    def kill_control(self) -> None:
        """Mark the control connection dead and shut it down (the other links carry on)."""
        if len(self._streams) == self.count:
            raise ConfigError("this stream set has no control connection")
        self._kill_link(self._streams[-1])

    def pause(self, i: int, paused: bool = True) -> None:
        """Pause (or resume) data stream i as a sender (see dwcp_streams_pause in amst.h)."""
        if not 0 <= i < self.count:
            raise ConfigError(f"stream index {i} out of range 0..{self.count - 1}")
        with self._lock:
            self._streams[i].paused = bool(paused)
        self._wake()

    def paused(self) -> list[bool]:
        return [st.paused for st in self._streams[:self.count]]

    def kill(self, i: int) -> None:
        """Mark stream i dead and shut its socket down (the peer sees EOF and re-routes its chunks)."""
        if not 0 <= i < self.count:
            raise ConfigError(f"stream index {i} out of range 0..{self.count - 1}")
        self._kill_link(self._streams[i])

    def _kill_link(self, st: _Stream) -> None:
        with self._lock:
            if not st.alive or st.kill_requested:
                return
            st.kill_requested = True
            _shutdown(st.sock)
            if not self._running:
                self._mark_dead(st, "killed locally", 0, None)
                return
        self._wake()

    def interrupt(self) -> None:
        """Make a running send()/recv_into() raise SessionClosedError soon. As in amst.h, an
        interrupt while idle stops the next call at its start (so a close racing with the start of a
        transfer is never lost); the call that raises consumes it."""
        with self._lock:
            self._interrupted = True
        self._wake()

    def close(self) -> None:
        """Stop a running transfer (it raises SessionClosedError) and release the engine's resources.
        The sockets are left to the caller."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = self._running
            if running:
                self._interrupted = True
        if running:
            self._wake()   # the running call tears down when it leaves
        else:
            self._teardown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PyStreamSet streams={self.count} alive={self.alive_count()}>"

    # ---- call lifecycle ----------------------------------------------------------------------------
    def _call(self) -> _CallGuard:
        return _CallGuard(self)

    def _teardown(self) -> None:
        for st in self._streams:
            st.alive = False
            st.out.clear()
            st.reset_reader()
        try:
            self._sel.close()
        finally:
            self._wake_r.close()
            self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # buffer full (a wakeup is pending anyway) or already torn down

    def _release_sender_frames(self) -> None:
        """Keep no view of the caller's buffer: finish half-written frames from a private copy,
        drop frames not yet started (their chunks belong to a transfer that is over)."""
        for st in self._streams:
            st.outstanding.clear()
            kept: deque[_OutFrame] = deque()
            for f in st.out:
                if f.type == FrameType.XFER_BEGIN and not f.started:
                    continue   # an announcement of a transfer that is over
                if f.borrowed:
                    if not f.started:
                        assert f.payload is not None
                        f.payload.release()
                        continue
                    f.detach()
                kept.append(f)
            st.out = kept

    # ---- the loop ----------------------------------------------------------------------------------
    def _live(self) -> list[_Stream]:
        return [st for st in self._streams if st.alive]

    def _stat(self, key: str, n: int = 1) -> None:
        self._stats[key] += n

    def _run(self, xfer: _Transfer, timeout_s: float | None, *, deadline: float | None = None,
             honor_interrupt: bool = True) -> None:
        """The loop of one call. timeout_s: no byte moved for this long is a TransferTimeout (None:
        no such limit); deadline: a time.monotonic() instant by which the call must be complete."""
        last_progress = time.monotonic()
        self._stop = None
        # Headers of this transfer read during an earlier call: dispatch them first.
        for st in self._live():
            if st.parked is not None:
                h, st.parked = st.parked, None
                try:
                    xfer.on_header(st, h)
                except _StreamDied as e:
                    self._die(st, xfer, e)
        while True:
            if honor_interrupt:
                self._check_interrupt(xfer)
            if self._stop is not None:
                ftype, payload = self._stop
                if ftype == FrameType.ABORT:
                    raise TransferAborted("the peer aborted the transfer", payload=payload)
                raise PeerClosedError("the peer closed the session during the transfer")
            self._reap_kills(xfer)
            if xfer.complete():
                return
            live = self._live()
            if not live:
                self._all_dead(xfer)
            now = time.monotonic()
            wake_at = xfer.tick(now)
            if deadline is not None:
                if now >= deadline:
                    raise TransferTimeout(f"{xfer.progress()}: not done within the time allowed",
                                          errno=_errno.ETIMEDOUT)
                wake_at = deadline if wake_at is None else min(wake_at, deadline)
            if timeout_s is not None and now - last_progress >= timeout_s:
                raise TransferTimeout(
                    f"no byte moved on any of {len(live)} live stream(s) for {timeout_s:g} s (transfer "
                    f"{xfer.transfer_id}: {xfer.progress()}); is the peer alive and calling the "
                    "matching send/recv?", errno=_errno.ETIMEDOUT)
            self._update_interest(live, xfer)
            ready_now = [st for st in live if st.rx_pending()]
            wait = _MAX_WAIT_S if timeout_s is None else last_progress + timeout_s - now
            if wake_at is not None:
                wait = min(wait, wake_at - now)
            wait = 0.0 if ready_now else max(0.0, min(wait, _MAX_WAIT_S))
            moved = 0
            for key, events in self._sel.select(wait):
                st = key.data
                if st is None:
                    self._drain_wakeups()
                    continue
                if not st.alive:
                    continue
                if events & selectors.EVENT_READ:
                    moved += self._read(st, xfer)
                if events & selectors.EVENT_WRITE and st.alive:
                    moved += self._write(st, xfer)
                if xfer.complete():
                    break
            else:
                for st in ready_now:
                    if st.alive:
                        moved += self._read(st, xfer)
            if moved:
                last_progress = time.monotonic()

    def _update_interest(self, live: list[_Stream], xfer: _Transfer) -> None:
        for st in live:
            mask = 0 if st.parked is not None else selectors.EVENT_READ
            if st.out or xfer.can_pull(st):
                mask |= selectors.EVENT_WRITE
            if mask == st.mask:
                continue
            if st.mask == 0:
                self._sel.register(st.sock, mask, st)
            elif mask == 0:
                self._sel.unregister(st.sock)
            else:
                self._sel.modify(st.sock, mask, st)
            st.mask = mask

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _check_interrupt(self, xfer: _Transfer) -> None:
        with self._lock:
            interrupted, self._interrupted = self._interrupted, False
            closed = self._closed
        if interrupted or closed:
            what = "close()" if closed else "interrupt()"
            raise SessionClosedError(f"transfer {xfer.transfer_id} stopped by {what} on this stream set "
                                     f"({xfer.progress()}); open a new session to continue")

    def _reap_kills(self, xfer: _Transfer) -> None:
        for st in self._streams:
            if st.kill_requested and st.alive:
                self._die(st, xfer, _StreamDied("killed locally"))

    def _all_dead(self, xfer: _Transfer) -> None:
        proto = self._call_protocol_error
        if proto is not None:
            # As the C engine: when a peer's protocol violation is among the reasons the transfer
            # has no stream left, that is the error to report (it says whose fault it was).
            raise ProtocolError(f"every connection of the session died; {proto}", code=proto.code,
                                stream=proto.stream)
        last = self._stats["last_errno"]
        cause = f" (last: {self._last_error})" if self._last_error else ""
        where = f"transfer {xfer.transfer_id} stopped at {xfer.progress()}" if xfer.moves_data \
            else xfer.progress()
        raise PeerClosedError(
            f"every connection of the session died{cause}; {where}: the peer closed, crashed or the "
            "path is down", errno=last or None)

    def _die(self, st: _Stream, xfer: _Transfer, why: _StreamDied) -> None:
        if isinstance(why.error, ProtocolError):
            self._call_protocol_error = why.error
        level = logging.WARNING if isinstance(why.error, ProtocolError) else logging.INFO
        log.log(level, "stream %d died: %s", st.index, why.reason)
        with self._lock:
            xfer.on_stream_dead(st)
            self._mark_dead(st, why.reason, why.errno, why.error)

    def _mark_dead(self, st: _Stream, reason: str, err_no: int, error: Exception | None) -> None:
        """Bookkeeping of a stream death; caller holds _lock and has released the transfer's hold."""
        st.alive = False
        _shutdown(st.sock)  # so the peer notices at once and re-routes its chunks
        if st.mask:
            try:
                self._sel.unregister(st.sock)
            except (KeyError, ValueError, OSError):
                pass
            st.mask = 0
        st.out.clear()
        st.reset_reader()
        st.outstanding.clear()
        self._stats["streams_failed"] += 1
        self._stats["last_failed_stream"] = st.index
        if err_no:
            self._stats["last_errno"] = err_no
        self._last_error = f"stream {st.index}: {reason}"

    # ---- reading -----------------------------------------------------------------------------------
    def _read(self, st: _Stream, xfer: _Transfer) -> int:
        moved = 0
        try:
            while moved < _VISIT_BUDGET and st.parked is None:
                h = st.rx_header
                if h is None:
                    if st.rx_tag_for is not None:  # a sealed frame without payload: its tag
                        moved += self._read_tag(st)
                        h, st.rx_tag_for = st.rx_tag_for, None
                        self._open(st, h, tag=True)
                        self._dispatch(st, h, xfer)
                        if xfer.complete():
                            break
                        continue
                    n = st.sock.recv_into(st.hview[st.hpos:], HEADER_BYTES - st.hpos)
                    if not n:
                        raise _StreamDied("peer closed the stream (EOF)")
                    moved += n
                    st.hpos += n
                    if st.hpos == HEADER_BYTES:
                        st.hpos = 0
                        h = self._decode(st)
                        if st.rx_seal is not None:
                            if not h.length:
                                st.rx_tag_for = h
                                continue
                            self._open(st, h, tag=False)
                        self._dispatch(st, h, xfer)
                        if xfer.complete():
                            break
                    continue
                if st.rx_remaining:
                    if st.rx_ctl is not None:
                        pos = len(st.rx_ctl) - st.rx_remaining
                        piece = memoryview(st.rx_ctl)[pos:]
                        n = st.sock.recv_into(piece, st.rx_remaining)
                    elif st.rx_target is not None:
                        pos = len(st.rx_target) - st.rx_remaining
                        piece = st.rx_target[pos:]
                        n = st.sock.recv_into(piece, st.rx_remaining)
                    else:
                        piece = self._scratch
                        n = st.sock.recv_into(piece, min(st.rx_remaining, len(self._scratch)))
                    if not n:
                        raise _StreamDied("peer closed the stream (EOF) in the middle of a frame")
                    if st.rx_seal is not None:
                        self._decrypt(st, piece[:n])  # in place, while the bytes are in cache
                    moved += n
                    st.rx_remaining -= n
                if not st.rx_remaining and st.rx_seal is not None and st.tagpos < TAG_BYTES:
                    moved += self._read_tag(st)
                    try:
                        st.rx_seal.verify(bytes(st.tagbuf))
                    except ProtocolError as e:
                        assert st.rx_header is not None
                        raise self._auth_failure(st, st.rx_header) from e
                if not st.rx_remaining:
                    try:
                        if st.rx_ctl is not None:
                            self._control_payload(st, xfer)
                        else:
                            if st.rx_done_reply and st.rx_target is None:
                                st.rx_done_reply = False
                                self._reply_done(st)
                            xfer.on_payload(st)
                    finally:
                        st.discard_rest()
                        st.rx_header = None
                        st.tagpos = 0
                    if xfer.complete():
                        break
        except _WOULD_BLOCK:
            pass
        except _StreamDied as e:
            self._die(st, xfer, e)
        except (OSError, ssl.SSLError) as e:
            self._die(st, xfer, _StreamDied(f"receive failed: {e}", errno=e.errno or 0, error=e))
        self._stat("bytes_wire", moved)
        return moved

    def _dispatch(self, st: _Stream, h: Header, xfer: _Transfer) -> None:
        if h.type in LINK_CONTROL_TYPES:
            self._control_header(st, h, xfer)
        else:
            xfer.on_header(st, h)

    def _read_tag(self, st: _Stream) -> int:
        """Read the rest of a sealed frame's tag into st.tagbuf (raises _WOULD_BLOCK until it is in)."""
        got = 0
        while st.tagpos < TAG_BYTES:
            n = st.sock.recv_into(memoryview(st.tagbuf)[st.tagpos:], TAG_BYTES - st.tagpos)
            if not n:
                raise _StreamDied("peer closed the stream (EOF) in the middle of a frame")
            st.tagpos += n
            got += n
        return got

    def _open(self, st: _Stream, h: Header, *, tag: bool) -> None:
        """Sealed links: use up h's counter (it must be the link's next) and start opening the frame;
        tag: a frame without payload, whose tag was just read, is verified at once."""
        assert st.rx_seal is not None
        try:
            st.rx_seal.begin(bytes(st.hbuf))
            if tag:
                st.rx_seal.verify(bytes(st.tagbuf))
        except ProtocolError as e:
            raise self._auth_failure(st, h) from e
        st.tagpos = 0

    def _auth_failure(self, st: _Stream, h: Header) -> _StreamDied:
        """A sealed frame failed its counter or tag: count it, wipe the bit flips the in-place
        decryption let into the destination, and kill the link."""
        self._stat("auth_failures")
        if st.rx_target is not None:
            st.rx_target[:] = bytes(len(st.rx_target))
        return _violation(f"{FrameType(h.type).name} frame failed authentication or came out of order "
                          "(altered, replayed, dropped or injected on the path)", errors.E_AUTH, st.index)

    def _decrypt(self, st: _Stream, piece: memoryview) -> None:
        assert st.rx_seal is not None
        try:
            st.rx_seal.update(piece)
        except ProtocolError as e:
            raise _violation("a sealed payload could not be decrypted", errors.E_AUTH, st.index) from e

    def _decode(self, st: _Stream) -> Header:
        try:
            h = decode_header(st.hbuf, MAX_CHUNK_BYTES)
        except ProtocolError as e:
            raise _violation(str(e), e.code or errors.E_PEER, st.index) from e
        if h.stream != st.wire:
            raise _violation(f"frame carries stream index {h.stream} on stream {st.wire}",
                             errors.E_STREAM, st.index)
        if bool(h.flags & Flag.SEALED) != self.sealed:
            raise _violation(f"{'plaintext' if self.sealed else 'sealed'} frame on a "
                             f"{'sealed' if self.sealed else 'plaintext'} session", errors.E_FLAGS, st.index)
        if h.type in _NO_PAYLOAD_TYPES and h.length:
            raise _violation(f"{FrameType(h.type).name} frame with a {h.length}-byte payload",
                             errors.E_LENGTH, st.index)
        return h

    def _discard(self, st: _Stream, h: Header) -> None:
        """Read h's payload into scratch and drop it."""
        st.discard_rest()
        st.rx_header = h
        st.rx_remaining = h.length

    def _discard_stale(self, st: _Stream, h: Header) -> None:
        """A DATA/TRUNCATE of a transfer this set received earlier: drop it, and if it belongs to the
        last transfer received, answer DONE again (the sender re-sends only when it lost our DONE)."""
        reply = self._done_recv is not None and h.transfer_id == self._done_recv[0]
        if h.length:
            self._discard(st, h)
            st.rx_done_reply = reply
        elif reply:
            self._reply_done(st)

    def _reply_done(self, st: _Stream) -> None:
        if self._done_recv is not None:
            st.out.append(_small_frame(st, FrameType.DONE, *self._done_recv))

    # ---- control frames on any link ----------------------------------------------------------------
    def _control_header(self, st: _Stream, h: Header, xfer: _Transfer) -> None:
        if h.length > MAX_CONTROL_BYTES or (h.type == FrameType.CLOSE and h.length):
            raise _violation(f"{FrameType(h.type).name} frame with a {h.length}-byte payload",
                             errors.E_LENGTH, st.index)
        if (h.flags != int(Flag.SEALED)) if self.sealed else \
                ((h.flags != int(Flag.CSUM_CRC32C)) if h.length else h.flags):
            raise _violation(f"{FrameType(h.type).name} frame with flags 0x{h.flags:x}", errors.E_FLAGS,
                             st.index)
        if h.offset or (h.type == FrameType.CLOSE and h.transfer_id):
            raise _violation(f"{FrameType(h.type).name} frame with offset/transfer id set",
                             errors.E_RANGE, st.index)
        if not h.length:
            self._control_done(st, h, b"", xfer)
            return
        st.discard_rest()
        st.rx_header = h
        st.rx_remaining = h.length
        st.rx_ctl = bytearray(h.length)

    def _control_payload(self, st: _Stream, xfer: _Transfer) -> None:
        h = st.rx_header
        assert h is not None and st.rx_ctl is not None
        payload = bytes(st.rx_ctl)
        if not self.sealed and payload_checksum(int(Flag.CSUM_CRC32C), payload) != h.checksum:
            raise _violation(f"{FrameType(h.type).name} payload checksum mismatch", errors.E_CHECKSUM,
                             st.index)
        self._control_done(st, h, payload, xfer)

    def _control_done(self, st: _Stream, h: Header, payload: bytes, xfer: _Transfer) -> None:
        if h.type == FrameType.XFER_BEGIN:
            if h.transfer_id <= self._last_begin_id:
                # The same announcement on another link, or a re-announcement by a sender that lost
                # our DONE: answer that with DONE again.
                if self._done_recv is not None and h.transfer_id == self._done_recv[0]:
                    self._reply_done(st)
                return
            self._last_begin_id = h.transfer_id
        elif xfer.moves_data and not xfer.data_complete():
            # A peer that closes right after its receive completed wrote DONE ahead of CLOSE on this
            # very link, so a complete transfer lets the frame wait in the inbox for the next call.
            self._stat("control_frames")
            if self._stop is None:
                self._stop = (h.type, payload)   # ABORT or CLOSE stops this call
            return
        if len(self._inbox) >= _INBOX_MAX:
            raise _violation("the peer sent more control frames than it may have outstanding",
                             errors.E_PEER, st.index)
        self._stat("control_frames")
        self._inbox.append((h.type, h.transfer_id, payload))

    # ---- writing -----------------------------------------------------------------------------------
    def _write(self, st: _Stream, xfer: _Transfer) -> int:
        moved = 0
        try:
            while moved < _VISIT_BUDGET:
                if not st.out:
                    f = xfer.pull(st)
                    if f is None:
                        break
                    st.out.append(f)
                n = st.send_frames()
                if not n:
                    break
                moved += n
                while st.out and st.out[0].done:
                    f = st.out.popleft()
                    if f.payload is not None:
                        f.payload.release()
                        f.payload = None  # done stays true for whoever still holds the frame
        except _WOULD_BLOCK:
            pass
        except (OSError, ssl.SSLError) as e:
            # The peer may have said why before it went away (an ABORT ahead of its FIN): what it sent
            # is still queued on our side of the reset connection, so read it before the link goes.
            if st.alive:
                self._read(st, xfer)
            if st.alive:
                self._die(st, xfer, _StreamDied(f"send failed: {e}", errno=e.errno or 0, error=e))
        self._stat("bytes_wire", moved)
        return moved


class _CallGuard:
    """Marks a transfer as running (one at a time) and tears down after close() during a call."""

    def __init__(self, owner: PyStreamSet) -> None:
        self.owner = owner

    def __enter__(self) -> None:
        o = self.owner
        with o._lock:
            if o._closed:
                raise SessionClosedError("this stream set is closed; open a new session")
            if o._running:
                raise TransportError("this stream set is already running a transfer in another "
                                     "thread; one transfer runs at a time")
            o._running = True
            o._call_protocol_error = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        o = self.owner
        with o._lock:
            o._running = False
            closed = o._closed
            for st in o._streams:
                if st.kill_requested and st.alive:  # killed after the loop's last look
                    o._mark_dead(st, "killed locally", 0, None)
        if closed:
            o._teardown()


def _check_common(view: memoryview, *, transfer_id: int, length: int, chunk_bytes: int,
                  csum_flags: int, timeout_s: float) -> None:
    """Argument checks shared by send and recv_into (the same rules, and words, as dwcp._core)."""
    for name, value in (("transfer_id", transfer_id), ("length", length), ("chunk_bytes", chunk_bytes),
                        ("csum_flags", csum_flags)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name} must be an int, got {type(value).__name__}")
    if (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
            or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise ConfigError(f"timeout_s must be > 0 and finite (seconds without progress), got "
                          f"{timeout_s!r}")
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(f"chunk_bytes must be 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
    if csum_flags not in _CSUM_CHOICES:
        raise ConfigError(f"csum_flags must be 0, CSUM_CRC32C (1) or CSUM_XXH3 (2), got {csum_flags}")
    if not 0 <= transfer_id < 1 << 64:
        raise ConfigError(f"transfer_id must fit in 64 unsigned bits, got {transfer_id}")
    if not 0 <= length < 1 << 64:
        raise ConfigError(f"length must fit in 64 unsigned bits, got {length}")
    if length > len(view) and (len(view) == 0 or len(view) % chunk_bytes):
        raise ConfigError(f"length {length} exceeds the {len(view)}-byte buffer: wrapping needs a "
                          f"buffer whose size is a non-zero multiple of chunk_bytes ({chunk_bytes})")


_LAN_RTT_US = 200              # as DWCP_LAN_RTT_US / DWCP_LAN_SNDBUF_BYTES in amst.h
_LAN_SNDBUF_BYTES = 512 << 10
_TCPI_RTT_OFFSET = 68          # struct tcp_info: u32 tcpi_rtt (smoothed RTT, us)


def _size_send_buffers(socks: list[socket.socket], want: int) -> tuple[int, int]:
    """The C engine's rule (amst.h, dwcp_set_opts.sndbuf_bytes): 0 caps short-RTT paths' send buffers,
    -1 leaves the kernel's autotuning, > 0 sets them. Returns (size given or 0, largest RTT seen)."""
    if want < 0:
        return 0, 0
    path_rtt = 0
    if want == 0:
        for s in socks:
            try:
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            except OSError:
                return 0, 0   # not TCP (a Unix socketpair in a test): nothing to size
            rtt = int.from_bytes(info[_TCPI_RTT_OFFSET:_TCPI_RTT_OFFSET + 4], "little") if len(info) >= 72 else 0
            if rtt == 0:
                return 0, 0
            path_rtt = max(path_rtt, rtt)
        if path_rtt >= _LAN_RTT_US:
            return 0, path_rtt
        want = _LAN_SNDBUF_BYTES
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
        except OSError:
            pass
    return want, path_rtt


def _shutdown(sock: socket.socket) -> None:
    # socket.socket.shutdown, not SSLSocket.shutdown: the latter drops the SSL object, which another
    # thread (the loop) may be using at that moment; a TCP shutdown is what we need anyway.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
