"""A lab: two hosts (namespaces a and b) joined by one emulated link, and its whole life cycle.

Order of construction, each step recorded in the lab's state directory first so that a crash at any
point leaves something `down`/`down_all` can find: claim /run/dwcp-netlab/NAME -> namespaces ->
per-namespace sysctls -> delay line (creates the TUN devices) -> addresses. Tear-down runs the same
steps backwards and keeps going past failures."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import time
from types import TracebackType
from typing import Any

from dwcp.errors import DWCPError

from . import _state
from ._emulator import DelayLine, is_delayline, terminate
from ._params import DEFAULT_SUBNET, LinkParams, check_name
from ._system import check_host, nsexec_argv, set_sysctls
from ._topology import IFACE, PREFIX, configure_host, create_namespace, remove_namespace

log = logging.getLogger(__name__)


class Host:
    """One end of the link: a network namespace with address ``addr`` on interface ``iface``."""

    def __init__(self, role: str, ns: str, addr: str, iface: str = IFACE) -> None:
        self.role = role
        self.ns = ns
        self.addr = addr
        self.iface = iface

    def argv(self, cmd: list[str]) -> list[str]:
        """The argv that runs ``cmd`` inside this host."""
        return nsexec_argv(self.ns, list(cmd))

    def run(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run(cmd, **kwargs) inside this host."""
        return subprocess.run(self.argv(cmd), **kwargs)

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen(cmd, **kwargs) inside this host; its PID is the command's own."""
        return subprocess.Popen(self.argv(cmd), **kwargs)

    def set_sysctls(self, values: dict[str, str]) -> None:
        """Write sysctls inside this host, e.g. {"net.ipv4.tcp_rmem": "4096 131072 262144"} to cap
        every receive window at 256 KiB."""
        set_sysctls(self.ns, values)

    def __repr__(self) -> str:
        return f"Host({self.role!r}, ns={self.ns!r}, addr={self.addr!r})"


def _namespaces(name: str) -> tuple[str, str]:
    return f"{PREFIX}{name}-a", f"{PREFIX}{name}-b"


class Lab:
    """Two hosts and the delay line between them. A context manager: leaving it tears everything down.

    Made by :func:`link` (a fresh, uniquely named lab owned by this process), :func:`up` (a named lab that
    outlives the process, as `dwcp netlab up` makes) or :func:`attach` (an existing named lab)."""

    def __init__(self, name: str, state: dict[str, Any], emulator: DelayLine | None) -> None:
        self.name = name
        self.params: dict[str, Any] = state["params"]
        ns_a, ns_b = state["namespaces"]
        self.a = Host("a", ns_a, self.params["addr_a"], state.get("iface", IFACE))
        self.b = Host("b", ns_b, self.params["addr_b"], state.get("iface", IFACE))
        self.emulator = emulator
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self.emulator.pid if self.emulator else None

    def stats(self, fresh: bool = False) -> dict[str, Any]:
        """The delay line's counters per direction ("a_to_b", "b_to_a"), refreshed every 100 ms;
        fresh=True waits for a snapshot taken after the call."""
        if self.emulator is None:
            raise DWCPError(f"netlab link {self.name} has no delay line (crashed?); "
                            f"`dwcp netlab down {self.name}` cleans it up")
        return self.emulator.stats(fresh)

    def status(self) -> dict[str, Any]:
        """Parameters, hosts and emulator stats, as `dwcp netlab status --json` prints them."""
        out: dict[str, Any] = {"name": self.name, "params": self.params, "pid": self.pid,
                               "hosts": {h.role: {"namespace": h.ns, "addr": h.addr, "iface": h.iface}
                                         for h in (self.a, self.b)}}
        try:
            out["stats"] = self.stats()
        except DWCPError as e:
            out["stats"] = None
            out["error"] = str(e)
        return out

    def close(self) -> None:
        """Stop the delay line, remove both namespaces (killing what runs in them) and the state.
        Idempotent; keeps going past failures and raises the first one at the end."""
        if self._closed:
            return
        self._closed = True
        _teardown(self.name, self.emulator)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        p = self.params
        return (f"<netlab.Lab {self.name} rtt={p['rtt_ms']}ms rate={p['rate_mbit']}Mbit/s "
                f"loss={p['loss']} a={self.a.addr} b={self.b.addr}>")


