"""Sessions leak nothing: file descriptors, threads (the engine's I/O threads included) and memory stay
flat across a thousand sessions opened, used and closed in one process."""

from __future__ import annotations

import os
import queue
import threading

import pytest

import dwcp
from tests.conftest import TEST_KEY

SESSIONS = 1000


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("engine", ["c", "python"])
def test_fds_threads_and_memory_stay_flat_across_1000_sessions(engine: str) -> None:
    sessions = SESSIONS if engine == "c" else SESSIONS // 4
    big = os.urandom(6 << 20)   # large enough for the C engine's I/O threads (dwcp._core.MT_MIN_BYTES)
    small = os.urandom(8 << 10)
    errors: list[BaseException] = []
    closed: queue.Queue[int] = queue.Queue()   # the server finished session i
    with dwcp.listen(("127.0.0.1", 0), key=TEST_KEY, backend=engine) as lis:

        def serve() -> None:
            try:
                for i in range(sessions):
                    with lis.accept(timeout_s=30) as s:
                        while True:
                            try:
                                s.recv()
                            except dwcp.PeerClosedError:
                                break
                    closed.put(i)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        marks: dict[int, tuple[int, int, int]] = {}
        for i in range(sessions):
            with dwcp.connect(lis.address, key=TEST_KEY, streams=1 + i % 4, backend=engine) as c:
                c.send(big if i % 10 == 0 else small)
                c.send(small)
            if i in (sessions // 10, sessions - 1):
                while closed.get(timeout=30) != i:   # both ends of session i are gone
                    pass
                marks[i] = (_fds(), _threads(), _rss_bytes())
        server.join(60)
        assert not server.is_alive() and not errors, errors
    (fd0, th0, rss0), (fd1, th1, rss1) = marks.values()
    assert fd1 <= fd0, f"file descriptors grew from {fd0} to {fd1} over {sessions} sessions"
    assert th1 <= th0, f"threads grew from {th0} to {th1} over {sessions} sessions"
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        # (Under `make sanitize` ASan keeps freed memory in quarantine on purpose: RSS grows there.)
        assert rss1 - rss0 < 32 << 20, f"memory grew by {(rss1 - rss0) >> 20} MiB over {sessions} sessions"
