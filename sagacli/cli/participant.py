"""``saga participant run|list``: run the example participants (travel, orders, no-op).

Several participants run in one process, one SDK instance and one thread each: their loops
spend nearly all their time blocked in librdkafka (which releases the GIL), so an idle process
costs next to no CPU. SIGTERM or SIGINT stops them gracefully (replies already committed are
delivered first); a second signal kills the process.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import click

from sagacli.cli import cli
from sagacli.cli.common import bootstrap_option, prefix_option, wait_for_broker_option, with_retries

_log = logging.getLogger("sagacli.cli.participant")


@cli.group("participant")
def participant_group() -> None:
    """Run example participants (flights, hotels, cars, credit, payments, noop)."""


@participant_group.command("list")
def list_command() -> None:
    """Show the example participants, the saga type they serve and what they keep."""
    from participants.examples import EXAMPLE_DEFINITIONS_DIR, EXAMPLES

    width = max(map(len, EXAMPLES))
    for example in EXAMPLES.values():
        click.echo(f"{example.name:<{width}}  {example.saga_type:<12}  {example.description}")
    click.echo(f"\nsaga definitions: {EXAMPLE_DEFINITIONS_DIR}")


@participant_group.command("run")
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--db-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".saga/participants"),
    show_default=True,
    help="Directory of the participants' SQLite files (<name>.db: journal, outbox, offsets, inventory).",
)
@click.option(
    "--failure-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of sagas that cars/payments refuse (deterministic by saga id), so some sagas abort.",
)
@click.option(
    "--glitch-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of attempts that fail with a transient error (RETRYABLE_ERROR), so the manager retries.",
)
@click.option("--capacity", type=int, default=None, help="Stock per item (seats per flight, credit limit, ...).")
@click.option(
    "--step-time-ms",
    default="0",
    show_default=True,
    metavar="LO-HI",
    help="How long each step takes, drawn uniformly per reply (e.g. 100-500; N for a fixed time; 0: at once). "
    "Pipelined like a real service: commands are handled at once and each reply is held that long "
    "in the outbox before it is sent, so throughput is not capped.",
)
@click.option(
    "--session-timeout-ms",
    type=int,
    default=6000,
    show_default=True,
    help="Consumer group session timeout: how fast a dead participant's partitions move to another.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve Prometheus metrics of every participant of this process on http://0.0.0.0:PORT/metrics (one "
    "server for all; 0: any free port). Traces: set OTEL_TRACES_EXPORTER (otlp, console) and OTEL_SERVICE_NAME, "
    "with 'sagalog[tracing]' installed.",
)
@bootstrap_option
@prefix_option
@wait_for_broker_option
@click.option(
    "-X",
    "client_settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="librdkafka client setting, e.g. -X security.protocol=SASL_SSL (repeatable).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
def run_command(
    names: tuple[str, ...],
    db_dir: Path,
    failure_rate: float,
    glitch_rate: float,
    capacity: int | None,
    step_time_ms: str,
    session_timeout_ms: int,
    metrics_port: int | None,
    bootstrap_servers: str,
    topic_prefix: str,
    client_settings: tuple[str, ...],
    log_level: str,
    wait_for_broker: float,
) -> None:
    """Run the example participants NAME... until SIGTERM/SIGINT (see 'saga participant list').

    Their command topics must exist ('saga topics create --participant NAME ...'). Each keeps
    its state in DB_DIR/NAME.db: restart with the same --db-dir to resume where it stopped.
    """
    from participants.examples import ExampleOptions, build_participant, example_for, parse_step_time_ms
    from participants.sdk import Participant
    from sagacli.cli.topics import topics_for
    from sagalog.errors import ConfigError, SagaError
    from sagalog.kafka import check_reachable, check_session_timeout, existing_topics, parse_overrides

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"participant(s) named twice: {', '.join(duplicates)}")
    for name in names:
        example_for(name)  # unknown names fail here, before anything starts
    options = ExampleOptions(
        failure_rate=failure_rate,
        glitch_rate=glitch_rate,
        capacity=capacity,
        step_time_ms=parse_step_time_ms(step_time_ms),
    )
    overrides = parse_overrides(client_settings)
    topics = topics_for(topic_prefix)
    with_retries(lambda: check_reachable(bootstrap_servers, overrides=overrides), "reaching the broker", within_s=wait_for_broker)
    check_session_timeout(bootstrap_servers, session_timeout_ms, overrides)
    missing = sorted(set(map(topics.commands, names)) - existing_topics(bootstrap_servers, overrides))
    if missing:
        raise ConfigError(
            f"command topic(s) {', '.join(missing)} do not exist at {bootstrap_servers}; create them with "
            f"'saga topics create {' '.join(f'--participant {n}' for n in names)} --topic-prefix {topic_prefix}'"
        )

    participants: list[Participant] = [
        build_participant(
            name,
            topics=topics,
            bootstrap=bootstrap_servers,
            db_dir=db_dir,
            options=options,
            overrides=overrides,
            session_timeout_ms=session_timeout_ms,
            metrics_port=metrics_port,  # one server for all of them: the first one starts it
        )
        for name in names
    ]
    stop = threading.Event()
    failures: list[BaseException] = []

    def serve(participant: Participant) -> None:
        try:
            participant.run()
        except BaseException as err:  # reported below; the other participants are stopped
            if isinstance(err, SagaError):  # a refusal or outage we named: one line, no traceback
                _log.error("participant %s stopped: %s", participant.name, err)
            else:
                _log.exception("participant %s stopped on an error", participant.name)
            failures.append(err)
        finally:
            stop.set()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        _log.info("%s: stopping (again to kill)", signal.Signals(signum).name)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = [threading.Thread(target=serve, args=(p,), name=f"participant-{p.name}") for p in participants]
    try:
        for thread in threads:
            thread.start()
        click.echo(
            f"participants {', '.join(names)} running on {bootstrap_servers} (prefix {topic_prefix}, "
            f"state in {db_dir}); Ctrl-C to stop",
            err=True,
        )
        stop.wait()
    finally:
        for participant in participants:
            participant.stop()
        for thread in threads:
            thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failures:
        err = failures[0]
        if isinstance(err, SagaError):
            raise err
        raise SagaError(f"a participant stopped on an unexpected error: {type(err).__name__}: {err}") from err
