"""``saga start|status|history|list|cancel``: start sagas and look at them.

Every query answers from the read model (:mod:`sagalog.readmodel`): a local SQLite cache of
the saga log, caught up from the log at each call. No manager needs to be running to answer.
Starting and cancelling produce a request to ``<prefix>.inbox`` keyed by saga id, which the
manager owning that partition picks up.

Exit codes: 0 success; 2 a user mistake (unknown saga or type, bad payload, invalid flags);
3 the broker is unavailable; with ``--wait``: 4 the saga was ABORTED, 5 timed out waiting.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sagalog.cli import cli
from sagalog.cli.common import OneLineCommand, bootstrap_option, prefix_option

if TYPE_CHECKING:
    from rich.console import Console

    from sagalog.definition import DefinitionSet
    from sagalog.fold import SagaState
    from sagalog.readmodel import HistoryEntry, ReadModel, SagaView

EXIT_ABORTED = 4
EXIT_TIMEOUT = 5
SAGA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$")
STATUSES = ("RUNNING", "COMPENSATING", "COMPLETED", "ABORTED")
_STATUS_STYLE = {"RUNNING": "cyan", "COMPENSATING": "yellow", "COMPLETED": "green", "ABORTED": "red"}
_STEP_STYLE = {
    "PENDING": "dim",
    "RUNNING": "cyan",
    "SUCCEEDED": "green",
    "FAILED": "red",
    "TIMED_OUT": "red",
    "COMPENSATING": "yellow",
    "COMPENSATED": "magenta",
}

F = TypeVar("F", bound=Callable[..., Any])


QueryCommand = OneLineCommand  # every command of the group is one now; kept for the decorators below


def _common_options(func: F) -> F:
    """Where the log is (bootstrap, prefix, client settings) and where the read model lives."""
    func = click.option(
        "-X",
        "client_settings",
        multiple=True,
        metavar="KEY=VALUE",
        help="librdkafka client setting, e.g. -X security.protocol=SASL_SSL (repeatable).",
    )(func)
    func = click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="SAGA_STATE_DIR",
        default=None,
        help="Directory of the local read model (default: $SAGA_STATE_DIR, else ~/.cache/saga).",
    )(func)
    return bootstrap_option(prefix_option(func))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of tables.")


@contextmanager
def _read_model(
    bootstrap_servers: str, topic_prefix: str, state_dir: Path | None, client_settings: tuple[str, ...]
) -> Iterator[ReadModel]:
    from sagalog.cli.topics import topics_for
    from sagalog.kafka import parse_overrides
    from sagalog.readmodel import ReadModel

    _quiet_librdkafka()
    overrides = parse_overrides(client_settings)
    with ReadModel(
        bootstrap_servers, topics_for(topic_prefix), state_dir=state_dir, overrides=overrides, timeout_s=5.0
    ) as model:
        yield model
        if model.staleness:
            click.echo(f"warning: {model.staleness}", err=True)


def _quiet_librdkafka() -> None:
    """librdkafka's own log goes to Python logging (``sagalog.kafka``); with no handler configured,
    Python's last-resort handler would print every failed connection attempt to stderr, burying
    the one line the CLI prints. A CLI command reports what matters itself."""
    import logging

    for name in ("saga.rdkafka", "sagalog.rdkafka"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())


def _console() -> Console:
    from rich.console import Console

    console = Console(highlight=False)
    # Piped into a file or another program: wider than the 80-column default, tables stay readable.
    return console if console.is_terminal else Console(highlight=False, width=160)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _parse_json(text: str | None) -> Any:
    """Outputs and payloads are JSON strings on the log; show them as JSON where they are."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S.%f")[:-3]


def _date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _duration(ms: int) -> str:
    if ms < 1000:
        return f"{ms} ms"
    if ms < 120_000:
        return f"{ms / 1000:.2f} s"
    return f"{ms / 60_000:.1f} min"


def _styled(value: str, styles: dict[str, str]) -> str:
    return f"[{styles.get(value, 'white')}]{value}[/]"


def _short(text: str | None, width: int = 60) -> str:
    if text is None:
        return ""
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


# --- start ------------------------------------------------------------------------------------


def _load_definitions(paths: tuple[Path, ...]) -> DefinitionSet:
    from sagalog.cli.manager import default_definitions
    from sagalog.definition import DefinitionSet

    return DefinitionSet.load(list(paths) or default_definitions())


