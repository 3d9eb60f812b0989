"""dwcp.control.config: the schema, the four layers and their order, every invalid value from every
source, unknown keys, listeners, validators and reload.

Files are real files under tmp_path; the environment is a mapping handed to load_config (os.environ is
never read here, except where a test says so)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from dwcp import control
from dwcp.control import config as config_mod
from dwcp.control.config import (KEYS, SECTIONS, Config, ConfigChange, ConfigEntry, ConfigValueError,
                                 load_config)
from dwcp.errors import ConfigError, DWCPError

# The brief's defaults, written out once more so a change to the schema is a deliberate one.
DEFAULTS = {
    "enabled": False, "version": "1.0.0",
    "transport.min_streams": 1, "transport.max_streams": 256, "transport.initial_streams": "auto",
    "transport.rdma_device": None,
    "compression.enabled": True, "compression.algorithm": "zstd", "compression.level": 3,
    "compression.enable_delta_encoding": True,
    "prediction.enabled": False,
    "federation.auto_optimize": True, "federation.bandwidth_reservation": False,
    "metrics.enabled": True, "metrics.port": 0, "metrics.address": "127.0.0.1", "metrics.cache_ttl_s": 1.0,
    "features.adaptive_streams": True, "features.adaptive_compression": True, "features.telemetry": True,
}

# Per key: three valid values, none the default where the type allows (high, middle, low layer).
VALID: dict[str, tuple[Any, Any, Any]] = {
    "enabled": (True, False, True),
    "version": ("1.2.0", "1.1.0", "1.0.1"),
    "transport.min_streams": (2, 3, 4),
    "transport.max_streams": (64, 128, 200),
    "transport.initial_streams": (8, 16, 24),
    "transport.rdma_device": ("mlx5_0", "mlx5_1", "rxe0"),
    "compression.enabled": (False, True, False),
    "compression.algorithm": ("zstd", "zstd", "zstd"),
    "compression.level": (9, "auto", 1),
    "compression.enable_delta_encoding": (False, True, False),
    "prediction.enabled": (True, False, True),
    "federation.auto_optimize": (False, True, False),
    "federation.bandwidth_reservation": (True, False, True),
    "metrics.enabled": (False, True, False),
    "metrics.port": (9464, 9100, 65535),
    "metrics.address": ("0.0.0.0", "::1", "metrics.example"),
    "metrics.cache_ttl_s": (0.0, 2.5, 10.0),
    "features.adaptive_streams": (False, True, False),
    "features.adaptive_compression": (False, True, False),
    "features.telemetry": (False, True, False),
}

# Per key: values a file or the runtime API may not set, and texts the environment may not.
_BOOL_BAD = ([1, 0, "yes", "true", None], ["maybe", "2", "", "tru"])
_STREAMS_BAD = ([0, 257, -1, "16", True, 1.5, None], ["0", "257", "16.0", "x", ""])
INVALID: dict[str, tuple[list[Any], list[str]]] = {
    "enabled": _BOOL_BAD,
    "version": (["2.0.0", "1.0", 1.0, "v1.0.0", None], ["2.0.0", "1.0", "x", ""]),
    "transport.min_streams": _STREAMS_BAD,
    "transport.max_streams": _STREAMS_BAD,
    "transport.initial_streams": ([0, 257, "16", "Auto", True, 2.5, None], ["0", "257", "x", ""]),
    "transport.rdma_device": ([5, True, "mlx5 0", "a/b", ["mlx5_0"]], ["mlx5 0", "a/b"]),
    "compression.enabled": _BOOL_BAD,
    "compression.algorithm": (["lz4", "ZSTD", 3, None], ["lz4", "ZSTD", ""]),
    "compression.level": ([0, 20, -1, "3", True, 2.5, "fast", None], ["0", "20", "fast", ""]),
    "compression.enable_delta_encoding": _BOOL_BAD,
    "prediction.enabled": _BOOL_BAD,
    "federation.auto_optimize": _BOOL_BAD,
    "federation.bandwidth_reservation": _BOOL_BAD,
    "metrics.enabled": _BOOL_BAD,
    "metrics.port": ([-1, 65536, "80", True, 80.0, None], ["-1", "65536", "http", ""]),
    "metrics.address": (["", "not an address", "a..b", 127, None], ["", "not an address", "-bad-"]),
    "metrics.cache_ttl_s": ([-0.5, -1, "1.0", True, None, float("inf"), float("nan")],
                            ["-1", "fast", "nan", "inf", ""]),
    "features.adaptive_streams": _BOOL_BAD,
    "features.adaptive_compression": _BOOL_BAD,
    "features.telemetry": _BOOL_BAD,
}


def env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def yaml_file(tmp_path: Path, values: Mapping[str, Any], *, wrapped: bool = True, name: str = "dwcp.yaml") -> Path:
    """A YAML file setting dotted keys (JSON scalars are YAML flow scalars)."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        section, _, leaf = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[leaf] = value
    lines = ["# written by test_config"]
    indent = ""
    if wrapped:
        lines.append("dwcp:")
        indent = "  "
    for key, value in nested.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines += [f"{indent}  {leaf}: {json.dumps(v)}" for leaf, v in value.items()]
        else:
            lines.append(f"{indent}{key}: {json.dumps(value)}")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def layered(tmp_path: Path, key: str, layers: Mapping[str, Any]) -> Config:
    path = yaml_file(tmp_path, {key: layers["file"]}) if "file" in layers else None
    env = {KEYS[key].env: env_text(layers["environment"])} if "environment" in layers else {}
    runtime = {key: layers["runtime"]} if "runtime" in layers else None
    return load_config(path, env=env, runtime=runtime, use_system_file=False)


