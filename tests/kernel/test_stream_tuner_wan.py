"""-P auto over an emulated WAN whose receive windows are capped (16 KiB over 30 ms: ~3 Mbit/s per stream
on a 100 Mbit/s link): the stream tuner must add streams while data flows and say why, and the
transfer's bytes all arrive (the server's count matches the client's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import TEST_KEY

pytestmark = pytest.mark.kernel


def test_auto_adds_streams_where_windows_cap_each_one(wan_link: Any) -> None:
    lab = wan_link(rtt_ms=30, rate_mbit=100)
    lab.b.set_sysctls({"net.ipv4.tcp_rmem": f"4096 8192 {16 * 1024}"})
    env = {**os.environ, "DWCP_KEY": TEST_KEY.decode(), "PYTHONPATH": os.getcwd()}
    server = lab.b.popen([sys.executable, "-m", "dwcp.cli.bench", "server", "--bind", f"{lab.b.addr}:0", "--once"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on "), line
        port = line.rsplit(":", 1)[1].strip()
        r = lab.a.run([sys.executable, "-m", "dwcp.cli.bench", "client", f"{lab.b.addr}:{port}", "-P", "auto",
                       "--max-streams", "32", "-t", "6", "--json"], capture_output=True, text=True, timeout=120,
                      env=env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
    finally:
        server.kill()
        server.wait()
    tuner = out["stream_tuner"]
    assert out["streams_opened"] == 32
    assert tuner["changes"][0]["streams"] == 4 and "ms path (handshake RTT)" in tuner["changes"][0]["reason"]
    assert out["streams"] >= 8, tuner["changes"]                    # it climbed where each stream is capped
    assert any("kept" in c["reason"] for c in tuner["changes"]), tuner["changes"]
    assert out["server"]["bytes"] == out["bytes"]
