"""The memcached dataset: Debian's memcached under a seeded cache workload, snapshots in its own layout.

memcached on a unix socket (`-s`, which turns all network listeners off; `-m 1024 -t 2`, no preallocation)
is loaded through its text protocol, pipelined with `noreply`, with --mc-items items: JSON user and
session records, counters, access tokens (random, incompressible) and HTML fragments of 0.2-4.5 KB, so the
items land in many slab classes. Then, per step, 1 %, 5 % and 20 % of the items get new values (`set`
with a value of the same kind, `incr` for counters) and new items are added (half as many as updated):
memcached takes new 1 MiB slab pages for them, each a fresh malloc()/mmap(), so its mappings grow.

Every snapshot is taken in the process's layout *of that moment* (procmem without a pinned layout: the
current writable mappings, end to end, in address order). When a mapping grows (glibc places new mmaps
below the old ones, so the slab mapping grows at its start), everything behind it in the image moves:
page i of one snapshot is no longer page i of the next. This is the layout-changing dataset; each
snapshot's metadata says how the region list changed (``layout_change``) and how many pages changed at
the same address (``changed_pct_by_address``) as well as at the same image offset (``changed_pct``).
Cached under /var/tmp/dwcp-hde-data/memcached-<hash>/.
"""

from __future__ import annotations

import base64
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .common import CACHE, CLEAN_ENV, Records, describe, params_hash, snapshot, stop_process

NAME = "memcached"
GENERATOR_VERSION = 1
TYPES = ("user", "session", "counter", "token", "fragment")


def version() -> str:
    out = subprocess.run(["memcached", "-V"], capture_output=True, text=True, check=True).stdout.split()
    return out[-1] if out else "?"


def params_for(items: int, seed: int) -> dict[str, Any]:
    """Everything the dataset depends on; its hash names the cache directory."""
    return {
        "generator": GENERATOR_VERSION, "items": items, "seed": seed, "steps": [0.01, 0.05, 0.20],
        "added_per_update": 0.5,
        "mix": {"user": 0.40, "session": 0.20, "counter": 0.15, "token": 0.15, "fragment": 0.10},
        "memcached_args": ["-m", "1024", "-t", "2", "-c", "64"],
        "pinned_layout": False, "settle_s": 2.0, "freeze": True, "memcached_version": version(),
    }


def cache_dir(params: dict[str, Any]) -> Path:
    return CACHE / f"{NAME}-{params_hash(params)}"


class Workload(Records):
    """Item i's kind is fixed by the seed (items added later draw theirs from the step's generator)."""

    PRODUCTS = ("lamp", "desk", "chair", "kettle", "router", "backpack", "jacket", "monitor", "novel", "drill")

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(int(params["items"]), int(params["seed"]))
        self.weights = [params["mix"][t] for t in TYPES]
        self.types = random.Random(self.seed).choices(range(len(TYPES)), weights=self.weights, k=self.n)

    @property
    def count(self) -> int:
        return len(self.types)

    def add_types(self, rng: random.Random, k: int) -> range:
        first = self.count
        self.types += rng.choices(range(len(TYPES)), weights=self.weights, k=k)
        return range(first, self.count)

    def key(self, i: int) -> bytes:
        t = TYPES[self.types[i]]
        return {"user": b"user:%08d", "session": b"sess:%08d", "counter": b"cnt:views:%08d", "token": b"tok:%08d",
                "fragment": b"frag:/products/%08d"}[t] % i

    def token(self, rng: random.Random, i: int) -> str:
        kind = rng.choice(("api", "oauth", "refresh", "csrf"))
        secret = base64.urlsafe_b64encode(rng.randbytes(rng.choice((24, 32, 48)))).decode()
        return f"{kind}:{rng.randrange(self.n)}:{secret}:{1_790_000_000 + rng.randrange(86400 * 30)}"

    def fragment(self, rng: random.Random, i: int) -> str:
        rows = []
        for _ in range(rng.randint(1, 12)):
            p = rng.randrange(10 * self.n)
            rows.append(f'<li class="product" data-id="{p}"><a href="/products/{p}">{rng.choice(self.PRODUCTS)} '
                        f'{self._text(rng, 0.9)}</a><span class="price">{rng.randint(1, 999)}.{rng.randint(0, 99):02d}'
                        f'</span><p class="blurb">{self._text(rng, 2.3)}</p></li>')
        return f'<ul class="results" data-page="{i}">' + "".join(rows) + "</ul>"

    def value(self, i: int, rng: random.Random) -> bytes:
        t = TYPES[self.types[i]]
        if t == "counter":
            return str(rng.randrange(10 ** rng.randint(1, 9))).encode()
        return {"user": self.user, "session": self.session, "token": self.token,
                "fragment": self.fragment}[t](rng, i).encode()

    def set_command(self, i: int, rng: random.Random) -> bytes:
        v = self.value(i, rng)
        return b"set %s %d 0 %d noreply\r\n%s\r\n" % (self.key(i), self.types[i], len(v), v)

    def update_command(self, i: int, rng: random.Random) -> bytes:
        if TYPES[self.types[i]] == "counter":
            return b"incr %s %d noreply\r\n" % (self.key(i), rng.randint(1, 1000))
        return self.set_command(i, rng)

    def batches(self, commands: Iterable[tuple[int, bool]], rng: random.Random, size: int = 20000) -> Iterator[bytes]:
        """(item, is_update) pairs as pipelined text-protocol commands, ``size`` per chunk."""
        buf: list[bytes] = []
        for i, upd in commands:
            buf.append(self.update_command(i, rng) if upd else self.set_command(i, rng))
            if len(buf) >= size:
                yield b"".join(buf)
                buf = []
        if buf:
            yield b"".join(buf)


