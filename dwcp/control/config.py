"""Typed, validated, layered configuration of the control plane.

    cfg = load_config()                          # /etc/dwcp/dwcp.yaml or $DWCP_CONFIG, and DWCP_* variables
    cfg.transport.max_streams                    # typed, read-only views of the effective values
    cfg.source("transport.max_streams")          # "environment DWCP_TRANSPORT_MAX_STREAMS"
    cfg.set("compression.level", 9)              # runtime API: validated, listeners told of the change
    unsubscribe = cfg.subscribe(print)

Four layers, highest first: the environment (``DWCP_<SECTION>_<KEY>``) > the config file (YAML or
JSON) > the runtime API (:meth:`Config.set`, :meth:`Config.update`, ``load_config(runtime=...)``) >
the built-in defaults. An operator's environment and file win over what code sets, so a deployment can
always override an application. :data:`KEYS` is the schema: every key with its type, default, allowed
values, environment variable and help text; ``docs/configuration.md`` documents the same table.

Every value is checked where it comes from, and a bad one is a :class:`ConfigValueError` that names
the key, the source (``file PATH:LINE``, ``environment NAME``, ``runtime API``), the value and what
is allowed. Unknown keys are errors, in files and in variables whose prefix names a section, so a typo
cannot pass silently.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import ipaddress
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from dwcp._listeners import Listeners
from dwcp.errors import ConfigError

log = logging.getLogger(__name__)

#: Read when no path is given and $DWCP_CONFIG is unset; absent is fine.
SYSTEM_CONFIG_PATH = "/etc/dwcp/dwcp.yaml"
#: Names the config file (an explicit choice: a missing file is an error).
CONFIG_PATH_ENV = "DWCP_CONFIG"
ENV_PREFIX = "DWCP_"
DEFAULT_SOURCE = "default"
RUNTIME_SOURCE = "runtime API"

Auto = Literal["auto"]
AUTO: Auto = "auto"


class ConfigValueError(ConfigError):
    """A configuration key or value is wrong (your fault: fix the setting the message names).

    ``key`` is the dotted key (``transport.max_streams``), ``source`` where the setting came from
    (``file /etc/dwcp/dwcp.yaml:5``, ``environment DWCP_TRANSPORT_MAX_STREAMS``, ``runtime API``),
    ``value`` what was given and ``allowed`` what would have been accepted."""

    def __init__(self, message: str, *, key: str, source: str, value: Any = None, allowed: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.source = source
        self.value = value
        self.allowed = allowed


# --------------------------------------------------------------------------------------------------
# Value kinds: what a key accepts, from a file or the API (typed values) and from the environment (text)


class _Rejected(Exception):
    """A value a kind does not accept; the argument says what is wrong with it."""


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NULL = frozenset({"", "null", "none"})


class _Kind(abc.ABC):
    #: The type's name in docs and `dwcp config show --json` ("bool", "int", ...).
    type_name: str
    #: What the kind accepts, in words ("an integer 1..256").
    allowed: str

    @abc.abstractmethod
    def check(self, value: Any) -> Any:
        """The value as stored (normalized), or _Rejected saying why not."""

    @abc.abstractmethod
    def parse_text(self, text: str) -> Any:
        """An environment variable's text as a typed value (then given to check)."""


