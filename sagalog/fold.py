"""The saga state machine: the transition tables, ``apply`` and ``evolve``, and the partition fold.

This module is the one place that says which state changes are legal. Both tables are data,
so that docs and tests can enumerate them:

* :data:`SAGA_TRANSITIONS`: (saga status, event type) -> saga status
* :data:`STEP_TRANSITIONS`: (step status, step event) -> step status

Incidents (a compensation that stopped retrying and waits for an operator) are an overlay on a
COMPENSATING step, kept in the snapshot's ``incidents``: ``IncidentOpened`` adds one,
``IncidentRetried`` and ``IncidentResolved`` (an operator's) close it, and so does the
compensation's own success. :func:`operator_action_refusal` says which operator actions a state
allows, for the manager and for clients alike.

``apply(state, event)`` is the pure transition a writer uses to compute the next snapshot;
``evolve(state, record)`` is what a reader uses: it checks that the record follows (same saga,
next sequence number, no stale epoch, a row in the tables) and then applies it. A record that
does not follow raises a :class:`FoldError` and leaves the state as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagalog.definition import (
    SagaDefinition,
    definition_from_json,
    pin,
    pin_definition,
    pinned_definition,
    pinned_json,
)
from sagalog.errors import (
    DecodeError,
    DefinitionMissing,
    FoldError,
    IllegalTransition,
    SequenceGap,
    SequenceRepeat,
    StaleEpoch,
    WrongSaga,
)
from sagalog.records import (
    CLAIM_KEY_PREFIX,
    DEFINITION_KEY_PREFIX,
    CompensationBegun,
    CompensationEnded,
    Event,
    Incident,
    IncidentAction,
    IncidentOpened,
    IncidentResolved,
    IncidentRetried,
    PartitionClaim,
    SagaAborted,
    SagaAborting,
    SagaBegun,
    SagaDefinitionRecord,
    SagaEnded,
    SagaLogRecord,
    SagaSnapshot,
    SagaStatus,
    StepBegun,
    StepEnded,
    StepOutcome,
    StepSnapshot,
    StepStatus,
    trusted,
)

if TYPE_CHECKING:
    from sagalog.peek import Peeked

S, T = SagaStatus, StepStatus

#: (saga status before, event type) -> saga status after. ``None``: no saga yet.
SAGA_TRANSITIONS: dict[tuple[SagaStatus | None, type], SagaStatus] = {
    (None, SagaBegun): S.RUNNING,
    (S.RUNNING, StepBegun): S.RUNNING,
    (S.RUNNING, StepEnded): S.RUNNING,
    (S.RUNNING, SagaEnded): S.COMPLETED,
    (S.RUNNING, SagaAborting): S.COMPENSATING,
    # Only a non-compensable step can still be in flight while compensating: its end is recorded.
    (S.COMPENSATING, StepEnded): S.COMPENSATING,
    (S.COMPENSATING, CompensationBegun): S.COMPENSATING,
    (S.COMPENSATING, CompensationEnded): S.COMPENSATING,
    (S.COMPENSATING, SagaAborted): S.ABORTED,
    # Incidents exist only while compensating: only a compensation stops for an operator.
    (S.COMPENSATING, IncidentOpened): S.COMPENSATING,
    (S.COMPENSATING, IncidentRetried): S.COMPENSATING,
    (S.COMPENSATING, IncidentResolved): S.COMPENSATING,
}

#: (step status before, step event) -> step status after. A step event is the event type, or
#: (StepEnded, outcome) for the end of Ti.
STEP_TRANSITIONS: dict[tuple[StepStatus, Any], StepStatus] = {
    (T.PENDING, StepBegun): T.RUNNING,
    (T.RUNNING, StepBegun): T.RUNNING,  # a retry: attempt + 1
    (T.RUNNING, (StepEnded, StepOutcome.SUCCEEDED)): T.SUCCEEDED,
    (T.RUNNING, (StepEnded, StepOutcome.FAILED)): T.FAILED,
    (T.RUNNING, (StepEnded, StepOutcome.TIMED_OUT)): T.TIMED_OUT,
    # Compensate whatever may have taken effect: done, timed out, or still in flight at abort.
    (T.SUCCEEDED, CompensationBegun): T.COMPENSATING,
    (T.TIMED_OUT, CompensationBegun): T.COMPENSATING,
    (T.RUNNING, CompensationBegun): T.COMPENSATING,
    (T.COMPENSATING, CompensationBegun): T.COMPENSATING,  # a retry: attempt + 1
    (T.COMPENSATING, CompensationEnded): T.COMPENSATED,
    # An incident stops the retries but not the compensation: the step stays COMPENSATING until
    # an operator retries it (and it succeeds) or says it was undone by hand.
    (T.COMPENSATING, IncidentOpened): T.COMPENSATING,
    (T.COMPENSATING, IncidentRetried): T.COMPENSATING,
    (T.COMPENSATING, IncidentResolved): T.COMPENSATED,
}

#: Steps whose effect may exist and so must be compensated when the saga aborts.
NEEDS_COMPENSATION = frozenset({T.SUCCEEDED, T.TIMED_OUT, T.RUNNING, T.COMPENSATING})


_SNAPSHOT_FIELDS = tuple(SagaSnapshot.model_fields)


class SagaState(SagaSnapshot):
    """A saga as the log says it is: the snapshot plus its id, sequence number and epoch."""

    saga_id: str
    seq: int
    epoch: int

    @property
    def definition_model(self) -> SagaDefinition:
        """The pinned definition: inline (a saga begun before schema version 6) or by reference.
        Raises :class:`DefinitionMissing` if the reference is to a definition record this process
        has not read (the fold rejects such records, so a folded state always resolves)."""
        model = pinned_definition_of(self)
        if model is None:
            raise DefinitionMissing(self.definition_id, saga_id=self.saga_id, seq=self.seq, state_seq=self.seq)
        return model

    @property
    def definition_json(self) -> str:
        """The pinned definition's canonical JSON, inline or by reference (as :attr:`definition_model`)."""
        text = self.definition or pinned_json(self.definition_id)
        if text is None:
            raise DefinitionMissing(self.definition_id, saga_id=self.saga_id, seq=self.seq, state_seq=self.seq)
        return text

    def step(self, name: str) -> StepSnapshot:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def incident(self, step: str) -> Incident | None:
        """The open incident of this step's compensation, if any."""
        return next((i for i in self.incidents if i.step == step), None)

    def snapshot(self) -> SagaSnapshot:
        # The state's fields were validated (or built by the fold from validated events).
        return trusted(SagaSnapshot, {k: getattr(self, k) for k in _SNAPSHOT_FIELDS})

    @classmethod
    def from_record(cls, record: SagaLogRecord) -> SagaState:
        snap = record.snapshot
        return cls(
            **{k: getattr(snap, k) for k in _SNAPSHOT_FIELDS},
            saga_id=record.saga_id,
            seq=record.seq,
            epoch=record.epoch,
        )


