"""Namespaces and their interfaces, through netlink (pyroute2); no `ip` commands.

Each host is a network namespace created the way `ip netns add` does it (a bind mount under
/run/netns/NAME), so `ip netns exec NAME ...` works on ours. Its only link is the TUN device the delay
line created inside it; the device disappears when the delay line exits."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket

from pyroute2 import NetNS, netns  # type: ignore[import-untyped]  # no stubs, no py.typed
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from dwcp.errors import ConfigError, DWCPError

from ._system import ns_path

log = logging.getLogger(__name__)
PREFIX = "dwcp-"
IFACE = "wan0"
MTU = 1500
#: TUN's internal ring is tx_queue_len packets long and drops silently when full; 500 (the default)
#: overflows under a 1 Gbit/s TCP burst before the emulator gets to read, so the loss would happen
#: outside the emulated queue. With 10000 only the emulated bottleneck drops.
TXQUEUELEN = 10000


def create_namespace(ns: str) -> None:
    if os.path.exists(ns_path(ns)):
        raise ConfigError(f"network namespace {ns} already exists (`dwcp netlab down --all` removes "
                          "leftovers of crashed runs)")
    netns.create(ns)


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    return sorted(n for n in netns.listnetns() if n.startswith(prefix))


def pids_in_namespace(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns`` (matched by the nsfs inode)."""
    try:
        st = os.stat(ns_path(ns))
    except OSError:
        return []
    pids = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            s = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (s.st_ino, s.st_dev) == (st.st_ino, st.st_dev):
            pids.append(int(entry))
    return pids


def remove_namespace(ns: str) -> None:
    """Kill what still runs inside (a namespace lives on while a process holds it), then unmount it."""
    for pid in pids_in_namespace(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if os.path.exists(ns_path(ns)):
        try:
            netns.remove(ns)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise


def configure_host(ns: str, addr: str, prefixlen: int) -> None:
    """Bring up lo and the TUN device, set MTU and queue length, assign the host address."""
    try:
        with NetNS(ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            found = ipr.link_lookup(ifname=IFACE)
            if not found:
                raise DWCPError(f"namespace {ns} has no {IFACE}: the delay line did not create it")
            idx = found[0]
            ipr.link("set", index=idx, mtu=MTU, txqlen=TXQUEUELEN)
            ipr.addr("add", index=idx, address=addr, prefixlen=prefixlen, family=socket.AF_INET)
            ipr.link("set", index=idx, state="up")
    except NetlinkError as e:
        raise DWCPError(f"configuring {IFACE} in namespace {ns} failed: {e}") from e
