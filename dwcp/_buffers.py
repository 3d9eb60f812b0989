"""One way to turn a caller's buffer into a flat byte view, for every layer that takes buffers
(transport sends and receives, HDE encode/decode)."""

from __future__ import annotations

from typing import Any

from dwcp.errors import ConfigError


def byte_view(buffer: Any, *, writable: bool = False, what: str = "buffer") -> memoryview:
    """A flat, C-contiguous byte view of any buffer-protocol object (bytes, bytearray, memoryview,
    numpy array, mmap). `what` names the argument in the error. Intermediate views are released on
    every path, so a rejected mmap or bytearray is not left pinned."""
    try:
        mv = memoryview(buffer)
    except TypeError:
        raise ConfigError(f"{what} must be a buffer-protocol object (bytes, bytearray, memoryview, numpy "
                          f"array, mmap), got {type(buffer).__name__}") from None
    if not mv.c_contiguous:
        mv.release()
        raise ConfigError(f"{what} is not C-contiguous; pass a contiguous copy "
                          "(e.g. numpy.ascontiguousarray)")
    if writable and mv.readonly:
        mv.release()
        raise ConfigError(f"{what} must be writable (bytearray, numpy array, writable mmap)")
    if mv.format == "B" and mv.ndim == 1:
        return mv
    flat = mv.cast("B")
    mv.release()
    return flat
