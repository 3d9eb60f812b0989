"""The delay-line process: start it, read its stats, measure its CPU, stop it.

The emulator is its own process (C, no Python and no GIL on the data path). It is started in a new
session so that a lab made by `dwcp netlab up` outlives the command, and it is recognised later by its
executable name and the namespace paths on its command line, never by a broad name match."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from dwcp.errors import CapabilityError, DWCPError

from ._params import LinkParams
from ._system import BINARY_NAME, delayline_path, ns_path

log = logging.getLogger(__name__)
STATS_INTERVAL_MS = 100
READY_TIMEOUT_S = 5.0


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_delayline(pid: int, ns: str | None = None) -> bool:
    """True if pid is a running dwcp delay line (serving namespace ``ns``, if given)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    if not os.path.basename(exe).startswith(BINARY_NAME):  # "(deleted)" suffix after a rebuild
        return False
    argv = cmdline(pid)
    if len(argv) < 2 or argv[1] != "run":
        return False
    return ns is None or ns_path(ns) in argv


def stray_delaylines(prefix: str = "dwcp-") -> list[int]:
    """PIDs of delay lines serving namespaces named ``prefix``* (ours), whoever started them."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_delayline(int(entry)):
            if any(a.startswith(ns_path(prefix)) for a in cmdline(int(entry))):
                pids.append(int(entry))
    return pids


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie no longer runs
    except OSError:
        return True


def terminate(pid: int, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 3.0) -> None:
    """SIGTERM (the delay line writes final stats and exits), SIGKILL if it hangs."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and _gone(pid):
                return
            time.sleep(0.01)
        log.warning("delay line %d ignored %s", pid, sig.name)
    if proc is not None:
        proc.wait()


class DelayLine:
    """Handle on a running delay line (ours, or found again from a lab's state)."""

    def __init__(self, pid: int, state_dir: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.state_dir = state_dir
        self.stats_path = state_dir / "stats.json"
        self._proc = proc

    @classmethod
    def start(cls, params: LinkParams, ns_a: str, ns_b: str, iface: str, state_dir: Path,
              seed: int | None = None) -> DelayLine:
        """Spawn the emulator and wait until both TUN devices exist (it says "ready" on a pipe)."""
        q_ab, q_ba = params.queue_limits()
        argv = [delayline_path(), "run", "--ns-a", ns_path(ns_a), "--ns-b", ns_path(ns_b), "--dev", iface,
                "--rtt-us", str(round(params.rtt_ms * 1000)),
                "--rate-bps", str(round(params.rate_mbit * 1e6)),
                "--queue-bytes", str(q_ab), "--queue-bytes-rev", str(q_ba),
                "--loss", repr(params.loss), "--stats", str(state_dir / "stats.json"),
                "--stats-interval-ms", str(STATS_INTERVAL_MS)]
        if params.rate_mbit_reverse is not None:
            argv += ["--rate-bps-rev", str(round(params.rate_mbit_reverse * 1e6))]
        if params.trace:
            argv += ["--trace", params.trace]
        if seed is not None:
            argv += ["--seed", str(seed)]
        rfd, wfd = os.pipe()
        argv += ["--ready-fd", str(wfd)]
        logfile = open(state_dir / "delayline.log", "ab")
        try:
            # New session: `dwcp netlab up` returns while the link lives on, and a Ctrl-C in the
            # terminal reaches the Python side (which tears the lab down) rather than the emulator.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                                    pass_fds=(wfd,), start_new_session=True)
        finally:
            os.close(wfd)
            logfile.close()
        try:
            ready, _, _ = select.select([rfd], [], [], READY_TIMEOUT_S)
            got = os.read(rfd, 16) if ready else b""
        finally:
            os.close(rfd)
        (state_dir / "delayline.pid").write_text(f"{proc.pid}\n")
        if got != b"ready\n":
            terminate(proc.pid, proc)
            msg = (state_dir / "delayline.log").read_text(errors="replace").strip()
            err = CapabilityError if "CAP_" in msg or "/dev/net/tun" in msg else DWCPError
            raise err(f"the delay line did not start: {msg or 'no output'}")
        log.debug("delay line %d up: %s", proc.pid, " ".join(argv))
        return cls(proc.pid, state_dir, proc)

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return not _gone(self.pid) and is_delayline(self.pid)

    def stats(self, fresh: bool = False) -> dict[str, Any]:
        """The emulator's counters (see docs/netlab.md), at most STATS_INTERVAL_MS old; with fresh=True
        wait (up to 1 s) for a snapshot written after this call, so it covers every packet sent before."""
        if fresh and self.alive():
            asked = time.time_ns()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    if self.stats_path.stat().st_mtime_ns > asked:
                        break
                except OSError:
                    pass
                time.sleep(STATS_INTERVAL_MS / 4000)
        try:
            data: dict[str, Any] = json.loads(self.stats_path.read_text())
        except (OSError, ValueError) as e:
            raise DWCPError(f"cannot read delay-line stats {self.stats_path}: {e}") from e
        data["alive"] = self.alive()
        data["stats_interval_s"] = STATS_INTERVAL_MS / 1000
        return data

    def cpu_seconds(self) -> float:
        """User + system CPU time the emulator has used so far (from /proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.alive():
            terminate(self.pid, self._proc)
        elif self._proc is not None:
            self._proc.wait()