def _payload(payload: str | None, payload_file: Path | None) -> tuple[str, Any]:
    from sagalog.errors import ConfigError

    source = "--payload"
    if payload_file is not None:
        source = f"--payload-file {payload_file}"
        try:
            payload = sys.stdin.read() if str(payload_file) == "-" else payload_file.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read {source}: {err.strerror or err}") from err
    if payload is None:
        return "{}", {}
    try:
        value = json.loads(payload)
    except ValueError as err:
        raise ConfigError(
            f"{source} is not valid JSON ({err}); quote it for the shell, e.g. --payload '{{\"amount\": 250}}'"
        ) from err
    return json.dumps(value, separators=(",", ":")), value


@cli.command("start", cls=QueryCommand)
@click.argument("saga_type", metavar="TYPE")
@click.option("--payload", default=None, metavar="JSON", help="The saga's input as JSON (default: {}).")
@click.option(
    "--payload-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the payload from this JSON file ('-': standard input).",
)
@click.option("--id", "saga_id", default=None, help="Saga id (default: TYPE-<random>); starting an id twice is refused.")
@click.option("--wait", is_flag=True, help="Block until the saga ends: exit 0 COMPLETED, 4 ABORTED, 5 timed out.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --wait: give up after this many seconds (default 60).",
)
@click.option(
    "--definitions",
    "-d",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Saga definition file or directory to validate against (repeatable). Default: the examples'.",
)
@json_option
@_common_options
def start_command(
    saga_type: str,
    payload: str | None,
    payload_file: Path | None,
    saga_id: str | None,
    wait: bool,
    timeout: float | None,
    definitions: tuple[Path, ...],
    as_json: bool,
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
) -> None:
    """Start a saga of type TYPE; with --wait, block until it ends and print the outcome.

    The type and payload are checked against the saga definitions first (the managers check
    them again). Example: saga start book-trip --payload '{"flight": "SK-101", "travellers": 2}' --wait
    """
    from sagalog.errors import ConfigError

    if timeout is not None and not wait:
        raise click.UsageError("--timeout only applies with --wait")
    if payload is not None and payload_file is not None:
        raise click.UsageError("pass the payload with --payload or with --payload-file, not both")
    if saga_id is not None and not SAGA_ID.match(saga_id):
        raise ConfigError(
            f"--id {saga_id!r} is not a valid saga id: use up to 200 letters, digits and . _ : @ -, "
            f"starting with a letter or digit"
        )
    defs = _load_definitions(definitions)
    definition = defs.get(saga_type)
    if definition is None:
        where = ", ".join(map(str, definitions)) if definitions else "the example definitions"
        raise ConfigError(
            f"unknown saga type {saga_type!r}; known types: {', '.join(defs.names())} (from {where}; "
            f"pass --definitions to use others)"
        )
    text, value = _payload(payload, payload_file)
    try:
        definition.validate_payload(value)
    except ConfigError as err:
        raise ConfigError(f"{err}; fix the JSON given with --payload / --payload-file") from err
    if saga_id is None:
        saga_id = f"{saga_type}-{uuid.uuid4().hex[:12]}"

    with _read_model(bootstrap_servers, topic_prefix, state_dir, client_settings) as model:
        existing = model.find(saga_id)
        if existing is not None:
            raise ConfigError(
                f"saga {saga_id!r} exists already ({existing.status.value}); a second start would be ignored: "
                f"choose another --id, or omit --id for a fresh one"
            )
        partition = _send_start(model, saga_id, saga_type, text)
        started = time.monotonic()
        if not wait:
            if as_json:
                _emit_json({"saga_id": saga_id, "saga_type": saga_type, "partition": partition, "status": None})
            else:
                click.echo(f"started saga {saga_id} ({saga_type}); follow it with: saga status {saga_id}")
            return
        limit = 60.0 if timeout is None else timeout
        if not as_json:
            click.echo(f"started saga {saga_id} ({saga_type}); waiting up to {limit:g} s for it to end", err=True)
        state = model.wait_terminal(saga_id, limit)
        elapsed = time.monotonic() - started
    _report_outcome(saga_id, saga_type, partition, state, elapsed, limit, as_json, topic_prefix)