class _Bool(_Kind):
    type_name = "bool"
    allowed = "true or false (environment: 1/0, true/false, yes/no, on/off)"

    def check(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise _Rejected("not a boolean")
        return value

    def parse_text(self, text: str) -> Any:
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise _Rejected("not a boolean")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise _Rejected("not an integer") from None


class _Int(_Kind):
    type_name = "int"

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.allowed = f"an integer {lo}..{hi}"

    def check(self, value: Any) -> Any:
        if not _is_int(value):
            raise _Rejected("not an integer")
        if not self.lo <= value <= self.hi:
            raise _Rejected("out of range")
        return value

    def parse_text(self, text: str) -> Any:
        return _parse_int(text)


class _IntOrAuto(_Int):
    type_name = "int or \"auto\""

    def __init__(self, lo: int, hi: int, auto_means: str) -> None:
        super().__init__(lo, hi)
        self.allowed = f"\"auto\" ({auto_means}) or an integer {lo}..{hi}"

    def check(self, value: Any) -> Any:
        if value == AUTO:
            return AUTO
        if not _is_int(value):
            raise _Rejected("neither \"auto\" nor an integer")
        return super().check(value)

    def parse_text(self, text: str) -> Any:
        if text.strip().lower() == AUTO:
            return AUTO
        return _parse_int(text)


class _Float(_Kind):
    type_name = "float"

    def __init__(self, lo: float) -> None:
        self.lo = lo
        self.allowed = f"a finite number >= {lo:g}"

    def check(self, value: Any) -> Any:
        if not (_is_int(value) or isinstance(value, float)):
            raise _Rejected("not a number")
        if not math.isfinite(value) or value < self.lo:
            raise _Rejected("out of range")
        return float(value)

    def parse_text(self, text: str) -> Any:
        try:
            return float(text.strip())
        except ValueError:
            raise _Rejected("not a number") from None


class _Choice(_Kind):
    type_name = "str"

    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.allowed = "one of " + ", ".join(f"\"{c}\"" for c in choices)

    def check(self, value: Any) -> Any:
        if value not in self.choices or not isinstance(value, str):
            raise _Rejected("not one of the choices")
        return value

    def parse_text(self, text: str) -> Any:
        return text.strip()


_DEVICE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class _OptionalDevice(_Kind):
    type_name = "str or null"
    allowed = "a device name such as mlx5_0 (letters, digits, _ . : -), or null (\"\" is null too)"

    def check(self, value: Any) -> Any:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise _Rejected("not a string")
        if not _DEVICE_NAME.fullmatch(value):
            raise _Rejected("not a device name")
        return value

    def parse_text(self, text: str) -> Any:
        return None if text.strip().lower() in _NULL else text.strip()


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


class _Address(_Kind):
    type_name = "str"
    allowed = "an IPv4 or IPv6 address, or a host name"

    def check(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise _Rejected("not a string")
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not _HOST_NAME.fullmatch(value):
                raise _Rejected("neither an IP address nor a host name") from None
        return value

    def parse_text(self, text: str) -> Any:
        return text.strip()


#: The schema major version this code reads; minor and patch versions only add keys within it.
SCHEMA_MAJOR = 1


class _SchemaVersion(_Kind):
    type_name = "str"
    allowed = f"a quoted schema version \"{SCHEMA_MAJOR}.MINOR.PATCH\" (this DWCP reads schema {SCHEMA_MAJOR})"

    def check(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise _Rejected("not a string (quote it in YAML: version: \"1.0.0\")")
        match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", value)
        if match is None:
            raise _Rejected("not a MAJOR.MINOR.PATCH version")
        if int(match.group(1)) != SCHEMA_MAJOR:
            raise _Rejected(f"schema {match.group(1)} is not the schema this DWCP reads")
        return value

    def parse_text(self, text: str) -> Any:
        return text.strip()


# --------------------------------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class KeySpec:
    """One configuration key: its type, default, what it accepts and what it does."""

    key: str
    kind: _Kind
    default: Any
    help: str

    @property
    def env(self) -> str:
        """The environment variable that sets it (``DWCP_TRANSPORT_MAX_STREAMS``)."""
        return ENV_PREFIX + self.key.replace(".", "_").upper()

    @property
    def allowed(self) -> str:
        return self.kind.allowed

    @property
    def type_name(self) -> str:
        return self.kind.type_name

    @property
    def section(self) -> str | None:
        return self.key.split(".", 1)[0] if "." in self.key else None


_STREAMS = 256  # transport.options: a session's ceiling

_SPECS = (
    KeySpec("enabled", _Bool(), False,
            "Use DWCP for the channels the Manager opens; false: plain TCP everywhere."),
    KeySpec("version", _SchemaVersion(), "1.0.0",
            "Schema version of this configuration; a file for another major version is refused."),
    KeySpec("transport.min_streams", _Int(1, _STREAMS), 1,
            "Fewest data streams per session; the stream tuner never goes below it."),
    KeySpec("transport.max_streams", _Int(1, _STREAMS), _STREAMS,
            "Most data streams per session the stream tuner may open (a server still caps at its own "
            "max_streams)."),
    KeySpec("transport.initial_streams", _IntOrAuto(1, _STREAMS, "from the detected tier"), AUTO,
            "Streams a new session starts with: auto = the Manager picks from the link's tier "
            "(docs/adr/0011); an integer = exactly that many (within min_streams..max_streams)."),
    KeySpec("transport.rdma_device", _OptionalDevice(), None,
            "RDMA (ibverbs) device for Tier 1 peers, e.g. mlx5_0: RDMA mode with that device; null: "
            "none named (Hybrid where the host has RDMA)."),
    KeySpec("compression.enabled", _Bool(), True,
            "Compress transfers with HDE where the Manager finds it pays."),
    KeySpec("compression.algorithm", _Choice("zstd"), "zstd",
            "The codec under HDE; zstd is the only one."),
    KeySpec("compression.level", _IntOrAuto(1, 19, "adaptive: chosen from the link rate"), 3,
            "zstd level, or auto: adapt the level to the link (docs/hde.md)."),
    KeySpec("compression.enable_delta_encoding", _Bool(), True,
            "Send deltas against a baseline (HDE) where one exists; false: compress the whole data."),
    KeySpec("prediction.enabled", _Bool(), False,
            "Run the bandwidth predictor and let its forecasts inform the Manager's decisions."),
    KeySpec("federation.auto_optimize", _Bool(), True,
            "Let the Manager tune federation traffic from the link's state."),
    KeySpec("federation.bandwidth_reservation", _Bool(), False,
            "Reserve bandwidth for federation traffic through the reservation ledger (admission control)."),
    KeySpec("metrics.enabled", _Bool(), True,
            "Keep DWCP's metrics in the registry."),
    KeySpec("metrics.port", _Int(0, 65535), 0,
            "Port of the /metrics HTTP server; 0: no server (the registry is still there to scrape "
            "in-process)."),
    KeySpec("metrics.address", _Address(), "127.0.0.1",
            "Address the /metrics HTTP server binds."),
    KeySpec("metrics.cache_ttl_s", _Float(0.0), 1.0,
            "Seconds a computed scrape is reused; 0: compute on every scrape."),
    KeySpec("features.adaptive_streams", _Bool(), True,
            "The Manager adds and retires streams from telemetry; false: sessions keep their initial "
            "stream count."),
    KeySpec("features.adaptive_compression", _Bool(), True,
            "The Manager adapts the compression level to the link; false: the level stays as configured."),
    KeySpec("features.telemetry", _Bool(), True,
            "Collect link telemetry (tier detection, the tuners' inputs); false: no samples, the tier "
            "stays unknown."),
)

#: Every configuration key, by dotted name, in documentation order.
KEYS: Mapping[str, KeySpec] = {spec.key: spec for spec in _SPECS}
#: Section names, in documentation order.
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in _SPECS if s.section is not None))
_TOP_LEVEL = tuple(s.key for s in _SPECS if s.section is None)
_BY_ENV = {spec.env: spec for spec in _SPECS}


# --------------------------------------------------------------------------------------------------
# Typed views and the objects the API hands out


@dataclass(frozen=True)
class TransportConfig:
    min_streams: int
    max_streams: int
    initial_streams: int | Auto
    rdma_device: str | None


@dataclass(frozen=True)
class CompressionConfig:
    enabled: bool
    algorithm: str
    level: int | Auto
    enable_delta_encoding: bool


@dataclass(frozen=True)
class PredictionConfig:
    enabled: bool


@dataclass(frozen=True)
class FederationConfig:
    auto_optimize: bool
    bandwidth_reservation: bool


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool
    port: int
    address: str
    cache_ttl_s: float


@dataclass(frozen=True)
class FeaturesConfig:
    adaptive_streams: bool
    adaptive_compression: bool
    telemetry: bool


_VIEWS: Mapping[str, type[Any]] = {
    "transport": TransportConfig, "compression": CompressionConfig, "prediction": PredictionConfig,
    "federation": FederationConfig, "metrics": MetricsConfig, "features": FeaturesConfig,
}


@dataclass(frozen=True)
class ConfigChange:
    """An effective value changed: ``source`` is where the new value comes from."""

    key: str
    old: Any
    new: Any
    source: str


@dataclass(frozen=True)
class ConfigEntry:
    """One key as `explain()` and `dwcp config show` report it."""

    key: str
    value: Any
    source: str
    default: Any
    allowed: str
    env: str


@dataclass(frozen=True)
class _Setting:
    """One key set by one source."""

    key: str
    value: Any
    source: str


# --------------------------------------------------------------------------------------------------
# Checking single settings


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown_key(key: str, source: str, value: Any) -> ConfigValueError:
    section = key.split(".", 1)[0] if "." in key else None
    if section in SECTIONS:
        names = [s.key.split(".", 1)[1] for s in _SPECS if s.section == section]
        valid = f"the keys of {section} are: " + ", ".join(names)
    else:
        valid = "top-level keys are: " + ", ".join((*_TOP_LEVEL, *SECTIONS))
    return ConfigValueError(
        f"unknown config key {key!r} in {source}{_suggest(key, KEYS)}; {valid}. Fix the name: unknown "
        "keys are errors so that a typo cannot pass silently",
        key=key, source=source, value=value, allowed=valid)


def _bad_value(spec: KeySpec, value: Any, source: str, reason: str) -> ConfigValueError:
    return ConfigValueError(
        f"invalid value for {spec.key} in {source}: {value!r} is {reason}; allowed: {spec.allowed} "
        f"(default {_show(spec.default)}). Fix the value, or remove it to fall back to the next source",
        key=spec.key, source=source, value=value, allowed=spec.allowed)


def _checked(key: str, value: Any, source: str) -> _Setting:
    spec = KEYS.get(key)
    if spec is None:
        raise _unknown_key(key, source, value)
    try:
        return _Setting(key, spec.kind.check(value), source)
    except _Rejected as e:
        raise _bad_value(spec, value, source, str(e)) from None


def _show(value: Any) -> str:
    """A value as the user writes it in YAML or JSON (null, true, "auto")."""
    return json.dumps(value)


# --------------------------------------------------------------------------------------------------
# Reading a file or a mapping into settings, with the line of every key


@dataclass(frozen=True)
class _Node:
    """A parsed value and the line it starts on; a mapping's value is a tuple of _Entry."""

    value: Any
    line: int | None
    is_mapping: bool = False

    def plain(self) -> Any:
        if self.is_mapping:
            return {e.key: e.node.plain() for e in self.value}
        return self.value


@dataclass(frozen=True)
class _Entry:
    key: Any
    line: int | None
    node: _Node


def _yaml_tree(text: str, path: str) -> _Node | None:
    """Composed with SafeLoader nodes (what yaml.safe_load builds on), so every value keeps its line."""
    loader = yaml.SafeLoader(text)
    loader.name = path  # marks in error messages name the file
    try:
        root = loader.get_single_node()
        return None if root is None else _from_yaml_node(loader, root)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}\nFix the syntax at that line.") from None
    finally:
        loader.dispose()


