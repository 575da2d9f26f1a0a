"""The dead-letter topic, read incrementally: ``<prefix>.dead-letters`` with a plain group-less
``read_committed`` reader (:func:`sagalog.kafka.reader_config`), decoded with the project's
codec. Not thread-safe: one reader belongs to one thread (the console's broker thread).

Each refresh reads what was appended since the last one, up to each partition's end (the EOF
event, as the read model does: never the high watermark), and keeps the newest ``keep`` letters
in memory. Nothing is committed, nothing is stored on disk: a restarted console reads the topic
again from its beginning (dead letters are rare; the topic has a delete policy).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.errors import DecodeError
from sagalog.kafka import ClientOverrides, reader_config, translate, where
from sagalog.records import DeadLetter


@dataclass(frozen=True)
class Letter:
    """One dead letter as the console shows it."""

    partition: int
    offset: int
    dead_lettered_ms: int
    reason: str
    error_type: str
    component: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: str | None
    value_size: int | None
    value_preview: str | None  # the original message: decoded JSON when it is one of our records, else bytes

    @classmethod
    def of(cls, partition: int, offset: int, letter: DeadLetter, codec: Codec) -> Letter:
        return cls(
            partition=partition,
            offset=offset,
            dead_lettered_ms=letter.dead_lettered_ms,
            reason=letter.reason,
            error_type=letter.error_type,
            component=letter.component,
            source_topic=letter.source_topic,
            source_partition=letter.source_partition,
            source_offset=letter.source_offset,
            key=None if letter.key is None else letter.key.decode("utf-8", "replace"),
            value_size=None if letter.value is None else len(letter.value),
            value_preview=_preview(letter.value, codec),
        )

    @classmethod
    def undecodable(cls, partition: int, offset: int, timestamp_ms: int, key: bytes | None, why: str) -> Letter:
        """A message on the dead-letter topic that is not a DeadLetter record (shown, not hidden)."""
        return cls(
            partition=partition,
            offset=offset,
            dead_lettered_ms=timestamp_ms,
            reason=f"not a DeadLetter record: {why}",
            error_type="(undecodable)",
            component="?",
            source_topic="?",
            source_partition=-1,
            source_offset=-1,
            key=None if key is None else key.decode("utf-8", "replace"),
            value_size=None,
            value_preview=None,
        )


def _preview(value: bytes | None, codec: Codec, limit: int = 400) -> str | None:
    if value is None:
        return None
    try:
        record = codec.decode(value)
        text = f"{type(record).__name__} {json.dumps(record.model_dump(mode='json'), separators=(',', ':'))}"
    except DecodeError:
        printable = value.decode("utf-8", "replace")
        if sum(ch == "\ufffd" or (not ch.isprintable() and ch not in "\n\t") for ch in printable) > len(printable) // 4:
            text = "0x" + value[:128].hex() + ("…" if len(value) > 128 else "")
        else:
            text = printable
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class DeadLetters:
    """What the page shows: the newest letters first, how many were read in all."""

    letters: tuple[Letter, ...]
    total: int
    topic_exists: bool
    read_ms: int  # wall clock of the refresh


class DeadLetterReader:
    """Reads ``topics.dead_letters`` incrementally and keeps the newest ``keep`` letters."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        *,
        overrides: ClientOverrides | None = None,
        timeout_s: float = 3.0,
        keep: int = 1000,
        codec: Codec | None = None,
    ) -> None:
        self.bootstrap, self.topic, self.timeout_s = bootstrap, topics.dead_letters, timeout_s
        self.overrides = dict(overrides or {})
        self.codec = codec or Codec()
        self._consumer: Consumer | None = None
        self._next: dict[int, int] = {}
        self._letters: deque[Letter] = deque(maxlen=keep)
        self._total = 0
        self._partitions: int | None = None
        self._metadata_ms = 0.0

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _client(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(reader_config(self.bootstrap, self.overrides))
        return self._consumer

    def _partition_count(self) -> int | None:
        """Partitions of the topic (None: it does not exist); metadata asked at most every 30 s."""
        if self._partitions is None or time.monotonic() - self._metadata_ms > 30:
            try:
                # All topics, never one by name: brokers with auto-creation would create it.
                meta = self._client().list_topics(timeout=self.timeout_s)
            except KafkaException as err:
                raise translate(err, f"reading metadata from {self.bootstrap}") from err
            topic = meta.topics.get(self.topic)
            self._partitions = len(topic.partitions) if topic is not None and topic.error is None else None
            self._metadata_ms = time.monotonic()
        return self._partitions

    def refresh(self) -> DeadLetters:
        """Read what is new, up to each partition's end (or ``timeout_s`` without progress)."""
        count = self._partition_count()
        if count is None:
            return DeadLetters((), 0, False, int(time.time() * 1000))
        consumer = self._client()
        starts = {p: self._next.get(p, 0) for p in range(count)}
        try:
            consumer.assign([TopicPartition(self.topic, p, o) for p, o in starts.items()])
        except KafkaException as err:
            raise translate(err, f"reading {self.topic}") from err
        new: list[Letter] = []
        try:
            remaining, last_progress = set(starts), time.monotonic()
            while remaining and time.monotonic() - last_progress < self.timeout_s:
                first = consumer.poll(0.1)
                if first is None:
                    continue
                for msg in (first, *consumer.consume(1000, 0)):
                    error = msg.error()
                    _, p, offset = where(msg)
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            raise translate(error, f"reading {self.topic}")
                        remaining.discard(p)
                        self._next[p] = max(self._next.get(p, 0), offset)
                        continue
                    last_progress = time.monotonic()
                    self._next[p] = offset + 1
                    new.append(self._letter(p, offset, msg))
        finally:
            consumer.unassign()
        if new:
            merged = sorted([*self._letters, *new], key=lambda x: (x.dead_lettered_ms, x.partition, x.offset))
            self._letters = deque(merged, maxlen=self._letters.maxlen)
            self._total += len(new)
        newest_first = tuple(reversed(self._letters))
        return DeadLetters(newest_first, self._total, True, int(time.time() * 1000))

    def _letter(self, partition: int, offset: int, msg: Any) -> Letter:
        try:
            record = self.codec.decode(msg.value())
        except DecodeError as err:
            return Letter.undecodable(partition, offset, msg.timestamp()[1], msg.key(), str(err))
        if not isinstance(record, DeadLetter):
            return Letter.undecodable(partition, offset, msg.timestamp()[1], msg.key(), type(record).__name__)
        return Letter.of(partition, offset, record, self.codec)
