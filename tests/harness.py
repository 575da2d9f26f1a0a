"""Test harness: real manager processes, a scriptable participant on raw confluent-kafka, log queries.

The scripted participant is deliberately written against ``schemas/`` + raw confluent-kafka only
(no SDK), so it doubles as proof that the topic contract is enough to take part.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from sagacli.process import Child, sagacli_command
from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.fold import SagaState
from sagalog.kafka import consumer_config, producer_config
from sagalog.reader import saga_states
from sagalog.records import CancelSaga, ParticipantCommand, ParticipantReply, ReplyOutcome, StartSaga

CODEC = Codec()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class ManagerProcess(Child):
    """``saga manager`` as a real OS process, so it can be SIGKILLed and SIGSTOPped."""

    def __init__(self, bootstrap: str, topics: Topics, definitions: Path, log_dir: Path, name: str, *, partitions: int = 4, session_timeout_ms: int = 6000, extra: tuple[str, ...] = ()) -> None:
        command = sagacli_command(
            "manager",
            "-b", bootstrap, "--topic-prefix", topics.prefix, "--group-id", f"{topics.prefix}-managers",
            "--definitions", str(definitions), "--partitions", str(partitions),
            "--session-timeout-ms", str(session_timeout_ms), "--log-level", "INFO", *extra,
        )  # fmt: skip
        # A generous grace: tests assert a clean exit (0), also on a busy machine.
        super().__init__(name, command, log_dir / f"{name}.log", stop_grace_s=20.0)


Behaviour = Callable[[ParticipantCommand], Iterable[ParticipantReply]]


def reply_to(cmd: ParticipantCommand, outcome: ReplyOutcome = ReplyOutcome.SUCCESS, output: str | None = "{}", error: str | None = None) -> ParticipantReply:
    return ParticipantReply(
        command_id=cmd.command_id, saga_id=cmd.saga_id, step=cmd.step, action=cmd.action, attempt=cmd.attempt,
        epoch=cmd.epoch, outcome=outcome, output=output if outcome is ReplyOutcome.SUCCESS else None,
        error=error, participant="scripted", replied_ms=int(time.time() * 1000),
    )


def succeed(cmd: ParticipantCommand) -> list[ParticipantReply]:
    return [reply_to(cmd)]


@dataclass
class ScriptedParticipant:
    """Consumes command topics and answers as ``behaviour`` says; remembers every command."""

    bootstrap: str
    topics: Topics
    participants: list[str]
    behaviour: Behaviour = succeed
    delay_s: float = 0.0  # replies leave this long after the command arrived (keeps sagas in flight)
    received: list[ParticipantCommand] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> ScriptedParticipant:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        consumer = Consumer(consumer_config(self.bootstrap, f"{self.topics.prefix}-scripted", session_timeout_ms=6000))
        consumer.subscribe([self.topics.commands(p) for p in self.participants])
        producer = Producer(producer_config(self.bootstrap))
        held: list[tuple[float, ParticipantCommand, ParticipantReply]] = []
        try:
            while not self._stop.is_set():
                for msg in consumer.consume(500, 0.02):
                    if msg.error():
                        continue
                    cmd = CODEC.decode(msg.value())
                    assert isinstance(cmd, ParticipantCommand)
                    self.received.append(cmd)
                    due = time.monotonic() + self.delay_s
                    held.extend((due, cmd, reply) for reply in self.behaviour(cmd))
                now = time.monotonic()
                ready = [h for h in held if h[0] <= now]
                held = [h for h in held if h[0] > now]
                for _, cmd, reply in ready:
                    producer.produce(cmd.reply_topic, CODEC.encode(reply), key=cmd.saga_id.encode(), partition=cmd.reply_partition)
                producer.poll(0)
        finally:
            producer.flush(5)
            consumer.close()

    def commands_for(self, saga_id: str) -> list[tuple[str, str, int]]:
        return [(c.step, c.action.value, c.attempt) for c in list(self.received) if c.saga_id == saga_id]


def start_sagas(bootstrap: str, topics: Topics, saga_type: str, ids: Iterable[str], payload: str = "{}") -> None:
    producer = Producer(producer_config(bootstrap))
    for saga_id in ids:
        producer.produce(topics.inbox, CODEC.encode(StartSaga(saga_id=saga_id, saga_type=saga_type, payload=payload, requested_ms=int(time.time() * 1000))), key=saga_id.encode())
    producer.flush(10)


def cancel_saga(bootstrap: str, topics: Topics, saga_id: str, reason: str = "test") -> None:
    producer = Producer(producer_config(bootstrap))
    producer.produce(topics.inbox, CODEC.encode(CancelSaga(saga_id=saga_id, reason=reason, requested_ms=0)), key=saga_id.encode())
    producer.flush(10)


def wait_terminal(bootstrap: str, topics: Topics, ids: Iterable[str], timeout: float) -> dict[str, SagaState]:
    wanted = set(ids)

    def check() -> dict[str, SagaState] | None:
        states = saga_states(bootstrap, topics)
        done = {k: v for k, v in states.items() if k in wanted and v.status.terminal}
        return states if len(done) == len(wanted) else None

    return wait_for(check, timeout, f"{len(wanted)} sagas to finish", interval=0.5)  # type: ignore[return-value]


def end_offset(bootstrap: str, topic: str, partition: int, timeout_s: float = 10.0) -> int:
    """The next offset of a partition, read to its end (partition EOF, from fetch responses).

    Not ``get_watermark_offsets``: Tansu answers ListOffsets with the base offset + 1 of the
    last record batch, which undercounts when that batch holds several records.
    """
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": "end-offset-reader",
                       "enable.partition.eof": True, "isolation.level": "read_committed"})
    try:
        reader.assign([TopicPartition(topic, partition, 0)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = reader.poll(0.5)
            error = msg.error() if msg is not None else None
            if msg is not None and error is not None and error.code() == KafkaError._PARTITION_EOF:
                return int(msg.offset() or 0)
        raise AssertionError(f"no end of {topic}[{partition}] within {timeout_s}s")
    finally:
        reader.close()
