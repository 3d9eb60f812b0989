"""Snapshots of a live process's writable memory, with a layout that stays put across snapshots.

A snapshot is a flat, page-aligned image file: the process's private writable mappings (``rw-p`` lines
of ``/proc/PID/maps``) read through ``/proc/PID/mem`` and laid end to end. Page-level delta encoders
(HDE, XBZRLE) compare page *i* of one snapshot with page *i* of the next, so the position of an address
in the image must not move between snapshots of the same process. A :class:`Layout` fixes it:

- the first snapshot records its regions, in address order, as the layout;
- a later snapshot given that layout reads every layout region where it is still mapped and writes zero
  pages where it is not (unmapped, shrunk, or now unreadable);
- writable memory that is new since the layout was made (a new mapping, a grown heap) is appended to the
  layout as new regions, so the image only ever grows at its end.

Hence page *i* of snapshot *k* and page *i* of snapshot *k+1* hold the same virtual address whenever that
address is mapped in both. The layout is saved as JSON next to the image (``<image>.layout.json``)::

    snap0 = snapshot_process(pid, "s0.img")                       # layout from the process
    snap1 = snapshot_process(pid, "s1.img", layout=snap0.layout)  # same positions, maybe longer

Regions that cannot be read (``EIO``/``EFAULT`` on special mappings) are left out of the layout when it
is made and listed in :attr:`Layout.skipped` with the reason. Reading another process's memory needs
ptrace access to it (root, or your own child with ``kernel.yama.ptrace_scope`` ≤ 1). ``freeze=True``
stops the process (``SIGSTOP``) while it is read so the image is one consistent moment; a process that is
not frozen keeps running and may change between the first and the last region read.

Images are sparse: all-zero 64 KiB stretches are left as holes. Writable mappings can be far larger than
the memory in use (a sanitizer's shadow memory is terabytes of untouched ``rw-p``); pass ``max_bytes`` to
have such a snapshot refused before anything is read.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwcp.errors import DWCPError

__all__ = [
    "LAYOUT_SUFFIX",
    "Layout",
    "NoSuchProcessError",
    "ProcessAccessError",
    "Region",
    "SkippedRegion",
    "Snapshot",
    "SnapshotError",
    "layout_path",
    "load_layout",
    "read_writable_regions",
    "snapshot_process",
]

log = logging.getLogger(__name__)

LAYOUT_SUFFIX = ".layout.json"
LAYOUT_FORMAT = 1
_CHUNK_BYTES = 8 << 20
_PAGE_BYTES = mmap.PAGESIZE
_ZEROS = bytes(_CHUNK_BYTES)
_HOLE_BYTES = 64 << 10


class SnapshotError(DWCPError):
    """A process snapshot could not be taken or its layout file is unusable."""


class NoSuchProcessError(SnapshotError, ProcessLookupError):
    """The process does not exist (any more): check the PID; it may have exited during the snapshot."""


class ProcessAccessError(SnapshotError, PermissionError):
    """This process may not read the target's memory: run as root, snapshot your own child, or lower
    ``kernel.yama.ptrace_scope``."""


@dataclass(frozen=True)
class Region:
    """A range of virtual addresses ``[start, end)`` and the name ``/proc/PID/maps`` gave it."""

    start: int
    end: int
    name: str = ""

    @property
    def size_bytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SkippedRegion:
    """A writable mapping left out of the layout, and why."""

    start: int
    end: int
    name: str
    reason: str


@dataclass
class Layout:
    """Where each virtual address range sits in a snapshot image.

    ``regions`` are laid end to end in list order: region *k* starts at image offset
    ``sum(r.size_bytes for r in regions[:k])``. The list only grows, at its end."""

    page_bytes: int = _PAGE_BYTES
    regions: list[Region] = field(default_factory=list)
    skipped: list[SkippedRegion] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(r.size_bytes for r in self.regions)

    def offsets(self) -> list[int]:
        """Image offset of each region."""
        out, pos = [], 0
        for r in self.regions:
            out.append(pos)
            pos += r.size_bytes
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "page_bytes": self.page_bytes,
            "total_bytes": self.total_bytes,
            "regions": [[r.start, r.end, r.name] for r in self.regions],
            "skipped": [[s.start, s.end, s.name, s.reason] for s in self.skipped],
        }

    @classmethod
    def from_json(cls, doc: Any) -> Layout:
        try:
            if doc["format"] != LAYOUT_FORMAT:
                raise SnapshotError(f"layout format {doc['format']!r} is not {LAYOUT_FORMAT}: "
                                    "take a new first snapshot with this version of DWCP")
            layout = cls(page_bytes=int(doc["page_bytes"]),
                         regions=[Region(int(a), int(b), str(n)) for a, b, n in doc["regions"]],
                         skipped=[SkippedRegion(int(a), int(b), str(n), str(w)) for a, b, n, w in doc["skipped"]])
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"malformed layout document ({type(e).__name__}: {e}); "
                                "take a new first snapshot") from e
        for r in layout.regions:
            if r.start % layout.page_bytes or r.end % layout.page_bytes or r.end <= r.start:
                raise SnapshotError(f"layout region {r.start:#x}-{r.end:#x} is empty or not page-aligned")
        return layout

    def save(self, path: str | os.PathLike[str]) -> None:
        tmp = Path(f"{os.fspath(path)}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)


@dataclass(frozen=True)
class Snapshot:
    """What :func:`snapshot_process` wrote."""

    image_path: Path
    layout_path: Path
    layout: Layout
    size_bytes: int
    read_bytes: int
    """Bytes read from the process; the rest of the image is zero pages for addresses not mapped now."""
    unmapped_bytes: int
    """Layout bytes whose addresses are no longer mapped (or no longer readable), written as zeros."""
    appended_regions: int
    """Regions added to the layout by this snapshot (all of them for a first snapshot)."""


def layout_path(image_path: str | os.PathLike[str]) -> Path:
    """The layout file that belongs to an image."""
    return Path(f"{os.fspath(image_path)}{LAYOUT_SUFFIX}")


def load_layout(image_path: str | os.PathLike[str]) -> Layout:
    """The layout saved next to ``image_path`` by :func:`snapshot_process`."""
    p = layout_path(image_path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise SnapshotError(f"no layout file {p}: was {image_path} written by snapshot_process()?") from e
    except (OSError, ValueError) as e:
        raise SnapshotError(f"cannot read layout file {p}: {e}") from e
    return Layout.from_json(doc)


def _proc_error(pid: int, what: str, e: OSError) -> SnapshotError:
    if isinstance(e, (FileNotFoundError, ProcessLookupError)) or e.errno == errno.ESRCH:
        return NoSuchProcessError(f"{what}: no process {pid} (it may have exited); check the PID")
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
        return ProcessAccessError(f"{what}: not allowed to read process {pid}'s memory ({e.strerror}); run as "
                                  "root, snapshot your own child, or lower kernel.yama.ptrace_scope")
    return SnapshotError(f"{what} for process {pid}: {e}")


def read_writable_regions(pid: int) -> list[Region]:
    """The private writable mappings (``rw-p``) of a process, in address order."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError as e:
        raise _proc_error(pid, "reading /proc/PID/maps", e) from e
    regions = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5 or parts[1] != "rw-p":
            continue
        lo, hi = parts[0].split("-")
        regions.append(Region(int(lo, 16), int(hi, 16), parts[5].strip() if len(parts) > 5 else ""))
    return regions


