"""The kernel's own network events: links and routes going up or down, read over rtnetlink (pyroute2).

A link that goes down or a route that changes can move a peer to another path long before the flow
telemetry notices (a stalled flow produces no samples at all), so the Manager re-decides the peers it
affects at once. The watcher subscribes to the RTMGRP_LINK and IPv4/IPv6 route multicast groups of one
network namespace (the caller's, or a named one) and reports each change once: RTM_NEWLINK fires for
every attribute change, so a link's up/down state is remembered and only transitions are reported.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dwcp.errors import CapabilityError

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
IFF_UP = 0x1
IFF_RUNNING = 0x40


@dataclass(frozen=True)
class NetEvent:
    kind: str            # "link_up" | "link_down" | "route_added" | "route_removed"
    ifindex: int
    ifname: str = ""     # links: the interface's name
    dst: str = ""        # routes: the destination prefix ("10.8.0.0/16", "default")
    at_s: float = 0.0

    def __str__(self) -> str:
        if self.kind.startswith("link"):
            return f"{self.kind} {self.ifname or self.ifindex}"
        return f"{self.kind} {self.dst} dev {self.ifindex}"


def _query(netns: str | None) -> Any:
    """A pyroute2 IPRoute for requests, used and closed by the calling thread (pyroute2 0.9's sync
    sockets serve only the thread that made them)."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]  # no stubs, no py.typed
    try:
        return IPRoute(netns=netns) if netns else IPRoute()
    except OSError as e:
        raise CapabilityError(f"cannot open rtnetlink{' in namespace ' + netns if netns else ''}: {e}; "
                              "network events are unavailable (the Manager still re-decides on telemetry)") from e


def _event_socket(netns: str | None, groups: int) -> socket.socket:
    """A raw rtnetlink socket subscribed to groups, in netns (it stays bound to the namespace it was
    made in). Raw, not pyroute2's: its sync socket cannot be read from another thread; its message
    classes still parse what arrives."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind((0, groups))
        except BaseException:
            s.close()
            raise
        return s
    try:
        if netns:
            from dwcp._netns import run_in_netns
            return run_in_netns(f"/run/netns/{netns}" if "/" not in netns else netns, make)
        return make()
    except OSError as e:
        raise CapabilityError(f"cannot subscribe to rtnetlink events: {e.strerror or e}") from e


class NetlinkWatcher:
    """Calls ``callback(NetEvent)`` from its own thread for every link up/down and route change.

    ``route_oif(address)`` answers which interface the kernel routes a peer through, so the Manager
    can tell which peers an event touches."""

    def __init__(self, callback: Callable[[NetEvent], None], *, netns: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from pyroute2.netlink.rtnl import (RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE,  # type: ignore[import-untyped]
                                           RTMGRP_LINK)
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl  # type: ignore[import-untyped]
        self.callback = callback
        self.netns = netns
        self.clock = clock
        self._events = _event_socket(netns, RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
        self._marshal = MarshalRtnl()
        self._up: dict[int, bool] = {}
        try:
            with _query(netns) as ip:
                for link in ip.get_links():
                    self._up[int(link["index"])] = _is_up(link)
        except BaseException:
            self._events.close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dwcp-netlink", daemon=True)
        self._thread.start()

    def route_oif(self, address: str) -> int | None:
        """The interface index the kernel would send to ``address`` through (None: no route)."""
        try:
            with _query(self.netns) as ip:
                routes = ip.route("get", dst=address)
        except Exception as e:  # pyroute2 raises NetlinkError (an OSError) for "no route"
            log.debug("no route to %s: %s", address, e)
            return None
        for r in routes:
            oif = r.get_attr("RTA_OIF")
            if oif is not None:
                return int(oif)
        return None

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        self._events.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> NetlinkWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        fd = self._events.fileno()
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([fd, self._wake_r], [], [])
            except OSError as e:
                log.warning("netlink watcher stopped: %s", e)
                return
            if self._stop.is_set():
                return
            if fd not in ready:
                continue
            try:
                messages = self._marshal.parse(self._events.recv(1 << 16))
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    # The kernel dropped events (we were too slow): states may be stale, so say
                    # everything may have changed.
                    log.warning("netlink events were dropped (ENOBUFS); reporting a route change")
                    self._dispatch(NetEvent("route_added", 0, dst="(events lost)", at_s=self.clock()))
                    continue
                log.warning("netlink watcher stopped reading events: %s", e)
                return
            for msg in messages:
                event = self._translate(msg)
                if event is not None:
                    self._dispatch(event)

    def _dispatch(self, event: NetEvent) -> None:
        try:
            self.callback(event)
        except Exception:
            log.exception("network event listener failed on %s", event)

    def _translate(self, msg: Any) -> NetEvent | None:
        kind = msg.get("event")
        now = self.clock()
        if kind in ("RTM_NEWLINK", "RTM_DELLINK"):
            index = int(msg.get("index", 0))
            up = kind == "RTM_NEWLINK" and _is_up(msg)
            was = self._up.get(index)
            self._up[index] = up
            if kind == "RTM_DELLINK":
                self._up.pop(index, None)
            if was is not None and was == up:
                return None
            if was is None and not up:
                return None  # a link that appeared down: nothing routed through it yet
            return NetEvent("link_up" if up else "link_down", index, str(msg.get_attr("IFLA_IFNAME") or ""),
                            at_s=now)
        if kind in ("RTM_NEWROUTE", "RTM_DELROUTE"):
            dst = msg.get_attr("RTA_DST")
            plen = msg.get("dst_len", 0)
            oif = msg.get_attr("RTA_OIF") or 0
            text = f"{dst}/{plen}" if dst else "default"
            return NetEvent("route_added" if kind == "RTM_NEWROUTE" else "route_removed", int(oif), dst=text,
                            at_s=now)
        return None


def _is_up(link: Any) -> bool:
    flags = int(link.get("flags", 0))
    oper = link.get_attr("IFLA_OPERSTATE")
    if oper is not None and oper not in ("UP", "UNKNOWN"):
        return False
    return bool(flags & IFF_UP) and bool(flags & IFF_RUNNING)