#: The steps of a saga that has just begun, by definition: frozen values, so every saga of a type
#: shares one tuple until a step changes (a manager holds thousands of live sagas).
_PENDING_STEPS: dict[str, tuple[StepSnapshot, ...]] = {}


def _pending_steps(definition: SagaDefinition) -> tuple[StepSnapshot, ...]:
    steps = _PENDING_STEPS.get(definition.canonical_json)
    if steps is None:
        steps = tuple(StepSnapshot(name=s.name) for s in definition.steps)
        if len(_PENDING_STEPS) < 1000:
            _PENDING_STEPS[definition.canonical_json] = steps
    return steps


def begin(
    saga_id: str, definition: SagaDefinition, payload: str, now_ms: int, epoch: int
) -> tuple[SagaBegun, SagaState]:
    """The first event of a saga and the state it creates (seq 1). The saga pins its definition
    by id (the writer puts the definition's record on the partition first: :func:`definition_record`)."""
    state = SagaState(
        saga_id=saga_id,
        seq=1,
        epoch=epoch,
        saga_type=definition.name,
        definition="",
        definition_id=pin_definition(definition),
        payload=payload,
        status=S.RUNNING,
        steps=_pending_steps(definition),
        started_ms=now_ms,
        updated_ms=now_ms,
    )
    return SagaBegun(saga_type=definition.name, definition_version=definition.version), state


