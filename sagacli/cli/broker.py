"""``saga broker``: run the embedded (Tansu, memory-only) broker in the foreground."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click

from sagacli.cli import cli
from sagacli.cli.common import prefix_option


@cli.command("broker")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=9092, show_default=True, type=int, help="Port to listen on (0: pick a free one)."
)
@click.option(
    "--advertised-host",
    default=None,
    help="Host name clients are told to connect to (default: --host, or 127.0.0.1 for 0.0.0.0).",
)
@click.option(
    "--log-file", type=click.Path(dir_okay=False), default=None, help="Write the broker's output here."
)
@click.option("--create-topics", is_flag=True, help="Also create the saga topics once the broker is up.")
@click.option("--partitions", default=6, show_default=True, type=int, help="Partitions of the log and inbox.")
@click.option(
    "--participant", "participants", multiple=True, help="Create this participant's command topic too."
)
@prefix_option
def broker_command(
    host: str,
    port: int,
    advertised_host: str | None,
    log_file: str | None,
    create_topics: bool,
    partitions: int,
    participants: tuple[str, ...],
    topic_prefix: str,
) -> None:
    """Run the embedded Kafka-compatible broker until Ctrl-C or SIGTERM.

    Storage is in memory: every topic vanishes when it stops. For anything that must survive,
    point --bootstrap-servers at a real Kafka cluster instead.
    """
    from sagacli.cli.topics import topics_for
    from sagalog.broker import EmbeddedBroker
    from sagalog.errors import BrokerError

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(host, port, advertised_host=advertised_host, log_path=log_file) as broker:
            click.echo(f"broker ready at {broker.bootstrap} (memory storage: topics vanish when it stops)")
            if create_topics:
                from sagalog.topics import ensure_topics

                report = ensure_topics(
                    broker.bootstrap,
                    topics_for(topic_prefix),
                    partitions=partitions,
                    participants=participants,
                )
                click.echo(
                    f"topics ready: {', '.join(r.name for r in report.results)} ({partitions} partitions)"
                )

            # Wake up on a signal or when the broker dies on its own, whichever comes first.
            def watch() -> None:
                broker.wait()
                stop.set()

            threading.Thread(target=watch, daemon=True).start()
            stop.wait()
            if not broker.running:
                raise BrokerError(
                    f"the embedded broker exited unexpectedly (code {broker.wait()}); "
                    f"last output:\n{broker.log_tail()}"
                )
            click.echo("stopping broker", err=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
