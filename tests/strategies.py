"""Hypothesis strategies for every record of the saga log, and for legal saga histories.

Two families:

* **Records** (:data:`RECORDS`, :data:`EVENTS`, :func:`records`): any value the Avro schemas can
  carry, field by field, at the schemas' own ranges (Avro ``int`` is 32-bit, ``long`` 64-bit),
  unicode strings, optional fields present or absent. They exercise the codec; they are not
  meant to make sense as sagas.
* **Histories** (:func:`saga_definitions`, :func:`saga_histories`, :func:`partition_logs`): a
  random saga definition (a DAG of 1-5 steps) driven through a random but *legal* run with
  :func:`sagalog.fold.begin` and :func:`sagalog.fold.apply`, the way a manager would: steps
  begin once their dependencies succeeded, succeed, fail, time out and retry; the saga is
  cancelled or aborts on a failure and compensates in reverse dependency order until
  ``SagaAborted``, or ends with ``SagaEnded``. A compensation may stop in an incident, which an
  operator retries or resolves (or a late success ends). Each record carries the snapshot after
  its event.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import strategies as st

from sagalog import definition as registry
from sagalog.definition import RetryPolicy, SagaDefinition, StepDefinition, definition_id
from sagalog.fold import NEEDS_COMPENSATION, SagaState, apply, begin, definition_record
from sagalog.records import (
    EVENT_TYPES,
    TOP_LEVEL,
    Action,
    CancelSaga,
    CompensationBegun,
    CompensationEnded,
    DeadLetter,
    Event,
    Incident,
    IncidentAction,
    IncidentOpened,
    IncidentResolved,
    IncidentRetried,
    OperatorAction,
    ParticipantCommand,
    ParticipantReply,
    PartitionClaim,
    ReplyOutcome,
    SagaAborted,
    SagaAborting,
    SagaBegun,
    SagaDefinitionRecord,
    SagaEnded,
    SagaLogRecord,
    SagaSnapshot,
    SagaStatus,
    StartSaga,
    StepBegun,
    StepEnded,
    StepOutcome,
    StepSnapshot,
    StepStatus,
)

# --- primitives at the Avro ranges -----------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
#: Unicode without lone surrogates (they are not valid UTF-8, so no Avro string can hold them).
TEXT = st.text(max_size=40)
OPT_TEXT = st.none() | TEXT
OPT_BYTES = st.none() | st.binary(max_size=64)
#: Identifier-like unicode (saga ids, owners): non-empty, any script.
IDS = st.text(min_size=1, max_size=24)
#: Names allowed by the definition model (``sagalog.definition.NAME``).
NAMES = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)
#: Wall-clock milliseconds around now (2020..2030), for the history driver.
EPOCH_MS = st.integers(1_577_836_800_000, 1_893_456_000_000)

_json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=12)
JSON_VALUES = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
#: A JSON document as text (payloads, outputs), unicode kept as is.
JSON_TEXT = JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False, sort_keys=True))
OPT_JSON_TEXT = st.none() | JSON_TEXT

# --- events ----------------------------------------------------------------------------------

EVENTS: dict[type, st.SearchStrategy[Any]] = {
    SagaBegun: st.builds(SagaBegun, saga_type=TEXT, definition_version=INT32),
    StepBegun: st.builds(
        StepBegun, step=TEXT, attempt=INT32, dispatch_at_ms=INT64, deadline_ms=INT64, last_error=OPT_TEXT
    ),
    StepEnded: st.builds(
        StepEnded, step=TEXT, outcome=st.sampled_from(StepOutcome), output=OPT_TEXT, error=OPT_TEXT
    ),
    SagaAborting: st.builds(SagaAborting, reason=TEXT, failed_step=OPT_TEXT),
    CompensationBegun: st.builds(
        CompensationBegun,
        step=TEXT,
        attempt=INT32,
        dispatch_at_ms=INT64,
        deadline_ms=INT64,
        last_error=OPT_TEXT,
    ),
    CompensationEnded: st.builds(CompensationEnded, step=TEXT, output=OPT_TEXT),
    SagaAborted: st.builds(SagaAborted, reason=TEXT),
    SagaEnded: st.builds(SagaEnded),
    IncidentOpened: st.builds(IncidentOpened, step=TEXT, reason=TEXT, attempts=INT32),
    IncidentRetried: st.builds(IncidentRetried, step=TEXT, operator=TEXT, reason=TEXT),
    IncidentResolved: st.builds(IncidentResolved, step=TEXT, operator=TEXT, reason=TEXT),
}
assert set(EVENTS) == set(EVENT_TYPES.values()), "a new event type needs a strategy"


def events() -> st.SearchStrategy[Event]:
    return st.one_of(*EVENTS.values())


step_snapshots = st.builds(
    StepSnapshot,
    name=TEXT,
    status=st.sampled_from(StepStatus),
    attempt=INT32,
    comp_attempt=INT32,
    comp_budget_from=INT32,
    dispatch_at_ms=INT64,
    deadline_ms=INT64,
    output=OPT_TEXT,
    error=OPT_TEXT,
)
incidents = st.builds(Incident, step=TEXT, reason=TEXT, opened_ms=INT64, attempts=INT32)
saga_snapshots = st.builds(
    SagaSnapshot,
    saga_type=TEXT,
    definition=TEXT,
    definition_id=TEXT,
    payload=TEXT,
    status=st.sampled_from(SagaStatus),
    steps=st.lists(step_snapshots, max_size=5).map(tuple),
    reason=OPT_TEXT,
    incidents=st.lists(incidents, max_size=3).map(tuple),
    started_ms=INT64,
    updated_ms=INT64,
)

# --- top-level records -----------------------------------------------------------------------

RECORDS: dict[type, st.SearchStrategy[Any]] = {
    SagaLogRecord: st.builds(
        SagaLogRecord,
        saga_id=TEXT,
        seq=INT64,
        epoch=INT64,
        timestamp_ms=INT64,
        event=events(),
        snapshot=saga_snapshots,
        writer=OPT_TEXT,
        events_before=st.lists(events(), max_size=3).map(tuple),
    ),
    PartitionClaim: st.builds(PartitionClaim, partition=INT32, epoch=INT64, owner=TEXT, timestamp_ms=INT64),
    # Any text as the definition, but always under its own hash: the codec refuses any other id.
    SagaDefinitionRecord: st.builds(
        lambda text, **fields: SagaDefinitionRecord(definition_id=definition_id(text), definition=text, **fields),
        st.one_of(TEXT, st.deferred(lambda: saga_definitions()).map(lambda d: d.canonical_json)),
        saga_type=TEXT,
        version=INT32,
        timestamp_ms=INT64,
        writer=OPT_TEXT,
    ),
    StartSaga: st.builds(StartSaga, saga_id=TEXT, saga_type=TEXT, payload=TEXT, requested_ms=INT64),
    CancelSaga: st.builds(CancelSaga, saga_id=TEXT, reason=TEXT, requested_ms=INT64),
    OperatorAction: st.builds(
        OperatorAction,
        saga_id=TEXT,
        action=st.sampled_from(IncidentAction),
        step=TEXT,
        operator=TEXT,
        reason=TEXT,
        requested_ms=INT64,
    ),
    ParticipantCommand: st.builds(
        ParticipantCommand,
        command_id=TEXT,
        saga_id=TEXT,
        saga_type=TEXT,
        step=TEXT,
        action=st.sampled_from(Action),
        attempt=INT32,
        epoch=INT64,
        payload=TEXT,
        outputs=TEXT,
        reply_topic=TEXT,
        reply_partition=INT32,
        deadline_ms=INT64,
        issued_ms=INT64,
    ),
    ParticipantReply: st.builds(
        ParticipantReply,
        command_id=TEXT,
        saga_id=TEXT,
        step=TEXT,
        action=st.sampled_from(Action),
        attempt=INT32,
        epoch=INT64,
        outcome=st.sampled_from(ReplyOutcome),
        output=OPT_TEXT,
        error=OPT_TEXT,
        participant=TEXT,
        replied_ms=INT64,
    ),
    DeadLetter: st.builds(
        DeadLetter,
        source_topic=TEXT,
        source_partition=INT32,
        source_offset=INT64,
        key=OPT_BYTES,
        value=OPT_BYTES,
        reason=TEXT,
        error_type=TEXT,
        component=TEXT,
        dead_lettered_ms=INT64,
    ),
}
assert set(RECORDS) == set(TOP_LEVEL), "a new top-level record needs a strategy"


def records() -> st.SearchStrategy[Any]:
    """Any top-level record: random field values, or a record of a legal saga history."""
    return st.one_of(*RECORDS.values(), saga_histories().flatmap(st.sampled_from))


# --- saga definitions ------------------------------------------------------------------------


@st.composite
def saga_definitions(draw: st.DrawFn, min_steps: int = 1, max_steps: int = 5) -> SagaDefinition:
    """A definition whose steps form a random DAG: each step depends on earlier steps only."""
    n = draw(st.integers(min_steps, max_steps))
    names = draw(st.lists(NAMES, min_size=n, max_size=n, unique=True))
    steps = []
    for i, name in enumerate(names):
        if i == 0:
            depends_on = draw(st.sampled_from([None, ()]))
        else:
            explicit = st.lists(st.sampled_from(names[:i]), unique=True, max_size=i).map(tuple)
            depends_on = draw(st.none() | explicit)  # None: after the previous step
        steps.append(
            StepDefinition(
                name=name,
                participant=draw(NAMES),
                compensable=draw(st.integers(0, 4)) > 0,  # mostly compensable
                timeout_s=draw(st.sampled_from([0.05, 0.5, 2.0, 30.0])),
                retry=RetryPolicy(attempts=draw(st.integers(1, 3))),
                depends_on=depends_on,
            )
        )
    # A small compensation budget now and then, so that budgets run out (None: the default, 10).
    budget = draw(st.none() | st.integers(1, 3))
    attempts = {} if budget is None else {"attempts": budget}
    compensation_retry = RetryPolicy(backoff_initial_s=0.2, backoff_max_s=30.0, **attempts)
    return SagaDefinition(
        name=draw(NAMES), version=draw(st.integers(1, 9)), steps=tuple(steps), compensation_retry=compensation_retry
    )


# --- legal saga histories --------------------------------------------------------------------


def _needs_compensation(state: SagaState, definition: SagaDefinition, name: str, in_flight_too: bool) -> bool:
    """Must this step be compensated before the saga may end aborted?

    The fold requires it for every compensable step that may have had an effect (succeeded, timed
    out, or in flight). A non-compensable step in flight at the abort may be waited for (what the
    manager does: its end is recorded) or compensated anyway (also legal): ``in_flight_too`` picks
    one per saga.
    """
    step = state.step(name)
    if step.status not in NEEDS_COMPENSATION or step.status is StepStatus.COMPENSATING:
        return False
    return definition.by_name[name].compensable or (in_flight_too and step.status is StepStatus.RUNNING)


@st.composite
def saga_histories(
    draw: st.DrawFn,
    definitions: st.SearchStrategy[SagaDefinition] | None = None,
    saga_id: str | None = None,
    max_comp_attempts: int = 3,
) -> list[SagaLogRecord]:
    """The records of one saga, from ``SagaBegun`` to ``SagaEnded`` or ``SagaAborted``.

    Built with ``begin`` and ``apply`` only, so every record is what a correct writer produces:
    events numbered 1, 2, 3, ..., one or several to a record (one decision); an epoch that only
    grows (a new owner took over); the snapshot after the record's last event. Compensation starts with the steps that no other step waiting for compensation
    depends on (reverse dependency order); independent compensations interleave.
    """
    definition = draw(definitions if definitions is not None else saga_definitions())
    sid = saga_id if saga_id is not None else draw(IDS)
    writer = draw(st.none() | IDS)
    now = draw(EPOCH_MS)
    epoch = draw(st.integers(0, 2**40))
    in_flight_too = draw(st.booleans())
    first, state = begin(sid, definition, draw(JSON_TEXT), now, epoch)
    history = [
        SagaLogRecord(
            saga_id=sid,
            seq=1,
            epoch=epoch,
            timestamp_ms=now,
            event=first,
            snapshot=state.snapshot(),
            writer=writer,
        )
    ]

    def emit(make: Any) -> None:
        nonlocal state, now, epoch
        # Sometimes the same decision as the event before: one record holds both (same time and epoch).
        merge = draw(st.integers(0, 2)) == 0
        if not merge:
            now += draw(st.integers(0, 10_000))
            if draw(st.integers(0, 9)) == 9:
                epoch += draw(st.integers(1, 3))  # another manager took the partition over
        event = make(now)
        state = apply(state, event, now, epoch)
        before = history.pop().events if merge else ()
        history.append(
            SagaLogRecord(
                saga_id=sid,
                seq=state.seq,
                epoch=epoch,
                timestamp_ms=now,
                event=event,
                events_before=before,
                snapshot=state.snapshot(),
                writer=writer,
            )
        )

    def begin_step(name: str, last_error: str | None) -> Any:
        step, spec = state.step(name), definition.by_name[name]
        attempt = step.attempt + 1
        delay = spec.retry.delay_ms(attempt, f"{sid}/{name}") if attempt > 1 else 0
        return lambda now: StepBegun(
            step=name,
            attempt=attempt,
            dispatch_at_ms=now + delay,
            deadline_ms=now + delay + int(spec.timeout_s * 1000),
            last_error=last_error,
        )

    def begin_compensation(name: str, last_error: str | None) -> Any:
        step, spec = state.step(name), definition.by_name[name]
        attempt = step.comp_attempt + 1
        delay = definition.compensation_retry.delay_ms(attempt, f"{sid}/{name}/c") if attempt > 1 else 0
        return lambda now: CompensationBegun(
            step=name,
            attempt=attempt,
            dispatch_at_ms=now + delay,
            deadline_ms=now + delay + int(spec.timeout_s * 1000),
            last_error=last_error,
        )

    while not state.status.terminal:
        steps = {s.name: s for s in state.steps}
        moves: list[tuple[str, Any]] = []
        if state.status is SagaStatus.RUNNING:
            failed = [n for n, s in steps.items() if s.status in (StepStatus.FAILED, StepStatus.TIMED_OUT)]
            if failed:
                moves.append(("abort", failed[0]))
            elif all(s.status is StepStatus.SUCCEEDED for s in steps.values()):
                moves.append(("end", None))
            else:
                for n, s in steps.items():
                    if s.status is StepStatus.PENDING and all(
                        steps[d].status is StepStatus.SUCCEEDED for d in definition.dependencies(n)
                    ):
                        moves.append(("begin", n))
                    elif s.status is StepStatus.RUNNING:
                        moves.append(("reply", n))
                if draw(st.integers(0, 11)) == 11:
                    moves = [("cancel", None)]
        else:  # COMPENSATING
            to_compensate = {n for n in steps if _needs_compensation(state, definition, n, in_flight_too)}
            compensating = [n for n, s in steps.items() if s.status is StepStatus.COMPENSATING]
            for n in sorted(to_compensate):
                waiting = [d for d in definition.dependents[n] if d in to_compensate or d in compensating]
                if not waiting:
                    moves.append(("compensate", n))
            for n in compensating:
                moves.append(("compensated", n))  # in incident too: a late success ends it
                if state.incident(n) is None:
                    if steps[n].comp_attempt < max_comp_attempts:
                        moves.append(("compensate_retry", n))
                    moves.append(("incident", n))
                else:  # an operator's answer; retries stop once attempts run out, so histories end
                    if steps[n].comp_attempt < max_comp_attempts:
                        moves.append(("retry_incident", n))
                    moves.append(("resolve_incident", n))
            # A non-compensable step still in flight: its end is recorded before the saga may end.
            in_flight = [n for n, s in steps.items() if s.status is StepStatus.RUNNING and n not in to_compensate]
            for n in in_flight:
                moves.append(("end_in_flight", n))
            if not to_compensate and not compensating and not in_flight:
                moves.append(("aborted", None))
        assert moves, f"history driver stuck at {state!r}"
        kind, name = draw(st.sampled_from(moves))
        if kind == "reply":  # the outcome of a running attempt: mostly success (shrinks towards it)
            roll = draw(st.integers(0, 9))
            last = state.step(name).attempt >= definition.by_name[name].retry.attempts
            kind = "succeed" if roll < 7 else "fail" if roll == 7 else "time_out" if last else "retry"
        if kind == "begin":
            emit(begin_step(name, None))
        elif kind == "retry":
            emit(begin_step(name, draw(st.sampled_from(["timed out", "RETRYABLE_ERROR: "]) | TEXT)))
        elif kind == "succeed":
            output = draw(JSON_TEXT)
            emit(
                lambda now, name=name, output=output: StepEnded(
                    step=name, outcome=StepOutcome.SUCCEEDED, output=output
                )
            )
        elif kind == "fail":
            error = draw(TEXT)
            emit(
                lambda now, name=name, error=error: StepEnded(
                    step=name, outcome=StepOutcome.FAILED, error=error
                )
            )
        elif kind == "end_in_flight":
            emit(lambda now, name=name: StepEnded(step=name, outcome=StepOutcome.SUCCEEDED, output="{}"))
        elif kind == "time_out":
            emit(lambda now, name=name: StepEnded(step=name, outcome=StepOutcome.TIMED_OUT, error="no reply"))
        elif kind == "abort":
            reason = draw(TEXT)
            emit(lambda now, name=name, reason=reason: SagaAborting(reason=reason, failed_step=name))
        elif kind == "cancel":
            reason = draw(TEXT)
            emit(lambda now, reason=reason: SagaAborting(reason=reason))
        elif kind == "end":
            emit(lambda now: SagaEnded())
        elif kind == "compensate":
            emit(begin_compensation(name, None))
        elif kind == "compensate_retry":
            emit(begin_compensation(name, draw(TEXT)))
        elif kind == "incident":
            reason, attempts = draw(TEXT), state.step(name).comp_attempt
            emit(lambda now, name=name, reason=reason, attempts=attempts: IncidentOpened(
                step=name, reason=reason, attempts=attempts))
        elif kind == "retry_incident":
            operator, reason = draw(IDS), draw(TEXT)
            emit(lambda now, name=name, operator=operator, reason=reason: IncidentRetried(
                step=name, operator=operator, reason=reason))
            emit(begin_compensation(name, reason))
        elif kind == "resolve_incident":
            operator, reason = draw(IDS), draw(TEXT)
            emit(lambda now, name=name, operator=operator, reason=reason: IncidentResolved(
                step=name, operator=operator, reason=reason))
        elif kind == "compensated":
            output = draw(OPT_JSON_TEXT)
            emit(lambda now, name=name, output=output: CompensationEnded(step=name, output=output))
        elif kind == "aborted":
            reason = state.reason or ""
            emit(lambda now, reason=reason: SagaAborted(reason=reason))
    return history


# --- a partition of the log ------------------------------------------------------------------

#: One message of a log partition: (key, value); value None is a tombstone.
Message = tuple[bytes, SagaLogRecord | PartitionClaim | SagaDefinitionRecord | None]


@st.composite
def partition_logs(draw: st.DrawFn, max_sagas: int = 4, partition: int = 0) -> list[Message]:
    """Several sagas' histories interleaved on one partition, as the log holds them.

    Ownership changes at random points: a ``PartitionClaim`` with the next epoch, after which
    every record carries that epoch (the records' epochs are rewritten to the partition's; the
    epoch is not part of the snapshot). Finished sagas are sometimes tombstoned later on. As a
    manager does, the definition record a saga pins goes first, unless the partition has it.
    """
    n = draw(st.integers(1, max_sagas))
    saga_ids = IDS.filter(lambda i: not i.startswith(("__claim__/", "__definition__/")))  # they share the partition
    ids = draw(st.lists(saga_ids, min_size=n, max_size=n, unique=True))
    histories = [list(draw(saga_histories(saga_id=i))) for i in ids]
    pending = [h for h in histories if h]
    epoch = draw(st.integers(0, 1000))
    out: list[Message] = []
    if draw(st.booleans()):
        out.append(
            (
                PartitionClaim.key(partition),
                PartitionClaim(partition=partition, epoch=epoch, owner="m0", timestamp_ms=0),
            )
        )
    tombstones: list[bytes] = []
    definitions: set[str] = set()  # on the partition so far
    while pending or tombstones:
        roll = draw(st.integers(0, 19))
        if roll == 19:
            epoch += 1
            claim = PartitionClaim(partition=partition, epoch=epoch, owner=f"m{epoch}", timestamp_ms=epoch)
            out.append((PartitionClaim.key(partition), claim))
        elif tombstones and (roll == 18 or not pending):
            out.append((tombstones.pop(0), None))
        elif pending:
            history = draw(st.sampled_from(pending))
            record = history.pop(0).model_copy(update={"epoch": epoch})
            pinned = record.snapshot.definition_id
            if pinned and pinned not in definitions:
                definitions.add(pinned)
                out.append((SagaDefinitionRecord.key(pinned), definition_record(SagaState.from_record(record), 0, f"m{epoch}")))
            out.append((record.saga_id.encode(), record))
            if not history:
                pending.remove(history)
                if draw(st.booleans()):
                    tombstones.append(record.saga_id.encode())
    return out


# --- the process's registry of pinned definitions --------------------------------------------


@contextmanager
def a_fresh_process() -> Iterator[None]:
    """The registry of pinned definitions (:func:`sagalog.definition.pin`) as a process has it that
    has read no definition record and begun no saga: it is process-wide, and the histories above
    filled it. Restored afterwards."""
    saved = dict(registry._PINNED), dict(registry._MODELS)
    registry._PINNED.clear()
    registry._MODELS.clear()
    try:
        yield
    finally:
        registry._PINNED.clear()
        registry._MODELS.clear()
        registry._PINNED.update(saved[0])
        registry._MODELS.update(saved[1])
