"""`dwcp netlab`: reproducible WAN links on one machine (a thin shell over dwcp.netlab)."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from dwcp.errors import DWCPError


def _fail(e: DWCPError) -> click.ClickException:
    return click.ClickException(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def netlab() -> None:
    """Emulated WAN links between network namespaces (needs root).

    Host a is .1 and host b .2 of the link's subnet (198.18.0.0/24 by default)."""


@netlab.command()
@click.argument("name")
@click.option("--rtt-ms", type=float, required=True, help="Round-trip time (0.2-500 ms).")
@click.option("--rate-mbit", type=float, required=True, help="Bottleneck rate a->b (and b->a), Mbit/s.")
@click.option("--loss", type=float, default=0.0, show_default=True,
              help="Random loss per packet and direction, as a fraction (0.001 = 0.1 %).")
@click.option("--queue-bytes", type=int, default=None, help="Bottleneck queue per direction [1 BDP].")
@click.option("--rate-mbit-reverse", type=float, default=None, help="Rate b->a, for asymmetric links.")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Replay a 'seconds Mbit/s' trace (looped) as the rate.")
@click.option("--subnet", default="198.18.0.0/24", show_default=True,
              help="IPv4 subnet inside 198.18.0.0/15.")
@click.option("--seed", type=int, default=None, help="Seed of the loss generator (reproducible drops).")
def up(name: str, rtt_ms: float, rate_mbit: float, loss: float, queue_bytes: int | None,
       rate_mbit_reverse: float | None, trace: str | None, subnet: str, seed: int | None) -> None:
    """Create link NAME; it stays up after this command returns (until `down`)."""
    from dwcp import netlab as nl
    try:
        lab = nl.up(name, rtt_ms=rtt_ms, rate_mbit=rate_mbit, loss=loss, queue_bytes=queue_bytes,
                    rate_mbit_reverse=rate_mbit_reverse, trace=trace, subnet=subnet, seed=seed)
    except DWCPError as e:
        raise _fail(e) from None
    click.echo(f"{name}: a={lab.a.addr} ({lab.a.ns})  b={lab.b.addr} ({lab.b.ns})  "
               f"delay line pid {lab.pid}")


@netlab.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("host", type=click.Choice(["a", "b"]))
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str, host: str, cmd: tuple[str, ...]) -> None:
    """Run CMD inside host a or b of link NAME:  dwcp netlab exec NAME a -- ping 198.18.0.2"""
    from dwcp import netlab as nl
    try:
        nl.check_host()
        lab = nl.attach(name)
    except DWCPError as e:
        raise _fail(e) from None
    argv = (lab.a if host == "a" else lab.b).argv(list(cmd))
    os.execv(argv[0], argv)  # the command's exit status becomes ours


def _describe(st: dict[str, Any]) -> str:
    p = st["params"]
    lines = [f"{st['name']}: rtt {p['rtt_ms']} ms, rate {p['rate_mbit']} Mbit/s"
             + (f" (b->a {p['rate_mbit_reverse']})" if p.get("rate_mbit_reverse") else "")
             + f", loss {p['loss']:g}, queue {p['queue_bytes_a_to_b']}/{p['queue_bytes_b_to_a']} B"
             + (f", trace {p['trace']}" if p.get("trace") else ""),
             f"  a {st['hosts']['a']['addr']} ({st['hosts']['a']['namespace']})   "
             f"b {st['hosts']['b']['addr']} ({st['hosts']['b']['namespace']})"]
    stats = st.get("stats")
    if not stats:
        lines.append(f"  delay line: not running ({st.get('error', 'no stats')})")
        return "\n".join(lines)
    lines.append(f"  delay line pid {st['pid']}, up {stats['uptime_s']:.1f} s")
    for d, s in stats["directions"].items():
        lines.append(f"  {d}: {s['tx_packets']} pkts / {s['tx_bytes']} B delivered, "
                     f"drops {s['drop_queue_packets']} queue + {s['drop_loss_packets']} loss, "
                     f"late {s['late_packets']} (max {s['late_us_max']:.0f} us), "
                     f"queue {s['queue_bytes']}/{s['queue_limit_bytes']} B, rate {s['rate_bps'] / 1e6:g} Mbit/s")
    return "\n".join(lines)


@netlab.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(name: str | None, as_json: bool) -> None:
    """Parameters, addresses and emulator stats of link NAME (or of every link)."""
    from dwcp import netlab as nl
    try:
        names = [name] if name else nl.list_labs()
        report = [nl.attach(n).status() for n in names]
    except DWCPError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(report[0] if name else report, indent=2))
    elif not report:
        click.echo("no netlab links")
    else:
        click.echo("\n".join(_describe(s) for s in report))


@netlab.command()
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True,
              help="Remove every link, every dwcp-* namespace and stray delay line (after a crash).")
@click.option("--force", is_flag=True,
              help="With --all: also links owned by a Python process that is still running.")
def down(name: str | None, all_: bool, force: bool) -> None:
    """Take link NAME down (its delay line, namespaces and whatever runs in them)."""
    from dwcp import netlab as nl
    if bool(name) == all_:
        raise click.UsageError("give a link NAME or --all")
    try:
        if all_:
            removed = nl.down_all(force=force)
            click.echo(f"removed {len(removed['labs'])} link(s), {len(removed['namespaces'])} stray "
                       f"namespace(s), {len(removed['processes'])} stray delay line(s)")
            if removed["kept"]:
                click.echo(f"kept {', '.join(removed['kept'])}: owned by running processes "
                           "(--force removes them too)")
        else:
            assert name is not None
            nl.down(name)
    except DWCPError as e:
        raise _fail(e) from None