def snapshot(cfg: Config) -> list[ConfigEntry]:
    return cfg.explain()


# ---------------------------------------------------------------------------------------------------
# The schema


def test_schema_defaults_are_the_briefs() -> None:
    assert {k: s.default for k, s in KEYS.items()} == DEFAULTS
    cfg = Config()
    assert {k: cfg.get(k) for k in KEYS} == DEFAULTS
    assert all(cfg.source(k) == "default" for k in KEYS)


def test_tables_cover_every_key() -> None:
    assert set(VALID) == set(KEYS) == set(INVALID)


def test_env_names_and_sections() -> None:
    assert KEYS["transport.max_streams"].env == "DWCP_TRANSPORT_MAX_STREAMS"
    assert KEYS["enabled"].env == "DWCP_ENABLED" and KEYS["version"].env == "DWCP_VERSION"
    assert SECTIONS == ("transport", "compression", "prediction", "federation", "metrics", "features")
    for spec in KEYS.values():
        assert spec.help and spec.allowed and spec.type_name


def test_typed_views_to_dict_and_explain() -> None:
    cfg = Config({"transport.max_streams": 32, "compression": {"level": "auto"}})
    assert cfg.transport == config_mod.TransportConfig(1, 32, "auto", None)
    assert cfg.compression.level == "auto" and cfg.metrics.cache_ttl_s == 1.0
    assert cfg.features.adaptive_streams and cfg.features.telemetry
    assert not cfg.enabled and cfg.version == "1.0.0" and not cfg.prediction.enabled
    assert cfg.federation.auto_optimize and not cfg.federation.bandwidth_reservation
    with pytest.raises(AttributeError):
        cfg.transport.max_streams = 1  # type: ignore[misc]
    d = cfg.to_dict()
    assert d["transport"]["max_streams"] == 32 and d["enabled"] is False and set(d) == {
        "enabled", "version", *SECTIONS}
    entries = cfg.explain()
    assert [e.key for e in entries] == sorted(KEYS)
    entry = next(e for e in entries if e.key == "transport.max_streams")
    assert entry == ConfigEntry("transport.max_streams", 32, "runtime API", 256, "an integer 1..256",
                                "DWCP_TRANSPORT_MAX_STREAMS")
    # every section view holds exactly the section's keys
    for section in SECTIONS:
        assert set(getattr(cfg, section).__dataclass_fields__) == {
            k.split(".", 1)[1] for k in KEYS if k.startswith(section + ".")}


def test_package_reexports() -> None:
    assert control.Config is Config and control.load_config is load_config
    assert issubclass(ConfigValueError, ConfigError) and issubclass(ConfigValueError, DWCPError)


# ---------------------------------------------------------------------------------------------------
# Precedence: environment > file > runtime API > default, every pair, every key

