"""dwcp.compression.procmem against a child Python process whose memory we control.

The child maps anonymous buffers (mmap, so each is its own rw-p mapping at a known address), fills them
with known bytes, prints their addresses, and then obeys commands on stdin: change bytes, unmap a
buffer, map a new one. We snapshot it between commands and check the image against what we wrote."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dwcp.compression import procmem
from dwcp.errors import DWCPError

PAGE = mmap.PAGESIZE

CHILD = textwrap.dedent(r"""
    import ctypes, mmap, sys
    bufs = {}
    def new(name, pages, fill):
        m = mmap.mmap(-1, pages * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
        for i in range(pages):
            m[i * mmap.PAGESIZE:(i + 1) * mmap.PAGESIZE] = bytes([(fill + i) % 256]) * mmap.PAGESIZE
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        bufs[name] = m
        print(name, addr, flush=True)
    new("a", 8, 1)
    new("b", 4, 100)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "poke":          # poke NAME PAGE BYTE
            m = bufs[args[0]]; p = int(args[1])
            m[p * mmap.PAGESIZE:p * mmap.PAGESIZE + 16] = bytes([int(args[2])]) * 16
            print("ok", flush=True)
        elif cmd == "unmap":       # unmap NAME
            bufs.pop(args[0]).close()
            print("ok", flush=True)
        elif cmd == "new":         # new NAME PAGES FILL
            new(args[0], int(args[1]), int(args[2]))
        elif cmd == "zeros":       # zeros NAME PAGES: mapped, never written
            m = mmap.mmap(-1, int(args[1]) * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
            bufs[args[0]] = m
            print(args[0], ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
""")


# Under `make sanitize` the suite runs with LD_PRELOAD=libasan: a child inheriting it maps terabytes of
# shadow memory (rw-p, never touched) that a snapshot would read page by page. The child is not under test.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
LIMIT = 1 << 30  # every snapshot here is a few MiB; a runaway one fails instead of filling the disk


class Child:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=CLEAN_ENV)
        self.addr = {}
        for _ in range(2):
            name, addr = self.read().split()
            self.addr[name] = int(addr)

    def read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "child exited"
        return line

    def send(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.close()


def image_offset(layout: procmem.Layout, addr: int) -> int:
    for r, off in zip(layout.regions, layout.offsets()):
        if r.start <= addr < r.end:
            return off + addr - r.start
    raise AssertionError(f"{addr:#x} not in the layout")


def page_at(image: Path, off: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(off)
        return f.read(PAGE)


def test_first_snapshot_holds_the_childs_bytes(child: Child, tmp_path: Path) -> None:
    snap = procmem.snapshot_process(child.pid, tmp_path / "s0", freeze=True, max_bytes=LIMIT)
    assert snap.size_bytes == (tmp_path / "s0").stat().st_size == snap.layout.total_bytes
    assert snap.size_bytes % PAGE == 0 and snap.read_bytes == snap.size_bytes and snap.unmapped_bytes == 0
    assert snap.appended_regions == len(snap.layout.regions) > 0
    for name, fill, pages in (("a", 1, 8), ("b", 100, 4)):
        off = image_offset(snap.layout, child.addr[name])
        assert off % PAGE == 0
        for i in range(pages):
            assert page_at(snap.image_path, off + i * PAGE) == bytes([(fill + i) % 256]) * PAGE
    # the layout file next to the image round-trips
    assert snap.layout_path == procmem.layout_path(tmp_path / "s0") and snap.layout_path.exists()
    assert procmem.load_layout(tmp_path / "s0") == snap.layout
    # the process was resumed after the frozen snapshot
    assert child.send("poke a 0 7") == "ok\n"


def test_layout_is_stable_across_changes(child: Child, tmp_path: Path) -> None:
    s0 = procmem.snapshot_process(child.pid, tmp_path / "s0", max_bytes=LIMIT)
    off_a, off_b = image_offset(s0.layout, child.addr["a"]), image_offset(s0.layout, child.addr["b"])
    assert child.send("poke a 3 250") == "ok\n"
    name, addr = child.send("new c 3 40").split()  # before b goes, so c cannot land on b's addresses
    assert child.send("unmap b") == "ok\n"
    s1 = procmem.snapshot_process(child.pid, tmp_path / "s1", layout=s0.layout, freeze=True, max_bytes=LIMIT)
    # every region of the old layout keeps its offset; the new buffer is appended past the old end
    assert s1.layout.regions[:len(s0.layout.regions)] == s0.layout.regions
    assert s1.size_bytes >= s0.size_bytes
    assert image_offset(s1.layout, child.addr["a"]) == off_a
    off_c = image_offset(s1.layout, int(addr))
    assert off_c >= s0.size_bytes and s1.appended_regions >= 1
    # page 3 of a changed in place, its neighbours did not
    assert page_at(s1.image_path, off_a + 3 * PAGE)[:16] == bytes([250]) * 16
    assert page_at(s1.image_path, off_a + 3 * PAGE)[16:] == bytes([4]) * (PAGE - 16)
    assert page_at(s1.image_path, off_a + 2 * PAGE) == page_at(s0.image_path, off_a + 2 * PAGE)
    # the unmapped buffer reads as zero pages at its old position (unless the interpreter mapped something
    # new at those very addresses meanwhile: then that is what belongs there)
    if not any(r.start <= child.addr["b"] < r.end for r in procmem.read_writable_regions(child.pid)):
        for i in range(4):
            assert page_at(s1.image_path, off_b + i * PAGE) == bytes(PAGE)
        assert s1.unmapped_bytes >= 4 * PAGE
    for i in range(3):
        assert page_at(s1.image_path, off_c + i * PAGE) == bytes([40 + i]) * PAGE
    # a third snapshot with the extended layout appends nothing new for c
    s2 = procmem.snapshot_process(child.pid, tmp_path / "s2", layout=s1.layout, max_bytes=LIMIT)
    assert image_offset(s2.layout, int(addr)) == off_c
    assert s2.layout.regions[:len(s1.layout.regions)] == s1.layout.regions


def test_region_arithmetic() -> None:
    assert procmem._subtract([(0, 100)], [(10, 20), (30, 40)]) == [(0, 10), (20, 30), (40, 100)]
    assert procmem._subtract([(0, 100)], [(0, 100)]) == []
    assert procmem._subtract([(50, 60)], [(0, 55)]) == [(55, 60)]
    assert procmem._intersect(10, 50, [(0, 15), (20, 30), (45, 90)]) == [(10, 15), (20, 30), (45, 50)]
    assert procmem._merge([(5, 10), (0, 6), (20, 30)]) == [(0, 10), (20, 30)]


def test_no_such_process(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"], env=CLEAN_ENV)
    p.wait()
    with pytest.raises(procmem.NoSuchProcessError, match="no process"):
        procmem.snapshot_process(p.pid, tmp_path / "x", max_bytes=LIMIT)
    with pytest.raises(DWCPError):
        procmem.read_writable_regions(p.pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_permission_denied_is_a_clear_error(tmp_path: Path) -> None:
    # a root-owned target read by a child that dropped to nobody: ptrace access is refused
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from dwcp.compression import procmem  # imported as root: nobody cannot read this tree
        os.setgid(65534); os.setuid(65534)
        try:
            procmem.snapshot_process(1, "/dev/null", max_bytes=1 << 30)
        except procmem.ProcessAccessError as e:
            print("denied", e)
    """)
    # This child imports the compiled core, so under `make sanitize` it needs the sanitizer preload it
    # inherits (it reads no memory: the snapshot is refused before any region is read).
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout.startswith("denied"), r.stdout + r.stderr
    assert "root" in r.stdout


def test_bad_layout_file(tmp_path: Path) -> None:
    with pytest.raises(procmem.SnapshotError, match="no layout file"):
        procmem.load_layout(tmp_path / "nothing")
    procmem.layout_path(tmp_path / "img").write_text('{"format": 1, "page_bytes": 4096}')
    with pytest.raises(procmem.SnapshotError, match="malformed"):
        procmem.load_layout(tmp_path / "img")
    procmem.layout_path(tmp_path / "img").write_text(
        '{"format": 1, "page_bytes": 4096, "regions": [[4096, 5000, ""]], "skipped": []}')
    with pytest.raises(procmem.SnapshotError, match="page-aligned"):
        procmem.load_layout(tmp_path / "img")


def test_size_limit_refuses_before_reading(child: Child, tmp_path: Path) -> None:
    with pytest.raises(procmem.SnapshotError, match="over max_bytes"):
        procmem.snapshot_process(child.pid, tmp_path / "s0", max_bytes=8 * PAGE)
    assert not (tmp_path / "s0").exists() and not procmem.layout_path(tmp_path / "s0").exists()
    # the limit counts the whole image, including regions of an earlier layout
    s0 = procmem.snapshot_process(child.pid, tmp_path / "s0", max_bytes=LIMIT)
    with pytest.raises(procmem.SnapshotError, match="over max_bytes"):
        procmem.snapshot_process(child.pid, tmp_path / "s1", layout=s0.layout, max_bytes=s0.size_bytes - PAGE)


def test_zero_chunks_are_holes(child: Child, tmp_path: Path) -> None:
    _, zaddr = child.send("zeros z 8192").split()  # 32 MiB never written
    _, paddr = child.send("new p 512 0").split()  # 2 MiB; page i holds byte i % 256, so two zero pages
    s0 = procmem.snapshot_process(child.pid, tmp_path / "s0", max_bytes=LIMIT)
    off = image_offset(s0.layout, int(paddr))
    for i in (0, 1, 255, 256, 257):
        assert page_at(s0.image_path, off + i * PAGE) == bytes([i % 256]) * PAGE
    zoff = image_offset(s0.layout, int(zaddr))
    assert page_at(s0.image_path, zoff) == bytes(PAGE) == page_at(s0.image_path, zoff + 8191 * PAGE)
    st = os.stat(s0.image_path)
    assert st.st_size >= 32 << 20 and st.st_blocks * 512 <= st.st_size - (24 << 20)  # the zeros take no disk