def definition_record(state: SagaState, now_ms: int, writer: str | None) -> SagaDefinitionRecord:
    """The record that puts a saga's pinned definition on its log partition (key
    :meth:`SagaDefinitionRecord.key` of its id), written before the saga's first record there."""
    model = state.definition_model
    return SagaDefinitionRecord(
        definition_id=state.definition_id,
        saga_type=model.name,
        version=model.version,
        definition=state.definition_json,
        timestamp_ms=now_ms,
        writer=writer,
    )


def pinned_definition_of(snapshot: SagaSnapshot) -> SagaDefinition | None:
    """A snapshot's pinned definition, inline or by reference; None if this process has not read
    the definition record it refers to."""
    if snapshot.definition:
        return definition_from_json(snapshot.definition)
    return pinned_definition(snapshot.definition_id)


def resolves(snapshot: SagaSnapshot) -> bool:
    """Whether this process can give the snapshot's pinned definition (inline, or a known id)."""
    return bool(snapshot.definition) or pinned_json(snapshot.definition_id) is not None


def _step_key(event: Event) -> Any:
    return (StepEnded, event.outcome) if isinstance(event, StepEnded) else type(event)


def _fail(state: SagaState, event: Event, why: str, seq: int | None = None) -> IllegalTransition:
    return IllegalTransition(
        f"{type(event).__name__} not allowed: {why}",
        saga_id=state.saga_id,
        seq=state.seq + 1 if seq is None else seq,
        state_seq=state.seq,
    )


def apply(state: SagaState, event: Event, now_ms: int, epoch: int) -> SagaState:
    """The state after ``event``; raises :class:`IllegalTransition` (state unchanged) if not allowed."""
    after = SAGA_TRANSITIONS.get((state.status, type(event)))
    if after is None:
        raise _fail(state, event, f"saga is {state.status.value}")
    steps = state.steps
    update: dict[str, Any] = {"status": after, "seq": state.seq + 1, "epoch": epoch, "updated_ms": now_ms}
    step_name = getattr(event, "step", None)
    if step_name is not None:
        index = next((i for i, s in enumerate(steps) if s.name == step_name), None)
        if index is None:
            raise _fail(state, event, f"saga has no step {step_name!r}")
        step = steps[index]
        step_after = STEP_TRANSITIONS.get((step.status, _step_key(event)))
        if step_after is None:
            raise _fail(state, event, f"step {step_name!r} is {step.status.value}")
        changes: dict[str, Any] = {"status": step_after}
        incident = state.incident(step_name)
        if isinstance(event, StepBegun):
            if event.attempt != step.attempt + 1:
                raise _fail(state, event, f"attempt {event.attempt} after attempt {step.attempt}")
            changes.update(
                attempt=event.attempt,
                dispatch_at_ms=event.dispatch_at_ms,
                deadline_ms=event.deadline_ms,
                error=event.last_error,
            )
        elif isinstance(event, CompensationBegun):
            if incident is not None:
                raise _fail(state, event, f"step {step_name!r} is in incident: an operator retries it first")
            if event.attempt != step.comp_attempt + 1:
                raise _fail(state, event, f"compensation attempt {event.attempt} after {step.comp_attempt}")
            changes.update(
                comp_attempt=event.attempt,
                dispatch_at_ms=event.dispatch_at_ms,
                deadline_ms=event.deadline_ms,
                error=event.last_error,
            )
        elif isinstance(event, StepEnded):
            changes.update(output=event.output, error=event.error)
        elif isinstance(event, CompensationEnded):
            changes.update(error=None)  # a success that comes late also ends the step's incident
        elif isinstance(event, IncidentOpened):
            if incident is not None:
                raise _fail(state, event, f"step {step_name!r} has an open incident already")
            if event.attempts != step.comp_attempt:
                raise _fail(state, event, f"{event.attempts} attempts, the step made {step.comp_attempt}")
            update["incidents"] = (
                *state.incidents,
                Incident(step=step_name, reason=event.reason, opened_ms=now_ms, attempts=event.attempts),
            )
        elif isinstance(event, IncidentRetried | IncidentResolved):
            if incident is None:
                raise _fail(state, event, f"step {step_name!r} has no open incident")
            if isinstance(event, IncidentRetried):
                changes.update(comp_budget_from=step.comp_attempt)  # a new budget from here
            else:
                changes.update(error=None)
        # A retry closes the incident; so does the step's end, whoever ends it (an operator's
        # resolve, or the participant's late success).
        if incident is not None and (isinstance(event, IncidentRetried) or step_after is T.COMPENSATED):
            update["incidents"] = tuple(i for i in state.incidents if i.step != step_name)
        update["steps"] = steps[:index] + (step.replace(**changes),) + steps[index + 1 :]
    elif isinstance(event, SagaEnded):
        if any(s.status is not T.SUCCEEDED for s in steps):
            raise _fail(state, event, "not every step has succeeded")
    elif isinstance(event, SagaAborting):
        update["reason"] = event.reason
    elif isinstance(event, SagaAborted):
        definition = state.definition_model
        open_steps = [
            s.name
            for s in steps
            if s.status in (T.RUNNING, T.COMPENSATING)
            or (s.status in NEEDS_COMPENSATION and definition.by_name[s.name].compensable)
        ]
        if open_steps:
            raise _fail(state, event, f"steps {open_steps} are not compensated yet")
        update["reason"] = event.reason
    return state.replace(**update)


