"""``saga manager``: run one manager replica, or supervise N of them."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from sagacli.cli import cli
from sagacli.cli.common import bootstrap_option, prefix_option, wait_for_broker_option, with_retries


def default_definitions() -> list[Path]:
    """The example definitions shipped with the participants, so the demo runs with no flags."""
    return [Path(__file__).resolve().parents[2] / "participants" / "examples" / "definitions"]


@cli.command("manager")
@bootstrap_option
@prefix_option
@click.option("--group-id", default="saga-managers", show_default=True, help="Consumer group shared by all replicas.")
@click.option(
    "--definitions",
    "-d",
    "definitions",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Saga definition file or directory (YAML/JSON); repeatable. Default: the examples'.",
)
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Run and supervise N replica processes.")
@click.option("--restart/--no-restart", default=False, help="With --replicas: restart a replica that dies.")
@click.option("--partitions", type=click.IntRange(min=1), default=6, show_default=True, help="Partitions for topics created at startup.")
@wait_for_broker_option
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None, help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics (with --replicas N, replica i uses PORT+i).")
@click.option("--session-timeout-ms", type=click.IntRange(min=1000), default=6000, show_default=True, help="After this long without heartbeats a replica's partitions move to the others.")
@click.option("--finished-retention-s", type=click.FloatRange(min=0), default=600.0, show_default=True, help="Tombstone finished sagas this long after they end (repeated starts are ignored until then).")
@click.option(
    "--max-live-sagas",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Admission control: live sagas per log partition; further starts wait their turn while running sagas go on.",
)
@click.option("--max-held", type=click.IntRange(min=1), default=50_000, hidden=True, help="Inbox messages held per partition before starts are read again later.")
@click.option("-X", "client_settings", multiple=True, metavar="KEY=VALUE", help="librdkafka setting for every client (SASL/TLS...).")
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def manager_command(
    bootstrap_servers: str,
    topic_prefix: str,
    group_id: str,
    definitions: tuple[Path, ...],
    replicas: int,
    restart: bool,
    partitions: int,
    session_timeout_ms: int,
    metrics_port: int | None,
    wait_for_broker: float,
    finished_retention_s: float,
    max_live_sagas: int,
    max_held: int,
    client_settings: tuple[str, ...],
    log_level: str,
) -> None:
    """Run a saga manager replica (stateless: it rebuilds from the saga log on assignment)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    if replicas > 1:
        from sagacli.supervisor import Supervisor

        args = [arg for arg in sys.argv[1:] if arg != "manager"]
        args = _without_option(args, "--replicas")
        args = [a for a in args if a not in ("--restart", "--no-restart")]
        sys.exit(Supervisor(args, replicas, restart=restart).run())

    from manager.runtime import Manager, ManagerSettings
    from sagalog.config import Topics
    from sagalog.definition import DefinitionSet
    from sagalog.kafka import check_reachable, check_session_timeout, parse_overrides
    from sagalog.topics import ensure_topics

    overrides = parse_overrides(client_settings)
    defs = DefinitionSet.load(list(definitions) or default_definitions())
    topics = Topics(prefix=topic_prefix)
    check_session_timeout(bootstrap_servers, session_timeout_ms, overrides)
    with_retries(lambda: check_reachable(bootstrap_servers, 10.0, overrides), "reaching the broker", within_s=wait_for_broker)
    report = with_retries(
        lambda: ensure_topics(bootstrap_servers, topics, partitions=partitions, participants=defs.participants(), overrides=overrides),
        "creating or checking the topics",
    )
    settings = ManagerSettings(
        bootstrap=bootstrap_servers,
        definitions=defs,
        topics=topics,
        group_id=group_id,
        client_overrides=overrides,
        session_timeout_ms=session_timeout_ms,
        finished_retention_s=finished_retention_s,
        max_live_sagas_per_partition=max_live_sagas,
        max_held_per_partition=max_held,
        metrics_port=metrics_port,
    )
    manager = Manager(settings)
    signal.signal(signal.SIGTERM, lambda *_: manager.stop())
    signal.signal(signal.SIGINT, lambda *_: manager.stop())
    logging.getLogger("saga.manager").info(
        "saga types: %s; %d partitions", ", ".join(defs.names()), report.partitions
    )
    manager.run()


def _without_option(args: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out

