"""The participant SDK: its rules as a pure function, then end to end against the broker.

The broker tests share one participant (joining a consumer group takes seconds); every test
uses its own saga ids, sends commands with a plain producer as a manager would, and reads the
replies and dead letters with a plain consumer.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from harness import end_offset

from participants import (
    BusinessFailure,
    JournalEntry,
    Participant,
    SqliteStore,
    StepContext,
    StoreTransaction,
    TransientFailure,
    Verdict,
    decide,
)
from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.records import Action, DeadLetter, ParticipantCommand, ParticipantReply, ReplyOutcome
from sagalog.topics import ensure_topics

PARTITIONS = 2
NAME = "stock"
TIMEOUT_S = 30.0
codec = Codec()


def command(
    saga_id: str,
    action: Action = Action.EXECUTE,
    *,
    step: str = "reserve",
    attempt: int = 1,
    epoch: int = 1,
    payload: Any = None,
    reply_topic: str = "replies",
    reply_partition: int = 0,
) -> ParticipantCommand:
    return ParticipantCommand(
        command_id=ParticipantCommand.make_id(saga_id, step, action),
        saga_id=saga_id,
        saga_type="test-saga",
        step=step,
        action=action,
        attempt=attempt,
        epoch=epoch,
        payload=json.dumps(payload if payload is not None else {}),
        outputs="{}",
        reply_topic=reply_topic,
        reply_partition=reply_partition,
        deadline_ms=0,
        issued_ms=int(time.time() * 1000),
    )


# --- the rules, without Kafka ---------------------------------------------------------------


def entry(action: Action, outcome: ReplyOutcome) -> JournalEntry:
    return JournalEntry("s", "reserve", action, f"s/reserve/{action.value.lower()}", outcome)


@pytest.mark.parametrize(
    ("action", "journal", "max_epoch", "epoch", "verdict"),
    [
        (Action.EXECUTE, {}, None, 1, Verdict.RUN),
        (Action.EXECUTE, {}, 3, 3, Verdict.RUN),
        (Action.EXECUTE, {}, 3, 2, Verdict.REFUSE),  # stale epoch
        (Action.EXECUTE, {Action.EXECUTE: entry(Action.EXECUTE, ReplyOutcome.SUCCESS)}, 1, 1, Verdict.REPLAY),
        (Action.EXECUTE, {Action.EXECUTE: entry(Action.EXECUTE, ReplyOutcome.BUSINESS_FAILURE)}, 1, 2,
         Verdict.REPLAY),
        (Action.EXECUTE, {Action.COMPENSATE: entry(Action.COMPENSATE, ReplyOutcome.SUCCESS)}, 1, 1,
         Verdict.REFUSE),  # execute after compensate
        (Action.COMPENSATE, {}, None, 1, Verdict.SKIP),  # compensate before execute
        (Action.COMPENSATE, {Action.EXECUTE: entry(Action.EXECUTE, ReplyOutcome.BUSINESS_FAILURE)}, 1, 1,
         Verdict.SKIP),  # nothing to undo
        (Action.COMPENSATE, {Action.EXECUTE: entry(Action.EXECUTE, ReplyOutcome.SUCCESS)}, 1, 1, Verdict.RUN),
        (Action.COMPENSATE, {Action.EXECUTE: entry(Action.EXECUTE, ReplyOutcome.SUCCESS),
                             Action.COMPENSATE: entry(Action.COMPENSATE, ReplyOutcome.SUCCESS)}, 1, 1,
         Verdict.REPLAY),
        (Action.COMPENSATE, {Action.EXECUTE: entry(Action.EXECUTE, ReplyOutcome.SUCCESS)}, 2, 1,
         Verdict.REFUSE),  # a zombie's compensation must not undo a live step
    ],
)
def test_decide(
    action: Action, journal: dict[Action, JournalEntry], max_epoch: int | None, epoch: int, verdict: Verdict
) -> None:
    decision = decide(command("s", action, epoch=epoch), journal, max_epoch)
    assert decision.verdict is verdict
    if verdict is Verdict.REPLAY:
        assert decision.recorded is journal[action]


# --- a participant on the broker ------------------------------------------------------------

#: Handler calls per (saga, action): counted outside the transaction, so rolled-back calls count too.
calls: Counter[tuple[str, Action]] = Counter()


def build(topics: Topics, bootstrap: str, db: Path, store_type: type[SqliteStore] = SqliteStore) -> Participant:
    def setup(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS effects (saga_id TEXT, action TEXT, attempt INTEGER)")

    participant = Participant(NAME, topics=topics, bootstrap=bootstrap, store=store_type(db, setup=setup),
                              poll_timeout_s=0.1)

    @participant.execute("reserve")
    def reserve(ctx: StepContext, tx: sqlite3.Connection) -> dict[str, Any]:
        calls[(ctx.saga_id, ctx.action)] += 1
        tx.execute("INSERT INTO effects VALUES (?, ?, ?)", (ctx.saga_id, ctx.action.value, ctx.attempt))
        fail = ctx.payload.get("fail")
        if fail == "business":
            raise BusinessFailure("sold out")
        if fail == "transient" and ctx.attempt < 2:
            raise ConnectionError("inventory service unreachable")
        if fail == "announced" and ctx.attempt < 2:
            raise TransientFailure("inventory service busy")
        return {"ticket": f"T-{ctx.saga_id}", "attempt": ctx.attempt}

    @participant.compensate("reserve")
    def release(ctx: StepContext, tx: sqlite3.Connection) -> dict[str, Any]:
        calls[(ctx.saga_id, ctx.action)] += 1
        tx.execute("INSERT INTO effects VALUES (?, ?, ?)", (ctx.saga_id, ctx.action.value, ctx.attempt))
        return {"released": True}

    @participant.execute("execute-only")
    def execute_only(ctx: StepContext, tx: sqlite3.Connection) -> None:
        calls[(ctx.saga_id, ctx.action)] += 1

    return participant


class Harness:
    """Sends commands like a manager, collects replies and dead letters like the inbox would."""

    def __init__(self, bootstrap: str, topics: Topics, db: Path) -> None:
        self.bootstrap, self.topics, self.db = bootstrap, topics, db
        self.reply_topic = topics.inbox
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"harness-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        })
        self.consumer.assign([TopicPartition(t, p, 0) for t in (topics.inbox, topics.dead_letters)
                              for p in range(PARTITIONS)])
        self.replies: dict[str, list[tuple[int, ParticipantReply]]] = defaultdict(list)
        self.dead_letters: list[DeadLetter] = []

    def send(self, cmd: ParticipantCommand | bytes, key: str = "", partition: int | None = None) -> None:
        value = cmd if isinstance(cmd, bytes) else codec.encode(cmd)
        key = key or (cmd.saga_id if isinstance(cmd, ParticipantCommand) else "junk")
        self.producer.produce(self.topics.commands(NAME), value, key=key.encode(),
                              partition=-1 if partition is None else partition)  # -1: by key
        self.producer.flush(10)

    def _drain(self, timeout_s: float) -> None:
        for msg in self.consumer.consume(500, timeout_s):
            if msg.error():
                continue
            record = codec.decode(msg.value())
            if isinstance(record, ParticipantReply):
                assert msg.key() == record.saga_id.encode()
                self.replies[record.saga_id].append((msg.partition() or 0, record))
            elif isinstance(record, DeadLetter):
                self.dead_letters.append(record)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self._drain(0.1)

    def wait_replies(self, saga_id: str, n: int) -> list[ParticipantReply]:
        self.wait_until(lambda: len(self.replies[saga_id]) >= n, f"{n} replies for {saga_id}")
        self._drain(0.2)  # a reply more than expected would show up now (a bounded extra look)
        return [reply for _, reply in self.replies[saga_id]]

    def effects(self, saga_id: str) -> list[tuple[str, int]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute("SELECT action, attempt FROM effects WHERE saga_id = ? ORDER BY rowid",
                                (saga_id,)).fetchall()

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture(scope="module")
def harness(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    topics = Topics(prefix=f"t.sdk.{uuid.uuid4().hex[:8]}")
    ensure_topics(bootstrap, topics, partitions=PARTITIONS, participants=[NAME])
    db = tmp_path_factory.mktemp("sdk") / f"{NAME}.db"
    participant = build(topics, bootstrap, db)
    thread = threading.Thread(target=participant.run, name="participant")
    thread.start()
    h = Harness(bootstrap, topics, db)
    h.participant = participant  # type: ignore[attr-defined]
    try:
        yield h
    finally:
        participant.stop()
        thread.join(30)
        h.close()
    assert not thread.is_alive()


def new_saga() -> str:
    return f"saga-{uuid.uuid4().hex[:12]}"


def test_success_reply_goes_to_the_requested_partition(harness: Harness) -> None:
    saga = new_saga()
    harness.send(command(saga, reply_topic=harness.reply_topic, reply_partition=1))
    harness.wait_replies(saga, 1)
    [(partition, reply)] = harness.replies[saga]
    assert partition == 1
    assert reply.outcome is ReplyOutcome.SUCCESS
    assert json.loads(reply.output or "") == {"ticket": f"T-{saga}", "attempt": 1}
    assert (reply.command_id, reply.participant, reply.attempt, reply.epoch) == (f"{saga}/reserve/execute", NAME,
                                                                                 1, 1)
    assert harness.effects(saga) == [("EXECUTE", 1)]


def test_duplicate_commands_apply_once_and_get_the_same_reply(harness: Harness) -> None:
    saga = new_saga()
    for attempt in (1, 1, 2):  # a re-send, then a retry after a (spurious) timeout
        harness.send(command(saga, attempt=attempt, reply_topic=harness.reply_topic))
    replies = harness.wait_replies(saga, 3)
    assert len(replies) == 3
    assert {(r.outcome, r.output) for r in replies} == {(ReplyOutcome.SUCCESS, json.dumps(
        {"ticket": f"T-{saga}", "attempt": 1}, separators=(",", ":")))}
    assert [r.attempt for r in replies] == [1, 1, 2]  # each answers the attempt it was asked
    assert calls[(saga, Action.EXECUTE)] == 1
    assert harness.effects(saga) == [("EXECUTE", 1)]

    # The compensation is idempotent too.
    for _ in range(2):
        harness.send(command(saga, Action.COMPENSATE, reply_topic=harness.reply_topic))
    replies = harness.wait_replies(saga, 5)
    assert [r.outcome for r in replies[3:]] == [ReplyOutcome.SUCCESS] * 2
    assert calls[(saga, Action.COMPENSATE)] == 1
    assert harness.effects(saga) == [("EXECUTE", 1), ("COMPENSATE", 1)]


def test_compensate_before_execute_leaves_nothing_reserved(harness: Harness) -> None:
    saga = new_saga()
    harness.send(command(saga, Action.COMPENSATE, reply_topic=harness.reply_topic))
    harness.send(command(saga, Action.EXECUTE, reply_topic=harness.reply_topic))
    compensated, executed = harness.wait_replies(saga, 2)
    assert compensated.action is Action.COMPENSATE and compensated.outcome is ReplyOutcome.SUCCESS
    assert executed.action is Action.EXECUTE and executed.outcome is ReplyOutcome.REFUSED
    assert "compensated" in (executed.error or "")
    assert calls[(saga, Action.EXECUTE)] == calls[(saga, Action.COMPENSATE)] == 0
    assert harness.effects(saga) == []

    harness.send(command(saga, Action.EXECUTE, attempt=2, reply_topic=harness.reply_topic))
    assert harness.wait_replies(saga, 3)[2].outcome is ReplyOutcome.REFUSED
    assert harness.effects(saga) == []


def test_stale_epoch_commands_are_refused(harness: Harness) -> None:
    saga = new_saga()
    harness.send(command(saga, epoch=5, reply_topic=harness.reply_topic))
    harness.send(command(saga, Action.COMPENSATE, epoch=4, reply_topic=harness.reply_topic))  # a zombie manager
    harness.send(command(saga, epoch=3, attempt=2, reply_topic=harness.reply_topic))
    executed, zombie_compensate, zombie_execute = harness.wait_replies(saga, 3)
    assert executed.outcome is ReplyOutcome.SUCCESS
    assert zombie_compensate.outcome is ReplyOutcome.REFUSED and "stale epoch 4" in (zombie_compensate.error or "")
    assert zombie_execute.outcome is ReplyOutcome.REFUSED
    assert harness.effects(saga) == [("EXECUTE", 1)]  # the zombie undid nothing

    # The new owner (a higher epoch) compensates normally.
    harness.send(command(saga, Action.COMPENSATE, epoch=6, reply_topic=harness.reply_topic))
    assert harness.wait_replies(saga, 4)[3].outcome is ReplyOutcome.SUCCESS
    assert harness.effects(saga) == [("EXECUTE", 1), ("COMPENSATE", 1)]


def test_business_failure_is_final_and_needs_no_compensation(harness: Harness) -> None:
    saga = new_saga()
    harness.send(command(saga, payload={"fail": "business"}, reply_topic=harness.reply_topic))
    harness.send(command(saga, payload={"fail": "business"}, attempt=2, reply_topic=harness.reply_topic))
    first, second = harness.wait_replies(saga, 2)
    assert first.outcome is second.outcome is ReplyOutcome.BUSINESS_FAILURE
    assert first.error == second.error == "sold out"
    assert calls[(saga, Action.EXECUTE)] == 1  # the recorded failure was replayed
    assert harness.effects(saga) == []  # the handler's write was rolled back

    harness.send(command(saga, Action.COMPENSATE, reply_topic=harness.reply_topic))
    assert harness.wait_replies(saga, 3)[2].outcome is ReplyOutcome.SUCCESS
    assert calls[(saga, Action.COMPENSATE)] == 0  # nothing to undo


def test_retryable_error_is_not_final(harness: Harness) -> None:
    saga = new_saga()
    harness.send(command(saga, payload={"fail": "transient"}, reply_topic=harness.reply_topic))
    [failed] = harness.wait_replies(saga, 1)
    assert failed.outcome is ReplyOutcome.RETRYABLE_ERROR
    assert failed.error == "ConnectionError: inventory service unreachable"
    assert harness.effects(saga) == []

    harness.send(command(saga, payload={"fail": "transient"}, attempt=2, reply_topic=harness.reply_topic))
    harness.send(command(saga, payload={"fail": "transient"}, attempt=2, reply_topic=harness.reply_topic))
    retried, repeated = harness.wait_replies(saga, 3)[1:]
    assert retried.outcome is repeated.outcome is ReplyOutcome.SUCCESS
    assert retried.output == repeated.output
    assert calls[(saga, Action.EXECUTE)] == 2
    assert harness.effects(saga) == [("EXECUTE", 2)]


def test_an_announced_transient_failure_logs_one_line_and_a_bug_its_traceback(harness: Harness, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="participants.sdk")
    announced, buggy = new_saga(), new_saga()
    harness.send(command(announced, payload={"fail": "announced"}, reply_topic=harness.reply_topic))
    harness.send(command(buggy, payload={"fail": "transient"}, reply_topic=harness.reply_topic))
    assert harness.wait_replies(announced, 1)[0].error == "TransientFailure: inventory service busy"
    assert harness.wait_replies(buggy, 1)[0].outcome is ReplyOutcome.RETRYABLE_ERROR
    lines = {r.getMessage(): r for r in caplog.records if "answering RETRYABLE_ERROR" in r.getMessage()}
    [one_line] = [r for m, r in lines.items() if announced in m]
    [with_trace] = [r for m, r in lines.items() if buggy in m]
    assert "inventory service busy" in one_line.getMessage() and not one_line.exc_info
    assert with_trace.exc_info is not None and with_trace.exc_info[0] is ConnectionError


def test_bad_messages_go_to_dead_letters_and_the_participant_keeps_serving(harness: Harness) -> None:
    before = len(harness.dead_letters)
    junk = b"\xc3\x01" + b"\x00" * 8 + b"garbage"
    harness.send(b"not avro at all", key="junk-1", partition=0)
    harness.send(junk, key="junk-2", partition=1)
    unknown_step = command(new_saga(), step="fly-to-the-moon", reply_topic=harness.reply_topic)
    harness.send(unknown_step)
    no_compensate = command(new_saga(), step="execute-only", reply_topic=harness.reply_topic)
    harness.send(no_compensate)
    harness.send(no_compensate.model_copy(update={"action": Action.COMPENSATE,
                                                  "command_id": no_compensate.command_id + "-c"}))
    bad_json = command(new_saga(), reply_topic=harness.reply_topic).model_copy(update={"payload": "{nope"})
    harness.send(bad_json)
    nowhere = command(new_saga(), reply_topic=harness.reply_topic, reply_partition=99)  # no such partition
    harness.send(nowhere)

    saga = new_saga()
    harness.send(command(saga, reply_topic=harness.reply_topic))
    assert harness.wait_replies(saga, 1)[0].outcome is ReplyOutcome.SUCCESS
    harness.wait_until(lambda: len(harness.dead_letters) >= before + 6, "6 dead letters")

    letters = {letter.error_type + ":" + (letter.key or b"").decode(): letter
               for letter in harness.dead_letters[before:]}
    assert set(letters) == {
        "MalformedRecord:junk-1",
        "UnknownSchema:junk-2",
        f"UnknownStep:{unknown_step.saga_id}",
        f"UnknownStep:{no_compensate.saga_id}",
        f"InvalidCommand:{bad_json.saga_id}",
        f"UndeliverableReply:{nowhere.saga_id}",
    }
    junk_letter = letters["MalformedRecord:junk-1"]
    assert junk_letter.value == b"not avro at all"
    assert junk_letter.source_topic == harness.topics.commands(NAME) and junk_letter.source_partition == 0
    assert junk_letter.component.startswith(f"participant:{NAME}@")
    assert "fly-to-the-moon" in letters[f"UnknownStep:{unknown_step.saga_id}"].reason
    assert "no compensate handler" in letters[f"UnknownStep:{no_compensate.saga_id}"].reason
    undeliverable = letters[f"UndeliverableReply:{nowhere.saga_id}"]
    assert (undeliverable.source_topic, undeliverable.source_partition) == (harness.reply_topic, 99)
    assert isinstance(codec.decode(undeliverable.value), ParticipantReply)  # the reply itself is kept
    assert undeliverable.source_offset == -1 and undeliverable.key == nowhere.saga_id.encode()
    # A command it can answer but not act on is answered too (CONTRACT.md section 8): BUSINESS_FAILURE.
    [unknown] = harness.wait_replies(unknown_step.saga_id, 1)
    assert unknown.outcome is ReplyOutcome.BUSINESS_FAILURE and unknown.error.startswith("UnknownStep: ")
    [invalid] = harness.wait_replies(bad_json.saga_id, 1)
    assert invalid.outcome is ReplyOutcome.BUSINESS_FAILURE and invalid.error.startswith("InvalidCommand: ")
    assert [(r.action, r.outcome) for r in harness.wait_replies(no_compensate.saga_id, 2)] == [
        (Action.EXECUTE, ReplyOutcome.SUCCESS), (Action.COMPENSATE, ReplyOutcome.BUSINESS_FAILURE)]
    assert harness.replies[nowhere.saga_id] == []  # its reply is the dead letter


def dead_letters_for(harness: Harness, saga: str) -> list[DeadLetter]:
    return [d for d in harness.dead_letters if d.key == saga.encode()]


def test_a_command_it_cannot_act_on_is_dead_lettered_and_answered(harness: Harness) -> None:
    """CONTRACT.md section 8: a command it can answer but not run gets a dead letter *and* a
    BUSINESS_FAILURE reply. An execute's refusal is final (recorded: a re-send gets the same reply
    and is not dead-lettered again); a compensation's is not (every attempt is refused anew)."""
    unknown = new_saga()
    original = command(unknown, step="no-such-step", reply_topic=harness.reply_topic)
    harness.send(original)
    harness.send(command(unknown, step="no-such-step", attempt=2, reply_topic=harness.reply_topic))
    first, second = harness.wait_replies(unknown, 2)
    assert first.outcome is second.outcome is ReplyOutcome.BUSINESS_FAILURE
    assert first.error == second.error and "no-such-step" in (first.error or "")
    assert (first.attempt, second.attempt) == (1, 2)
    harness.wait_until(lambda: len(dead_letters_for(harness, unknown)) >= 1, "the dead letter")
    harness._drain(0.5)
    [letter] = dead_letters_for(harness, unknown)
    assert letter.error_type == "UnknownStep" and letter.source_topic == harness.topics.commands(NAME)
    assert letter.value == codec.encode(original)  # the original command, whole

    undo_missing = new_saga()
    harness.send(command(undo_missing, step="execute-only", reply_topic=harness.reply_topic))
    for attempt in (1, 2):
        harness.send(command(undo_missing, Action.COMPENSATE, step="execute-only", attempt=attempt,
                             reply_topic=harness.reply_topic))
    replies = harness.wait_replies(undo_missing, 3)
    assert [(r.action, r.outcome, r.attempt) for r in replies] == [
        (Action.EXECUTE, ReplyOutcome.SUCCESS, 1),
        (Action.COMPENSATE, ReplyOutcome.BUSINESS_FAILURE, 1),
        (Action.COMPENSATE, ReplyOutcome.BUSINESS_FAILURE, 2),
    ]
    harness.wait_until(lambda: len(dead_letters_for(harness, undo_missing)) >= 2, "a dead letter per attempt")
    assert calls[(undo_missing, Action.COMPENSATE)] == 0


