"""The manager as real processes on the embedded broker, against a scripted participant."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from harness import (
    CODEC,
    ManagerProcess,
    ScriptedParticipant,
    cancel_saga,
    reply_to,
    start_sagas,
    succeed,
    wait_for,
    wait_terminal,
)

from sagalog.config import Topics
from sagalog.kafka import consumer_config, producer_config
from sagalog.reader import scan
from sagalog.records import Action, DeadLetter, ReplyOutcome, SagaLogRecord, StepEnded, StepStatus

DEFINITIONS = """
sagas:
  - name: three
    steps:
      - {name: a, participant: pa, timeout_s: 1.0, retry: {attempts: 3, backoff_initial_s: 0.05}}
      - {name: b, participant: pb, timeout_s: 1.0, retry: {attempts: 3, backoff_initial_s: 0.05}}
      - {name: c, participant: pc, timeout_s: 1.0, retry: {attempts: 2, backoff_initial_s: 0.05}}
  - name: dag
    steps:
      - {name: a, participant: pa, timeout_s: 2.0}
      - {name: b, participant: pb, timeout_s: 2.0, depends_on: [a]}
      - {name: c, participant: pc, timeout_s: 2.0, depends_on: [a]}
      - {name: d, participant: pd, timeout_s: 2.0, depends_on: [b, c]}