PAIRS = [("environment", "file"), ("environment", "runtime"), ("environment", "default"),
         ("file", "runtime"), ("file", "default"), ("runtime", "default")]


@pytest.mark.parametrize("key", sorted(KEYS))
@pytest.mark.parametrize("high,low", PAIRS)
def test_precedence_pairwise(tmp_path: Path, key: str, high: str, low: str) -> None:
    layers = {high: VALID[key][0]}
    if low != "default":
        layers[low] = VALID[key][1]
    cfg = layered(tmp_path, key, layers)
    assert cfg.get(key) == VALID[key][0]
    expected = {"environment": f"environment {KEYS[key].env}", "runtime": "runtime API",
                "file": f"file {tmp_path / 'dwcp.yaml'}:"}[high]
    assert cfg.source(key).startswith(expected)


def test_all_four_layers(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, {"transport.max_streams": 100, "transport.min_streams": 5})
    cfg = load_config(path, env={"DWCP_TRANSPORT_MAX_STREAMS": "50"}, use_system_file=False,
                      runtime={"transport.max_streams": 200, "transport.min_streams": 6,
                               "transport.initial_streams": 7})
    assert cfg.get("transport.max_streams") == 50
    assert cfg.source("transport.max_streams") == "environment DWCP_TRANSPORT_MAX_STREAMS"
    assert (cfg.get("transport.min_streams"), cfg.source("transport.min_streams")) == (5, f"file {path}:5")
    assert (cfg.get("transport.initial_streams"), cfg.source("transport.initial_streams")) == (7, "runtime API")
    assert (cfg.get("metrics.port"), cfg.source("metrics.port")) == (0, "default")


def test_operator_who_sets_16_gets_16(tmp_path: Path) -> None:
    cfg = load_config(yaml_file(tmp_path, {"transport.min_streams": 16, "transport.initial_streams": 16}),
                      env={}, use_system_file=False)
    assert cfg.transport.min_streams == 16 and cfg.transport.initial_streams == 16


# ---------------------------------------------------------------------------------------------------
# Every invalid value of every key, from every source

INVALID_TYPED = [(k, v) for k in sorted(KEYS) for v in INVALID[k][0]]
INVALID_TEXT = [(k, t) for k in sorted(KEYS) for t in INVALID[k][1]]
FILE_CASES = [(k, v) for k, v in INVALID_TYPED if json.dumps(v) not in ("Infinity", "NaN")]


def check_error(err: ConfigValueError, key: str, source: str) -> None:
    assert err.key == key and err.source == source
    message = str(err)
    assert key in message and source in message and KEYS[key].allowed in message


@pytest.mark.parametrize("key,value", FILE_CASES, ids=[f"{k}={v!r}" for k, v in FILE_CASES])
@pytest.mark.parametrize("form", ["yaml", "yaml-bare", "json"])
def test_invalid_value_in_file(tmp_path: Path, key: str, value: Any, form: str) -> None:
    nested = "." in key
    if form == "json":
        section, _, leaf = key.rpartition(".")
        body = {section: {leaf: value}} if nested else {key: value}
        path = tmp_path / "dwcp.json"
        path.write_text(json.dumps({"dwcp": body}, indent=2) + "\n")
        line = 4 if nested else 3
    else:
        path = yaml_file(tmp_path, {key: value}, wrapped=form == "yaml")
        line = (4 if nested else 3) if form == "yaml" else (3 if nested else 2)
    with pytest.raises(ConfigValueError) as info:
        load_config(path, env={}, use_system_file=False)
    check_error(info.value, key, f"file {path}:{line}")
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("key,text", INVALID_TEXT, ids=[f"{k}={t!r}" for k, t in INVALID_TEXT])
def test_invalid_value_in_environment(key: str, text: str) -> None:
    name = KEYS[key].env
    with pytest.raises(ConfigValueError) as info:
        load_config(env={name: text, "DWCP_KEY": "not-a-config-key"}, use_system_file=False)
    check_error(info.value, key, f"environment {name}")
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("key,value", INVALID_TYPED, ids=[f"{k}={v!r}" for k, v in INVALID_TYPED])
def test_invalid_value_from_runtime_api(key: str, value: Any) -> None:
    with pytest.raises(ConfigValueError) as info:
        load_config(env={}, runtime={key: value}, use_system_file=False)
    check_error(info.value, key, "runtime API")
    cfg = Config()
    before = snapshot(cfg)
    with pytest.raises(ConfigValueError) as info:
        cfg.set(key, value)
    check_error(info.value, key, "runtime API")
    assert snapshot(cfg) == before


