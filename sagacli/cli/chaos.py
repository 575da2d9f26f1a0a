"""``saga chaos``: a seeded fault run against a real deployment, with a verdict (see sagacli.chaos)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sagacli.cli import cli


@cli.command("chaos")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the fault schedule and the saga mix.")
@click.option("--duration", type=click.FloatRange(min=5), default=60.0, show_default=True, help="Seconds of load and faults.")
@click.option("--managers", type=click.IntRange(min=2), default=3, show_default=True, help="Manager processes.")
@click.option("--partitions", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True, help="Sagas started per second.")
@click.option(
    "--faults",
    default="kill,freeze,participant,poison",
    show_default=True,
    help="Comma-separated fault kinds: kill (SIGKILL managers), freeze (SIGSTOP past the session timeout), "
    "participant (SIGKILL the participants), poison (bad bytes on the inbox and command topics), "
    "broker (SIGKILL a real Kafka started by --kafka-sh, then restart it).",
)
@click.option("--meddle-rate", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Share of replies and commands sent a second time, 0.2-3 s later (duplicated, delayed, reordered).")
@click.option("--kafka-sh", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="kafka.sh that started the Kafka at --bootstrap-servers (127.0.0.1:PORT), for broker faults.")
@click.option("--session-timeout-ms", type=click.IntRange(min=1000), default=6000, show_default=True)
@click.option("-b", "--bootstrap-servers", default=None, help="Run against this cluster instead of the embedded broker.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Logs, databases and the report go here.")
def chaos_command(
    seed: int, duration: float, managers: int, partitions: int, rate: float, faults: str,
    session_timeout_ms: int, bootstrap_servers: str | None, work_dir: Path | None,
    meddle_rate: float, kafka_sh: Path | None,
) -> None:  # fmt: skip
    """Run a deployment under load and seeded faults, heal it, and check that nothing was lost,
    doubled or left half done. Exit 1 if an invariant broke; the same seed replays the same faults."""
    from sagacli.chaos import Chaos, ChaosSettings

    settings = ChaosSettings(
        seed=seed, duration_s=duration, managers=managers, partitions=partitions, rate=rate,
        faults=tuple(f.strip() for f in faults.split(",") if f.strip()), session_timeout_ms=session_timeout_ms,
        bootstrap=bootstrap_servers, work_dir=work_dir, meddle_rate=meddle_rate, kafka_sh=kafka_sh,
    )  # fmt: skip
    chaos = Chaos(settings, echo=click.echo)
    click.echo(f"chaos run, seed {seed}: {len(chaos.schedule)} faults over {duration:g}s; work dir {chaos.work_dir}")
    report = chaos.run()
    (chaos.work_dir / "chaos-report.json").write_text(json.dumps(report.to_json(), indent=2, default=str))
    (chaos.work_dir / "chaos-report.md").write_text(report.to_markdown())
    click.echo(report.to_markdown())
    sys.exit(0 if report.ok else 1)
