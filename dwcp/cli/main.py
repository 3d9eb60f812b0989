"""`dwcp`: the umbrella command (diagnostics and lab tools join it as they land)."""

from __future__ import annotations

import json

import click

import dwcp
from dwcp.cli.hde import hde
from dwcp.cli.netlab import netlab


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


main.add_command(hde)  # `dwcp hde encode|decode`
main.add_command(netlab)  # `dwcp netlab ...` (pyroute2 is imported only when a netlab command runs)

if __name__ == "__main__":
    main()
