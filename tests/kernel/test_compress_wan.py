"""send(compress="auto") over an emulated 100 Mbit/s WAN link (dwcp.netlab): compressible data is sent
compressed at a level the loop picks from what it measures, and arrives byte for byte (the peer, in its
own process on the far host, answers with the SHA-256 of what it received); random data goes as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import TEST_KEY

pytestmark = pytest.mark.kernel

CLIENT = r"""
import hashlib, json, os, sys
import dwcp
host, port = sys.argv[1], int(sys.argv[2])
words = [os.urandom(4).hex() for _ in range(2048)]
text = (" ".join(words[(i * 7919) % 2048] for i in range(6 << 20)).encode())[:40 << 20]
rand = os.urandom(8 << 20)
out = {}
with dwcp.connect((host, port), streams=4, timeout_s=60) as s:
    for name, data in (("text", text), ("random", rand)):
        s.send(data, compress="auto")
        ok = bytes(s.recv(timeout_s=120)) == hashlib.sha256(data).digest()
        lc = s.last_compression
        out[name] = {"ok": ok, "level": lc["level"], "ratio": lc.get("ratio"), "reason": lc["reason"],
                     "decisions": lc["decisions"]}
print(json.dumps(out))
"""


def test_auto_compresses_on_a_thin_link_and_not_random_data(wan_link: Any) -> None:
    lab = wan_link(rtt_ms=20, rate_mbit=100)
    env = {**os.environ, "DWCP_KEY": TEST_KEY.decode(), "DWCP_PEER_HOST": lab.b.addr, "PYTHONPATH": os.getcwd()}
    peer = lab.b.popen([sys.executable, "tests/e2e/peer.py", "digest", "30"], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert peer.stdout is not None
        port = peer.stdout.readline().strip()
        r = lab.a.run([sys.executable, "-c", CLIENT, lab.b.addr, port], capture_output=True, text=True,
                      timeout=240, env=env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
    finally:
        peer.kill()
        peer.wait()
    text, rand = out["text"], out["random"]
    assert text["ok"] and rand["ok"]
    assert text["level"] is not None and text["ratio"] > 2, text
    assert text["decisions"][0]["level"] == 1 and all(d["reason"] for d in text["decisions"])
    assert rand["level"] is None and "incompressible" in rand["reason"]
