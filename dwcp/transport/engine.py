"""Choice of the data-path engine for a session: the C engine, or the pure-Python one.

The C engine drives raw file descriptors with sendmsg/recvmsg and needs no GIL. TLS sessions cannot use
it (this kernel has no kTLS, so encryption happens in Python's ssl objects), and DWCP_BACKEND=python
forces the Python engine for debugging and for running the suite against both.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, Protocol


class StreamSetLike(Protocol):
    @property
    def count(self) -> int: ...

    def send(self, buffer: Any, *, transfer_id: int, chunk_bytes: int, csum_flags: int,
             length: int | None = None, frame_flags: int = 0, timeout_s: float = 30.0,
             zerocopy: bool = False, zc_min_bytes: int = 0, deadline: float | None = None,
             begin: bytes | None = None) -> int: ...

    def recv_into(self, buffer: Any, *, transfer_id: int, length: int, chunk_bytes: int,
                  csum_flags: int, timeout_s: float = 30.0, sink: bool = False) -> int: ...

    def next_control(self, timeout_s: float | None = None) -> tuple[int, int, bytes]: ...

    def send_control(self, ftype: int, transfer_id: int = 0, payload: bytes = b"",
                     timeout_s: float = 1.0) -> int: ...

    def stats(self) -> dict[str, int]: ...

    @property
    def sndbuf(self) -> tuple[int, int]: ...

    def alive(self) -> list[bool]: ...

    def alive_count(self) -> int: ...

    def control_alive(self) -> bool: ...

    def kill(self, i: int) -> None: ...

    def pause(self, i: int, paused: bool = True) -> None: ...

    def paused(self) -> list[bool]: ...

    def kill_control(self) -> None: ...

    def interrupt(self) -> None: ...

    def close(self) -> None: ...


def make_stream_set(socks: Sequence[socket.socket], *, control: socket.socket | None = None, backend: str,
                    tls: bool, io_threads: int = 0, busy_poll_us: int = 0,
                    sndbuf_bytes: int = 0, cipher: str | None = None, direction: int = 0,
                    traffic_secrets: tuple[bytes, bytes] = (b"", b""),
                    rekey_bytes: int = 0) -> tuple[StreamSetLike, str]:
    """(engine, name): the C engine unless TLS or the caller asks for the Python one. ``control`` joins
    the session's control connection to the engine's links. The Python engine polls nothing
    (``busy_poll_us`` is for the C engine, which polls without holding the GIL). ``cipher``: every
    frame is sealed (both engines, the same bytes); ``direction`` 0 for the client, 1 for the server, and
    ``traffic_secrets`` (client-to-server, server-to-client) from the handshake."""
    tx, rx = traffic_secrets if direction == 0 else traffic_secrets[::-1]
    if tls or backend == "python":
        from dwcp.transport.pyengine import PyStreamSet
        return PyStreamSet(list(socks), control=control, sndbuf_bytes=sndbuf_bytes, cipher=cipher,
                           direction=direction, tx_secret=tx or None, rx_secret=rx or None,
                           rekey_bytes=rekey_bytes), "python"
    from dwcp._core import StreamSet
    return StreamSet([s.fileno() for s in socks], control=None if control is None else control.fileno(),
                     io_threads=io_threads, busy_poll_us=busy_poll_us, sndbuf_bytes=sndbuf_bytes,
                     cipher=cipher, direction=direction, tx_secret=tx or None, rx_secret=rx or None,
                     rekey_bytes=rekey_bytes), "c"
