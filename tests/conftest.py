"""Shared test configuration.

- Hypothesis profiles: "dev" (default, quick) and "ci" (more examples); HYPOTHESIS_PROFILE selects.
- Kernel-level tests carry @pytest.mark.kernel. They skip loudly without root/BPF/namespaces, and
  with DWCP_REQUIRE_KERNEL=1 (set by scripts/test as root and in CI) such a skip fails the run.
- Fixtures for connected session pairs over real loopback TCP, parametrized over the C and the
  pure-Python engine where a test asks for `backend`.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

REQUIRE_KERNEL = os.environ.get("DWCP_REQUIRE_KERNEL") == "1"
TEST_KEY = b"dwcp-test-key-0123456789abcdef"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_KERNEL and report.skipped and item.get_closest_marker("kernel") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"kernel-level test skipped but DWCP_REQUIRE_KERNEL=1: {reason}\n"
                           "(run as root on a kernel with BPF and network namespaces, or unset "
                           "DWCP_REQUIRE_KERNEL outside CI)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} test(s) SKIPPED - see reasons above", yellow=True)


@pytest.fixture(autouse=True)
def balanced_counters() -> Iterator[None]:
    """Debug builds (make debug): every stream set freed, every zero-copy completion reaped, no
    carried frame left once a test and its fixtures are done (uvloop-style resource accounting)."""
    try:
        from dwcp import _core
    except ImportError:
        yield
        return
    if not _core.features()["debug_counters"]:
        yield
        return
    import gc
    before = _core.debug_counters()
    yield
    gc.collect()
    after = _core.debug_counters()
    assert after == before, f"engine resources leaked by this test: before {before}, after {after}"


@pytest.fixture(params=["c", "python"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run a test against the C engine and the pure-Python engine."""
    return str(request.param)


class SessionPair:
    """A connected (client, server) pair of Sessions over loopback TCP."""

    def __init__(self, streams: int = 4, backend: str = "c", listen_kw: dict[str, Any] | None = None,
                 **connect_kw: Any) -> None:
        import dwcp
        listen_kw = {"timeout_s": connect_kw.get("timeout_s", 30.0), **(listen_kw or {})}
        self.listener = dwcp.listen(("127.0.0.1", 0), key=TEST_KEY, backend=backend, **listen_kw)
        host, port = self.listener.address
        box: dict[str, Any] = {}

        def accept() -> None:
            try:
                box["server"] = self.listener.accept(timeout_s=30)
            except BaseException as e:  # reported below
                box["error"] = e

        t = threading.Thread(target=accept)
        t.start()
        try:
            self.client = dwcp.connect((host, port), key=TEST_KEY, streams=streams, backend=backend,
                                       **connect_kw)
        finally:
            t.join()
        if "error" in box:
            raise box["error"]
        self.server = box["server"]

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.listener.close()


@pytest.fixture
def session_pair() -> Iterator[Any]:
    """Factory: session_pair(streams=4, backend="c", listen_kw={...}, **connect_kwargs)."""
    pairs: list[SessionPair] = []

    def make(streams: int = 4, backend: str = "c", listen_kw: dict[str, Any] | None = None,
             **kw: Any) -> SessionPair:
        p = SessionPair(streams=streams, backend=backend, listen_kw=listen_kw, **kw)
        pairs.append(p)
        return p

    yield make
    for p in pairs:
        p.close()


def tcp_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """n connected loopback TCP pairs: (connecting-side sockets, accepting-side sockets)."""
    ls = socket.create_server(("127.0.0.1", 0), backlog=min(n, 1024))
    a: list[socket.socket] = []
    b: list[socket.socket] = []
    try:
        for _ in range(n):
            c = socket.create_connection(ls.getsockname())
            s, _ = ls.accept()
            a.append(c)
            b.append(s)
    finally:
        ls.close()
    return a, b


class Background:
    """Run fn(*args, **kwargs) in a thread; result() re-raises its exception or returns its value, and
    fails if the thread is still running after hang_s (a hang, not a slow machine)."""

    hang_s = 60.0

    def __init__(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self.box: dict[str, Any] = {}

        def target() -> None:
            try:
                self.box["result"] = fn(*args, **kwargs)
            except BaseException as e:  # re-raised by result()
                self.box["error"] = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def result(self, timeout: float | None = None) -> Any:
        timeout = self.hang_s if timeout is None else timeout
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"background call still running after {timeout} s (hang)"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["result"]


def run_in_thread(fn: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Start fn in a thread; the dict gets 'result' or 'error' when it ends."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


@pytest.fixture
def busy_flow() -> Iterator[tuple[int, int]]:
    """A loopback TCP flow that keeps sending until the test ends: (client port, server port)."""
    a, b = tcp_pairs(1)
    stop = threading.Event()

    def pump() -> None:
        chunk = b"z" * (1 << 16)
        try:
            while not stop.is_set():
                a[0].sendall(chunk)
        except OSError:
            pass

    def drain() -> None:
        try:
            while b[0].recv(1 << 20):
                pass
        except OSError:
            pass

    threads = [threading.Thread(target=pump, daemon=True), threading.Thread(target=drain, daemon=True)]
    for t in threads:
        t.start()
    yield a[0].getsockname()[1], b[0].getsockname()[1]
    stop.set()
    a[0].close()
    for t in threads:
        t.join(5)
    b[0].close()
