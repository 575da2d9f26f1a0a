"""Reading the saga log to its end: the one loop every reader of the log uses.

:func:`read_to_end` reads ``assign()``ed partitions from given offsets up to the end each one
has when it is reached (read_committed, so only what managers committed) and yields what it read
batch by batch. The read model catches up with it (:mod:`sagalog.readmodel`), a manager replays
a partition with it on takeover (:mod:`manager.runtime`), and :func:`scan` uses it to read the
log from outside a manager: for tests, the demo and the benchmark. A reader never joins a
group and never commits offsets.

Importing this module is cheap (no pydantic, no Avro): ``saga status`` reads with it in a fresh
process. Decoding happens in :func:`scan` and in the callers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from sagalog.config import Topics
from sagalog.errors import BrokerError, DecodeError
from sagalog.kafka import ClientOverrides, reader_config, translate, where

if TYPE_CHECKING:
    from sagalog.codec import Codec
    from sagalog.fold import PartitionFold, SagaState
    from sagalog.records import Frozen


@dataclass
class ReadBatch:
    """What one step of :func:`read_to_end` read (anything a ``consume()`` had ready)."""

    #: Data messages (records and tombstones) by partition, in log order.
    messages: dict[int, list[Message]] = field(default_factory=dict)
    #: Partitions whose end was reached in this step: partition -> end offset (the next offset to
    #: read; transaction markers take offsets too, so it can lie past the last message + 1).
    ends: dict[int, int] = field(default_factory=dict)
    #: Partitions whose first delivered offset (a message or the end) lay below the start asked
    #: for: the partition is shorter than what was read before, so it was recreated (on Kafka a
    #: start past the end makes the consumer restart at the beginning, ``auto.offset.reset``).
    resets: set[int] = field(default_factory=set)
    #: Only on the last batch of a read stopped by ``quiet_s``: each partition not read to its end,
    #: with the next offset it was read up to.
    stale: dict[int, int] = field(default_factory=dict)


def read_to_end(
    consumer: Consumer,
    topic: str,
    starts: Mapping[int, int],
    *,
    doing: str = "",
    timeout_s: float | None = None,
    quiet_s: float | None = None,
    max_batch: int = 5000,
) -> Generator[ReadBatch, None, None]:
    """Read partitions of ``topic`` from ``starts`` (partition -> offset, or ``OFFSET_BEGINNING``)
    to their ends, yielding a :class:`ReadBatch` whenever something was read or an end reached.

    The end of a partition is its partition-EOF event (``enable.partition.eof``, as
    :func:`sagalog.kafka.reader_config` sets it), never the high watermark: some brokers (Tansu)
    under-report the watermark after multi-record batches. What arrives for a partition after its
    end is left for the next read. A client-level error (brokers down, a refusal) is raised
    translated (:func:`sagalog.kafka.translate`, with ``doing`` saying what was being done).

    Limits (give one; both may be given):

    * ``timeout_s``: the whole read; past it :class:`BrokerError` (retryable) names the partitions
      that did not reach their end. For readers that must have everything (a takeover's replay).
    * ``quiet_s``: nothing new for this long (no message, no end) stops the read without an error:
      the last batch carries ``stale``. For readers that must answer whatever the broker does
      (queries: an open transaction holds a read_committed reader back on Kafka).

    The partitions are assigned for the read and unassigned when it ends (also when the caller
    stops iterating early), so one consumer can serve many reads.
    """
    doing = doing or f"reading {topic}"
    remaining = set(starts)
    if not remaining:
        return
    _learn_leaders(consumer, topic, min(filter(None, (timeout_s, quiet_s, LEADER_LOOKUP_MAX_S))))
    try:
        consumer.assign([TopicPartition(topic, p, start) for p, start in starts.items()])
    except KafkaException as err:
        raise translate(err, doing) from err
    try:
        started = last_progress = time.monotonic()
        next_offsets: dict[int, int] = {}  # partition -> one past the last message delivered
        seen: set[int] = set()  # partitions that delivered a first message or their end
        while remaining:
            now = time.monotonic()
            if timeout_s is not None and now - started > timeout_s:
                raise BrokerError(
                    f"{doing}: partition(s) {sorted(remaining)} did not reach their end within {timeout_s:g} s",
                    retryable=True,
                )
            if quiet_s is not None and now - last_progress > quiet_s:
                yield ReadBatch(stale={p: next_offsets.get(p, starts[p]) for p in sorted(remaining)})
                return
            batch = ReadBatch()
            for msg in _ready(consumer, max_batch):
                error = msg.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    raise translate(error, doing)  # client-level: it carries no position
                _, p, offset = where(msg)
                if p not in remaining:
                    continue  # past the end this read reached: left for the next read
                if p not in seen:
                    seen.add(p)
                    if offset < starts[p]:
                        batch.resets.add(p)
                if error is not None:  # the end of the partition: offset is where it ends
                    remaining.discard(p)
                    batch.ends[p] = offset
                else:
                    batch.messages.setdefault(p, []).append(msg)
                    next_offsets[p] = offset + 1
            if batch.messages or batch.ends:
                last_progress = time.monotonic()
                yield batch
    finally:
        consumer.unassign()


#: The longest :func:`read_to_end` waits for the topic's metadata before it reads.
LEADER_LOOKUP_MAX_S = 5.0


def _learn_leaders(consumer: Consumer, topic: str, timeout_s: float) -> None:
    """Fetch the topic's metadata (its partitions' leaders) before assigning. librdkafka looks a
    partition's start offset up at once only if it knows the leader; otherwise it retries after
    a fixed 500 ms, so a fresh consumer (a takeover's replay) waited half a second for nothing.
    Best effort: a broker that does not answer is dealt with by the read itself."""
    with contextlib.suppress(KafkaException):
        consumer.list_topics(topic, timeout=timeout_s)


def _ready(consumer: Consumer, max_batch: int) -> list[Message]:
    """Whatever the consumer has, as soon as it has anything (up to 0.1 s): ``consume(n, t)``
    alone would wait out ``t`` for ``n`` messages, and a status query often needs only one EOF."""
    first = consumer.poll(0.1)
    if first is None:
        return []
    return [first, *consumer.consume(max_batch, 0)]


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
    if codec is None:
        from sagalog.codec import Codec

        codec = Codec()
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
        starts = {p: (start_offsets or {}).get(p, OFFSET_BEGINNING) for p in wanted}
        for batch in read_to_end(consumer, topics.log, starts, timeout_s=timeout_s, max_batch=10000):
            for p, msgs in batch.messages.items():
                for msg in msgs:
                    offset = where(msg)[2]
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
    from sagalog.fold import PartitionFold

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