@pytest.mark.parametrize("key", sorted(KEYS))
def test_valid_values_from_every_source(tmp_path: Path, key: str) -> None:
    for value in VALID[key]:
        assert Config({key: value}).get(key) == value
        assert load_config(env={KEYS[key].env: env_text(value)}, use_system_file=False).get(key) == value
        path = yaml_file(tmp_path, {key: value})
        assert load_config(path, env={}, use_system_file=False).get(key) == value


@pytest.mark.parametrize("text,value", [
    ("1", True), ("0", False), ("true", True), ("FALSE", False), ("Yes", True), ("no", False),
    ("ON", True), ("off", False), (" true ", True)])
def test_env_bool_forms(text: str, value: bool) -> None:
    assert load_config(env={"DWCP_ENABLED": text}, use_system_file=False).enabled is value


@pytest.mark.parametrize("text,value", [("null", None), ("None", None), ("", None), ("mlx5_0", "mlx5_0")])
def test_env_optional_device(text: str, value: str | None) -> None:
    assert load_config(env={"DWCP_TRANSPORT_RDMA_DEVICE": text}, use_system_file=False).transport.rdma_device == value


def test_env_auto_and_numbers() -> None:
    cfg = load_config(env={"DWCP_COMPRESSION_LEVEL": "AUTO", "DWCP_TRANSPORT_INITIAL_STREAMS": "auto",
                           "DWCP_METRICS_CACHE_TTL_S": "0.25", "DWCP_METRICS_PORT": "9464"},
                      use_system_file=False)
    assert cfg.compression.level == "auto" and cfg.transport.initial_streams == "auto"
    assert cfg.metrics.cache_ttl_s == 0.25 and cfg.metrics.port == 9464


def test_empty_rdma_device_in_a_file_is_null(tmp_path: Path) -> None:
    cfg = load_config(yaml_file(tmp_path, {"transport.rdma_device": ""}), env={}, use_system_file=False)
    assert cfg.transport.rdma_device is None


# ---------------------------------------------------------------------------------------------------
# Cross-key checks


def test_min_above_max_across_sources(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, {"transport.min_streams": 16})
    with pytest.raises(ConfigValueError) as info:
        load_config(path, env={"DWCP_TRANSPORT_MAX_STREAMS": "8"}, use_system_file=False)
    err = info.value
    # the stronger source is blamed; the message names both settings and where each came from
    assert (err.key, err.source) == ("transport.max_streams", "environment DWCP_TRANSPORT_MAX_STREAMS")
    assert f"file {path}:4" in str(err) and "min_streams must be <= max_streams" in str(err)


def test_initial_outside_min_max() -> None:
    with pytest.raises(ConfigValueError) as info:
        Config({"transport.initial_streams": 32, "transport.max_streams": 16})
    assert info.value.key in ("transport.initial_streams", "transport.max_streams")
    with pytest.raises(ConfigValueError):
        Config({"transport.initial_streams": 2, "transport.min_streams": 4})
    assert Config({"transport.initial_streams": 16, "transport.min_streams": 16,
                   "transport.max_streams": 16}).transport.initial_streams == 16
    assert Config({"transport.min_streams": 200}).transport.initial_streams == "auto"


def test_set_blames_the_key_it_changes(tmp_path: Path) -> None:
    cfg = load_config(yaml_file(tmp_path, {"transport.initial_streams": 32}), env={}, use_system_file=False)
    with pytest.raises(ConfigValueError) as info:
        cfg.set("transport.max_streams", 8)
    assert (info.value.key, info.value.source) == ("transport.max_streams", "runtime API")
    assert cfg.transport.max_streams == 256


