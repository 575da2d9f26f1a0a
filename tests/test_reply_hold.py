"""The relay's reply hold (``Participant(reply_hold_s=...)``, ``saga participant run --step-time-ms``).

A simulation knob: it models a service whose steps take time but run pipelined. The handler runs
at once and its batch commits as usual; only the relay holds each reply before sending it. So a
held reply arrives no earlier than its hold, is durable in the outbox meanwhile, and several
commands' replies arrive about one hold after they were sent, not one hold after another.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from participants import OutboxRelay, OutboxRow, Participant, SqliteStore, StepContext
from participants.examples import ExampleOptions, parse_step_time_ms
from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.errors import ConfigError
from sagalog.records import Action, ParticipantCommand, ParticipantReply, ReplyOutcome
from sagalog.topics import ensure_topics

codec = Codec()


# --- the relay alone, with a producer that records what it is asked to send ----------------------


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self._callbacks: list[Any] = []

    def produce(self, topic: str, *, key: bytes | None, value: bytes, on_delivery: Any, partition: int = -1) -> None:
        self.sent.append((topic, value))
        self._callbacks.append(on_delivery)

    def poll(self, _timeout: float = 0) -> int:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(None, None)  # acknowledged
        return len(callbacks)

    def flush(self, _timeout: float = 0) -> int:
        self.poll()
        return 0


def rows(*ids: int, topic: str = "replies") -> list[OutboxRow]:
    return [OutboxRow(i, topic, 0, b"k", f"v{i}".encode()) for i in ids]


def test_relay_holds_new_rows_and_sends_them_once_due() -> None:
    producer = FakeProducer()
    relay = OutboxRelay(producer, codec=codec, dead_letters="dead", component="t",  # type: ignore[arg-type]
                        hold_s=(0.3, 0.3))
    started = time.monotonic()
    relay.publish(rows(1, 2, 3))
    relay.publish(rows(4, topic="dead"))  # dead letters are not a step's work: never held
    relay.service()
    assert [v for _, v in producer.sent] == [b"v4"]
    assert relay.held == 3 and relay.in_flight == 3
    due = relay.next_due_s()
    assert due is not None and 0.2 < due <= 0.3
    while relay.held:
        time.sleep(0.02)
        relay.service()
    assert time.monotonic() - started >= 0.3
    relay.service()  # delivery reports
    assert sorted(v for _, v in producer.sent) == [b"v1", b"v2", b"v3", b"v4"]
    assert sorted(relay.take_delivered()) == [1, 2, 3, 4]
    assert relay.in_flight == 0 and relay.next_due_s() is None


def test_relay_without_hold_or_on_flush_sends_at_once() -> None:
    producer = FakeProducer()
    relay = OutboxRelay(producer, codec=codec, dead_letters="dead", component="t",  # type: ignore[arg-type]
                        hold_s=(30.0, 30.0))
    relay.publish(rows(1), hold=False)  # a restart's leftovers: their hold passed while it was down
    relay.publish(rows(2, 3))
    assert [v for _, v in producer.sent] == [b"v1"]
    assert relay.flush(1.0) == 0  # stopping: held replies leave now
    assert sorted(v for _, v in producer.sent) == [b"v1", b"v2", b"v3"]
    assert relay.held == 0


def test_step_time_parsing_and_validation() -> None:
    assert parse_step_time_ms("100-500") == (100, 500)
    assert parse_step_time_ms("250") == (250, 250)
    assert parse_step_time_ms("0") is None and parse_step_time_ms("0-0") is None
    for bad in ("500-100", "x", "-5", "1-2-3"):
        with pytest.raises(ConfigError):
            parse_step_time_ms(bad)
    assert ExampleOptions(step_time_ms=(100, 500)).reply_hold_s == (0.1, 0.5)
    assert ExampleOptions().reply_hold_s is None
    with pytest.raises(ConfigError):
        Participant("p", topics=Topics(prefix="t"), bootstrap="x", store=None, reply_hold_s=(0.5, 0.1))


# --- a participant on the broker --------------------------------------------------------------

HOLD_S = 0.8
COMMANDS = 6


def make_command(saga_id: str, reply_topic: str) -> ParticipantCommand:
    return ParticipantCommand(
        command_id=ParticipantCommand.make_id(saga_id, "work", Action.EXECUTE),
        saga_id=saga_id,
        saga_type="test-saga",
        step="work",
        action=Action.EXECUTE,
        attempt=1,
        epoch=1,
        payload="{}",
        outputs="{}",
        reply_topic=reply_topic,
        reply_partition=0,
        deadline_ms=0,
        issued_ms=int(time.time() * 1000),
    )


def test_held_replies_arrive_one_hold_later_and_the_handler_is_not_slowed(bootstrap: str, tmp_path: Path) -> None:
    topics = Topics(prefix=f"t.hold.{uuid.uuid4().hex[:8]}")
    ensure_topics(bootstrap, topics, partitions=1, participants=["slow"])
    db = tmp_path / "slow.db"
    handled: dict[str, float] = {}  # saga id -> when its handler ran (monotonic)

    participant = Participant("slow", topics=topics, bootstrap=bootstrap, store=SqliteStore(db),
                              poll_timeout_s=0.1, reply_hold_s=(HOLD_S, HOLD_S))

    @participant.execute("work")
    def work(ctx: StepContext, tx: sqlite3.Connection) -> dict[str, Any]:
        handled[ctx.saga_id] = time.monotonic()
        return {"done": ctx.saga_id}

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topics.inbox, 0, 0)])
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    thread = threading.Thread(target=participant.run, name="slow-participant")
    thread.start()
    try:
        # A warm-up command: the participant has joined its group once its reply comes back.
        warm = f"warm-{uuid.uuid4().hex[:8]}"
        producer.produce(topics.commands("slow"), codec.encode(make_command(warm, topics.inbox)), key=warm.encode())
        producer.flush(10)
        deadline = time.monotonic() + 60
        while not any(m.error() is None for m in consumer.consume(10, 0.2)):
            assert time.monotonic() < deadline, "the participant never answered the warm-up command"

        sagas = [f"s{i}-{uuid.uuid4().hex[:8]}" for i in range(COMMANDS)]
        sent = time.monotonic()
        for saga in sagas:
            producer.produce(topics.commands("slow"), codec.encode(make_command(saga, topics.inbox)), key=saga.encode())
        producer.flush(10)

        arrived: dict[str, tuple[float, ParticipantReply, int]] = {}
        outbox_seen = 0
        deadline = time.monotonic() + 30
        while len(arrived) < COMMANDS:
            assert time.monotonic() < deadline, f"only {len(arrived)}/{COMMANDS} replies arrived"
            if not arrived:  # during the hold: the replies are committed in the outbox already
                with sqlite3.connect(db) as conn:
                    keys = {k.decode() for (k,) in conn.execute("SELECT key FROM saga_outbox")}
                outbox_seen = max(outbox_seen, len(keys & set(sagas)))
            for msg in consumer.consume(50, 0.05):
                if msg.error() is not None:
                    continue
                reply = codec.decode(msg.value())
                assert isinstance(reply, ParticipantReply)
                arrived[reply.saga_id] = (time.monotonic(), reply, msg.timestamp()[1])
    finally:
        participant.stop()
        thread.join(30)
        consumer.close()
    assert not thread.is_alive()

    assert set(arrived) == set(sagas)
    assert outbox_seen == COMMANDS  # durable before being sent: a crash would re-publish them
    for saga in sagas:
        at, reply, produced_ms = arrived[saga]
        assert reply.outcome is ReplyOutcome.SUCCESS and json.loads(reply.output or "") == {"done": saga}
        # No earlier than the hold: after the handler ran, and as produced (CreateTime).
        assert at - handled[saga] >= HOLD_S
        assert produced_ms - reply.replied_ms >= HOLD_S * 1000 - 5  # ms clocks: a few ms of rounding
    # The handler was not slowed down: every command was handled at once, not one hold apart...
    assert max(handled[s] for s in sagas) - sent < HOLD_S / 2
    # ...and every reply came about one hold after the commands went out, not COMMANDS holds.
    last = max(at for at, _, _ in arrived.values())
    assert last - sent < HOLD_S + 1.0, f"replies trickled in over {last - sent:.2f} s"
