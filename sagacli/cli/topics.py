"""``saga topics create|describe``: create or inspect the topics of one deployment (one prefix)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from sagacli.cli import cli
from sagacli.cli.common import bootstrap_option, prefix_option

if TYPE_CHECKING:
    from sagalog.config import Topics

client_setting_option = click.option(
    "-X",
    "client_settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="librdkafka client setting, e.g. -X security.protocol=SASL_SSL (repeatable).",
)
timeout_option = click.option(
    "--timeout", default=10.0, show_default=True, type=float, help="Seconds to wait for the broker."
)


def topics_for(prefix: str) -> Topics:
    """The Topics of a --topic-prefix, with a bad prefix reported as a user mistake."""
    from sagalog.config import Topics
    from sagalog.errors import ConfigError

    try:
        return Topics(prefix=prefix)
    except ConfigError as err:
        raise ConfigError(
            f"--topic-prefix {prefix!r} is not a valid topic name prefix (use letters, digits, '.', '_' and '-')"
        ) from err


@cli.group("topics")
def topics_group() -> None:
    """Create or inspect the saga topics (log, inbox, dead letters, participant commands)."""


@topics_group.command("create")
@click.option("--partitions", default=6, show_default=True, type=int, help="Partitions of the log and inbox.")
@click.option("--replication", default=1, show_default=True, type=int, help="Replication factor.")
@click.option(
    "--participant",
    "participants",
    multiple=True,
    metavar="NAME",
    help="Create NAME's command topic (repeatable).",
)
@bootstrap_option
@prefix_option
@client_setting_option
@timeout_option
def create_command(
    partitions: int,
    replication: int,
    participants: tuple[str, ...],
    bootstrap_servers: str,
    topic_prefix: str,
    client_settings: tuple[str, ...],
    timeout: float,
) -> None:
    """Create missing topics and verify existing ones (safe to run again at any time)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from sagalog.kafka import parse_overrides
    from sagalog.topics import ensure_topics

    report = ensure_topics(
        bootstrap_servers,
        topics_for(topic_prefix),
        partitions=partitions,
        replication=replication,
        participants=participants,
        overrides=parse_overrides(client_settings),
        timeout_s=timeout,
    )
    table = Table()
    for column in ("topic", "role", "partitions", "cleanup.policy", "status"):
        table.add_column(column, justify="right" if column == "partitions" else "left")
    for result in report.results:
        status = "[green]created[/]" if result.action == "created" else "verified"
        if result.warning:
            status += " [yellow](warning)[/]"
        table.add_row(result.name, result.role, str(result.partitions), result.cleanup_policy, status)
    console = Console()
    console.print(
        f"topics with prefix {topic_prefix!r} at {bootstrap_servers}:", markup=False, highlight=False
    )
    console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


@topics_group.command("describe")
@bootstrap_option
@prefix_option
@client_setting_option
@timeout_option
def describe_command(
    bootstrap_servers: str, topic_prefix: str, client_settings: tuple[str, ...], timeout: float
) -> None:
    """Show the partition count of each topic of this prefix (missing ones included)."""
    from rich.console import Console
    from rich.table import Table

    from sagalog.kafka import parse_overrides
    from sagalog.topics import describe

    topics = topics_for(topic_prefix)
    counts = describe(
        bootstrap_servers, topics, overrides=parse_overrides(client_settings), timeout_s=timeout
    )
    table = Table()
    table.add_column("topic")
    table.add_column("partitions", justify="right")
    for name in (topics.log, topics.inbox, topics.dead_letters):
        table.add_row(name, str(counts[name]) if name in counts else "[red]missing[/]")
    for name, count in counts.items():
        if name not in (topics.log, topics.inbox, topics.dead_letters):
            table.add_row(name, str(count))
    console = Console()
    console.print(
        f"topics with prefix {topic_prefix!r} at {bootstrap_servers}:", markup=False, highlight=False
    )
    console.print(table)
    log_n, inbox_n = counts.get(topics.log), counts.get(topics.inbox)
    if log_n is not None and inbox_n is not None and log_n != inbox_n:
        click.secho(
            f"warning: {topics.log} ({log_n}) and {topics.inbox} ({inbox_n}) must have the same partition count",
            fg="yellow",
            err=True,
        )
