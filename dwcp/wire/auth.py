"""Pre-shared-key authentication: key loading, the handshake transcript, MACs and key derivation.

Design (docs/protocol.md, "Handshake"):

- Both sides contribute a fresh 32-byte random nonce, so every handshake has a transcript no earlier
  handshake had: a recorded HELLO/PROOF replayed to a server meets a new server nonce and its MAC no
  longer verifies.
- The transcript hash covers the exact HELLO payload and the CHALLENGE payload minus its MAC, i.e. both
  nonces, the client's whole offer and the server's whole choice. A man in the middle who edits any
  parameter (a downgrade to an older version or a weaker checksum) breaks both MACs.
- Each MAC uses its own domain label ("server proof", "client proof", "welcome", "join", "session
  key"), so no MAC computed for one purpose is ever valid for another (no reflection of the server's
  proof back to it as a client proof).
- The session key is derived HKDF-style (RFC 5869 extract-then-expand with HMAC-SHA256) from the key and
  both nonces and never leaves the process; data streams prove membership with a MAC under it.
- Every MAC comparison uses hmac.compare_digest (constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct

from dwcp.errors import ConfigError
from dwcp.wire.messages import NONCE_BYTES, SESSION_ID_BYTES

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16
_MAX_KEY_FILE_BYTES = 64 << 10

NO_KEY_MESSAGE = ("no pre-shared key: pass key=... / --key-file, or insecure=True / --insecure to run "
                  "unauthenticated")

# Domain-separation labels. Versioned so a future handshake can never accept a v1 MAC.
LABEL_TRANSCRIPT = b"dwcp v1 transcript\x00"
LABEL_SERVER_PROOF = b"dwcp v1 server proof\x00"
LABEL_CLIENT_PROOF = b"dwcp v1 client proof\x00"
LABEL_SESSION_KEY = b"dwcp v1 session key\x00"
LABEL_WELCOME = b"dwcp v1 welcome\x00"
LABEL_JOIN = b"dwcp join"  # the brief's wording: HMAC(session_key, "dwcp join" | session_id | index)

# Insecure sessions still derive a session key (from the nonces alone) so JOIN is checked the same
# way; it only guards against accidental cross-session joins, not against an attacker.
_INSECURE_KEY = b"dwcp insecure session\x00"


def _to_key_bytes(key: bytes | bytearray | str, source: str) -> bytes:
    if isinstance(key, str):
        raw = key.encode("utf-8")
    elif isinstance(key, (bytes, bytearray)):
        raw = bytes(key)
    else:
        raise ConfigError(f"pre-shared key from {source} must be bytes or str, "
                          f"got {type(key).__name__}")
    if len(raw) < MIN_KEY_BYTES:
        raise ConfigError(f"pre-shared key from {source} is {len(raw)} bytes; use at least "
                          f"{MIN_KEY_BYTES} (e.g. `head -c 32 /dev/urandom > dwcp.key`)")
    return raw


def load_key(key: bytes | str | None = None, key_file: str | os.PathLike[str] | None = None,
             env: str | None = "DWCP_KEY") -> bytes | None:
    """Find the pre-shared key: ``key`` if given, else the contents of ``key_file``, else the
    environment variable ``env``. Returns None when none is configured (the caller then needs
    ``insecure=True``; see :func:`resolve_key`).

    A key file may be binary or text; one trailing newline is stripped because editors add one.
    A file readable by group or others is accepted with a warning (it should be 0600)."""
    if key is not None and key_file is not None:
        raise ConfigError("both key= and key_file= were given; pass only one")
    if key is not None:
        return _to_key_bytes(key, "key=")
    if key_file is not None:
        path = os.fspath(key_file)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read(_MAX_KEY_FILE_BYTES + 1) if stat.S_ISREG(st.st_mode) else b""
        except OSError as e:
            raise ConfigError(f"cannot read key file {path!r}: {e.strerror}") from e
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"key file {path!r} is not a regular file")
        if len(raw) > _MAX_KEY_FILE_BYTES:
            # Never silently use a prefix of what the operator pointed us at.
            raise ConfigError(f"key file {path!r} is over {_MAX_KEY_FILE_BYTES} bytes; is it the "
                              "right file?")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("key file %s is accessible by group/others (mode %o); chmod 600 it",
                        path, stat.S_IMODE(st.st_mode))
        if raw.endswith(b"\r\n"):
            raw = raw[:-2]
        elif raw.endswith(b"\n"):
            raw = raw[:-1]
        return _to_key_bytes(raw, f"key file {path!r}")
    if env:
        value = os.environ.get(env)
        if value:
            return _to_key_bytes(value, f"${env}")
    return None


def resolve_key(key: bytes | str | None, insecure: bool) -> bytes | None:
    """Check one side's auth configuration and return the key to use (None = insecure).

    Refuses to run unauthenticated by accident: no key and not ``insecure`` is a ConfigError, and so
    is a key together with ``insecure=True`` (ambiguous: which did the operator mean?)."""
    if key is None:
        if not insecure:
            raise ConfigError(NO_KEY_MESSAGE)
        return None
    if insecure:
        raise ConfigError("both a pre-shared key and insecure=True were given; drop --insecure to "
                          "authenticate, or drop the key to run unauthenticated")
    return _to_key_bytes(key, "key=")


def new_nonce() -> bytes:
    """32 bytes from the OS CSPRNG."""
    return secrets.token_bytes(NONCE_BYTES)


def new_session_id() -> bytes:
    return secrets.token_bytes(SESSION_ID_BYTES)


def transcript_hash(hello_payload: bytes, challenge_body: bytes, channel_binding: bytes = b"") -> bytes:
    """SHA-256 over the label, then each message with a length prefix (so no two different pairs of
    messages produce the same hashed bytes), then the TLS channel binding when the session binds to
    TLS (its own label and length, so an unbound transcript never equals a bound one)."""
    h = hashlib.sha256(LABEL_TRANSCRIPT)
    for part in (hello_payload, challenge_body):
        h.update(struct.pack("<I", len(part)))
        h.update(part)
    if channel_binding:
        h.update(b"tls-server-end-point\x00" + struct.pack("<I", len(channel_binding)))
        h.update(channel_binding)
    return h.digest()


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def server_proof(key: bytes, transcript: bytes) -> bytes:
    return _mac(key, LABEL_SERVER_PROOF, transcript)


def client_proof(key: bytes, transcript: bytes) -> bytes:
    return _mac(key, LABEL_CLIENT_PROOF, transcript)


def derive_session_key(key: bytes | None, client_nonce: bytes, server_nonce: bytes,
                       transcript: bytes) -> bytes:
    """HKDF-SHA256: extract with salt = client_nonce | server_nonce, expand one block with the
    transcript as context. ``key`` None (insecure) uses a public constant: the result then only
    separates sessions, it authenticates nothing."""
    ikm = key if key is not None else _INSECURE_KEY
    prk = _mac(client_nonce + server_nonce, ikm)
    return _mac(prk, LABEL_SESSION_KEY, transcript, b"\x01")


LABEL_TRAFFIC = b"dwcp v2 traffic secret\x00"


def derive_traffic_secrets(session_key: bytes, client_nonce: bytes, server_nonce: bytes,
                           cipher: str) -> tuple[bytes, bytes]:
    """(client-to-server, server-to-client) secrets for sealed frames: HKDF-SHA256, extract with salt
    = both nonces from the session key, expand once per direction with the cipher's name in the
    context, so no key ever serves two directions or two ciphers. The engine derives a key per link
    and epoch from these (csrc/include/dwcp/aead.h)."""
    prk = _mac(client_nonce + server_nonce, session_key)
    name = cipher.encode("ascii")
    return (_mac(prk, LABEL_TRAFFIC, b"c2s\x00", name, b"\x01"),
            _mac(prk, LABEL_TRAFFIC, b"s2c\x00", name, b"\x01"))


def welcome_mac(session_key: bytes, transcript: bytes, session_id: bytes) -> bytes:
    """Key confirmation: proves the server derived the same session key and binds the session id."""
    return _mac(session_key, LABEL_WELCOME, transcript, session_id)


def join_mac(session_key: bytes, session_id: bytes, stream_index: int) -> bytes:
    """The data-stream token: HMAC(session_key, "dwcp join" | session_id | u16le stream_index)."""
    return _mac(session_key, LABEL_JOIN, session_id, struct.pack("<H", stream_index))


def macs_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison (never ``==`` on secrets: it leaks the length of the common prefix)."""
    return hmac.compare_digest(a, b)
