"""`dwcp config show|validate` as users run them: real processes, real files, their own environment."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dwcp.control.config import KEYS

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`dwcp config ...` with this process's environment minus every DWCP_ variable, plus ``env``: the
    test decides what the command sees (and a missing /etc/dwcp/dwcp.yaml is pointed around with
    $DWCP_CONFIG where it matters)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DWCP_")}
    return subprocess.run([sys.executable, "-m", "dwcp.cli.main", "config", *args], capture_output=True,
                          text=True, timeout=60, env={**base, **(env or {})}, cwd=ROOT)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def seed_example() -> str:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    block = re.search(r"<!-- seed-example:begin -->\s*```yaml\n(.*?)```\s*<!-- seed-example:end -->", doc, re.S)
    assert block is not None, "docs/configuration.md lost its seed example block"
    return block.group(1)


def test_seed_example_validates(tmp_path: Path) -> None:
    path = write(tmp_path / "seed.yaml", seed_example())
    r = run("validate", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{path}: valid (13 keys set)"
    r = run("show", "--json", "--config", str(path))
    entries = {e["key"]: e for e in json.loads(r.stdout)}
    assert entries["transport.min_streams"]["value"] == 16
    assert entries["transport.initial_streams"]["value"] == 32
    assert entries["transport.initial_streams"]["source"] == f"file {path}:7"
    assert entries["enabled"]["value"] is True


def test_show_json_every_key_with_its_source(tmp_path: Path) -> None:
    path = write(tmp_path / "dwcp.yaml", "dwcp:\n  transport:\n    max_streams: 128\n    min_streams: 4\n"
                                         "  metrics:\n    port: 9464\n")
    r = run("show", "--json", "--config", str(path),
            env={"DWCP_TRANSPORT_MAX_STREAMS": "64", "DWCP_KEY": "x" * 32, "DWCP_COMPRESSION_LEVEL": "auto"})
    assert r.returncode == 0, r.stderr
    entries: list[dict[str, Any]] = json.loads(r.stdout)
    assert [e["key"] for e in entries] == sorted(KEYS)
    assert all(set(e) == {"key", "value", "source", "default", "allowed", "env"} for e in entries)
    by_key = {e["key"]: e for e in entries}
    assert by_key["transport.max_streams"] == {
        "key": "transport.max_streams", "value": 64, "source": "environment DWCP_TRANSPORT_MAX_STREAMS",
        "default": 256, "allowed": "an integer 1..256", "env": "DWCP_TRANSPORT_MAX_STREAMS"}
    assert (by_key["transport.min_streams"]["value"], by_key["transport.min_streams"]["source"]) == (
        4, f"file {path}:4")
    assert (by_key["metrics.port"]["value"], by_key["metrics.port"]["source"]) == (9464, f"file {path}:6")
    assert by_key["compression.level"]["value"] == "auto"
    assert by_key["enabled"] == {"key": "enabled", "value": False, "source": "default", "default": False,
                                 "allowed": KEYS["enabled"].allowed, "env": "DWCP_ENABLED"}


def test_show_reads_dwcp_config_and_prints_a_table(tmp_path: Path) -> None:
    path = write(tmp_path / "site.json", '{\n  "enabled": true,\n  "metrics": {"address": "0.0.0.0"}\n}\n')
    r = run("show", env={"DWCP_CONFIG": str(path)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"config file: {path}"
    assert lines[1].split() == ["KEY", "VALUE", "SOURCE"]
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in lines[2:]}
    assert set(rows) == set(KEYS)
    assert rows["enabled"] == ["true", f"file {path}:2"]
    assert rows["metrics.address"] == ['"0.0.0.0"', f"file {path}:3"]
    assert rows["transport.initial_streams"] == ['"auto"', "default"]


def test_show_errors_exit_1(tmp_path: Path) -> None:
    r = run("show", env={"DWCP_TRANSPORT_MAX_STREAM": "64", "DWCP_CONFIG": str(write(tmp_path / "e.yaml", ""))})
    assert r.returncode == 1
    assert "DWCP_TRANSPORT_MAX_STREAM" in r.stderr and "did you mean DWCP_TRANSPORT_MAX_STREAMS" in r.stderr
    r = run("show", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = run("show", env={"DWCP_METRICS_PORT": "http", "DWCP_CONFIG": str(tmp_path / "e.yaml")})
    assert r.returncode == 1 and "metrics.port" in r.stderr and "environment DWCP_METRICS_PORT" in r.stderr


@pytest.mark.parametrize("name,body,needle", [
    ("bad.yaml", "# site config\ndwcp:\n  transport:\n    max_streams: 300\n",
     "invalid value for transport.max_streams in file {path}:4: 300 is out of range; allowed: an integer 1..256"),
    ("typo.yaml", "transport:\n  max_stream: 64\n",
     "unknown config key 'transport.max_stream' in file {path}:2 (did you mean transport.max_streams?)"),
    ("cross.yaml", "transport:\n  min_streams: 32\n  max_streams: 16\n",
     "transport.min_streams = 32 (file {path}:2) is above transport.max_streams = 16 (file {path}:3)"),
    ("bad.json", '{\n  "metrics": {\n    "cache_ttl_s": -1\n  }\n}\n',
     "invalid value for metrics.cache_ttl_s in file {path}:3"),
    ("broken.yaml", "transport:\n  max_streams: [4\n", "is not valid YAML"),
])
def test_validate_bad_files(tmp_path: Path, name: str, body: str, needle: str) -> None:
    path = write(tmp_path / name, body)
    r = run("validate", str(path))
    assert r.returncode == 1, r.stdout
    assert needle.format(path=path) in r.stderr
    assert r.stdout == ""


def test_validate_good_files_ignores_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path / "ok.json", '{"dwcp": {"enabled": true, "metrics": {"port": 9464, "cache_ttl_s": 0}}}')
    r = run("validate", str(path), env={"DWCP_TRANSPORT_MAX_STREAM": "typo elsewhere"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{path}: valid (3 keys set)"
    r = run("validate", str(write(tmp_path / "one.yaml", "enabled: true\n")))
    assert r.stdout.strip() == f"{tmp_path / 'one.yaml'}: valid (1 key set)"


def test_validate_missing_file(tmp_path: Path) -> None:
    r = run("validate", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = run("validate")
    assert r.returncode == 2 and "Missing argument" in r.stderr


def test_dwcp_entry_point_lists_config() -> None:
    dwcp = Path(sys.executable).parent / "dwcp"
    if not dwcp.exists():
        pytest.skip(f"no dwcp entry point next to {sys.executable} (package not installed in this env)")
    r = subprocess.run([str(dwcp), "config", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "show" in r.stdout and "validate" in r.stdout