def test_update_is_checked_together() -> None:
    cfg = Config()
    # one at a time the first would fail (min 64 > max 32 is fine only once max moves too)
    cfg.update({"transport.max_streams": 100, "transport.min_streams": 64, "transport.initial_streams": 80})
    assert cfg.transport == config_mod.TransportConfig(64, 100, 80, None)
    before = snapshot(cfg)
    with pytest.raises(ConfigValueError):
        cfg.update({"transport.max_streams": 50, "metrics.port": 9464})  # 64 > 50: nothing applied
    assert snapshot(cfg) == before
    with pytest.raises(ConfigValueError):
        cfg.update({"metrics.port": 9464, "compression.level": 99})
    assert snapshot(cfg) == before


# ---------------------------------------------------------------------------------------------------
# Unknown keys and malformed files


@pytest.mark.parametrize("body,key,line", [
    ("dwcp:\n  transport:\n    max_stream: 64\n", "transport.max_stream", 3),
    ("transport:\n  max_streams: 64\n  rdma: mlx5_0\n", "transport.rdma", 3),
    ("dwcp:\n  enable: true\n", "enable", 2),
    ("tranport:\n  max_streams: 64\n", "tranport", 1),
    ("metrics:\n  port: 1\n\n  prot: 2\n", "metrics.prot", 4),
])
def test_unknown_key_in_file(tmp_path: Path, body: str, key: str, line: int) -> None:
    path = tmp_path / "dwcp.yaml"
    path.write_text(body)
    with pytest.raises(ConfigValueError) as info:
        load_config(path, env={}, use_system_file=False)
    assert (info.value.key, info.value.source) == (key, f"file {path}:{line}")
    assert "unknown config key" in str(info.value)


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = tmp_path / "dwcp.json"
    path.write_text('{\n  "transport": {\n    "max_stream": 64\n  }\n}\n')
    with pytest.raises(ConfigValueError, match="did you mean transport.max_streams") as info:
        load_config(path, env={}, use_system_file=False)
    assert info.value.source == f"file {path}:3"
    with pytest.raises(ConfigValueError, match="did you mean transport.max_streams"):
        Config().set("transport.max_stream", 3)
    with pytest.raises(ConfigValueError):
        Config().get("transport.nope")


@pytest.mark.parametrize("section", SECTIONS)
def test_env_section_typo_is_an_error(section: str) -> None:
    name = f"DWCP_{section.upper()}_NO_SUCH_KEY"
    with pytest.raises(ConfigValueError) as info:
        load_config(env={name: "1"}, use_system_file=False)
    assert info.value.source == f"environment {name}" and name in str(info.value)
    assert info.value.key == f"{section}.no_such_key"
    # the message lists the section's real variables
    assert all(KEYS[k].env in str(info.value) for k in KEYS if k.startswith(section + "."))


def test_env_typo_suggests_the_right_name() -> None:
    with pytest.raises(ConfigValueError, match="did you mean DWCP_TRANSPORT_MAX_STREAMS"):
        load_config(env={"DWCP_TRANSPORT_MAX_STREAM": "64"}, use_system_file=False)
    with pytest.raises(ConfigValueError, match="DWCP_METRICS_PORT"):
        load_config(env={"DWCP_METRICS": "1"}, use_system_file=False)
    with pytest.raises(ConfigValueError, match="DWCP_TRANSPORT_MAX_STREAMS"):
        load_config(env={"DWCP_transport_max_streams": "64"}, use_system_file=False)  # names are upper-case


def test_other_dwcp_variables_are_not_config() -> None:
    env = {"DWCP_KEY": "k" * 32, "DWCP_BACKEND": "python", "DWCP_TELEMETRY": "pcap", "DWCP_ENCRYPT": "0",
           "DWCP_REQUIRE_KERNEL": "1", "DWCP_EBPF_HOOK": "x", "DWCP_DEBUG": "1", "DWCP_MAX_STREAMS": "x",
           "DWCP_CONFIG": "", "PATH": "/bin", "XDWCP_ENABLED": "maybe"}
    cfg = load_config(env=env, use_system_file=False)
    assert all(cfg.source(k) == "default" for k in KEYS)


