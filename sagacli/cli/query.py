"""``saga start|status|history|list|cancel|retry|resolve``: start sagas, look at them, act on them.

Every command goes through :class:`sagalog.client.SagaClient`, the API services use too: queries
answer from the read model (:mod:`sagalog.readmodel`), a local SQLite cache of the saga log caught
up from the log at each call, so no manager needs to be running to answer; starting, cancelling
and answering an incident (``retry``, ``resolve``) produce a request to ``<prefix>.inbox`` keyed
by saga id, which the manager owning that partition picks up. ``saga start --from FILE`` starts
many sagas with one flush.

Exit codes: 0 success; 2 a user mistake (unknown saga or type, bad payload, invalid flags);
3 the broker is unavailable; with ``--wait``: 4 the saga was ABORTED, 5 timed out waiting.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sagacli.cli import cli
from sagacli.cli.common import OneLineCommand, bootstrap_option, import_kafka_client, prefix_option

if TYPE_CHECKING:
    from rich.console import Console

    from sagalog.client import SagaClient, SagaRequest, SagaTimeout, Started
    from sagalog.definition import DefinitionSet
    from sagalog.fold import SagaState
    from sagalog.readmodel import HistoryEntry, SagaView

EXIT_ABORTED = 4
EXIT_TIMEOUT = 5
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
def _client(
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
    definitions: DefinitionSet | None = None,
) -> Iterator[SagaClient]:
    import_kafka_client()
    from sagacli.cli.topics import topics_for
    from sagalog.client import SagaClient
    from sagalog.kafka import parse_overrides

    _quiet_librdkafka()
    topics_for(topic_prefix)  # a bad prefix, reported with the flag's name
    overrides = parse_overrides(client_settings)
    with SagaClient(
        bootstrap_servers,
        topic_prefix=topic_prefix,
        definitions=definitions,
        overrides=overrides,
        state_dir=state_dir,
        timeout_s=5.0,
    ) as client:
        yield client
        if client.staleness:
            click.echo(f"warning: {client.staleness}", err=True)


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
    from sagacli.cli.manager import default_definitions
    from sagalog.definition import DefinitionSet

    return DefinitionSet.load(list(paths) or default_definitions())


def _payload(payload: str | None, payload_file: Path | None) -> Any:
    from sagalog.errors import ConfigError

    source = "--payload"
    if payload_file is not None:
        source = f"--payload-file {payload_file}"
        try:
            payload = sys.stdin.read() if str(payload_file) == "-" else payload_file.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read {source}: {err.strerror or err}") from err
    if payload is None:
        return {}
    try:
        return json.loads(payload)
    except ValueError as err:
        raise ConfigError(
            f"{source} is not valid JSON ({err}); quote it for the shell, e.g. --payload '{{\"amount\": 250}}'"
        ) from err


def _with_hint(err: Exception, definitions: tuple[Path, ...], payload_flags: str | None) -> str:
    """The client's message about a request, plus which flag fixes it."""
    from sagalog.client import InvalidPayload, UnknownSagaType

    if isinstance(err, UnknownSagaType) and "known types" in str(err):
        where = ", ".join(map(str, definitions)) if definitions else "the example definitions"
        return f"{err} (from {where}; pass --definitions to use others)"
    if isinstance(err, InvalidPayload) and payload_flags:
        return f"{err}; fix the JSON given with {payload_flags}"
    return str(err)


