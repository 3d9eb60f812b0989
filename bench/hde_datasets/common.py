"""What every dataset of bench/hde shares: the cache, snapshots and their statistics, value generators."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dwcp.compression import procmem

CACHE = Path("/var/tmp/dwcp-hde-data")
PAGE = 4096
MAX_SNAPSHOT_BYTES = 16 << 30
# servers must not inherit a sanitizer preload (terabytes of shadow mappings in their snapshots)
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def cached(dest: Path, label: str, build: Callable[[Path], dict[str, Any]],
           rebuild: bool) -> tuple[Path, dict[str, Any]]:
    """The dataset in ``dest``, built first (into a temporary directory renamed at the end, so a dataset
    interrupted half way is never taken for a complete one) if it is missing or ``rebuild`` is set."""
    if rebuild and dest.exists():
        shutil.rmtree(dest)
    if not (dest / "meta.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"building dataset {dest} ({label})", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        try:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        print(f"using cached dataset {dest} ({label})", flush=True)
    return dest, json.loads((dest / "meta.json").read_text())


# --------------------------------------------------------------------------------------- snapshot stats

def page_stats(old: Path | None, new: Path) -> dict[str, Any]:
    """Zero pages of ``new`` and, with ``old``, pages that differ from the same page of ``old`` (pages past
    the end of ``old`` count as changed)."""
    a = np.fromfile(new, dtype=np.uint64).reshape(-1, PAGE // 8)
    out: dict[str, Any] = {"bytes": int(a.nbytes), "pages": int(a.shape[0]),
                           "zero_pages": int((~a.any(axis=1)).sum())}
    out["zero_pct"] = 100 * out["zero_pages"] / out["pages"]
    if old is not None:
        b = np.fromfile(old, dtype=np.uint64).reshape(-1, PAGE // 8)
        n = min(a.shape[0], b.shape[0])
        changed = int((a[:n] != b[:n]).any(axis=1).sum()) + (a.shape[0] - n)
        out["changed_pages"] = changed
        out["changed_pct"] = 100 * changed / out["pages"]
    return out


def _pieces(old: procmem.Layout, new: procmem.Layout) -> list[tuple[int, int, int, int]]:
    """(address, bytes, old image offset, new image offset) of every stretch mapped in both layouts."""
    out = []
    olds = list(zip(old.regions, old.offsets(), strict=True))
    for s, s_off in zip(new.regions, new.offsets(), strict=True):
        for r, r_off in olds:
            lo, hi = max(r.start, s.start), min(r.end, s.end)
            if lo < hi:
                out.append((lo, hi - lo, r_off + lo - r.start, s_off + lo - s.start))
    return out


def layout_change(old: procmem.Layout, new: procmem.Layout) -> dict[str, Any]:
    """How the region list moved between two unpinned snapshots of one process: regions that appeared,
    went, grew or shrank (by address), and how many bytes mapped in both sit at a different offset of the
    image, so that a codec comparing page i with page i sees them as changed."""
    def overlaps(r: procmem.Region, rs: list[procmem.Region]) -> list[procmem.Region]:
        return [x for x in rs if x.start < r.end and r.start < x.end]

    added = [r for r in new.regions if not overlaps(r, old.regions)]
    removed = [r for r in old.regions if not overlaps(r, new.regions)]
    grown, shrunk = [], []  # shrunk: also a region that kept its size but moved
    for r in new.regions:
        for o in overlaps(r, old.regions):
            if (o.start, o.end) != (r.start, r.end):
                (grown if r.size_bytes > o.size_bytes else shrunk).append({
                    "name": r.name or o.name or "anon", "old": [o.start, o.end], "new": [r.start, r.end],
                    "delta_bytes": r.size_bytes - o.size_bytes,
                    "grew_at_start_bytes": o.start - r.start, "grew_at_end_bytes": r.end - o.end})
    pieces = _pieces(old, new)
    shifted = [p for p in pieces if p[2] != p[3]]
    shifts = sorted({p[3] - p[2] for p in shifted})
    return {
        "regions_old": len(old.regions), "regions_new": len(new.regions),
        "added": len(added), "added_bytes": sum(r.size_bytes for r in added),
        "removed": len(removed), "removed_bytes": sum(r.size_bytes for r in removed),
        "grown": len(grown), "grown_bytes": sum(g["delta_bytes"] for g in grown),
        "shrunk": len(shrunk), "shrunk_bytes": -sum(g["delta_bytes"] for g in shrunk),
        "resized": grown + shrunk,
        "common_bytes": sum(p[1] for p in pieces),
        "shifted_bytes": sum(p[1] for p in shifted),
        "shifts_bytes": {"distinct": len(shifts), "min": shifts[0] if shifts else 0,
                         "max": shifts[-1] if shifts else 0},
    }


def address_stats(old_img: Path, old: procmem.Layout, new_img: Path, new: procmem.Layout) -> dict[str, Any]:
    """Pages whose content changed at the same virtual address (what a codec that followed the mappings
    would see), with pages at addresses not mapped in the old snapshot counted as changed."""
    a = np.fromfile(new_img, dtype=np.uint64).reshape(-1, PAGE // 8)
    b = np.fromfile(old_img, dtype=np.uint64).reshape(-1, PAGE // 8)
    same = 0
    for _addr, size, o_off, n_off in _pieces(old, new):
        o, n, k = o_off // PAGE, n_off // PAGE, size // PAGE
        same += int((a[n:n + k] == b[o:o + k]).all(axis=1).sum())
    pages = int(a.shape[0])
    return {"changed_pages_by_address": pages - same, "changed_pct_by_address": 100 * (pages - same) / pages}


def snapshot(pid: int, workdir: Path, k: int, prev: procmem.Layout | None, *, pinned: bool,
             freeze: bool) -> tuple[procmem.Layout, dict[str, Any]]:
    """snap<k>.img of process ``pid`` in ``workdir``: with ``pinned`` in the layout of the previous
    snapshot (each address keeps its image offset), else in the process's current layout."""
    img = workdir / f"snap{k}.img"
    snap = procmem.snapshot_process(pid, img, layout=prev if pinned else None, freeze=freeze,
                                    max_bytes=MAX_SNAPSHOT_BYTES)
    layout = snap.layout
    info: dict[str, Any] = {"file": img.name, "bytes": snap.size_bytes, "read_bytes": snap.read_bytes,
                            "unmapped_bytes": snap.unmapped_bytes, "regions": len(layout.regions),
                            "skipped_regions": [s.__dict__ for s in layout.skipped]}
    info.update(page_stats(workdir / f"snap{k - 1}.img" if k else None, img))
    if k and not pinned and prev is not None:
        info["layout_change"] = layout_change(prev, layout)
        info.update(address_stats(workdir / f"snap{k - 1}.img", prev, img, layout))
    return layout, info