def test_wrapped_and_bare_forms_agree(tmp_path: Path) -> None:
    values = {"enabled": True, "transport.min_streams": 16, "compression.level": "auto"}
    a = load_config(yaml_file(tmp_path, values, name="a.yaml"), env={}, use_system_file=False)
    b = load_config(yaml_file(tmp_path, values, wrapped=False, name="b.yaml"), env={}, use_system_file=False)
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("body,message", [
    ("transport:\n  max_streams: [1\n", "not valid YAML"),
    ("- enabled\n", "top level must be a mapping"),
    ("dwcp:\n  enabled: true\nmetrics:\n  port: 1\n", "drop the dwcp: wrapper"),
    ("transport: 5\n", "is a section"),
    ("transport:\n  max_streams: 4\n  max_streams: 5\n", "set twice"),
    ("enabled: true\n1: 2\n", "unknown config key"),
    ("version: !!python/object:os.system x\n", "not valid YAML"),
])
def test_malformed_yaml(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "dwcp.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, env={}, use_system_file=False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("body,line", [
    ('{\n  "transport": {\n    "max_streams": 4,\n  }\n}\n', 4),
    ('{\n  "enabled": true\n}\n}', 4),
    ('{\n  "enabled": tru\n}\n', 2),
])
def test_malformed_json_names_the_line(tmp_path: Path, body: str, line: int) -> None:
    path = tmp_path / "dwcp.json"
    path.write_text(body)
    with pytest.raises(ConfigError, match=f"not valid JSON: .* at line {line}") as info:
        load_config(path, env={}, use_system_file=False)
    assert str(path) in str(info.value)


def test_json_by_content_and_yaml_flow_by_content(tmp_path: Path) -> None:
    json_conf = tmp_path / "dwcp.conf"
    json_conf.write_text('{"dwcp": {"enabled": true,\n "metrics": {"port": 9464}}}')
    cfg = load_config(json_conf, env={}, use_system_file=False)
    assert cfg.metrics.port == 9464 and cfg.source("metrics.port") == f"file {json_conf}:2"
    flow = tmp_path / "flow.conf"
    flow.write_text("{dwcp: {enabled: yes}}\n")  # YAML flow style, not JSON
    assert load_config(flow, env={}, use_system_file=False).enabled


def test_empty_files_set_nothing(tmp_path: Path) -> None:
    for name, body in (("a.yaml", ""), ("b.yaml", "# only a comment\n"), ("c.json", "\n"), ("d.yaml", "dwcp:\n"),
                       ("e.yaml", "transport:\n"), ("f.json", "{}")):
        path = tmp_path / name
        path.write_text(body)
        cfg = load_config(path, env={}, use_system_file=False)
        assert all(cfg.source(k) == "default" for k in KEYS) and cfg.file_path == str(path)


# ---------------------------------------------------------------------------------------------------
# Where the file comes from


