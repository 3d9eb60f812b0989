"""No hang, ever: hundreds of transfers while connections are destroyed under them (`ss -K`: the kernel
resets the socket, both ends see it die) and the peer process is killed.

Every transfer must either complete with identical bytes (the peer answers with their SHA-256) or raise
a DWCPError within a bound derived from timeout_s; while at least one of its session's connections is
left and the peer lives, it must complete. Bounded to about a minute in CI; DWCP_SOAK_SECONDS runs it
longer (`DWCP_SOAK_SECONDS=600 ./scripts/test tests/kernel/test_soak.py`).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_KEY

kernel = pytest.mark.kernel
PEER = str(Path(__file__).resolve().parents[1] / "e2e" / "peer.py")
SOAK_S = float(os.environ.get("DWCP_SOAK_SECONDS", "0") or 0)
TIMEOUT_S = 3.0


@pytest.fixture
def can_destroy_sockets() -> None:
    if os.geteuid() != 0 or not shutil.which("ss"):
        pytest.skip("destroying sockets with `ss -K` needs root and iproute2")


class Peer:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def ensure(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            env = dict(os.environ, DWCP_KEY=TEST_KEY.decode(), DWCP_BACKEND=self.backend,
                       PYTHONPATH=os.getcwd())
            # Its sessions fail by design here; their warnings would only bury this test's output.
            self.proc = subprocess.Popen([sys.executable, PEER, "digest", str(TIMEOUT_S)], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, env=env)
            assert self.proc.stdout is not None
            self.port = int(self.proc.stdout.readline())
        return self.port

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        self.kill()


def destroy(sock: Any) -> bool:
    """Reset one connection from outside the process, as a broken path or an operator would."""
    try:
        l, r = sock.getsockname(), sock.getpeername()
    except OSError:
        return False
    out = subprocess.run(["ss", "-K", "-t", "-n", "src", f"{l[0]}:{l[1]}", "dst", f"{r[0]}:{r[1]}"],
                         capture_output=True, text=True, timeout=10)
    return out.returncode == 0


@kernel
@pytest.mark.parametrize("backend,share", [("c", 0.75), ("python", 0.25)])
def test_random_connection_and_peer_kills_never_hang(can_destroy_sockets: None, backend: str,
                                                     share: float) -> None:
    import dwcp
    from dwcp.errors import DWCPError

    seconds = (SOAK_S or 60.0) * share
    rng = random.Random(int(os.environ.get("DWCP_SOAK_SEED", "0")) or None)
    blob = os.urandom(16 << 20)
    peer = Peer(backend)
    counts: Counter[str] = Counter()
    bound = 4 * TIMEOUT_S + 10   # a hang detector, not a speed target
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            port = peer.ensure()
            streams = rng.choice([1, 2, 4, 8])
            try:
                s = dwcp.connect(("127.0.0.1", port), key=TEST_KEY, streams=streams, backend=backend,
                                 chunk_bytes=rng.choice([64 << 10, 256 << 10, 1 << 20]), timeout_s=TIMEOUT_S)
            except DWCPError:
                counts["connect_failed"] += 1   # the peer was being killed or restarted
                continue
            counts["sessions"] += 1
            destroyed: set[int] = set()   # connections of this session reset so far
            peer_killed = False           # during this session (a kill may land after its transfer)
            with s:
                for _ in range(rng.randint(1, 12)):
                    size = rng.choice([0, 1, 4096, 200_000, 3 << 20, 12 << 20])
                    off = rng.randrange(0, len(blob) - size + 1)
                    data = memoryview(blob)[off:off + size]
                    socks = [s.control_socket(), *s.data_sockets()]
                    action = rng.random()
                    victims: list[Any] = []
                    kill_peer = False
                    if action < 0.45:
                        victims = rng.sample(socks, rng.randint(1, len(socks) - 1)) if len(socks) > 1 else []
                    elif action < 0.55:
                        victims = socks
                    elif action < 0.60:
                        kill_peer = True

                    def chaos() -> None:
                        time.sleep(rng.uniform(0, 0.03))
                        for v in victims:
                            destroy(v)
                        if kill_peer:
                            peer.kill()

                    destroyed.update(id(v) for v in victims)
                    peer_killed |= kill_peer
                    killer = threading.Thread(target=chaos, daemon=True)
                    t0 = time.monotonic()
                    killer.start()
                    try:
                        s.send(data)
                        digest = s.recv(timeout_s=TIMEOUT_S * 3)
                        ok = digest == hashlib.sha256(data).digest()
                    except DWCPError as e:
                        ok = None
                        err = e
                    elapsed = time.monotonic() - t0
                    killer.join(30)
                    assert elapsed < bound, f"a transfer took {elapsed:.1f} s (hang?): {counts}"
                    if ok is None:
                        counts["failed"] += 1
                        left = sum(id(x) not in destroyed for x in socks)
                        assert left == 0 or peer_killed, \
                            f"transfer failed with {left} of {len(socks)} connection(s) left: {err!r}"
                        break
                    assert ok, "the peer received different bytes"
                    counts["completed"] += 1
                    counts["completed_after_kills"] += bool(victims)
    finally:
        peer.close()
    print(f"soak {backend}: {dict(counts)}")
    assert counts["completed"] >= 20 and counts["completed_after_kills"] >= 5, counts
