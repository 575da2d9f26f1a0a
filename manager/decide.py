"""What a manager does next for a saga: pure functions, no I/O, no clock, no randomness.

Every input (a start request, a participant reply, a cancel, the passing of time) goes through
one function here and comes out as a :class:`Decision`: the log records to append (write-ahead:
they are written before, and atomically with, the commands) and the commands to send.

The saga rules, in one place:

* Steps run when every step they depend on has succeeded (a DAG; sequential by default).
* A business failure, exhausted retries or a timeout on the last attempt aborts the saga.
* On abort every step that may have taken effect (succeeded, timed out, or still in flight) is
  compensated, a step only after every step that depends on it has settled: reverse dependency
  order. Steps that failed with a business failure changed nothing and are not compensated.
* Compensations are retried with backoff, up to the definition's ``compensation_retry.attempts``
  (a budget). Past it, or at once when the participant answers BUSINESS_FAILURE to a compensation
  (it cannot undo the step), the compensation becomes an **incident**: ``IncidentOpened`` on the
  log, no more attempts and no timer for that step, while everything else that can progress does.
* An operator ends an incident (``OperatorAction``): RETRY records ``IncidentRetried`` and sends
  the next attempt now, with a new budget; RESOLVE_COMPENSATED records ``IncidentResolved`` (the
  effect was undone by hand: the step is COMPENSATED) and the saga goes on, typically to ABORTED.
  An action the state does not allow is rejected (dead-lettered); one for an ended saga is ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

from sagalog.definition import DefinitionSet, SagaDefinition
from sagalog.errors import ConfigError
from sagalog.fold import NEEDS_COMPENSATION, SagaState, apply, begin, operator_action_refusal
from sagalog.records import (
    Action,
    CancelSaga,
    CompensationBegun,
    CompensationEnded,
    Event,
    IncidentAction,
    IncidentOpened,
    IncidentResolved,
    IncidentRetried,
    OperatorAction,
    ParticipantCommand,
    ParticipantReply,
    ReplyOutcome,
    SagaAborted,
    SagaAborting,
    SagaEnded,
    SagaLogRecord,
    SagaStatus,
    StartSaga,
    StepBegun,
    StepEnded,
    StepOutcome,
    StepStatus,
    is_saga_key,
    trusted,
)

T = StepStatus
#: A compensation whose dependents are in one of these has nothing left waiting on it.
SETTLED = frozenset({T.PENDING, T.FAILED, T.COMPENSATED})


@dataclass(frozen=True)
class Context:
    """Everything about the writer a decision needs: who, when, where replies go."""

    now_ms: int
    epoch: int
    reply_topic: str
    reply_partition: int
    writer: str | None = None


@dataclass
class Decision:
    """Events to log (in order) and commands to send, plus the state after the events.

    All of a decision's events go to the log as one record with the snapshot after the last
    (``records``): one message and one snapshot per input, however many steps it moves."""

    state: SagaState | None
    events: list[Event] = field(default_factory=list)
    commands: list[tuple[str, ParticipantCommand]] = field(default_factory=list)  # (participant, cmd)
    ignored: str | None = None  # why the input changed nothing (for logs and dead letters)
    reject: bool = False  # the input is malformed or foreign, not merely late: dead-letter it
    ctx: Context | None = None  # the writer's context the events were decided in

    @property
    def current(self) -> SagaState:
        """The state, for decisions about a saga that exists (every one but an ignored start)."""
        assert self.state is not None
        return self.state

    def record(self, event: Event, ctx: Context) -> None:
        """Apply ``event`` to the state and keep it for the decision's record."""
        assert self.state is not None
        self.state = apply(self.state, event, ctx.now_ms, ctx.epoch)
        self.events.append(event)
        self.ctx = ctx

    @cached_property
    def records(self) -> list[SagaLogRecord]:
        """The log record to append (none if nothing changed), built once the decision is made."""
        if not self.events:
            return []
        assert self.state is not None and self.ctx is not None
        return [_record(self.state, self.events, self.ctx)]


def _record(state: SagaState, events: list[Event], ctx: Context) -> SagaLogRecord:
    # Built from a validated state and events: not validated again (this runs for every record).
    fields = {
        "saga_id": state.saga_id,
        "seq": state.seq,
        "epoch": ctx.epoch,
        "timestamp_ms": ctx.now_ms,
        "event": events[-1],
        "snapshot": state.snapshot(),
        "writer": ctx.writer,
        "events_before": tuple(events[:-1]),
    }
    return trusted(SagaLogRecord, fields)


def ignore(state: SagaState | None, why: str) -> Decision:
    return Decision(state=state, ignored=why)