"""
PARTICIPANTS = ["pa", "pb", "pc", "pd"]


@pytest.fixture
def env(bootstrap: str, make_topics, tmp_path: Path):
    topics = make_topics(partitions=4, participants=PARTICIPANTS)
    defs = tmp_path / "defs.yaml"
    defs.write_text(DEFINITIONS)
    manager = ManagerProcess(bootstrap, topics, defs, tmp_path, "m1").start()
    yield bootstrap, topics
    code = manager.stop()
    assert code == 0, f"manager did not stop cleanly on SIGTERM (exit {code}):\n{manager.output()[-3000:]}"


def compensations(p: ScriptedParticipant, saga_id: str) -> list[str]:
    return [step for step, action, _ in p.commands_for(saga_id) if action == "COMPENSATE"]


def history(bootstrap: str, topics: Topics, saga_id: str) -> list[SagaLogRecord]:
    return [e.item for e in scan(bootstrap, topics) if isinstance(e.item, SagaLogRecord) and e.item.saga_id == saga_id]


def test_happy_path_runs_steps_in_order(env) -> None:
    bootstrap, topics = env
    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS) as p:
        start_sagas(bootstrap, topics, "three", ["ok-1", "ok-2"])
        states = wait_terminal(bootstrap, topics, ["ok-1", "ok-2"], 60)
    for sid in ("ok-1", "ok-2"):
        assert states[sid].status == "COMPLETED"
        assert [s.status for s in states[sid].steps] == [StepStatus.SUCCEEDED] * 3
        assert p.commands_for(sid) == [("a", "EXECUTE", 1), ("b", "EXECUTE", 1), ("c", "EXECUTE", 1)]
    records = history(bootstrap, topics, "ok-1")
    events = [type(e).__name__ for r in records for e in r.events]
    assert events == ["SagaBegun"] + ["StepBegun", "StepEnded"] * 3 + ["SagaEnded"]
    # One record per decision: the start, then each reply (a step ends, the next begins or the saga ends).
    assert [[type(e).__name__ for e in r.events] for r in records] == [
        ["SagaBegun", "StepBegun"], ["StepEnded", "StepBegun"], ["StepEnded", "StepBegun"], ["StepEnded", "SagaEnded"]
    ]


def test_business_failure_compensates_in_reverse_order(env) -> None:
    bootstrap, topics = env

    def fail_c(cmd):
        if cmd.step == "c" and cmd.action is Action.EXECUTE:
            return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="no cars left")]
        return succeed(cmd)

    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, fail_c) as p:
        start_sagas(bootstrap, topics, "three", ["fail-1"])
        states = wait_terminal(bootstrap, topics, ["fail-1"], 60)
    state = states["fail-1"]
    assert state.status == "ABORTED"
    assert "no cars left" in (state.reason or "")
    assert compensations(p, "fail-1") == ["b", "a"]  # c failed (no effect): not compensated
    assert [s.status for s in state.steps] == [StepStatus.COMPENSATED, StepStatus.COMPENSATED, StepStatus.FAILED]


def test_timeout_retry_then_success(env) -> None:
    bootstrap, topics = env

    def drop_first_b(cmd):
        if cmd.step == "b" and cmd.attempt == 1:
            return []  # lost: the manager's deadline must fire and retry
        return succeed(cmd)

    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, drop_first_b) as p:
        start_sagas(bootstrap, topics, "three", ["retry-1"])
        states = wait_terminal(bootstrap, topics, ["retry-1"], 60)
    assert states["retry-1"].status == "COMPLETED"
    assert states["retry-1"].step("b").attempt == 2
    assert ("b", "EXECUTE", 2) in p.commands_for("retry-1")
    assert compensations(p, "retry-1") == []


def test_timeout_exhausted_compensates_the_timed_out_step_too(env) -> None:
    bootstrap, topics = env

    def never_c(cmd):
        return [] if (cmd.step == "c" and cmd.action is Action.EXECUTE) else succeed(cmd)

    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, never_c) as p:
        start_sagas(bootstrap, topics, "three", ["slow-1"])
        states = wait_terminal(bootstrap, topics, ["slow-1"], 60)
    state = states["slow-1"]
    assert state.status == "ABORTED"
    assert [a for s, _, a in p.commands_for("slow-1") if s == "c"][:2] == [1, 2]  # 2 attempts, then give up
    # c may have taken effect without answering: it is compensated first, then b, then a.
    assert compensations(p, "slow-1") == ["c", "b", "a"]


def test_parallel_steps_and_their_compensation(env) -> None:
    bootstrap, topics = env

    def fail_d(cmd):
        if cmd.step == "d" and cmd.action is Action.EXECUTE:
            return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="nope")]
        return succeed(cmd)

    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, succeed) as ok:
        start_sagas(bootstrap, topics, "dag", ["dag-ok"])
        wait_terminal(bootstrap, topics, ["dag-ok"], 60)
    order = [s for s, a, _ in ok.commands_for("dag-ok")]
    assert order[0] == "a" and set(order[1:3]) == {"b", "c"} and order[3] == "d"
    records = history(bootstrap, topics, "dag-ok")
    events = [e for r in records for e in r.events]
    begun = [e.step for e in events if type(e).__name__ == "StepBegun"]
    ended_before_c = [e.step for e in events[: [type(e).__name__ == "StepBegun" and e.step == "c" for e in events].index(True)] if isinstance(e, StepEnded)]
    assert begun[:3] == ["a", "b", "c"] and "b" not in ended_before_c  # b and c were in flight together

    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, fail_d) as p:
        start_sagas(bootstrap, topics, "dag", ["dag-fail"])
        states = wait_terminal(bootstrap, topics, ["dag-fail"], 60)
    assert states["dag-fail"].status == "ABORTED"
    comps = compensations(p, "dag-fail")
    assert set(comps[:2]) == {"b", "c"} and comps[2:] == ["a"]  # a only after both dependents are undone


def test_cancel_aborts_a_running_saga(env) -> None:
    bootstrap, topics = env

    def hold_b(cmd):
        return [] if (cmd.step == "b" and cmd.action is Action.EXECUTE) else succeed(cmd)

    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, hold_b) as p:
        start_sagas(bootstrap, topics, "three", ["cancel-1"])
        wait_for(lambda: ("b", "EXECUTE", 1) in p.commands_for("cancel-1"), 30, "step b to start")
        cancel_saga(bootstrap, topics, "cancel-1", reason="customer changed their mind")
        states = wait_terminal(bootstrap, topics, ["cancel-1"], 60)
    assert states["cancel-1"].status == "ABORTED"
    assert "customer changed their mind" in (states["cancel-1"].reason or "")
    assert compensations(p, "cancel-1") == ["b", "a"]


def test_duplicate_and_late_replies_change_nothing(env) -> None:
    bootstrap, topics = env

    def twice_and_late(cmd):
        replies = [reply_to(cmd), reply_to(cmd)]
        if cmd.step == "a":  # a late failure after success must not abort anything
            replies.append(reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="late"))
        return replies

    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, twice_and_late) as p:
        start_sagas(bootstrap, topics, "three", ["dup-1"])
        start_sagas(bootstrap, topics, "three", ["dup-1"])  # a duplicate start is ignored too
        states = wait_terminal(bootstrap, topics, ["dup-1"], 60)
        # Let the last duplicates arrive, then check nothing moved: the saga must stay as it is.
        start_sagas(bootstrap, topics, "three", ["dup-marker"])
        wait_terminal(bootstrap, topics, ["dup-marker"], 60)
    assert states["dup-1"].status == "COMPLETED"
    records = history(bootstrap, topics, "dup-1")
    events = [e for r in records for e in r.events]
    ended = Counter(e.step for e in events if isinstance(e, StepEnded))
    assert ended == {"a": 1, "b": 1, "c": 1}
    assert sum(1 for e in events if type(e).__name__ == "SagaBegun") == 1
    assert compensations(p, "dup-1") == []


def test_bad_inbox_messages_are_dead_lettered_and_the_manager_keeps_going(env) -> None:
    bootstrap, topics = env
    producer = Producer(producer_config(bootstrap))
    producer.produce(topics.inbox, b"\x00garbage", key=b"junk")
    producer.produce(topics.inbox, b"\xc3\x01" + b"\xff" * 8 + b"unknown schema", key=b"junk2")
    from sagalog.records import StartSaga

    producer.produce(topics.inbox, CODEC.encode(StartSaga(saga_id="x-1", saga_type="no-such-type", payload="{}", requested_ms=0)), key=b"x-1")
    producer.produce(topics.inbox, CODEC.encode(StartSaga(saga_id="x-2", saga_type="three", payload="{not json", requested_ms=0)), key=b"x-2")
    producer.flush(10)
    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS):
        start_sagas(bootstrap, topics, "three", ["after-junk"])
        states = wait_terminal(bootstrap, topics, ["after-junk"], 60)
    assert states["after-junk"].status == "COMPLETED"
    assert "x-1" not in states and "x-2" not in states

    consumer = Consumer(consumer_config(bootstrap, f"{topics.prefix}-dlq-reader"))
    consumer.subscribe([topics.dead_letters])
    letters: list[DeadLetter] = []

    kafka_keys: list[bytes | None] = []

    def collect() -> bool:
        for msg in consumer.consume(100, 0.5):
            if not msg.error():
                letters.append(CODEC.decode(msg.value()))
                kafka_keys.append(msg.key())
        return len(letters) >= 4

    wait_for(collect, 30, "4 dead letters", interval=0)
    consumer.close()
    reasons = {dl.key: dl.reason for dl in letters}
    assert "header" in reasons[b"junk"]
    assert "unknown schema fingerprint" in reasons[b"junk2"]
    assert "unknown saga type 'no-such-type'" in reasons[b"x-1"]
    assert "not JSON" in reasons[b"x-2"]
    assert all(dl.value is not None and dl.source_topic == topics.inbox for dl in letters)
    assert kafka_keys == [dl.key for dl in letters]  # dead letters are keyed like the original (the contract)


def test_finished_sagas_are_tombstoned_after_retention(bootstrap: str, make_topics, tmp_path: Path) -> None:
    topics = make_topics(partitions=2, participants=PARTICIPANTS)
    defs = tmp_path / "defs.yaml"
    defs.write_text(DEFINITIONS)
    manager = ManagerProcess(bootstrap, topics, defs, tmp_path, "tomb", partitions=2, extra=("--finished-retention-s", "0")).start()
    try:
        with ScriptedParticipant(bootstrap, topics, PARTICIPANTS):
            start_sagas(bootstrap, topics, "three", ["gone-1"])

            def tombstoned() -> bool:
                entries = [e for e in scan(bootstrap, topics) if e.key == b"gone-1"]
                return bool(entries) and entries[-1].item is None

            wait_for(tombstoned, 60, "a tombstone for the finished saga")
        events = [type(ev).__name__ for e in scan(bootstrap, topics) if e.key == b"gone-1" and e.item is not None for ev in e.item.events]
        assert events[-1] == "SagaEnded"  # tombstoned only after it finished
        from sagalog.reader import saga_states

        assert "gone-1" not in saga_states(bootstrap, topics)
    finally:
        assert manager.stop() == 0
