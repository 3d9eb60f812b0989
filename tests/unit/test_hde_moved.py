"""HDE format 2: pages found where they moved, the adversaries of page-level delta encoding, the auto
mode's bound, and format 1 deltas still decoding.

Adversaries (each a way real images change that a same-offset page encoder gets wrong): pages
inserted or removed at random page offsets, whole regions moved, byte-shifted (non-page-aligned) data,
all-new data, incompressible data. For every one: decode and in-place apply give back exactly the new
image, and ``mode="auto"`` is never more than 1.05x the smaller of page and buffer mode."""

from __future__ import annotations

import random
import struct

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp import _core
from dwcp.compression import BaselineStore, hde
from dwcp.compression.format import HEADER_BYTES, DeltaHeader, Mode, iter_batches, parse_header
from dwcp.errors import ProtocolError

from .hde_frames import flip_and_reseal, refused_or_exact

PAGE = 512
AUTO_BOUND = 1.05


def memory_like(rng: random.Random, pages: int, page: int = PAGE) -> bytearray:
    """Pages like a process heap: some zero, some random, most structured records that compress."""
    out = bytearray()
    for _ in range(pages):
        r = rng.random()
        if r < 0.1:
            out += bytes(page)
        elif r < 0.3:
            out += rng.randbytes(page)
        else:
            s = bytearray()
            while len(s) < page:
                s += b'{"id":%d,"name":"user:%d","v":%d}' % (rng.randrange(10**6), rng.randrange(500),
                                                              rng.randrange(1000))
            out += s[:page]
    return out