def reject(state: SagaState | None, why: str) -> Decision:
    return Decision(state=state, ignored=why, reject=True)


# --- inputs ---------------------------------------------------------------------------------


def on_inbox(
    state: SagaState | None,
    finished: bool,
    item: object,
    definitions: DefinitionSet,
    ctx: Context,
) -> Decision:
    """Everything that arrives on the inbox, for the saga its key names: the routing rules.

    ``state`` is the saga if it is live, ``finished`` whether it ended recently. Unknown saga
    types, payloads that are not JSON or break the definition's schema, replies and cancels for a
    saga nobody knows, and records that do not belong on the inbox are rejected (dead-lettered
    with the reason); late replies and cancels for a saga that has ended are ignored.
    """
    if isinstance(item, StartSaga):
        if not is_saga_key(item.saga_id.encode()):
            # Its records would be keyed like the partition's claims or definition records.
            return reject(state, f"saga id {item.saga_id!r} starts with a prefix the saga log reserves (__claim__/, __definition__/)")
        definition = definitions.get(item.saga_type)
        if definition is None:
            return reject(state, f"unknown saga type {item.saga_type!r} (known: {', '.join(definitions.names())})")
        try:
            definition.validate_payload(json.loads(item.payload))
        except ValueError as bad:
            return reject(state, f"payload is not JSON: {bad}")
        except ConfigError as bad:
            return reject(state, str(bad))
        return on_start(state, finished, item, definition, ctx)
    if not isinstance(item, ParticipantReply | CancelSaga | OperatorAction):
        return reject(state, f"{type(item).__name__} does not belong on the inbox")
    if state is None:
        if finished:
            return ignore(None, f"{type(item).__name__} for saga {item.saga_id}, which has ended")
        return reject(None, f"{type(item).__name__} for unknown saga {item.saga_id!r}")
    if isinstance(item, ParticipantReply):
        return on_reply(state, item, ctx)
    if isinstance(item, OperatorAction):
        return on_operator_action(state, item, ctx)
    return on_cancel(state, item.reason, ctx)


def on_start(existing: SagaState | None, finished: bool, request: StartSaga, definition: SagaDefinition, ctx: Context) -> Decision:
    """Begin a saga; a repeated start of the same id is ignored (the id makes starts idempotent)."""
    if existing is not None or finished:
        return ignore(existing, f"saga {request.saga_id} exists already (duplicate start)")
    event, state = begin(request.saga_id, definition, request.payload, ctx.now_ms, ctx.epoch)
    decision = Decision(state=state, events=[event], ctx=ctx)
    _advance(decision, ctx)
    return decision


def on_cancel(state: SagaState, reason: str, ctx: Context) -> Decision:
    if state.status is not SagaStatus.RUNNING:
        return ignore(state, f"saga {state.saga_id} is {state.status.value}, cancel has no effect")
    decision = Decision(state=state)
    decision.record(SagaAborting(reason=f"cancelled: {reason}"), ctx)
    _advance(decision, ctx)
    return decision


