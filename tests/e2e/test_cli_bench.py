"""dwcp-bench and dwcp as users run them: real processes, real sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TEST_KEY


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("streams", [1, 4])
def test_loopback_json(streams: int) -> None:
    r = run("dwcp.cli.bench", "loopback", "-P", str(streams), "-t", "1.5", "-i", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("throughput_bps", "bytes", "seconds", "streams", "intervals"):
        assert key in out
    assert out["streams"] == streams
    assert out["bytes"] > 0 and out["throughput_bps"] > 0
    assert out["intervals"] and sum(iv["bytes"] for iv in out["intervals"]) <= out["bytes"]
    assert 0 < out["cpu"]["client_percent"] and 0 < out["cpu"]["server_percent"]
    assert out["cipher"] == "aes-128-gcm"


def test_loopback_no_encrypt_measures_plaintext_frames() -> None:
    r = run("dwcp.cli.bench", "loopback", "-P", "2", "-t", "0.5", "--json", "--no-encrypt")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cipher"] == "none"


def test_loopback_text_report() -> None:
    r = run("dwcp.cli.bench", "loopback", "-P", "2", "-t", "1", "-i", "0.5")
    assert r.returncode == 0, r.stderr
    assert "[SUM]" in r.stdout and "CPU: client" in r.stdout and "sender" in r.stdout


def test_server_client_pair_with_key_file(tmp_path: object) -> None:
    from pathlib import Path
    key = Path(str(tmp_path)) / "k"
    key.write_bytes(TEST_KEY)
    key.chmod(0o600)
    srv = subprocess.Popen([sys.executable, "-m", "dwcp.cli.bench", "server", "--bind", "127.0.0.1:0",
                            "--once", "--key-file", str(key)], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        port = srv.stdout.readline().rsplit(":", 1)[1].strip()
        r = run("dwcp.cli.bench", "client", "127.0.0.1", "-p", port, "-P", "3", "-t", "1", "--json",
                "--key-file", str(key))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["streams"] == 3
        assert json.loads(r.stdout)["cipher"] == "aes-128-gcm"  # sealed by default with a key
        srv.wait(timeout=20)
        assert srv.returncode == 0
    finally:
        srv.kill()
        srv.wait()


@pytest.mark.parametrize("server_flags,client_flags,cipher,warning", [
    (["--no-encrypt"], ["--no-encrypt"], "none", "--no-encrypt"),
    (["--no-encrypt"], [], "aes-128-gcm", None),          # either end asking for encryption gets it
    (["--insecure"], ["--insecure"], "none", "no authentication and no encryption"),
])
def test_frame_protection_flags(server_flags: list[str], client_flags: list[str], cipher: str,
                                warning: str | None) -> None:
    env = {**os.environ, "DWCP_KEY": TEST_KEY.decode()}
    if "--insecure" in server_flags:
        env.pop("DWCP_KEY")
    srv = subprocess.Popen([sys.executable, "-m", "dwcp.cli.bench", "server", "--bind", "127.0.0.1:0",
                            "--once", *server_flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)
    try:
        assert srv.stdout is not None
        port = srv.stdout.readline().rsplit(":", 1)[1].strip()
        r = subprocess.run([sys.executable, "-m", "dwcp.cli.bench", "client", f"127.0.0.1:{port}", "-t", "0.5",
                            "--json", *client_flags], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["cipher"] == cipher
        if warning:
            assert warning in r.stderr
        srv.wait(timeout=20)
        assert srv.stderr is not None and f"frames {cipher}" in srv.stderr.read()
    finally:
        srv.kill()
        srv.wait()


def test_client_without_key_says_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DWCP_KEY"}
    r = subprocess.run([sys.executable, "-m", "dwcp.cli.bench", "client", "127.0.0.1", "-p", "9", "-t", "1"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode != 0
    assert "pre-shared key" in r.stderr and "--insecure" in r.stderr or "insecure" in r.stderr


def test_features_command() -> None:
    r = run("dwcp.cli.main", "features", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["features"]["cext"]["available"] is True


def test_bind_and_client_addresses_as_iperf_users_type_them() -> None:
    """--bind HOST takes the default port; the client takes HOST:PORT as well as -p, and a bare IPv6
    address; a port given twice must agree."""
    from dwcp.cli.bench import DEFAULT_PORT, client_address
    from dwcp.errors import ConfigError
    from dwcp.transport.options import parse_address

    assert parse_address("198.18.0.2", default_port=DEFAULT_PORT) == ("198.18.0.2", DEFAULT_PORT)
    assert parse_address("[::1]", default_port=DEFAULT_PORT) == ("::1", DEFAULT_PORT)
    assert parse_address(":7000", default_port=DEFAULT_PORT) == ("", 7000)
    assert client_address("example.org", None) == ("example.org", DEFAULT_PORT)
    assert client_address("example.org:7000", None) == ("example.org", 7000)
    assert client_address("example.org", 7000) == ("example.org", 7000)
    assert client_address("example.org:7000", 7000) == ("example.org", 7000)
    assert client_address("::1", 7000) == ("::1", 7000)
    assert client_address("[::1]:7000", None) == ("::1", 7000)
    with pytest.raises(ConfigError, match="give the port once"):
        client_address("example.org:7000", 7001)
    with pytest.raises(ConfigError, match="bad port"):
        client_address("example.org:http", None)
    with pytest.raises(ConfigError, match="expected 'host:port'"):
        parse_address("example.org")


def test_server_bind_host_without_port_and_client_host_colon_port() -> None:
    env = {**os.environ, "DWCP_KEY": TEST_KEY.decode()}
    srv = subprocess.Popen([sys.executable, "-m", "dwcp.cli.bench", "server", "--bind", "127.0.0.1", "--once"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()
        if not line.startswith("listening on "):   # the default port is taken by someone else here
            assert srv.stderr is not None
            err = srv.stderr.read()
            assert "5301" in err, (line, err)
            pytest.skip(f"port 5301 is in use on this machine: {err.strip()}")
        assert line.strip() == "listening on 127.0.0.1:5301"
        r = run("dwcp.cli.bench", "client", "127.0.0.1:5301", "-P", "2", "-t", "0.5", "--json",
                env={"DWCP_KEY": TEST_KEY.decode()})
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["streams"] == 2
        srv.wait(timeout=20)
    finally:
        srv.kill()
        srv.wait()
