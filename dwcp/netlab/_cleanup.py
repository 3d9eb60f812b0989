"""Taking labs down by name, and sweeping up whatever a crashed run left behind."""

from __future__ import annotations

import logging
from typing import Any

from . import _state
from ._emulator import stray_delaylines, terminate
from ._lab import _teardown, attach
from ._system import check_host
from ._topology import PREFIX, list_namespaces, remove_namespace

log = logging.getLogger(__name__)


def down(name: str) -> None:
    """Take lab ``name`` down: its delay line, its namespaces and everything running in them."""
    check_host()
    attach(name).close()


def down_all() -> dict[str, list[Any]]:
    """Remove every lab, every ``dwcp-``* namespace and every stray delay line serving one.

    Stray means left by a crashed run (no state, or state without a live owner): we recognise our
    delay lines by executable name and the /run/netns/dwcp-* paths on their command line. Returns what
    was removed."""
    check_host()
    removed: dict[str, list[Any]] = {"labs": [], "processes": [], "namespaces": []}
    for name in _state.list_labs():
        try:
            _teardown(name, None)
        except Exception as e:  # keep sweeping
            log.warning("netlab down %s: %s", name, e)
        removed["labs"].append(name)
    for pid in stray_delaylines(PREFIX):
        terminate(pid)
        removed["processes"].append(pid)
    for ns in list_namespaces(PREFIX):
        remove_namespace(ns)
        removed["namespaces"].append(ns)
    return removed
