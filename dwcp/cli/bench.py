"""dwcp-bench: memory-to-memory throughput between two hosts (or two processes), like iperf.

    dwcp-bench server [--bind HOST[:PORT]] [--metrics-port PORT]
    dwcp-bench client HOST[:PORT] [-p PORT] [-P N] [-t SECONDS] [-l CHUNK] [--json]
    dwcp-bench loopback [-P N] [-t SECONDS] [--json]

The client sends time-bounded transfers that wrap around a buffer (Session.send_for); the server
receives them into a buffer of its own. Then the client asks for a small JSON report (bytes, CPU time)
so it can print both sides' CPU use.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

import dwcp
from dwcp.errors import ConfigError, DWCPError
from dwcp.telemetry import LinkMonitor, open_source, source_info
from dwcp.transport.options import parse_address
from dwcp.transport.session import Session
from dwcp.wire.messages import XferKind

DEFAULT_PORT = 5301
DEFAULT_BUFFER_BYTES = 1 << 20  # cache-resident, like iperf's 128 KiB per-stream buffers


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _fmt_rate(bps: float) -> str:
    for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("Kbit/s", 1e3)):
        if bps >= div:
            return f"{bps / div:7.2f} {unit}"
    return f"{bps:7.0f} bit/s"


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GBytes", 1 << 30), ("MBytes", 1 << 20), ("KBytes", 1 << 10)):
        if n >= div:
            return f"{n / div:7.2f} {unit}"
    return f"{n:7.0f} Bytes"


def _io_threads_option(f: Any) -> Any:
    f = click.option("-w", "--sndbuf", "sndbuf_bytes", type=click.IntRange(-1, 1 << 30), default=0,
                     show_default=True,
                     help="Send buffer per connection in bytes: 0 = auto (1 MiB on paths under 200 us, "
                          "else the kernel's autotuning), -1 = always the kernel's.")(f)
    return click.option("-T", "--io-threads", "io_threads", type=click.IntRange(0, 64), default=0,
                        show_default=True,
                        help="Threads the engine drives a large transfer with (0: one per usable CPU, "
                             "never more than streams).")(f)


INSECURE_WARNING = ("warning: --insecure: no authentication and no encryption; anyone on the path can "
                    "read, alter or inject the data")


def _warn_plaintext(insecure: bool, no_encrypt: bool) -> None:
    if insecure:
        click.echo(INSECURE_WARNING, err=True)
    elif no_encrypt:
        click.echo("note: --no-encrypt: frames are plaintext (checksummed) unless the peer requires "
                   "encryption", err=True)


def _key_options(f: Any) -> Any:
    f = click.option("--no-encrypt", "no_encrypt", is_flag=True,
                     help="Plaintext (checksummed) frames for a link you trust; frames are sealed "
                          "unless both ends say this.")(f)
    f = click.option("--insecure", is_flag=True,
                     help="Run without authentication, and so without encryption (both ends must say "
                          "so).")(f)
    f = click.option("--key-file", type=click.Path(dir_okay=False), default=None,
                     help="File holding the pre-shared key (else $DWCP_KEY).")(f)
    return f


# ---- server ------------------------------------------------------------------------------------
def serve_session(session: Session) -> None:
    """Receive benchmark transfers until the client asks for a report (a small JSON request), then
    answer with the bytes, time and CPU used since the previous report; repeat until it closes."""
    buf: bytearray | None = None
    moved, busy_s, cpu_s = 0, 0.0, 0.0
    with session:
        while True:
            try:
                info = session.peek()
            except DWCPError:
                return  # client closed (or failed): nothing more to serve
            if info.kind != XferKind.BENCH:
                try:
                    request = json.loads(bytes(session.recv()))
                except (ValueError, DWCPError):
                    return
                if request.get("op") == "report":
                    report = {"bytes": moved, "seconds": busy_s, "cpu_s": cpu_s,
                              "cpu_percent": 100.0 * cpu_s / max(busy_s, 1e-9),
                              "backend": session.backend, "stats": session.live_stats()}
                    session.send(json.dumps(report).encode())
                    moved, busy_s, cpu_s = 0, 0.0, 0.0
                continue
            # A benchmark transfer lands in the engine's "sink" layout: each I/O thread writes its
            # own share of this buffer (like iperf's per-stream buffers), so it holds one chunk per
            # thread at least; as large as the client's (up to 256 MiB) for cold-buffer runs.
            size = max(info.chunk_bytes * session.io_threads,
                       (min(info.wrap_bytes or DEFAULT_BUFFER_BYTES, 256 << 20) // info.chunk_bytes)
                       * info.chunk_bytes)
            if buf is None or len(buf) != size:
                buf = bytearray(size)
            cpu0, t0 = _cpu_s(), time.monotonic()
            moved += session.recv_into(buf)
            cpu_s += _cpu_s() - cpu0
            busy_s += time.monotonic() - t0


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """DWCP throughput benchmark (iperf-style)."""


@main.command()
@click.option("--bind", "bind", default=f":{DEFAULT_PORT}", show_default=True,
              help=f"Address to listen on: HOST, HOST:PORT, or :PORT for all (port {DEFAULT_PORT} "
                   "unless given).")
@click.option("--once", is_flag=True, help="Exit after serving one client.")
@click.option("--metrics-port", "metrics_port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics (bytes, streams, retransmits per client host) at "
                   "http://127.0.0.1:PORT/metrics while the server runs; see docs/metrics.md.")
@_io_threads_option
@_key_options
def server(bind: str, once: bool, metrics_port: int | None, io_threads: int, sndbuf_bytes: int,
           key_file: str | None, insecure: bool, no_encrypt: bool) -> None:
    """Receive benchmark traffic from `dwcp-bench client`."""
    _warn_plaintext(insecure, no_encrypt)
    with contextlib.ExitStack() as stack:
        track: Callable[[Session], None] = lambda session: None
        try:
            if metrics_port is not None:
                track = _serve_metrics(stack, metrics_port)
            lis = stack.enter_context(
                dwcp.listen(parse_address(bind, default_port=DEFAULT_PORT), key_file=key_file,
                            insecure=insecure, io_threads=io_threads, sndbuf_bytes=sndbuf_bytes,
                            encrypt=not no_encrypt))
        except DWCPError as e:
            raise click.ClickException(str(e)) from e
        host, port = lis.address
        click.echo(f"listening on {host or '*'}:{port}", err=False)
        sys.stdout.flush()
        while True:
            try:
                session = lis.accept()
            except KeyboardInterrupt:
                return
            track(session)
            click.echo(f"session from {session.peer[0]}:{session.peer[1]}: {session.params.streams} "
                       f"streams, chunk {session.params.chunk_bytes} B, backend {session.backend}, "
                       f"frames {session.stats()['cipher']}", err=True)
            if once:
                serve_session(session)
                return
            threading.Thread(target=serve_session, args=(session,), daemon=True).start()


def _serve_metrics(stack: contextlib.ExitStack, port: int) -> Callable[[Session], None]:
    """Start /metrics on 127.0.0.1:port (closed with ``stack``) over the sessions given to the
    returned function; the sessions' counters are read on scrape, never on the data path."""
    from dwcp.control.metrics import SessionSource, default_registry, start_metrics_server

    registry = default_registry()
    sessions = SessionSource(registry, name="bench_server")
    stack.callback(sessions.remove)
    metrics = stack.enter_context(start_metrics_server(port, registry=registry))
    click.echo(f"metrics at {metrics.url}", err=True)
    return sessions.track