def on_reply(state: SagaState, reply: ParticipantReply, ctx: Context) -> Decision:
    """A participant's answer. Late, duplicate and stale replies change nothing."""
    try:
        step = state.step(reply.step)
    except KeyError:
        return reject(state, f"saga {state.saga_id} has no step {reply.step!r}")
    if reply.command_id != ParticipantCommand.make_id(state.saga_id, reply.step, reply.action):
        return reject(state, f"reply command id {reply.command_id!r} does not match its saga/step/action")
    if reply.outcome is ReplyOutcome.SUCCESS and reply.output is not None:
        try:
            json.loads(reply.output)
        except ValueError:
            return reject(state, f"reply {reply.command_id} has an output that is not JSON: {reply.output[:80]!r}")
    if reply.outcome is ReplyOutcome.REFUSED:
        return ignore(state, f"participant refused {reply.command_id}: {reply.error}")
    definition = state.definition_model
    decision = Decision(state=state)
    if reply.action is Action.EXECUTE and state.status is SagaStatus.COMPENSATING and step.status is T.RUNNING:
        # A non-compensable step was in flight when the saga aborted: record how it ended.
        outcome = StepOutcome.SUCCEEDED if reply.outcome is ReplyOutcome.SUCCESS else StepOutcome.FAILED
        decision.record(StepEnded(step=step.name, outcome=outcome, output=reply.output, error=reply.error), ctx)
    elif reply.action is Action.EXECUTE:
        if state.status is not SagaStatus.RUNNING or step.status is not T.RUNNING:
            return ignore(state, f"late or duplicate reply for {reply.command_id} (step is {step.status.value})")
        if reply.outcome is ReplyOutcome.SUCCESS:
            decision.record(StepEnded(step=step.name, outcome=StepOutcome.SUCCEEDED, output=reply.output), ctx)
        elif reply.outcome is ReplyOutcome.BUSINESS_FAILURE:
            decision.record(StepEnded(step=step.name, outcome=StepOutcome.FAILED, error=reply.error), ctx)
        else:  # RETRYABLE_ERROR: only the current attempt's error counts
            if reply.attempt != step.attempt:
                return ignore(state, f"retryable error from attempt {reply.attempt}, attempt {step.attempt} is in flight")
            policy = definition.by_name[step.name].retry
            if step.attempt >= policy.attempts:
                # This attempt changed nothing, but an earlier one may have timed out and still take
                # effect: with more than one attempt the outcome is unknown, so compensate it.
                outcome = StepOutcome.FAILED if step.attempt == 1 else StepOutcome.TIMED_OUT
                error = f"gave up after {step.attempt} attempts: {reply.error}"
                decision.record(StepEnded(step=step.name, outcome=outcome, error=error), ctx)
            else:
                decision.record(_retry_step(state, step.name, definition, reply.error or "retryable error", ctx), ctx)
    else:
        if step.status is not T.COMPENSATING:
            return ignore(state, f"late or duplicate reply for {reply.command_id} (step is {step.status.value})")
        if reply.outcome is ReplyOutcome.SUCCESS:
            # Also in incident: whichever attempt it answers, the step is undone (the incident closes).
            decision.record(CompensationEnded(step=step.name, output=reply.output), ctx)
        else:
            if reply.attempt != step.comp_attempt:
                return ignore(state, f"error from compensation attempt {reply.attempt}, {step.comp_attempt} is in flight")
            incident = state.incident(step.name)
            if incident is not None:
                return ignore(state, f"compensation of {step.name} is in incident ({incident.reason}): it waits for an operator")
            error = reply.error or "error"
            if reply.outcome is ReplyOutcome.BUSINESS_FAILURE:
                # The participant says it cannot undo the step: retrying would only repeat that.
                reason = f"participant cannot compensate {step.name}: {error}"
                decision.record(IncidentOpened(step=step.name, reason=reason, attempts=step.comp_attempt), ctx)
            else:
                decision.record(_retry_compensation_or_incident(state, step.name, definition, error, ctx), ctx)
    _advance(decision, ctx)
    return decision


def on_time(state: SagaState, ctx: Context) -> Decision:
    """Deadlines that passed: retry, give up (abort), or retry a compensation."""
    decision = Decision(state=state)
    definition = state.definition_model
    for step in state.steps:
        if step.deadline_ms > ctx.now_ms:
            continue
        current = decision.state
        assert current is not None
        if step.status is T.RUNNING and current.status is SagaStatus.COMPENSATING:
            # A non-compensable step in flight at abort: stop waiting for it on its deadline.
            why = f"no reply within {definition.by_name[step.name].timeout_s:g}s while the saga was aborting"
            decision.record(StepEnded(step=step.name, outcome=StepOutcome.TIMED_OUT, error=why), ctx)
        elif step.status is T.RUNNING and current.status is SagaStatus.RUNNING:
            timeout = definition.by_name[step.name].timeout_s
            why = f"no reply within {timeout:g}s (attempt {step.attempt})"
            if step.attempt >= definition.by_name[step.name].retry.attempts:
                decision.record(StepEnded(step=step.name, outcome=StepOutcome.TIMED_OUT, error=why), ctx)
            else:
                decision.record(_retry_step(current, step.name, definition, why, ctx), ctx)
        elif step.status is T.COMPENSATING and current.incident(step.name) is None:
            timeout = definition.by_name[step.name].timeout_s
            why = f"no reply to compensation within {timeout:g}s (attempt {step.comp_attempt})"
            decision.record(_retry_compensation_or_incident(current, step.name, definition, why, ctx), ctx)
    _advance(decision, ctx)
    return decision


