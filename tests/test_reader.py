"""``sagalog.reader.read_to_end``: the one loop that reads log partitions to their end.

The read model's catch-up, ``scan()`` and a manager's takeover replay all read with it. Its
rules are checked here on a scripted consumer (every case, exactly, without a broker), then on
the embedded broker (ends past transaction markers, several partitions, nothing past the end).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from sagalog.config import Topics
from sagalog.errors import BrokerError, BrokerUnavailable
from sagalog.kafka import producer_config, reader_config, where
from sagalog.reader import ReadBatch, read_to_end

TOPIC = "t.log"


# --- a scripted consumer ----------------------------------------------------------------------


@dataclass
class Msg:
    """What ``consume()`` returns: a record, a partition-EOF event, or a client-level error."""

    at: int | None  # partition
    position: int | None  # offset
    data: bytes | None = b"v"
    err: KafkaError | None = None

    def error(self) -> KafkaError | None:
        return self.err

    def topic(self) -> str | None:
        return None if self.at is None else TOPIC

    def partition(self) -> int | None:
        return self.at

    def offset(self) -> int | None:
        return self.position

    def value(self) -> bytes | None:
        return self.data

    def key(self) -> bytes | None:
        return b"k"

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)


def record(partition: int, offset: int) -> Msg:
    return Msg(partition, offset)


def end(partition: int, offset: int) -> Msg:
    return Msg(partition, offset, None, KafkaError(KafkaError._PARTITION_EOF))


class ScriptedConsumer:
    """Hands out one scripted batch per poll (an empty list: nothing arrived)."""

    def __init__(self, batches: Iterable[list[Msg]]) -> None:
        self.batches = list(batches)
        self.assigned: list[TopicPartition] | None = None
        self.unassigned = False
        self.calls: list[str] = []

    def list_topics(self, topic: str, timeout: float) -> None:
        self.calls.append(f"metadata {topic}")

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.calls.append("assign")
        self.assigned = partitions

    def unassign(self) -> None:
        self.unassigned = True

    def poll(self, timeout: float) -> Msg | None:
        if not self.batches:
            time.sleep(min(timeout, 0.01))
            return None
        batch = self.batches.pop(0)
        if not batch:
            time.sleep(min(timeout, 0.01))
            return None
        self._rest = batch[1:]
        return batch[0]

    def consume(self, num_messages: int, timeout: float) -> list[Msg]:
        rest, self._rest = self._rest, []
        return rest


def read(consumer: ScriptedConsumer, starts: dict[int, int], **kwargs: object) -> list[ReadBatch]:
    return list(read_to_end(consumer, TOPIC, starts, **kwargs))  # type: ignore[arg-type]


def offsets(batch: ReadBatch) -> dict[int, list[int]]:
    return {p: [where(m)[2] for m in msgs] for p, msgs in batch.messages.items()}  # type: ignore[arg-type]


def test_reads_each_partition_to_its_end_and_yields_batch_by_batch() -> None:
    consumer = ScriptedConsumer(
        [
            [record(0, 5), record(1, 0), record(0, 6)],
            [],
            [end(0, 8), record(1, 1)],  # 8: a transaction marker at 7 took an offset
            [end(1, 2)],
        ]
    )
    batches = read(consumer, {0: 5, 1: 0}, timeout_s=5)
    assert [offsets(b) for b in batches] == [{0: [5, 6], 1: [0]}, {1: [1]}, {}]
    assert [b.ends for b in batches] == [{}, {0: 8}, {1: 2}]
    assert not any(b.resets or b.stale for b in batches)
    assert consumer.assigned is not None
    assert [(tp.topic, tp.partition, tp.offset) for tp in consumer.assigned] == [(TOPIC, 0, 5), (TOPIC, 1, 0)]
    assert consumer.unassigned
    # The leaders are known before the assignment: librdkafka otherwise looks the start offsets
    # up only after a fixed 500 ms (a takeover's fresh reader waited that long for nothing).
    assert consumer.calls == [f"metadata {TOPIC}", "assign"]


def test_what_arrives_after_a_partitions_end_is_left_for_the_next_read() -> None:
    consumer = ScriptedConsumer([[end(0, 3), record(1, 0)], [record(0, 3), record(0, 4), end(1, 1)]])
    batches = read(consumer, {0: 3, 1: 0}, timeout_s=5)
    assert [offsets(b) for b in batches] == [{1: [0]}, {}]
    assert [b.ends for b in batches] == [{0: 3}, {1: 1}]


def test_a_first_offset_below_the_start_is_a_reset() -> None:
    """A log recreated shorter than what was read: on Kafka the consumer restarts at the beginning."""
    consumer = ScriptedConsumer([[record(0, 0), end(1, 2)], [record(0, 1), end(0, 2)]])
    batches = read(consumer, {0: 40, 1: 7}, timeout_s=5)
    assert batches[0].resets == {0, 1}  # an end below the start counts too
    assert batches[1].resets == set()  # only a partition's first delivery says so
    assert offsets(batches[1]) == {0: [1]} and batches[1].ends == {0: 2}


def test_a_client_level_error_is_raised_translated_without_asking_for_its_position() -> None:
    down = Msg(None, None, None, KafkaError(KafkaError._ALL_BROKERS_DOWN))
    consumer = ScriptedConsumer([[record(0, 0)], [down]])
    with pytest.raises(BrokerUnavailable, match="replaying partition 0"):
        read(consumer, {0: 0}, timeout_s=5, doing="replaying partition 0")
    assert consumer.unassigned


def test_the_timeout_raises_a_retryable_error_naming_the_partitions() -> None:
    consumer = ScriptedConsumer([[record(0, 0), end(1, 0)]])
    started = time.monotonic()
    with pytest.raises(
        BrokerError, match=r"partition\(s\) \[0\] did not reach their end within 0.3 s"
    ) as caught:
        read(consumer, {0: 0, 1: 0}, timeout_s=0.3)
    assert caught.value.retryable and 0.3 <= time.monotonic() - started < 2
    assert consumer.unassigned


def test_the_quiet_limit_answers_stale_with_the_offsets_reached() -> None:
    consumer = ScriptedConsumer([[record(0, 10), record(0, 11), end(1, 4)]])
    batches = read(consumer, {0: 10, 1: 4, 2: 9}, quiet_s=0.3)
    assert batches[-1] == ReadBatch(stale={0: 12, 2: 9})
    assert consumer.unassigned


def test_progress_keeps_a_quiet_read_going() -> None:
    slow = [[record(0, i)] if i % 2 == 0 else [] for i in range(40)] + [[end(0, 40)]]
    batches = read(ScriptedConsumer(slow), {0: 0}, quiet_s=0.2)  # 40 polls of ~10 ms: longer than 0.2 s
    assert batches[-1].ends == {0: 40} and not any(b.stale for b in batches)


def test_stopping_early_unassigns() -> None:
    consumer = ScriptedConsumer([[record(0, 0)], [record(0, 1)], [end(0, 2)]])
    with contextlib.closing(read_to_end(consumer, TOPIC, {0: 0}, timeout_s=5)) as reading:  # type: ignore[arg-type]
        next(reading)
    assert consumer.unassigned


def test_nothing_to_read_assigns_nothing() -> None:
    consumer = ScriptedConsumer([])
    assert read(consumer, {}, timeout_s=5) == [] and consumer.assigned is None


# --- on a broker --------------------------------------------------------------------------------


def test_reads_a_transactional_log_to_its_end_past_the_markers(bootstrap: str, topics: Topics) -> None:
    producer = Producer(producer_config(bootstrap, transactional_id=f"{topics.prefix}.writer"))
    producer.init_transactions(10)
    for batch in range(3):
        producer.begin_transaction()
        for i in range(4):
            producer.produce(topics.log, f"{batch}-{i}".encode(), key=b"k", partition=i % 2)
        producer.commit_transaction(10)
    consumer = Consumer(reader_config(bootstrap))
    try:
        values: dict[int, list[bytes | None]] = {0: [], 1: []}
        ends: dict[int, int] = {}
        for batch in read_to_end(
            consumer, topics.log, {0: OFFSET_BEGINNING, 1: OFFSET_BEGINNING}, timeout_s=30
        ):
            for p, msgs in batch.messages.items():
                values[p] += [m.value() for m in msgs]
            ends.update(batch.ends)
        assert values == {
            0: [b"0-0", b"0-2", b"1-0", b"1-2", b"2-0", b"2-2"],
            1: [b"0-1", b"0-3", b"1-1", b"1-3", b"2-1", b"2-3"],
        }
        assert ends == {0: 9, 1: 9}  # 6 records and 3 commit markers each

        # From the end: nothing new, the end again; the same consumer serves another read.
        again = list(read_to_end(consumer, topics.log, ends, timeout_s=30))
        assert [b.messages for b in again] == [{}] * len(again) and {
            p: e for b in again for p, e in b.ends.items()
        } == ends
    finally:
        consumer.close()