def _teardown(name: str, emulator: DelayLine | None) -> None:
    errors: list[BaseException] = []
    state: dict[str, Any] = {}
    try:
        state = _state.read_state(name)
    except DWCPError:
        pass
    ns_list = state.get("namespaces") or list(_namespaces(name))
    try:
        if emulator is not None:
            emulator.stop()
        else:
            pid = state.get("pid")
            if pid and is_delayline(int(pid), ns_list[0]):
                terminate(int(pid))
    except BaseException as e:  # keep tearing down
        errors.append(e)
    for ns in ns_list:
        try:
            remove_namespace(ns)
        except BaseException as e:
            errors.append(e)
    _state.remove(name)
    log.info("netlab link %s down", name)
    if errors:
        raise errors[0]


def up(name: str, *, rtt_ms: float, rate_mbit: float, loss: float = 0.0, queue_bytes: int | None = None,
       rate_mbit_reverse: float | None = None, trace: str | None = None, subnet: str = DEFAULT_SUBNET,
       seed: int | None = None, persistent: bool = True) -> Lab:
    """Build lab ``name``. With persistent=True it outlives this process (until :func:`down`)."""
    check_name(name)
    params = LinkParams(rtt_ms=rtt_ms, rate_mbit=rate_mbit, loss=loss, queue_bytes=queue_bytes,
                        rate_mbit_reverse=rate_mbit_reverse, trace=trace, subnet=subnet)
    check_host()
    state_dir = _state.claim(name)
    ns_a, ns_b = _namespaces(name)
    state: dict[str, Any] = {"name": name, "params": params.to_dict(), "namespaces": [ns_a, ns_b],
                             "iface": IFACE, "pid": None, "persistent": persistent,
                             "owner_pid": None if persistent else os.getpid(),
                             "owner_start": None if persistent else _state.process_start(os.getpid()),
                             "created": time.time()}
    emulator = None
    try:
        _state.write_state(name, state)
        rmem = params.tcp_buffer_max()
        for ns in (ns_a, ns_b):
            create_namespace(ns)
            set_sysctls(ns, {
                # The emulator, not the socket buffer, must be the bottleneck.
                "net.ipv4.tcp_rmem": f"4096 131072 {rmem}",
                "net.ipv4.tcp_wmem": f"4096 16384 {rmem}",
                # Each test starts cold: no ssthresh/RTT cached from an earlier connection.
                "net.ipv4.tcp_no_metrics_save": "1",
                # IPv4 only: no router solicitations or MLD reports crossing the link behind our back.
                "net.ipv6.conf.all.disable_ipv6": "1",
                "net.ipv6.conf.default.disable_ipv6": "1",
            })
        emulator = DelayLine.start(params, ns_a, ns_b, IFACE, state_dir, seed=seed)
        state["pid"] = emulator.pid
        _state.write_state(name, state)
        prefix = params.network.prefixlen
        configure_host(ns_a, params.addr_a, prefix)
        configure_host(ns_b, params.addr_b, prefix)
    except BaseException:
        try:
            _teardown(name, emulator)
        except BaseException as e:  # the original error matters more
            log.warning("clean-up after a failed netlab up %s: %s", name, e)
        raise
    log.info("netlab link %s up: %s", name, params)
    return Lab(name, state, emulator)


def link(rtt_ms: float = 50.0, rate_mbit: float = 1000.0, loss: float = 0.0, queue_bytes: int | None = None,
         rate_mbit_reverse: float | None = None, trace: str | None = None, subnet: str = DEFAULT_SUBNET,
         seed: int | None = None) -> Lab:
    """A fresh lab under a unique name, owned by this process: use it as a context manager.

    >>> with link(rtt_ms=50, rate_mbit=100) as lab:          # doctest: +SKIP
    ...     lab.a.run(["ping", "-c", "3", lab.b.addr])
    """
    return up(f"py{secrets.token_hex(5)}", rtt_ms=rtt_ms, rate_mbit=rate_mbit, loss=loss,
              queue_bytes=queue_bytes, rate_mbit_reverse=rate_mbit_reverse, trace=trace, subnet=subnet,
              seed=seed, persistent=False)


def attach(name: str) -> Lab:
    """The existing lab ``name`` (e.g. made by `dwcp netlab up`); closing it takes it down."""
    state = _state.read_state(name)
    pid = state.get("pid")
    emulator = None
    if pid and is_delayline(int(pid), state["namespaces"][0]):
        emulator = DelayLine(int(pid), _state.lab_dir(name))
    return Lab(name, state, emulator)
