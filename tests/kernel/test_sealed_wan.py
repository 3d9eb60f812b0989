"""Sealed sessions across an emulated WAN link (dwcp.netlab): two network namespaces, a delay line
with loss, the peer in its own process on the far host. Loss means TCP retransmits under every
sealed frame, and each engine's counters and tags must still line up; the data must arrive intact,
and nothing may fail authentication (nobody tampers here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import TEST_KEY

kernel = pytest.mark.kernel

CLIENT = r"""
import hashlib, json, os, sys
import dwcp
host, port, backend, cipher = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
data = os.urandom(12 << 20)
with dwcp.connect((host, port), streams=8, backend=backend, ciphers=(cipher,), timeout_s=30) as s:
    for _ in range(2):
        s.send(data)
        ok = bytes(s.recv(timeout_s=60)) == hashlib.sha256(data).digest()
        if not ok:
            break
    st = s.stats()
print(json.dumps({"ok": ok, "cipher": st["cipher"], "auth_failures": st["engine"]["auth_failures"],
                  "backend": st["backend"]}))
"""


@kernel
@pytest.mark.parametrize("backend,cipher", [("c", "aes-128-gcm"), ("c", "chacha20-poly1305"),
                                            ("python", "aes-256-gcm")])
def test_sealed_transfers_cross_a_lossy_wan_link_intact(wan_link: Any, backend: str, cipher: str) -> None:
    lab = wan_link(rtt_ms=20, rate_mbit=200, loss=0.01)
    env = {**os.environ, "DWCP_KEY": TEST_KEY.decode(), "DWCP_PEER_HOST": lab.b.addr,
           "DWCP_BACKEND": backend, "PYTHONPATH": os.getcwd()}
    peer = lab.b.popen([sys.executable, "tests/e2e/peer.py", "digest", "30"], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert peer.stdout is not None
        port = peer.stdout.readline().strip()
        r = lab.a.run([sys.executable, "-c", CLIENT, lab.b.addr, port, backend, cipher], capture_output=True,
                      text=True, timeout=180, env=env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out == {"ok": True, "cipher": cipher, "auth_failures": 0, "backend": backend}
        assert lab.stats(fresh=True)["directions"]["a_to_b"]["drop_loss_packets"] > 0  # the link dropped packets
    finally:
        peer.kill()
        peer.wait()
