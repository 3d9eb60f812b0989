"""The python dataset: Debian's /usr/bin/python3 running an in-memory store, snapshots in its own layout.

A child /usr/bin/python3 (Debian's python3 package; standard library only) runs pystore.py beside this
file, driven through a pipe: it loads --py-entries entries (decoded JSON records, dataclass objects with
lists of tuples, float series, byte pages, int sets, tuples), then per step updates 1 %, 5 % and 20 % of
them, deletes the oldest 0.3x as many and inserts 0.4x as many (see pystore.py). New pymalloc arenas
are mapped below the old ones and the glibc heap grows: the process's writable mappings change between
snapshots. As with memcached, every snapshot is taken in the process's layout of
that moment (not pinned), and its metadata says how the region list changed.
Cached under /var/tmp/dwcp-hde-data/python-<hash>/.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import CACHE, describe, params_hash, snapshot

NAME = "python"
GENERATOR_VERSION = 1
PYTHON = "/usr/bin/python3"
PROGRAM = Path(__file__).resolve().parent / "pystore.py"


def version() -> str:
    """The interpreter and the Debian package that ships it."""
    real = str(Path(PYTHON).resolve())
    out = subprocess.run([PYTHON, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    pkg = subprocess.run(["dpkg", "-S", real], capture_output=True, text=True,
                         check=False).stdout.split(":")[0].strip()
    ver = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True,
                         check=False).stdout.strip() if pkg else ""
    return f"{out} ({real}, Debian {pkg} {ver})" if pkg else f"{out} ({real}, not from a Debian package)"


def params_for(entries: int, seed: int) -> dict[str, Any]:
    """Everything the dataset depends on; its hash names the cache directory."""
    return {
        "generator": GENERATOR_VERSION, "entries": entries, "seed": seed, "steps": [0.01, 0.05, 0.20],
        "program_sha256": hashlib.sha256(PROGRAM.read_bytes()).hexdigest()[:16],
        "pinned_layout": False, "settle_s": 0.5, "freeze": True, "python_version": version(),
    }


def cache_dir(params: dict[str, Any]) -> Path:
    return CACHE / f"{NAME}-{params_hash(params)}"


class Runtime:
    """The pystore.py child and its request pipe."""

    def __init__(self) -> None:
        # a minimal environment: no venv, no sanitizer preload; a fixed hash seed for repeatable dict layouts
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        self.proc = subprocess.Popen([PYTHON, "-s", "-P", str(PROGRAM)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True, bufsize=1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{PROGRAM.name} exited ({self.proc.wait()}) on {req}")
        reply = dict(json.loads(line))
        if not reply.get("ok"):
            raise RuntimeError(f"{PROGRAM.name} failed {req}: {reply.get('error')}")
        return reply

    def stop(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def build(params: dict[str, Any], tmp: Path) -> dict[str, Any]:
    rt = Runtime()
    meta: dict[str, Any] = {"params": params, "snapshots": []}
    try:
        t0 = time.monotonic()
        r = rt.request(op="load", entries=params["entries"], seed=params["seed"])
        print(f"  loaded {r['entries']:,} entries in {time.monotonic() - t0:.1f} s "
              f"(RSS {rss_bytes(rt.pid) / 2**20:.0f} MiB)", flush=True)
        layout = None
        for k in range(len(params["steps"]) + 1):
            if k:
                r = rt.request(op="mutate", fraction=params["steps"][k - 1], seed=params["seed"] + 10 + k)
            time.sleep(params["settle_s"])
            rss = rss_bytes(rt.pid)
            layout, info = snapshot(rt.pid, tmp, k, layout, pinned=params["pinned_layout"], freeze=params["freeze"])
            info.update({"entries": r["entries"], "updated_entries": r.get("updated", 0),
                         "deleted_entries": r.get("deleted", 0), "inserted_entries": r.get("inserted", 0),
                         "rss_bytes": rss})
            meta["snapshots"].append(info)
            print(f"  {describe(info)}", flush=True)
    finally:
        rt.stop()
    return meta


def summary(meta: dict[str, Any]) -> str:
    """One sentence for BENCHMARKS.md."""
    p, snaps = meta["params"], meta["snapshots"]
    return (f"{p['python_version']} running `bench/hde_datasets/pystore.py`: an in-memory store of "
            f"{p['entries']:,} entries (seed {p['seed']}: decoded JSON records, dataclass orders, float series, "
            "byte pages, int sets, session tuples); then " + ", ".join(f"{100 * f:g} %" for f in p["steps"])
            + " of the entries updated, 0.3× as many of the oldest deleted and 0.4× as many inserted "
            "(new pymalloc arenas, a growing heap). Snapshots in the process's current layout "
            f"(**not pinned**); {snaps[0]['zero_pct']:.1f} % zero pages in snap0.")
