"""`dwcp hde encode|decode`: HDE deltas between files, like `zstd --patch-from` and `xdelta3 -s`.

Inputs are memory-mapped (no copy into Python), outputs are written to a temporary file in the target's
directory and renamed into place only when complete, so a failed run never leaves a half-written file
under the requested name.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO

import click

from dwcp.errors import DWCPError


def _open_read(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise click.ClickException(f"cannot read {path}: {e.strerror}") from None


@contextlib.contextmanager
def _mapped(path: str, populate: bool = True) -> Iterator[Any]:
    """The file's bytes, mapped read-only and, by default, pre-faulted (MAP_POPULATE: one pass over the
    page cache instead of a fault per page)."""
    with _open_read(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            yield b""
            return
        populate_flag = getattr(mmap, "MAP_POPULATE", 0) if populate else 0
        m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | populate_flag, prot=mmap.PROT_READ)
        try:
            yield m
        finally:
            # A decode error's traceback may still hold views of the map (BufferError on close): then it
            # is unmapped when they go, and the DWCPError, not the BufferError, reaches the user.
            with contextlib.suppress(BufferError):
                m.close()


@contextlib.contextmanager
def _output(path: str) -> Iterator[BinaryIO]:
    """A temporary file next to path, renamed to path on success and removed on failure."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.dwcp-tmp-{os.getpid()}")
    try:
        f = open(tmp, "w+b")
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e.strerror}") from None
    ok = False
    try:
        with f:
            yield f
        os.replace(tmp, path)
        ok = True
    finally:
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _report(stats: Any, show: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(stats.to_json()))
    if not show:
        return
    out = sys.stderr if as_json else sys.stdout
    j = stats.to_json()
    print(f"{j['op']}: {j['mode']} mode, {j['input_bytes']:,} image bytes <-> {j['output_bytes']:,} delta "
          f"bytes (ratio {stats.ratio:.1f}), {j['seconds'] * 1e3:.0f} ms in the codec = {stats.mb_per_s:,.0f} "
          f"MB/s, {j['threads']} threads", file=out)
    if j["mode_reason"]:
        print(f"mode: {j['mode_reason']}", file=out)
    if j["mode"] == "page":
        p = j["pages"]
        total = sum(p.values()) or 1
        print("pages: " + ", ".join(f"{k} {v:,} ({100 * v / total:.1f} %)" for k, v in p.items())
              + f"; {j['copy_runs']:,} copy runs, {j['patch_runs']:,} patch runs, {j['literal_bytes']:,} "
              "literal bytes", file=out)
    if j["level"]:
        print(f"level: {j['level']['reason']}", file=out)


def _decode_mapped(fn: Any, delta: Any, fd: int, n: int, threads: int | None, *, populate: bool) -> Any:
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    out = mmap.mmap(fd, n, flags=flags)
    try:
        return fn(delta, out, threads=threads)
    finally:
        # A failed decode's traceback may still hold views of the map; it is closed when they go, and
        # the temporary file is removed either way.
        with contextlib.suppress(BufferError):
            out.close()


@click.group()
def hde() -> None:
    """HDE deltas: encode a new version against an old one, decode it back."""