# ---- client ------------------------------------------------------------------------------------
@dataclass
class Interval:
    start: float
    end: float
    bytes: int
    retransmits: int

    def as_dict(self) -> dict[str, Any]:
        secs = max(self.end - self.start, 1e-9)
        return {"start": round(self.start, 3), "end": round(self.end, 3), "bytes": self.bytes,
                "throughput_bps": self.bytes * 8 / secs, "retransmits": self.retransmits}


@dataclass
class _Progress:
    session: Session
    seconds: float
    interval_s: float
    quiet: bool
    tty: bool
    intervals: list[Interval] = field(default_factory=list)

    def run(self, done: threading.Event, t0: float) -> None:
        last_t, last_b, last_r = 0.0, 0, self.session.tcp_retransmits()
        next_report = self.interval_s
        while not done.wait(0.1 if self.tty else min(0.1, self.interval_s)):
            now = time.monotonic() - t0
            moved = self.session.live_stats().get("bytes_payload", 0)
            if now >= next_report:
                r = self.session.tcp_retransmits()
                iv = Interval(last_t, now, moved - last_b, r - last_r)
                self.intervals.append(iv)
                last_t, last_b, last_r = now, moved, r
                next_report += self.interval_s
                if not self.quiet:
                    self._line(iv)
            elif self.tty and not self.quiet:
                frac = min(1.0, now / self.seconds)
                bar = "#" * int(frac * 30)
                rate = (moved - last_b) * 8 / max(now - last_t, 1e-9)
                sys.stdout.write(f"\r[{bar:<30}] {now:5.1f}/{self.seconds:g} s  {_fmt_rate(rate)}")
                sys.stdout.flush()
        # The final partial interval.
        now = time.monotonic() - t0
        moved = self.session.live_stats().get("bytes_payload", 0)
        if moved > last_b and now - last_t > 0.05:
            iv = Interval(last_t, now, moved - last_b, self.session.tcp_retransmits() - last_r)
            self.intervals.append(iv)
            if not self.quiet:
                self._line(iv)

    def _line(self, iv: Interval) -> None:
        prefix = "\r\x1b[K" if self.tty else ""
        click.echo(f"{prefix}[SUM] {iv.start:6.2f}-{iv.end:6.2f} sec  {_fmt_bytes(iv.bytes)}  "
                   f"{_fmt_rate(iv.as_dict()['throughput_bps'])}  retr {iv.retransmits}")