@cli.command("start", cls=QueryCommand)
@click.argument("saga_type", metavar="TYPE", required=False)
@click.option("--payload", default=None, metavar="JSON", help="The saga's input as JSON (default: {}).")
@click.option(
    "--payload-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the payload from this JSON file ('-': standard input).",
)
@click.option("--id", "saga_id", default=None, help="Saga id (default: TYPE-<random>); starting an id twice is refused.")
@click.option(
    "--from",
    "from_file",
    default=None,
    metavar="FILE",
    help='Start many sagas at once: JSON lines {"type": T, "payload": {...}, "id": optional} (\'-\': standard '
    "input). Every line is checked before any saga is started.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Block until the saga(s) end: exit 0 all COMPLETED, 4 one ABORTED, 5 one not ended in time.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --wait: give up after this many seconds (default 60; with --from, for all of them).",
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
    saga_type: str | None,
    payload: str | None,
    payload_file: Path | None,
    saga_id: str | None,
    from_file: str | None,
    wait: bool,
    timeout: float | None,
    definitions: tuple[Path, ...],
    as_json: bool,
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
) -> None:
    """Start a saga of type TYPE (or many, --from FILE); with --wait, block until it ends and print the outcome.

    The type and payload are checked against the saga definitions first (the managers check
    them again). Example: saga start book-trip --payload '{"flight": "SK-101", "travellers": 2}' --wait
    """
    from sagalog.client import InvalidPayload, InvalidSagaId, SagaTimeout, UnknownSagaType
    from sagalog.errors import ConfigError

    if timeout is not None and not wait:
        raise click.UsageError("--timeout only applies with --wait")
    if from_file is not None:
        if saga_type is not None or payload is not None or payload_file is not None or saga_id is not None:
            raise click.UsageError(
                "--from FILE names the type, payload and id of each saga on its lines: "
                "pass no TYPE, --payload, --payload-file or --id with it"
            )
        _start_many(
            from_file, wait, timeout, definitions, as_json, bootstrap_servers, topic_prefix, state_dir, client_settings
        )
        return
    if saga_type is None:
        raise click.UsageError("missing argument 'TYPE' (or --from FILE to start many sagas)")
    if payload is not None and payload_file is not None:
        raise click.UsageError("pass the payload with --payload or with --payload-file, not both")
    defs = _load_definitions(definitions)
    value = _payload(payload, payload_file)

    with _client(bootstrap_servers, topic_prefix, state_dir, client_settings, defs) as client:
        try:
            started = client.start(saga_type, value, saga_id=saga_id)
        except InvalidSagaId as err:
            raise ConfigError(f"--id {err}") from err
        except (UnknownSagaType, InvalidPayload) as err:
            raise ConfigError(_with_hint(err, definitions, "--payload / --payload-file")) from err
        begun = time.monotonic()
        if not wait:
            if as_json:
                _emit_json({**started.as_json(), "status": None})
            else:
                click.echo(f"started saga {started.saga_id} ({saga_type}); follow it with: saga status {started.saga_id}")
            return
        limit = 60.0 if timeout is None else timeout
        if not as_json:
            click.echo(f"started saga {started.saga_id} ({saga_type}); waiting up to {limit:g} s for it to end", err=True)
        try:
            state: SagaState | None = client.wait(started.saga_id, limit).state
            timed_out: SagaTimeout | None = None
        except SagaTimeout as err:
            state, timed_out = err.state, err
        elapsed = time.monotonic() - begun
    _report_outcome(started, state, timed_out, elapsed, as_json)


def _report_outcome(
    started: Started, state: SagaState | None, timed_out: SagaTimeout | None, elapsed: float, as_json: bool
) -> None:
    status = state.status.value if state is not None else None
    if as_json:
        _emit_json(
            {
                **started.as_json(),
                "status": status,
                "reason": state.reason if state is not None else None,
                "timed_out": timed_out is not None,
                "elapsed_s": round(elapsed, 3),
            }
        )
    elif timed_out is not None:
        click.secho(f"error: {timed_out}", fg="red", err=True)
    else:
        assert state is not None
        _print_end(state)
    if timed_out is not None:
        sys.exit(EXIT_TIMEOUT)
    if status == "ABORTED":
        sys.exit(EXIT_ABORTED)