def operator_action_refusal(state: SagaState, action: IncidentAction, step: str) -> str | None:
    """Why an operator's ``action`` on ``step`` cannot be taken in this state, or None if it can.

    The rule the manager applies (it dead-letters a refused action) and clients check first (they
    refuse before sending). A saga that has ended is not asked: the manager ignores actions for it.
    """
    try:
        status = state.step(step).status
    except KeyError:
        known = ", ".join(s.name for s in state.steps)
        return f"saga {state.saga_id} has no step {step!r} (its steps: {known})"
    if action is IncidentAction.RESOLVE_COMPENSATED and status is not T.COMPENSATING:
        return (
            f"step {step!r} of saga {state.saga_id} is {status.value}, not COMPENSATING: only a compensation "
            f"in incident can be resolved as compensated"
        )
    if state.incident(step) is None:
        open_steps = ", ".join(i.step for i in state.incidents)
        where = f"its open incidents are on: {open_steps}" if open_steps else "it has none"
        return f"saga {state.saga_id} has no open incident for step {step!r} ({where})"
    return None


def evolve(state: SagaState | None, record: SagaLogRecord, partition_epoch: int = 0) -> SagaState:
    """Fold one log record (one decision: one or more events) into a saga's state (``None``:
    nothing seen of this saga yet). The record applies whole or not at all.

    A saga seen for the first time at seq > 1 is one whose earlier records were compacted away or
    truncated: its snapshot is adopted as is (that is what the snapshot is for). A record whose
    pinned definition does not resolve (a reference to a definition record not read) raises
    :class:`DefinitionMissing`: nothing could run or show that saga.
    """
    first = record.first_seq
    if record.epoch < partition_epoch or (state is not None and record.epoch < state.epoch):
        seen = max(partition_epoch, state.epoch if state else 0)
        raise StaleEpoch(
            f"written at epoch {record.epoch} after epoch {seen} took over (a zombie's write)",
            saga_id=record.saga_id,
            seq=record.seq,
            state_seq=state.seq if state else None,
        )
    if not resolves(record.snapshot):
        raise DefinitionMissing(
            record.snapshot.definition_id, saga_id=record.saga_id, seq=record.seq, state_seq=state.seq if state else None
        )
    if state is None:
        if first == 1 and not isinstance(record.events[0], SagaBegun):
            raise IllegalTransition(
                f"{type(record.events[0]).__name__} as the first event of a saga",
                saga_id=record.saga_id,
                seq=first,
                state_seq=None,
            )
        return SagaState.from_record(record)
    if record.saga_id != state.saga_id:
        raise WrongSaga("record belongs to another saga", saga_id=state.saga_id, seq=record.seq, state_seq=state.seq)
    if first <= state.seq:
        raise SequenceRepeat("already applied", saga_id=state.saga_id, seq=record.seq, state_seq=state.seq)
    if first > state.seq + 1:
        raise SequenceGap("records missing in between", saga_id=state.saga_id, seq=record.seq, state_seq=state.seq)
    for seq, event in enumerate(record.events, start=first):
        if isinstance(event, SagaBegun):
            raise _fail(state, event, "saga has begun already", seq)
        state = apply(state, event, record.timestamp_ms, record.epoch)
    return state