def run_client(addr: str, *, streams: int | str, seconds: float, chunk_bytes: int, buffer_bytes: int,
               interval_s: float, key: bytes | str | None, key_file: str | None, insecure: bool,
               quiet: bool, io_threads: int = 0, sndbuf_bytes: int = 0, encrypt: bool = True,
               max_streams: int | None = None, metrics_port: int | None = None) -> dict[str, Any]:
    tty = sys.stdout.isatty() and not quiet
    buffer_bytes = max(chunk_bytes, buffer_bytes // chunk_bytes * chunk_bytes)
    # Incompressible bytes, so nothing below us (or a future compressing path) flatters the figure.
    pattern = os.urandom(min(buffer_bytes, 1 << 20))
    buf = bytearray((pattern * (buffer_bytes // len(pattern) + 1))[:buffer_bytes])
    auto: dict[str, Any] = {"auto_max_streams": max_streams} if streams == "auto" else {}
    with dwcp.connect(addr, key=key, key_file=key_file, insecure=insecure, streams=streams,
                      chunk_bytes=chunk_bytes, timeout_s=max(10.0, seconds), io_threads=io_threads,
                      sndbuf_bytes=sndbuf_bytes, encrypt=encrypt, **auto) as s:
        if not quiet:
            click.echo(f"Connecting to {addr}: {s.params.streams} streams, chunk {s.params.chunk_bytes} B, "
                       f"frames {s.stats()['cipher']}, checksum {s.params.checksum}, backend {s.backend}, zero-copy "
                       f"{'on' if s.stats()['zerocopy'] else 'off'} ({s.zerocopy_reason})")
        monitor, link = _link_monitor(s)
        control = contextlib.ExitStack()
        manager = None
        if metrics_port is not None:
            manager = _control_plane(control, s, monitor, metrics_port)
        progress = _Progress(s, seconds, interval_s, quiet, tty)
        done = threading.Event()
        r0, cpu0, t0 = s.tcp_retransmits(), _cpu_s(), time.monotonic()
        reporter = threading.Thread(target=progress.run, args=(done, t0), daemon=True)
        reporter.start()
        try:
            moved = s.send_for(buf, seconds)
        finally:
            done.set()
            reporter.join()
            link = _link_result(monitor, s, link)
            control.close()
        elapsed = time.monotonic() - t0
        cpu = _cpu_s() - cpu0
        retrans = s.tcp_retransmits() - r0
        s.send(json.dumps({"op": "report"}).encode())
        server_report = json.loads(bytes(s.recv(timeout_s=30)))
        stats = s.stats()
        tuner = s.attached("stream_tuner")
        if tuner is not None:
            tuner.stop()
    return {
        "throughput_bps": moved * 8 / elapsed,
        "bytes": moved,
        "seconds": elapsed,
        # With -P auto: the count the tuner ended on, the streams opened, and every change with its reason.
        "streams": tuner.settled if tuner is not None else stats["streams"],
        "streams_opened": stats["streams"],
        "stream_tuner": tuner.stats() if tuner is not None else None,
        "io_threads": stats["io_threads"],
        "sndbuf_bytes": stats["sndbuf_bytes"],
        "path_rtt_us": stats["path_rtt_us"],
        "chunk_bytes": stats["chunk_bytes"],
        "buffer_bytes": buffer_bytes,
        "checksum": stats["checksum"],
        "cipher": stats["cipher"],
        "backend": stats["backend"],
        "zerocopy": stats["zerocopy"],
        "zerocopy_reason": stats["zerocopy_reason"],
        "retransmits": retrans,
        "chunks_resent": stats["engine"].get("chunks_resent", 0),
        "intervals": [iv.as_dict() for iv in progress.intervals],
        "cpu": {"client_percent": 100.0 * cpu / elapsed, "server_percent": server_report["cpu_percent"]},
        "server": {"bytes": server_report["bytes"], "seconds": server_report["seconds"]},
        "link": link,
        # With --metrics-port: the Manager's plan for the server and its decisions.
        "control": None if manager is None else {"plan": manager.plan(str(s.peer[0])).to_json(),
                                                 "decisions": [d.to_json() for d in manager.decisions()]},
    }


def _control_plane(stack: contextlib.ExitStack, session: Session, monitor: LinkMonitor | None,
                   port: int) -> Any:
    """The control plane beside a benchmark: a Manager fed by the session's link monitor (decisions
    counted in the metrics registry) and /metrics on 127.0.0.1:port with the session's counters."""
    from dwcp.control import Manager, load_config
    from dwcp.control.metrics import SessionSource, default_registry, start_metrics_server

    registry = default_registry()
    manager = Manager(load_config(runtime={"enabled": True}), monitor=monitor, metrics=registry)
    stack.callback(manager.close)
    manager.plan(str(session.peer[0]))
    sessions = SessionSource(registry, name="bench_client")
    stack.callback(sessions.remove)
    sessions.track(session)
    metrics = stack.enter_context(start_metrics_server(port, registry=registry))
    click.echo(f"metrics at {metrics.url}", err=True)
    return manager


def _link_monitor(session: Session) -> tuple[LinkMonitor | None, dict[str, Any]]:
    """A LinkMonitor over the session's own data streams (the best telemetry source available)."""
    try:
        info = source_info()
        monitor = LinkMonitor(open_source(), registered_only=True)
    except DWCPError as e:
        return None, {"tier": None, "min_rtt_us": None, "bottleneck_bps": None, "source": None,
                      "error": str(e)}
    monitor.register_session(session)
    monitor.start()
    return monitor, {"source": monitor.source.name, "source_reason": info["reason"]}


def _link_result(monitor: LinkMonitor | None, session: Session, link: dict[str, Any]) -> dict[str, Any]:
    """The monitor's final estimate of the session's peer as the result's `link` object."""
    if monitor is None:
        return link
    try:
        monitor.poll()
    except DWCPError:
        pass
    monitor.close()
    est = monitor.estimate(str(session.peer[0]))
    if monitor.error is not None:
        link["error"] = f"telemetry stopped: {monitor.error}"
    if est is None:
        link.update({"tier": None, "min_rtt_us": None, "bottleneck_bps": None, "confidence": 0.0,
                     "time_to_decision_s": None})
        return link
    link.update({"tier": int(est.tier) if est.tier is not None else None, "min_rtt_us": est.min_rtt_us,
                 "bottleneck_bps": est.bottleneck_bps, "confidence": est.tier_confidence,
                 "time_to_decision_s": est.time_to_decision_s, "loss_rate": est.loss_rate,
                 "tier_reason": est.tier_reason})
    return link


def print_summary(r: dict[str, Any]) -> None:
    click.echo("- " * 30)
    click.echo(f"[SUM]   0.00-{r['seconds']:6.2f} sec  {_fmt_bytes(r['bytes'])}  "
               f"{_fmt_rate(r['throughput_bps'])}  retr {r['retransmits']}  sender")
    tuner = r.get("stream_tuner")
    if tuner:
        for c in tuner["changes"]:
            click.echo(f"  streams -> {c['streams']:3d} at {c['at_s']:6.2f} s: {c['reason']}")
    click.echo(f"streams {r['streams']}{' (auto, of ' + str(r['streams_opened']) + ' opened)' if tuner else ''}, chunk {r['chunk_bytes']} B, frames {r['cipher']}, checksum {r['checksum']}, "
               f"chunks re-sent {r['chunks_resent']}")
    click.echo(f"CPU: client {r['cpu']['client_percent']:.0f}%, server {r['cpu']['server_percent']:.0f}% "
               f"(100% = one core)")
    link = r.get("link") or {}
    if link.get("tier") is not None:
        click.echo(f"link: tier {link['tier']}, bottleneck {_fmt_rate(link['bottleneck_bps']).strip()}, "
                   f"min RTT {link['min_rtt_us'] / 1000:.3f} ms (source {link['source']}, "
                   f"confidence {link['confidence']:.2f})")
    else:
        click.echo(f"link: unknown ({link.get('error') or 'no telemetry samples'}; source {link.get('source')})")


def _client_options(f: Any) -> Any:
    f = _io_threads_option(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")(f)
    f = click.option("-i", "--interval", "interval_s", type=click.FloatRange(min=0.1), default=1.0,
                     show_default=True, help="Seconds between interval reports.")(f)
    f = click.option("--buffer-bytes", type=click.IntRange(min=4096), default=DEFAULT_BUFFER_BYTES,
                     show_default=True, help="Size of the memory buffer the transfer wraps around.")(f)
    f = click.option("-l", "--chunk", "chunk_bytes", type=click.IntRange(4096, 64 << 20), default=1 << 20,
                     show_default=True, help="Chunk size in bytes.")(f)
    f = click.option("-t", "--time", "seconds", type=click.FloatRange(min=0.1), default=10.0,
                     show_default=True, help="Seconds to send.")(f)
    f = click.option("--metrics-port", "metrics_port", type=click.IntRange(1, 65535), default=None,
                     help="Run the control plane beside the benchmark (a Manager fed by the link monitor) "
                          "and serve Prometheus metrics at http://127.0.0.1:PORT/metrics; see docs/metrics.md.")(f)
    f = click.option("--max-streams", "max_streams", type=click.IntRange(1, 256), default=None,
                     help="With -P auto: streams opened for the tuner to choose from (default 64).")(f)
    f = click.option("-P", "--parallel", "streams", type=StreamCount(), default="1", show_default=True,
                     help="Parallel TCP streams, 1..256, or 'auto': the stream tuner starts from the "
                          "tier's count and adds or retires streams while data flows.")(f)
    return f


class StreamCount(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs
    """-P: 1..256 or auto."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if value == "auto":
            return "auto"
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a stream count (1..256) nor 'auto'", param, ctx)
        if not 1 <= n <= 256:
            self.fail(f"{n} streams: use 1..256 or 'auto'", param, ctx)
        return n


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_summary(result)


def client_address(host: str, port: int | None) -> tuple[str, int]:
    """HOST, HOST:PORT, [V6]:PORT or a bare IPv6 address, with -p PORT (which must agree with a port
    given in HOST)."""
    target = parse_address(host, default_port=port or DEFAULT_PORT)
    if port is not None and target[1] != port:
        raise ConfigError(f"{host!r} names port {target[1]} but -p says {port}: give the port once")
    if not target[0]:
        raise ConfigError(f"no host in {host!r}: dwcp-bench client needs the server's address")
    return target


@main.command()
@click.argument("host")
@click.option("-p", "--port", type=click.IntRange(1, 65535), default=None,
              help=f"Server port (default {DEFAULT_PORT}; HOST:PORT works too).")
@_client_options
@_key_options
def client(host: str, port: int | None, streams: int | str, seconds: float, chunk_bytes: int,
           buffer_bytes: int, interval_s: float, as_json: bool, io_threads: int, sndbuf_bytes: int,
           key_file: str | None, insecure: bool, no_encrypt: bool, max_streams: int | None,
           metrics_port: int | None) -> None:
    """Send to a `dwcp-bench server` at HOST (HOST:PORT, or HOST with -p PORT)."""
    _warn_plaintext(insecure, no_encrypt)
    try:
        h, p = client_address(host, port)
        addr = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
        result = run_client(addr, streams=streams, seconds=seconds, chunk_bytes=chunk_bytes,
                            buffer_bytes=buffer_bytes, interval_s=interval_s, key=None, key_file=key_file,
                            insecure=insecure, quiet=as_json, io_threads=io_threads,
                            sndbuf_bytes=sndbuf_bytes, encrypt=not no_encrypt, max_streams=max_streams,
                            metrics_port=metrics_port)
    except DWCPError as e:
        raise click.ClickException(str(e)) from e
    _emit(result, as_json)


@main.command()
@_client_options
@click.option("--no-encrypt", "no_encrypt", is_flag=True,
              help="Plaintext (checksummed) frames on both ends, to see what sealing costs.")
def loopback(streams: int | str, seconds: float, chunk_bytes: int, buffer_bytes: int, interval_s: float,
             as_json: bool, io_threads: int, sndbuf_bytes: int, no_encrypt: bool, max_streams: int | None,
             metrics_port: int | None) -> None:
    """Run a server in a child process on 127.0.0.1 and measure against it (random in-process key;
    frames sealed unless --no-encrypt)."""
    key = secrets.token_hex(32)
    env = dict(os.environ, DWCP_KEY=key)  # never on the command line, where `ps` would show it
    proc = subprocess.Popen([sys.executable, "-m", "dwcp.cli.bench", "server", "--bind", "127.0.0.1:0",
                             "--once", "-T", str(io_threads), "-w", str(sndbuf_bytes),
                             *(["--no-encrypt"] if no_encrypt else [])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            err = proc.stderr.read() if proc.stderr else ""
            raise click.ClickException(f"benchmark server failed to start: {line.strip()} {err.strip()}")
        port = int(line.rsplit(":", 1)[1])
        result = run_client(f"127.0.0.1:{port}", streams=streams, seconds=seconds, chunk_bytes=chunk_bytes,
                            buffer_bytes=buffer_bytes, interval_s=interval_s, key=key, key_file=None,
                            insecure=False, quiet=as_json, io_threads=io_threads, sndbuf_bytes=sndbuf_bytes,
                            encrypt=not no_encrypt, max_streams=max_streams, metrics_port=metrics_port)
        result["mode"] = "loopback"
    except DWCPError as e:
        raise click.ClickException(str(e)) from e
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=5)
    _emit(result, as_json)


if __name__ == "__main__":
    main()
