"""Client side: dwcp.connect()."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dwcp.errors import ConfigError, DWCPError, TransferTimeout, TransportError
from dwcp.transport.options import CHECKSUMS, DEFAULT_CHUNK_BYTES, SessionOptions, parse_address
from dwcp.transport.segments import FEATURE_SEGMENTS
from dwcp.transport.session import Session
from dwcp.wire import auth
from dwcp.wire.handshake import Offer, SessionParams, client_handshake, client_join
from dwcp.wire.tls import FEATURE_TLS_BIND

log = logging.getLogger(__name__)


def tune_socket(s: socket.socket) -> None:
    # Small frames (ACKs, control messages) must not wait for Nagle; data frames go out in one
    # sendmsg per chunk, so disabling Nagle costs nothing there.
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def open_connection(addr: tuple[str, int], options: SessionOptions, deadline: float) -> socket.socket:
    timeout = max(0.001, deadline - time.monotonic())
    try:
        s = socket.create_connection(addr, timeout=timeout)
    except socket.timeout as e:
        raise TransferTimeout(f"connecting to {addr[0]}:{addr[1]} timed out after "
                              f"{options.connect_timeout_s:g} s; is the server reachable?") from e
    except OSError as e:
        raise TransportError(f"cannot connect to {addr[0]}:{addr[1]}: {e.strerror or e}; is a DWCP "
                             f"server listening there?", errno=e.errno) from e
    try:
        tune_socket(s)
        if options.tls is not None:
            s = options.tls.wrap_socket(s, server_hostname=options.server_hostname or addr[0])
        s.settimeout(None)
        return s
    except ssl.SSLError as e:
        s.close()
        raise TransportError(f"TLS handshake with {addr[0]}:{addr[1]} failed: {e}") from e
    except BaseException:
        s.close()
        raise


def connect(addr: str | tuple[str, int], *, key: bytes | str | None = None,
            key_file: str | os.PathLike[str] | None = None, insecure: bool = False, streams: int = 4,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout_s: float = 30.0,
            connect_timeout_s: float = 10.0, checksums: tuple[str, ...] = CHECKSUMS,
            zerocopy: str = "auto", tls: ssl.SSLContext | None = None,
            server_hostname: str | None = None, **extra: Any) -> Session:
    """Open a session to a DWCP server at addr ('host:port' or (host, port)).

    The key (bytes/str, key_file, or $DWCP_KEY) authenticates both ends; without one, insecure=True
    must be given explicitly. streams: 1..256 TCP data connections the transfers are striped over.
    timeout_s: a transfer fails if nothing moves for this long. tls: an ssl.SSLContext wraps every
    connection (the data path then runs in the Python engine).
    """
    options = SessionOptions(streams=streams, chunk_bytes=chunk_bytes, timeout_s=timeout_s,
                             connect_timeout_s=connect_timeout_s, checksums=tuple(checksums),
                             zerocopy=zerocopy, tls=tls, server_hostname=server_hostname, **extra)
    # An explicit insecure=True ignores $DWCP_KEY, but an explicit key with it is ambiguous
    # (resolve_key refuses it); no key and not insecure is refused before any socket is opened.
    psk = auth.resolve_key(auth.load_key(key=key, key_file=key_file, env=None if insecure else "DWCP_KEY"),
                           insecure)
    target = parse_address(addr)
    if not target[0]:
        raise ConfigError(f"connect() needs a host in the address, got {addr!r}")
    deadline = time.monotonic() + connect_timeout_s
    control = open_connection(target, options, deadline)
    data: list[socket.socket] = []
    try:
        offer = Offer(streams=streams, chunk_bytes=chunk_bytes,
                      checksums=options.protections(insecure=psk is None),
                      features=frozenset(({"tls", FEATURE_TLS_BIND} if tls else set()) | {FEATURE_SEGMENTS}))
        params = client_handshake(control, key=psk, insecure=insecure, offer=offer,
                                  timeout_s=max(0.001, deadline - time.monotonic()))
        data = _open_streams(target, params, options, deadline)
        peer = control.getpeername()[:2]
        return Session(control, data, params, options, role="client", peer=(peer[0], peer[1]))
    except BaseException:
        for s in [control, *data]:
            s.close()
        raise


def _open_streams(target: tuple[str, int], params: SessionParams, options: SessionOptions,
                  deadline: float) -> list[socket.socket]:
    """Open and join the data streams concurrently: on a WAN, joining 256 streams one after the other
    would cost 256 round trips."""
    def join(i: int) -> socket.socket:
        s = open_connection(target, options, deadline)
        try:
            client_join(s, params, i, timeout_s=max(0.001, deadline - time.monotonic()))
        except BaseException:
            s.close()
            raise
        return s

    with ThreadPoolExecutor(max_workers=min(params.streams, 32), thread_name_prefix="dwcp-join") as pool:
        futures = [pool.submit(join, i) for i in range(params.streams)]
        socks: list[socket.socket] = []
        error: BaseException | None = None
        for f in futures:
            try:
                socks.append(f.result())
            except BaseException as e:  # collect every socket before failing, so none leaks
                error = error or e
        if error is not None:
            for s in socks:
                s.close()
            if isinstance(error, DWCPError):
                raise error
            raise TransportError(f"joining data streams failed: {error}") from error
        return socks