def on_operator_action(state: SagaState, action: OperatorAction, ctx: Context) -> Decision:
    """An operator's answer to an open incident: retry the compensation now, or resolve it as
    compensated by hand. Who and why go on the log with it."""
    if state.status.terminal:
        return ignore(state, f"saga {state.saga_id} is {state.status.value}, {action.action.value} has no effect")
    if not action.operator.strip() or not action.reason.strip():
        return reject(state, f"{action.action.value} for saga {state.saga_id} does not say who asks and why (operator, reason)")
    refusal = operator_action_refusal(state, action.action, action.step)
    if refusal is not None:
        return reject(state, f"{action.action.value} refused: {refusal}")
    definition = state.definition_model
    decision = Decision(state=state)
    if action.action is IncidentAction.RETRY:
        incident = state.incident(action.step)
        assert incident is not None  # operator_action_refusal said so
        decision.record(IncidentRetried(step=action.step, operator=action.operator, reason=action.reason), ctx)
        # Now, not after a backoff: a human asked for it, likely after fixing the cause.
        spec = definition.by_name[action.step]
        attempt = decision.current.step(action.step).comp_attempt + 1
        begun = CompensationBegun(
            step=action.step,
            attempt=attempt,
            dispatch_at_ms=ctx.now_ms,
            deadline_ms=ctx.now_ms + int(spec.timeout_s * 1000),
            last_error=incident.reason,
        )
        decision.record(begun, ctx)
        decision.commands.append(_command(decision.current, definition, action.step, Action.COMPENSATE, attempt, begun.deadline_ms, ctx))
    else:
        decision.record(IncidentResolved(step=action.step, operator=action.operator, reason=action.reason), ctx)
    _advance(decision, ctx)
    return decision


def outstanding_commands(state: SagaState, ctx: Context) -> list[tuple[str, ParticipantCommand]]:
    """Every command the log says is in flight and due: what a new owner re-sends on takeover.
    A compensation in incident is not in flight: it waits for an operator."""
    return [command_for(state, step, action, attempt, ctx) for step, action, attempt in due_attempts(state, ctx.now_ms)]


def due_attempts(state: SagaState, now_ms: int) -> list[tuple[str, Action, int]]:
    """(step, action, attempt) of each command :func:`outstanding_commands` would build: cheap,
    for a writer that first checks which of them it has sent already."""
    out = []
    for step in state.steps:
        if step.dispatch_at_ms > now_ms:
            continue
        if step.status is T.RUNNING:
            out.append((step.name, Action.EXECUTE, step.attempt))
        elif step.status is T.COMPENSATING and state.incident(step.name) is None:
            out.append((step.name, Action.COMPENSATE, step.comp_attempt))
    return out


def command_for(state: SagaState, step: str, action: Action, attempt: int, ctx: Context) -> tuple[str, ParticipantCommand]:
    """The command of an attempt the log says is in flight: (participant, command)."""
    return _command(state, state.definition_model, step, action, attempt, state.step(step).deadline_ms, ctx)


def next_wakeup_ms(state: SagaState, now_ms: int) -> int | None:
    """When this saga next needs attention without any message: a delayed dispatch or a deadline.
    None for a saga that only waits for an operator (every compensation left is in incident)."""
    if state.status.terminal:
        return None
    times = [
        step.dispatch_at_ms if step.dispatch_at_ms > now_ms else step.deadline_ms
        for step in state.steps
        if step.status in (T.RUNNING, T.COMPENSATING) and state.incident(step.name) is None
    ]
    return min(times) if times else None


def resent_deadline_ms(state: SagaState, now_ms: int) -> int | None:
    """After a takeover re-sent a saga's in-flight commands (same attempt): the time before which
    none of its deadlines may fire, or None if every deadline is later anyway.

    A re-sent command gets the step's full timeout again: a deadline that passed while nobody
    owned the partition would otherwise fire as soon as the new owner has read the inbox, before
    the participant could answer. It may not even have seen the command yet: another partition's
    transaction, left open by a dead manager, holds read_committed readers of a command topic
    back until that partition's new owner fences it."""
    definition = state.definition_model
    until = None
    for step in state.steps:
        if step.dispatch_at_ms > now_ms or state.incident(step.name) is not None:
            continue
        if step.status is T.RUNNING or step.status is T.COMPENSATING:
            fresh = now_ms + int(definition.by_name[step.name].timeout_s * 1000)
            if step.deadline_ms < fresh:
                until = max(until or 0, fresh)
    return until


# --- the rules ------------------------------------------------------------------------------


