"""Kernel-level fixtures: emulated WAN links (dwcp.netlab) for tests that need real TCP over a WAN.

    @pytest.mark.kernel
    def test_something(wan_link):
        lab = wan_link(rtt_ms=50, rate_mbit=100, loss=0.001)
        server = lab.b.popen([...]); lab.a.run([...], check=True)

``wan_link(...)`` takes the arguments of :func:`dwcp.netlab.link` and returns an up :class:`Lab`; every
lab made during a test is torn down after it (namespaces, delay line, processes inside). Without root
or /dev/net/tun the test skips with the precise reason (and fails under DWCP_REQUIRE_KERNEL=1, see
tests/conftest.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest


def netlab_unavailable() -> str | None:
    """Why netlab cannot run here, or None."""
    if os.geteuid() != 0:
        return ("netlab needs root: network namespaces (CAP_SYS_ADMIN) and TUN devices "
                "(CAP_NET_ADMIN); run the kernel tests as root")
    if not os.path.exists("/dev/net/tun"):
        return "netlab needs /dev/net/tun (modprobe tun, or pass the device into the container)"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "netlab needs pyroute2 (pip install -r requirements-dev.txt)"
    return None


@pytest.fixture
def netlab_ready() -> None:
    """Skip (with the reason) unless netlab can build links on this host."""
    reason = netlab_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def wan_link(netlab_ready: None) -> Iterator[Callable[..., Any]]:
    """Factory: wan_link(rtt_ms=50, rate_mbit=1000, loss=0.0, queue_bytes=None,
    rate_mbit_reverse=None, trace=None, subnet="198.18.0.0/24", seed=None) -> netlab.Lab."""
    from dwcp import netlab

    labs: list[Any] = []

    def make(rtt_ms: float = 50.0, rate_mbit: float = 1000.0, loss: float = 0.0, **kw: Any) -> Any:
        lab = netlab.link(rtt_ms=rtt_ms, rate_mbit=rate_mbit, loss=loss, **kw)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()


T = TypeVar("T")


def wait_for(fn: Callable[[], T | None], what: str, limit_s: float = 10.0) -> T:
    """Poll fn until it returns something truthy; fail (not a timing assertion: a hang) after limit_s."""
    end = time.monotonic() + limit_s
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"never happened within {limit_s} s: {what}")
        time.sleep(0.02)
