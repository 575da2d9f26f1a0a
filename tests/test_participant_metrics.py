"""A running participant's /metrics, scraped after N commands, counts what it answered.

Two participants in one process (as ``saga participant run a b`` runs them) share one registry
and one server: one stateful (journal, outbox), one stateless.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from harness import wait_for
from prometheus_client.parser import text_string_to_metric_families

from participants import BusinessFailure, Participant, SqliteStore, StepContext, TransientFailure
from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.records import Action, ParticipantCommand, ParticipantReply

PARTITIONS = 2
codec = Codec()

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: tuple[str, int]) -> Metrics:
    text = urllib.request.urlopen(f"http://127.0.0.1:{address[1]}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def command(saga_id: str, *, topics: Topics, step: str = "reserve", action: Action = Action.EXECUTE,
            attempt: int = 1, epoch: int = 1, payload: Any = None) -> bytes:
    return codec.encode(ParticipantCommand(
        command_id=ParticipantCommand.make_id(saga_id, step, action), saga_id=saga_id, saga_type="test-saga",
        step=step, action=action, attempt=attempt, epoch=epoch, payload=json.dumps(payload or {}), outputs="{}",
        reply_topic=topics.inbox, reply_partition=0, deadline_ms=0, issued_ms=int(time.time() * 1000),
    ))  # fmt: skip


def stock(name: str, topics: Topics, bootstrap: str, db: Path) -> Participant:
    def setup(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS effects (saga_id TEXT, action TEXT)")

    participant = Participant(name, topics=topics, bootstrap=bootstrap, store=SqliteStore(db, setup=setup),
                              poll_timeout_s=0.1, metrics_port=0)

    @participant.execute("reserve")
    def reserve(ctx: StepContext, tx: sqlite3.Connection) -> dict[str, Any]:
        tx.execute("INSERT INTO effects VALUES (?, ?)", (ctx.saga_id, ctx.action.value))
        if ctx.payload.get("fail") == "business":
            raise BusinessFailure("sold out")
        if ctx.payload.get("fail") == "transient" and ctx.attempt < 2:
            raise TransientFailure("inventory busy")
        return {"ticket": ctx.saga_id}

    @participant.compensate("reserve")
    def release(ctx: StepContext, tx: sqlite3.Connection) -> None:
        tx.execute("INSERT INTO effects VALUES (?, ?)", (ctx.saga_id, ctx.action.value))

    return participant


def echo(name: str, topics: Topics, bootstrap: str) -> Participant:
    participant = Participant(name, topics=topics, bootstrap=bootstrap, store=None, poll_timeout_s=0.1, metrics_port=0)

    @participant.execute("*")
    def answer(ctx: StepContext, _tx: None) -> dict[str, Any]:
        return {}

    return participant


@pytest.fixture
def running(bootstrap: str, make_topics, tmp_path: Path) -> Iterator[tuple[Topics, Participant, Participant]]:
    # Unique names: the registry is the process's, shared with any other test's participants.
    nonce = uuid.uuid4().hex[:6]
    names = (f"stock-{nonce}", f"echo-{nonce}")
    topics = make_topics(partitions=PARTITIONS, participants=names)
    participants = (stock(names[0], topics, bootstrap, tmp_path / "stock.db"), echo(names[1], topics, bootstrap))
    threads = [threading.Thread(target=p.run, daemon=True) for p in participants]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(len(p.assigned) == PARTITIONS for p in participants), 60, "both participants to be assigned")
        yield topics, *participants
    finally:
        for p in participants:
            p.stop()
        for thread in threads:
            thread.join(30)


def test_a_participants_metrics_count_what_it_answered(bootstrap: str, running) -> None:
    topics, stock_p, echo_p = running
    s = uuid.uuid4().hex[:6]
    to_stock = [
        command(f"ok1-{s}", topics=topics),
        command(f"ok2-{s}", topics=topics),
        command(f"no-{s}", topics=topics, payload={"fail": "business"}),
        command(f"busy-{s}", topics=topics, payload={"fail": "transient"}),
        command(f"ok1-{s}", topics=topics),  # a duplicate: replayed from the journal
        command(f"fenced-{s}", topics=topics, epoch=2),
        command(f"fenced-{s}", topics=topics, epoch=1),  # a zombie manager's: refused
        command(f"lost-{s}", topics=topics, step="nope"),  # no handler: dead-lettered and answered
        command(f"ok2-{s}", topics=topics, action=Action.COMPENSATE),  # the undo runs
        b"not a command",  # nothing to answer: dead-lettered only
    ]
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
    for i, data in enumerate(to_stock):
        key = f"junk-{s}" if i == len(to_stock) - 1 else codec.decode(data).saga_id
        producer.produce(topics.commands(stock_p.name), data, key=key.encode())
    for i in range(2):
        producer.produce(topics.commands(echo_p.name), command(f"echo{i}-{s}", topics=topics, step="ping"), key=f"echo{i}-{s}".encode())
    producer.flush(10)

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{s}", "enable.auto.commit": False,
                         "isolation.level": "read_committed"})
    consumer.assign([TopicPartition(topics.inbox, p, 0) for p in range(PARTITIONS)])
    replies: list[ParticipantReply] = []

    def all_replies() -> bool:
        for msg in consumer.consume(100, 0.2):
            if msg.error() is None:
                reply = codec.decode(msg.value())
                assert isinstance(reply, ParticipantReply)
                replies.append(reply)
        return len(replies) >= 11

    try:
        wait_for(all_replies, 60, "11 replies (9 from stock, 2 from echo)", interval=0)
    finally:
        consumer.close()
    assert stock_p.metrics_address is not None
    assert echo_p.metrics_address == stock_p.metrics_address  # one server for the process

    def settled() -> Metrics | None:  # delivery reports are served on the participants' next poll
        metrics = scrape(stock_p.metrics_address)
        delivered = value(metrics, "saga_participant_replies_delivered_total", participant=stock_p.name)
        pending = value(metrics, "saga_participant_outbox_pending_rows", participant=stock_p.name)
        return metrics if delivered == 9 and pending == 0 else None

    metrics = wait_for(settled, 30, "the stock participant's replies to be acknowledged")
    assert isinstance(metrics, dict)

    def commands(participant: str, action: str, outcome: str) -> float:
        return value(metrics, "saga_participant_commands_total", participant=participant, action=action, outcome=outcome)

    name = stock_p.name
    assert commands(name, "execute", "success") == 3  # ok1, ok2, fenced at epoch 2
    assert commands(name, "execute", "business_failure") == 1
    assert commands(name, "execute", "retryable_error") == 1
    assert commands(name, "execute", "replayed") == 1
    assert commands(name, "execute", "refused") == 1
    assert commands(name, "execute", "dead_lettered") == 1
    assert commands(name, "unknown", "dead_lettered") == 1
    assert commands(name, "compensate", "success") == 1
    total = sum(v for (n, labels), v in metrics.items() if n == "saga_participant_commands_total" and ("participant", name) in labels)
    assert total == len(to_stock)
    # The handler ran for ok1, ok2, no, busy, fenced (execute) and the compensation of ok2.
    assert value(metrics, "saga_participant_handler_duration_seconds_count", participant=name, step="reserve", action="execute") == 5
    assert value(metrics, "saga_participant_handler_duration_seconds_count", participant=name, step="reserve", action="compensate") == 1
    batches = value(metrics, "saga_participant_batches_total", participant=name, result="committed")
    assert batches >= 1
    assert value(metrics, "saga_participant_batches_total", participant=name, result="failed") == 0
    assert value(metrics, "saga_participant_commit_duration_seconds_count", participant=name) == batches

    # The stateless participant: its own series in the same registry.
    assert commands(echo_p.name, "execute", "success") == 2
    assert value(metrics, "saga_participant_handler_duration_seconds_count", participant=echo_p.name, step="ping", action="execute") == 2
    assert all("saga_id" not in dict(labels) for _, labels in metrics)  # bounded labels only
