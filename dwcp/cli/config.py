"""`dwcp config show|validate`: the effective configuration and where each value comes from, and a
check of a config file before it is deployed. Everything comes from :mod:`dwcp.control.config`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dwcp.control.config import CONFIG_PATH_ENV, SYSTEM_CONFIG_PATH, load_config
from dwcp.errors import ConfigError

config = click.Group(
    "config", context_settings={"help_option_names": ["-h", "--help"]},
    help="DWCP's configuration: environment > config file > runtime API > defaults (docs/configuration.md).")


@config.command()
@click.option("--config", "path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Config file (YAML or JSON). Default: ${CONFIG_PATH_ENV}, else {SYSTEM_CONFIG_PATH} "
                   "when it exists.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of {key, value, source, default, allowed, env}.")
def show(path: Path | None, as_json: bool) -> None:
    """Every key, its effective value and the source it came from (this process's environment
    included)."""
    try:
        cfg = load_config(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    entries = cfg.explain()
    if as_json:
        click.echo(json.dumps([{"key": e.key, "value": e.value, "source": e.source, "default": e.default,
                                "allowed": e.allowed, "env": e.env} for e in entries], indent=2))
        return
    none = f"none (no --config, ${CONFIG_PATH_ENV} unset, {SYSTEM_CONFIG_PATH} absent)"
    click.echo(f"config file: {cfg.file_path or none}")
    rows = [(e.key, json.dumps(e.value), e.source) for e in entries]
    key_w = max(len("KEY"), *(len(r[0]) for r in rows))
    value_w = max(len("VALUE"), *(len(r[1]) for r in rows))
    click.echo(f"{'KEY':{key_w}}  {'VALUE':{value_w}}  SOURCE")
    for key, value, source in rows:
        click.echo(f"{key:{key_w}}  {value:{value_w}}  {source}")


@config.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def validate(file: Path) -> None:
    """Check FILE on its own (against the defaults, ignoring the environment): every key known, every
    value in range, the keys consistent with each other."""
    try:
        cfg = load_config(file, env={}, use_system_file=False)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    n_set = sum(1 for e in cfg.explain() if e.source.startswith("file "))
    click.echo(f"{file}: valid ({n_set} {'key' if n_set == 1 else 'keys'} set)")
