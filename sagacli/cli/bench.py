"""``saga bench``: measure throughput, latency, replay, recovery, memory and query speed.

The code lives in the ``sagacli.bench`` package; this module only parses the command line.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path

import click

from sagacli.bench.config import PARTS as _PARTS
from sagacli.cli import cli


@cli.command("bench")
@click.option("--quick", is_flag=True, help="Smaller sizes and shorter runs: about 2.5 minutes per broker.")
@click.option(
    "--bootstrap-servers",
    "-b",
    default=None,
    metavar="BOOTSTRAP",
    help="Measure this Kafka cluster instead of starting an embedded broker (the default).",
)
@click.option(
    "--also",
    default=None,
    metavar="[NAME=]BOOTSTRAP",
    help=(
        "Also measure this cluster (e.g. a real Kafka: ../shared/kafka/kafka.sh start 29392, then --also 127.0.0.1:29392), "
        "after the first broker, in the same run; bench.json and bench.md put both side by side. NAME (default: kafka) "
        "labels it in the results. Its CPU is measured when its process runs on this machine."
    ),
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
    also: str | None,
    out: Path,
    skip: tuple[str, ...],
    profile: bool,
    scale: float,
    no_progress: bool,
) -> None:
    """Benchmark the saga coordinator end to end and compare with the targets.

    Starts an embedded broker (unless -b is given), real manager and no-op participant processes,
    and measures: the broker's raw ceiling, the idle CPU of a deployment, saturation throughput for
    1 and 2 managers, latency at fixed offered loads, 2x overload, replay speed on takeover,
    recovery after kill -9, memory per live saga and 'saga status' latency with many sagas in the
    log. With --also, measures a second broker the same way in the same run. Writes OUT/bench.json
    (every figure and the environment), OUT/bench.md (tables, targets beside the values) and
    OUT/*.png.
    """
    from sagacli.bench.config import BenchConfig
    from sagacli.bench.report import value_text
    from sagacli.bench.runner import parse_also, run_bench

    also_broker = None
    if also is not None:
        try:
            also_broker = parse_also(also)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--also") from err
        if not also_broker[1]:
            raise click.BadParameter("no bootstrap address", param_hint="--also")

    base = BenchConfig.for_quick() if quick else BenchConfig.full()
    config = replace(base.scaled(scale), skip=frozenset(skip), profile=profile)
    command = "saga " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "saga bench"
    try:
        results = run_bench(
            config, bootstrap=bootstrap_servers, also=also_broker, out=out, command=command, show_progress=not no_progress
        )
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
    brokers = results.get("brokers", {})
    if len(brokers) > 1:
        click.echo("\nIssue #10 figures: " + " | ".join(f"{name} ({b.get('broker_short')})" for name, b in brokers.items()))
        for row in results.get("comparison", {}).get("rows", []):
            if row["target"] is None:
                continue
            cells = []
            for name in brokers:
                value = row["values"].get(name)
                met = row["met"].get(name)
                text = value_text(value, row["unit"])
                verdict = {True: click.style("met", fg="green"), False: click.style("not met", fg="red"), None: "not judged"}[met]
                cells.append(f"{text:>24} " + (verdict if value is not None or met is not None else "not measured"))
            click.echo(f"{row['label'][:width]:<{width}}  " + "  ".join(cells))
    click.echo(f"\nresults: {out / 'bench.json'}, {out / 'bench.md'}" + "".join(f", {out / p}" for p in results["files"].get("plots", [])))
    failed = dict(results.get("errors") or {})
    for name, b in list(brokers.items())[1:]:
        failed.update({f"{name}: {part}": error for part, error in (b.get("errors") or {}).items()})
    if failed:
        for part, error in failed.items():
            click.secho(f"{part} failed: {error}", fg="red", err=True)
        sys.exit(1)
