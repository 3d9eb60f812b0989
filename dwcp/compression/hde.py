"""HDE encoder and decoder: page mode (memory images) and buffer mode (files, snapshots).

    delta = hde.encode(new, base)             # bytes: header + batch frames
    new2 = hde.decode(delta, base)            # bytearray, verified batch by batch
    hde.apply(delta, target)                  # in place: target holds the base, ends up as new

Page mode cuts the image into batches of pages (4-64 MiB, from the image size); every batch is encoded by the C core
without the GIL, batches in parallel on a thread pool (one HdeContext per thread), each page compared with
the base page at the same offset and, through an index of the base (HdeIndex), with wherever its content
moved. Buffer mode is one zstd frame with the base as prefix and long-distance matching, like
``zstd --patch-from``. Auto mode (choose_mode) encodes a sample both ways.
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
    copy_runs: int = 0
    mode_reason: str = ""       # why this mode (auto mode explains its choice; otherwise what was asked)
    sample: dict[str, Any] | None = None  # auto mode: what the sample showed

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
                "literal_bytes": self.literal_bytes, "copy_runs": self.copy_runs,
                "mode_reason": self.mode_reason, "sample": self.sample,
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


PAGE_CLASSES = ("unchanged", "zero", "copy", "patch", "patch_from", "raw")


def _page_stats(op: str, pool: _Pool, header: DeltaHeader, out_bytes: int, seconds: float,
                decision: levels.LevelDecision | None) -> HdeStats:
    c = pool.counts()
    return HdeStats(op, "page", header.new_length, header.base_length, out_bytes, seconds, pool.threads,
                    header.batches, header.page_size, {k: c.get(k, 0) for k in PAGE_CLASSES},
                    c.get("patch_runs", 0), c.get("literal_bytes", 0), decision, c.get("copy_runs", 0))


# ---------------------------------------------------------------------------------------------- encode

def encode(new: Any, base: Any = None, *, mode: str = "auto", page_size: int = DEFAULT_PAGE_SIZE,
           level: int | str | None = "auto", link_bps: float | None = None, dirty: Any = None,
           batch_bytes: int | None = None, threads: int | None = None,
           sink: Callable[[bytes], Any] | None = None) -> tuple[bytes | None, HdeStats]:
    """Encode `new` against `base` (the version the peer holds, or None).

    mode: "page", "buffer" or "auto" (from a sample of the image: see choose_mode; images that are not
    whole pages always go as buffer mode).
    level: "auto" (chosen for link_bps; see dwcp.compression.level), None/"off", or a zstd level.
    dirty: page mode only: one byte per page, 0 = the caller knows the page is unchanged since base.
    batch_bytes: page mode: image bytes per batch (None: chosen from the image size and threads).
    sink: called with each piece of the delta in order (then the bytes are not kept; returns None).
    Returns (delta or None, stats); stats.mode_reason says why the mode was used."""
    nv = byte_view(new, what="new")
    lvl = levels.parse_level(level)
    nthreads = threads if threads is not None else default_threads()
    if not 1 <= nthreads <= 256:
        raise ConfigError(f"threads must be 1..256, got {nthreads}")
    if mode not in ("auto", "page", "buffer"):
        raise ConfigError(f"mode {mode!r}: use page, buffer or auto")
    pieces: list[bytes] = []
    put = sink if sink is not None else pieces.append
    if isinstance(base, SegmentedBase):
        if mode not in ("auto", "page"):
            raise ConfigError("a segmented base (BaselineStore) needs page mode")
        if base.segment_bytes % page_size:
            raise ConfigError(f"segments of {base.segment_bytes} bytes are not whole {page_size}-byte pages")
        _batch_pages(page_size, MIN_AUTO_BATCH_BYTES)
        segs = [base.segment(off, min(base.segment_bytes, base.length - off))
                for off in range(0, base.length, base.segment_bytes)]
        hb = _core.HdeBase(segs, base.segment_bytes, base.length) if base.length else None
        stats = _encode_pages(nv, hb, page_size, lvl, link_bps, dirty, base.segment_bytes, nthreads, put)
        stats.mode_reason = "a segmented base (baseline store) is encoded in page mode"
    else:
        bv = byte_view(base, what="base") if base is not None else None
        if dirty is not None and mode == "buffer":
            raise ConfigError("a dirty map needs page mode (page-aligned images)")
        t0 = time.perf_counter()
        choice = choose_mode(nv, bv, mode=mode, page_size=page_size, level=lvl, threads=nthreads,
                             dirty=dirty is not None)
        if dirty is not None and choice.mode is not Mode.PAGE:
            raise ConfigError("a dirty map needs page mode (page-aligned images)")
        if choice.mode is Mode.PAGE:
            hb = choice.base if choice.base is not None else _contiguous_base(bv, page_size)
            stats = _encode_pages(nv, hb, page_size, lvl, link_bps, dirty, batch_bytes, nthreads, put,
                                  index=choice.index)
        else:
            stats = _encode_buffer(nv, bv, lvl, link_bps, nthreads, put)
        stats.seconds = time.perf_counter() - t0  # the sample is part of the encode
        stats.mode_reason = choice.reason
        stats.sample = choice.sample
    if sink is not None:
        return None, stats
    return b"".join(pieces), stats


def _contiguous_base(bv: memoryview | None, page_size: int) -> _core.HdeBase | None:
    if bv is None or len(bv) == 0:
        return None
    seg = -(-len(bv) // page_size) * page_size
    return _core.HdeBase([bv], seg, len(bv))


# ------------------------------------------------------------------------------------------- auto mode

#: Auto mode samples SAMPLE_REGIONS regions of SAMPLE_REGION_PAGES pages spread over the image; images
#: up to EXACT_AUTO_BYTES are small enough to encode both ways and keep the smaller.
SAMPLE_REGIONS = 16
SAMPLE_REGION_PAGES = 64
SAMPLE_MARGIN_BYTES = 256 << 10
EXACT_AUTO_BYTES = 8 << 20
#: Page mode is kept unless its sample is more than this many times buffer mode's. The sample
#: understates page mode: its 64 MiB batches compress the changes of many pages together, and on the
#: redis snapshots of bench/hde page mode is 0.68-0.70x buffer mode in full where the 16 x 64-page
#: sample says 0.99-1.05x; on the synthetic adversaries the sample is within 12 % of the full ratio
#: either way, and the only ones where buffer mode wins do so by 1000x and more (content shifted by
#: less than a page). Page mode is also 4-8x faster and can be applied in place.
PAGE_MODE_SLACK = 1.25
EXACT_PAGE_MODE_SLACK = 1.02


@dataclass
class ModeChoice:
    mode: Mode
    reason: str
    sample: dict[str, Any] | None = None
    base: _core.HdeBase | None = None
    index: _core.HdeIndex | None = None


def _build_index(hb: _core.HdeBase, page_size: int, threads: int) -> _core.HdeIndex:
    """Hash every base page (in parallel, without the GIL), then build the tables."""
    ix = _core.HdeIndex(hb, page_size)
    pages = ix.pages
    step = max(1024, -(-pages // (4 * threads)))
    ranges = [(p, min(step, pages - p)) for p in range(0, pages, step)]
    if threads > 1 and len(ranges) > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="dwcp-hde-index") as ex:
            list(ex.map(lambda r: ix.hash(*r), ranges))
    else:
        for r in ranges:
            ix.hash(*r)
    ix.finish()
    return ix


def choose_mode(nv: memoryview, bv: memoryview | None, *, mode: str = "auto", page_size: int = DEFAULT_PAGE_SIZE,
                level: int | None | str = "auto", threads: int = 1, dirty: bool = False) -> ModeChoice:
    """Page or buffer mode for this input, and why.

    Page mode needs whole pages. With a base, auto mode encodes SAMPLE_REGIONS regions of the image
    both ways -- page mode exactly as the real encode would (moved pages found through the whole base's
    index), buffer mode against the base around the same place -- and keeps page mode unless buffer
    mode is clearly smaller. Small images are simply encoded both ways (the smaller wins)."""
    aligned = len(nv) % page_size == 0 and (bv is None or len(bv) % page_size == 0)
    if mode == "buffer":
        return ModeChoice(Mode.BUFFER, "buffer mode was asked for")
    if mode == "page":
        return ModeChoice(Mode.PAGE, "page mode was asked for")
    if not len(nv):
        return ModeChoice(Mode.BUFFER, "empty image")
    if not aligned:
        return ModeChoice(Mode.BUFFER, f"the images are not whole {page_size}-byte pages: buffer mode")
    if dirty:
        return ModeChoice(Mode.PAGE, "a dirty map was given: page mode")
    if bv is None or not len(bv):
        return ModeChoice(Mode.PAGE, "no base: page mode (zero pages elided, batches compressed in parallel)")
    hb = _contiguous_base(bv, page_size)
    assert hb is not None
    zlevel = 3 if isinstance(level, str) else (_core.HDE_LEVEL_OFF if level is None else level)
    ix = _build_index(hb, page_size, threads)
    pages = len(nv) // page_size
    if len(nv) <= EXACT_AUTO_BYTES:
        regions = [(0, pages)]
    else:
        starts = {(k * pages) // SAMPLE_REGIONS for k in range(SAMPLE_REGIONS)}
        regions = [(s, min(SAMPLE_REGION_PAGES, pages - s)) for s in sorted(starts)]
    # Each mode's sample is compressed as one piece, as the real encode compresses a whole batch
    # (page mode) or the whole image (buffer mode): many small frames would hide the matches across
    # regions that both modes find, and favour whichever mode has more of them.
    most = max(n for _, n in regions)
    ctx = _core.HdeContext(most * page_size)
    out = bytearray(_core.hde_batch_bound(most, page_size))
    bodies: list[bytes] = []
    news: list[memoryview] = []
    windows: list[memoryview] = []
    sampled = 0
    for first, n in regions:
        part = nv[first * page_size:(first + n) * page_size]
        size = ctx.encode_batch(first, part, hb, ix, None, page_size, _core.HDE_LEVEL_OFF, out)
        bodies.append(bytes(memoryview(out)[BATCH_HEADER_BYTES:size]))
        news.append(part)
        lo = max(0, first * page_size - SAMPLE_MARGIN_BYTES) if len(regions) > 1 else 0
        hi = min(len(bv), (first + n) * page_size + SAMPLE_MARGIN_BYTES) if len(regions) > 1 else len(bv)
        if hi > lo:
            windows.append(bv[lo:hi])
        sampled += n
    page_body = b"".join(bodies)
    zout = bytearray(_core.hde_buffer_bound(max(len(page_body), sampled * page_size)))
    if zlevel == _core.HDE_LEVEL_OFF:
        page_bytes = len(page_body)
    else:
        page_bytes = ctx.encode_buffer(page_body, None, zlevel, 1, zout) - BATCH_HEADER_BYTES
    prefix = b"".join(windows) if len(windows) > 1 else (windows[0] if windows else None)
    buffer_bytes = ctx.encode_buffer(b"".join(news) if len(news) > 1 else news[0], prefix, zlevel, 1, zout) \
        - BATCH_HEADER_BYTES
    c = ctx.counts()
    classes = {k: c[k] for k in PAGE_CLASSES}  # a fresh context: these are the sample's
    sample = {"pages": sampled, "classes": classes, "page_bytes": page_bytes, "buffer_bytes": buffer_bytes,
              "exact": len(regions) == 1 and len(nv) <= EXACT_AUTO_BYTES}
    total = max(1, sampled)
    what = (f"{100 * classes['unchanged'] / total:.0f} % same-offset, {100 * classes['copy'] / total:.0f} % "
            f"moved, {100 * classes['zero'] / total:.0f} % zero, "
            f"{100 * (classes['patch'] + classes['patch_from']) / total:.0f} % patched, "
            f"{100 * classes['raw'] / total:.0f} % unmatched")
    where = "the whole image" if sample["exact"] else f"a sample of {sampled} pages"
    # A whole small image is measured, not sampled: the smaller wins (ties and 2 % to page mode).
    slack = EXACT_PAGE_MODE_SLACK if sample["exact"] else PAGE_MODE_SLACK
    if page_bytes <= buffer_bytes * slack + 64 * len(regions):
        return ModeChoice(Mode.PAGE, f"page mode: on {where} ({what}) it makes {page_bytes:,} bytes, buffer mode "
                          f"{buffer_bytes:,}", sample, hb, ix)
    return ModeChoice(Mode.BUFFER, f"buffer mode: on {where} ({what}) page mode makes {page_bytes:,} bytes, "
                      f"buffer mode {buffer_bytes:,}: content moved by less than a page", sample)


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


def _encode_pages(nv: memoryview, hb: _core.HdeBase | None, page_size: int, lvl: int | None | str,
                  link_bps: float | None, dirty: Any, batch_bytes: int | None, threads: int,
                  put: Callable[[bytes], Any], index: _core.HdeIndex | None = None) -> HdeStats:
    _batch_pages(page_size, MIN_AUTO_BATCH_BYTES)  # validates the page size first
    if batch_bytes is None:
        batch_bytes = auto_batch_bytes(len(nv), threads, page_size)
    per = _batch_pages(page_size, batch_bytes)
    header = DeltaHeader(Mode.PAGE, len(nv), hb.length if hb is not None else 0, page_size, per)
    dv = byte_view(dirty, what="dirty") if dirty is not None else None
    if dv is not None and len(dv) != header.pages:
        raise ConfigError(f"dirty map has {len(dv)} entries; the image has {header.pages} pages")
    span = per * page_size
    bound = _core.hde_batch_bound(per, page_size)

    def region(i: int) -> tuple[int, memoryview, memoryview | None]:
        off = i * span
        part = nv[off:off + span]
        d = dv[i * per:i * per + len(part) // page_size + (1 if len(part) % page_size else 0)] \
            if dv is not None else None
        return i * per, part, d

    t0 = time.perf_counter()
    if index is None and hb is not None and hb.length >= page_size:
        index = _build_index(hb, page_size, threads)
    with _Pool(threads, span) as pool:
        if isinstance(lvl, str):
            decision = _calibrate_pages(pool, header, region, hb, index, page_size, link_bps, bound) \
                if link_bps is not None else levels.offline()
        else:
            decision = levels.fixed(lvl)
        zlevel = _core.HDE_LEVEL_OFF if decision.level is None else decision.level
        pool.reset_counts()  # calibration counted its sample pages; count the real encode only

        def work(i: int) -> bytes:
            first, part, d = region(i)
            out = pool.scratch(bound)
            n = pool.ctx().encode_batch(first, part, hb, index, d, page_size, zlevel, out)
            return bytes(memoryview(out)[:n])

        head = header.pack()
        put(head)
        total = len(head)
        for frame in pool.map(work, header.batches):
            put(frame)
            total += len(frame)
        seconds = time.perf_counter() - t0
        return _page_stats("encode", pool, header, total, seconds, decision)


def _calibrate_pages(pool: _Pool, header: DeltaHeader, region: Callable[[int], Any], hb: _core.HdeBase | None,
                     index: _core.HdeIndex | None, page_size: int, link_bps: float | None,
                     bound: int) -> levels.LevelDecision:
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
        first, part, d = region(i)
        part = part[:limit]
        d = d[:-(-len(part) // page_size)] if d is not None else None
        t = time.perf_counter()
        size = ctx.encode_batch(first, part, hb, index, d, page_size, _core.HDE_LEVEL_OFF, out)
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
        decision = _calibrate_buffer(ctx, nv, threads, link_bps) if link_bps is not None else levels.offline()
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
    def rebuild(pool: _Pool, r: BatchRef, frame: memoryview) -> None:
        pool.ctx().decode_batch(frame, header.page_size, bv if header.has_base else None,
                                out[r.image_offset:r.image_offset + r.image_bytes])

    return _decode_pages("decode", header, dv, refs, nthreads, t0, rebuild)


def _decode_pages(op: str, header: DeltaHeader, dv: memoryview, refs: list[BatchRef], threads: int, t0: float,
                  rebuild: Callable[[_Pool, BatchRef, memoryview], None]) -> HdeStats:
    """Page mode: rebuild(pool, batch, its frame) for every batch, in parallel."""
    with _Pool(min(threads, max(1, len(refs))), header.batch_pages * header.page_size) as pool:
        def work(i: int) -> None:
            r = refs[i]
            rebuild(pool, r, dv[r.frame_offset:r.frame_offset + r.frame_bytes])
        for _ in pool.map(work, len(refs)):
            pass
        return _page_stats(op, pool, header, len(dv), time.perf_counter() - t0, None)


def decode_to_file(delta: Any, base: Any, fd: int, *, threads: int | None = None) -> HdeStats:
    """Rebuild the new image into the file fd (it must already have the new length): each batch is
    rebuilt by the C core a 1 MiB chunk at a time and written with pwrite as it goes, so writing starts
    at once and the bytes are still in cache when the kernel copies them. No mapping of the output:
    faulting in hundreds of thousands of output pages costs more than the writes. Every batch is
    verified, but a bad one may have written part of itself first: write to a temporary file and
    rename it only on success (the CLI does)."""
    dv = byte_view(delta, what="delta")
    header = parse_header(dv)
    bv = byte_view(base, what="base") if base is not None else None
    _check_base(header, bv)
    if header.mode is Mode.BUFFER:
        raise ConfigError("decode_to_file() is for page-mode deltas; decode a buffer-mode delta with "
                          "decode_into() (zstd writes the whole image in one pass)")
    refs = list(iter_batches(header, dv))
    nthreads = threads if threads is not None else default_threads()

    def rebuild(pool: _Pool, r: BatchRef, frame: memoryview) -> None:
        pool.ctx().decode_batch_to_fd(frame, header.page_size, bv if header.has_base else None, r.image_bytes,
                                      fd, r.image_offset)

    return _decode_pages("decode", header, dv, refs, nthreads, time.perf_counter(), rebuild)


def decode(delta: Any, base: Any = None, *, threads: int | None = None) -> tuple[bytearray, HdeStats]:
    """Rebuild the new image as a new bytearray (returned only if every batch verified)."""
    header = read_header(delta)
    out = bytearray(header.new_length)
    stats = decode_into(delta, base, out, threads=threads)
    return out, stats


def apply(delta: Any, target: Any, *, base: Any = None, threads: int | None = None,
          before_batch: Callable[[int, int], None] | None = None) -> HdeStats:
    """Patch target in place: it must already have the new length (resize it first if the image grew)
    and, unless `base` is given, its first base_length bytes hold the base. Each batch is rebuilt in
    scratch and verified before its pages are written, so a corrupt or mismatched batch raises
    ProtocolError and leaves that batch's pages untouched (earlier batches are already applied: the
    caller must resend in full).

    base: a separate read-only copy of the base (same length as the delta's). Pages that moved are then
    read from it; target still needs the base's bytes where pages are unchanged (by the time each
    batch is applied: see before_batch). Without it, batches whose pages moved in from elsewhere
    (format 2) are rebuilt first, into scratch that is held until every other batch has read the base:
    memory for those batches only.

    Page mode: before_batch(offset, size), if given, runs in the worker just before the batch covering
    target[offset:offset + size] is applied, so the caller can fill the target region by region (the
    CLI copies the base file in while other batches are being applied). Without `base`, a delta with
    moved pages asks for the whole base region first."""
    dv = byte_view(delta, what="delta")
    header = parse_header(dv)
    tv = byte_view(target, writable=True, what="target")
    if len(tv) != header.new_length:
        raise ConfigError(f"target has {len(tv)} bytes; the delta rebuilds {header.new_length}: resize "
                          "it first (its first bytes must hold the base)")
    sv = byte_view(base, what="base") if base is not None else None
    if sv is not None:
        _check_base(header, sv)
    if header.mode is Mode.BUFFER:
        # zstd cannot decode onto its own prefix: rebuild beside the target, then copy it in
        if sv is None and header.has_base:
            sv = memoryview(bytes(tv[:header.base_length]))
        rebuilt = bytearray(header.new_length)
        stats = decode_into(dv, sv if header.has_base else None, rebuilt, threads=threads)
        tv[:] = rebuilt
        stats.op = "apply"
        return stats
    refs = list(iter_batches(header, dv))
    t0 = time.perf_counter()
    span = header.batch_pages * header.page_size
    nthreads = threads if threads is not None else default_threads()
    if sv is not None or not header.has_base:
        def rebuild(pool: _Pool, r: BatchRef, frame: memoryview) -> None:
            if before_batch is not None:
                before_batch(r.image_offset, r.image_bytes)
            scratch = memoryview(pool.scratch(span))[:r.image_bytes]
            pool.ctx().decode_batch(frame, header.page_size, sv, scratch,
                                    tv[r.image_offset:r.image_offset + r.image_bytes])
        return _decode_pages("apply", header, dv, refs, nthreads, t0, rebuild)

    # In place: the base is the target itself. A batch reading other regions must read them before
    # their own batch overwrites them: rebuild those first into held scratch, then apply the rest
    # (each reads only its own region), then copy the held ones in.
    bv = tv[:min(header.base_length, len(tv))]
    movers = [r for r in refs if r.reads_outside]
    if movers and before_batch is not None:
        before_batch(0, min(header.base_length, header.new_length))
    held: dict[int, bytearray] = {}
    lock = threading.Lock()

    def rebuild_held(pool: _Pool, r: BatchRef, frame: memoryview) -> None:
        scratch = bytearray(r.image_bytes)
        pool.ctx().decode_batch(frame, header.page_size, bv, scratch)
        with lock:
            held[r.index] = scratch

    def rebuild_in_place(pool: _Pool, r: BatchRef, frame: memoryview) -> None:
        if r.reads_outside:
            return
        if before_batch is not None:
            before_batch(r.image_offset, r.image_bytes)
        scratch = memoryview(pool.scratch(span))[:r.image_bytes]
        pool.ctx().decode_batch(frame, header.page_size, bv, scratch,
                                tv[r.image_offset:r.image_offset + r.image_bytes])

    first = _decode_pages("apply", header, dv, movers, nthreads, t0, rebuild_held) if movers else None
    stats = _decode_pages("apply", header, dv, refs, nthreads, t0, rebuild_in_place)
    for r in movers:
        tv[r.image_offset:r.image_offset + r.image_bytes] = held.pop(r.index)
    if first is not None:
        for k, v in first.pages.items():
            stats.pages[k] = stats.pages.get(k, 0) + v
        stats.patch_runs += first.patch_runs
        stats.literal_bytes += first.literal_bytes
        stats.copy_runs += first.copy_runs
    stats.seconds = time.perf_counter() - t0
    return stats
