"""The compiled frame codec and checksums against the Python reference (dwcp.wire.frames)."""

from __future__ import annotations

import os
import struct

import pytest
import xxhash
from hypothesis import given, strategies as st

from dwcp import _core
from dwcp.errors import ConfigError, ProtocolError
from dwcp.wire import _crc32c, frames
from dwcp.wire.frames import Flag, FrameType, Header

_HEAD = struct.Struct("<IBBHHHIQQQ")


def test_crc32c_known_vectors() -> None:
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(b"") == 0
    assert _core.crc32c(bytes(32)) == 0x8A9136AA
    assert _core.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert _core._crc32c_sw(b"123456789") == 0xE3069283


def test_features_report() -> None:
    f = _core.features()
    assert set(f) >= {"crc32c_hw", "xxh3", "zerocopy", "debug_counters"}
    assert f["xxh3"] is True
    assert all(isinstance(v, bool) for v in f.values())
    if not f["debug_counters"]:
        with pytest.raises(Exception, match="DWCP_DEBUG=1"):
            _core.debug_counters()


# Lengths around the 3-lane block sizes (3*256 and 3*8192 bytes) of the hardware path.
_EDGE_LENGTHS = [0, 1, 7, 8, 9, 767, 768, 769, 24575, 24576, 24577, 3 * 24576 + 5, 1 << 20]


@pytest.mark.parametrize("length", _EDGE_LENGTHS)
@pytest.mark.parametrize("misalign", [0, 1, 5])
def test_crc32c_hw_matches_table_and_python(length: int, misalign: int) -> None:
    data = os.urandom(length + misalign)
    view = memoryview(data)[misalign:]
    assert _core.crc32c(view) == _core._crc32c_sw(view)
    if length <= 4096:
        assert _core.crc32c(view) == _crc32c.crc32c_py(view)


@given(st.binary(max_size=5000), st.integers(0, 0xFFFFFFFF), st.integers(0, 5000))
def test_crc32c_incremental(data: bytes, seed: int, cut: int) -> None:
    cut = min(cut, len(data))
    whole = _core.crc32c(data, seed)
    assert _core.crc32c(data[cut:], _core.crc32c(data[:cut], seed)) == whole
    assert whole == _core._crc32c_sw(data, seed)


@given(st.binary(max_size=4096))
def test_xxh3_and_payload_checksum(data: bytes) -> None:
    assert _core.xxh3(data) == xxhash.xxh3_64_intdigest(data)
    assert _core.payload_checksum(Flag.CSUM_XXH3, data) == xxhash.xxh3_64_intdigest(data)
    assert _core.payload_checksum(Flag.CSUM_CRC32C, data) == _crc32c.crc32c_py(data)
    assert _core.payload_checksum(0, data) == 0
    assert _core.payload_checksum(Flag.COMPRESSED, data) == 0
    assert _core.payload_checksum(int(Flag.CSUM_XXH3 | Flag.COMPRESSED), data) == _core.xxh3(data)


def test_checksums_accept_buffers() -> None:
    np = pytest.importorskip("numpy")
    arr = np.arange(100000, dtype=np.uint32)
    raw = arr.tobytes()
    assert _core.xxh3(arr) == _core.xxh3(raw) == _core.xxh3(bytearray(raw)) == _core.xxh3(memoryview(raw))
    assert _core.crc32c(arr) == _core.crc32c(raw)
    with pytest.raises(ConfigError, match="C-contiguous"):
        _core.crc32c(arr[::2])
    with pytest.raises(ConfigError):
        _core.xxh3("text")  # type: ignore[arg-type]


_fields = st.fixed_dictionaries({
    "type": st.sampled_from([int(t) for t in FrameType]),
    "flags": st.sampled_from([0, 1, 2, 4, 5, 6]),
    "stream": st.integers(0, 0xFFFF),
    "length": st.integers(0, 0xFFFFFFFF),
    "transfer_id": st.integers(0, 2**64 - 1),
    "offset": st.integers(0, 2**64 - 1),
    "checksum": st.integers(0, 2**64 - 1),
})


@given(_fields)
def test_encode_matches_python_and_roundtrips(f: dict[str, int]) -> None:
    raw = _core.encode_header(f["type"], f["flags"], f["stream"], f["length"], f["transfer_id"],
                              f["offset"], f["checksum"])
    assert raw == frames.encode_header(Header(**f))
    got = _core.decode_header(raw, 0xFFFFFFFF)
    assert got == (1, f["type"], f["flags"], f["stream"], f["length"], f["transfer_id"], f["offset"],
                   f["checksum"])


