"""CRC32C (Castagnoli): the compiled core's hardware implementation, or a table fallback.

The fallback exists for the pure-Python path (DWCP_BACKEND=python) and to cross-check the C one in
tests; at ~10 MB/s it is only fit for headers and control frames."""

from __future__ import annotations

import os

_POLY = 0x82F63B78


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c_py(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    c = crc ^ 0xFFFFFFFF
    table = _TABLE
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


crc32c = crc32c_py
if os.environ.get("DWCP_BACKEND", "c") != "python":
    try:
        from dwcp._core import crc32c as _crc32c_c
    except ImportError:  # compiled core missing: dwcp/__init__ reports it; keep the wire usable
        pass
    else:
        crc32c = _crc32c_c