def touch(rng: random.Random, data: bytearray, per_page: float) -> bytearray:
    """A few 8-byte writes (pointers, counters) spread over the image."""
    for _ in range(int(len(data) // PAGE * per_page)):
        p = rng.randrange(len(data) - 8)
        data[p:p + 8] = rng.randbytes(8)
    return data


def adversary(kind: str, rng: random.Random, base: bytes, page: int = PAGE) -> bytes:
    b = bytearray(base)
    pages = len(base) // page
    if kind == "insert_remove":
        for _ in range(rng.randrange(1, 8)):
            at = rng.randrange(len(b) // page + 1) * page
            if rng.random() < 0.5 or len(b) <= 4 * page:
                b[at:at] = memory_like(rng, rng.randrange(1, 4), page)
            else:
                del b[at:at + page * rng.randrange(1, 3)]
        return bytes(touch(rng, b, 0.05))
    if kind == "region_moved":
        q = max(1, pages // 4) * page
        a = rng.randrange(0, max(1, len(b) - q) // page + 1) * page
        region = b[a:a + q]
        del b[a:a + q]
        to = rng.randrange(len(b) // page + 1) * page
        b[to:to] = region
        return bytes(b)
    if kind == "byte_shift":
        at = rng.randrange(len(b))
        return bytes((b[:at] + rng.randbytes(rng.randrange(1, page)) + b[at:])[:len(base)])
    if kind == "all_new":
        return bytes(memory_like(rng, pages, page))
    if kind == "incompressible":
        return rng.randbytes(len(base))
    if kind == "stable":
        return bytes(touch(rng, b, 0.2))
    raise AssertionError(kind)


KINDS = ["insert_remove", "region_moved", "byte_shift", "all_new", "incompressible", "stable"]


def check_round_trips(new: bytes, base: bytes, **kw: object) -> tuple[bytes, hde.HdeStats]:
    kw.setdefault("page_size", PAGE)
    delta, stats = hde.encode(new, base, level=3, **kw)  # type: ignore[arg-type]
    assert delta is not None
    assert hde.decode(delta, base)[0] == new
    if len(new) >= len(base):
        target = bytearray(base) + bytearray(len(new) - len(base))
        hde.apply(delta, target)                   # in place: batches that read elsewhere go first
        assert target == new
        target = bytearray(base) + bytearray(len(new) - len(base))
        hde.apply(delta, target, base=base)        # with a separate copy of the base
        assert target == new
    return delta, stats


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), pages=st.integers(4, 48), kind=st.sampled_from(KINDS),
       batch_pages=st.sampled_from([1, 3, 8, 64]), mode=st.sampled_from(["page", "auto"]))
def test_adversaries_round_trip(seed: int, pages: int, kind: str, batch_pages: int, mode: str) -> None:
    rng = random.Random(seed)
    base = bytes(memory_like(rng, pages))
    new = adversary(kind, rng, base)
    check_round_trips(new, base, mode=mode, batch_bytes=batch_pages * PAGE)


def test_a_shifted_region_costs_a_few_bytes() -> None:
    """One page inserted at the front of 2048 random pages: everything after it is one COPY run per
    batch, so the delta is the new page plus a few bytes, not 2048 raw pages."""
    rng = random.Random(1)
    base = rng.randbytes(2048 * 4096)
    new = rng.randbytes(4096) + base
    delta, stats = check_round_trips(new, base, mode="page", batch_bytes=1 << 20, page_size=4096)
    assert stats.pages["copy"] == 2048 and stats.pages["raw"] == 1
    assert stats.copy_runs <= 2 * stats.batches
    assert len(delta) < 4096 + 100 * stats.batches


def test_a_moved_page_that_also_changed_is_patched_from_where_it_was() -> None:
    rng = random.Random(2)
    base = rng.randbytes(64 * 4096)
    new = bytearray(rng.randbytes(4096) + base)  # all shifted by one page
    for at in (5 * 4096 + 100, 40 * 4096 + 7):   # and two shifted pages changed a little
        new[at:at + 8] = b"CHANGED!"
    delta, stats = check_round_trips(bytes(new), base, mode="page", page_size=4096)
    assert stats.pages["patch_from"] == 2 and stats.pages["raw"] == 1
    assert len(delta) < 4096 + 400


def test_changed_pages_with_no_exact_match_find_their_source_by_quarters() -> None:
    """Every page of a shifted region changed a little (as when every object header in it was
    rewritten): no page matches exactly anywhere, the quarter index still finds each one's source."""
    rng = random.Random(3)
    base = bytearray(rng.randbytes(64 * 4096))
    new = bytearray(base[32 * 4096:] + base[:32 * 4096])   # halves swapped
    for pg in range(64):
        new[pg * 4096 + 3000:pg * 4096 + 3004] = b"\xff\xfe\xfd\xfc"
    delta, stats = check_round_trips(bytes(new), bytes(base), mode="page", page_size=4096)
    assert stats.pages["patch_from"] >= 60
    assert len(delta) < 64 * 30


def test_evicted_baseline_segments_are_never_copied_from() -> None:
    rng = random.Random(4)
    seg = 16 * PAGE
    store = BaselineStore(2 * seg, segment_bytes=seg, page_size=PAGE)
    base = bytes(memory_like(rng, 64))
    store.commit("p", "k", base)                          # only 2 of 4 segments fit
    new = bytes(base[seg:] + base[:seg])                   # rotated by one segment
    delta, stats = store.encode("p", "k", new, level=3)
    held = store.get("p", "k")
    assert held is not None
    assert hde.decode(delta, base)[0] == new
    # what is copied comes only from segments the store still holds: re-encode against exactly those
    assert stats.pages["copy"] <= len(held.segments) * (seg // PAGE)


# ------------------------------------------------------------------------------------------ auto mode

def synthetic_pair(kind: str, seed: int = 7) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    base = bytes(memory_like(rng, 4096, 4096))   # 16 MiB: above the exact threshold, so auto samples
    return base, adversary(kind, rng, base, 4096)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_mode_is_within_bound_of_the_better_mode(kind: str) -> None:
    base, new = synthetic_pair(kind)
    assert len(new) > hde.EXACT_AUTO_BYTES
    sizes = {}
    for mode in ("page", "buffer", "auto"):
        delta, stats = hde.encode(new, base, mode=mode, level=3)
        assert delta is not None
        sizes[mode] = len(delta)
        if mode == "auto":
            auto_stats = stats
    assert sizes["auto"] <= AUTO_BOUND * min(sizes["page"], sizes["buffer"]), (sizes, auto_stats.mode_reason)
    assert auto_stats.mode_reason.startswith(auto_stats.mode) and auto_stats.sample is not None


def test_auto_mode_explains_itself_for_small_inputs() -> None:
    rng = random.Random(8)
    base = bytes(memory_like(rng, 64, 4096))
    _, stats = hde.encode(base[100:] + base[:100], base, level=3)
    assert stats.mode == "buffer" and "whole image" in stats.mode_reason
    _, stats = hde.encode(base, base, level=3)
    assert stats.mode == "page" and "100 % same-offset" in stats.mode_reason


# ---------------------------------------------------------------------------------- format versions

def _v1_page_delta(base: bytes, new: bytes, page: int) -> bytes:
    """A format 1 delta written by hand from the format 1 description in docs/hde.md: one batch, body
    lits_len | runs_len | classes | literals | runs, no refs, flags 0."""
    classes, lits, runs, hashes = bytearray(), bytearray(), bytearray(), bytearray()
    for off in range(0, len(new), page):
        p, b = new[off:off + page], base[off:off + page]
        if p == b:
            classes.append(0)
            continue
        if p == bytes(len(p)):
            classes.append(1)
        else:
            diff = [i for i in range(len(p)) if p[i] != b[i]]
            if len(diff) == 1:
                classes.append(2)
                lits += p[diff[0]:diff[0] + 1]
                runs += bytes([1, diff[0] & 0x7f | 0x80, diff[0] >> 7, 1]) if diff[0] >= 128 else \
                    bytes([1, diff[0], 1])
            else:
                classes.append(3)
                lits += p
        hashes += struct.pack("<Q", _core.xxh3(p))
    body = struct.pack("<II", len(lits), len(runs)) + classes + lits + runs
    stored = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(body))
    frame = bytearray(64)
    npages = len(new) // page
    struct.pack_into("<IBbHQIIQQQQ", frame, 0, 0x42454448, 1, 3, 0, 0, npages, 0, len(body), len(stored),
                     _core.xxh3(stored), _core.xxh3(bytes(hashes)))
    struct.pack_into("<II", frame, 56, _core.crc32c(bytes(frame[:56])), 0)
    head = DeltaHeader(Mode.PAGE, len(new), len(base), page, npages, version=1).pack()
    return head + bytes(frame) + stored


def test_format_1_deltas_still_decode() -> None:
    rng = random.Random(9)
    base = bytes(memory_like(rng, 8))
    new = bytearray(base)
    new[PAGE:2 * PAGE] = bytes(PAGE)
    new[2 * PAGE + 200] ^= 0x55
    new[3 * PAGE:4 * PAGE] = rng.randbytes(PAGE)
    delta = _v1_page_delta(base, bytes(new), PAGE)
    assert parse_header(delta).version == 1
    assert hde.decode(delta, base)[0] == new
    target = bytearray(base)
    hde.apply(delta, target)
    assert target == new


def test_newer_formats_and_misplaced_flags_are_refused_clearly() -> None:
    rng = random.Random(10)
    base = bytes(memory_like(rng, 8))
    delta = _v1_page_delta(base, base[:PAGE] + bytes(PAGE) + base[2 * PAGE:], PAGE)
    head = bytearray(delta[:HEADER_BYTES])
    head[4] = 3
    struct.pack_into("<I", head, HEADER_BYTES - 4, _core.crc32c(bytes(head[:HEADER_BYTES - 4])))
    with pytest.raises(ProtocolError, match="version 3 is not supported.*upgrade"):
        hde.decode(bytes(head) + delta[HEADER_BYTES:], base)
    # a format 1 delta whose batch claims a refs section
    frame = bytearray(delta[HEADER_BYTES:HEADER_BYTES + 64])
    struct.pack_into("<H", frame, 6, _core.HDE_FLAG_REFS)
    struct.pack_into("<I", frame, 56, _core.crc32c(bytes(frame[:56])))
    bad = delta[:HEADER_BYTES] + bytes(frame) + delta[HEADER_BYTES + 64:]
    with pytest.raises(ProtocolError, match="flags"):
        hde.decode(bad, base)


# ------------------------------------------------------------------------------------ fuzzed decoder

@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 8), kind=st.sampled_from(KINDS))
def test_mutated_format_2_bodies_never_rebuild_a_wrong_page(seed: int, flips: int, kind: str) -> None:
    """Bodies with COPY and PATCH_FROM pages and refs, mutated, checksums recomputed: the parser's
    checks and the result checksum stand between them and the output."""
    rng = random.Random(seed)
    base = bytes(memory_like(rng, 12))
    new = adversary(kind, rng, base)[:len(base)]
    new = new + bytes(len(base) - len(new))
    delta, _ = hde.encode(new, base, mode="page", page_size=PAGE, level=None, batch_bytes=len(base))
    assert delta is not None
    ref = next(iter_batches(parse_header(delta), delta))
    frame = bytearray(delta[ref.frame_offset:ref.frame_offset + ref.frame_bytes])
    refused_or_exact(_core.HdeContext(len(base)), flip_and_reseal(frame, rng, flips), PAGE, base, new)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(classes=st.lists(st.integers(0, 6), min_size=1, max_size=6), refs=st.binary(max_size=40),
       lits=st.binary(max_size=64), runs=st.binary(max_size=24), flags=st.sampled_from([1, 3]))
def test_fuzzed_refs_sections(classes: list[int], refs: bytes, lits: bytes, runs: bytes, flags: int) -> None:
    """Well-formed frames around arbitrary classes and refs: references out of the base, runs that
    overrun the batch, counts of zero -- each a ProtocolError, never a read outside the base."""
    pages = len(classes)
    body = struct.pack("<III", len(lits), len(runs), len(refs)) + bytes(classes) + lits + runs + refs
    frame = bytearray(64)
    struct.pack_into("<IBbHQIIQQQQ", frame, 0, 0x42454448, 0, 0, flags, 2, pages, 0, len(body), len(body),
                     _core.xxh3(body), 0)
    struct.pack_into("<II", frame, 56, _core.crc32c(bytes(frame[:56])), 0)
    ctx = _core.HdeContext(1 << 16)
    base = random.Random(len(refs)).randbytes(6 * PAGE)
    try:
        ctx.decode_batch(bytes(frame) + body, PAGE, base, bytearray(pages * PAGE))
    except ProtocolError:
        pass


def test_decode_to_file_writes_the_image_and_reports_write_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(11)
    base = bytes(memory_like(rng, 300, 4096))
    new = adversary("insert_remove", rng, base, 4096)
    new = new[:len(new) // 4096 * 4096]
    delta, _ = hde.encode(new, base, mode="page", level=3, batch_bytes=64 << 10)
    out = tmp_path / "out"
    with open(out, "w+b") as f:
        f.truncate(len(new))
        stats = hde.decode_to_file(delta, base, f.fileno(), threads=2)
    assert out.read_bytes() == new and stats.batches > 4
    with open(out, "rb") as f, pytest.raises(OSError, match="write at offset"):
        hde.decode_to_file(delta, base, f.fileno())        # read-only: every write fails
    bad = bytearray(delta)
    bad[-10] ^= 1
    with open(out, "w+b") as f, pytest.raises(ProtocolError):
        f.truncate(len(new))
        hde.decode_to_file(bytes(bad), base, f.fileno())


@pytest.mark.parametrize("name", ["page", "page_nobase", "buffer"])
def test_deltas_written_by_the_format_1_encoder_still_decode(name: str) -> None:
    """tests/data/hde_v1: deltas written by dwcp at bd3a85c (format 1, before moved pages) from images
    that make_images.py rebuilds; the current decoder and apply() must give them back exactly."""
    import importlib.util
    from pathlib import Path
    here = Path(__file__).resolve().parent.parent / "data" / "hde_v1"
    spec = importlib.util.spec_from_file_location("hde_v1_images", here / "make_images.py")
    assert spec is not None and spec.loader is not None
    images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(images)
    base, new, new_unaligned = images.images()
    delta = (here / f"{name}.hde").read_bytes()
    assert parse_header(delta).version == 1
    want = new_unaligned if name == "buffer" else new
    held = None if name == "page_nobase" else base
    assert hde.decode(delta, held)[0] == want
    target = bytearray(base) + bytearray(len(want) - len(base))
    hde.apply(delta, target)
    assert target == want
