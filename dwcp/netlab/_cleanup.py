"""Taking labs down by name, and sweeping up whatever a crashed run left behind."""

from __future__ import annotations

import logging
from typing import Any

from dwcp.errors import DWCPError

from . import _state
from ._emulator import cmdline, stray_delaylines, terminate
from ._lab import _teardown, attach
from ._system import check_host, ns_path
from ._topology import PREFIX, list_namespaces, remove_namespace

log = logging.getLogger(__name__)


def down(name: str) -> None:
    """Take lab ``name`` down: its delay line, its namespaces and everything running in them."""
    check_host()
    attach(name).close()


def down_all(force: bool = False) -> dict[str, list[Any]]:
    """Remove every lab, every ``dwcp-``* namespace and every stray delay line serving one.

    Labs owned by a Python process that is still running (``netlab.link()`` in another test run) are
    kept unless ``force``: they are in use, not left over. Labs from `dwcp netlab up` have no owner and
    are removed. Our delay lines are recognised by executable name and the /run/netns/dwcp-* paths on
    their command line. Returns what was removed and what was kept."""
    check_host()
    out: dict[str, list[Any]] = {"labs": [], "processes": [], "namespaces": [], "kept": []}
    keep_ns: set[str] = set()
    for name in _state.list_labs():
        try:
            state = _state.read_state(name)
        except DWCPError:
            state = {}
        if not force and (_state.owner_alive(state) or _state.being_created(name)):
            out["kept"].append(name)
            keep_ns.update(state.get("namespaces", []))
            continue
        try:
            _teardown(name, None)
        except Exception as e:  # keep sweeping
            log.warning("netlab down %s: %s", name, e)
        out["labs"].append(name)
    kept_paths = {ns_path(ns) for ns in keep_ns}
    for pid in stray_delaylines(PREFIX):
        if kept_paths & set(cmdline(pid)):
            continue
        terminate(pid)
        out["processes"].append(pid)
    for ns in list_namespaces(PREFIX):
        if ns not in keep_ns:
            remove_namespace(ns)
            out["namespaces"].append(ns)
    return out


def leftovers() -> dict[str, list[Any]]:
    """What :func:`down_all` would remove now (namespaces, delay lines, labs), without removing it."""
    keep_ns: set[str] = set()
    labs = []
    for name in _state.list_labs():
        try:
            state = _state.read_state(name)
        except DWCPError:
            state = {}
        if _state.owner_alive(state) or _state.being_created(name):
            keep_ns.update(state.get("namespaces", []))
        else:
            labs.append(name)
    kept_paths = {ns_path(ns) for ns in keep_ns}
    return {"labs": labs,
            "processes": [p for p in stray_delaylines(PREFIX) if not kept_paths & set(cmdline(p))],
            "namespaces": [ns for ns in list_namespaces(PREFIX) if ns not in keep_ns]}
