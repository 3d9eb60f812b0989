"""The datasets of bench/hde: real process snapshots, each built by a module here and cached.

Every module has the same face: ``NAME``; ``version()`` of the program it runs; ``params_for(size, seed)``,
everything the dataset depends on (its hash names the cache directory); ``cache_dir(params)``;
``build(params, tmpdir)``, which runs the program under its workload, writes snap0.img ... snapN.img
(with their procmem layout files) and returns the metadata; ``summary(meta)``, one sentence for
BENCHMARKS.md.

- redis: Debian's redis-server, key-value workload, snapshots in a pinned layout (page i stays page i);
- memcached: Debian's memcached, cache workload that adds slab pages, snapshots in the current layout
  (regions grow, so memory behind them moves in the image);
- python: Debian's /usr/bin/python3 running an in-memory store (pystore.py), current layout too.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from . import memcached, python_runtime, redis
from .common import cached

DATASETS: dict[str, ModuleType] = {m.NAME: m for m in (redis, memcached, python_runtime)}
DEFAULT_SIZES = {"redis": 1_000_000, "memcached": 1_000_000, "python": 200_000}


def load(name: str, size: int, seed: int, rebuild: bool) -> tuple[Path, dict[str, Any]]:
    """The dataset ``name`` of ``size`` keys/items/entries: from the cache, or built now."""
    mod = DATASETS[name]
    params = mod.params_for(size, seed)
    return cached(mod.cache_dir(params), f"{name}, {size:,} entries, seed {seed}",
                  lambda tmp: mod.build(params, tmp), rebuild)
