"""Where a lab's state lives: /run/dwcp-netlab/NAME/ (tmpfs, so a reboot forgets every lab, as it
forgets the namespaces themselves). ``state.json`` says what to tear down; the delay line rewrites
``stats.json``; its stderr goes to ``delayline.log``; ``delayline.pid`` is its pidfile."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dwcp.errors import ConfigError

STATE_ROOT = Path(os.environ.get("DWCP_NETLAB_STATE", "/run/dwcp-netlab"))


def process_start(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), which tells it apart from a later process
    that reuses its PID; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_alive(state: dict[str, Any]) -> bool:
    """True if the lab belongs to a Python process (netlab.link) that is still running. Labs made by
    `dwcp netlab up` have no owner: they live until taken down."""
    if not state:
        return False
    pid, start = state.get("owner_pid"), state.get("owner_start")
    return pid is not None and start is not None and process_start(int(pid)) == start


def being_created(name: str, grace_s: float = 10.0) -> bool:
    """A lab directory without state.json for a few seconds is a lab being set up right now
    (claim() and the first write_state() are a moment apart), not a leftover."""
    d = lab_dir(name)
    try:
        return not (d / "state.json").exists() and time.time() - d.stat().st_mtime < grace_s
    except OSError:
        return False


def lab_dir(name: str) -> Path:
    return STATE_ROOT / name


def list_labs() -> list[str]:
    """Names of the labs that have state (up, or left behind by a crashed run)."""
    if not STATE_ROOT.is_dir():
        return []
    return sorted(p.name for p in STATE_ROOT.iterdir() if p.is_dir())


def claim(name: str) -> Path:
    """Create the lab's directory; it must not exist yet (mkdir is the lock against a second `up`)."""
    STATE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    d = lab_dir(name)
    try:
        d.mkdir(mode=0o755)
    except FileExistsError:
        raise ConfigError(f"netlab link {name!r} already exists: `dwcp netlab down {name}` first, "
                          "or choose another name") from None
    return d


def write_state(name: str, state: dict[str, Any]) -> None:
    d = lab_dir(name)
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(d / "state.json")


def read_state(name: str) -> dict[str, Any]:
    path = lab_dir(name) / "state.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no netlab link named {name!r} (`dwcp netlab status` lists them)") from None
    except ValueError as e:
        raise ConfigError(f"{path} is corrupt ({e}); `dwcp netlab down {name}` removes it") from None
    return data


def remove(name: str) -> None:
    shutil.rmtree(lab_dir(name), ignore_errors=True)
