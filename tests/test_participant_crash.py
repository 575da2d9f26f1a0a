"""A participant killed between its SQLite commit and the publish of its reply.

The process runs with the crash hook (``SAGA_PARTICIPANT_CRASH_AFTER_COMMIT=1``): it takes
the flight seats, commits journal + outbox + command offset, and SIGKILLs itself before any
reply leaves. Restarted without the hook, it must publish that reply exactly once, not run
the command again, and go on serving.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from harness import end_offset

from participants import CRASH_AFTER_COMMIT_ENV
from participants.examples import db_path, inventory_report
from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.records import Action, ParticipantCommand, ParticipantReply, ReplyOutcome

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60.0
codec = Codec()


def flight_command(topics: Topics, saga_id: str, travellers: int) -> ParticipantCommand:
    return ParticipantCommand(
        command_id=ParticipantCommand.make_id(saga_id, "book-flight", Action.EXECUTE),
        saga_id=saga_id,
        saga_type="book-trip",
        step="book-flight",
        action=Action.EXECUTE,
        attempt=1,
        epoch=1,
        payload=json.dumps({"flight": "SK-101", "travellers": travellers}),
        outputs="{}",
        reply_topic=topics.inbox,
        reply_partition=0,
        deadline_ms=0,
        issued_ms=int(time.time() * 1000),
    )


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    pause = 0.05
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(pause)  # polling a file or a process: there is no event to wait on
        pause = min(pause * 2, 0.5)


@pytest.fixture
def run_participant(bootstrap: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(topics: Topics, *, crash: bool) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop(CRASH_AFTER_COMMIT_ENV, None)
        if crash:
            env[CRASH_AFTER_COMMIT_ENV] = "1"
        log = open(tmp_path / f"participant-{len(procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "sagacli", "participant", "run", "flights",
             "--db-dir", str(tmp_path / "db"), "-b", bootstrap, "--topic-prefix", topics.prefix,
             "--capacity", "10", "--session-timeout-ms", "6000"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_killed_after_commit_replies_exactly_once_after_restart(
    bootstrap: str, make_topics: Callable[..., Topics], run_participant: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    topics = make_topics(partitions=2, participants=["flights"])
    db = db_path(tmp_path / "db", "flights")
    producer = Producer({"bootstrap.servers": bootstrap})

    def send(cmd: ParticipantCommand) -> None:
        producer.produce(topics.commands("flights"), codec.encode(cmd), key=cmd.saga_id.encode(), partition=0)
        producer.flush(10)

    send(flight_command(topics, "trip-1", travellers=2))
    crashing = run_participant(topics, crash=True)
    assert crashing.wait(TIMEOUT_S) == -signal.SIGKILL

    # Committed locally, not published: seats taken, reply waiting in the outbox, none sent.
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM saga_journal").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM saga_outbox").fetchone()[0] == 1
        assert conn.execute("SELECT next_offset FROM saga_consumer_offsets WHERE partition = 0").fetchone()[0] == 1
    assert inventory_report(db).holds == {"trip-1": ("SK-101", 2)}
    assert end_offset(bootstrap, topics.inbox, 0) == 0

    # Restart without the hook, and give it one more command behind the first.
    survivor = run_participant(topics, crash=False)
    send(flight_command(topics, "trip-2", travellers=1))
    replies = Consumer({"bootstrap.servers": bootstrap, "group.id": "crash-test-reader",
                        "isolation.level": "read_committed", "enable.auto.commit": False})
    replies.assign([TopicPartition(topics.inbox, 0, 0)])
    seen: list[ParticipantReply] = []

    def both_answered() -> bool:
        for msg in replies.consume(100, 0.2):
            if not msg.error():
                reply = codec.decode(msg.value())
                assert isinstance(reply, ParticipantReply)
                seen.append(reply)
        return {r.saga_id for r in seen} >= {"trip-1", "trip-2"}

    wait_for(both_answered, "replies to trip-1 and trip-2")

    def outbox_empty() -> bool:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*) FROM saga_outbox").fetchone()[0] == 0

    wait_for(outbox_empty, "the outbox to drain")
    # trip-2 was answered after trip-1's command, on the same partitions: had trip-1 been run or
    # answered again, that reply would be on the reply partition by now.
    assert end_offset(bootstrap, topics.inbox, 0) == 2
    assert sorted((r.saga_id, r.outcome) for r in seen) == [("trip-1", ReplyOutcome.SUCCESS),
                                                            ("trip-2", ReplyOutcome.SUCCESS)]
    trip1 = next(r for r in seen if r.saga_id == "trip-1")
    assert json.loads(trip1.output or "")["quantity"] == 2

    report = inventory_report(db)
    assert report.holds == {"trip-1": ("SK-101", 2), "trip-2": ("SK-101", 1)}
    assert report.items["SK-101"].available == 7 and report.balanced
    replies.close()

    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(30) == 0
