"""TLS contexts: the DWCP handshake and a JOIN over TLS 1.3 on loopback TCP, and what TLS refuses."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dwcp.errors import ConfigError
from dwcp.wire import frames, handshake as hs, io, tls
from dwcp.wire.frames import FrameType

KEY = b"tls-test-key-0123456789abcdef!!!"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _make_leaf(d: Path, name: str, ca: str, san: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                   "keyUsage=critical,digitalSignature\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "otherca")
    _make_leaf(d, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    _make_leaf(d, "client", "ca", "DNS:client")
    return d


def _tls_pair(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, fn_server: Any,
              fn_client: Any, hostname: str = "localhost") -> tuple[Any, BaseException | None]:
    """Loopback TCP, TLS on both ends; returns (client result, server error)."""
    srv = socket.create_server(("127.0.0.1", 0))
    server_error: list[BaseException] = []

    def run_server() -> None:
        conn, _ = srv.accept()
        try:
            conn.settimeout(5)
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                fn_server(s)
        except BaseException as e:  # noqa: BLE001
            server_error.append(e)
            conn.close()

    t = threading.Thread(target=run_server, daemon=True)
    t.start()
    try:
        raw = socket.create_connection(srv.getsockname(), timeout=5)
        with client_ctx.wrap_socket(raw, server_hostname=hostname) as c:
            result = fn_client(c)
    finally:
        t.join(10)
        srv.close()
    return result, (server_error[0] if server_error else None)


def test_handshake_and_join_over_tls13(pki: Path) -> None:
    sctx = tls.server_context(pki / "server.pem", pki / "server.key")
    cctx = tls.client_context(ca_file=pki / "ca.pem")
    server_params: list[hs.SessionParams] = []

    def server(s: ssl.SSLSocket) -> None:
        first = io.read_frame(s, max_payload=frames.MAX_CONTROL_BYTES, deadline=time.monotonic() + 5)
        server_params.append(hs.server_handshake(s, first, key=KEY, insecure=False,
                                                 policy=hs.ServerPolicy(), timeout_s=5))
        h, payload = io.read_frame(s, max_payload=frames.MAX_CONTROL_BYTES)
        assert h.type == FrameType.JOIN   # (a real listener takes JOIN on a new connection)
        hs.verify_join(server_params[0], hs.parse_join(payload))
        hs.send_joined(s, 0)

    def client(c: ssl.SSLSocket) -> hs.SessionParams:
        assert c.version() == "TLSv1.3"
        p = hs.client_handshake(c, key=KEY, insecure=False,
                                offer=hs.Offer(features=frozenset({"tls"})), timeout_s=5)
        hs.client_join(c, p, 0, timeout_s=5)
        return p

    params, err = _tls_pair(sctx, cctx, server, client)
    assert err is None
    assert params == server_params[0]


def test_mutual_tls(pki: Path) -> None:
    sctx = tls.server_context(pki / "server.pem", pki / "server.key", ca_file=pki / "ca.pem")
    good = tls.client_context(ca_file=pki / "ca.pem", cert_file=pki / "client.pem",
                              key_file=pki / "client.key")

    def echo(s: ssl.SSLSocket) -> None:
        h, p = io.read_frame(s, max_payload=frames.MAX_CONTROL_BYTES, deadline=time.monotonic() + 5)
        io.write_frame(s, frames.encode_frame(h.type, p))

    def ping(c: ssl.SSLSocket) -> bytes:
        io.write_frame(c, frames.encode_frame(FrameType.ABORT, b"ping"))
        return io.read_frame(c, max_payload=frames.MAX_CONTROL_BYTES,
                             deadline=time.monotonic() + 5)[1]

    assert _tls_pair(sctx, good, echo, ping) == (b"ping", None)

    no_cert = tls.client_context(ca_file=pki / "ca.pem")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _tls_pair(sctx, no_cert, echo, ping)


def test_client_rejects_server_from_unknown_ca(pki: Path) -> None:
    sctx = tls.server_context(pki / "server.pem", pki / "server.key")
    cctx = tls.client_context(ca_file=pki / "otherca.pem")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_pair(sctx, cctx, lambda s: None, lambda c: None)


def test_client_checks_hostname_unless_told_not_to(pki: Path) -> None:
    sctx = tls.server_context(pki / "server.pem", pki / "server.key")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_pair(sctx, tls.client_context(ca_file=pki / "ca.pem"), lambda s: None,
                  lambda c: None, hostname="wrong.example")
    relaxed = tls.client_context(ca_file=pki / "ca.pem", check_hostname=False)
    assert _tls_pair(sctx, relaxed, lambda s: None, lambda c: c.version(),
                     hostname="wrong.example")[0] == "TLSv1.3"


def test_tls12_client_is_refused(pki: Path) -> None:
    sctx = tls.server_context(pki / "server.pem", pki / "server.key")
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(pki / "ca.pem")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls_pair(sctx, old, lambda s: None, lambda c: None)


def test_contexts_enforce_tls13() -> None:
    assert tls.client_context().minimum_version == ssl.TLSVersion.TLSv1_3


def test_config_errors(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        tls.server_context(tmp_path / "nope.pem", pki / "server.key")
    with pytest.raises(ConfigError, match="do they match"):
        tls.server_context(pki / "server.pem", pki / "client.key")
    with pytest.raises(ConfigError, match="needs ca_file"):
        tls.server_context(pki / "server.pem", pki / "server.key", require_client_cert=True)
    with pytest.raises(ConfigError, match="both cert_file and key_file"):
        tls.client_context(cert_file=pki / "client.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError):
        tls.client_context(ca_file=bad)