def _from_yaml_node(loader: yaml.SafeLoader, node: yaml.Node) -> _Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (<<:)
        entries = tuple(_Entry(loader.construct_object(k, deep=True), k.start_mark.line + 1,
                               _from_yaml_node(loader, v)) for k, v in node.value)
        return _Node(entries, line, is_mapping=True)
    return _Node(loader.construct_object(node, deep=True), line)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_tree(text: str, path: str) -> _Node:
    """JSON with the line of every object key: objects are walked here, everything else decoded by
    json's own raw_decode at its position."""
    decoder = json.JSONDecoder()

    def line_at(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def fail(pos: int, what: str) -> ConfigError:
        return ConfigError(f"config file {path} is not valid JSON: {what} at line {line_at(pos)}. "
                           "Fix the syntax there.")

    def skip(pos: int) -> int:
        match = _JSON_SPACE.match(text, pos)
        assert match is not None  # the pattern matches the empty string
        return match.end()

    def value_at(pos: int) -> tuple[_Node, int]:
        pos = skip(pos)
        if text.startswith("{", pos):
            return object_at(pos)
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        return _Node(value, line_at(pos)), end

    def object_at(start: int) -> tuple[_Node, int]:
        entries: list[_Entry] = []
        pos = skip(start + 1)
        if text.startswith("}", pos):
            return _Node((), line_at(start), is_mapping=True), pos + 1
        while True:
            if not text.startswith('"', pos):
                raise fail(pos, "expected a quoted key")
            key_pos = pos
            key, pos = value_at(pos)
            pos = skip(pos)
            if not text.startswith(":", pos):
                raise fail(pos, "expected ':' after the key")
            node, pos = value_at(pos + 1)
            entries.append(_Entry(key.value, line_at(key_pos), node))
            pos = skip(pos)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif text.startswith("}", pos):
                return _Node(tuple(entries), line_at(start), is_mapping=True), pos + 1
            else:
                raise fail(pos, "expected ',' or '}'")

    root, end = value_at(0)
    if skip(end) != len(text):
        raise fail(skip(end), "extra data after the document")
    return root


def _tree_from_mapping(values: Mapping[str, Any]) -> _Node:
    def node(value: Any) -> _Node:
        if isinstance(value, Mapping):
            return _Node(tuple(_Entry(k, None, node(v)) for k, v in value.items()), None, is_mapping=True)
        return _Node(value, None)
    return node(values)


def _settings_from_tree(root: _Node | None, where: Callable[[int | None], str], what: str) -> list[_Setting]:
    """Leaf settings of a file's or a mapping's tree: nested sections or dotted keys, optionally under a
    top-level ``dwcp:``. ``where(line)`` is the source of a value at that line; ``what`` names the whole
    input in errors ("config file X")."""
    if root is None or (not root.is_mapping and root.value is None):
        return []
    if not root.is_mapping:
        raise ConfigError(f"{what}: the top level must be a mapping of keys and sections (enabled:, "
                          f"transport:, ...; optionally under dwcp:), not {type(root.value).__name__}")
    if any(e.key == "dwcp" for e in root.value):
        if len(root.value) != 1:
            others = ", ".join(str(e.key) for e in root.value if e.key != "dwcp")
            raise ConfigError(f"{what}: has a top-level dwcp: and other top-level keys ({others}); put "
                              "everything under dwcp:, or drop the dwcp: wrapper")
        return _settings_from_tree(root.value[0].node, where, what)

    settings: list[_Setting] = []
    seen: dict[str, str] = {}

    def add(key: str, node: _Node) -> None:
        source = where(node.line)
        if key in seen:
            raise ConfigValueError(f"{key} is set twice in {what} ({seen[key]} and {source}); keep one",
                                   key=key, source=source, value=node.plain(), allowed=KEYS[key].allowed)
        seen[key] = source
        settings.append(_checked(key, node.plain(), source))

    for entry in root.value:
        key = entry.key
        if not isinstance(key, str):
            raise _unknown_key(str(key), where(entry.line), entry.node.plain())
        if key in SECTIONS:
            section = entry.node
            if not section.is_mapping:
                if section.value is None:  # "transport:" with nothing under it
                    continue
                raise ConfigValueError(
                    f"{key} in {where(section.line)} is a section: it takes a mapping of its keys "
                    f"({', '.join(s.key for s in _SPECS if s.section == key)}), not {section.value!r}",
                    key=key, source=where(section.line), value=section.value, allowed="a mapping")
            for child in section.value:
                dotted = f"{key}.{child.key}"
                if dotted not in KEYS:
                    raise _unknown_key(dotted, where(child.line), child.node.plain())
                add(dotted, child.node)
        elif key in KEYS:  # a top-level key, or a dotted one ("transport.max_streams: 64")
            add(key, entry.node)
        else:
            raise _unknown_key(key, where(entry.line), entry.node.plain())
    return settings


def _file_settings(path: Path) -> list[_Setting]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {name} does not exist; fix the path (--config or ${CONFIG_PATH_ENV}) "
                          f"or unset it to use {SYSTEM_CONFIG_PATH} when present") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {name}: {e}") from None
    if not text.strip():
        return []
    suffix = path.suffix.lower()
    if suffix == ".json" or (suffix not in (".yaml", ".yml") and text.lstrip().startswith("{")):
        try:
            root: _Node | None = _json_tree(text, name)
        except ConfigError:
            if suffix == ".json":
                raise
            root = _yaml_tree(text, name)  # a YAML flow mapping starts with "{" too
    else:
        root = _yaml_tree(text, name)

    def where(line: int | None) -> str:
        return f"file {name}:{line}" if line is not None else f"file {name}"
    return _settings_from_tree(root, where, f"config file {name}")