def replay(records: Iterable[SagaLogRecord]) -> SagaState | None:
    """Fold one saga's records, strictly: the first error propagates."""
    state: SagaState | None = None
    for record in records:
        state = evolve(state, record)
    return state


@dataclass
class PartitionFold:
    """The state of every saga on one log partition, folded record by record.

    Bad records never stop the fold: they are counted (and kept in ``rejected`` with the reason)
    and the state stays as it was. A record after a sequence gap carries a full snapshot, so the
    saga is re-based on it (a gap can only come from truncation); the gap is still counted.
    Definition records are pinned in the process's registry (:func:`sagalog.definition.pin`) and
    their ids kept in ``definitions``; a saga record whose definition does not resolve is rejected
    (:class:`DefinitionMissing`).
    """

    partition: int = -1
    epoch: int = 0
    sagas: dict[str, SagaState] = field(default_factory=dict)
    #: Ids of the definition records on this partition (a writer adds a definition's record only
    #: if its id is not here).
    definitions: set[str] = field(default_factory=set)
    applied: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (offset, reason), the first ones
    rejected_count: int = 0
    max_rejected_kept: int = 1000
    #: Where a replay that built this fold stopped: the partition's end when it was read.
    next_offset: int = 0
    #: Sagas known to have ended without their state being built: saga id -> when the record
    #: that ended it was written (ms). Only :func:`fold_newest` with a ``peek`` fills it.
    finished: dict[str, int] = field(default_factory=dict)
    #: The highest epoch of any record in ``finished`` (a takeover claims above every epoch seen).
    finished_epoch: int = 0

    def apply(
        self,
        key: bytes | None,
        item: SagaLogRecord | PartitionClaim | SagaDefinitionRecord | DecodeError | None,
        offset: int,
    ) -> None:
        """Apply one decoded log message (``None``: a tombstone that removes a finished saga)."""
        if item is None:
            if key is not None and key.startswith(DEFINITION_KEY_PREFIX):
                # Never written by a manager; should someone do it, the partition lacks the record.
                self.definitions.discard(key[len(DEFINITION_KEY_PREFIX) :].decode("utf-8", "replace"))
            elif key is not None:
                self.sagas.pop(key.decode("utf-8", "replace"), None)
            return
        if isinstance(item, DecodeError):
            self._reject(offset, str(item))
        elif isinstance(item, PartitionClaim):
            self.epoch = max(self.epoch, item.epoch)
        elif isinstance(item, SagaDefinitionRecord):
            self._pin(item, offset)
        else:
            current = self.sagas.get(item.saga_id)
            try:
                self.sagas[item.saga_id] = evolve(current, item, self.epoch)
                self.applied += 1
            except SequenceGap as gap:
                self.sagas[item.saga_id] = SagaState.from_record(item)
                self.applied += 1
                self._reject(offset, str(gap))
            except FoldError as err:
                self._reject(offset, str(err))

    def _pin(self, record: SagaDefinitionRecord, offset: int) -> None:
        try:
            pin(record.definition, record.definition_id)
        except ValueError as err:  # the codec refuses these too; a record built in memory may not be
            self._reject(offset, f"definition record: {err}")
            return
        self.definitions.add(record.definition_id)

    def _reject(self, offset: int, reason: str) -> None:
        self.rejected_count += 1
        if len(self.rejected) < self.max_rejected_kept:
            self.rejected.append((offset, reason))

    def live(self) -> list[SagaState]:
        return [s for s in self.sagas.values() if not s.status.terminal]


