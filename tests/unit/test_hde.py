"""HDE: kernels, round trips (hypothesis), the framed format's checks, and a fuzzed decoder.

The decoder contract under test: for any input it either rebuilds exactly the encoded image or raises a
DWCPError subclass (ProtocolError for bad deltas) -- never a crash, never a wrong page."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dwcp import _core
from dwcp.compression import BaselineStore, hde
from dwcp.compression.format import HEADER_BYTES, PageClass, iter_batches, parse_header
from dwcp.errors import ConfigError, DWCPError, ProtocolError

from .hde_frames import flip_and_reseal, refused_or_exact

PAGE = 512  # the smallest page keeps hypothesis examples small; 4096 is covered by fixed tests


def mutate(base: bytes, rng: random.Random, page: int, new_len: int) -> bytearray:
    """A new version of base: per page unchanged, zeroed, a few bytes changed, or replaced."""
    new = bytearray(base[:new_len]) + bytearray(max(0, new_len - len(base)))
    for off in range(0, new_len, page):
        n = min(page, new_len - off)
        kind = rng.randrange(6)
        if kind == 1:
            new[off:off + n] = bytes(n)
        elif kind == 2:
            for _ in range(rng.randrange(1, 6)):
                p = off + rng.randrange(n)
                new[p] = rng.randrange(256)
        elif kind == 3:
            new[off:off + n] = rng.randbytes(n)
        elif kind == 4:  # a text-like run in the middle
            a = off + rng.randrange(n)
            b = min(off + n, a + rng.randrange(1, 64))
            new[a:b] = (b"key:%d;" % rng.randrange(10**6) * 64)[:b - a]
    return new


def image(rng: random.Random, pages: int, page: int, tail: int = 0) -> bytes:
    out = bytearray()
    for _ in range(pages):
        k = rng.randrange(3)
        out += bytes(page) if k == 0 else rng.randbytes(page) if k == 1 else (b"abc%d " % rng.randrange(99) * page)[:page]
    return bytes(out + rng.randbytes(tail))


# ------------------------------------------------------------------------------------------- kernels

def test_zero_and_classify_kernels() -> None:
    assert _core.hde_is_zero(bytes(4096))
    assert _core.hde_is_zero(b"")
    for i in (0, 63, 64, 4095):
        page = bytearray(4096)
        page[i] = 1
        assert not _core.hde_is_zero(page)
    base = os.urandom(4096)
    assert _core.hde_classify(base, base) == PageClass.UNCHANGED
    assert _core.hde_classify(bytes(4096), base) == PageClass.ZERO
    assert _core.hde_classify(os.urandom(4096), base) == PageClass.PATCH
    assert _core.hde_classify(os.urandom(4096), None) == PageClass.RAW
    with pytest.raises(ConfigError):
        _core.hde_classify(bytes(10), bytes(11))


def test_page_classes_are_counted() -> None:
    base = bytearray(os.urandom(8 * 4096))
    new = bytearray(base)
    new[4096:8192] = bytes(4096)             # zero
    new[8192 + 100:8192 + 108] = b"ABCDEFGH"  # patch, one run
    new[12288:16384] = os.urandom(4096)      # dense change: raw (a patch would not be smaller)
    delta, stats = hde.encode(new, base, level=3)
    assert stats.pages == {"unchanged": 5, "zero": 1, "copy": 0, "patch": 1, "patch_from": 0, "raw": 1}
    assert stats.patch_runs == 1
    assert stats.literal_bytes == 8 + 4096
    assert hde.decode(delta, base)[0] == new


def test_many_pages_at_4096_with_partial_tail() -> None:
    rng = random.Random(7)
    base = image(rng, 300, 4096)
    new = mutate(base, rng, 4096, len(base) + 1000)
    for mode in ("page", "buffer"):
        delta, _ = hde.encode(new, base, mode=mode, batch_bytes=64 << 10)
        out, _ = hde.decode(delta, base)
        assert out == new


# --------------------------------------------------------------------------------------- round trips

@settings(suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), pages=st.integers(0, 24), tail=st.integers(0, PAGE - 1),
       grow=st.integers(-3, 3), level=st.sampled_from([None, 1, 3, "auto"]), threads=st.sampled_from([1, 2]),
       batch_pages=st.integers(1, 9), with_base=st.booleans())
def test_page_mode_round_trip(seed: int, pages: int, tail: int, grow: int, level: object, threads: int,
                              batch_pages: int, with_base: bool) -> None:
    rng = random.Random(seed)
    base = image(rng, pages, PAGE, tail)
    new_len = max(0, len(base) + grow * PAGE + rng.randrange(-tail, PAGE) if len(base) else rng.randrange(4 * PAGE))
    new = mutate(base, rng, PAGE, new_len)
    assume(len(new) > 0)
    b = base if with_base and base else None
    delta, stats = hde.encode(new, b, mode="page", page_size=PAGE, level=level,  # type: ignore[arg-type]
                              threads=threads, batch_bytes=batch_pages * PAGE)
    assert stats.output_bytes == len(delta)
    assert sum(stats.pages.values()) == -(-len(new) // PAGE)
    out, _ = hde.decode(delta, b, threads=threads)
    assert out == new
    if b is not None:  # in place: the target holds the base, resized to the new length
        target = bytearray(base[:len(new)]) + bytearray(max(0, len(new) - len(base)))
        hde.apply(delta, target, threads=threads)
        assert target == new


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(0, 20000), level=st.sampled_from([None, 1, 3, "auto"]),
       with_base=st.booleans())
def test_buffer_mode_round_trip(seed: int, size: int, level: object, with_base: bool) -> None:
    rng = random.Random(seed)
    base = rng.randbytes(size)
    new = bytearray(base)
    cut = rng.randrange(len(new) + 1)
    new[cut:cut] = rng.randbytes(rng.randrange(100))  # an insertion shifts everything after it
    b = base if with_base else None
    delta, _ = hde.encode(new, b, mode="buffer", level=level)  # type: ignore[arg-type]
    out, _ = hde.decode(delta, b)
    assert out == new
    if with_base and len(new) >= len(base):
        # buffer-mode apply needs the whole base in the target (resized to the new length)
        target = bytearray(base) + bytearray(len(new) - len(base))
        hde.apply(delta, target)
        assert target == new


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), pages=st.integers(1, 20))
def test_dirty_map_is_trusted_and_clean_pages_cost_nothing(seed: int, pages: int) -> None:
    rng = random.Random(seed)
    base = image(rng, pages, PAGE)
    new = mutate(base, rng, PAGE, len(base))
    dirty = bytes(int(new[i * PAGE:(i + 1) * PAGE] != base[i * PAGE:(i + 1) * PAGE]) for i in range(pages))
    delta, stats = hde.encode(new, base, page_size=PAGE, dirty=dirty, batch_bytes=4 * PAGE)
    assert stats.pages["unchanged"] >= dirty.count(0)
    assert hde.decode(delta, base)[0] == new


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), budget_segments=st.integers(0, 6), versions=st.integers(2, 4))
def test_baseline_store_evictions_fall_back_to_plain_pages(seed: int, budget_segments: int,
                                                           versions: int) -> None:
    rng = random.Random(seed)
    seg = 4 * PAGE
    store = BaselineStore(budget_segments * seg, segment_bytes=seg, page_size=PAGE)
    peers = {"a": bytearray(), "b": bytearray()}       # what each peer really holds
    images = {p: image(rng, rng.randrange(1, 16), PAGE) for p in peers}
    for _ in range(versions):
        for p in peers:
            new = mutate(images[p], rng, PAGE, len(images[p]))
            delta, _ = store.encode(p, "img", new, level=1)
            # the peer applies it to what it holds (a fresh peer holds nothing: the delta has no base)
            header = hde.read_header(delta)
            held = bytes(peers[p]) if header.has_base else None
            out, _ = hde.decode(delta, held)
            assert out == new
            peers[p] = out
            store.commit(p, "img", new)
            images[p] = bytes(new)
        s = store.stats()
        assert s.held_bytes <= s.max_bytes


def test_baseline_store_forget_and_limits() -> None:
    store = BaselineStore(1 << 20, segment_bytes=64 << 10)
    a = os.urandom(256 << 10)
    store.commit("p", "k", a)
    assert store.stats().held_bytes == len(a)
    b = bytearray(a)
    b[0] ^= 1
    delta, stats = store.encode("p", "k", b)
    assert stats.pages["patch"] == 1 and hde.decode(delta, a)[0] == b
    store.forget("p")
    assert store.stats().held_bytes == 0 and store.get("p", "k") is None
    with pytest.raises(ConfigError):
        BaselineStore(1 << 20, segment_bytes=1000)


# ---------------------------------------------------------------------------------- format checking

def small_delta(mode: str = "page") -> tuple[bytes, bytes, bytes]:
    rng = random.Random(3)
    base = image(rng, 12, PAGE)
    new = bytes(mutate(base, rng, PAGE, len(base)))
    delta, _ = hde.encode(new, base, mode=mode, page_size=PAGE, level=3, batch_bytes=4 * PAGE)
    assert delta is not None
    return base, new, delta


def test_header_and_batches_are_walked_in_order() -> None:
    base, new, delta = small_delta()
    h = parse_header(delta)
    assert (h.new_length, h.base_length, h.page_size, h.batch_pages, h.batches) == (len(new), len(base), PAGE, 4, 3)
    refs = list(iter_batches(h, delta))
    assert [r.image_offset for r in refs] == [0, 4 * PAGE, 8 * PAGE]
    assert refs[-1].frame_offset + refs[-1].frame_bytes == len(delta)


def test_wrong_base_is_a_protocol_error_not_a_wrong_page() -> None:
    base, new, delta = small_delta()
    other = bytearray(base)
    for off in range(0, len(other), PAGE):  # every page differs from the real base
        other[off + 7] ^= 0x5A
    with pytest.raises(ProtocolError, match="base is not the version"):
        hde.decode(delta, bytes(other))
    with pytest.raises(ProtocolError, match="base of"):
        hde.decode(delta, base[:-PAGE])
    with pytest.raises(ConfigError, match="pass that base"):
        hde.decode(delta, None)


def test_apply_leaves_a_bad_batch_untouched() -> None:
    base, new, delta = small_delta()
    refs = list(iter_batches(parse_header(delta), delta))
    bad = bytearray(delta)
    last = refs[-1]
    bad[last.frame_offset + 64 + 3] ^= 0xFF  # inside the stored bytes of the last batch
    target = bytearray(base)
    with pytest.raises(ProtocolError, match="XXH3"):
        hde.apply(bytes(bad), target, threads=1)
    assert target[last.image_offset:] == base[last.image_offset:]


@pytest.mark.parametrize("mode", ["page", "buffer"])
def test_every_truncation_is_a_protocol_error(mode: str) -> None:
    base, new, delta = small_delta(mode)
    for n in range(len(delta)):
        with pytest.raises(ProtocolError):
            hde.decode(delta[:n], base)
    with pytest.raises(ProtocolError, match="after its last batch"):
        hde.decode(delta + b"\0", base)


@pytest.mark.parametrize("mode", ["page", "buffer"])
def test_every_single_bit_flip_is_caught(mode: str) -> None:
    base, new, delta = small_delta(mode)
    rng = random.Random(11)
    positions = list(range(min(len(delta), 256))) + rng.sample(range(len(delta)), min(len(delta), 300))
    for pos in positions:
        bad = bytearray(delta)
        bad[pos] ^= 1 << rng.randrange(8)
        try:
            out, _ = hde.decode(bytes(bad), base)
        except ProtocolError:
            continue
        except ConfigError:  # a flip in the header's lengths may ask for a base the caller lacks
            continue
        assert out == new, f"bit flip at {pos} produced a wrong image"


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), base=st.sampled_from([None, bytes(PAGE * 4), os.urandom(PAGE * 4)]))
def test_fuzzed_decoder_raises_only_clear_errors(data: bytes, base: bytes | None) -> None:
    for blob in (data, _valid_header() + data):
        try:
            hde.decode(blob, base)
        except DWCPError:
            pass


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(min_size=8, max_size=400), pages=st.integers(1, 4), codec=st.sampled_from([0, 1]))
def test_fuzzed_batch_bodies_with_valid_frames(body: bytes, pages: int, codec: int) -> None:
    """Frames whose header and checksums are right but whose body is arbitrary: the body parser's own
    checks must hold (classes, run lengths, section sizes)."""
    import zstandard
    stored = body if codec == 0 else zstandard.ZstdCompressor(write_content_size=True).compress(body)
    frame = bytearray(64)
    struct.pack_into("<IBbHQIIQQQQ", frame, 0, 0x42454448, codec, 0, 0, 0, pages, 0, len(body), len(stored),
                     _core.xxh3(stored), 0)
    struct.pack_into("<II", frame, 56, _core.crc32c(bytes(frame[:56])), 0)
    ctx = _core.HdeContext(1 << 16)
    base = os.urandom(pages * PAGE)
    dst = bytearray(pages * PAGE)
    try:
        ctx.decode_batch(bytes(frame) + stored, PAGE, base, dst)
    except ProtocolError:
        pass


def _hb(base: bytes) -> _core.HdeBase:
    return _core.HdeBase([base], len(base), len(base))


def _valid_header() -> bytes:
    from dwcp.compression.format import DeltaHeader, Mode
    return DeltaHeader(Mode.PAGE, PAGE * 4, PAGE * 4, PAGE, 2).pack()


def test_header_rejections() -> None:
    _, _, delta = small_delta()
    with pytest.raises(ProtocolError, match="not an HDE delta"):
        hde.decode(b"XXXX" + delta[4:], None)
    bad = bytearray(delta)
    bad[4] = 9
    with pytest.raises(ProtocolError, match="CRC32C"):
        hde.decode(bytes(bad), None)
    with pytest.raises(ProtocolError, match="too short"):
        hde.decode(delta[:HEADER_BYTES - 1], None)


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="page size"):
        hde.encode(bytes(8192), None, mode="page", page_size=1000)
    with pytest.raises(ConfigError, match="level"):
        hde.encode(b"x", None, level="fast")
    with pytest.raises(ConfigError, match="mode"):
        hde.encode(b"x", None, mode="zip")
    with pytest.raises(ConfigError, match="dirty map"):
        hde.encode(bytes(8192), bytes(8192), mode="page", dirty=b"\1")
    base, _, delta = small_delta()
    with pytest.raises(ConfigError, match="destination has"):
        hde.decode_into(delta, base, bytearray(5))


def test_decode_never_reads_past_a_short_base() -> None:
    """A base shorter than a page that needs it: a clear error, not an out-of-bounds read."""
    ctx = _core.HdeContext(1 << 16)
    base = os.urandom(2 * PAGE)
    new = bytearray(base)
    new[PAGE + 5] ^= 1
    out = bytearray(_core.hde_batch_bound(2, PAGE))
    n = ctx.encode_batch(0, new, _hb(base), None, None, PAGE, 3, out)
    with pytest.raises(ProtocolError, match="base bytes"):
        ctx.decode_batch(bytes(out[:n]), PAGE, base[:PAGE], bytearray(2 * PAGE))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 8))
def test_mutated_bodies_with_recomputed_checksums(seed: int, flips: int) -> None:
    """A valid stored body, mutated, with its stored checksum and header CRC recomputed: only the body
    parser and the rebuilt-page checksum stand between it and the output. Never a wrong page."""
    rng = random.Random(seed)
    base = image(rng, 6, PAGE)
    new = bytes(mutate(base, rng, PAGE, len(base)))
    ctx = _core.HdeContext(1 << 16)
    out = bytearray(_core.hde_batch_bound(6, PAGE))
    n = ctx.encode_batch(0, new, _hb(base), None, None, PAGE, _core.HDE_LEVEL_OFF, out)
    refused_or_exact(ctx, flip_and_reseal(bytearray(out[:n]), rng, flips), PAGE, base, new)