def _mapping_settings(values: Mapping[str, Any]) -> list[_Setting]:
    return _settings_from_tree(_tree_from_mapping(values), lambda _line: RUNTIME_SOURCE, "runtime values")


def _env_settings(env: Mapping[str, str]) -> list[_Setting]:
    """``DWCP_<SECTION>_<KEY>`` and the top-level DWCP_ENABLED / DWCP_VERSION. Other DWCP_ variables
    (DWCP_KEY, DWCP_BACKEND, DWCP_CONFIG, ...) belong to other parts and are skipped, but a name under a
    section's prefix that names no key is a typo, and an error."""
    settings = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        text = env[name]
        source = f"environment {name}"
        spec = _BY_ENV.get(name)
        if spec is None:
            rest = name[len(ENV_PREFIX):].lower()
            section = next((s for s in SECTIONS if rest == s or rest.startswith(s + "_")), None)
            if section is None:
                continue
            valid = [s.env for s in _SPECS if s.section == section]
            raise ConfigValueError(
                f"environment variable {name} names no config key{_suggest(name.upper(), valid)}; the "
                f"variables of section {section} are: {', '.join(valid)}. Fix the name or unset it",
                key=rest.replace(f"{section}_", f"{section}.", 1), source=source, value=text,
                allowed=", ".join(valid))
        try:
            settings.append(_Setting(spec.key, spec.kind.check(spec.kind.parse_text(text)), source))
        except _Rejected as e:
            raise _bad_value(spec, text, source, str(e)) from None
    return settings


