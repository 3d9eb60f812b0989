"""What netlab needs from the host, and the delay-line binary that provides the data path.

The binary (``dwcp-delayline``, built from csrc/netlab/delayline.c by setup.py next to this module)
has three jobs: ``run`` is the emulator; ``nsexec`` enters a namespace and execs a command (used for
:meth:`Host.popen` instead of a ``preexec_fn``, which is unsafe in threaded programs); ``sysctl`` writes
per-namespace sysctls (``/proc/sys/net`` resolves to the namespace of whoever opens it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dwcp.errors import CapabilityError, DWCPError

BINARY_NAME = "dwcp-delayline"
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


def delayline_path() -> str:
    """The delay-line executable: $DWCP_DELAYLINE, else the one shipped inside this package."""
    env = os.environ.get("DWCP_DELAYLINE")
    path = Path(env) if env else Path(__file__).with_name(BINARY_NAME)
    if not os.access(path, os.X_OK):
        raise CapabilityError(f"netlab delay line {path} is missing or not executable: build it with "
                              "`python setup.py build_ext --inplace` (or reinstall dwcp)")
    return str(path)


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_host() -> None:
    """Raise CapabilityError unless this process can build a lab (and say why it can't)."""
    caps = _effective_caps()
    missing = [n for n, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
               if not caps >> bit & 1]
    if missing:
        raise CapabilityError(
            f"netlab needs root (missing {' and '.join(missing)}): creating network namespaces and "
            "entering them takes CAP_SYS_ADMIN, creating TUN devices and configuring links takes "
            "CAP_NET_ADMIN. Run it as root, e.g. `sudo dwcp netlab ...`.")
    if not os.path.exists("/dev/net/tun"):
        raise CapabilityError("netlab needs /dev/net/tun (the TUN driver) for its delay line: "
                              "`modprobe tun`, or in a container pass the device through")


def ns_path(ns: str) -> str:
    """Namespaces live where `ip netns` keeps them, so `ip netns exec NAME` works on ours."""
    return f"/run/netns/{ns}"


def nsexec_argv(ns: str, argv: list[str]) -> list[str]:
    """argv that runs ``argv`` inside namespace ``ns`` (the command replaces the helper: same PID)."""
    return [delayline_path(), "nsexec", ns_path(ns), *argv]


def set_sysctls(ns: str, values: dict[str, str]) -> None:
    """Write sysctls (dotted keys, e.g. net.ipv4.tcp_rmem) inside namespace ``ns``."""
    args = [f"{k}={v}" for k, v in values.items()]
    r = subprocess.run([delayline_path(), "sysctl", ns_path(ns), *args], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise DWCPError(f"setting sysctls in namespace {ns} failed: {r.stderr.strip()}")