def _outcome_py(data: bytes, max_payload: int) -> tuple[str, object]:
    try:
        h = frames.decode_header(data, max_payload)
    except ProtocolError as e:
        return ("error", e.code)
    return ("ok", (h.version, h.type, h.flags, h.stream, h.length, h.transfer_id, h.offset,
                   h.checksum))


def _outcome_c(data: bytes, max_payload: int) -> tuple[str, object]:
    try:
        return ("ok", _core.decode_header(data, max_payload))
    except ProtocolError as e:
        return ("error", e.code)


@given(st.binary(min_size=48, max_size=48), st.integers(0, 0xFFFFFFFF))
def test_decoders_agree_on_arbitrary_bytes(data: bytes, max_payload: int) -> None:
    assert _outcome_c(data, max_payload) == _outcome_py(data, max_payload)


# Mostly-valid headers with one or more fields bent: random bytes almost never get past the magic and
# the header CRC, so this is what exercises the later checks and their order.
_bent = st.fixed_dictionaries({
    "magic": st.sampled_from([frames.MAGIC, frames.MAGIC, frames.MAGIC, 0x50435745, 0]),
    "version": st.sampled_from([1, 1, 1, 0, 2, 255]),
    "type": st.integers(0, 30),
    "flags": st.integers(0, 15) | st.integers(0, 0xFFFF),
    "stream": st.integers(0, 0xFFFF),
    "reserved0": st.sampled_from([0, 0, 0, 1, 0x8000]),
    "length": st.integers(0, 70 << 20) | st.integers(0, 0xFFFFFFFF),
    "transfer_id": st.integers(0, 2**64 - 1),
    "offset": st.integers(0, 2**64 - 1),
    "checksum": st.integers(0, 2**64 - 1),
    "crc_ok": st.sampled_from([True, True, True, False]),
    "reserved1": st.sampled_from([0, 0, 0, 1]),
    "max_payload": st.sampled_from([0, frames.MAX_CONTROL_BYTES, frames.MAX_CHUNK_BYTES, 0xFFFFFFFF]),
})


@given(_bent)
def test_decoders_agree_on_bent_headers(h: dict[str, int]) -> None:
    head = _HEAD.pack(h["magic"], h["version"], h["type"], h["flags"], h["stream"], h["reserved0"],
                      h["length"], h["transfer_id"], h["offset"], h["checksum"])
    crc = _crc32c.crc32c_py(head) ^ (0 if h["crc_ok"] else 1)
    data = head + struct.pack("<II", crc, h["reserved1"])
    assert _outcome_c(data, h["max_payload"]) == _outcome_py(data, h["max_payload"])


def test_decode_error_codes_and_order() -> None:
    good = _core.encode_header(FrameType.DATA, Flag.CSUM_XXH3, 3, 100, 9, 0, 1)

    def bent(off: int, value: bytes, fix_crc: bool = True) -> bytes:
        b = bytearray(good)
        b[off:off + len(value)] = value
        if fix_crc:
            b[40:44] = struct.pack("<I", _core.crc32c(bytes(b[:40])))
        return bytes(b)

    cases = {
        bent(0, b"XXXX"): -1,
        bent(4, b"\x02", fix_crc=False): -6,  # the header CRC is checked before the version
        bent(4, b"\x02"): -2,
        bent(10, b"\x01"): -5,
        bent(44, b"\x01", fix_crc=False): -5,
        bent(5, b"\x06"): -3,
        bent(6, b"\x10"): -4,
        bent(6, b"\x03"): -4,
        bent(6, b"\x0a"): -4,  # SEALED never comes with a checksum bit
    }
    for data, code in cases.items():
        with pytest.raises(ProtocolError) as ei:
            _core.decode_header(data, 1 << 20)
        assert ei.value.code == code
    with pytest.raises(ProtocolError) as ei:
        _core.decode_header(good, 99)
    assert ei.value.code == -7
    with pytest.raises(ProtocolError) as ei:
        _core.decode_header(good[:47], 1 << 20)
    assert ei.value.code == -7


def test_encode_rejects_out_of_range_fields() -> None:
    with pytest.raises(ConfigError, match="stream"):
        _core.encode_header(1, 0, 1 << 16, 0, 0, 0, 0)
    with pytest.raises(ConfigError, match="offset"):
        _core.encode_header(1, 0, 0, 0, 0, -1, 0)
    with pytest.raises(ConfigError, match="type"):
        _core.encode_header("DATA", 0, 0, 0, 0, 0, 0)  # type: ignore[arg-type]
