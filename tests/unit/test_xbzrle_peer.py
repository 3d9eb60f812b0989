"""bench/peers/xbzrle.c, the XBZRLE-style baseline of bench/hde: round trips and a checked decoder."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "bench" / "peers" / "xbzrle.c"
PAGE = 4096

pytestmark = pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler (apt-get install gcc)")


@pytest.fixture(scope="module")
def xbzrle(tmp_path_factory: pytest.TempPathFactory) -> str:
    exe = tmp_path_factory.mktemp("xbzrle") / "xbzrle"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(SRC)], check=True)
    return str(exe)


def images(seed: int) -> tuple[bytes, bytes]:
    """An old image and a new one with every kind of page: unchanged, a few bytes changed, rewritten
    (raw), zeroed, and pages past the old end (the new image is longer and ends in a partial page)."""
    r = random.Random(seed)
    old = bytearray(r.randbytes(64 * PAGE))
    old[10 * PAGE:12 * PAGE] = bytes(2 * PAGE)
    new = bytearray(old)
    for _ in range(200):
        i = r.randrange(len(new))
        new[i] = r.randrange(256)
    new[3 * PAGE:4 * PAGE] = r.randbytes(PAGE)
    new[5 * PAGE:6 * PAGE] = bytes(PAGE)
    new[10 * PAGE + 7] = 1
    new += r.randbytes(3 * PAGE + 100) + bytes(PAGE)
    return bytes(old), bytes(new)


def run(exe: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_both_ways(xbzrle: str, tmp_path: Path, seed: int) -> None:
    a, b = images(seed)
    for old, new in ((a, b), (b, a), (a, a)):
        (tmp_path / "old").write_bytes(old)
        (tmp_path / "new").write_bytes(new)
        assert run(xbzrle, "encode", str(tmp_path / "old"), str(tmp_path / "new"), str(tmp_path / "d")).returncode == 0
        r = run(xbzrle, "decode", str(tmp_path / "old"), str(tmp_path / "d"), str(tmp_path / "out"))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out").read_bytes() == new
    # identical images: header + end record only
    assert (tmp_path / "d").stat().st_size == 17


@pytest.fixture(scope="module")
def xbzrle_sanitized(tmp_path_factory: pytest.TempPathFactory) -> str:
    exe = tmp_path_factory.mktemp("xbzrle-san") / "xbzrle"
    r = subprocess.run(["cc", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-Wall",
                        "-Wextra", "-Werror", "-o", str(exe), str(SRC)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build with -fsanitize=address,undefined: {r.stderr.strip()[-300:]}")
    return str(exe)


def test_bad_deltas_are_errors(xbzrle_sanitized: str, tmp_path: Path) -> None:
    xbzrle = xbzrle_sanitized
    old, new = images(7)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    assert run(xbzrle, "encode", str(tmp_path / "old"), str(tmp_path / "new"), str(tmp_path / "d")).returncode == 0
    delta = (tmp_path / "d").read_bytes()
    r = random.Random(1)
    cases = [delta[:n] for n in (0, 5, 16, 17, len(delta) // 2, len(delta) - 1)] + [delta + b"\0"]
    for _ in range(60):
        bad = bytearray(delta)
        bad[r.randrange(len(bad))] ^= 1 << r.randrange(8)
        cases.append(bytes(bad))
    for bad in cases:
        (tmp_path / "bad").write_bytes(bad)
        res = run(xbzrle, "decode", str(tmp_path / "old"), str(tmp_path / "bad"), str(tmp_path / "out"))
        # a flipped bit inside a raw page or literal bytes decodes to a different image (no checksum in
        # this format, as in QEMU's); everything else must be a clean error, never a crash
        assert res.returncode in (0, 1), res.stderr
        if res.returncode == 1:
            assert res.stderr.startswith("xbzrle: ")
        elif bad != delta:
            assert (tmp_path / "out").read_bytes() != new or bad[:16] != delta[:16]