def test_every_command_that_is_not_stale_raises_the_epoch_whatever_it_ends_in(harness: Harness) -> None:
    """CONTRACT.md section 6: a retryable error, a dead-lettered command and a refused late
    execute all raise the saga's highest epoch; a lower epoch is refused afterwards."""
    retried, unable, late = new_saga(), new_saga(), new_saga()
    harness.send(command(retried, payload={"fail": "transient"}, epoch=5, reply_topic=harness.reply_topic))
    harness.send(command(retried, Action.COMPENSATE, epoch=4, reply_topic=harness.reply_topic))
    assert [r.outcome for r in harness.wait_replies(retried, 2)] == [ReplyOutcome.RETRYABLE_ERROR,
                                                                      ReplyOutcome.REFUSED]
    assert "stale epoch 4" in (harness.replies[retried][1][1].error or "")

    harness.send(command(unable, step="no-such-step", epoch=7, reply_topic=harness.reply_topic))
    harness.send(command(unable, step="no-such-step", action=Action.COMPENSATE, epoch=6,
                         reply_topic=harness.reply_topic))
    assert [r.outcome for r in harness.wait_replies(unable, 2)] == [ReplyOutcome.BUSINESS_FAILURE,
                                                                     ReplyOutcome.REFUSED]

    harness.send(command(late, Action.COMPENSATE, epoch=2, reply_topic=harness.reply_topic))  # nothing to undo
    harness.send(command(late, epoch=3, reply_topic=harness.reply_topic))  # refused: compensated already
    harness.send(command(late, Action.COMPENSATE, epoch=2, reply_topic=harness.reply_topic))
    outcomes = [(r.outcome, r.error or "") for r in harness.wait_replies(late, 3)]
    assert outcomes[0][0] is ReplyOutcome.SUCCESS
    assert outcomes[1][0] is ReplyOutcome.REFUSED and "compensated" in outcomes[1][1]
    assert outcomes[2][0] is ReplyOutcome.REFUSED and "stale epoch 2" in outcomes[2][1]


