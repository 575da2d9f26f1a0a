"""The contract's rules, held to what the code does, without a broker.

* The decision table of docs/CONTRACT.md section 6 is parsed from the page and checked, row by
  row and in order (the first matching row wins), against the SDK's pure ``decide``, for every
  journal a participant can hold, including one with both an execute SUCCESS and a recorded
  compensation.
* The answer to a command the participant cannot act on (section 8: BUSINESS_FAILURE) comes
  only where the table says "run": stale epochs, replays and compensations with nothing to
  undo win over it.
* What section 4 says the manager does with each outcome of a reply is checked against the
  manager's own pure decisions (``manager.decide.on_reply``): a BUSINESS_FAILURE fails an
  execute now, whatever attempts are left, and turns a compensation into an incident at once;
  a compensation's RETRYABLE_ERROR is retried after its backoff; a REFUSED reply is ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from manager.decide import Context, on_reply, on_start
from participants import JournalEntry, Verdict, decide
from sagalog.definition import RetryPolicy, SagaDefinition, StepDefinition
from sagalog.fold import SagaState
from sagalog.records import (
    Action,
    CompensationBegun,
    IncidentOpened,
    ParticipantCommand,
    ParticipantReply,
    ReplyOutcome,
    SagaAborting,
    SagaStatus,
    StartSaga,
    StepEnded,
    StepOutcome,
    StepStatus,
)

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "CONTRACT.md"
EXECUTE, COMPENSATE = Action.EXECUTE, Action.COMPENSATE
SUCCESS, FAILURE = ReplyOutcome.SUCCESS, ReplyOutcome.BUSINESS_FAILURE

# --- section 6: the decision table, read from the page -----------------------------------------


def decision_table() -> list[tuple[str, str, str]]:
    """(journal, EXECUTE cell, COMPENSATE cell) of section 6's table, in the page's order."""
    text = CONTRACT.read_text()
    start = text.index("| journal for (saga, step) | EXECUTE | COMPENSATE |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((cells[0], cells[1], cells[2]))
    return rows


def entry(action: Action, outcome: ReplyOutcome) -> JournalEntry:
    return JournalEntry("s-1", "book", action, f"s-1/book/{action.value.lower()}", outcome, "{}")


#: Every journal a participant can hold for one step (a compensation is recorded only as SUCCESS).
JOURNALS: dict[str, dict[Action, JournalEntry]] = {
    "nothing": {},
    "execute SUCCESS": {EXECUTE: entry(EXECUTE, SUCCESS)},
    "execute BUSINESS_FAILURE": {EXECUTE: entry(EXECUTE, FAILURE)},
    "compensate only": {COMPENSATE: entry(COMPENSATE, SUCCESS)},
    "execute SUCCESS and compensate": {EXECUTE: entry(EXECUTE, SUCCESS), COMPENSATE: entry(COMPENSATE, SUCCESS)},
    "execute BUSINESS_FAILURE and compensate": {EXECUTE: entry(EXECUTE, FAILURE),
                                                COMPENSATE: entry(COMPENSATE, SUCCESS)},
}


def row_matches(row: str, journal: dict[Action, JournalEntry]) -> bool:
    if row.startswith("compensate recorded"):
        return COMPENSATE in journal
    if row == "nothing":
        return not journal
    match = re.fullmatch(r"execute (SUCCESS|BUSINESS_FAILURE)", row)
    assert match, f"a row of the table this test does not understand: {row!r}"
    return EXECUTE in journal and journal[EXECUTE].outcome.value == match[1]


def verdict_of(cell: str) -> Verdict:
    if cell == "REFUSED":
        return Verdict.REFUSE
    if cell.startswith("reply the recorded"):
        return Verdict.REPLAY
    if cell.startswith("run"):
        return Verdict.RUN
    if cell == "record SUCCESS, do nothing":
        return Verdict.SKIP
    raise AssertionError(f"a cell of the table this test does not understand: {cell!r}")


def command(action: Action, epoch: int = 5) -> ParticipantCommand:
    return ParticipantCommand(
        command_id=ParticipantCommand.make_id("s-1", "book", action), saga_id="s-1", saga_type="trip", step="book",
        action=action, attempt=2, epoch=epoch, payload="{}", outputs="{}", reply_topic="saga.inbox",
        reply_partition=0, deadline_ms=0, issued_ms=0,
    )


def documented(journal: dict[Action, JournalEntry], action: Action) -> Verdict:
    """What the page says, first matching row first."""
    for row, execute_cell, compensate_cell in decision_table():
        if row_matches(row, journal):
            return verdict_of(execute_cell if action is EXECUTE else compensate_cell)
    raise AssertionError(f"no row of the table matches the journal {sorted(journal)}")


def test_the_table_lists_compensate_recorded_first() -> None:
    rows = [row for row, _, _ in decision_table()]
    assert len(rows) == 4 and rows[0].startswith("compensate recorded") and rows[-1] == "nothing"


@pytest.mark.parametrize("action", [EXECUTE, COMPENSATE])
@pytest.mark.parametrize("journal", list(JOURNALS), ids=list(JOURNALS))
def test_decide_follows_the_documented_table_first_row_first(journal: str, action: Action) -> None:
    decision = decide(command(action), JOURNALS[journal], max_epoch=5)
    assert decision.verdict is documented(JOURNALS[journal], action)
    if decision.verdict is Verdict.REPLAY:
        assert decision.recorded is JOURNALS[journal][action]


def test_an_execute_after_its_success_and_its_compensation_is_refused_not_replayed() -> None:
    """Both rows "execute SUCCESS" and "compensate recorded" match: the compensation wins."""
    decision = decide(command(EXECUTE), JOURNALS["execute SUCCESS and compensate"], max_epoch=None)
    assert decision.verdict is Verdict.REFUSE and "compensated" in (decision.reason or "")


# --- section 8: a command the participant cannot act on -------------------------------------------

CANNOT = "participant 'p' has no handler for step 'book'"


@pytest.mark.parametrize("action", [EXECUTE, COMPENSATE])
@pytest.mark.parametrize("journal", list(JOURNALS), ids=list(JOURNALS))
def test_only_a_command_that_must_run_can_be_one_it_cannot_act_on(journal: str, action: Action) -> None:
    decision = decide(command(action), JOURNALS[journal], max_epoch=5, unable=CANNOT)
    if documented(JOURNALS[journal], action) is Verdict.RUN:
        assert (decision.verdict, decision.reason) == (Verdict.UNABLE, CANNOT)
    else:  # replayed, refused or nothing to undo: answered as the table says, handler or not
        assert decision.verdict is documented(JOURNALS[journal], action)


def test_a_stale_epoch_is_refused_before_anything_else() -> None:
    for journal in JOURNALS.values():
        for action in (EXECUTE, COMPENSATE):
            decision = decide(command(action, epoch=4), journal, max_epoch=5, unable=CANNOT)
            assert decision.verdict is Verdict.REFUSE and "stale epoch 4" in (decision.reason or "")


# --- section 4: what the manager does with each outcome ------------------------------------------

NOW = 1_700_000_000_000
COMP_RETRY = RetryPolicy(attempts=10, backoff_initial_s=0.2, backoff_max_s=30.0)
TRIP = SagaDefinition(
    name="trip",
    steps=(
        StepDefinition(name="flight", participant="flights", timeout_s=60),
        StepDefinition(name="hotel", participant="hotels", timeout_s=60, retry=RetryPolicy(attempts=5)),
    ),
    compensation_retry=COMP_RETRY,
)
UNABLE_ERROR = "UnknownStep: participant 'hotels' has no handler for step 'hotel' (saga type 'trip')"


def ctx(now: int = NOW) -> Context:
    return Context(now_ms=now, epoch=3, reply_topic="saga.inbox", reply_partition=0, writer="m")


def reply(step: str, action: Action, outcome: ReplyOutcome, attempt: int = 1, error: str | None = None,
          output: str | None = None) -> ParticipantReply:
    return ParticipantReply(
        command_id=ParticipantCommand.make_id("s-1", step, action), saga_id="s-1", step=step, action=action,
        attempt=attempt, epoch=3, outcome=outcome, output=output, error=error, participant="p", replied_ms=NOW,
    )


def hotel_running() -> SagaState:
    state = on_start(None, False, StartSaga(saga_id="s-1", saga_type="trip", payload="{}", requested_ms=NOW),
                     TRIP, ctx()).current
    state = on_reply(state, reply("flight", EXECUTE, SUCCESS, output="{}"), ctx()).current
    assert state.step("hotel").status is StepStatus.RUNNING
    return state


def test_a_business_failure_fails_an_execute_now_whatever_attempts_are_left() -> None:
    decision = on_reply(hotel_running(), reply("hotel", EXECUTE, FAILURE, error=UNABLE_ERROR), ctx(NOW + 5))
    events = [e for record in decision.records for e in record.events]
    assert events[:2] == [
        StepEnded(step="hotel", outcome=StepOutcome.FAILED, error=UNABLE_ERROR),
        SagaAborting(reason=f"step hotel failed: {UNABLE_ERROR}", failed_step="hotel"),
    ]
    assert isinstance(events[2], CompensationBegun) and events[2].step == "flight"  # the step before it
    assert [(c.step, c.action) for _, c in decision.commands] == [("flight", COMPENSATE)]
    assert decision.current.step("hotel").status is StepStatus.FAILED  # never compensated


def compensating_flight() -> SagaState:
    state = on_reply(hotel_running(), reply("hotel", EXECUTE, FAILURE, error="sold out"), ctx()).current
    assert state.step("flight").status is StepStatus.COMPENSATING
    return state


def test_a_compensation_it_cannot_act_on_becomes_an_incident_at_once() -> None:
    error = "UnknownStep: participant 'flights' has no compensate handler for step 'flight'"
    decision = on_reply(compensating_flight(), reply("flight", COMPENSATE, FAILURE, error=error), ctx(NOW + 9))
    [opened] = [e for record in decision.records for e in record.events]
    assert opened == IncidentOpened(step="flight", reason=f"participant cannot compensate flight: {error}", attempts=1)
    assert decision.commands == []  # no more attempts: an operator retries or resolves it
    state = decision.current
    assert state.status is SagaStatus.COMPENSATING and state.incident("flight") is not None


def test_a_compensations_retryable_error_is_retried_after_its_backoff() -> None:
    state = compensating_flight()
    for attempt in (1, 2, 3):
        decision = on_reply(state, reply("flight", COMPENSATE, ReplyOutcome.RETRYABLE_ERROR, attempt=attempt,
                                         error="locked"), ctx())
        [begun] = [e for record in decision.records for e in record.events]
        delay = COMP_RETRY.delay_ms(attempt + 1, "s-1/flight/c")
        assert begun == CompensationBegun(step="flight", attempt=attempt + 1, dispatch_at_ms=NOW + delay,
                                          deadline_ms=NOW + delay + 60_000, last_error="locked")
        assert decision.commands == []  # sent once the backoff has passed
        state = decision.current
        assert state.status is SagaStatus.COMPENSATING and state.incident("flight") is None


@pytest.mark.parametrize("action", [EXECUTE, COMPENSATE])
def test_a_refused_reply_is_ignored_and_the_step_keeps_waiting(action: Action) -> None:
    state = hotel_running() if action is EXECUTE else compensating_flight()
    step = "hotel" if action is EXECUTE else "flight"
    decision = on_reply(state, reply(step, action, ReplyOutcome.REFUSED, error="stale epoch 2"), ctx())
    assert decision.ignored is not None and decision.records == [] and decision.commands == []
