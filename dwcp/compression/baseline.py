"""The baseline store: per peer and image, the version the peer holds, so the next version can be sent as
a delta against it.

    store = BaselineStore(max_bytes=2 << 30)
    delta, stats = store.encode("peer-a", "vm42/ram", ram)      # against what peer-a holds (if anything)
    session.send(delta, compressed=True)
    store.commit("peer-a", "vm42/ram", ram)                     # only once the peer has applied it

Memory is bounded: the store keeps baselines in segments (one encoder batch each) and evicts the least
recently used segments, across all peers and images, when a commit would exceed ``max_bytes``. A missing
segment is encoded without a base -- its pages go as zero or raw pages -- so eviction costs ratio, never
correctness: the delta never refers to bytes the store no longer has. (The peer still holds its full
version; it just isn't asked to use those pages.)

The sender must call :meth:`commit` only after the peer has applied the delta; if the transfer failed,
call :meth:`forget` (the peer's version is then unknown, and the next encode sends every page plainly).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from dwcp.compression import hde
from dwcp.errors import ConfigError

DEFAULT_SEGMENT_BYTES = 16 << 20


class Baseline:
    """One image version as the store holds it: fixed-size segments, any of them possibly evicted."""

    def __init__(self, length: int, segment_bytes: int) -> None:
        self._length = length
        self._segment_bytes = segment_bytes
        self.segments: dict[int, bytearray] = {}

    @property
    def length(self) -> int:
        return self._length

    @property
    def segment_bytes(self) -> int:
        return self._segment_bytes

    def segment(self, offset: int, size: int) -> memoryview | None:
        if offset % self._segment_bytes or offset >= self._length:
            return None
        seg = self.segments.get(offset // self._segment_bytes)
        return memoryview(seg)[:size] if seg is not None else None

    @property
    def held_bytes(self) -> int:
        return sum(len(s) for s in self.segments.values())


@dataclass(frozen=True)
class StoreStats:
    held_bytes: int
    max_bytes: int
    baselines: int
    segments: int
    evicted_segments: int


class BaselineStore:
    """Versions peers hold, bounded to max_bytes, evicting least-recently-used segments."""

    def __init__(self, max_bytes: int, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 page_size: int = hde.DEFAULT_PAGE_SIZE) -> None:
        if max_bytes < 0:
            raise ConfigError(f"max_bytes must be >= 0, got {max_bytes}")
        if segment_bytes <= 0 or segment_bytes % page_size:
            raise ConfigError(f"segment_bytes ({segment_bytes}) must be a positive multiple of the page size "
                              f"({page_size})")
        hde._batch_pages(page_size, segment_bytes)  # same bounds as an encoder batch
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.page_size = page_size
        self._baselines: dict[tuple[Hashable, Hashable], Baseline] = {}
        self._lru: OrderedDict[tuple[Hashable, Hashable, int], int] = OrderedDict()  # -> segment bytes
        self._held = 0
        self._evicted = 0
        self._lock = threading.Lock()

    def get(self, peer: Hashable, key: Hashable) -> Baseline | None:
        return self._baselines.get((peer, key))

    def encode(self, peer: Hashable, key: Hashable, new: Any, **kw: Any) -> tuple[bytes, hde.HdeStats]:
        """Encode new against what `peer` holds of `key` (page mode; without a baseline every page goes
        as zero/raw). Keyword arguments go to :func:`dwcp.compression.hde.encode`."""
        kw.setdefault("page_size", self.page_size)
        if kw["page_size"] != self.page_size:
            raise ConfigError(f"this store keeps {self.page_size}-byte pages, not {kw['page_size']}")
        with self._lock:
            base = self._baselines.get((peer, key))
            if base is not None:
                for i in base.segments:
                    self._lru.move_to_end((peer, key, i))
        if base is None:
            kw.setdefault("mode", "page")
            kw.setdefault("batch_bytes", self.segment_bytes)
            delta, stats = hde.encode(new, None, **kw)
        else:
            delta, stats = hde.encode(new, base, **kw)
        assert delta is not None
        return delta, stats

    def commit(self, peer: Hashable, key: Hashable, new: Any) -> None:
        """Record that `peer` now holds `new` for `key` (call after it applied the delta)."""
        nv = memoryview(new).cast("B")
        length = len(nv)
        with self._lock:
            self._drop(peer, key)
            base = Baseline(length, self.segment_bytes)
            self._baselines[(peer, key)] = base
            for i, off in enumerate(range(0, length, self.segment_bytes)):
                size = min(self.segment_bytes, length - off)
                if size > self.max_bytes:
                    self._evicted += 1
                    continue
                self._make_room(size)
                base.segments[i] = bytearray(nv[off:off + size])
                self._lru[(peer, key, i)] = size
                self._held += size

    def forget(self, peer: Hashable, key: Hashable | None = None) -> None:
        """Drop what we know of peer's versions (of one key, or all): after a failed transfer."""
        with self._lock:
            keys = [k for (p, k) in self._baselines if p == peer and (key is None or k == key)]
            for k in keys:
                self._drop(peer, k)

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self._held, self.max_bytes, len(self._baselines), len(self._lru), self._evicted)

    def _drop(self, peer: Hashable, key: Hashable) -> None:
        base = self._baselines.pop((peer, key), None)
        if base is None:
            return
        for i, seg in base.segments.items():
            self._lru.pop((peer, key, i), None)
            self._held -= len(seg)

    def _make_room(self, size: int) -> None:
        while self._held + size > self.max_bytes and self._lru:
            (peer, key, i), n = self._lru.popitem(last=False)
            base = self._baselines.get((peer, key))
            if base is not None and base.segments.pop(i, None) is not None:
                self._held -= n
                self._evicted += 1