def test_a_compensations_success_carries_a_json_output(harness: Harness) -> None:
    """CONTRACT.md section 4: the undo's result, or {} when there was nothing to undo."""
    undone, never_ran, failed = new_saga(), new_saga(), new_saga()
    harness.send(command(undone, reply_topic=harness.reply_topic))
    harness.send(command(undone, Action.COMPENSATE, reply_topic=harness.reply_topic))
    harness.send(command(never_ran, Action.COMPENSATE, reply_topic=harness.reply_topic))
    harness.send(command(failed, payload={"fail": "business"}, reply_topic=harness.reply_topic))
    harness.send(command(failed, Action.COMPENSATE, reply_topic=harness.reply_topic))
    assert harness.wait_replies(undone, 2)[1].output == '{"released":true}'
    [nothing] = harness.wait_replies(never_ran, 1)
    assert (nothing.outcome, nothing.output) == (ReplyOutcome.SUCCESS, "{}")
    assert harness.wait_replies(failed, 2)[1].output == "{}"
    # Replayed from the journal with the same output.
    harness.send(command(never_ran, Action.COMPENSATE, attempt=2, reply_topic=harness.reply_topic))
    assert harness.wait_replies(never_ran, 2)[1].output == "{}"


def test_an_execute_after_its_compensation_is_refused_even_when_its_success_is_recorded(harness: Harness) -> None:
    """CONTRACT.md section 6: both rows match; 'compensate recorded' comes first and wins."""
    saga = new_saga()
    harness.send(command(saga, reply_topic=harness.reply_topic))
    harness.send(command(saga, Action.COMPENSATE, reply_topic=harness.reply_topic))
    harness.send(command(saga, attempt=2, reply_topic=harness.reply_topic))
    executed, compensated, late = harness.wait_replies(saga, 3)
    assert (executed.outcome, compensated.outcome) == (ReplyOutcome.SUCCESS, ReplyOutcome.SUCCESS)
    assert late.outcome is ReplyOutcome.REFUSED and late.output is None
    assert calls[(saga, Action.EXECUTE)] == 1 and calls[(saga, Action.COMPENSATE)] == 1


