"""``saga demo``: broker, managers, participants, sagas, a SIGKILL, a takeover, a zombie, and checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sagacli.cli import cli
from sagacli.cli.query import QueryCommand


@cli.command("demo", cls=QueryCommand)
@click.option("--sagas", type=click.IntRange(min=1), default=300, show_default=True, help="How many sagas to run.")
@click.option("--replicas", type=click.IntRange(min=2), default=3, show_default=True, help="Manager processes.")
@click.option(
    "--failure-rate",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="Share of sagas that cars/payments refuse, so they abort and compensate.",
)
@click.option(
    "--kill-after",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.3,
    show_default=True,
    help="SIGKILL the manager with the most sagas in flight once this share of the sagas has been started.",
)
@click.option(
    "--step-time-ms",
    default="100-500",
    show_default=True,
    metavar="LO-HI",
    help="How long each participant step takes (pipelined; N for a fixed time, 0 for at once): "
    "sagas stay in flight long enough for the takeovers to resume some.",
)
@click.option("--no-zombie", is_flag=True, help="Skip the zombie act (a manager frozen with SIGSTOP, then woken).")
@click.option(
    "--bootstrap-servers",
    "-b",
    default=None,
    help="Use this Kafka cluster instead of starting the embedded broker (topics get a fresh prefix).",
)
@click.option("--topic-prefix", default=None, help="Topic prefix (default: 'saga' embedded, 'demo-<random>' otherwise).")
@click.option("--partitions", type=click.IntRange(min=1), default=6, show_default=True, help="Partitions of the log and inbox.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=15.0, show_default=True, help="Sagas started per second.")
@click.option(
    "--session-timeout-ms",
    type=click.IntRange(min=1000),
    default=3000,
    show_default=True,
    help="Managers' session timeout: how long until a killed manager's partitions move.",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=150.0, show_default=True, help="Give up after this many seconds of running sagas.")
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the saga mix (same seed, same sagas).")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep logs, participant databases and the read model here (default: a temporary directory, removed).",
)
@click.option("--keep", is_flag=True, help="Keep the temporary work directory (logs, databases) after the run.")
@click.option("--stay", is_flag=True, help="After the report, keep everything running to query sagas (Ctrl-C stops).")
@click.option(
    "--report-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report (outcomes, takeover, checks) to this JSON file.",
)
def demo_command(
    sagas: int,
    replicas: int,
    failure_rate: float,
    kill_after: float,
    step_time_ms: str,
    no_zombie: bool,
    bootstrap_servers: str | None,
    topic_prefix: str | None,
    partitions: int,
    rate: float,
    session_timeout_ms: int,
    timeout: float,
    seed: int,
    work_dir: Path | None,
    keep: bool,
    stay: bool,
    report_json: Path | None,
) -> None:
    """Run the whole story: broker, N managers, the example participants, a few hundred sagas
    (some abort and compensate), the manager with the most sagas in flight SIGKILLed mid-run
    (the others resume its sagas) and restarted, then another one frozen with SIGSTOP past its
    session timeout and woken as a fenced zombie, then checks.

    Exits 0 when every check passes (every saga terminal, every balance consistent, managers
    alive, the zombie fenced), 1 otherwise, 130 on Ctrl-C. Everything it started is stopped on
    the way out.
    """
    from rich.console import Console
    from rich.markup import escape

    from participants.examples import parse_step_time_ms
    from sagacli.demo import Demo, DemoReport, DemoSettings, Interrupted, print_report, query_hints

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=120)  # logs and CI: wider than the 80-column default
    settings = DemoSettings(
        sagas=sagas,
        replicas=replicas,
        failure_rate=failure_rate,
        kill_after=kill_after,
        bootstrap=bootstrap_servers,
        topic_prefix=topic_prefix,
        partitions=partitions,
        rate=rate,
        session_timeout_ms=session_timeout_ms,
        timeout_s=timeout,
        work_dir=work_dir,
        keep=keep,
        seed=seed,
        stay=stay,
        step_time_ms=parse_step_time_ms(step_time_ms),
        zombie=not no_zombie,
    )
    demo = Demo(settings, console)

    def on_report(report: DemoReport) -> None:
        print_report(report, console)
        if report_json is not None:
            report_json.write_text(json.dumps(report.to_json(), indent=2, default=str))
        if bootstrap_servers is not None and not stay:  # the broker outlives the demo: sagas stay queryable
            console.print(f"look at any saga:\n{escape(query_hints(report.bootstrap, report.topic_prefix, demo.plan))}")
        if not report.ok or keep or work_dir is not None:
            console.print(f"logs, participant databases and the read model: {escape(report.work_dir)}")

    try:
        report = demo.run(on_report)
    except Interrupted as err:
        click.secho(f"error: {err} (logs in {demo.work_dir})", fg="red", err=True)
        sys.exit(130)
    if not report.ok:
        sys.exit(1)
