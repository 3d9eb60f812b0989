"""The redis dataset: Debian's redis-server under a seeded key-value workload, snapshots in a pinned layout.

redis-server on a unix socket (persistence off, maxmemory far above the data, no eviction) is loaded
through `redis-cli --pipe` with --keys keys (JSON user records, session records with random tokens,
counters, small hashes and lists); its private writable memory is snapshotted as snap0; then 1 %, 5 % and
20 % of the keys get new values of the same shape, a snapshot after each step. Every snapshot keeps the
layout of the one before (procmem's pinned layout: an address keeps its image offset, new memory is
appended), so page i of one snapshot is page i of the next. Cached under /var/tmp/dwcp-hde-data/<hash>/
(no name prefix: the directory of the first version of bench/hde, which had only this dataset).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import CACHE, CLEAN_ENV, Records, params_hash, snapshot, stop_process

NAME = "redis"
GENERATOR_VERSION = 1
TYPES = ("user", "session", "counter", "hash", "list")


def version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else out.strip()


def params_for(keys: int, seed: int) -> dict[str, Any]:
    """Everything the dataset depends on; its hash names the cache directory. Do not change what this
    returns for the defaults: the cached dataset (and every result measured on it) is found by it."""
    return {
        "generator": GENERATOR_VERSION, "keys": keys, "seed": seed, "steps": [0.01, 0.05, 0.20],
        "mix": {"user": 0.45, "session": 0.20, "counter": 0.15, "hash": 0.12, "list": 0.08},
        "redis_args": ["--save", "", "--appendonly", "no", "--maxmemory", "8gb", "--maxmemory-policy",
                       "noeviction", "--hz", "10", "--io-threads", "1", "--loglevel", "warning"],
        "settle_s": 2.0, "freeze": True, "redis_version": version(),
    }


def cache_dir(params: dict[str, Any]) -> Path:
    return CACHE / params_hash(params)


def resp(*args: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class Workload(Records):
    """Key i's type is fixed by the seed; values change per step."""

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(int(params["keys"]), int(params["seed"]))
        rng = random.Random(self.seed)
        mix = params["mix"]
        self.types = rng.choices(range(len(TYPES)), weights=[mix[t] for t in TYPES], k=self.n)

    def key(self, i: int) -> str:
        t = TYPES[self.types[i]]
        return {"user": f"user:{i:08d}", "session": f"sess:{i:08d}", "counter": f"cnt:views:{i:08d}",
                "hash": f"profile:{i:08d}", "list": f"events:{i:08d}"}[t]

    def load_commands(self, i: int, rng: random.Random) -> bytes:
        t = TYPES[self.types[i]]
        k = self.key(i)
        if t == "user":
            return resp("SET", k, self.user(rng, i))
        if t == "session":
            return resp("SET", k, self.session(rng, i))
        if t == "counter":
            return resp("SET", k, str(rng.randrange(10 ** rng.randint(1, 9))))
        if t == "hash":
            fields = rng.sample(self.HASH_FIELDS, rng.randint(4, 12))
            return resp("HSET", k, *[x for f in fields for x in (f, self.hash_value(rng, f))])
        return resp("RPUSH", k, *[self.event(rng) for _ in range(rng.randint(5, 30))])

    def update_commands(self, i: int, rng: random.Random) -> bytes:
        t = TYPES[self.types[i]]
        k = self.key(i)
        if t == "counter":
            return resp("INCRBY", k, str(rng.randint(1, 1000)))
        if t == "hash":
            fields = rng.sample(self.HASH_FIELDS[:4], rng.randint(1, 3))
            return resp("HSET", k, *[x for f in fields for x in (f, self.hash_value(rng, f))])
        if t == "list":
            return resp("LSET", k, str(rng.randrange(5)), self.event(rng))
        return self.load_commands(i, rng)  # strings: a new value of the same shape

    def batches(self, indices: Iterator[int] | range | list[int], rng: random.Random, update: bool,
                size: int = 20000) -> Iterator[bytes]:
        buf: list[bytes] = []
        f = self.update_commands if update else self.load_commands
        for i in indices:
            buf.append(f(i, rng))
            if len(buf) >= size:
                yield b"".join(buf)
                buf = []
        if buf:
            yield b"".join(buf)