def test_offsets_and_outbox_are_kept_in_sqlite(harness: Harness) -> None:
    saga = new_saga()
    harness.send(command(saga, reply_topic=harness.reply_topic), partition=1)
    harness.wait_replies(saga, 1)

    def outbox_empty() -> bool:
        with sqlite3.connect(harness.db) as conn:
            return conn.execute("SELECT count(*) FROM saga_outbox").fetchone()[0] == 0

    harness.wait_until(outbox_empty, "delivered replies to be deleted from the outbox")
    high = end_offset(harness.bootstrap, harness.topics.commands(NAME), 1)
    with sqlite3.connect(harness.db) as conn:
        stored = dict(conn.execute("SELECT partition, next_offset FROM saga_consumer_offsets WHERE topic = ?",
                                   (harness.topics.commands(NAME),)).fetchall())
    assert stored[1] == high  # everything on the partition was processed and its position committed



# --- participants of their own: a failing store, the stateless mode -------------------------


class FlakyStore(SqliteStore):
    """Fails the commit of its first batch, as a full disk or a lock timeout would."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.failures_left = 1

    @contextmanager
    def transaction(self) -> Iterator[StoreTransaction]:
        with super().transaction() as tx:
            yield tx
            if self.failures_left:
                self.failures_left -= 1
                raise sqlite3.OperationalError("disk I/O error")


def run_in_thread(participant: Participant) -> threading.Thread:
    thread = threading.Thread(target=participant.run, name=f"participant-{participant.name}")
    thread.start()
    return thread


def test_a_batch_the_store_cannot_commit_is_read_again(
    bootstrap: str, make_topics: Callable[..., Topics], tmp_path: Path
) -> None:
    topics = make_topics(partitions=PARTITIONS, participants=[NAME])
    db = tmp_path / "flaky.db"
    participant = build(topics, bootstrap, db, FlakyStore)
    harness = Harness(bootstrap, topics, db)
    thread = run_in_thread(participant)
    try:
        saga = new_saga()
        harness.send(command(saga, reply_topic=harness.reply_topic, reply_partition=1))
        [reply] = harness.wait_replies(saga, 1)
        assert reply.outcome is ReplyOutcome.SUCCESS
        assert calls[(saga, Action.EXECUTE)] == 2  # run, rolled back with the batch, run again
        assert harness.effects(saga) == [("EXECUTE", 1)]  # but applied once
        harness.wait_until(lambda: participant.unacknowledged == 0, "the reply to be acknowledged")
        assert end_offset(bootstrap, topics.inbox, 1) == 1  # answered once
    finally:
        participant.stop()
        thread.join(30)
        harness.close()


def test_stateless_participant_answers_every_command(
    bootstrap: str, make_topics: Callable[..., Topics], tmp_path: Path
) -> None:
    from participants.examples import noop_participant

    topics = make_topics(partitions=PARTITIONS, participants=["noop"])
    participant = noop_participant("noop", topics=topics, bootstrap=bootstrap, poll_timeout_s=0.1)
    harness = Harness(bootstrap, topics, tmp_path / "unused.db")
    thread = run_in_thread(participant)
    try:
        saga = new_saga()
        for cmd in (command(saga, step="a"), command(saga, step="a"), command(saga, Action.COMPENSATE, step="a")):
            harness.producer.produce(topics.commands("noop"), codec.encode(cmd.model_copy(
                update={"reply_topic": topics.inbox})), key=saga.encode())
        harness.producer.produce(topics.commands("noop"), b"junk", key=b"junk")
        harness.producer.flush(10)
        replies = harness.wait_replies(saga, 3)
        assert [(r.action, r.outcome, r.output) for r in replies] == [
            (Action.EXECUTE, ReplyOutcome.SUCCESS, "{}"),
            (Action.EXECUTE, ReplyOutcome.SUCCESS, "{}"),  # no journal: answered again
            (Action.COMPENSATE, ReplyOutcome.SUCCESS, "{}"),
        ]
        harness.wait_until(lambda: any(d.error_type == "MalformedRecord" for d in harness.dead_letters),
                           "the junk to be dead-lettered")
    finally:
        participant.stop()
        thread.join(30)
        harness.close()
    # Stateless: Kafka's committed offsets are the position, committed once replies were acknowledged.
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": participant.group_id})
    committed = reader.committed([TopicPartition(topics.commands("noop"), p) for p in range(PARTITIONS)], timeout=10)
    reader.close()
    highs = [end_offset(bootstrap, topics.commands("noop"), p) for p in range(PARTITIONS)]
    assert [max(tp.offset, 0) for tp in committed] == highs


# --- the wire format documented in docs/CONTRACT.md -----------------------------------------

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "CONTRACT.md"


def contract_vectors() -> list[bytes]:
    """The hex test vectors of the contract, in order: a command, then a reply."""
    blocks = re.findall(r"```\n((?:[0-9a-f]{2}[ \n])+)```", CONTRACT.read_text())
    return [bytes.fromhex(block) for block in blocks]


def vector_records() -> tuple[ParticipantCommand, ParticipantReply]:
    cmd = ParticipantCommand(
        command_id="s-1/book-flight/execute", saga_id="s-1", saga_type="book-trip", step="book-flight",
        action=Action.EXECUTE, attempt=1, epoch=7, payload="{}", outputs="{}", reply_topic="saga.inbox",
        reply_partition=3, deadline_ms=0, issued_ms=0,
    )
    reply = ParticipantReply(
        command_id=cmd.command_id, saga_id="s-1", step="book-flight", action=Action.EXECUTE, attempt=1, epoch=7,
        outcome=ReplyOutcome.SUCCESS, output="{}", error=None, participant="flights", replied_ms=0,
    )
    return cmd, reply


def spec_fingerprint(schema_file: str) -> bytes:
    """CRC-64-AVRO as the Avro spec defines it (and Java writes it), independent of the codec."""
    from fastavro.schema import to_parsing_canonical_form

    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    schema = json.loads((Path(__file__).resolve().parent.parent / "schemas" / schema_file).read_text())
    for byte in to_parsing_canonical_form(schema).encode():
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def test_contract_vectors_have_the_documented_header_and_body() -> None:
    command_vector, reply_vector = contract_vectors()
    cmd, reply = vector_records()
    assert command_vector[:10] == b"\xc3\x01" + spec_fingerprint("participant_command.avsc")
    assert reply_vector[:10] == b"\xc3\x01" + spec_fingerprint("participant_reply.avsc")
    assert command_vector[10:] == codec.encode(cmd)[10:]
    assert reply_vector[10:] == codec.encode(reply)[10:]
    for schema_file in ("participant_command.avsc", "participant_reply.avsc", "dead_letter.avsc"):
        assert " ".join(f"{b:02x}" for b in spec_fingerprint(schema_file)) in CONTRACT.read_text()


def test_codec_writes_the_contract_bytes() -> None:
    command_vector, reply_vector = contract_vectors()
    cmd, reply = vector_records()
    assert codec.encode(cmd) == command_vector
    assert codec.encode(reply) == reply_vector
    assert codec.decode(command_vector) == cmd


def test_the_journal_keeps_the_epoch_of_the_command_that_took_effect(harness: Harness) -> None:
    """The chaos checker reads it: no command of a fenced epoch took effect after a newer one's."""
    saga = new_saga()
    harness.send(command(saga, epoch=5, reply_topic=harness.reply_topic))
    harness.send(command(saga, Action.COMPENSATE, epoch=6, reply_topic=harness.reply_topic))
    harness.send(command(saga, Action.COMPENSATE, epoch=5, attempt=2, reply_topic=harness.reply_topic))  # stale
    harness.wait_replies(saga, 3)
    with sqlite3.connect(harness.db) as conn:
        rows = conn.execute("SELECT action, epoch FROM saga_journal WHERE saga_id = ? ORDER BY recorded_ms, action DESC", (saga,)).fetchall()
    assert rows == [("EXECUTE", 5), ("COMPENSATE", 6)]


def test_a_journal_from_before_epochs_were_kept_gets_the_column(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE saga_journal (saga_id TEXT NOT NULL, step TEXT NOT NULL, action TEXT NOT NULL, "
            "command_id TEXT NOT NULL, outcome TEXT NOT NULL, output TEXT, error TEXT, recorded_ms INTEGER NOT NULL, "
            "PRIMARY KEY (saga_id, step, action)) WITHOUT ROWID"
        )
        conn.execute("INSERT INTO saga_journal VALUES ('old', 'reserve', 'EXECUTE', 'c1', 'SUCCESS', '{}', NULL, 1)")
    store = SqliteStore(db)
    store.open()
    try:
        with store.transaction() as tx:
            assert tx.journal("old", "reserve")[Action.EXECUTE].epoch is None
            tx.record(JournalEntry("new", "reserve", Action.EXECUTE, "c2", ReplyOutcome.SUCCESS, "{}", None, 2, 9))
        with store.transaction() as tx:
            assert tx.journal("new", "reserve")[Action.EXECUTE].epoch == 9
    finally:
        store.close()
