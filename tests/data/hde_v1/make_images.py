"""The images the format 1 fixtures in this directory were made from, rebuilt the same way every time
(SHA-256 in counter mode: no dependence on Python's random module).

The fixtures (*.hde) were written once by the format 1 encoder (dwcp at bd3a85c, before moved pages):
    python make_images.py --write-deltas     # run with that version of dwcp importable
The tests rebuild the images with images() and decode the fixtures with the current decoder."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

PAGE = 4096
PAGES = 32


def stream(seed: bytes, n: int) -> bytes:
    out = bytearray()
    k = 0
    while len(out) < n:
        out += hashlib.sha256(seed + k.to_bytes(8, "little")).digest()
        k += 1
    return bytes(out[:n])


def images() -> tuple[bytes, bytes, bytes]:
    """(base, new, new_unaligned): base of PAGES pages (zero, text-like and random pages); new with some
    pages unchanged, zeroed, patched in a few bytes and replaced; new_unaligned = new plus 1000 bytes."""
    base = bytearray()
    for i in range(PAGES):
        kind = i % 4
        if kind == 0:
            base += bytes(PAGE)
        elif kind == 1:
            line = b"record %d: " % i + stream(b"t%d" % i, 24).hex().encode() + b"\n"
            base += (line * (PAGE // len(line) + 1))[:PAGE]
        else:
            base += stream(b"r%d" % i, PAGE)
    new = bytearray(base)
    for i in range(PAGES):
        off = i * PAGE
        if i % 7 == 3:
            new[off:off + PAGE] = bytes(PAGE)                       # zeroed
        elif i % 5 == 2:
            new[off + 100:off + 108] = b"CHANGED!"                 # a patch
        elif i % 11 == 6:
            new[off:off + PAGE] = stream(b"n%d" % i, PAGE)         # replaced
    return bytes(base), bytes(new), bytes(new) + stream(b"tail", 1000)


def write_deltas() -> None:
    from dwcp.compression import hde
    base, new, new_unaligned = images()
    here = Path(__file__).parent
    for name, args, kw in (("page", (new, base), {"mode": "page", "batch_bytes": 8 * PAGE}),
                           ("page_nobase", (new, None), {"mode": "page", "batch_bytes": 8 * PAGE}),
                           ("buffer", (new_unaligned, base), {"mode": "buffer"})):
        delta, _ = hde.encode(*args, level=3, **kw)
        (here / f"{name}.hde").write_bytes(delta)


if __name__ == "__main__":
    if "--write-deltas" in sys.argv:
        write_deltas()