# --------------------------------------------------------------------------------------------------
# Layers and the effective configuration


def _rank(source: str) -> int:
    """How strong a source is: environment > file > runtime API > default."""
    if source.startswith("environment "):
        return 3
    if source.startswith("file "):
        return 2
    return 1 if source == RUNTIME_SOURCE else 0


@dataclass(frozen=True)
class _Origin:
    """Where the file and environment layers are read from (again at reload())."""

    path: str | None                 # an explicit path: must exist
    env: Mapping[str, str] | None    # None: os.environ, as it is at each read
    use_system_file: bool
    reads_outside: bool = True       # False: a Config built in code has only defaults and runtime values

    def read(self) -> tuple[list[_Setting], list[_Setting], str | None]:
        """(file settings, environment settings, the file read or None)."""
        if not self.reads_outside:
            return [], [], None
        env = os.environ if self.env is None else self.env
        env_settings = _env_settings(env)
        path: Path | None = None
        if self.path is not None:
            path = Path(self.path)
        elif env.get(CONFIG_PATH_ENV):
            path = Path(env[CONFIG_PATH_ENV])
        elif self.use_system_file and Path(SYSTEM_CONFIG_PATH).exists():
            path = Path(SYSTEM_CONFIG_PATH)
        if path is None:
            return [], env_settings, None
        return _file_settings(path), env_settings, str(path)


