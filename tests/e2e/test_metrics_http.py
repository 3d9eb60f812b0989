"""/metrics over real HTTP: the library's server, `dwcp-bench server --metrics-port` and
`dwcp diag --metrics-port` as users run them, scraped with urllib and parsed by prometheus_client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dwcp.control.metrics import MetricsRegistry, PeerMetrics, start_metrics_server
from dwcp.errors import ConfigError
from tests.conftest import TEST_KEY

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_server_serves_a_registry_at_slash_metrics() -> None:
    reg = MetricsRegistry()
    reg.add_source("test", lambda: [PeerMetrics("10.1.2.3", sent_bytes=123, received_bytes=45, streams=8,
                                                bottleneck_bps=2.5e9, min_rtt_us=1500, tier=2)])
    reg.count_decision("10.1.2.3", "streams")
    reg.observe_sample("rtt_seconds", "10.1.2.3", 0.002)
    with start_metrics_server(0, registry=reg) as server:
        assert server.port > 0 and server.address == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        got = scrape(server.url)
        peer = (("peer", "10.1.2.3"),)
        assert got[("dwcp_transport_sent_bytes_total", peer)] == 123
        assert got[("dwcp_transport_received_bytes_total", peer)] == 45
        assert got[("dwcp_transport_streams", peer)] == 8
        assert got[("dwcp_link_bottleneck_bits_per_second", peer)] == 2.5e9
        assert got[("dwcp_link_min_rtt_seconds", peer)] == pytest.approx(0.0015)
        assert got[("dwcp_link_tier", peer)] == 2
        assert got[("dwcp_control_decisions_total", (("peer", "10.1.2.3"), ("what", "streams")))] == 1
        assert got[("dwcp_link_rtt_seconds_count", peer)] == 1
        assert got[("dwcp_process_sent_bytes_total", ())] == 123
        assert got[("dwcp_metrics_source_errors_total", (("source", "test"),))] == 0
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=10)
        assert e.value.code == 404
        port = server.port
    # close() stopped it and freed the port
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    with start_metrics_server(port, registry=reg) as again:  # a listener may take the port again
        assert ("dwcp_link_tier", (("peer", "10.1.2.3"),)) in scrape(again.url)


def test_a_taken_port_is_a_config_error() -> None:
    with start_metrics_server(0, registry=MetricsRegistry()) as first:
        with pytest.raises(ConfigError, match=f"port {first.port} .* already in use"):
            start_metrics_server(first.port, registry=MetricsRegistry())
        assert scrape(first.url) is not None  # the first one is unharmed


def test_a_stalled_client_does_not_block_scrapes() -> None:
    with start_metrics_server(0, registry=MetricsRegistry()) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as stalled:
            stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never finishes its request
            assert ("dwcp_metrics_max_peers", ()) in scrape(server.url)


# ---- the CLIs ----------------------------------------------------------------------------------
def scrape_until(url: str, ready: str, proc: subprocess.Popen[str], **labels: str) -> Samples:
    """Scrape until a sample named `ready` with `labels` shows up (or the process exits)."""
    key = (ready, tuple(sorted(labels.items())))
    deadline = time.monotonic() + 60
    while True:
        try:
            got = scrape(url)
            if key in got:
                return got
        except urllib.error.URLError:
            pass  # not listening yet
        assert proc.poll() is None, f"the process exited ({proc.returncode}) before {ready} appeared"
        assert time.monotonic() < deadline, f"no {key} at {url} after 60 s"
        time.sleep(0.2)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_bench_server_exports_its_sessions_bytes() -> None:
    env = {**os.environ, "DWCP_KEY": TEST_KEY.decode()}
    mport = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "dwcp.cli.bench", "server", "--bind", "127.0.0.1:0",
                            "--metrics-port", str(mport)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)
    try:
        assert srv.stdout is not None and srv.stderr is not None
        line = srv.stdout.readline()
        assert line.startswith("listening on "), line + srv.stderr.read()
        port = line.rsplit(":", 1)[1].strip()
        url = f"http://127.0.0.1:{mport}/metrics"
        assert srv.stderr.readline().strip() == f"metrics at {url}"  # printed once, at start
        before = scrape(url)
        assert before[("dwcp_process_received_bytes_total", ())] == 0
        r = subprocess.run([sys.executable, "-m", "dwcp.cli.bench", "client", "127.0.0.1", "-p", port,
                            "-P", "2", "-t", "1", "--json"], capture_output=True, text=True, timeout=90,
                           env=env)
        assert r.returncode == 0, r.stderr
        sent = json.loads(r.stdout)["bytes"]
        assert sent > 0
        got = scrape(url)
        peer = (("peer", "127.0.0.1"),)
        # what the client sent, plus its small report requests; the server sent the reports back
        assert got[("dwcp_transport_received_bytes_total", peer)] >= sent
        assert got[("dwcp_transport_received_bytes_total", peer)] < sent + 64 * 1024
        assert got[("dwcp_transport_sent_bytes_total", peer)] > 0
        assert got[("dwcp_process_received_bytes_total", ())] == got[("dwcp_transport_received_bytes_total",
                                                                      peer)]
        assert got[("dwcp_metrics_source_errors_total", (("source", "bench_server"),))] == 0
        assert got[("process_cpu_seconds_total", ())] > 0  # the default registry's process metrics
    finally:
        stop(srv)


def test_diag_exports_the_link_estimates(busy_flow: tuple[int, int]) -> None:
    mport = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dwcp.cli.main", "diag", "--json", "--interval", "0.5",
                             "--source", "inet_diag", "--port", str(busy_flow[1]), "--metrics-port", str(mport)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{mport}/metrics"
        got = scrape_until(url, "dwcp_link_min_rtt_seconds", proc, peer="127.0.0.1")
        peer = (("peer", "127.0.0.1"),)
        assert 0 < got[("dwcp_link_min_rtt_seconds", peer)] < 1
        assert got[("dwcp_link_throughput_bits_per_second", peer)] >= 0
        assert 0 <= got[("dwcp_link_loss_ratio", peer)] <= 1
        assert got[("dwcp_metrics_source_errors_total", (("source", "link_monitor"),))] == 0
    finally:
        stop(proc)
    assert proc.stderr is not None
    assert f"metrics at {url}" in proc.stderr.read()


def test_diag_refuses_metrics_with_once() -> None:
    r = subprocess.run([sys.executable, "-m", "dwcp.cli.main", "diag", "--once", "--metrics-port", "9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--once" in r.stderr
