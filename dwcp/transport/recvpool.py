"""Result buffers for Session.recv(), ready before the data arrives.

A new bytearray of n bytes costs more than receiving into it: ``bytearray(n)`` zero-fills it page by
page, and each of those 4 KiB pages is a fault (256 MiB: ~170 ms here, while 4 streams deliver 256 MiB
in ~110 ms). So recv() takes its result from this pool: a bytearray handed out earlier that nobody
references any more is reused as it is (its pages are already in memory), and a new one is allocated
uninitialised on transparent huge pages (every byte is overwritten by the receive before the caller
sees it).

"Nobody references it" is read off CPython's reference count: the pool's own list entry is the only
reference left. A caller that keeps the bytearray, a memoryview of it or a numpy array over it holds a
reference, so its buffer is never reused under it.
"""

from __future__ import annotations

import sys

from dwcp.errors import ConfigError

#: Below this a plain bytearray is as cheap as any pooling.
POOL_MIN_BYTES = 1 << 20
#: Buffers tracked at most (the oldest is forgotten first; a forgotten buffer is simply the caller's).
POOL_MAX_ENTRIES = 8


def _alloc(n: int) -> bytearray:
    try:
        from dwcp._core import alloc_bytearray
    except ImportError:  # pure-Python installs: zero-filled, the same bytes for the caller
        return bytearray(n)
    return alloc_bytearray(n)


def _set_size(buf: bytearray, n: int) -> None:
    try:
        from dwcp._core import set_bytearray_size
    except ImportError:
        if n < len(buf):
            del buf[n:]
        else:
            buf.extend(bytes(n - len(buf)))
        return
    set_bytearray_size(buf, n)


class RecvPool:
    """Reusable receive buffers of one session; at most ``max_bytes`` of them (0: no pooling)."""

    def __init__(self, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"recv_pool_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._bufs: list[bytearray] = []
        self.reused = 0
        self.allocated = 0

    def _free(self, i: int) -> bool:
        # Two references: the list entry and getrefcount's own argument.
        return sys.getrefcount(self._bufs[i]) == 2

    def take(self, n: int) -> bytearray:
        """A bytearray of exactly n bytes with unspecified contents, to be overwritten entirely."""
        if n < POOL_MIN_BYTES or n > self.max_bytes:
            return _alloc(n) if n >= POOL_MIN_BYTES else bytearray(n)
        best = -1
        for i in range(len(self._bufs)):
            alloc = self._bufs[i].__alloc__()
            # Resizing keeps the memory while n stays within the allocation and above half of it.
            if n < alloc and 2 * n >= alloc and self._free(i):
                if best < 0 or alloc < self._bufs[best].__alloc__():
                    best = i
        if best >= 0:
            buf = self._bufs.pop(best)
            _set_size(buf, n)
            self.reused += 1
        else:
            buf = _alloc(n)
            self.allocated += 1
        self._bufs.append(buf)
        self._trim()
        return buf

    def _trim(self) -> None:
        # Counted without the trailing NUL byte CPython allocates, so two results of half the cap
        # both stay (the common loop `data = s.recv()` holds one while the next arrives).
        total = sum(b.__alloc__() - 1 for b in self._bufs)
        while self._bufs and (len(self._bufs) > POOL_MAX_ENTRIES or total > self.max_bytes):
            total -= self._bufs.pop(0).__alloc__() - 1

    def clear(self) -> None:
        self._bufs.clear()

    def stats(self) -> dict[str, int]:
        return {"buffers": len(self._bufs), "bytes": sum(b.__alloc__() for b in self._bufs),
                "reused": self.reused, "allocated": self.allocated}
