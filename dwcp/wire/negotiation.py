"""Version and feature negotiation: what the client offers, what the server allows, what they agree on.

Pure functions over the decoded HELLO/CHALLENGE; no I/O and no cryptography (handshake.py binds the
result into the authenticated transcript, so a man in the middle cannot downgrade it).

Rules (docs/protocol.md, "Handshake"):
- the highest protocol version both sides list wins;
- features are the intersection of both sets;
- the data protection is the first entry of the client's ordered list that the server supports: a
  checksum name (plaintext frames) or a cipher name (sealed frames, docs/protocol.md "Sealed frames");
  a server that requires sealing picks the first cipher, and nobody seals an insecure session;
- streams = min(client's request, server's max_streams); chunk size likewise, within 4 KiB..64 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from dwcp.errors import ConfigError, ProtocolError
from dwcp.wire import messages as m
from dwcp.wire.frames import Flag

# Checksum names this implementation can compute, and the frame flag each one sets.
CHECKSUM_FLAGS: dict[str, int] = {"xxh3": int(Flag.CSUM_XXH3), "crc32c": int(Flag.CSUM_CRC32C)}

#: AEAD ciphers for sealed frames, in this build's order of preference (AES-128-GCM first: with
#: AES-NI and PCLMULQDQ it is the fastest here; ChaCha20-Poly1305 for hosts without them). They travel
#: in the same ordered list as the checksums, because the tag replaces the checksum.
CIPHERS: tuple[str, ...] = ("aes-128-gcm", "aes-256-gcm", "chacha20-poly1305")


#: The session protocol this code speaks (docs/protocol.md). 2: after the handshake every connection is
#: a link that may carry any frame (control frames on data streams, data on the control connection when
#: no data stream is left), so a session survives losing any connection. Version 1 peers kept control
#: frames on the control connection only; a session cannot follow both rules, so 1 is not offered.
PROTOCOL_VERSION = 2


@dataclass(frozen=True)
class Offer:
    """What a client asks for. ``checksums`` is in order of preference."""
    streams: int = 4
    chunk_bytes: int = 1 << 20
    checksums: tuple[str, ...] = ("xxh3", "crc32c")
    features: frozenset[str] = frozenset()
    versions: tuple[int, ...] = (PROTOCOL_VERSION,)


@dataclass(frozen=True)
class ServerPolicy:
    """What a server allows. ``checksums`` lists what it can verify or open (order does not matter:
    the client's preference decides); ``require_cipher``: only sealed frames are acceptable."""
    max_streams: int = 256
    max_chunk_bytes: int = 64 << 20
    checksums: tuple[str, ...] = ("xxh3", "crc32c", *CIPHERS)
    features: frozenset[str] = frozenset()
    versions: tuple[int, ...] = (PROTOCOL_VERSION,)
    require_cipher: bool = False


@dataclass(frozen=True)
class Choice:
    """The parameters the server picked (carried in CHALLENGE)."""
    version: int
    streams: int
    chunk_bytes: int
    checksum: str
    features: frozenset[str]


def _check_versions(versions: tuple[int, ...], who: str) -> None:
    if (not versions or len(versions) > m.MAX_VERSIONS or len(set(versions)) != len(versions)
            or any(not isinstance(v, int) or not 1 <= v <= 255 for v in versions)):
        raise ConfigError(f"{who} versions {versions!r}: need 1..{m.MAX_VERSIONS} distinct integers "
                          "in 1..255")


def _check_checksums(names: tuple[str, ...], who: str) -> None:
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{who} checksums {names!r}: need at least one, no duplicates")
    unknown = [n for n in names if n not in CHECKSUM_FLAGS and n not in CIPHERS]
    if unknown:
        raise ConfigError(f"{who} checksums/ciphers: unknown {unknown}; this build supports "
                          f"{sorted(CHECKSUM_FLAGS)} and {list(CIPHERS)}")


def _check_features(features: frozenset[str], who: str) -> None:
    if not isinstance(features, frozenset):
        raise ConfigError(f"{who} features must be a frozenset of names, got {type(features).__name__}")
    if len(features) > m.MAX_FEATURES:
        raise ConfigError(f"{who} features: {len(features)} names, at most {m.MAX_FEATURES}")
    for f in features:
        m._check_name(f, f"{who} feature")


def validate_offer(offer: Offer) -> None:
    """Raise ConfigError if this side's offer cannot be put on the wire or names unknown checksums."""
    if not isinstance(offer.streams, int) or not 1 <= offer.streams <= m.MAX_STREAMS:
        raise ConfigError(f"streams = {offer.streams!r}: ask for 1..{m.MAX_STREAMS}")
    if (not isinstance(offer.chunk_bytes, int)
            or not m.MIN_CHUNK_BYTES <= offer.chunk_bytes <= m.MAX_CHUNK_BYTES):
        raise ConfigError(f"chunk_bytes = {offer.chunk_bytes!r}: ask for "
                          f"{m.MIN_CHUNK_BYTES}..{m.MAX_CHUNK_BYTES} (4 KiB..64 MiB)")
    _check_versions(offer.versions, "offer")
    _check_checksums(offer.checksums, "offer")
    if len(offer.checksums) > m.MAX_CHECKSUMS:
        raise ConfigError(f"offer checksums: at most {m.MAX_CHECKSUMS}")
    _check_features(offer.features, "offer")


def validate_policy(policy: ServerPolicy) -> None:
    """Raise ConfigError if the server policy is out of the protocol's bounds."""
    if not isinstance(policy.max_streams, int) or not 1 <= policy.max_streams <= m.MAX_STREAMS:
        raise ConfigError(f"max_streams = {policy.max_streams!r}: must be 1..{m.MAX_STREAMS}")
    if (not isinstance(policy.max_chunk_bytes, int)
            or not m.MIN_CHUNK_BYTES <= policy.max_chunk_bytes <= m.MAX_CHUNK_BYTES):
        raise ConfigError(f"max_chunk_bytes = {policy.max_chunk_bytes!r}: must be "
                          f"{m.MIN_CHUNK_BYTES}..{m.MAX_CHUNK_BYTES} (4 KiB..64 MiB)")
    _check_versions(policy.versions, "server policy")
    _check_checksums(policy.checksums, "server policy")
    _check_features(policy.features, "server policy")


def negotiate(hello: m.Hello, policy: ServerPolicy) -> Choice:
    """Server side: pick the session parameters from a decoded HELLO.

    Raises ProtocolError (code E_VERSION for versions) naming both sides' lists when nothing is
    common, so an operator sees at once which end to upgrade."""
    common = set(hello.versions) & set(policy.versions)
    if not common:
        raise ProtocolError(
            f"no common protocol version: the client speaks {sorted(hello.versions)}, the server "
            f"speaks {sorted(policy.versions)}; upgrade the older end", code=-2)
    usable = [c for c in hello.checksums if c in policy.checksums
              and not (hello.insecure and c in CIPHERS)]  # no key, nothing to seal with
    if policy.require_cipher and not hello.insecure:
        usable = [c for c in usable if c in CIPHERS]
        if not usable:
            raise ProtocolError(
                f"the server requires sealed (encrypted) frames but the client offers only "
                f"{list(hello.checksums)}: run the client with encryption on (the default), or the "
                "server with encrypt=False / --no-encrypt if this link is trusted", code=-16)
    checksum = usable[0] if usable else None
    if checksum is None:
        raise ProtocolError(
            f"no common data checksum: the client offers {list(hello.checksums)}, the server "
            f"supports {list(policy.checksums)}", code=-16)
    return Choice(version=max(common),
                  streams=min(hello.streams, policy.max_streams),
                  chunk_bytes=min(hello.chunk_bytes, policy.max_chunk_bytes),
                  checksum=checksum,
                  features=hello.features & policy.features)


def check_choice(offer: Offer, choice: Choice) -> None:
    """Client side: the server's choice must lie inside what we offered (a server may lower but never
    raise a parameter, nor pick something we did not list). ProtocolError otherwise."""
    problems = []
    if choice.version not in offer.versions:
        problems.append(f"version {choice.version} not in our {list(offer.versions)}")
    if not 1 <= choice.streams <= offer.streams:
        problems.append(f"streams {choice.streams} not in 1..{offer.streams}")
    if not m.MIN_CHUNK_BYTES <= choice.chunk_bytes <= offer.chunk_bytes:
        problems.append(f"chunk_bytes {choice.chunk_bytes} not in {m.MIN_CHUNK_BYTES}.."
                        f"{offer.chunk_bytes}")
    if choice.checksum not in offer.checksums:
        problems.append(f"checksum {choice.checksum!r} not in our {list(offer.checksums)}")
    extra = choice.features - offer.features
    if extra:
        problems.append(f"features {sorted(extra)} that we did not offer")
    if problems:
        raise ProtocolError("the server chose parameters outside our offer: " + "; ".join(problems),
                            code=-16)
