"""Telemetry sources: one protocol, three implementations, and the choice between them with a reason.

| source | sees | needs |
|---|---|---|
| ``ebpf`` | every TCP flow of every namespace, per ACK, plus open/close events | CAP_BPF (root) and the ``dwcp._ebpf`` extension |
| ``inet_diag`` | every TCP flow of one namespace, when polled | nothing for your own namespace (CAP_SYS_ADMIN for another) |
| ``tcp_info`` | only sockets registered with ``add()`` | nothing |

The automatic choice takes the first usable one in that order. ``DWCP_TELEMETRY=ebpf|inet_diag|tcp_info``
(or ``source=``) forces one; forcing one that cannot work raises :class:`CapabilityError` saying why and
what to do, rather than silently watching something else.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from dwcp.errors import CapabilityError, ConfigError
from dwcp.telemetry.sample import FlowEvent, FlowFilter, FlowSample

log = logging.getLogger(__name__)

SOURCES = ("ebpf", "inet_diag", "tcp_info")
ENV_VAR = "DWCP_TELEMETRY"

_WHAT = {
    "ebpf": "all TCP flows of all namespaces, per-ACK samples and open/close events",
    "inet_diag": "all TCP flows of this network namespace, polled (no privileges)",
    "tcp_info": "only the sockets you register (e.g. a session's own streams), polled (no privileges)",
}


@runtime_checkable
class FlowSource(Protocol):
    """What every telemetry source offers. ``snapshot()`` is the latest sample of each flow it sees;
    ``events()`` the opens/closes since the previous call; ``close()`` frees everything (detaches BPF
    programs); sources are context managers."""

    name: str

    def snapshot(self) -> list[FlowSample]: ...

    def events(self) -> list[FlowEvent]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None: ...


def _ebpf_module() -> Any:
    """dwcp.telemetry.ebpf_source (imported by name: it needs the compiled dwcp._ebpf extension)."""
    return importlib.import_module("dwcp.telemetry.ebpf_source")


def _ebpf_status() -> tuple[bool, str]:
    try:
        ebpf_source = _ebpf_module()
    except ImportError as e:
        return False, (f"the eBPF source is not part of this build ({e}); rebuild with libbpf-dev, "
                       "clang and bpftool installed (./scripts/install.sh)")
    try:
        ok, reason = ebpf_source.ebpf_available()
    except Exception as e:  # a probe that breaks is a reason, not a crash of the caller
        return False, f"probing BPF failed: {e}"
    return bool(ok), str(reason)


def _inet_diag_status(netns: str | None = None) -> tuple[bool, str]:
    try:
        from dwcp.telemetry.inet_diag import InetDiagSource
        with InetDiagSource(netns=netns):
            pass
    except Exception as e:
        return False, f"sock_diag netlink unusable: {e}"
    where = f"namespace {netns}" if netns else "this network namespace"
    return True, f"sock_diag netlink answers: {_WHAT['inet_diag'].replace('this network namespace', where)}"


def _status(name: str, netns: str | None = None) -> tuple[bool, str]:
    if name == "ebpf":
        return _ebpf_status()
    if name == "inet_diag":
        return _inet_diag_status(netns)
    if name == "tcp_info":
        return True, f"getsockopt(TCP_INFO) always works: {_WHAT['tcp_info']}"
    raise ConfigError(f"telemetry source {name!r}: choose one of {', '.join(SOURCES)}")


def _requested(source: str | None) -> tuple[str | None, str]:
    if source:
        return source, "requested by the caller"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env, f"forced by {ENV_VAR}={env}"
    return None, ""


def _advice(name: str) -> str:
    if name == "ebpf":
        return ("run as root (CAP_BPF and CAP_PERFMON) on a kernel with BTF, or use "
                f"{ENV_VAR}=inet_diag, which needs no privileges")
    if name == "inet_diag":
        return f"check that pyroute2 is installed and netlink is allowed, or use {ENV_VAR}=tcp_info"
    return "tcp_info cannot fail to open"


def source_info(source: str | None = None, *, netns: str | None = None) -> dict[str, Any]:
    """Which source :func:`open_source` would use, and why; the others with their status.

    >>> dwcp.telemetry.source_info()                                    # doctest: +SKIP
    {"source": "ebpf", "reason": "...", "forced": False,
     "alternatives": {"inet_diag": "usable: ...", "tcp_info": "usable: ..."}}

    ``source`` is None when a forced source is unusable (``reason`` then says why and what to do)."""
    wanted, why = _requested(source)
    status: dict[str, tuple[bool, str]] = {}
    if wanted is not None:
        if wanted not in SOURCES:
            raise ConfigError(f"telemetry source {wanted!r} ({why}): choose one of {', '.join(SOURCES)}")
        ok, reason = status[wanted] = _status(wanted, netns)
        chosen: str | None = wanted if ok else None
        reason = (f"{why}: {reason}" if ok
                  else f"{wanted} {why} but unusable: {reason}; {_advice(wanted)}")
    else:
        chosen, reason = None, ""
        skipped: list[str] = []
        for name in SOURCES:
            ok, r = status[name] = _status(name, netns)
            if ok:
                chosen = name
                reason = r + "".join(f"; {x}" for x in skipped)
                break
            skipped.append(f"not {name}: {r}")
    alternatives = {}
    for name in SOURCES:
        if name == chosen:
            continue
        ok, r = status[name] if name in status else _status(name, netns)
        alternatives[name] = f"{'usable' if ok else 'unusable'}: {r}"
    return {"source": chosen, "reason": reason, "forced": wanted is not None, "alternatives": alternatives}


def open_source(flow_filter: FlowFilter | None = None, source: str | None = None, *,
                netns: str | None = None, cgroup: str | None = None) -> FlowSource:
    """Open the best usable source (or the one ``source``/``$DWCP_TELEMETRY`` names).

    ``netns`` (a name under /run/netns) watches another namespace: inet_diag enters it; eBPF sees all
    namespaces and keeps that one's flows by inode; tcp_info ignores it (it sees registered sockets).
    ``cgroup`` limits eBPF sockops and inet_diag to sockets of that cgroup v2 directory."""
    wanted, why = _requested(source)
    candidates = [wanted] if wanted else list(SOURCES)
    if wanted is not None and wanted not in SOURCES:
        raise ConfigError(f"telemetry source {wanted!r} ({why}): choose one of {', '.join(SOURCES)}")
    flow_filter = flow_filter or FlowFilter()
    failures: list[str] = []
    for name in candidates:
        try:
            src = _open(name, flow_filter, netns, cgroup)
        except CapabilityError as e:
            if wanted:
                raise CapabilityError(f"telemetry source {name} {why} cannot be used: {e}; "
                                      f"{_advice(name)}") from e
            failures.append(f"{name}: {e}")
            continue
        except ImportError as e:
            if wanted:
                raise CapabilityError(f"telemetry source {name} {why} is not available: {e}; "
                                      f"{_advice(name)}") from e
            failures.append(f"{name}: {e}")
            continue
        if failures:
            log.info("telemetry: using %s (%s unusable)", name, "; ".join(failures))
        return src
    raise CapabilityError("no telemetry source could be opened: " + "; ".join(failures))


def _open(name: str, flow_filter: FlowFilter, netns: str | None, cgroup: str | None) -> FlowSource:
    if name == "ebpf":
        ebpf_source = _ebpf_module()
        ok, reason = ebpf_source.ebpf_available()
        if not ok:
            raise CapabilityError(reason)
        if netns is not None:
            from dataclasses import replace

            from dwcp.telemetry.inet_diag import netns_path
            from dwcp.telemetry.tcp_info import netns_inode
            inode = netns_inode(netns_path(netns))
            if inode == 0:
                raise ConfigError(f"network namespace {netns!r} does not exist; list them with `ip netns list`")
            flow_filter = replace(flow_filter, netns=inode)
        src: FlowSource = ebpf_source.EbpfSource(flow_filter, cgroup=cgroup)
        return src
    if name == "inet_diag":
        from dwcp.telemetry.inet_diag import InetDiagSource
        try:
            return InetDiagSource(flow_filter, netns=netns, cgroup=cgroup)
        except (OSError, ImportError) as e:
            raise CapabilityError(f"sock_diag netlink unusable: {e}") from e
    from dwcp.telemetry.tcp_info import TcpInfoSource
    return TcpInfoSource(flow_filter)
