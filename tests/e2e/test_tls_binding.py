"""The PSK handshake is bound to TLS (docs/protocol.md "Binding to TLS"): a man in the middle who
holds a certificate the client trusts, terminates TLS and relays the DWCP bytes between his two TLS
connections cannot complete a session, though without the binding the relayed MACs would verify."""

from __future__ import annotations

import select
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

import dwcp
from dwcp import AuthError, DWCPError
from dwcp.wire import tls as dtls
from tests.conftest import TEST_KEY


def _cert(d: Path, name: str) -> tuple[Path, Path]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem")],
                   check=True, capture_output=True)
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("tlsbind")
    real = _cert(d, "real")
    mitm = _cert(d, "mitm")
    bundle = d / "trusted.pem"  # the client trusts both: the attacker got a certificate it accepts
    bundle.write_text(real[0].read_text() + mitm[0].read_text())
    return {"real": real, "mitm": mitm, "bundle": bundle}


def _accept(lst: Any, box: dict[str, Any]) -> None:
    try:
        box["server"] = lst.accept(timeout_s=10)
    except DWCPError as e:
        box["error"] = e


def test_a_session_over_tls_is_bound_to_the_server_certificate(certs: dict[str, Any]) -> None:
    server_ctx = dtls.server_context(*certs["real"])
    client_ctx = dtls.client_context(ca_file=certs["bundle"])
    with dwcp.listen(("127.0.0.1", 0), key=TEST_KEY, tls=server_ctx) as lst:
        box: dict[str, Any] = {}
        th = threading.Thread(target=_accept, args=(lst, box))
        th.start()
        with dwcp.connect(lst.address, key=TEST_KEY, tls=client_ctx, streams=2) as c:
            th.join(10)
            assert dtls.FEATURE_TLS_BIND in c.stats()["features"]
            assert c.stats()["cipher"] == "tls"
            t = threading.Thread(target=lambda: box.setdefault("got", bytes(box["server"].recv())))
            t.start()
            c.send(b"bound" * 1000)
            t.join(10)
            assert box["got"] == b"bound" * 1000
            box["server"].close()


class TlsRelay:
    """Terminates the client's TLS with the attacker's certificate and opens its own TLS connection to
    the real server for each connection, relaying the plaintext both ways."""

    def __init__(self, upstream: tuple[str, int], mitm: tuple[Path, Path], ca: Path) -> None:
        self.upstream = upstream
        self.front = dtls.server_context(*mitm)
        self.back = dtls.client_context(ca_file=ca)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.address = self.lsock.getsockname()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                raw, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            a = self.front.wrap_socket(raw, server_side=True)
            b = self.back.wrap_socket(socket.create_connection(self.upstream), server_hostname="localhost")
        except (OSError, ssl.SSLError):
            raw.close()
            return

        # One thread for both directions: an SSL object must not be read on one thread while it is
        # written on another (OpenSSL's SSL objects are not thread-safe, and CPython drops the GIL in
        # both calls); two pump threads lost a handshake record now and then and the client timed out.
        def pump() -> None:
            try:
                while True:
                    ready = [s for s in (a, b) if s.pending()] or select.select([a, b], [], [])[0]
                    for src in ready:
                        data = src.recv(65536)
                        if not data:
                            return
                        (b if src is a else a).sendall(data)
            except (OSError, ssl.SSLError, ValueError):
                pass
            finally:
                for s in (a, b):
                    try:
                        s.close()
                    except OSError:
                        pass

        threading.Thread(target=pump, daemon=True).start()

    def close(self) -> None:
        self.lsock.close()


def test_a_relaying_man_in_the_middle_cannot_complete_the_handshake(certs: dict[str, Any]) -> None:
    server_ctx = dtls.server_context(*certs["real"])
    client_ctx = dtls.client_context(ca_file=certs["bundle"])
    with dwcp.listen(("127.0.0.1", 0), key=TEST_KEY, tls=server_ctx) as lst:
        relay = TlsRelay(lst.address, certs["mitm"], certs["bundle"])
        box: dict[str, Any] = {}
        th = threading.Thread(target=_accept, args=(lst, box), daemon=True)
        th.start()
        try:
            with pytest.raises(AuthError, match="could not prove"):
                dwcp.connect(relay.address, key=TEST_KEY, tls=client_ctx, streams=2, connect_timeout_s=5)
        finally:
            relay.close()
        assert "server" not in box
