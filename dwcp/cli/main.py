"""`dwcp`: the umbrella command (diagnostics and lab tools join it as they land)."""

from __future__ import annotations

import importlib
import json
from typing import Any

import click

import dwcp


class LazyGroup(click.Group):
    """Subcommands imported only when they run (or when help lists them), so `dwcp hde` does not pay
    for the transport, telemetry or netlab imports: start-up time is part of every delta's wall time."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name].split(":")
            cmd = getattr(importlib.import_module(module), attr)
            assert isinstance(cmd, click.Command)
            return cmd
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             lazy={"config": "dwcp.cli.config:config",  # dwcp config show|validate
                   "diag": "dwcp.cli.diag:diag",       # dwcp diag: live link telemetry
                   "hde": "dwcp.cli.hde:hde",          # dwcp hde encode|decode
                   "netlab": "dwcp.cli.netlab:netlab"})  # dwcp netlab up|exec|status|down
@click.version_option(dwcp.__version__, prog_name="dwcp")
def main() -> None:
    """DWCP: bulk data over wide-area links."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def features(as_json: bool) -> None:
    """What this build and host can do, and why not where it can't."""
    report = dwcp.feature_report()
    if as_json:
        click.echo(json.dumps({"backend": dwcp.backend, "features": report}, indent=2))
        return
    click.echo(f"backend: {dwcp.backend}")
    for name, f in sorted(report.items()):
        click.echo(f"  {'yes' if f['available'] else 'no ':3}  {name:10} {f['reason']}")



if __name__ == "__main__":
    main()
