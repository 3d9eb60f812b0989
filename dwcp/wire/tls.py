"""TLS contexts for DWCP connections (control and data alike), TLS 1.3 only.

TLS is optional: the pre-shared-key handshake already authenticates both ends, TLS adds
confidentiality and per-record integrity of everything after it. When enabled it wraps every
connection before the first DWCP byte (docs/protocol.md, "Connections").

Why TLS 1.3 minimum: it has only AEAD cipher suites and forward secrecy, and no renegotiation or
compression, so there is nothing to configure wrongly.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl

from dwcp.errors import ConfigError

PathLike = str | os.PathLike[str]

#: The handshake feature that binds the PSK transcript to the TLS connection (docs/protocol.md,
#: "Binding to TLS").
FEATURE_TLS_BIND = "tls-bind"
_END_POINT_ATTR = "_dwcp_tls_end_point"


def _end_point(cert_der: bytes) -> bytes:
    """tls-server-end-point (RFC 5929) with SHA-256: the hash of the server's DER certificate."""
    return hashlib.sha256(cert_der).digest()


def server_binding(ctx: ssl.SSLContext) -> bytes | None:
    """The channel binding a server context made by :func:`server_context` presents, else None (a
    context built elsewhere does not tell Python which certificate it holds)."""
    value = getattr(ctx, _END_POINT_ATTR, None)
    return value if isinstance(value, bytes) else None


def channel_binding(sock: ssl.SSLSocket, *, server: bool) -> bytes | None:
    """This side's view of the connection's tls-server-end-point: the certificate the client was
    shown, or the one the server presents. A man in the middle who terminates TLS shows the client
    a different certificate than the server's, so the two views differ and the PSK MACs fail.

    Why not tls-unique or tls-exporter: TLS 1.3 (the only version DWCP allows) has no tls-unique
    (RFC 8446 appendix C.5), and Python's ssl module offers no keying-material exporter (RFC 9266)
    through 3.13."""
    if server:
        return server_binding(sock.context)
    der = sock.getpeercert(binary_form=True)
    return _end_point(der) if der else None


def _need_file(path: PathLike, what: str) -> str:
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ConfigError(f"{what} {p!r} does not exist or is not a file")
    return p


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION  # never compress: HDE owns compression, and CRIME-safe
    return ctx


def server_context(cert_file: PathLike, key_file: PathLike, *, ca_file: PathLike | None = None,
                   require_client_cert: bool | None = None) -> ssl.SSLContext:
    """A server-side context presenting ``cert_file``/``key_file`` (PEM).

    With ``ca_file`` clients must present a certificate signed by it (mutual TLS) unless
    ``require_client_cert`` is False; ``require_client_cert=True`` without a CA is a ConfigError."""
    cert = _need_file(cert_file, "TLS certificate")
    key = _need_file(key_file, "TLS private key")
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise ConfigError(f"cannot load TLS certificate {cert!r} with key {key!r}: {e.reason or e} "
                          "(do they match, and are they PEM?)") from e
    # The leaf is the first certificate of the chain file: remember its hash for the channel binding.
    with open(cert, encoding="ascii", errors="replace") as f:
        first = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", f.read(), re.S)
    if first:
        setattr(ctx, _END_POINT_ATTR, _end_point(ssl.PEM_cert_to_DER_cert(first.group(0))))
    if require_client_cert and ca_file is None:
        raise ConfigError("require_client_cert=True needs ca_file= to verify client certificates")
    if ca_file is not None:
        ca = _need_file(ca_file, "TLS CA file")
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as e:
            raise ConfigError(f"cannot load TLS CA file {ca!r}: {e.reason or e}") from e
        ctx.verify_mode = ssl.CERT_NONE if require_client_cert is False else ssl.CERT_REQUIRED
    return ctx


def client_context(*, ca_file: PathLike | None = None, cert_file: PathLike | None = None,
                   key_file: PathLike | None = None, check_hostname: bool = True) -> ssl.SSLContext:
    """A client-side context that verifies the server against ``ca_file`` (or the system store).

    ``cert_file``/``key_file`` present a client certificate (mutual TLS). The server's certificate is
    always verified; ``check_hostname=False`` only skips the name check (for certificates issued to a
    cluster name rather than each host), never the chain."""
    if (cert_file is None) != (key_file is None):
        raise ConfigError("pass both cert_file and key_file for a client certificate, or neither")
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca_file is not None:
        ca = _need_file(ca_file, "TLS CA file")
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as e:
            raise ConfigError(f"cannot load TLS CA file {ca!r}: {e.reason or e}") from e
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None and key_file is not None:
        cert = _need_file(cert_file, "TLS client certificate")
        key = _need_file(key_file, "TLS client key")
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            raise ConfigError(f"cannot load TLS client certificate {cert!r} with key {key!r}: "
                              f"{e.reason or e}") from e
    return ctx
