"""Sealed frames' building blocks: known-answer tests against published vectors, the counter rules,
and hypothesis fuzzing of the sealed-frame opener (dwcp._core.FrameSeal runs the engine's C code)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp import ProtocolError
from dwcp._core import FLAG_SEALED, FrameSeal, aead_open, aead_seal, encode_header, hkdf_expand_sha256
from dwcp.errors import E_AUTH

H = bytes.fromhex


@pytest.mark.parametrize("cipher,key,nonce,aad,pt,ct,tag", [
    # McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 1, 2, 13, 14
    ("aes-128-gcm", bytes(16), bytes(12), b"", b"", b"", H("58e2fccefa7e3061367f1d57a4e7455a")),
    ("aes-128-gcm", bytes(16), bytes(12), b"", bytes(16), H("0388dace60b6a392f328c2b971b2fe78"),
     H("ab6e47d42cec13bdf53a67b21257bddf")),
    ("aes-256-gcm", bytes(32), bytes(12), b"", b"", b"", H("530f8afbc74536b9a963b4f1c4cb738b")),
    ("aes-256-gcm", bytes(32), bytes(12), b"", bytes(16), H("cea7403d4d606b6e074ec5d3baf39d18"),
     H("d0d1c8a799996bf0265b98b5d48ab919")),
])
def test_aes_gcm_known_answers(cipher: str, key: bytes, nonce: bytes, aad: bytes, pt: bytes, ct: bytes,
                               tag: bytes) -> None:
    sealed = aead_seal(cipher, key, nonce, aad, pt)
    assert sealed == ct + tag
    assert aead_open(cipher, key, nonce, aad, sealed) == pt


def test_chacha20_poly1305_rfc8439_vector() -> None:
    """RFC 8439 section 2.8.2."""
    key = bytes(range(0x80, 0xA0))
    nonce = H("070000004041424344454647")
    aad = H("50515253c0c1c2c3c4c5c6c7")
    pt = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
          b"sunscreen would be it.")
    sealed = aead_seal("chacha20-poly1305", key, nonce, aad, pt)
    assert sealed[:16] == H("d31a8d34648e60db7b86afbc53ef7ec2")
    assert sealed[-16:] == H("1ae10b594f09e26a7e902ecbd0600691")
    assert aead_open("chacha20-poly1305", key, nonce, aad, sealed) == pt
    with pytest.raises(ProtocolError) as ei:
        aead_open("chacha20-poly1305", key, nonce, aad[:-1] + b"\0", sealed)
    assert ei.value.code == E_AUTH


def test_hkdf_rfc5869_case_1() -> None:
    prk = hmac.new(H("000102030405060708090a0b0c"), bytes([0x0B] * 22), hashlib.sha256).digest()
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    okm = hkdf_expand_sha256(prk, H("f0f1f2f3f4f5f6f7f8f9"), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


SECRET = bytes(range(32))


def _pair(cipher: str = "aes-128-gcm", link: int = 3, rekey_bytes: int = 0) -> tuple[FrameSeal, FrameSeal]:
    return (FrameSeal(cipher, SECRET, sealing=True, direction=0, link=link, rekey_bytes=rekey_bytes),
            FrameSeal(cipher, SECRET, sealing=False, direction=0, link=link, rekey_bytes=rekey_bytes))


def _hdr(length: int, stream: int = 3, tid: int = 7, offset: int = 0) -> bytes:
    return encode_header(1, FLAG_SEALED, stream, length, tid, offset, 0)


@pytest.mark.parametrize("cipher", ["aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"])
def test_sealed_frames_open_in_order_and_never_twice(cipher: str) -> None:
    tx, rx = _pair(cipher)
    frames = [tx.seal(_hdr(len(p)), p) for p in (b"a" * 100, b"", b"z" * 5000)]
    h0, b0 = frames[0]
    assert rx.open(h0, b0) == b"a" * 100
    with pytest.raises(ProtocolError):
        rx.open(h0, b0)  # replay
    with pytest.raises(ProtocolError):
        rx.open(*frames[2])  # frame 1 skipped
    assert rx.open(*frames[1]) == b""
    assert rx.open(*frames[2]) == b"z" * 5000


def test_other_direction_or_link_never_opens() -> None:
    tx, _ = _pair()
    h, b = tx.seal(_hdr(10), b"0123456789")
    for kw in ({"direction": 1, "link": 3}, {"direction": 0, "link": 4}):
        rx = FrameSeal("aes-128-gcm", SECRET, sealing=False, **kw)
        with pytest.raises(ProtocolError):
            rx.open(h, b)


def test_counters_move_to_a_new_epoch_before_the_byte_budget() -> None:
    tx, rx = _pair(rekey_bytes=1000)
    seen = []
    for i in range(10):
        h, b = tx.seal(_hdr(400), bytes([i]) * 400)
        seen.append(int.from_bytes(h[32:40], "little"))
        assert rx.open(h, b) == bytes([i]) * 400
    assert len(set(seen)) == len(seen)
    assert {c >> 32 for c in seen} == {0, 1, 2, 3, 4}  # two 400-byte frames per 1000-byte epoch
    assert tx.rekeys == 4 and rx.rekeys == 4


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=300), pos=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7),
       data=st.data())
def test_any_single_bit_flip_of_a_sealed_frame_fails(payload: bytes, pos: int, bit: int, data: st.DataObject) -> None:
    tx, rx = _pair()
    h, b = tx.seal(_hdr(len(payload)), payload)
    frame = bytearray(h + b)
    pos %= len(frame)
    frame[pos] ^= 1 << bit
    with pytest.raises(ProtocolError):
        rx.open(bytes(frame[:48]), bytes(frame[48:]))
    assert rx.open(h, b) == payload  # the genuine frame still opens: nothing was used up


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(min_size=48, max_size=400))
def test_random_bytes_never_open(junk: bytes) -> None:
    _, rx = _pair()
    with pytest.raises(ProtocolError):
        rx.open(junk[:48], junk[48:])
