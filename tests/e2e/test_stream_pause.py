"""Streams retired and added within a live session (Session.set_active_streams, the stream tuner's
knob): paused streams carry no new chunks, resumed ones do, mid-transfer changes keep every byte intact,
and pausing never stalls a transfer whose active streams died. Both engines."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any

import pytest

from dwcp.errors import ConfigError
from dwcp.telemetry.tcp_info import tcp_info


def acked(session: Any) -> list[int]:
    return [tcp_info(s).get("bytes_acked") for s in session.data_sockets()]


def test_paused_streams_carry_nothing_new(session_pair: Any, backend: str) -> None:
    p = session_pair(streams=4, backend=backend)
    assert p.client.active_streams == 4
    assert p.client.set_active_streams(1) == 1
    before = acked(p.client)
    data = os.urandom(16 << 20)
    t = threading.Thread(target=lambda: p.client.send(data))
    t.start()
    got = p.server.recv(timeout_s=30)
    t.join()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    moved = [a - b for a, b in zip(acked(p.client), before)]
    assert moved[0] >= len(data)
    assert all(m < 64 << 10 for m in moved[1:]), moved   # at most announcements and ACK frames
    assert p.client.stats()["streams_active"] == 1


def test_streams_added_and_retired_mid_transfer_keep_data_intact(session_pair: Any, backend: str) -> None:
    p = session_pair(streams=8, backend=backend)
    p.client.set_active_streams(1)
    data = os.urandom(64 << 20)
    stop = threading.Event()
    changes: list[int] = []

    def tune() -> None:
        counts = [2, 8, 3, 1, 6, 4]
        i = 0
        while not stop.is_set():
            changes.append(p.client.set_active_streams(counts[i % len(counts)]))
            i += 1
            time.sleep(0.005)

    tuner = threading.Thread(target=tune)
    sender = threading.Thread(target=lambda: p.client.send(data))
    tuner.start()
    sender.start()
    got = p.server.recv(timeout_s=60)
    sender.join()
    stop.set()
    tuner.join()
    assert got == data
    assert len(changes) >= 2
    moved = [a for a in acked(p.client)]
    assert sum(1 for m in moved if m > 1 << 20) >= 2   # more than one stream carried data


def test_every_active_stream_dead_paused_ones_carry_on(session_pair: Any, backend: str) -> None:
    p = session_pair(streams=4, backend=backend)
    p.client.set_active_streams(1)
    p.client._engine.kill(0)                 # the only active stream dies
    data = os.urandom(8 << 20)
    t = threading.Thread(target=lambda: p.client.send(data))
    t.start()
    assert p.server.recv(timeout_s=30) == data
    t.join()
    # set_active_streams prefers live streams
    assert p.client.set_active_streams(2) == 2
    assert not p.client._engine.paused()[1] and p.client._engine.paused()[0]


def test_bad_counts_are_config_errors(session_pair: Any) -> None:
    p = session_pair(streams=2)
    for n in (0, 3, -1):
        with pytest.raises(ConfigError, match="1..2"):
            p.client.set_active_streams(n)