def _print_end(state: SagaState) -> None:
    took = _duration(state.updated_ms - state.started_ms)
    if state.status.value == "COMPLETED":
        click.secho(f"saga {state.saga_id} COMPLETED in {took}", fg="green")
    else:
        click.secho(f"saga {state.saga_id} ABORTED after {took}: {state.reason}", fg="red")


def _read_lines(source: str) -> list[str]:
    from sagalog.errors import ConfigError

    try:
        return (sys.stdin.read() if source == "-" else Path(source).read_text()).splitlines()
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise ConfigError(f"cannot read --from {source}: {why}") from err


_LINE_KEYS = ("type", "payload", "id")


def _requests_from(
    source: str, lines: list[str], client: SagaClient, definitions: tuple[Path, ...]
) -> list[tuple[int, SagaRequest]]:
    """Every non-blank line as a checked request with its line number; the first bad line raises."""
    from sagalog.client import SagaRequest
    from sagalog.errors import ConfigError

    example = '{"type": "book-trip", "payload": {"travellers": 2}, "id": "optional"}'
    out: list[tuple[int, SagaRequest]] = []
    ids: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--from {source} line {number}"
        try:
            item = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"{where}: not valid JSON ({err}); each line is one saga, e.g. {example}") from err
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a JSON object, e.g. {example}")
        unknown = sorted(set(item) - set(_LINE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a line has 'type', 'payload' and 'id'")
        if not isinstance(item.get("type"), str):
            raise ConfigError(f"{where}: 'type' (the saga type, a string) is missing, e.g. {example}")
        saga_id = item.get("id")
        if saga_id is not None and not isinstance(saga_id, str):
            raise ConfigError(f"{where}: 'id' must be a string (or left out for a fresh one)")
        if saga_id is not None and saga_id in ids:
            raise ConfigError(f"{where}: saga id {saga_id!r} is on line {ids[saga_id]} already; each saga needs its own id")
        request = SagaRequest(item["type"], item.get("payload"), saga_id)
        try:
            client.validate(request)
        except ConfigError as err:
            raise ConfigError(f"{where}: {_with_hint(err, definitions, None)}") from err
        if saga_id is not None:
            ids[saga_id] = number
        out.append((number, request))
    if not out:
        raise ConfigError(f"--from {source} names no saga: write one JSON object per line, e.g. {example}")
    return out


def _start_many(
    source: str,
    wait: bool,
    timeout: float | None,
    definitions: tuple[Path, ...],
    as_json: bool,
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
) -> None:
    """``saga start --from FILE``: check every line, start them all (one flush), optionally wait."""
    from sagalog.client import SagaExists, SagaTimeout
    from sagalog.errors import ConfigError

    lines = _read_lines(source)
    defs = _load_definitions(definitions)
    with _client(bootstrap_servers, topic_prefix, state_dir, client_settings, defs) as client:
        numbered = _requests_from(source, lines, client, definitions)
        try:
            started = client.start_many(request for _, request in numbered)
        except SagaExists as err:
            line = next(n for n, r in numbered if r.saga_id == err.saga_id)
            raise ConfigError(f"--from {source} line {line}: {err}") from err
        if not wait:
            if as_json:
                _emit_json([s.as_json() for s in started])
            else:
                click.echo(f"started {len(started)} sagas from {source}; follow them with: saga list")
            return
        limit = 60.0 if timeout is None else timeout
        if not as_json:
            click.echo(f"started {len(started)} sagas from {source}; waiting up to {limit:g} s for them to end", err=True)
        outcomes = list(client.wait_all((s.saga_id for s in started), limit))
    rows = []
    for s, outcome in zip(started, outcomes, strict=True):
        state = outcome.state
        rows.append(
            {
                **s.as_json(),
                "status": None if state is None else state.status.value,
                "reason": None if state is None else state.reason,
                "timed_out": isinstance(outcome, SagaTimeout),
            }
        )
    timed_out = sum(1 for r in rows if r["timed_out"])
    aborted = sum(1 for r in rows if r["status"] == "ABORTED" and not r["timed_out"])
    if as_json:
        _emit_json(rows)
    else:
        for outcome in outcomes:
            if isinstance(outcome, SagaTimeout):
                click.secho(f"error: {outcome}", fg="red", err=True)
            elif not outcome.completed:
                _print_end(outcome.state)
        completed = len(rows) - aborted - timed_out
        summary = f"{len(rows)} sagas: {completed} COMPLETED, {aborted} ABORTED"
        if timed_out:
            summary += f", {timed_out} not ended after {limit:g} s"
        click.secho(summary, fg="green" if completed == len(rows) else "red")
    if timed_out:
        sys.exit(EXIT_TIMEOUT)
    if aborted:
        sys.exit(EXIT_ABORTED)


# --- status -----------------------------------------------------------------------------------
#
# ``saga status`` shows the saga from what the read model stores (JSON: ``SagaView.snapshot`` and
# ``definition_data``), never from pydantic models: a fresh process then imports neither pydantic
# nor the codec when the log has nothing new for the saga's partition (tests/test_cli_startup.py).

_TERMINAL = ("COMPLETED", "ABORTED")


def _view_json(view: SagaView) -> dict[str, Any]:
    state = view.snapshot
    steps = {s["name"]: s for s in view.definition_data["steps"]}
    dependencies = view.dependencies()
    return {
        "saga_id": state["saga_id"],
        "saga_type": state["saga_type"],
        "definition_version": view.definition_data["version"],
        "definition_id": view.definition_id,
        "status": state["status"],
        "reason": state.get("reason"),
        "incidents": [_incident_json(state["saga_id"], incident) for incident in state.get("incidents", ())],
        "current_steps": list(view.current),
        "partition": view.partition,
        "owner": None
        if view.claim is None
        else {"instance": view.claim.owner, "epoch": view.claim.epoch, "claimed_ms": view.claim.claimed_ms},
        "seq": state["seq"],
        "epoch": state["epoch"],
        "started_ms": state["started_ms"],
        "updated_ms": state["updated_ms"],
        "payload": _parse_json(state["payload"]),
        "steps": [
            {
                "name": step["name"],
                "participant": steps[step["name"]]["participant"],
                "depends_on": list(dependencies[step["name"]]),
                "status": step["status"],
                "attempts": step.get("attempt", 0),
                "compensation_attempts": step.get("comp_attempt", 0),
                "deadline_ms": step.get("deadline_ms") or None,
                "output": _parse_json(step.get("output")),
                "error": step.get("error"),
            }
            for step in state["steps"]
        ],
        "history": [entry.as_json() for entry in view.history],
    }


def _incident_json(saga_id: str, incident: dict[str, Any]) -> dict[str, Any]:
    """An open incident (the snapshot's JSON of :class:`sagalog.records.Incident`) and the two
    commands that end it."""
    return {
        "step": incident["step"],
        "reason": incident["reason"],
        "opened_ms": incident["opened_ms"],
        "attempts": incident["attempts"],
        "commands": _incident_commands(saga_id, incident["step"]),
    }


def _incident_commands(saga_id: str, step: str) -> list[str]:
    """The two ways out of an incident, as command lines to paste."""
    return [
        f"saga retry {saga_id} --step {step} --reason '...'",
        f"saga resolve {saga_id} --step {step} --as-compensated --reason '...'",
    ]


def _event_detail(entry: HistoryEntry) -> str:
    event = entry.event
    parts: list[str] = []
    if "step" in event:
        parts.append(str(event["step"]))
    if event.get("operator"):
        parts.append(f"by {event['operator']}")
    if "attempt" in event:
        parts.append(f"attempt {event['attempt']}")
    if "attempts" in event:
        parts.append(f"after {event['attempts']} attempts")
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
    with _client(bootstrap_servers, topic_prefix, state_dir, client_settings) as client:
        view = client.view(saga_id)
    if as_json:
        _emit_json(_view_json(view))
        return
    _print_view(view)


def _print_view(view: SagaView) -> None:
    """The saga as aligned plain text (``kubectl get`` style): no table library on this path.

    ``saga status`` is the command people run in a loop and from scripts; rich's import and first
    render cost ~0.1 s of a fresh process, more than the rest of the query, so this view is
    printed with click (already loaded), which also drops the colours when not on a terminal."""
    state = view.snapshot
    steps_by_name = {s["name"]: s for s in state["steps"]}
    participants = {s["name"]: s["participant"] for s in view.definition_data["steps"]}
    took = _duration(state["updated_ms"] - state["started_ms"])
    lines = [
        f"{click.style('saga ' + state['saga_id'], bold=True)}  {state['saga_type']} "
        f"v{view.definition_data['version']}  {_colour(state['status'], _STATUS_STYLE)}"
    ]
    timing = f"started {_date(state['started_ms'])}, last change {_clock(state['updated_ms'])}"
    lines.append(f"  {timing} ({'took' if state['status'] in _TERMINAL else 'running for'} {took})")
    owner = f", owner {view.claim.owner} (epoch {view.claim.epoch})" if view.claim else ", no owner claimed yet"
    lines.append(f"  log partition {view.partition}{owner}")
    lines.append(f"  definition {view.definition_id} ({state['saga_type']} v{view.definition_data['version']}, pinned at start)")
    if state.get("reason"):
        lines.append(f"  reason: {state['reason']}")
    incidents = state.get("incidents", ())
    for incident in incidents:
        lines.extend(_incident_lines(state["saga_id"], incident))
    if view.current:
        current = ", ".join(
            f"{name} ({steps_by_name[name]['status'].lower()}, attempt {_attempt_now(steps_by_name[name])})"
            for name in view.current
        )
        lines.append(f"  current step(s): {current}")
    lines.append(f"  payload: {_short(state['payload'], 100)}")

    incident_steps = {i["step"] for i in incidents}
    step_rows: list[list[Cell]] = []
    for step in state["steps"]:
        comp_attempt = step.get("comp_attempt", 0)
        attempts = str(step.get("attempt", 0)) + (f" (+{comp_attempt} comp.)" if comp_attempt else "")
        status = step["status"] + (" (incident)" if step["name"] in incident_steps else "")
        step_rows.append([
            step["name"],
            participants[step["name"]],
            (status, _STEP_STYLE.get(step["status"], "")),
            attempts,
            _short(step.get("output"), 40),
            _short(step.get("error"), 50),
        ])  # fmt: skip
    lines += ["", "steps", *_columns(("step", "participant", "status", "attempts", "output", "error"), step_rows)]

    history_rows: list[list[Cell]] = [
        [
            "" if entry.seq is None else str(entry.seq),
            _clock(entry.timestamp_ms),
            str(entry.timestamp_ms - state["started_ms"]),
            (entry.event_type + " (rejected)", "red") if entry.rejected else entry.event_type,
            _short(entry.rejected, 70) if entry.rejected else _event_detail(entry),
            "" if entry.epoch is None else str(entry.epoch),
        ]
        for entry in view.history
    ]
    headers = ("seq", "time", "+ms", "event", "details", "epoch")
    lines += ["", "time line (log records)", *_columns(headers, history_rows, right={0, 2, 5})]
    click.echo("\n".join(lines))


#: A table cell: its text, or (text, style) with a style of ``_STATUS_STYLE``'s kind.
Cell = str | tuple[str, str]


def _colour(text: str, styles: dict[str, str] | str) -> str:
    """``text`` in a rich-like style ("bold red", "dim", "cyan"), as ANSI codes through click."""
    style = styles if isinstance(styles, str) else styles.get(text, "")
    words = style.split()
    colour = next((w for w in words if w not in ("bold", "dim")), None)
    return click.style(text, fg=colour, bold="bold" in words or None, dim="dim" in words or None) if words else text


def _columns(headers: tuple[str, ...], rows: list[list[Cell]], right: Collection[int] = ()) -> list[str]:
    """Left-aligned columns (right-aligned where ``right`` says), two spaces apart, headers in
    capitals; widths count the text, not the colour codes."""
    table = [[(cell, "") if isinstance(cell, str) else cell for cell in row] for row in rows]
    heading = [(h.upper(), "bold") for h in headers]
    widths = [max(len(row[i][0]) for row in [heading, *table]) for i in range(len(headers))]

    def line(row: list[tuple[str, str]]) -> str:
        cells = []
        for i, (text, style) in enumerate(row):
            pad = " " * (widths[i] - len(text))
            cells.append(pad + _colour(text, style) if i in right else _colour(text, style) + pad)
        return "  ".join(cells).rstrip()

    return [line(row) for row in [heading, *table]]


def _attempt_now(step: dict[str, Any]) -> int:
    """The attempt a current step is at: its compensation's while compensating."""
    return int(step.get("comp_attempt", 0) if step["status"] == "COMPENSATING" else step.get("attempt", 0))


def _incident_lines(saga_id: str, incident: dict[str, Any]) -> list[str]:
    """An open incident, so that nobody misses it: what, since when, and the two ways out."""
    since = _duration(max(0, int(time.time() * 1000) - incident["opened_ms"]))
    attempts = f"{incident['attempts']} compensation attempt{'s' if incident['attempts'] != 1 else ''}"
    retry, resolve = _incident_commands(saga_id, incident["step"])
    return [
        f"  {_colour('INCIDENT', 'bold red')} on step {click.style(incident['step'], bold=True)}: its compensation "
        f"waits for an operator (since {_date(incident['opened_ms'])}, {since} ago; after {attempts})",
        f"    reason: {incident['reason']}",
        f"    try it again (a new retry budget):  {retry}",
        f"    it was undone by hand:              {resolve}",
    ]


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

    with _client(bootstrap_servers, topic_prefix, state_dir, client_settings) as client:
        entries = client.history(saga_id)
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
        elif entry.event.get("operator"):  # an operator's action: who and why first
            who = f"[bold]operator {escape(str(entry.event['operator']))}[/]: {escape(str(entry.event.get('reason')))} "
            fields = who + escape(fields)
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
    "--incidents", "with_incident", is_flag=True, help="Only sagas with an open incident (waiting for an operator)."
)
@click.option(
    "--limit", type=click.IntRange(min=0), default=50, show_default=True, help="At most this many, newest first (0: all)."
)
@json_option
@_common_options
def list_command(
    status: str | None,
    saga_type: str | None,
    with_incident: bool,
    limit: int,
    as_json: bool,
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
) -> None:
    """List sagas, newest first, with their status, current step(s) and any open incident."""
    from rich.markup import escape
    from rich.table import Table

    with _client(bootstrap_servers, topic_prefix, state_dir, client_settings) as client:
        sagas = client.list(status=status, saga_type=saga_type, limit=limit, with_incident=with_incident)
        matching = client.count(status=status, saga_type=saga_type, with_incident=with_incident)
        counts = client.counts()
        in_incident = client.count(with_incident=True)
    if as_json:
        _emit_json([s.as_json() for s in sagas])
        return
    table = Table()
    columns = ["id", "type", "status", "current step(s)", "started", "took", "reason"]
    show_incidents = any(s.incidents for s in sagas)
    if show_incidents:
        columns.append("incident")
    for column in columns:
        table.add_column(column, overflow="fold")
    for s in sagas:
        row = [
            escape(s.saga_id),
            escape(s.saga_type),
            _styled(s.status.value, _STATUS_STYLE),
            escape(", ".join(s.current)),
            _date(s.started_ms),
            _duration(s.updated_ms - s.started_ms) if s.status.terminal else "",
            escape(_short(s.reason, 50)),
        ]
        if show_incidents:
            row.append(
                "; ".join(f"[bold red]{escape(i.step)}[/]: {escape(_short(i.reason, 50))}" for i in s.incidents)
            )
        table.add_row(*row)
    console = _console()
    if sagas:
        console.print(table)
    summary = ", ".join(f"{n} {st.value.lower()}" for st, n in counts.items() if n) or "no sagas"
    console.print(f"{len(sagas)} of {matching} matching shown; in the log: {summary}")
    if in_incident and not with_incident:
        console.print(
            f"[bold red]{in_incident} saga{'s' if in_incident != 1 else ''} with an open incident[/] "
            f"(waiting for an operator): saga list --incidents"
        )


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
    with _client(bootstrap_servers, topic_prefix, state_dir, client_settings) as client:
        client.cancel(saga_id, reason=reason)
    click.echo(f"cancel requested for saga {saga_id}; follow it with: saga status {saga_id}")


# --- incidents: retry, resolve ----------------------------------------------------------------

_operator_option = click.option(
    "--operator",
    default=None,
    metavar="NAME",
    help="Who acts, recorded on the log (default: your OS user name).",
)


@cli.command("retry", cls=QueryCommand)
@click.argument("saga_id", metavar="ID")
@click.option("--step", default=None, metavar="STEP", help="The step in incident (needed only if the saga has several).")
@_operator_option
@click.option("--reason", default="retried by operator", show_default=True, help="Why, recorded on the log.")
@_common_options
def retry_command(
    saga_id: str,
    step: str | None,
    operator: str | None,
    reason: str,
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
) -> None:
    """Try a compensation in incident again now: the incident closes, a new retry budget starts.

    Refused for a saga without an open incident (for that step) and for a finished one.
    Example: saga retry order-42 --reason "the ledger is back"
    """
    with _client(bootstrap_servers, topic_prefix, state_dir, client_settings) as client:
        sent = client.retry(saga_id, step=step, operator=operator, reason=reason)
    click.echo(
        f"retry of step {sent.step} requested for saga {saga_id} (by {sent.operator}); "
        f"follow it with: saga status {saga_id}"
    )


@cli.command("resolve", cls=QueryCommand)
@click.argument("saga_id", metavar="ID")
@click.option("--step", required=True, metavar="STEP", help="The step whose compensation is in incident.")
@click.option(
    "--as-compensated",
    "as_compensated",
    is_flag=True,
    help="Say that the step's effect was undone by hand: it becomes COMPENSATED (required: the only resolution).",
)
@click.option("--reason", required=True, help="How it was undone (a ticket, a refund id...), recorded on the log.")
@_operator_option
@_common_options
def resolve_command(
    saga_id: str,
    step: str,
    as_compensated: bool,
    reason: str,
    operator: str | None,
    bootstrap_servers: str,
    topic_prefix: str,
    state_dir: Path | None,
    client_settings: tuple[str, ...],
) -> None:
    """Close an incident by hand: the step's effect was undone outside the saga, so the step becomes
    COMPENSATED and the saga goes on (typically to ABORTED once nothing else is left).

    Refused unless the step's compensation is in incident, and for a finished saga.
    Example: saga resolve order-42 --step charge --as-compensated --reason "refunded by hand, ticket 981"
    """
    if not as_compensated:
        raise click.UsageError(
            "say how the incident was resolved: --as-compensated (the step's effect was undone by hand)"
        )
    with _client(bootstrap_servers, topic_prefix, state_dir, client_settings) as client:
        sent = client.resolve(saga_id, step, operator=operator, reason=reason)
    click.echo(
        f"step {step} of saga {saga_id} resolved as compensated (by {sent.operator}); "
        f"follow it with: saga status {saga_id}"
    )
