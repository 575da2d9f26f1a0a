"""``saga bench``: measure throughput, latency, replay, recovery, memory and query speed.

The code lives in the ``sagacli.bench`` package; this module only parses the command line.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path

import click

from sagacli.cli import cli

_PARTS = ("ceiling", "throughput", "latency", "replay", "recovery", "memory", "query", "observability")


@cli.command("bench")
@click.option("--quick", is_flag=True, help="Smaller sizes and shorter runs: finishes in under two minutes.")
@click.option(
    "--bootstrap-servers",
    "-b",
    default=None,
    metavar="BOOTSTRAP",
    help="Measure this Kafka cluster instead of starting an embedded broker (the default).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="Directory for bench.json, bench.md, latency.png, throughput.png and the processes' logs.",
)
@click.option("--skip", multiple=True, type=click.Choice(_PARTS), metavar="PART", help=f"Leave out a part (repeatable): {', '.join(_PARTS)}.")
@click.option("--profile", is_flag=True, help="Also sample the manager and a participant with py-spy at saturation.")
@click.option("--scale", type=click.FloatRange(min=0.01), default=1.0, hidden=True, help="Multiply sizes and durations (tests).")
@click.option("--no-progress", is_flag=True, hidden=True, help="Plain lines instead of a live progress display.")
def bench_command(
    quick: bool,
    bootstrap_servers: str | None,
    out: Path,
    skip: tuple[str, ...],
    profile: bool,
    scale: float,
    no_progress: bool,
) -> None:
    """Benchmark the saga coordinator end to end and compare with the targets.

    Starts an embedded broker (unless -b is given), real manager and no-op participant processes,
    and measures: the broker's raw ceiling, saturation throughput for 1 and 2 managers, latency at
    fixed offered loads, replay speed on takeover, recovery after kill -9, memory per live saga and
    'saga status' latency with many sagas in the log. Writes OUT/bench.json (every figure and the
    environment), OUT/bench.md (tables, targets beside the values) and OUT/*.png.
    """
    from sagacli.bench.config import BenchConfig
    from sagacli.bench.runner import run_bench

    base = BenchConfig.for_quick() if quick else BenchConfig.full()
    config = replace(base.scaled(scale), skip=frozenset(skip), profile=profile)
    command = "saga " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "saga bench"
    try:
        results = run_bench(config, bootstrap=bootstrap_servers, out=out, command=command, show_progress=not no_progress)
    except KeyboardInterrupt:
        click.secho("interrupted: every process the bench started was stopped", fg="yellow", err=True)
        sys.exit(130)
    targets = results.get("targets", [])
    click.echo("")
    width = max((len(t["label"]) for t in targets), default=10)
    for t in targets:
        value = "—" if t["value"] is None else f"{t['value']:,.1f} {t['unit']}"
        verdict = {True: click.style("met", fg="green"), False: click.style("not met", fg="red"), None: "not measured"}[t["met"]]
        click.echo(f"{t['label']:<{width}}  {value:>20}  target {t['target']:<18} {verdict}")
    click.echo(f"\nresults: {out / 'bench.json'}, {out / 'bench.md'}" + "".join(f", {out / p}" for p in results["files"].get("plots", [])))
    if results.get("errors"):
        for part, error in results["errors"].items():
            click.secho(f"{part} failed: {error}", fg="red", err=True)
        sys.exit(1)
