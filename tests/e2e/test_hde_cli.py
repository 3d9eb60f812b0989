"""`dwcp hde encode/decode` round trip on a real snapshot pair: the memory of a small redis-server.

Our own redis-server child (unix socket, no persistence) gets ~30k keys; its writable memory is
snapshotted with dwcp.compression.procmem, some keys change, a second snapshot follows; the CLI encodes
the second against the first and must decode it back byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dwcp.compression import procmem

pytestmark = pytest.mark.skipif(not shutil.which("redis-server") or not shutil.which("redis-cli"),
                                reason="redis-server/redis-cli not installed (apt-get install redis-server)")

KEYS = 30_000
# Under `make sanitize` the suite runs with LD_PRELOAD=libasan; a redis-server inheriting it would map
# terabytes of (untouched) shadow memory for the snapshot to read. redis is not under test: run it clean.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
LIMIT = 1 << 30  # a snapshot of this redis is ~60 MiB; anything near the limit is a bug, not a fill-up


def resp(*args: str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def value(i: int, version: int) -> str:
    return json.dumps({"id": i, "v": version, "name": f"user{i}", "bio": "lorem ipsum dolor " * (i % 17),
                       "token": f"{(i * 2654435761 + version * 97) % 2**32:08x}" * 4})


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CLEAN_ENV)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not create its socket within 10 s"
            time.sleep(0.02)
        yield proc, sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pipe(sock: Path, commands: bytes) -> None:
    r = subprocess.run(["redis-cli", "-s", str(sock), "--pipe"], input=commands, capture_output=True, timeout=60,
                       env=CLEAN_ENV)
    assert r.returncode == 0 and b"errors: 0," in r.stdout, r.stdout + r.stderr


def dwcp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dwcp.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_hde_round_trip_on_redis_snapshots(redis: tuple[subprocess.Popen[bytes], Path], tmp_path: Path) -> None:
    proc, sock = redis
    pipe(sock, b"".join(resp("SET", f"user:{i}", value(i, 0)) for i in range(KEYS)))
    s0 = procmem.snapshot_process(proc.pid, tmp_path / "s0", freeze=True, max_bytes=LIMIT)
    pipe(sock, b"".join(resp("SET", f"user:{i}", value(i, 1)) for i in range(0, KEYS, 20)))  # 5 % of keys
    s1 = procmem.snapshot_process(proc.pid, tmp_path / "s1", layout=s0.layout, freeze=True, max_bytes=LIMIT)
    assert s1.size_bytes >= s0.size_bytes > 1 << 20
    old, new = (tmp_path / "s0").read_bytes(), (tmp_path / "s1").read_bytes()
    assert old != new[:len(old)] or len(new) > len(old)

    r = dwcp("hde", "encode", "--base", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "d"),
             "--stats", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    delta_bytes = (tmp_path / "d").stat().st_size
    assert stats["input_bytes"] == len(new)
    assert stats["output_bytes"] == delta_bytes
    assert 0 < delta_bytes < len(new) // 4  # 5 % of the keys changed: far less than the image
    assert stats["seconds"] >= 0
    pages = stats["pages"]
    assert isinstance(pages, dict) and all(isinstance(v, int) and v >= 0 for v in pages.values())
    assert sum(pages.values()) == -(-len(new) // 4096)  # every page of the new image in exactly one class

    r = dwcp("hde", "decode", "--base", str(tmp_path / "s0"), str(tmp_path / "d"), "-o", str(tmp_path / "out"),
             "--json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == new
    dec = json.loads(r.stdout)
    assert {dec["input_bytes"], dec["output_bytes"]} == {len(new), delta_bytes}
    assert dec["seconds"] >= 0 and dec["pages"] == pages

    # --stats without --json: a human summary (with the ratio) on stdout or stderr
    r = dwcp("hde", "encode", "--base", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "d2"),
             "--stats")
    assert r.returncode == 0, r.stderr
    assert "ratio" in (r.stdout + r.stderr).lower()

    # a truncated delta is a clear error, never a traceback or an image
    (tmp_path / "cut").write_bytes((tmp_path / "d").read_bytes()[:delta_bytes // 2])
    r = dwcp("hde", "decode", "--base", str(tmp_path / "s0"), str(tmp_path / "cut"), "-o", str(tmp_path / "bad"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip()
    assert not (tmp_path / "bad").exists() or (tmp_path / "bad").read_bytes() != new


def test_hde_cli_follows_pages_that_moved(redis: tuple[subprocess.Popen[bytes], Path], tmp_path: Path) -> None:
    """A snapshot whose layout shifted (a mapping in the middle grew by 1 MiB): the CLI finds the moved
    pages (COPY runs), says which mode it chose and why, and decodes byte for byte through the
    chunked pwrite path."""
    proc, sock = redis
    pipe(sock, b"".join(resp("SET", f"user:{i}", value(i, 0)) for i in range(KEYS)))
    procmem.snapshot_process(proc.pid, tmp_path / "s0", freeze=True, max_bytes=LIMIT)
    pipe(sock, b"".join(resp("SET", f"user:{i}", value(i, 2)) for i in range(0, KEYS, 100)))  # 1 % of keys
    procmem.snapshot_process(proc.pid, tmp_path / "s1", freeze=True, max_bytes=LIMIT)
    new = (tmp_path / "s1").read_bytes()
    mid = len(new) // 2 // 4096 * 4096
    shifted = new[:mid] + os.urandom(1 << 20) + new[mid:]
    (tmp_path / "s1").write_bytes(shifted)

    r = dwcp("hde", "encode", "--base", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "d"),
             "--stats", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["mode"] == "page" and stats["mode_reason"].startswith("page mode")
    p = stats["pages"]
    assert p["copy"] > 0 and p["raw"] <= 256 + p["copy"] // 10   # the inserted MiB; the rest found
    assert stats["output_bytes"] < (1 << 20) + len(new) // 20
    assert "mode: page mode" in r.stderr

    r = dwcp("hde", "decode", "--base", str(tmp_path / "s0"), str(tmp_path / "d"), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == shifted