def _advance(decision: Decision, ctx: Context) -> None:
    """Follow-up events after any change: start ready steps, abort, compensate, end."""
    state = decision.state
    assert state is not None
    definition = state.definition_model
    if state.status is SagaStatus.RUNNING:
        failed = next((s for s in state.steps if s.status in (T.FAILED, T.TIMED_OUT)), None)
        if failed is not None:
            decision.record(SagaAborting(reason=f"step {failed.name} {failed.status.value.lower()}: {failed.error}", failed_step=failed.name), ctx)
        elif all(s.status is T.SUCCEEDED for s in state.steps):
            decision.record(SagaEnded(), ctx)
            return
        else:
            for step in state.steps:
                if step.status is T.PENDING and all(
                    state.step(dep).status is T.SUCCEEDED for dep in definition.dependencies(step.name)
                ):
                    timeout_ms = int(definition.by_name[step.name].timeout_s * 1000)
                    event = StepBegun(step=step.name, attempt=1, dispatch_at_ms=ctx.now_ms, deadline_ms=ctx.now_ms + timeout_ms)
                    decision.record(event, ctx)
                    decision.commands.append(_command(decision.current, definition, step.name, Action.EXECUTE, 1, event.deadline_ms, ctx))
            return
    state = decision.current
    if state.status is not SagaStatus.COMPENSATING:
        return
    statuses = {s.name: s.status for s in state.steps}

    def settled(name: str) -> bool:
        """Nothing left to undo here. A non-compensable step is never undone, so it is settled
        when everything after it is: order holds through it."""
        if not definition.by_name[name].compensable:
            return statuses[name] is not T.RUNNING and all(settled(d) for d in definition.dependents[name])
        return statuses[name] in SETTLED

    pending = [
        s
        for s in state.steps
        if s.status in NEEDS_COMPENSATION and s.status is not T.COMPENSATING and definition.by_name[s.name].compensable
    ]
    for step in pending:
        if all(settled(d) for d in definition.dependents[step.name]):
            timeout_ms = int(definition.by_name[step.name].timeout_s * 1000)
            begun = CompensationBegun(step=step.name, attempt=1, dispatch_at_ms=ctx.now_ms, deadline_ms=ctx.now_ms + timeout_ms)
            decision.record(begun, ctx)
            decision.commands.append(_command(decision.current, definition, step.name, Action.COMPENSATE, 1, begun.deadline_ms, ctx))
    state = decision.current
    if not any(
        s.status in (T.RUNNING, T.COMPENSATING) or (s.status in NEEDS_COMPENSATION and definition.by_name[s.name].compensable)
        for s in state.steps
    ):
        decision.record(SagaAborted(reason=state.reason or "aborted"), ctx)


def _retry_step(state: SagaState, name: str, definition: SagaDefinition, why: str, ctx: Context) -> StepBegun:
    step = state.step(name)
    spec = definition.by_name[name]
    attempt = step.attempt + 1
    dispatch_at = ctx.now_ms + spec.retry.delay_ms(attempt, f"{state.saga_id}/{name}")
    return StepBegun(step=name, attempt=attempt, dispatch_at_ms=dispatch_at, deadline_ms=dispatch_at + int(spec.timeout_s * 1000), last_error=why)


def _retry_compensation_or_incident(
    state: SagaState, name: str, definition: SagaDefinition, why: str, ctx: Context
) -> CompensationBegun | IncidentOpened:
    """The next attempt of a compensation that did not succeed, or an incident once its budget
    (``compensation_retry.attempts`` since the budget began) is spent."""
    step = state.step(name)
    spent = step.comp_attempt - step.comp_budget_from
    if spent >= definition.compensation_retry.attempts:
        reason = f"compensation of {name} gave up after {spent} attempts: {why}"
        return IncidentOpened(step=name, reason=reason, attempts=step.comp_attempt)
    spec = definition.by_name[name]
    attempt = step.comp_attempt + 1
    delay = definition.compensation_retry.delay_ms(attempt, f"{state.saga_id}/{name}/c")
    dispatch_at = ctx.now_ms + delay
    return CompensationBegun(step=name, attempt=attempt, dispatch_at_ms=dispatch_at, deadline_ms=dispatch_at + int(spec.timeout_s * 1000), last_error=why)


def _command(state: SagaState, definition: SagaDefinition, step: str, action: Action, attempt: int, deadline_ms: int, ctx: Context) -> tuple[str, ParticipantCommand]:
    outputs = {s.name: json.loads(s.output) for s in state.steps if s.output is not None}
    fields = {
        "command_id": ParticipantCommand.make_id(state.saga_id, step, action),
        "saga_id": state.saga_id,
        "saga_type": state.saga_type,
        "step": step,
        "action": action,
        "attempt": attempt,
        "epoch": ctx.epoch,
        "payload": state.payload,
        "outputs": json.dumps(outputs, separators=(",", ":")) if outputs else "{}",
        "reply_topic": ctx.reply_topic,
        "reply_partition": ctx.reply_partition,
        "deadline_ms": deadline_ms,
        "issued_ms": ctx.now_ms,
    }
    return definition.by_name[step].participant, trusted(ParticipantCommand, fields)  # from validated values
