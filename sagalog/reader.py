"""Reading the saga log from outside a manager: for queries, tests, the demo and the benchmark.

A reader never joins the managers' group and never commits offsets: it ``assign()``s log
partitions and reads them up to the end it saw when it started (read_committed, so only what
managers committed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.errors import BrokerError, DecodeError
from sagalog.fold import PartitionFold, SagaState
from sagalog.kafka import ClientOverrides, reader_config, translate, where
from sagalog.records import Frozen


@dataclass(frozen=True)
class LogEntry:
    partition: int
    offset: int
    key: bytes | None
    item: Frozen | DecodeError | None  # None: a tombstone
    timestamp_ms: int


def scan(
    bootstrap: str,
    topics: Topics,
    *,
    partitions: Iterable[int] | None = None,
    start_offsets: dict[int, int] | None = None,
    codec: Codec | None = None,
    overrides: ClientOverrides | None = None,
    timeout_s: float = 60.0,
) -> Iterator[LogEntry]:
    """Every record of the log (or of some partitions, from given offsets) up to its current end."""
    codec = codec or Codec()
    consumer = Consumer(reader_config(bootstrap, overrides))
    try:
        try:
            meta = consumer.list_topics(timeout=10)  # never name one topic: some brokers then create it
        except KafkaException as err:
            raise translate(err, f"reading {topics.log}") from err
        topic = meta.topics.get(topics.log)
        if topic is None or topic.error is not None:
            raise BrokerError(f"topic {topics.log} does not exist; create it with 'saga topics create'")
        wanted = sorted(topic.partitions) if partitions is None else sorted(partitions)
        # The end of each partition is its partition-EOF event, never the high watermark: some
        # brokers (Tansu) under-report the watermark after multi-record batches.
        pending = set(wanted)
        if not pending:
            return
        consumer.assign([TopicPartition(topics.log, p, (start_offsets or {}).get(p, OFFSET_BEGINNING)) for p in wanted])
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topics.log} did not reach its end within {timeout_s:g}s", retryable=True)
            for msg in consumer.consume(10000, 0.05):
                failure = msg.error()
                if failure is not None and failure.code() != KafkaError._PARTITION_EOF:
                    raise translate(failure, f"reading {topics.log}")  # client-level: no position
                _, p, offset = where(msg)
                if failure is not None:
                    pending.discard(p)
                    continue
                if p not in pending:
                    continue  # past the end this scan promised: left for the next scan
                value = msg.value()
                try:
                    item: Frozen | DecodeError | None = None if value is None else codec.decode(value)
                except DecodeError as bad:
                    item = bad.at(topics.log, p, offset)
                yield LogEntry(p, offset, msg.key(), item, msg.timestamp()[1])
    finally:
        consumer.close()


def fold_log(bootstrap: str, topics: Topics, **kwargs: object) -> dict[int, PartitionFold]:
    """Fold the whole log, partition by partition, exactly as a manager does on takeover."""
    folds: dict[int, PartitionFold] = {}
    for entry in scan(bootstrap, topics, **kwargs):  # type: ignore[arg-type]
        fold = folds.setdefault(entry.partition, PartitionFold(partition=entry.partition))
        fold.apply(entry.key, entry.item, entry.offset)  # type: ignore[arg-type]
    return folds


def saga_states(bootstrap: str, topics: Topics, **kwargs: object) -> dict[str, SagaState]:
    """The current state of every saga on the log."""
    out: dict[str, SagaState] = {}
    for fold in fold_log(bootstrap, topics, **kwargs).values():
        out.update(fold.sagas)
    return out