class Memcached:
    """Our own memcached child on a unix socket (no network listener)."""

    def __init__(self, workdir: Path, args: list[str]) -> None:
        self.sock = str(workdir / "memcached.sock")
        self.log = workdir / "memcached.log"
        cmd = ["memcached", "-s", self.sock, "-a", "0700", *args]
        if os.geteuid() == 0:
            cmd += ["-u", "root"]  # memcached refuses to run as root without naming a user
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=CLEAN_ENV)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"memcached exited ({self.proc.returncode}): {self.log.read_text().strip()}")
            if os.path.exists(self.sock):
                try:
                    self.stats()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("memcached did not answer within 10 s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        s.connect(self.sock)
        return s

    def pipe(self, chunks: Iterable[bytes]) -> int:
        """Send every chunk on one connection, then `version`, and wait for its answer. The commands are
        `noreply`: any other answer before the version line is an error. A thread drains the socket
        meanwhile, so a server that does answer can never block us both. Returns the bytes sent."""
        s = self._connect()
        got: list[bytes] = []
        failed: list[BaseException] = []

        def drain() -> None:
            tail = b""
            try:
                while True:
                    b = s.recv(1 << 16)
                    if not b:
                        raise RuntimeError("memcached closed the connection")
                    got.append(b)
                    tail = (tail + b)[-200:]
                    if tail.endswith(b"\r\n") and b"VERSION " in tail.rsplit(b"\r\n", 2)[-2]:
                        return
            except BaseException as e:  # noqa: BLE001 -- reported by the caller
                failed.append(e)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        sent = 0
        try:
            for c in chunks:
                s.sendall(c)
                sent += len(c)
            s.sendall(b"version\r\n")
            reader.join(timeout=600)
        finally:
            s.close()
        if failed or reader.is_alive():
            raise RuntimeError(f"memcached pipe failed: {failed[0] if failed else 'no answer to version'}")
        answer = b"".join(got)
        head = answer[:answer.rfind(b"VERSION ")]
        if head:
            raise RuntimeError(f"memcached answered a noreply command: {head[:300]!r}")
        return sent

    def stats(self, sub: str = "") -> dict[str, str]:
        with self._connect() as s:
            s.sendall(f"stats {sub}\r\n".encode() if sub else b"stats\r\n")
            buf = b""
            while not buf.endswith(b"END\r\n"):
                b = s.recv(1 << 16)
                if not b:
                    raise OSError("memcached closed the connection")
                buf += b
        out = {}
        for line in buf.decode().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "STAT":
                out[parts[1]] = parts[2]
        return out

    def stop(self) -> None:
        stop_process(self.proc)


def build(params: dict[str, Any], tmp: Path) -> dict[str, Any]:
    wl = Workload(params)
    mc = Memcached(tmp, params["memcached_args"])
    meta: dict[str, Any] = {"params": params, "snapshots": []}
    try:
        t0 = time.monotonic()
        sent = mc.pipe(wl.batches(((i, False) for i in range(wl.n)), random.Random(params["seed"] + 2)))
        print(f"  loaded {wl.n:,} items ({sent / 1e6:.0f} MB of commands) in {time.monotonic() - t0:.1f} s", flush=True)
        layout = None
        for k in range(len(params["steps"]) + 1):
            updated = added = 0
            if k:
                frac = params["steps"][k - 1]
                rng = random.Random(params["seed"] + 10 + k)
                chosen = rng.sample(range(wl.count), round(frac * wl.n))
                new = wl.add_types(rng, round(frac * wl.n * params["added_per_update"]))
                ops = [(i, True) for i in chosen] + [(i, False) for i in new]
                rng.shuffle(ops)
                mc.pipe(wl.batches(ops, rng))
                updated, added = len(chosen), len(new)
            time.sleep(params["settle_s"])
            st, slabs = mc.stats(), mc.stats("slabs")
            if int(st["curr_items"]) != wl.count or int(st["evictions"]):
                raise RuntimeError(f"memcached holds {st['curr_items']} items (want {wl.count}), "
                                   f"{st['evictions']} evictions: raise -m or check the workload")
            layout, info = snapshot(mc.pid, tmp, k, layout, pinned=params["pinned_layout"], freeze=params["freeze"])
            info.update({"updated_items": updated, "added_items": added, "items": wl.count,
                         "memcached_bytes": int(st["bytes"]),
                         "memcached_total_malloced": int(slabs["total_malloced"]),
                         "memcached_active_slabs": int(slabs["active_slabs"]),
                         "memcached_hash_bytes": int(st["hash_bytes"])})
            meta["snapshots"].append(info)
            print(f"  {describe(info)}; {int(slabs['total_malloced']) / 2**20:.0f} MiB of slab pages", flush=True)
    finally:
        mc.stop()
    for f in ("memcached.sock", "memcached.log"):
        (tmp / f).unlink(missing_ok=True)
    return meta


def summary(meta: dict[str, Any]) -> str:
    """One sentence for BENCHMARKS.md."""
    p, snaps = meta["params"], meta["snapshots"]
    return (f"memcached {p['memcached_version']} (`{' '.join(p['memcached_args'])}`, unix socket) with "
            f"{p['items']:,} items (seed {p['seed']}: JSON user and session records, counters, random access "
            "tokens, HTML fragments of 0.2–4.5 KB) loaded through its text protocol; then "
            + ", ".join(f"{100 * f:g} %" for f in p["steps"]) + f" of the items updated and {p['added_per_update']:g}× "
            "as many added (new 1 MiB slab pages). Snapshots in the process's current layout (**not pinned**: "
            "regions grow, so memory behind them moves in the image); "
            f"{snaps[0]['zero_pct']:.1f} % zero pages in snap0.")