def _by_key(settings: Iterable[_Setting]) -> dict[str, _Setting]:
    return {s.key: s for s in settings}


_T = TypeVar("_T")


def _view(cls: type[_T], section: str, values: Mapping[str, Any]) -> _T:
    return cls(**{f.name: values[f"{section}.{f.name}"] for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Snapshot:
    """One consistent state: the layers and what they resolve to. Replaced whole, never changed, so a
    reader needs no lock."""

    runtime: Mapping[str, _Setting]
    file: Mapping[str, _Setting]
    env: Mapping[str, _Setting]
    file_path: str | None
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    views: Mapping[str, Any]

    @classmethod
    def read(cls, origin: _Origin, runtime: Mapping[str, Any]) -> _Snapshot:
        """The first state: ``runtime`` values and what ``origin`` reads."""
        file, env, path = origin.read()
        return cls.build(_by_key(_mapping_settings(runtime)), _by_key(file), _by_key(env), path, changed=())

    @classmethod
    def build(cls, runtime: Mapping[str, _Setting], file: Mapping[str, _Setting], env: Mapping[str, _Setting],
              file_path: str | None, changed: Iterable[str]) -> _Snapshot:
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key, spec in KEYS.items():
            setting = env.get(key) or file.get(key) or runtime.get(key)
            values[key] = spec.default if setting is None else setting.value
            sources[key] = DEFAULT_SOURCE if setting is None else setting.source
        _check_combination(values, sources, frozenset(changed))
        views = {section: _view(cls_, section, values) for section, cls_ in _VIEWS.items()}
        return cls(dict(runtime), dict(file), dict(env), file_path, values, sources, views)


def _check_combination(values: Mapping[str, Any], sources: Mapping[str, str], changed: frozenset[str]) -> None:
    """Checks across keys, on the effective values. The error blames a key the runtime API change
    touched (``changed``) when one is involved, else the one from the strongest source."""

    def blame(*keys: str) -> str:
        touched = [k for k in keys if k in changed]
        return touched[0] if touched else max(keys, key=lambda k: _rank(sources[k]))

    def at(key: str) -> str:
        return f"{key} = {_show(values[key])} ({sources[key]})"

    lo, hi = values["transport.min_streams"], values["transport.max_streams"]
    if lo > hi:
        key = blame("transport.min_streams", "transport.max_streams")
        raise ConfigValueError(
            f"{at('transport.min_streams')} is above {at('transport.max_streams')}: min_streams must be <= "
            "max_streams; lower the one or raise the other",
            key=key, source=sources[key], value=values[key], allowed="transport.min_streams <= transport.max_streams")
    initial = values["transport.initial_streams"]
    if initial != AUTO and not lo <= initial <= hi:
        key = blame("transport.initial_streams", "transport.min_streams", "transport.max_streams")
        raise ConfigValueError(
            f"{at('transport.initial_streams')} is outside {at('transport.min_streams')} .. "
            f"{at('transport.max_streams')}; set initial_streams within that range or to \"auto\"",
            key=key, source=sources[key], value=values[key],
            allowed=f"\"auto\" or an integer {lo}..{hi} (transport.min_streams..transport.max_streams)")


# --------------------------------------------------------------------------------------------------
# The public API


Listener = Callable[[ConfigChange], None]
Validator = Callable[["Config"], None]


class Config:
    """The effective configuration, its sources, and the runtime API that changes it.

    ``Config(runtime)`` holds the defaults plus ``runtime`` (dotted keys or nested sections) and reads no
    file or environment; :func:`load_config` builds one that does. Reads take no lock (every change swaps
    in a new immutable state); changes are serialized by a lock, and listeners run in the changing
    thread after the change is applied, still holding it -- a listener may read or change the config,
    but must not wait for another thread that changes it."""

    def __init__(self, runtime: Mapping[str, Any] | None = None) -> None:
        origin = _Origin(None, None, use_system_file=False, reads_outside=False)
        self._setup(origin, _Snapshot.read(origin, runtime or {}), read_only=False)

    def _setup(self, origin: _Origin, snap: _Snapshot, *, read_only: bool) -> None:
        self._origin = origin
        self._snap = snap
        self._lock = threading.RLock()
        self._listeners: Listeners[ConfigChange] = Listeners("config", log)
        self._validators: list[Validator] = []
        self._read_only = read_only

    @classmethod
    def _load(cls, origin: _Origin, runtime: Mapping[str, Any]) -> Config:
        cfg = cls.__new__(cls)
        cfg._setup(origin, _Snapshot.read(origin, runtime), read_only=False)
        return cfg

    @classmethod
    def _candidate(cls, snap: _Snapshot, origin: _Origin) -> Config:
        """A read-only Config over a state not yet applied: what validators see."""
        cfg = cls.__new__(cls)
        cfg._setup(origin, snap, read_only=True)
        return cfg

    # reading

    def get(self, key: str) -> Any:
        """The effective value of a dotted key."""
        return self._snap.values[self._spec(key).key]

    def source(self, key: str) -> str:
        """Where the effective value comes from: "default", "runtime API", "file PATH:LINE" or
        "environment NAME"."""
        return self._snap.sources[self._spec(key).key]

    def explain(self) -> list[ConfigEntry]:
        """Every key with its value, source, default, what it accepts and its variable, by key."""
        snap = self._snap
        return [ConfigEntry(key, snap.values[key], snap.sources[key], spec.default, spec.allowed, spec.env)
                for key, spec in sorted(KEYS.items())]

    def to_dict(self) -> dict[str, Any]:
        """The effective values, nested by section."""
        out: dict[str, Any] = {}
        for key, value in self._snap.values.items():
            section, _, name = key.rpartition(".")
            (out.setdefault(section, {}) if section else out)[name] = value
        return out

    @property
    def file_path(self) -> str | None:
        """The config file the file layer came from, or None when none was read."""
        return self._snap.file_path

    @property
    def enabled(self) -> bool:
        return bool(self._snap.values["enabled"])

    @property
    def version(self) -> str:
        return str(self._snap.values["version"])

    @property
    def transport(self) -> TransportConfig:
        return self._snap.views["transport"]  # type: ignore[no-any-return]

    @property
    def compression(self) -> CompressionConfig:
        return self._snap.views["compression"]  # type: ignore[no-any-return]

    @property
    def prediction(self) -> PredictionConfig:
        return self._snap.views["prediction"]  # type: ignore[no-any-return]

    @property
    def federation(self) -> FederationConfig:
        return self._snap.views["federation"]  # type: ignore[no-any-return]

    @property
    def metrics(self) -> MetricsConfig:
        return self._snap.views["metrics"]  # type: ignore[no-any-return]

    @property
    def features(self) -> FeaturesConfig:
        return self._snap.views["features"]  # type: ignore[no-any-return]

    # changing

    def set(self, key: str, value: Any) -> Any:
        """Set a key in the runtime API layer and return its effective value, which is still the
        environment's or the file's when one of them sets the key (logged at INFO)."""
        spec = self._spec(key)
        self.update({spec.key: value})
        return self.get(spec.key)

    def update(self, values: Mapping[str, Any]) -> None:
        """Set several keys in the runtime API layer, checked together: all are applied or none."""
        self._writable()
        settings = _mapping_settings(values)
        with self._lock:
            snap = self._snap
            candidate = _Snapshot.build({**snap.runtime, **_by_key(settings)}, snap.file, snap.env,
                                        snap.file_path, changed=(s.key for s in settings))
            self._apply(candidate)
        for s in settings:
            if candidate.sources[s.key] != RUNTIME_SOURCE:
                log.info("%s set to %s by the runtime API, but %s keeps it at %s", s.key, _show(s.value),
                         candidate.sources[s.key], _show(candidate.values[s.key]))

    def reload(self) -> list[ConfigChange]:
        """Read the file and the environment again and apply them. A bad file or variable (or a veto)
        raises ConfigError and leaves the config as it was."""
        self._writable()
        with self._lock:
            file, env, path = self._origin.read()
            snap = self._snap
            candidate = _Snapshot.build(snap.runtime, _by_key(file), _by_key(env), path, changed=())
            return self._apply(candidate)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(change)`` for every change of an effective value; returns the unsubscribe
        function. A listener that raises is logged and the others still run."""
        return self._listeners.subscribe(listener)

    def add_validator(self, hook: Validator) -> None:
        """``hook(candidate)`` runs before every change (set, update, reload) on the config as it
        would be; raising ConfigError vetoes the change and leaves everything as it was."""
        with self._lock:
            self._validators.append(hook)

    # internals

    def _apply(self, candidate: _Snapshot) -> list[ConfigChange]:
        """Run the validators on the candidate, swap it in and tell the listeners. Holds the lock."""
        view = Config._candidate(candidate, self._origin)
        for hook in list(self._validators):
            hook(view)
        old = self._snap
        self._snap = candidate
        changes = [ConfigChange(key, old.values[key], candidate.values[key], candidate.sources[key])
                   for key in sorted(KEYS) if old.values[key] != candidate.values[key]]
        for change in changes:
            log.debug("config %s: %s -> %s (%s)", change.key, _show(change.old), _show(change.new), change.source)
            self._listeners.notify(change)
        return changes

    def _spec(self, key: str) -> KeySpec:
        spec = KEYS.get(key)
        if spec is None:
            raise _unknown_key(key, RUNTIME_SOURCE, None)
        return spec

    def _writable(self) -> None:
        if self._read_only:
            raise ConfigError("this is the candidate config a validator inspects; it cannot be changed "
                              "(raise ConfigError to veto the change instead)")

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._snap.values.items() if self._snap.sources[k] != DEFAULT_SOURCE}
        return f"<Config {changed!r}>"


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                runtime: Mapping[str, Any] | None = None, use_system_file: bool = True) -> Config:
    """The configuration from every layer: the environment (``env``, default os.environ) over the file
    (``path``, else $DWCP_CONFIG, else /etc/dwcp/dwcp.yaml when present and ``use_system_file``) over
    ``runtime`` values over the defaults. A named file that is missing, or any bad key or value, is a
    ConfigError saying which and where."""
    origin = _Origin(None if path is None else os.fspath(path), env, use_system_file)
    return Config._load(origin, runtime or {})


__all__ = [
    "AUTO", "KEYS", "SECTIONS", "CompressionConfig", "Config", "ConfigChange", "ConfigEntry", "ConfigValueError",
    "FeaturesConfig", "FederationConfig", "KeySpec", "MetricsConfig", "PredictionConfig", "TransportConfig",
    "load_config",
]