def _send_start(model: ReadModel, saga_id: str, saga_type: str, payload: str) -> int:
    """Produce the StartSaga request to the inbox; its partition once the broker has it."""
    from sagalog.records import StartSaga

    request = StartSaga(saga_id=saga_id, saga_type=saga_type, payload=payload, requested_ms=int(time.time() * 1000))
    return _produce(model, saga_id, model.codec.encode(request), "start request")


def _produce(model: ReadModel, saga_id: str, value: bytes, what: str) -> int:
    from confluent_kafka import KafkaError, KafkaException, Message, Producer

    from sagalog.errors import BrokerUnavailable, ConfigError
    from sagalog.kafka import producer_config, translate

    if model.topics.inbox not in model.topic_names():
        raise ConfigError(
            f"topic {model.topics.inbox} does not exist at {model.bootstrap}; start a manager ('saga manager') "
            f"or create the topics ('saga topics create')"
        )
    delivered: list[tuple[KafkaError | None, Message]] = []
    producer = Producer(producer_config(model.bootstrap, overrides=model.overrides))
    try:
        producer.produce(
            model.topics.inbox,
            value,
            key=saga_id.encode(),
            on_delivery=lambda err, msg: delivered.append((err, msg)),
        )
        remaining = producer.flush(model.timeout_s)
    except KafkaException as err:
        raise translate(err, f"sending the {what} to {model.topics.inbox}") from err
    if remaining or not delivered:
        raise BrokerUnavailable(
            f"the {what} for saga {saga_id} was not acknowledged by {model.bootstrap} within {model.timeout_s:g}s; "
            f"check the broker and try again (it may still arrive: check with 'saga status {saga_id}')"
        )
    error, message = delivered[0]
    if error is not None:
        raise translate(error, f"sending the {what} to {model.topics.inbox}")
    return int(message.partition() or 0)


def _report_outcome(
    saga_id: str,
    saga_type: str,
    partition: int,
    state: SagaState | None,
    elapsed: float,
    limit: float,
    as_json: bool,
    prefix: str,
) -> None:
    status = state.status.value if state is not None else None
    terminal = state is not None and state.status.terminal
    if as_json:
        _emit_json(
            {
                "saga_id": saga_id,
                "saga_type": saga_type,
                "partition": partition,
                "status": status,
                "reason": state.reason if state is not None else None,
                "timed_out": not terminal,
                "elapsed_s": round(elapsed, 3),
            }
        )
    elif state is None:
        click.secho(
            f"error: saga {saga_id} has not begun after {limit:g} s: is a manager running ('saga manager')? "
            f"Refused start requests go to {prefix}.dead-letters",
            fg="red",
            err=True,
        )
    elif not terminal:
        at = ", ".join(s.name for s in state.steps if s.status in ("RUNNING", "COMPENSATING")) or "-"
        click.secho(
            f"error: saga {saga_id} is still {status} (at {at}) after {limit:g} s; "
            f"check it later with 'saga status {saga_id}'",
            fg="red",
            err=True,
        )
    else:
        took = _duration(state.updated_ms - state.started_ms)
        if status == "COMPLETED":
            click.secho(f"saga {saga_id} COMPLETED in {took}", fg="green")
        else:
            click.secho(f"saga {saga_id} ABORTED after {took}: {state.reason}", fg="red")
    if not terminal:
        sys.exit(EXIT_TIMEOUT)
    if status == "ABORTED":
        sys.exit(EXIT_ABORTED)


# --- status -----------------------------------------------------------------------------------


def _view_json(view: SagaView) -> dict[str, Any]:
    state = view.state
    definition = view.definition
    return {
        "saga_id": state.saga_id,
        "saga_type": state.saga_type,
        "definition_version": definition.version,
        "status": state.status.value,
        "reason": state.reason,
        "current_steps": list(view.current),
        "partition": view.partition,
        "owner": None
        if view.claim is None
        else {"instance": view.claim.owner, "epoch": view.claim.epoch, "claimed_ms": view.claim.claimed_ms},
        "seq": state.seq,
        "epoch": state.epoch,
        "started_ms": state.started_ms,
        "updated_ms": state.updated_ms,
        "payload": _parse_json(state.payload),
        "steps": [
            {
                "name": step.name,
                "participant": definition.by_name[step.name].participant,
                "depends_on": list(definition.dependencies(step.name)),
                "status": step.status.value,
                "attempts": step.attempt,
                "compensation_attempts": step.comp_attempt,
                "deadline_ms": step.deadline_ms or None,
                "output": _parse_json(step.output),
                "error": step.error,
            }
            for step in state.steps
        ],
        "history": [entry.as_json() for entry in view.history],
    }


