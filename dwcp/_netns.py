"""Run a function inside another network namespace (telemetry's inet_diag source, netlab's veth links).

setns(CLONE_NEWNET) changes only the calling thread's namespace, so the function runs on a short-lived
thread that enters the namespace first; whatever it creates there (a netlink socket) stays bound to
that namespace after the thread is gone, and the caller's own thread never moves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from dwcp.errors import CapabilityError, ConfigError, DWCPError

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """fn() on a fresh thread that first enters the network namespace at ``path`` (a /run/netns/NAME
    or /proc/PID/ns/net file); its result or exception is handed back to the caller's thread."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            box["error"] = ConfigError(f"network namespace {path}: cannot open it ({e.strerror}); "
                                       "list them with `ip netns list`")
            return
        try:
            if _libc().setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                if err == _errno.EPERM:
                    box["error"] = CapabilityError(
                        f"entering network namespace {path} needs CAP_SYS_ADMIN; run as root "
                        "(your own namespace needs no privileges)")
                else:
                    box["error"] = DWCPError(f"setns({path}) failed: {os.strerror(err)}")
                return
            box["result"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e
        finally:
            os.close(fd)
        # The thread ends here, and its namespace membership with it.

    t = threading.Thread(target=target, name="dwcp-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result
