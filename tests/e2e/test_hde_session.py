"""HDE over a session: the delta travels flagged COMPRESSED, the receiver learns it from peek(), and a
BaselineStore-driven exchange keeps the peer's copy equal to the sender's, version after version."""

from __future__ import annotations

import random
from typing import Any

from dwcp.compression import BaselineStore, hde
from tests.conftest import Background


def test_delta_is_flagged_compressed_end_to_end(session_pair: Any, backend: str) -> None:
    rng = random.Random(5)
    base = bytearray(rng.randbytes(1 << 20))
    new = bytearray(base)
    new[4096 * 7 + 10:4096 * 7 + 20] = b"0123456789"
    delta, _ = hde.encode(new, base)
    assert delta is not None
    pair = session_pair(streams=3, backend=backend)

    def receive() -> tuple[bool, bytearray]:
        begin = pair.server.peek(timeout_s=30)
        return begin.compressed, pair.server.recv(timeout_s=30)

    rx = Background(receive)
    pair.client.send(delta, compressed=True)
    compressed, got = rx.result(30)
    assert compressed and bytes(got) == delta
    target = bytearray(base)
    hde.apply(got, target)
    assert target == new

    rx = Background(receive)
    pair.client.send(b"plain bytes")
    compressed, got = rx.result(30)
    assert compressed is False and bytes(got) == b"plain bytes"


def test_versions_through_a_baseline_store(session_pair: Any) -> None:
    rng = random.Random(9)
    pair = session_pair(streams=2)
    store = BaselineStore(8 << 20, segment_bytes=256 << 10)
    image = bytearray(rng.randbytes(2 << 20))
    peer_copy = bytearray()
    for version in range(4):
        for _ in range(50):                       # a few scattered writes per version
            p = rng.randrange(len(image) - 8)
            image[p:p + 8] = rng.randbytes(8)
        delta, stats = store.encode("peer", "image", image)
        rx = Background(lambda: pair.server.recv(timeout_s=30))
        pair.client.send(delta, compressed=True)
        got = rx.result(30)
        header = hde.read_header(got)
        if header.has_base:
            hde.apply(got, peer_copy)
        else:
            peer_copy = hde.decode(got)[0]
        assert peer_copy == image, f"version {version}"
        store.commit("peer", "image", image)
        if version:
            assert stats.pages["unchanged"] > 0 and stats.ratio > 5
