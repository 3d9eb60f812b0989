"""HDE encoder and decoder: page mode (memory images) and buffer mode (files, snapshots).

    delta = hde.encode(new, base)             # bytes: header + batch frames
    new2 = hde.decode(delta, base)            # bytearray, verified batch by batch
    hde.apply(delta, target)                  # in place: target holds the base, ends up as new

Page mode cuts the image into batches of pages (4-64 MiB, from the image size); every batch is encoded by the C core
without the GIL, batches in parallel on a thread pool (one HdeContext per thread). Buffer mode is one zstd
frame with the base as prefix and long-distance matching, like ``zstd --patch-from``.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from dwcp import _core
from dwcp._buffers import byte_view
from dwcp.compression import level as levels
from dwcp.compression.format import (BATCH_HEADER_BYTES, HEADER_BYTES, BatchRef, DeltaHeader, Mode, iter_batches,
                                     parse_header)
from dwcp.errors import ConfigError, ProtocolError

DEFAULT_PAGE_SIZE = 4096
#: Batch size bounds when the encoder chooses (batch_bytes=None): batches as large as possible (zstd
#: finds more matches in a bigger body: on redis snapshots 4 -> 64 MiB batches took the 1 % step from
#: ratio 319 to 412) while leaving at least 4 batches per thread to share out.
MIN_AUTO_BATCH_BYTES = 4 << 20
MAX_AUTO_BATCH_BYTES = 64 << 20
#: Calibration samples this many regions spread over the image, each at most CALIBRATION_BYTES (the
#: start of a batch): enough to rank levels, a small fraction of a large image.
CALIBRATION_BATCHES = 3
CALIBRATION_BYTES = 4 << 20


@runtime_checkable
class SegmentedBase(Protocol):
    """A base held in segments, some of which may be missing (evicted from a BaselineStore). Pages in a
    missing segment are encoded without a base (zero or raw pages): never against stale bytes."""

    @property
    def length(self) -> int: ...

    @property
    def segment_bytes(self) -> int: ...

    def segment(self, offset: int, size: int) -> memoryview | None: ...


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class HdeStats:
    """What one encode or decode did. Page counts are per class; ratio = input / output bytes."""
    op: str
    mode: str
    input_bytes: int            # the new image
    base_bytes: int
    output_bytes: int           # the delta
    seconds: float              # inside the codec (no file I/O, no process start)
    threads: int
    batches: int
    page_size: int = 0
    pages: dict[str, int] = field(default_factory=dict)
    patch_runs: int = 0
    literal_bytes: int = 0
    level: levels.LevelDecision | None = None

    @property
    def ratio(self) -> float:
        return self.input_bytes / self.output_bytes if self.output_bytes else float("inf")

    @property
    def mb_per_s(self) -> float:
        """Image bytes (the new version) handled per second, in MB (1e6)."""
        return self.input_bytes / self.seconds / 1e6 if self.seconds > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "mode": self.mode, "input_bytes": self.input_bytes,
                "base_bytes": self.base_bytes, "output_bytes": self.output_bytes,
                "ratio": round(self.ratio, 3) if self.output_bytes else None,
                "seconds": round(self.seconds, 6), "mb_per_s": round(self.mb_per_s, 1),
                "threads": self.threads, "batches": self.batches, "page_size": self.page_size,
                "pages": dict(self.pages), "patch_runs": self.patch_runs,
                "literal_bytes": self.literal_bytes,
                "level": self.level.to_json() if self.level else None}


class _Pool:
    """A thread pool whose threads each own one HdeContext and scratch buffers."""

    def __init__(self, threads: int, batch_bytes: int) -> None:
        self.threads = threads
        self.batch_bytes = batch_bytes
        self._local = threading.local()
        self._lock = threading.Lock()
        self._contexts: list[_core.HdeContext] = []
        self._ex = ThreadPoolExecutor(threads, thread_name_prefix="dwcp-hde") if threads > 1 else None

    def ctx(self) -> _core.HdeContext:
        c: _core.HdeContext | None = getattr(self._local, "ctx", None)
        if c is None:
            c = _core.HdeContext(self.batch_bytes)
            self._local.ctx = c
            with self._lock:
                self._contexts.append(c)
        return c

    def scratch(self, size: int) -> mmap.mmap:
        """Per-thread scratch of at least size bytes. Anonymous memory rather than bytearray, which
        zero-fills (touches) all of it: a 64 MiB batch bound per thread cost 16k page faults up front
        while a sparse delta writes a few hundred KiB of it."""
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = mmap.mmap(-1, size)
            self._local.buf = buf
        return buf

    def map(self, fn: Callable[[int], Any], n: int) -> Iterator[Any]:
        if self._ex is None:
            return (fn(i) for i in range(n))
        return self._ex.map(fn, range(n))

    def reset_counts(self) -> None:
        for c in self._contexts:
            c.reset_counts()

    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for c in self._contexts:
            for k, v in c.counts().items():
                total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True)

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _page_stats(op: str, pool: _Pool, header: DeltaHeader, out_bytes: int, seconds: float,
                decision: levels.LevelDecision | None) -> HdeStats:
    c = pool.counts()
    return HdeStats(op, "page", header.new_length, header.base_length, out_bytes, seconds, pool.threads,
                    header.batches, header.page_size,
                    {k: c.get(k, 0) for k in ("unchanged", "zero", "patch", "raw")},
                    c.get("patch_runs", 0), c.get("literal_bytes", 0), decision)


# ---------------------------------------------------------------------------------------------- encode

def encode(new: Any, base: Any = None, *, mode: str = "auto", page_size: int = DEFAULT_PAGE_SIZE,
           level: int | str | None = "auto", link_bps: float | None = None, dirty: Any = None,
           batch_bytes: int | None = None, threads: int | None = None,
           sink: Callable[[bytes], Any] | None = None) -> tuple[bytes | None, HdeStats]:
    """Encode `new` against `base` (the version the peer holds, or None).

    mode: "page", "buffer" or "auto" (page when both lengths are whole pages, else buffer).
    level: "auto" (chosen for link_bps; see dwcp.compression.level), None/"off", or a zstd level.
    dirty: page mode only: one byte per page, 0 = the caller knows the page is unchanged since base.
    batch_bytes: page mode: image bytes per batch (None: chosen from the image size and threads).
    sink: called with each piece of the delta in order (then the bytes are not kept; returns None).
    Returns (delta or None, stats)."""
    nv = byte_view(new, what="new")
    lvl = levels.parse_level(level)
    nthreads = threads if threads is not None else default_threads()
    if not 1 <= nthreads <= 256:
        raise ConfigError(f"threads must be 1..256, got {nthreads}")
    pieces: list[bytes] = []
    put = sink if sink is not None else pieces.append
    if isinstance(base, SegmentedBase):
        if mode not in ("auto", "page"):
            raise ConfigError("a segmented base (BaselineStore) needs page mode")
        if base.segment_bytes % page_size:
            raise ConfigError(f"segments of {base.segment_bytes} bytes are not whole {page_size}-byte pages")
        stats = _encode_pages(nv, base.length, base.segment, page_size, lvl, link_bps, dirty,
                              base.segment_bytes, nthreads, put)
    else:
        bv = byte_view(base, what="base") if base is not None else None
        chosen = _choose_mode(mode, len(nv), len(bv) if bv is not None else None, page_size)
        if dirty is not None and chosen is not Mode.PAGE:
            raise ConfigError("a dirty map needs page mode (page-aligned images)")
        if chosen is Mode.PAGE:
            def whole(off: int, size: int) -> memoryview | None:
                return bv[off:off + size] if bv is not None and off < len(bv) else None
            stats = _encode_pages(nv, len(bv) if bv is not None else 0, whole, page_size, lvl, link_bps,
                                  dirty, batch_bytes, nthreads, put)
        else:
            stats = _encode_buffer(nv, bv, lvl, link_bps, nthreads, put)
    if sink is not None:
        return None, stats
    return b"".join(pieces), stats


def _choose_mode(mode: str, new_len: int, base_len: int | None, page_size: int) -> Mode:
    if mode == "page":
        return Mode.PAGE
    if mode == "buffer":
        return Mode.BUFFER
    if mode != "auto":
        raise ConfigError(f"mode {mode!r}: use page, buffer or auto")
    aligned = new_len % page_size == 0 and (base_len is None or base_len % page_size == 0)
    return Mode.PAGE if aligned and new_len else Mode.BUFFER


def auto_batch_bytes(image_bytes: int, threads: int, page_size: int) -> int:
    want = image_bytes // (4 * max(1, threads))
    want = max(MIN_AUTO_BATCH_BYTES, min(MAX_AUTO_BATCH_BYTES, want))
    return max(page_size, want - want % page_size)


def _batch_pages(page_size: int, batch_bytes: int) -> int:
    if not (_core.HDE_MIN_PAGE <= page_size <= _core.HDE_MAX_PAGE) or page_size & (page_size - 1):
        raise ConfigError(f"page size {page_size}: use a power of two in {_core.HDE_MIN_PAGE}.."
                          f"{_core.HDE_MAX_PAGE} (4096 for x86 memory)")
    if not page_size <= batch_bytes <= _core.HDE_MAX_BATCH_BYTES:
        raise ConfigError(f"batch size {batch_bytes}: use {page_size}..{_core.HDE_MAX_BATCH_BYTES} bytes")
    return min(batch_bytes // page_size, _core.HDE_MAX_BATCH_PAGES)


def _encode_pages(nv: memoryview, base_len: int, base_at: Callable[[int, int], memoryview | None],
                  page_size: int, lvl: int | None | str, link_bps: float | None, dirty: Any,
                  batch_bytes: int | None, threads: int, put: Callable[[bytes], Any]) -> HdeStats:
    _batch_pages(page_size, MIN_AUTO_BATCH_BYTES)  # validates the page size first
    if batch_bytes is None:
        batch_bytes = auto_batch_bytes(len(nv), threads, page_size)
    per = _batch_pages(page_size, batch_bytes)
    header = DeltaHeader(Mode.PAGE, len(nv), base_len, page_size, per)
    dv = byte_view(dirty, what="dirty") if dirty is not None else None
    if dv is not None and len(dv) != header.pages:
        raise ConfigError(f"dirty map has {len(dv)} entries; the image has {header.pages} pages")
    span = per * page_size
    bound = _core.hde_batch_bound(per, page_size)

    def region(i: int) -> tuple[int, memoryview, memoryview | None, memoryview | None]:
        off = i * span
        part = nv[off:off + span]
        b = base_at(off, span)
        d = dv[i * per:i * per + len(part) // page_size + (1 if len(part) % page_size else 0)] \
            if dv is not None else None
        return i * per, part, b, d

    with _Pool(threads, span) as pool:
        t0 = time.perf_counter()
        if isinstance(lvl, str):
            decision = _calibrate_pages(pool, header, region, page_size, link_bps, bound)
        else:
            decision = levels.fixed(lvl)
        zlevel = _core.HDE_LEVEL_OFF if decision.level is None else decision.level
        pool.reset_counts()  # calibration counted its sample pages; count the real encode only

        def work(i: int) -> bytes:
            first, part, b, d = region(i)
            out = pool.scratch(bound)
            n = pool.ctx().encode_batch(first, part, b, d, page_size, zlevel, out)
            return bytes(memoryview(out)[:n])

        head = header.pack()
        put(head)
        total = len(head)
        for frame in pool.map(work, header.batches):
            put(frame)
            total += len(frame)
        seconds = time.perf_counter() - t0
        return _page_stats("encode", pool, header, total, seconds, decision)


def _calibrate_pages(pool: _Pool, header: DeltaHeader, region: Callable[[int], Any], page_size: int,
                     link_bps: float | None, bound: int) -> levels.LevelDecision:
    n = header.batches
    if n == 0:
        return levels.LevelDecision(None, "empty image: nothing to compress", link_bps)
    picks = sorted({(k * n) // (CALIBRATION_BATCHES + 1) for k in range(1, CALIBRATION_BATCHES + 1)} or {0})
    ctx = pool.ctx()
    out = pool.scratch(bound)
    samples: list[tuple[int, float, int]] = []
    bodies: list[bytes] = []
    limit = max(page_size, CALIBRATION_BYTES - CALIBRATION_BYTES % page_size)
    for i in picks:
        first, part, b, d = region(i)
        part = part[:limit]
        b = b[:limit] if b is not None else None
        d = d[:-(-len(part) // page_size)] if d is not None else None
        t = time.perf_counter()
        size = ctx.encode_batch(first, part, b, d, page_size, _core.HDE_LEVEL_OFF, out)
        samples.append((len(part), time.perf_counter() - t, size - BATCH_HEADER_BYTES))
        bodies.append(bytes(memoryview(out)[BATCH_HEADER_BYTES:size]))
    zout = bytearray(max(_core.hde_buffer_bound(len(x)) for x in bodies))

    def compress(level: int) -> tuple[float, int]:
        t = time.perf_counter()
        size = sum(ctx.encode_buffer(body, None, level, 1, zout) - BATCH_HEADER_BYTES for body in bodies)
        return time.perf_counter() - t, size

    return levels.decide(levels.calibrate(samples, compress, pool.threads, link_bps), link_bps)


def _encode_buffer(nv: memoryview, bv: memoryview | None, lvl: int | None | str, link_bps: float | None,
                   threads: int, put: Callable[[bytes], Any]) -> HdeStats:
    header = DeltaHeader(Mode.BUFFER, len(nv), len(bv) if bv is not None and len(bv) else 0)
    ctx = _core.HdeContext(1 << 20)
    t0 = time.perf_counter()
    if isinstance(lvl, str):
        decision = _calibrate_buffer(ctx, nv, threads, link_bps)
    else:
        decision = levels.fixed(lvl)
    zlevel = _core.HDE_LEVEL_OFF if decision.level is None else decision.level
    out = bytearray(_core.hde_buffer_bound(len(nv)))
    n = ctx.encode_buffer(nv, bv if header.base_length else None, zlevel, threads, out)
    seconds = time.perf_counter() - t0
    head = header.pack()
    put(head)
    put(bytes(memoryview(out)[:n]))
    return HdeStats("encode", "buffer", len(nv), header.base_length, len(head) + n, seconds, threads, 1,
                    level=decision)


def _calibrate_buffer(ctx: _core.HdeContext, nv: memoryview, threads: int,
                      link_bps: float | None) -> levels.LevelDecision:
    """Speed and ratio of plain zstd on a sample of the new data (the base only improves the ratio, so
    the decision errs toward less compression)."""
    if len(nv) == 0:
        return levels.LevelDecision(None, "empty input: nothing to compress", link_bps)
    step = max(1, len(nv) // 4)
    sample = b"".join(bytes(nv[i:i + (256 << 10)]) for i in range(0, len(nv), step))[:1 << 20]
    zout = bytearray(_core.hde_buffer_bound(len(sample)))

    def compress(level: int) -> tuple[float, int]:
        t = time.perf_counter()
        size = ctx.encode_buffer(sample, None, level, 1, zout) - BATCH_HEADER_BYTES
        return time.perf_counter() - t, size

    return levels.decide(levels.calibrate([(len(sample), 0.0, len(sample))], compress, threads, link_bps),
                         link_bps)


# ---------------------------------------------------------------------------------------------- decode

def read_header(delta: Any) -> DeltaHeader:
    """The header of a delta: mode, lengths, page size (validated)."""
    return parse_header(byte_view(delta, what="delta")[:HEADER_BYTES])


def _check_base(header: DeltaHeader, bv: memoryview | None) -> None:
    if header.has_base and bv is None:
        raise ConfigError(f"this delta was made against a base of {header.base_length} bytes: pass that base")
    if header.has_base and bv is not None and len(bv) != header.base_length:
        raise ProtocolError(f"this delta was made against a base of {header.base_length} bytes; the base "
                            f"given has {len(bv)}: it is not the same version")


def decode_into(delta: Any, base: Any, dst: Any, *, threads: int | None = None) -> HdeStats:
    """Rebuild the new image into dst (writable, exactly the new length). Every batch is verified; on a
    ProtocolError dst holds a mix of verified batches and garbage and must not be used."""
    dv = byte_view(delta, what="delta")
    header = parse_header(dv)
    bv = byte_view(base, what="base") if base is not None else None
    _check_base(header, bv)
    out = byte_view(dst, writable=True, what="dst")
    if len(out) != header.new_length:
        raise ConfigError(f"destination has {len(out)} bytes; the delta rebuilds {header.new_length}")
    refs = list(iter_batches(header, dv))
    nthreads = threads if threads is not None else default_threads()
    t0 = time.perf_counter()
    if header.mode is Mode.BUFFER:
        ctx = _core.HdeContext(1 << 20)
        ref = refs[0]
        ctx.decode_buffer(dv[ref.frame_offset:ref.frame_offset + ref.frame_bytes],
                          bv if header.has_base else None, out)
        return HdeStats("decode", "buffer", header.new_length, header.base_length, len(dv),
                        time.perf_counter() - t0, 1, 1)
    def rebuild(pool: _Pool, r: BatchRef, frame: memoryview, b: memoryview | None) -> None:
        pool.ctx().decode_batch(frame, header.page_size, b, out[r.image_offset:r.image_offset + r.image_bytes])

    return _decode_pages("decode", header, dv, refs, bv, nthreads, t0, rebuild)


def _decode_pages(op: str, header: DeltaHeader, dv: memoryview, refs: list[BatchRef], bv: memoryview | None,
                  threads: int, t0: float,
                  rebuild: Callable[[_Pool, BatchRef, memoryview, memoryview | None], None]) -> HdeStats:
    """Page mode: rebuild(pool, batch, its frame, its region of the base) for every batch, in parallel."""
    with _Pool(min(threads, max(1, len(refs))), header.batch_pages * header.page_size) as pool:
        def work(i: int) -> None:
            r = refs[i]
            rebuild(pool, r, dv[r.frame_offset:r.frame_offset + r.frame_bytes],
                    _base_part(bv, header, r.image_offset, r.image_bytes))
        for _ in pool.map(work, len(refs)):
            pass
        return _page_stats(op, pool, header, len(dv), time.perf_counter() - t0, None)


def _base_part(bv: memoryview | None, header: DeltaHeader, off: int, size: int) -> memoryview | None:
    if bv is None or not header.has_base or off >= len(bv):
        return None
    return bv[off:off + size]


def decode(delta: Any, base: Any = None, *, threads: int | None = None) -> tuple[bytearray, HdeStats]:
    """Rebuild the new image as a new bytearray (returned only if every batch verified)."""
    header = read_header(delta)
    out = bytearray(header.new_length)
    stats = decode_into(delta, base, out, threads=threads)
    return out, stats


def apply(delta: Any, target: Any, *, threads: int | None = None,
          before_batch: Callable[[int, int], None] | None = None) -> HdeStats:
    """Patch target in place: its first base_length bytes hold the base, and it must already have the
    new length (resize it first if the image grew). Each batch is rebuilt in scratch and verified
    before its pages are written, so a corrupt or mismatched batch raises ProtocolError and leaves that
    batch's pages untouched (earlier batches are already applied: the caller must resend in full).

    Page mode: before_batch(offset, size), if given, runs in the worker just before the batch covering
    target[offset:offset + size] is applied -- a batch reads only its own region of the base, so the
    caller can fill the target region by region (the CLI copies the base file in while other batches
    are being applied)."""
    dv = byte_view(delta, what="delta")
    header = parse_header(dv)
    tv = byte_view(target, writable=True, what="target")
    if len(tv) != header.new_length:
        raise ConfigError(f"target has {len(tv)} bytes; the delta rebuilds {header.new_length}: resize "
                          "it first (its first bytes must hold the base)")
    if header.mode is Mode.BUFFER:
        # zstd cannot decode onto its own prefix: rebuild beside the target, then copy it in
        base = bytes(tv[:header.base_length]) if header.has_base else None
        rebuilt = bytearray(header.new_length)
        stats = decode_into(dv, base, rebuilt, threads=threads)
        tv[:] = rebuilt
        stats.op = "apply"
        return stats
    refs = list(iter_batches(header, dv))
    t0 = time.perf_counter()
    bv = tv[:min(header.base_length, len(tv))] if header.has_base else None
    span = header.batch_pages * header.page_size

    def rebuild(pool: _Pool, r: BatchRef, frame: memoryview, b: memoryview | None) -> None:
        if before_batch is not None:
            before_batch(r.image_offset, r.image_bytes)
        scratch = memoryview(pool.scratch(span))[:r.image_bytes]
        pool.ctx().decode_batch(frame, header.page_size, b, scratch,
                                tv[r.image_offset:r.image_offset + r.image_bytes])

    nthreads = threads if threads is not None else default_threads()
    return _decode_pages("apply", header, dv, refs, bv, nthreads, t0, rebuild)
