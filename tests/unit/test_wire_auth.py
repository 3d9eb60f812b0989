"""Key loading, the MAC constructions, and negotiation rules (pure functions, no sockets)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dwcp.errors import ConfigError, ProtocolError
from dwcp.wire import auth, messages as m
from dwcp.wire.negotiation import (Choice, Offer, ServerPolicy, check_choice, negotiate,
                                   validate_offer, validate_policy)

KEY = b"0123456789abcdef0123456789abcdef"


# ------------------------------------------------------------------------------------------------
# load_key / resolve_key


def test_load_key_from_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DWCP_KEY", raising=False)
    assert auth.load_key(key=KEY) == KEY
    assert auth.load_key(key="pässwörd-long-enough") == "pässwörd-long-enough".encode()
    assert auth.load_key() is None


def test_load_key_from_file_strips_one_newline(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_bytes(KEY + b"\n")
    p.chmod(0o600)
    assert auth.load_key(key_file=p) == KEY
    p.write_bytes(KEY + b"\r\n")
    assert auth.load_key(key_file=str(p)) == KEY
    p.write_bytes(KEY + b"\n\n")
    assert auth.load_key(key_file=p) == KEY + b"\n"


def test_load_key_warns_on_readable_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "k"
    p.write_bytes(KEY)
    p.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="dwcp.wire.auth"):
        assert auth.load_key(key_file=p) == KEY
    assert "chmod 600" in caplog.text


def test_load_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWCP_KEY", "from-the-environment-123")
    assert auth.load_key() == b"from-the-environment-123"
    assert auth.load_key(key=KEY) == KEY          # explicit wins
    monkeypatch.setenv("OTHER", "x" * 20)
    assert auth.load_key(env="OTHER") == b"x" * 20
    assert auth.load_key(env=None) is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(key=b"short"), "at least 16"),
    (dict(key=""), "at least 16"),
    (dict(key=KEY, key_file="/nonexistent"), "only one"),
    (dict(key_file="/nonexistent/key"), "cannot read key file"),
    (dict(key=12345), "bytes or str"),
])
def test_load_key_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        auth.load_key(**kwargs)  # type: ignore[arg-type]


def test_load_key_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        auth.load_key(key_file=tmp_path)


def test_oversized_key_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_bytes(b"k" * (65 << 10))
    with pytest.raises(ConfigError, match="right file"):
        auth.load_key(key_file=p)


def test_short_key_file(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_bytes(b"tiny\n")
    with pytest.raises(ConfigError, match="4 bytes"):
        auth.load_key(key_file=p)


def test_resolve_key() -> None:
    assert auth.resolve_key(KEY, False) == KEY
    assert auth.resolve_key("s" * 16, False) == b"s" * 16
    assert auth.resolve_key(None, True) is None
    with pytest.raises(ConfigError, match=r"no pre-shared key: pass key=\.\.\. / --key-file, or "
                                          r"insecure=True / --insecure to run unauthenticated"):
        auth.resolve_key(None, False)
    with pytest.raises(ConfigError, match="both"):
        auth.resolve_key(KEY, True)


# ------------------------------------------------------------------------------------------------
# MACs and derivation


def test_domain_separation() -> None:
    t = auth.transcript_hash(b"hello", b"challenge")
    assert auth.server_proof(KEY, t) != auth.client_proof(KEY, t)
    assert len(auth.server_proof(KEY, t)) == 32


def test_transcript_is_length_prefixed() -> None:
    assert auth.transcript_hash(b"ab", b"c") != auth.transcript_hash(b"a", b"bc")


def test_session_key_depends_on_key_and_both_nonces() -> None:
    n1, n2, t = bytes(32), b"\x01" * 32, b"t" * 32
    base = auth.derive_session_key(KEY, n1, n2, t)
    assert base == auth.derive_session_key(KEY, n1, n2, t)
    assert base != auth.derive_session_key(KEY[::-1], n1, n2, t)
    assert base != auth.derive_session_key(KEY, n2, n1, t)
    assert base != auth.derive_session_key(KEY, n1, n2, b"u" * 32)
    assert base != auth.derive_session_key(None, n1, n2, t)


def test_join_mac_binds_session_and_index() -> None:
    sk, sid = b"k" * 32, b"s" * 16
    assert auth.join_mac(sk, sid, 0) != auth.join_mac(sk, sid, 1)
    assert auth.join_mac(sk, sid, 0) != auth.join_mac(sk, b"t" * 16, 0)


def test_nonces_are_fresh() -> None:
    assert len({auth.new_nonce() for _ in range(100)}) == 100
    assert len(auth.new_nonce()) == 32 and len(auth.new_session_id()) == 16


# ------------------------------------------------------------------------------------------------
# negotiation


def _hello(**kw: object) -> m.Hello:
    base: dict[str, object] = dict(nonce=bytes(32), insecure=False, versions=(2,), streams=8,
                                   chunk_bytes=1 << 20, checksums=("xxh3", "crc32c"),
                                   features=frozenset())
    base.update(kw)
    return m.Hello(**base)  # type: ignore[arg-type]


def test_negotiate_rules() -> None:
    c = negotiate(_hello(versions=(3, 1, 2), streams=200, chunk_bytes=64 << 20,
                         features=frozenset({"hde", "zerocopy", "tls"})),
                  ServerPolicy(max_streams=32, max_chunk_bytes=4 << 20, versions=(1, 2),
                               features=frozenset({"tls", "hde", "rdma"})))
    assert c == Choice(version=2, streams=32, chunk_bytes=4 << 20, checksum="xxh3",
                       features=frozenset({"hde", "tls"}))


def test_negotiate_checksum_follows_client_order() -> None:
    assert negotiate(_hello(checksums=("crc32c", "xxh3")), ServerPolicy()).checksum == "crc32c"
    assert negotiate(_hello(checksums=("blake3", "crc32c")), ServerPolicy()).checksum == "crc32c"


def test_negotiate_failures() -> None:
    with pytest.raises(ProtocolError, match=r"client speaks \[1, 2\], the server speaks \[5\]") as ei:
        negotiate(_hello(versions=(2, 1)), ServerPolicy(versions=(5,)))
    assert ei.value.code == -2
    with pytest.raises(ProtocolError, match="no common data checksum"):
        negotiate(_hello(checksums=("blake3",)), ServerPolicy())


def test_check_choice() -> None:
    offer = Offer(streams=8, chunk_bytes=1 << 20, features=frozenset({"hde"}))
    ok = Choice(version=2, streams=8, chunk_bytes=1 << 20, checksum="xxh3", features=frozenset({"hde"}))
    check_choice(offer, ok)
    for bad in (Choice(1, 8, 1 << 20, "xxh3", frozenset()), Choice(2, 9, 1 << 20, "xxh3", frozenset()),
                Choice(2, 8, 2 << 20, "xxh3", frozenset()), Choice(2, 8, 1 << 20, "md5", frozenset()),
                Choice(2, 8, 1 << 20, "xxh3", frozenset({"rdma"}))):
        with pytest.raises(ProtocolError, match="outside our offer"):
            check_choice(offer, bad)


@pytest.mark.parametrize("policy", [ServerPolicy(max_streams=0), ServerPolicy(max_streams=257),
                                    ServerPolicy(max_chunk_bytes=1024), ServerPolicy(max_chunk_bytes=65 << 20),
                                    ServerPolicy(checksums=("sha1",)), ServerPolicy(versions=(0,)),
                                    ServerPolicy(features={"x"})])  # type: ignore[arg-type]
def test_validate_policy(policy: ServerPolicy) -> None:
    with pytest.raises(ConfigError):
        validate_policy(policy)


def test_defaults_are_valid() -> None:
    validate_offer(Offer())
    validate_policy(ServerPolicy())


def test_version_1_peers_are_refused_by_name() -> None:
    """Protocol 2 lets control frames travel on data streams; a version 1 peer would misread them, so
    it is refused in the handshake with both lists named, never met mid-session."""
    with pytest.raises(ProtocolError, match=r"client speaks \[1\], the server speaks \[2\]"):
        negotiate(_hello(versions=(1,)), ServerPolicy())
