"""``saga console``: serve the web console (sagas, a saga's time line, partitions, dead letters).

It reads the read model (``saga status``'s local SQLite cache of the log) and never asks a
manager, so it keeps answering while managers restart; a broker outage shows as a banner over
the last data read. See :mod:`sagacli.console`.
"""

from __future__ import annotations

import errno
import signal
import socket
from pathlib import Path

import click

from sagacli.cli import cli
from sagacli.cli.common import OneLineCommand, bootstrap_option, prefix_option


@cli.command("console", cls=OneLineCommand)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on (0: any free one).")
@click.option(
    "--group-id",
    default="saga-managers",
    show_default=True,
    help="The managers' consumer group (its committed inbox offsets give each partition's backlog).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="SAGA_STATE_DIR",
    default=None,
    help="Directory of the local read model (default: $SAGA_STATE_DIR, else ~/.cache/saga).",
)
@click.option(
    "-X",
    "client_settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="librdkafka client setting, e.g. -X security.protocol=SASL_SSL (repeatable).",
)
@bootstrap_option
@prefix_option
def console_command(
    host: str,
    port: int,
    group_id: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
    bootstrap_servers: str,
    topic_prefix: str,
) -> None:
    """Serve a web console of the sagas: a live list with filters and counts, each saga's time line
    and records, partition owners and lag, dead letters, and cancelling a running saga.

    Example: saga console --port 8080, then open http://127.0.0.1:8080/
    """
    import uvicorn

    from sagacli.cli.query import _quiet_librdkafka
    from sagacli.cli.topics import topics_for
    from sagacli.console import Settings, create_app
    from sagalog.errors import ConfigError
    from sagalog.kafka import parse_overrides
    from sagalog.readmodel import ReadModel

    _quiet_librdkafka()
    from sagacli.console.app import HERE

    if not (HERE / "templates" / "base.html").is_file() or not (HERE / "static" / "htmx.min.js").is_file():
        raise ConfigError(
            f"this installation lacks the console's pages ({HERE}/templates and static are missing); "
            f"reinstall sagalog from a checkout or a wheel that carries them"
        )
    topics = topics_for(topic_prefix)
    overrides = parse_overrides(client_settings)
    # The broker answers and the log exists (a wrong -b or --topic-prefix is a one-line error);
    # after this, an outage is a banner on the page, not an exit.
    with ReadModel(bootstrap_servers, topics, state_dir=state_dir, overrides=overrides, timeout_s=5.0) as model:
        partitions = model.partition_count()
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use (another console?); pass --port") from err
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}; pass --host / --port") from err
    settings = Settings(
        bootstrap=bootstrap_servers, topics=topics, state_dir=state_dir, overrides=overrides, group_id=group_id
    )
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    click.echo(
        f"saga console on http://{shown}:{bound_port}/ ({topics.log}, {partitions} partitions, at "
        f"{bootstrap_servers}); Ctrl-C stops it",
        err=False,
    )
    config = uvicorn.Config(
        create_app(settings), log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)

    def stop(signum: int, frame: object) -> None:
        # Before uvicorn's own handlers are in place (a signal right after the line above), and
        # after: uvicorn re-raises the signal it stopped on, which would make the exit code -15.
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    server.run(sockets=[sock])