def _subtract(ranges: list[tuple[int, int]], covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of sorted, disjoint ``ranges`` not inside any of sorted, disjoint ``covered``."""
    out: list[tuple[int, int]] = []
    j = 0
    for lo, hi in ranges:
        cur = lo
        while j < len(covered) and covered[j][1] <= cur:
            j += 1
        k = j
        while k < len(covered) and covered[k][0] < hi:
            clo, chi = covered[k]
            if clo > cur:
                out.append((cur, clo))
            cur = max(cur, chi)
            k += 1
        if cur < hi:
            out.append((cur, hi))
    return out


def _intersect(lo: int, hi: int, mapped: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of ``[lo, hi)`` inside sorted, disjoint ``mapped`` ranges."""
    out = []
    for mlo, mhi in mapped:
        if mhi <= lo:
            continue
        if mlo >= hi:
            break
        out.append((max(lo, mlo), min(hi, mhi)))
    return out


@contextmanager
def _frozen(pid: int, freeze: bool) -> Iterator[None]:
    if not freeze:
        yield
        return
    try:
        os.kill(pid, signal.SIGSTOP)
    except OSError as e:
        raise _proc_error(pid, "stopping the process (SIGSTOP)", e) from e
    try:
        _wait_stopped(pid)
        yield
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _wait_stopped(pid: int, timeout_s: float = 2.0) -> None:
    """SIGSTOP is asynchronous: wait until every thread of the process shows state T (stopped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
                      for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            return  # a thread exited meanwhile (or the process did: the read will tell)
        if all(s in ("T", "t", "Z", "X") for s in states):
            return
        time.sleep(0.001)
    log.warning("pid %d did not stop within %.1f s of SIGSTOP; snapshot may be inconsistent", pid, timeout_s)


class _Unreadable(Exception):
    def __init__(self, reason: str, done_bytes: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.done_bytes = done_bytes  # copied before the failure


def _write_sparse(fd: int, data: memoryview, offset: int) -> None:
    """pwrite ``data`` at ``offset``, leaving all-zero stretches of _HOLE_BYTES as holes (the file was
    created empty, so they read as zeros). One write per run of non-zero stretches."""
    n = len(data)
    run = -1  # start of the pending non-zero run
    for at in range(0, n, _HOLE_BYTES):
        zero = _ZEROS.startswith(data[at:at + _HOLE_BYTES])  # memcmp against zeros, no copy
        if not zero and run < 0:
            run = at
        elif zero and run >= 0:
            _pwrite_all(fd, data[run:at], offset + run)
            run = -1
    if run >= 0:
        _pwrite_all(fd, data[run:n], offset + run)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, offset)
        if done <= 0:
            raise OSError(errno.EIO, "short write to the image file")
        data, offset = data[done:], offset + done


def _copy_range(mem_fd: int, out_fd: int, lo: int, hi: int, out_offset: int, buf: bytearray) -> None:
    """Copy process memory ``[lo, hi)`` to ``out_fd`` at ``out_offset``."""
    view = memoryview(buf)
    addr = lo
    while addr < hi:
        n = min(len(buf), hi - addr)
        try:
            got = os.preadv(mem_fd, [view[:n]], addr)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EFAULT):
                raise _Unreadable(f"{os.strerror(e.errno)} reading {addr:#x}", addr - lo) from e
            raise
        if got == 0:
            # /proc/PID/mem of a process that has exited (its mm is gone) reads as end of file.
            raise ProcessLookupError(errno.ESRCH, "process memory is gone")
        _write_sparse(out_fd, view[:got], out_offset + (addr - lo))
        addr += got


def snapshot_process(pid: int, image_path: str | os.PathLike[str], *, layout: Layout | None = None,
                     freeze: bool = False, max_bytes: int | None = None) -> Snapshot:
    """Write the private writable memory of process ``pid`` to ``image_path`` as a page-aligned image.

    Without ``layout`` the process's current ``rw-p`` mappings become the layout (regions that cannot be
    read are skipped and listed in ``layout.skipped``). With the layout of an earlier snapshot of the same
    process, every address keeps its image position: layout regions are read where still mapped and
    zero-filled where not; writable memory not yet in the layout is appended as new regions. The (possibly
    extended) layout is returned and saved to ``<image_path>.layout.json``; the caller's ``layout`` object
    is not modified.

    Chunks that read as all zeros are not written: the image is a sparse file where the process has
    zero pages (reads return zeros either way). ``max_bytes`` bounds the image: if the process's writable
    mappings would make it larger, :class:`SnapshotError` is raised before anything is read. Set it when
    the target may hold huge reservations that are mostly never touched (a sanitizer's shadow memory,
    a garbage collector's arenas), which would otherwise be read page by page.

    Raises :class:`NoSuchProcessError` if the process does not exist or exits meanwhile,
    :class:`ProcessAccessError` if its memory may not be read, :class:`SnapshotError` on other failures
    (including an I/O error on the image file, after which no partial image is left)."""
    if layout is not None and layout.page_bytes != _PAGE_BYTES:
        raise SnapshotError(f"layout page size {layout.page_bytes} differs from this host's {_PAGE_BYTES}")
    base = Layout(page_bytes=_PAGE_BYTES, regions=list(layout.regions) if layout else [],
                  skipped=list(layout.skipped) if layout else [])
    image = Path(image_path)
    buf = bytearray(_CHUNK_BYTES)
    read_bytes = 0
    try:
        mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError as e:
        raise _proc_error(pid, "opening /proc/PID/mem", e) from e
    try:
        out_fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        os.close(mem_fd)
        raise SnapshotError(f"cannot create image file {image}: {e}") from e
    ok = False
    try:
        with _frozen(pid, freeze):
            current = read_writable_regions(pid)
            mapped = [(r.start, r.end) for r in current]
            covered = _merge([(r.start, r.end) for r in base.regions] + [(x.start, x.end) for x in base.skipped])
            new = [(lo, hi, cr.name) for cr in current for lo, hi in _subtract([(cr.start, cr.end)], covered)]
            planned = base.total_bytes + sum(hi - lo for lo, hi, _ in new)
            if max_bytes is not None and planned > max_bytes:
                raise SnapshotError(
                    f"process {pid} has {planned:,} bytes of writable memory to snapshot, over max_bytes="
                    f"{max_bytes:,}; raise the limit if that is expected (huge untouched reservations such as a "
                    "sanitizer's shadow memory also count)")
            # 1. Layout regions, each at its fixed offset: read what is still mapped, zeros elsewhere.
            pos = 0
            for r in base.regions:
                for lo, hi in _intersect(r.start, r.end, mapped):
                    try:
                        _copy_range(mem_fd, out_fd, lo, hi, pos + lo - r.start, buf)
                        read_bytes += hi - lo
                    except _Unreadable as u:
                        log.warning("pid %d: %s %#x-%#x unreadable (%s); written as zeros",
                                    pid, r.name or "anon", lo, hi, u.reason)
                pos += r.size_bytes
            # 2. Writable memory not in the layout yet, appended in address order.
            appended = 0
            for lo, hi, name in new:
                try:
                    _copy_range(mem_fd, out_fd, lo, hi, pos, buf)
                except _Unreadable as u:
                    # what was copied before the failure must not show through the holes of what comes next
                    for off in range(0, u.done_bytes, _CHUNK_BYTES):
                        _pwrite_all(out_fd, memoryview(_ZEROS)[:min(_CHUNK_BYTES, u.done_bytes - off)], pos + off)
                    base.skipped.append(SkippedRegion(lo, hi, name, u.reason))
                    log.info("pid %d: skipping %s %#x-%#x: %s", pid, name or "anon", lo, hi, u.reason)
                    continue
                base.regions.append(Region(lo, hi, name))
                read_bytes += hi - lo
                pos += hi - lo
                appended += 1
            os.ftruncate(out_fd, pos)
        ok = True
    except OSError as e:
        raise _proc_error(pid, f"snapshot to {image}", e) from e
    finally:
        os.close(out_fd)
        os.close(mem_fd)
        if not ok:
            image.unlink(missing_ok=True)
    lp = layout_path(image)
    try:
        base.save(lp)
    except OSError as e:
        raise SnapshotError(f"cannot write layout file {lp}: {e}") from e
    unmapped_bytes = pos - read_bytes
    log.debug("pid %d: %d bytes to %s (%d read, %d zero-filled, %d regions appended)",
              pid, pos, image, read_bytes, unmapped_bytes, appended)
    return Snapshot(image_path=image, layout_path=lp, layout=base, size_bytes=pos, read_bytes=read_bytes,
                    unmapped_bytes=unmapped_bytes, appended_regions=appended)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
