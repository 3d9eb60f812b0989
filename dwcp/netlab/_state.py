"""Where a lab's state lives: /run/dwcp-netlab/NAME/ (tmpfs, so a reboot forgets every lab, as it
forgets the namespaces themselves). ``state.json`` says what to tear down; the delay line rewrites
``stats.json``; its stderr goes to ``delayline.log``; ``delayline.pid`` is its pidfile."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dwcp.errors import ConfigError

STATE_ROOT = Path(os.environ.get("DWCP_NETLAB_STATE", "/run/dwcp-netlab"))


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