@hde.command()
@click.option("--base", "base_path", type=click.Path(dir_okay=False), help="The version the other side has.")
@click.argument("new_path", metavar="NEW", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Delta file to write.")
@click.option("--page-size", default=4096, show_default=True, help="Page size (page mode).")
@click.option("--mode", type=click.Choice(["auto", "page", "buffer"]), default="auto", show_default=True,
              help="page: memory images (whole pages, moved pages found); buffer: any file, like zstd "
                   "--patch-from; auto: encodes a sample both ways (--stats says which and why).")
@click.option("--level", default="auto", show_default=True,
              help="auto, off, or a zstd level (-7..22).")
@click.option("--link-mbps", type=float, help="Link rate the delta will cross (level auto matches it).")
@click.option("--threads", type=click.IntRange(1, 256), help="Encoder threads [default: CPUs available].")
@click.option("--batch-mib", type=click.IntRange(1, 64),
              help="Image MiB per batch (page mode) [default: from the image size, 4..64].")
@click.option("--stats", "show", is_flag=True, help="Print ratio, speed and page classes.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as one JSON object.")
def encode(base_path: str | None, new_path: str, output: str, page_size: int, mode: str, level: str,
           link_mbps: float | None, threads: int | None, batch_mib: int | None, show: bool,
           as_json: bool) -> None:
    """Write to OUTPUT a delta that rebuilds NEW from --base (without --base: NEW compressed alone)."""
    from dwcp.compression import hde as codec
    try:
        with contextlib.ExitStack() as stack:
            # Not pre-faulted: the index and the classifier threads fault the pages in as they read
            # them, in parallel (MAP_POPULATE did it on one thread first: 50-100 ms on 2 x 360 MB).
            base = stack.enter_context(_mapped(base_path, populate=False)) if base_path else None
            new = stack.enter_context(_mapped(new_path, populate=False))
            f = stack.enter_context(_output(output))
            _, stats = codec.encode(new, base, mode=mode, page_size=page_size, level=level,
                                    link_bps=link_mbps * 1e6 if link_mbps else None, threads=threads,
                                    batch_bytes=batch_mib << 20 if batch_mib else None, sink=f.write)
    except DWCPError as e:
        raise click.ClickException(str(e)) from e
    _report(stats, show, as_json)


@hde.command()
@click.option("--base", "base_path", type=click.Path(dir_okay=False), help="The version the delta was made against.")
@click.argument("delta_path", metavar="DELTA", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Rebuilt file to write.")
@click.option("--threads", type=click.IntRange(1, 256), help="Decoder threads [default: CPUs available].")
@click.option("--stats", "show", is_flag=True, help="Print ratio, speed and page classes.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as one JSON object.")
def decode(base_path: str | None, delta_path: str, output: str, threads: int | None, show: bool,
           as_json: bool) -> None:
    """Rebuild the new version from DELTA and --base into OUTPUT (verified before it is renamed in place)."""
    from dwcp.compression import hde as codec
    from dwcp.compression.format import Mode
    try:
        with contextlib.ExitStack() as stack:
            delta = stack.enter_context(_mapped(delta_path))
            header = codec.read_header(delta)
            if header.has_base and not base_path:
                raise click.ClickException(f"{delta_path} was made against a base of {header.base_length:,} "
                                           "bytes: pass it with --base")
            f = stack.enter_context(_output(output))
            n = header.new_length
            if n and header.mode is Mode.PAGE:
                # Each batch is rebuilt a chunk at a time and written with pwrite as it goes (the C core
                # does both): writing starts at once, and the kernel copies each chunk from cache, as
                # cp does. No output mapping: faulting in 150k output pages cost more than the copy
                # itself (0.3 s of 0.5 s on 600 MB), and copying the base in first (the format 1
                # decoder) is wasted where pages moved. The base is not pre-faulted: the decoder
                # threads fault it in as they go, in parallel (40 ms less on 486 MB).
                base = None
                if base_path and header.has_base:
                    base = stack.enter_context(_mapped(base_path, populate=False))
                    if len(base) != header.base_length:
                        raise DWCPError(f"{base_path} has {len(base):,} bytes; the delta was made against a "
                                        f"base of {header.base_length:,}: it is not the same version")
                os.ftruncate(f.fileno(), n)
                stats = codec.decode_to_file(delta, base, f.fileno(), threads=threads)
            else:
                base = stack.enter_context(_mapped(base_path)) if base_path and header.has_base else None
                if n == 0:
                    stats = codec.decode_into(delta, base, bytearray(), threads=threads)
                else:
                    os.ftruncate(f.fileno(), n)
                    with contextlib.suppress(OSError):
                        os.posix_fallocate(f.fileno(), 0, n)
                    stats = _decode_mapped(lambda d, out, threads: codec.decode_into(d, base, out,
                                                                                    threads=threads),
                                           delta, f.fileno(), n, threads, populate=True)
    except DWCPError as e:
        raise click.ClickException(str(e)) from e
    _report(stats, show, as_json)