def _event_detail(entry: HistoryEntry) -> str:
    event = entry.event
    parts: list[str] = []
    if "step" in event:
        parts.append(str(event["step"]))
    if "attempt" in event:
        parts.append(f"attempt {event['attempt']}")
    if event.get("outcome"):
        parts.append(str(event["outcome"]))
    for key in ("reason", "error", "last_error"):
        if event.get(key):
            parts.append(f"{key.replace('_', ' ')}: {event[key]}")
    if event.get("output") not in (None, "{}"):
        parts.append(f"output {event['output']}")
    if entry.event_type == "SagaBegun":
        parts.append(f"{event.get('saga_type')} v{event.get('definition_version')}")
    return _short("; ".join(parts), 70)


@cli.command("status", cls=QueryCommand)
@click.argument("saga_id", metavar="ID")
@json_option
@_common_options
def status_command(
    saga_id: str,
    as_json: bool,
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
) -> None:
    """Show a saga: its status, current step(s), every step's state and the time line of its records."""
    with _read_model(bootstrap_servers, topic_prefix, state_dir, client_settings) as model:
        view = model.view(saga_id)
    if as_json:
        _emit_json(_view_json(view))
        return
    _print_view(view)


def _print_view(view: SagaView) -> None:
    from rich.markup import escape
    from rich.table import Table

    state, definition = view.state, view.definition
    console = _console()
    took = _duration(state.updated_ms - state.started_ms)
    console.print(
        f"[bold]saga {escape(state.saga_id)}[/]  {escape(state.saga_type)} v{definition.version}  "
        f"{_styled(state.status.value, _STATUS_STYLE)}"
    )
    timing = f"started {_date(state.started_ms)}, last change {_clock(state.updated_ms)}"
    timing += f" ({'took' if state.status.terminal else 'running for'} {took})"
    console.print(f"  {timing}")
    owner = f", owner {escape(view.claim.owner)} (epoch {view.claim.epoch})" if view.claim else ", no owner claimed yet"
    console.print(f"  log partition {view.partition}{owner}")
    if state.reason:
        console.print(f"  reason: {escape(state.reason)}")
    if view.current:
        current = ", ".join(
            f"{name} ({state.step(name).status.value.lower()}, attempt "
            f"{state.step(name).comp_attempt if state.step(name).status == 'COMPENSATING' else state.step(name).attempt})"
            for name in view.current
        )
        console.print(f"  current step(s): {escape(current)}")
    console.print(f"  payload: {escape(_short(state.payload, 100))}")

    steps = Table(title="steps", title_justify="left")
    for column in ("step", "participant", "status", "attempts", "output", "error"):
        steps.add_column(column, overflow="fold")
    for step in state.steps:
        attempts = str(step.attempt) + (f" (+{step.comp_attempt} comp.)" if step.comp_attempt else "")
        steps.add_row(
            escape(step.name),
            escape(definition.by_name[step.name].participant),
            _styled(step.status.value, _STEP_STYLE),
            attempts,
            escape(_short(step.output, 40)),
            escape(_short(step.error, 50)),
        )
    console.print(steps)

    timeline = Table(title="time line (log records)", title_justify="left")
    for column in ("seq", "time", "+ms", "event", "details", "epoch"):
        timeline.add_column(column, overflow="fold", justify="right" if column in ("seq", "+ms", "epoch") else "left")
    for entry in view.history:
        event = escape(entry.event_type) + (" [red](rejected)[/]" if entry.rejected else "")
        detail = escape(_short(entry.rejected, 70)) if entry.rejected else escape(_event_detail(entry))
        timeline.add_row(
            "" if entry.seq is None else str(entry.seq),
            _clock(entry.timestamp_ms),
            str(entry.timestamp_ms - state.started_ms),
            event,
            detail,
            "" if entry.epoch is None else str(entry.epoch),
        )
    console.print(timeline)


# --- history ----------------------------------------------------------------------------------