def describe(info: dict[str, Any]) -> str:
    s = (f"{info['file']}: {info['bytes'] / 2**20:.1f} MiB in {info['regions']} regions, "
         f"{info['zero_pct']:.1f} % zero pages")
    if "changed_pct" in info:
        s += f", {info['changed_pct']:.1f} % pages changed"
    if "layout_change" in info:
        c = info["layout_change"]
        s += (f" ({info['changed_pct_by_address']:.1f} % by address); layout: +{c['added']} -{c['removed']} regions, "
              f"{c['grown']} grown by {c['grown_bytes'] / 2**20:.1f} MiB, {c['shrunk']} shrunk by "
              f"{c['shrunk_bytes'] / 2**20:.1f} MiB, {c['shifted_bytes'] / 2**20:.1f} of "
              f"{c['common_bytes'] / 2**20:.1f} MiB kept memory at a new image offset")
    return s


# ----------------------------------------------------------------------------------------------- values

class Records:
    """Seeded values of realistic shapes (JSON user and session records, free text, hash fields, events)."""

    FIRST = ("Ana", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam",
             "Maya", "Noah", "Olga", "Pablo", "Qi", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe")
    LAST = ("Smith", "Garcia", "Müller", "Rossi", "Kowalski", "Novak", "Tanaka", "Silva", "Dubois", "Jensen",
            "Okafor", "Haddad", "Nguyen", "Petrov", "Larsen", "Moreau", "Costa", "Brown", "Ivanova", "Kim")
    COUNTRIES = ("DE", "US", "FR", "BR", "JP", "IN", "PL", "NG", "SE", "ES", "IT", "CA", "KR", "MX", "NL")
    PLANS = ("free", "basic", "pro", "team", "enterprise")
    TAGS = ("beta", "vip", "churn-risk", "mobile", "desktop", "newsletter", "trial", "referral", "eu", "apac")
    HASH_FIELDS = ("name", "email", "visits", "last_seen", "score", "city", "plan", "ref", "lang", "tz", "device",
                   "cart_items")
    EVENTS = ("view", "click", "add_to_cart", "checkout", "login", "logout", "search", "share")

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        wr = random.Random(seed + 1)
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        self.words = ["".join(wr.choice(letters[:10 + i % 16]) for _ in range(wr.randint(2, 11)))
                      for i in range(2000)]

    def _text(self, rng: random.Random, mu: float) -> str:
        n = min(300, max(1, int(rng.lognormvariate(mu, 0.8))))
        return " ".join(rng.choice(self.words) for _ in range(n))

    def user(self, rng: random.Random, i: int) -> str:
        f, last = rng.choice(self.FIRST), rng.choice(self.LAST)
        doc = {"id": i, "name": f"{f} {last}", "email": f"{f.lower()}.{last.lower()}{rng.randint(1, 999)}@example.com",
               "created": 1_600_000_000 + rng.randrange(150_000_000), "country": rng.choice(self.COUNTRIES),
               "plan": rng.choice(self.PLANS), "score": round(rng.random() * 100, 2),
               "tags": rng.sample(self.TAGS, rng.randint(0, 4)), "bio": self._text(rng, 3.2)}
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))

    def session(self, rng: random.Random, i: int) -> str:
        return json.dumps({"uid": rng.randrange(self.n), "token": rng.randbytes(32).hex(),
                           "ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                           "exp": 1_790_000_000 + rng.randrange(86400 * 30),
                           "ua": f"Mozilla/5.0 (X11; Linux x86_64) Firefox/{rng.randint(100, 130)}.0"},
                          separators=(",", ":"))

    def hash_value(self, rng: random.Random, field: str) -> str:
        if field in ("visits", "cart_items", "last_seen"):
            return str(rng.randrange(10 ** rng.randint(1, 10)))
        if field == "score":
            return f"{rng.random() * 1000:.3f}"
        return self._text(rng, 0.7)

    def event(self, rng: random.Random) -> str:
        return f"{rng.choice(self.EVENTS)}:{1_700_000_000 + rng.randrange(10 ** 8)}:{rng.randrange(10 ** 9):x}"


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server this module started, SIGKILL it if it has not exited within 20 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
