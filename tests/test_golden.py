"""Recorded saga logs must keep replaying to the same state.

The logs under ``tests/golden/`` are bytes written by earlier versions of the codec and fold
(see ``tests/golden/make_golden.py`` for the scenarios and when, rarely, to regenerate them).
A change to the schemas, the codec or the fold that changes what an old log means fails here.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from sagalog.codec import HEADER_LEN, Codec
from sagalog.fold import PartitionFold, replay
from sagalog.records import (
    Action,
    CompensationBegun,
    CompensationEnded,
    IncidentAction,
    IncidentOpened,
    IncidentRetried,
    OperatorAction,
    ParticipantCommand,
    ParticipantReply,
    ReplyOutcome,
    SagaAborted,
    SagaLogRecord,
    StepBegun,
    StepEnded,
    StepOutcome,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
NAMES = ["happy_path", "business_failure", "timeout_retry", "dag_abort"]
V1_FINGERPRINT = "cabbdbbc60c5b026"  # schemas/history/saga_log_record.v1.avsc, as on the wire
V2_FINGERPRINT = "62e5c87f8dfdb370"  # schemas/history/saga_log_record.v2.avsc: current when recorded


def load(name: str) -> tuple[list[tuple[bytes, bytes | None]], dict[str, Any]]:
    messages = []
    for i, line in enumerate((GOLDEN / f"{name}.log.jsonl").read_text().splitlines()):
        row = json.loads(line)
        assert row["offset"] == i
        value = None if row["value"] is None else base64.b64decode(row["value"], validate=True)
        messages.append((row["key"].encode(), value))
    expected = json.loads((GOLDEN / f"{name}.expected.json").read_text())
    expected["sagas"] = {saga_id: with_fields_added_since(state) for saga_id, state in expected["sagas"].items()}
    return messages, expected


def with_fields_added_since(state: dict[str, Any]) -> dict[str, Any]:
    """A recorded state as the current fold gives it: exactly as recorded, plus the fields added
    to the state since the logs were written, at the values an old log gives them. Schema v3
    (incidents) added the snapshot's ``incidents`` and each step's ``comp_budget_from``; v4 the
    snapshot's ``trace_parent``; v6 its ``definition_id`` (empty: an old log's sagas keep the
    definition inline, as recorded)."""
    assert "incidents" not in state, "recorded after v3: nothing to add"
    return {
        **state,
        "incidents": [],
        "steps": [{**step, "comp_budget_from": 0} for step in state["steps"]],
        "trace_parent": None,
        "definition_id": "",
    }


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def decoded(name: str, codec: Codec) -> list[tuple[bytes, Any]]:
    messages, _ = load(name)
    return [(key, None if value is None else codec.decode(value)) for key, value in messages]


def test_every_golden_log_is_here() -> None:
    assert sorted(p.name.removesuffix(".log.jsonl") for p in GOLDEN.glob("*.log.jsonl")) == sorted(NAMES)
    assert sorted(p.name.removesuffix(".expected.json") for p in GOLDEN.glob("*.expected.json")) == sorted(
        NAMES
    )


@pytest.mark.parametrize("name", NAMES)
def test_golden_log_replays_to_the_recorded_state(codec: Codec, name: str) -> None:
    _, expected = load(name)
    fold = PartitionFold(partition=0)
    for offset, (key, item) in enumerate(decoded(name, codec)):
        fold.apply(key, item, offset)
    assert {saga_id: s.model_dump(mode="json") for saga_id, s in fold.sagas.items()} == expected["sagas"]
    assert fold.epoch == expected["partition_epoch"]
    assert fold.applied == expected["applied"]
    assert [offset for offset, _ in fold.rejected] == expected["rejected_offsets"]


@pytest.mark.parametrize("name", NAMES)
def test_golden_log_replays_strictly_per_saga(codec: Codec, name: str) -> None:
    """The strict fold (no partition bookkeeping) agrees, without the rejected records."""
    _, expected = load(name)
    rejected = set(expected["rejected_offsets"])
    by_saga: dict[str, list[SagaLogRecord]] = {}
    for offset, (_, item) in enumerate(decoded(name, codec)):
        if isinstance(item, SagaLogRecord) and offset not in rejected:
            by_saga.setdefault(item.saga_id, []).append(item)
    for saga_id, state in expected["sagas"].items():
        folded = replay(by_saga[saga_id])
        assert folded is not None and folded.model_dump(mode="json") == state
        # Compaction would leave only the newest record: it alone gives the same state.
        assert replay(by_saga[saga_id][-1:]) == folded


# --- the logs are what their names say (guards against a careless regeneration) --------------


def _events(name: str, codec: Codec, saga_id: str) -> list[Any]:
    _, expected = load(name)
    rejected = set(expected["rejected_offsets"])
    return [
        event
        for offset, (_, item) in enumerate(decoded(name, codec))
        if isinstance(item, SagaLogRecord) and item.saga_id == saga_id and offset not in rejected
        for event in item.events
    ]


def test_happy_path_is_three_steps_that_succeed(codec: Codec) -> None:
    _, expected = load("happy_path")
    (state,) = expected["sagas"].values()
    assert state["status"] == "COMPLETED"
    assert [s["status"] for s in state["steps"]] == ["SUCCEEDED"] * 3


def test_business_failure_compensates_in_reverse_order(codec: Codec) -> None:
    events = _events("business_failure", codec, "order-0002")
    assert [e.step for e in events if isinstance(e, CompensationEnded)] == ["charge", "reserve"]
    assert [e.attempt for e in events if isinstance(e, CompensationBegun) and e.step == "charge"] == [1, 2]
    _, expected = load("business_failure")
    state = expected["sagas"]["order-0002"]
    assert state["status"] == "ABORTED"
    assert [s["status"] for s in state["steps"]] == ["COMPENSATED", "COMPENSATED", "FAILED"]


def test_timeout_retry_spans_schema_versions_and_a_zombie(codec: Codec) -> None:
    messages, expected = load("timeout_retry")
    headers = [value[2:HEADER_LEN].hex() for _, value in messages if value is not None]
    assert V1_FINGERPRINT in headers  # part of the log was written with schema v1
    assert V2_FINGERPRINT in headers  # and part with v2, the current one when it was recorded
    records = [item for _, item in decoded("timeout_retry", codec) if isinstance(item, SagaLogRecord)]
    assert {r.writer for r in records} == {None, "manager-b"}
    assert expected["rejected_offsets"] and expected["partition_epoch"] == 2
    events = _events("timeout_retry", codec, "order-0003")
    assert [e.attempt for e in events if isinstance(e, StepBegun) and e.step == "ship"] == [1, 2, 3]
    assert expected["sagas"]["order-0003"]["status"] == "COMPLETED"


def test_dag_abort_compensates_parallel_steps_before_their_dependency(codec: Codec) -> None:
    events = _events("dag_abort", codec, "trip-0001")
    ended = [e.step for e in events if isinstance(e, CompensationEnded)]
    assert ended[-1] == "budget" and set(ended[:-1]) == {"flight", "car"}
    begun = [e.step for e in events if isinstance(e, CompensationBegun)]
    assert begun[:2] == ["flight", "car"]  # both in flight together
    assert any(isinstance(e, StepEnded) and e.outcome is StepOutcome.FAILED for e in events)
    _, expected = load("dag_abort")
    assert set(expected["sagas"]) == {"trip-0001"}  # the other saga was tombstoned
    steps = {s["name"]: s["status"] for s in expected["sagas"]["trip-0001"]["steps"]}
    assert steps == {
        "budget": "COMPENSATED",
        "audit": "SUCCEEDED",  # not compensable
        "flight": "COMPENSATED",
        "hotel": "FAILED",
        "car": "COMPENSATED",  # was in flight at the abort
        "confirm": "PENDING",
    }


# --- sagas begun before incidents run on under the new rules ----------------------------------


def test_an_old_saga_caught_compensating_gets_a_budget_an_incident_and_an_operator(codec: Codec) -> None:
    """business_failure's saga as a manager of today would take it over while ``charge`` is being
    compensated (attempt 2): its pinned definition, written before compensations had a budget,
    still loads; the budget is what it pinned (``attempts: 3``, the default of the time, unused
    then), so the third failure opens an incident; an operator's retry sends attempt 4 at once,
    and its success lets the saga abort as it always would have."""
    from manager.decide import Context, on_inbox, on_reply
    from sagalog.definition import DefinitionSet

    _, expected = load("business_failure")
    rejected = set(expected["rejected_offsets"])
    records = [
        item
        for offset, (_, item) in enumerate(decoded("business_failure", codec))
        if isinstance(item, SagaLogRecord) and item.saga_id == "order-0002" and offset not in rejected
    ]
    last_attempt = max(
        i for i, r in enumerate(records) if any(isinstance(e, CompensationBegun) and e.step == "charge" for e in r.events)
    )
    state = replay(records[: last_attempt + 1])
    assert state is not None and state.status == "COMPENSATING"
    assert (state.step("charge").comp_attempt, state.incidents) == (2, ())
    assert state.definition_model.compensation_retry.attempts == 3  # as pinned
    epoch = max(r.epoch for r in records)
    ctx = Context(now_ms=records[-1].timestamp_ms, epoch=epoch, reply_topic="inbox", reply_partition=0)

    def reply(attempt: int, outcome: ReplyOutcome) -> ParticipantReply:
        return ParticipantReply(
            command_id=ParticipantCommand.make_id("order-0002", "charge", Action.COMPENSATE), saga_id="order-0002",
            step="charge", action=Action.COMPENSATE, attempt=attempt, epoch=epoch, outcome=outcome,
            output="{}" if outcome is ReplyOutcome.SUCCESS else None, error=None if outcome is ReplyOutcome.SUCCESS
            else "ledger down", participant="payments", replied_ms=ctx.now_ms,
        )

    third = on_reply(state, reply(2, ReplyOutcome.RETRYABLE_ERROR), ctx).current
    assert third.step("charge").comp_attempt == 3
    stuck = on_reply(third, reply(3, ReplyOutcome.RETRYABLE_ERROR), ctx)
    assert [type(e) for e in stuck.events] == [IncidentOpened] and stuck.commands == []
    assert stuck.current.incident("charge") is not None

    retry = OperatorAction(saga_id="order-0002", action=IncidentAction.RETRY, step="charge", operator="ada",
                           reason="ledger is back", requested_ms=ctx.now_ms)
    retried = on_inbox(stuck.current, False, retry, DefinitionSet(), ctx)
    assert [type(e) for e in retried.events] == [IncidentRetried, CompensationBegun] and len(retried.records) == 1
    assert [(c.step, c.action, c.attempt) for _, c in retried.commands] == [("charge", Action.COMPENSATE, 4)]
    done = on_reply(retried.current, reply(4, ReplyOutcome.SUCCESS), ctx)
    assert [type(e) for e in done.events][0] is CompensationEnded
    assert [e.step for e in done.events if isinstance(e, CompensationBegun)] == ["reserve"]
    assert not any(isinstance(e, SagaAborted) for e in done.events)  # reserve still to undo