def test_file_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = yaml_file(tmp_path, {"metrics.port": 1}, name="explicit.yaml")
    from_env = yaml_file(tmp_path, {"metrics.port": 2}, name="env.yaml")
    system = yaml_file(tmp_path, {"metrics.port": 3}, name="system.yaml")
    monkeypatch.setattr(config_mod, "SYSTEM_CONFIG_PATH", str(system))
    env = {"DWCP_CONFIG": str(from_env)}
    assert load_config(explicit, env=env).metrics.port == 1
    assert load_config(env=env).metrics.port == 2
    assert load_config(env={}).metrics.port == 3
    assert load_config(env={}).file_path == str(system)
    assert load_config(env={}, use_system_file=False).metrics.port == 0
    monkeypatch.setattr(config_mod, "SYSTEM_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    assert load_config(env={}).file_path is None  # an absent system file is fine


def test_missing_named_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(env={"DWCP_CONFIG": str(missing)})


def test_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWCP_METRICS_PORT", "9464")
    monkeypatch.setenv("DWCP_CONFIG", str(yaml_file(tmp_path, {"enabled": True})))
    cfg = load_config()
    assert cfg.metrics.port == 9464 and cfg.enabled
    assert cfg.source("enabled") == f"file {tmp_path / 'dwcp.yaml'}:3"


# ---------------------------------------------------------------------------------------------------
# Listeners


class Recorder:
    def __init__(self, cfg: Config | None = None) -> None:
        self.changes: list[ConfigChange] = []
        self.seen_effective: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.cfg = cfg

    def __call__(self, change: ConfigChange) -> None:
        self.changes.append(change)
        self.threads.append(threading.current_thread())
        if self.cfg is not None:
            self.seen_effective.append(self.cfg.get(change.key))


def test_listener_gets_set_and_update_changes() -> None:
    cfg = Config()
    rec = Recorder(cfg)
    cfg.subscribe(rec)
    assert cfg.set("metrics.port", 9464) == 9464
    assert rec.changes == [ConfigChange("metrics.port", 0, 9464, "runtime API")]
    assert rec.seen_effective == [9464]  # called after the change was applied
    assert rec.threads == [threading.current_thread()]
    cfg.set("metrics.port", 9464)  # no change, no call
    assert len(rec.changes) == 1
    cfg.update({"enabled": True, "compression.level": "auto", "metrics.port": 9464})
    assert rec.changes[1:] == [ConfigChange("compression.level", 3, "auto", "runtime API"),
                               ConfigChange("enabled", False, True, "runtime API")]


def test_no_notification_when_an_overridden_key_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = yaml_file(tmp_path, {"compression.level": 5})
    cfg = load_config(path, env={"DWCP_TRANSPORT_MAX_STREAMS": "64"}, use_system_file=False)
    rec = Recorder()
    cfg.subscribe(rec)
    with caplog.at_level(logging.INFO, logger="dwcp.control.config"):
        assert cfg.set("transport.max_streams", 100) == 64
        assert cfg.set("compression.level", 9) == 5
    assert rec.changes == []
    assert "environment DWCP_TRANSPORT_MAX_STREAMS keeps it at 64" in caplog.text
    assert f"file {path}:4 keeps it at 5" in caplog.text


def test_listener_gets_reload_changes(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, {"metrics.port": 1})
    env: dict[str, str] = {}
    cfg = load_config(path, env=env, runtime={"compression.level": 7}, use_system_file=False)
    rec = Recorder()
    cfg.subscribe(rec)
    assert cfg.reload() == [] and rec.changes == []
    yaml_file(tmp_path, {"metrics.port": 2, "enabled": True})
    env["DWCP_COMPRESSION_LEVEL"] = "auto"
    changes = cfg.reload()
    assert changes == rec.changes == [
        ConfigChange("compression.level", 7, "auto", "environment DWCP_COMPRESSION_LEVEL"),
        ConfigChange("enabled", False, True, f"file {path}:5"),
        ConfigChange("metrics.port", 1, 2, f"file {path}:4"),
    ]
    del env["DWCP_COMPRESSION_LEVEL"]  # the runtime value shows again
    assert cfg.reload() == [ConfigChange("compression.level", "auto", 7, "runtime API")]


def test_unsubscribe_and_a_failing_listener(caplog: pytest.LogCaptureFixture) -> None:
    cfg = Config()
    first, last = Recorder(), Recorder()

    def broken(change: ConfigChange) -> None:
        raise RuntimeError("listener bug")

    cfg.subscribe(first)
    unsubscribe = cfg.subscribe(broken)
    cfg.subscribe(last)
    with caplog.at_level(logging.ERROR, logger="dwcp.control.config"):
        cfg.set("enabled", True)
    assert len(first.changes) == len(last.changes) == 1 and cfg.enabled
    assert "listener bug" in caplog.text
    unsubscribe()
    unsubscribe()  # twice is harmless
    caplog.clear()
    cfg.set("enabled", False)
    assert len(last.changes) == 2 and "listener bug" not in caplog.text


def test_listener_may_change_the_config() -> None:
    cfg = Config()

    def follow(change: ConfigChange) -> None:
        if change.key == "transport.max_streams":
            cfg.set("transport.initial_streams", min(change.new, 8))

    cfg.subscribe(follow)
    cfg.set("transport.max_streams", 4)
    assert cfg.transport.initial_streams == 4


# ---------------------------------------------------------------------------------------------------
# Validators


def test_validator_veto_on_set_update_reload(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, {"transport.min_streams": 2})
    cfg = load_config(path, env={}, use_system_file=False)
    rec = Recorder()
    cfg.subscribe(rec)
    seen: list[tuple[bool, bool]] = []

    def at_most_64_streams(candidate: Config) -> None:
        seen.append((candidate.enabled, cfg.enabled))  # the candidate, before it is applied
        if candidate.transport.max_streams > 64:
            raise ConfigError("this host allows at most 64 streams per session; lower transport.max_streams")

    cfg.set("transport.max_streams", 64)
    cfg.add_validator(at_most_64_streams)
    cfg.set("enabled", True)
    assert seen == [(True, False)] and cfg.enabled
    rec.changes.clear()

    before = snapshot(cfg)
    with pytest.raises(ConfigError, match="at most 64"):
        cfg.set("transport.max_streams", 128)
    with pytest.raises(ConfigError, match="at most 64"):
        cfg.update({"enabled": False, "transport.max_streams": 100})
    yaml_file(tmp_path, {"transport.min_streams": 2, "transport.max_streams": 200, "metrics.port": 9})
    with pytest.raises(ConfigError, match="at most 64"):
        cfg.reload()
    assert snapshot(cfg) == before and rec.changes == []

    yaml_file(tmp_path, {"transport.min_streams": 3})
    assert [c.key for c in cfg.reload()] == ["transport.min_streams"]


def test_validator_candidate_is_read_only() -> None:
    cfg = Config()
    errors: list[ConfigError] = []

    def meddler(candidate: Config) -> None:
        for change in (lambda: candidate.set("enabled", False), lambda: candidate.update({}),
                       lambda: candidate.reload()):
            try:
                change()
            except ConfigError as e:
                errors.append(e)

    cfg.add_validator(meddler)
    cfg.set("enabled", True)
    assert cfg.enabled and len(errors) == 3 and "cannot be changed" in str(errors[0])


def test_reload_with_a_bad_file_keeps_the_old_config(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, {"metrics.port": 9464})
    env: dict[str, str] = {}
    cfg = load_config(path, env=env, use_system_file=False)
    rec = Recorder()
    cfg.subscribe(rec)
    before = snapshot(cfg)
    for body in ("metrics:\n  port: 70000\n", "metrics: [\n", "metrics:\n  prot: 1\n"):
        path.write_text(body)
        with pytest.raises(ConfigError):
            cfg.reload()
        assert snapshot(cfg) == before
    path.unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.reload()
    yaml_file(tmp_path, {"metrics.port": 9464})
    env["DWCP_TRANSPORT_MAX_STREAM"] = "1"
    with pytest.raises(ConfigValueError):
        cfg.reload()
    assert snapshot(cfg) == before and rec.changes == []


def test_config_without_sources_reloads_to_itself() -> None:
    cfg = Config({"enabled": True})
    assert cfg.reload() == [] and cfg.enabled and cfg.file_path is None


# ---------------------------------------------------------------------------------------------------
# Threads


def test_concurrent_changes_and_reads() -> None:
    cfg = Config()
    changes: list[ConfigChange] = []
    lock = threading.Lock()

    def record(change: ConfigChange) -> None:
        with lock:
            changes.append(change)

    cfg.subscribe(record)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(base: int) -> None:
        try:
            for i in range(200):
                cfg.update({"transport.max_streams": 100 + base, "transport.initial_streams": 1 + (i + base) % 100})
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                t = cfg.transport  # one consistent snapshot: initial within min..max
                assert t.initial_streams == "auto" or t.min_streams <= t.initial_streams <= t.max_streams
                assert cfg.get("transport.max_streams") in (256, 100, 101, 102, 103)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(b,)) for b in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in (*threads, *readers):
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    for t in readers:
        t.join(60)
    assert errors == []
    # every notification matches a change that happened, in order: each old is the previous new per key
    last: dict[str, Any] = {}
    for change in changes:
        if change.key in last:
            assert change.old == last[change.key]
        last[change.key] = change.new
    assert last["transport.max_streams"] == cfg.transport.max_streams
    assert last["transport.initial_streams"] == cfg.transport.initial_streams


# ---------------------------------------------------------------------------------------------------
# The documentation follows the schema


def test_docs_table_lists_every_key() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`") and cells[0].strip("`") in KEYS:
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(KEYS)
    for key, (_, type_name, default, _allowed, env, what) in rows.items():
        spec = KEYS[key]
        assert default == f"`{json.dumps(spec.default)}`", key
        assert env == f"`{spec.env}`", key
        assert type_name.replace("`", "") == spec.type_name, key
        assert what, key
