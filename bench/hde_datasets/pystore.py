"""An in-memory store inside a Python runtime: the workload process of bench/hde's python dataset.

Run by Debian's /usr/bin/python3 (standard library only) and driven through its stdin/stdout, one JSON
object per line each way:

    {"op": "load", "entries": N, "seed": S}          fill the store with N entries
    {"op": "mutate", "fraction": F, "seed": S}       update F of the entries, delete and insert some
    {"op": "quit"}

Each request is answered with one JSON line ({"ok": true, ...counts} or {"ok": false, "error": ...}); the
process waits, blocked on stdin, between requests (that is when its memory is snapshotted).

The store maps string keys to what a service keeps in memory: decoded JSON user records (dicts of str,
int, float, list), order objects (a dataclass holding a list of line-item tuples), metric series (lists of
floats), rendered pages (bytes of 0.2-2.5 KB, most above pymalloc's 512 B, so glibc malloc), tag indexes
(sets of ints) and session tuples. A mutation rewrites fields of F*N random entries, deletes the oldest
0.3*F*N entries (allocated together at load time, so their pymalloc pools empty out for reuse) and
inserts 0.4*F*N new ones (new pymalloc arenas, glibc heap growth): the process's mappings grow between
snapshots, in the middle of the image.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import random
import sys
from typing import Any

KINDS = ("user", "order", "series", "page", "index", "session")
WEIGHTS = (0.34, 0.18, 0.16, 0.07, 0.10, 0.15)
DELETED_PER_UPDATE = 0.3
INSERTED_PER_UPDATE = 0.4

FIRST = ["Ana", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pablo", "Qi", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe"]
LAST = ["Smith", "Garcia", "Müller", "Rossi", "Kowalski", "Novak", "Tanaka", "Silva", "Dubois", "Jensen",
        "Okafor", "Haddad", "Nguyen", "Petrov", "Larsen", "Moreau", "Costa", "Brown", "Ivanova", "Kim"]
COUNTRIES = ["DE", "US", "FR", "BR", "JP", "IN", "PL", "NG", "SE", "ES", "IT", "CA", "KR", "MX", "NL"]
PLANS = ["free", "basic", "pro", "team", "enterprise"]
TAGS = ["beta", "vip", "churn-risk", "mobile", "desktop", "newsletter", "trial", "referral", "eu", "apac"]
STATUSES = ["new", "paid", "packed", "shipped", "delivered", "returned", "cancelled"]


@dataclasses.dataclass
class Order:
    id: int
    customer: int
    lines: list[tuple[str, int, float]]
    total: float
    status: str
    created: int
    note: str


class Store:
    def __init__(self, seed: int) -> None:
        wr = random.Random(seed + 1)
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        self.words = ["".join(wr.choice(letters[:10 + i % 16]) for _ in range(wr.randint(2, 11)))
                      for i in range(2000)]
        self.data: dict[str, Any] = {}
        self.next_id = 0

    def text(self, rng: random.Random, mu: float) -> str:
        n = min(300, max(1, int(rng.lognormvariate(mu, 0.8))))
        return " ".join(rng.choice(self.words) for _ in range(n))

    def user(self, rng: random.Random, i: int) -> dict[str, Any]:
        f, last = rng.choice(FIRST), rng.choice(LAST)
        doc = {"id": i, "name": f"{f} {last}", "email": f"{f.lower()}.{last.lower()}{rng.randint(1, 999)}@example.com",
               "created": 1_600_000_000 + rng.randrange(150_000_000), "country": rng.choice(COUNTRIES),
               "plan": rng.choice(PLANS), "score": round(rng.random() * 100, 2),
               "tags": rng.sample(TAGS, rng.randint(0, 4)), "bio": self.text(rng, 2.8)}
        return dict(json.loads(json.dumps(doc)))  # as a service holds it: decoded from a JSON request

    def order_line(self, rng: random.Random) -> tuple[str, int, float]:
        return (f"SKU-{rng.randrange(10 ** 6):06d}", rng.randint(1, 5), round(rng.uniform(1, 500), 2))

    def order(self, rng: random.Random, i: int) -> Order:
        lines = [self.order_line(rng) for _ in range(rng.randint(1, 8))]
        return Order(i, rng.randrange(10 ** 7), lines, round(sum(q * p for _, q, p in lines), 2),
                     rng.choice(STATUSES), 1_700_000_000 + rng.randrange(10 ** 8), self.text(rng, 1.0))

    def make(self, kind: str, rng: random.Random, i: int) -> Any:
        if kind == "user":
            return self.user(rng, i)
        if kind == "order":
            return self.order(rng, i)
        if kind == "series":
            return [rng.gauss(100, 15) for _ in range(rng.randint(20, 120))]
        if kind == "page":
            return f"<html><body><h1>{i}</h1><p>{self.text(rng, 5.0)}</p></body></html>".encode()
        if kind == "index":
            return {rng.randrange(10 ** 7) for _ in range(rng.randint(5, 60))}
        return (rng.randbytes(24).hex(), rng.randrange(10 ** 7), 1_790_000_000 + rng.randrange(86400 * 30),
                f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}")

    def insert(self, rng: random.Random, k: int) -> None:
        for kind in rng.choices(KINDS, weights=WEIGHTS, k=k):
            i = self.next_id
            self.next_id += 1
            self.data[f"{kind}:{i:08d}"] = self.make(kind, rng, i)

    def update(self, key: str, rng: random.Random) -> None:
        kind, _, num = key.partition(":")
        v = self.data[key]
        if kind == "user":
            v["score"] = round(rng.random() * 100, 2)
            v["plan"] = rng.choice(PLANS)
            if rng.random() < 0.5:
                v["bio"] = self.text(rng, 2.8)
            if rng.random() < 0.3:
                v["tags"].append(rng.choice(TAGS))
        elif kind == "order":
            v.status = rng.choice(STATUSES)
            if rng.random() < 0.4:
                v.lines.append(self.order_line(rng))
                v.total = round(sum(q * p for _, q, p in v.lines), 2)
        elif kind == "series":
            for _ in range(rng.randint(1, 10)):  # a ring of recent samples
                v.append(rng.gauss(100, 15))
                del v[0]
        elif kind == "index":
            v.discard(next(iter(v), None))
            v.update(rng.randrange(10 ** 7) for _ in range(rng.randint(1, 5)))
        else:  # page, session: a new value of the same kind
            self.data[key] = self.make(kind, rng, int(num))

    def mutate(self, fraction: float, seed: int) -> dict[str, int]:
        rng = random.Random(seed)
        n = len(self.data)
        keys = list(self.data)
        for key in rng.sample(keys, round(fraction * n)):
            self.update(key, rng)
        deleted = round(DELETED_PER_UPDATE * fraction * n)
        for key in keys[:deleted]:  # the oldest entries
            del self.data[key]
        del keys
        inserted = round(INSERTED_PER_UPDATE * fraction * n)
        self.insert(rng, inserted)
        gc.collect()
        return {"updated": round(fraction * n), "deleted": deleted, "inserted": inserted, "entries": len(self.data)}


def main() -> None:
    store: Store | None = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "load":
                store = Store(int(req["seed"]))
                store.insert(random.Random(int(req["seed"]) + 2), int(req["entries"]))
                gc.collect()
                reply: dict[str, Any] = {"ok": True, "entries": len(store.data)}
            elif req["op"] == "mutate":
                assert store is not None, "load first"
                reply = {"ok": True, **store.mutate(float(req["fraction"]), int(req["seed"]))}
            elif req["op"] == "quit":
                return
            else:
                reply = {"ok": False, "error": f"unknown op {req['op']!r}"}
        except Exception as e:  # noqa: BLE001 -- the controller reports it and stops us
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