class Redis:
    """Our own redis-server child on a unix socket."""

    def __init__(self, workdir: Path, args: list[str]) -> None:
        self.sock = str(workdir / "redis.sock")
        self.proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", self.sock, "--unixsocketperm",
                                      "700", "--dir", str(workdir), "--daemonize", "no", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CLEAN_ENV)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited: {err}")
            if os.path.exists(self.sock) and self.cli("PING").strip() == "PONG":
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-s", self.sock, *args], capture_output=True, text=True,
                              timeout=60, check=False).stdout

    def pipe(self, chunks: Iterator[bytes]) -> int:
        p = subprocess.Popen(["redis-cli", "-s", self.sock, "--pipe"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert p.stdin is not None and p.stdout is not None
        for c in chunks:
            p.stdin.write(c)
        p.stdin.close()
        out = p.stdout.read().decode()
        if p.wait() != 0 or "errors: 0," not in out:
            raise RuntimeError(f"redis-cli --pipe failed: {out.strip()}")
        return int(re.search(r"replies: (\d+)", out).group(1))  # type: ignore[union-attr]

    def info_memory(self) -> dict[str, str]:
        return dict(line.split(":", 1) for line in self.cli("INFO", "memory").splitlines() if ":" in line)

    def stop(self) -> None:
        stop_process(self.proc)


def build(params: dict[str, Any], tmp: Path) -> dict[str, Any]:
    wl = Workload(params)
    redis = Redis(tmp, params["redis_args"])
    meta: dict[str, Any] = {"params": params, "snapshots": []}
    try:
        t0 = time.monotonic()
        replies = redis.pipe(wl.batches(range(wl.n), random.Random(params["seed"] + 2), update=False))
        dbsize = int(redis.cli("DBSIZE").strip())
        if dbsize != wl.n:
            raise RuntimeError(f"redis holds {dbsize} keys after loading {wl.n}: the workload or redis misbehaved")
        print(f"  loaded {replies} commands in {time.monotonic() - t0:.1f} s "
              f"(used_memory {redis.info_memory().get('used_memory_human', '?').strip()})", flush=True)
        layout = None
        for k in range(len(params["steps"]) + 1):
            if k:
                frac = params["steps"][k - 1]
                rng = random.Random(params["seed"] + 10 + k)
                chosen = rng.sample(range(wl.n), round(frac * wl.n))
                redis.pipe(wl.batches(chosen, rng, update=True))
            time.sleep(params["settle_s"])
            mem = redis.info_memory()
            layout, info = snapshot(redis.pid, tmp, k, layout, pinned=True, freeze=params["freeze"])
            info.update({"updated_keys": 0 if k == 0 else round(params["steps"][k - 1] * wl.n),
                         "redis_used_memory_bytes": int(mem["used_memory"]),
                         "redis_rss_bytes": int(mem["used_memory_rss"])})
            meta["snapshots"].append(info)
            print(f"  snap{k}: {info['bytes'] / 2**20:.1f} MiB, {info['zero_pct']:.1f} % zero pages"
                  + (f", {info['changed_pct']:.1f} % pages changed" if k else ""), flush=True)
    finally:
        redis.stop()
    for f in tmp.glob("redis.sock"):
        f.unlink()
    return meta


def summary(meta: dict[str, Any]) -> str:
    """One sentence for BENCHMARKS.md."""
    p, snaps = meta["params"], meta["snapshots"]
    return (f"redis-server {p['redis_version']} with {p['keys']:,} keys (seed {p['seed']}: JSON user and session "
            "records, counters, hashes, lists), loaded through `redis-cli --pipe`; then "
            + ", ".join(f"{100 * f:g} %" for f in p["steps"]) + " of the keys updated. Snapshots in a pinned "
            f"layout (an address keeps its image offset; {snaps[0]['zero_pct']:.1f} % zero pages in snap0). "
            "The issue's reference data: ~464 MiB, 24 % zero pages, 16/41/65 % of pages changed per step.")