@cli.command("history", cls=QueryCommand)
@click.argument("saga_id", metavar="ID")
@json_option
@_common_options
def history_command(
    saga_id: str,
    as_json: bool,
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
) -> None:
    """Show the raw log records of a saga (position, sequence, epoch, writer, event), oldest first."""
    from rich.markup import escape
    from rich.table import Table

    with _read_model(bootstrap_servers, topic_prefix, state_dir, client_settings) as model:
        entries = model.history(saga_id)
    if as_json:
        _emit_json([entry.as_json() for entry in entries])
        return
    table = Table(title=f"log records of saga {escape(saga_id)}", title_justify="left")
    for column in ("partition", "offset", "seq", "epoch", "time", "writer", "event", "fields"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        fields = json.dumps(entry.event, separators=(",", ":")) if entry.event else ""
        if entry.rejected:
            fields = f"[red]rejected: {escape(entry.rejected)}[/] " + escape(fields)
        else:
            fields = escape(fields)
        table.add_row(
            str(entry.partition),
            str(entry.offset),
            "" if entry.seq is None else str(entry.seq),
            "" if entry.epoch is None else str(entry.epoch),
            _clock(entry.timestamp_ms),
            escape(entry.writer or ""),
            escape(entry.event_type),
            fields,
        )
    _console().print(table)


# --- list -------------------------------------------------------------------------------------


@cli.command("list", cls=QueryCommand)
@click.option("--status", type=click.Choice(STATUSES, case_sensitive=False), default=None, help="Only sagas in this status.")
@click.option("--type", "saga_type", default=None, metavar="TYPE", help="Only sagas of this type.")
@click.option(
    "--limit", type=click.IntRange(min=0), default=50, show_default=True, help="At most this many, newest first (0: all)."
)
@json_option
@_common_options
def list_command(
    status: str | None,
    saga_type: str | None,
    limit: int,
    as_json: bool,
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
) -> None:
    """List sagas, newest first, with their status and current step(s)."""
    from rich.markup import escape
    from rich.table import Table

    from sagalog.records import SagaStatus

    wanted = SagaStatus(status.upper()) if status else None
    with _read_model(bootstrap_servers, topic_prefix, state_dir, client_settings) as model:
        sagas = model.list_sagas(status=wanted, saga_type=saga_type, limit=limit or None)
        matching = model.count(status=wanted, saga_type=saga_type)
        counts = model.counts_by_status()
    if as_json:
        _emit_json([s.as_json() for s in sagas])
        return
    table = Table()
    for column in ("id", "type", "status", "current step(s)", "started", "took", "reason"):
        table.add_column(column, overflow="fold")
    for s in sagas:
        table.add_row(
            escape(s.saga_id),
            escape(s.saga_type),
            _styled(s.status.value, _STATUS_STYLE),
            escape(", ".join(s.current)),
            _date(s.started_ms),
            _duration(s.updated_ms - s.started_ms) if s.status.terminal else "",
            escape(_short(s.reason, 50)),
        )
    console = _console()
    if sagas:
        console.print(table)
    summary = ", ".join(f"{n} {st.value.lower()}" for st, n in counts.items() if n) or "no sagas"
    console.print(f"{len(sagas)} of {matching} matching shown; in the log: {summary}")


# --- cancel -----------------------------------------------------------------------------------


@cli.command("cancel", cls=QueryCommand)
@click.argument("saga_id", metavar="ID")
@click.option("--reason", default="cancelled by operator", show_default=True, help="Recorded as the abort reason.")
@_common_options
def cancel_command(
    saga_id: str,
    reason: str,
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
) -> None:
    """Ask the managers to cancel a running saga: it compensates its completed steps and ends ABORTED."""
    from sagalog.errors import ConfigError
    from sagalog.records import CancelSaga, SagaStatus

    with _read_model(bootstrap_servers, topic_prefix, state_dir, client_settings) as model:
        state = model.get(saga_id)
        if state.status.terminal:
            raise ConfigError(f"saga {saga_id!r} has already finished ({state.status.value}); nothing to cancel")
        if state.status is SagaStatus.COMPENSATING:
            raise ConfigError(f"saga {saga_id!r} is already being compensated ({state.reason}); nothing to cancel")
        request = CancelSaga(saga_id=saga_id, reason=reason, requested_ms=int(time.time() * 1000))
        _produce(model, saga_id, model.codec.encode(request), "cancel request")
    click.echo(f"cancel requested for saga {saga_id}; follow it with: saga status {saga_id}")
