"""Control payload codecs: round trips, strict rejection, and fuzzing of every decoder."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, strategies as st

from dwcp.errors import ConfigError, ProtocolError
from dwcp.wire import frames, messages as m
from dwcp.wire.frames import FrameType

_FIRST = "abcdefghijklmnopqrstuvwxyz0123456789"
# Built from characters rather than st.from_regex, which is several times slower to draw.
names = st.builds(lambda a, b: a + b, st.sampled_from(_FIRST),
                  st.text(alphabet=_FIRST + "_.-", max_size=31))
nonce = st.binary(min_size=32, max_size=32)
mac = st.binary(min_size=32, max_size=32)
sid = st.binary(min_size=16, max_size=16)
chunk = st.integers(m.MIN_CHUNK_BYTES, m.MAX_CHUNK_BYTES)
u64 = st.integers(0, (1 << 64) - 1)
text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=200)

hellos = st.builds(
    m.Hello, nonce=nonce, insecure=st.booleans(),
    versions=st.lists(st.integers(1, 255), min_size=1, max_size=16, unique=True).map(tuple),
    streams=st.integers(1, 256), chunk_bytes=chunk,
    checksums=st.lists(names, min_size=1, max_size=8, unique=True).map(tuple),
    features=st.frozensets(names, max_size=32))
challenges = st.builds(
    m.Challenge, nonce=nonce, insecure=st.just(False), version=st.integers(1, 255),
    streams=st.integers(1, 256), chunk_bytes=chunk, checksum=names,
    features=st.frozensets(names, max_size=32), mac=mac)
proofs = st.builds(m.Proof, mac=mac)
welcomes = st.builds(m.Welcome, session_id=sid, mac=mac)
joins = st.builds(m.JoinRequest, session_id=sid, stream_index=st.integers(0, 255), mac=mac)


@st.composite
def xfer_begins(draw: st.DrawFn) -> m.XferBegin:
    kind = draw(st.sampled_from(list(m.XferKind)))
    return m.XferBegin(
        transfer_id=draw(u64), length=draw(u64), chunk_bytes=draw(chunk), kind=kind,
        wrap_bytes=draw(u64) if kind in (m.XferKind.BENCH, m.XferKind.SEGMENT) else 0,
        frame_flags=draw(st.sampled_from([0, int(frames.Flag.COMPRESSED)])),
        name=draw(text),
        mode=draw(st.none() | st.integers(0, 0o7777)) if kind == m.XferKind.FILE else None)


aborts = st.builds(m.Abort, reason=text)
errors = st.builds(m.Error, code=st.sampled_from(list(m.ErrorCode)), reason=text)

CODECS: list[tuple[str, Callable[[Any], bytes], Callable[[bytes], Any], Any]] = [
    ("HELLO", m.encode_hello, m.decode_hello, hellos),
    ("CHALLENGE", m.encode_challenge, lambda b: m.decode_challenge(b)[0], challenges),
    ("PROOF", m.encode_proof, m.decode_proof, proofs),
    ("WELCOME", m.encode_welcome, m.decode_welcome, welcomes),
    ("JOIN", m.encode_join, m.decode_join, joins),
    ("XFER_BEGIN", m.encode_xfer_begin, m.decode_xfer_begin, xfer_begins()),
    ("ABORT", m.encode_abort, m.decode_abort, aborts),
    ("ERROR", m.encode_error, m.decode_error, errors),
]
IDS = [c[0] for c in CODECS]


@pytest.mark.parametrize("name,encode,decode,strategy", CODECS, ids=IDS)
def test_roundtrip(name: str, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any],
                   strategy: Any) -> None:
    @given(strategy)
    def check(msg: Any) -> None:
        raw = encode(msg)
        assert len(raw) <= frames.MAX_CONTROL_BYTES
        assert decode(raw) == msg
    check()


@pytest.mark.parametrize("name,encode,decode,strategy", CODECS, ids=IDS)
def test_fuzz_decoder_arbitrary_bytes(name: str, encode: Callable[[Any], bytes],
                                      decode: Callable[[bytes], Any], strategy: Any) -> None:
    @given(st.binary(max_size=600))
    def check(data: bytes) -> None:
        try:
            decode(data)
        except ProtocolError:
            pass
    check()


@pytest.mark.parametrize("name,encode,decode,strategy", CODECS, ids=IDS)
def test_fuzz_decoder_mutated_valid_payloads(name: str, encode: Callable[[Any], bytes],
                                             decode: Callable[[bytes], Any], strategy: Any) -> None:
    """Start from a valid encoding (version byte right, lengths plausible) so the fuzzer gets past
    the first checks, then flip, cut or extend it."""
    @given(strategy, st.data())
    def check(msg: Any, data: st.DataObject) -> None:
        raw = bytearray(encode(msg))
        for _ in range(data.draw(st.integers(0, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        op = data.draw(st.sampled_from(["keep", "cut", "extend"]))
        if op == "cut":
            raw = raw[:data.draw(st.integers(0, len(raw)))]
        elif op == "extend":
            raw += data.draw(st.binary(min_size=1, max_size=20))
        try:
            decode(bytes(raw))
        except ProtocolError:
            pass
    check()


@pytest.mark.parametrize("name,encode,decode,strategy", CODECS, ids=IDS)
def test_unknown_format_version_is_protocol_error(name: str, encode: Callable[[Any], bytes],
                                                  decode: Callable[[bytes], Any],
                                                  strategy: Any) -> None:
    @given(strategy, st.integers(0, 255).filter(lambda v: v != m.MSG_VERSION))
    def check(msg: Any, version: int) -> None:
        raw = bytes([version]) + encode(msg)[1:]
        with pytest.raises(ProtocolError, match="format version"):
            decode(raw)
    check()


@pytest.mark.parametrize("name,encode,decode,strategy", CODECS, ids=IDS)
def test_trailing_bytes_rejected(name: str, encode: Callable[[Any], bytes],
                                 decode: Callable[[bytes], Any], strategy: Any) -> None:
    @given(strategy)
    def check(msg: Any) -> None:
        with pytest.raises(ProtocolError):
            decode(encode(msg) + b"\x00")
    check()


def test_challenge_body_is_payload_minus_mac() -> None:
    ch = m.Challenge(nonce=bytes(range(32)), insecure=False, version=1, streams=4,
                     chunk_bytes=1 << 20, checksum="xxh3", features=frozenset({"hde"}), mac=b"M" * 32)
    raw = m.encode_challenge(ch)
    decoded, body = m.decode_challenge(raw)
    assert decoded == ch and body == m.encode_challenge_body(ch) == raw[:-32]


def test_insecure_challenge_must_have_zero_mac() -> None:
    ch = m.Challenge(nonce=bytes(32), insecure=True, version=1, streams=4, chunk_bytes=1 << 20,
                     checksum="xxh3", features=frozenset(), mac=b"\x01" * 32)
    with pytest.raises(ProtocolError, match="non-zero mac"):
        m.decode_challenge(m.encode_challenge(ch))


def test_hello_layout_is_as_documented() -> None:
    hello = m.Hello(nonce=bytes(range(32)), insecure=False, versions=(1,), streams=4,
                    chunk_bytes=1 << 20, checksums=("xxh3", "crc32c"), features=frozenset({"hde"}))
    raw = m.encode_hello(hello)
    assert raw[:2] == b"\x01\x00" and raw[2:34] == bytes(range(32))
    assert raw[34:36] == b"\x01\x01"
    assert raw[36:42] == struct.pack("<HI", 4, 1 << 20)
    assert raw[42:] == b"\x02\x04xxh3\x06crc32c\x01\x03hde"


def test_xfer_begin_layout_is_as_documented() -> None:
    x = m.XferBegin(transfer_id=5, length=1000, chunk_bytes=4096, kind=m.XferKind.FILE,
                    name="a/b.bin", mode=0o644)
    raw = m.encode_xfer_begin(x)
    assert len(raw) == 40 + 7
    assert raw[:8] == bytes([1, 1, 1, 0]) + struct.pack("<HH", 0, 7)
    assert raw[8:40] == struct.pack("<IIQQQ", 4096, 0o644, 5, 1000, 0)
    assert raw[40:] == b"a/b.bin"


@pytest.mark.parametrize("kwargs", [
    dict(chunk_bytes=100), dict(kind=m.XferKind.FILE, wrap_bytes=5), dict(frame_flags=1),
    dict(name="x" * 4097), dict(name="a\x00b"), dict(mode=0o644), dict(kind=m.XferKind.FILE, mode=0o10000),
    dict(transfer_id=-1), dict(length=1 << 64),
])
def test_xfer_begin_encode_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = dict(transfer_id=1, length=10, chunk_bytes=4096)
    with pytest.raises(ConfigError):
        m.encode_xfer_begin(m.XferBegin(**{**base, **kwargs}))


def test_xfer_begin_decode_rejects_long_name_before_reading_it() -> None:
    raw = bytearray(m.encode_xfer_begin(m.XferBegin(transfer_id=1, length=1, chunk_bytes=4096)))
    raw[6:8] = struct.pack("<H", 4097)
    with pytest.raises(ProtocolError, match="name length 4097"):
        m.decode_xfer_begin(bytes(raw) + b"x" * 4097)


def test_text_must_be_strict_utf8() -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        m.decode_abort(b"\x01\x02\x00\xff\xfe")
    with pytest.raises(ProtocolError, match="UTF-8"):
        m.decode_abort(b"\x01\x03\x00\xed\xa0\x80")   # a surrogate, which strict UTF-8 forbids


def test_long_reasons_are_cut_at_a_character_boundary() -> None:
    raw = m.encode_abort(m.Abort("é" * 5000))
    assert m.decode_abort(raw).reason == "é" * (m.MAX_REASON_BYTES // 2)


@pytest.mark.parametrize("bad", [
    m.Hello(nonce=bytes(31), insecure=False, versions=(1,), streams=1, chunk_bytes=4096, checksums=("a",)),
    m.Hello(nonce=bytes(32), insecure=False, versions=(), streams=1, chunk_bytes=4096, checksums=("a",)),
    m.Hello(nonce=bytes(32), insecure=False, versions=(1,), streams=0, chunk_bytes=4096, checksums=("a",)),
    m.Hello(nonce=bytes(32), insecure=False, versions=(1,), streams=1, chunk_bytes=4096, checksums=()),
    m.Hello(nonce=bytes(32), insecure=False, versions=(1,), streams=1, chunk_bytes=4096, checksums=("A",)),
    m.Hello(nonce=bytes(32), insecure=False, versions=(1,), streams=1, chunk_bytes=4096,
            checksums=("a", "a")),
])
def test_hello_encode_rejects_bad_values(bad: m.Hello) -> None:
    with pytest.raises(ConfigError):
        m.encode_hello(bad)


def test_control_dispatch() -> None:
    for msg in (m.XferBegin(transfer_id=1, length=2, chunk_bytes=4096), m.Abort("stop"),
                m.Error(m.ErrorCode.MALFORMED, "bad"), m.Close()):
        frame = m.encode_control(msg)
        h = frames.decode_header(frame[:48], frames.MAX_CONTROL_BYTES)
        assert m.decode_control(h, frame[48:]) == msg
    with pytest.raises(ProtocolError, match="unexpected DATA"):
        m.decode_control(frames.Header(type=FrameType.DATA), b"")
    with pytest.raises(ProtocolError):
        m.decode_control(frames.Header(type=FrameType.CLOSE), b"x")


def test_encode_header_out_of_range_is_config_error() -> None:
    with pytest.raises(ConfigError):
        frames.encode_header(frames.Header(type=FrameType.DATA, stream=1 << 16))