def fold_newest(
    messages: list[tuple[bytes | None, bytes | None, int]],
    decode: Callable[[bytes], Any],
    partition: int = -1,
    peek: Callable[[bytes], Peeked | None] | None = None,
) -> PartitionFold:
    """The partition's sagas from each saga's newest acceptable record: a fast takeover replay.

    ``messages`` are the partition's raw (key, value, offset) in log order. Every record carries
    the saga's full snapshot, so the newest one is enough (that is what compaction leaves, and
    replaying it gives the same state as the whole history: a property test checks it). Only one
    record per saga is decoded instead of all of them. A newest record that does not decode, or
    was written at an epoch older than a claim before it (a zombie's), is rejected and the next
    older one is tried, as the full fold would. Definition records are decoded first (one per
    definition: the newest of its key); a saga whose definition still does not resolve is
    rejected (:class:`DefinitionMissing`) and not resumed: its older records pin the same one.

    With ``peek`` (:meth:`sagalog.peek.LogPeek.peek`), a saga whose newest record ends it is not
    decoded at all: it goes to ``finished`` with the record's timestamp. On a busy partition most
    sagas have ended, so a takeover builds the state only of those still running.
    """
    fold = PartitionFold(partition=partition)
    claims: list[tuple[int, int]] = []  # (offset, epoch), in log order
    by_key: dict[bytes | None, list[int]] = {}
    definitions: dict[bytes, int] = {}  # definition key -> index of its newest message
    for index, (key, value, offset) in enumerate(messages):
        if key is not None and key.startswith(CLAIM_KEY_PREFIX) and value is not None:
            try:
                claim = decode(value)
            except DecodeError as err:
                fold._reject(offset, str(err))
                continue
            if isinstance(claim, PartitionClaim):
                claims.append((offset, claim.epoch))
                fold.epoch = max(fold.epoch, claim.epoch)
            continue
        if key is not None and key.startswith(DEFINITION_KEY_PREFIX):
            definitions[key] = index
            continue
        by_key.setdefault(key, []).append(index)

    for index in definitions.values():
        _, value, offset = messages[index]
        if value is None:
            continue  # tombstoned (a manager never does it): not on the partition any more
        try:
            item = decode(value)
        except DecodeError as err:
            fold._reject(offset, str(err))
            continue
        if isinstance(item, SagaDefinitionRecord):
            fold._pin(item, offset)
        else:
            fold._reject(offset, f"{type(item).__name__} under a definition key")

    def epoch_before(offset: int) -> int:
        return max((epoch for at, epoch in claims if at < offset), default=0)

    for indexes in by_key.values():
        for index in reversed(indexes):
            key, value, offset = messages[index]
            if value is None:
                break  # tombstoned: the saga is gone
            peeked = peek(value) if peek is not None else None
            if peeked is not None and peeked.ends_saga and key is not None:
                if peeked.epoch < epoch_before(offset):
                    fold._reject(offset, f"saga {key.decode('utf-8', 'replace')}: written at epoch {peeked.epoch} after a newer claim (a zombie's write)")
                    continue
                fold.finished[key.decode("utf-8", "replace")] = peeked.timestamp_ms
                fold.finished_epoch = max(fold.finished_epoch, peeked.epoch)
                fold.applied += 1
                break
            try:
                record = decode(value)
            except DecodeError as err:
                fold._reject(offset, str(err))
                continue
            if not isinstance(record, SagaLogRecord):
                fold._reject(offset, f"{type(record).__name__} is not a saga log record")
                continue
            if record.epoch < epoch_before(offset):
                fold._reject(offset, f"saga {record.saga_id}: written at epoch {record.epoch} after a newer claim (a zombie's write)")
                continue
            if not resolves(record.snapshot):
                fold._reject(offset, str(DefinitionMissing(record.snapshot.definition_id, saga_id=record.saga_id, seq=record.seq)))
                break
            fold.sagas[record.saga_id] = SagaState.from_record(record)
            fold.applied += 1
            break
    return fold
