"""The load generator (open loop: it never waits for the system) and the log tailer.

Start time of a saga = when the generator produced its ``StartSaga`` (wall clock, ms).
End time = the ``timestamp_ms`` of its ``SagaEnded`` record, which the manager stamps when it
decides (same machine, same clock). The tailer reads the log ``read_committed``, like any
consumer, so a saga counts as done only once the transaction holding its end is committed.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from sagacli.bench.wire import StartEncoder
from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.errors import DecodeError
from sagalog.kafka import producer_config, reader_config
from sagalog.peek import LogPeek
from sagalog.records import CLAIM_KEY_PREFIX, DEFINITION_KEY_PREFIX, PartitionClaim, SagaLogRecord

CLAIM_PREFIX = CLAIM_KEY_PREFIX


def now_ms() -> float:
    return time.time() * 1000.0


def saga_ids(tag: str, count: int, start: int = 0) -> list[bytes]:
    """Fixed-width ids, so every StartSaga of a run has the same size."""
    return [f"{tag}-{i:08d}".encode() for i in range(start, start + count)]


@dataclass
class Sent:
    """What one generator run did."""

    count: int
    first_ms: float
    last_ms: float
    max_lag_ms: float  # how far the generator fell behind its schedule (open loop: it catches up)

    @property
    def seconds(self) -> float:
        return max(1e-9, (self.last_ms - self.first_ms) / 1000)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.count > 1 else 0.0


class Generator:
    """Produces StartSaga requests to the inbox, keyed by saga id, as any client would."""

    def __init__(self, bootstrap: str, topics: Topics, encoder: StartEncoder) -> None:
        self.topics = topics
        self.encoder = encoder
        self.producer = Producer(
            producer_config(bootstrap, overrides={"queue.buffering.max.messages": 2_000_000, "client.id": "bench-generator"})
        )
        self.sent: dict[bytes, float] = {}

    def _send(self, key: bytes) -> None:
        t = now_ms()
        value = self.encoder.encode(key.decode(), int(t))
        while True:
            try:
                self.producer.produce(self.topics.inbox, value=value, key=key)
                break
            except BufferError:
                self.producer.poll(0.01)
        self.sent[key] = t

    def burst(self, ids: Sequence[bytes]) -> Sent:
        """All at once (a closed batch): as fast as the client can produce."""
        first = now_ms()
        for i, key in enumerate(ids):
            self._send(key)
            if i % 1000 == 999:
                self.producer.poll(0)
        self.producer.flush(30)
        return Sent(len(ids), first, now_ms(), 0.0)

    def paced(self, ids: Sequence[bytes], rate: float, stop: threading.Event | None = None) -> Sent:
        """Open loop at ``rate`` per second: saga i is due at i / rate, whatever the system does."""
        start = time.perf_counter()
        first = now_ms()
        max_lag = 0.0
        i = 0
        n = len(ids)
        while i < n and not (stop is not None and stop.is_set()):
            now = time.perf_counter()
            due = min(n, int((now - start) * rate) + 1)
            if due > i:
                max_lag = max(max_lag, (now - (start + i / rate)) * 1000)
            while i < due:
                self._send(ids[i])
                i += 1
            self.producer.poll(0)
            pause = start + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(max(pause, 0.0005))  # the schedule, not synchronisation
        self.producer.flush(30)
        return Sent(i, first, now_ms(), max_lag)

    def close(self) -> None:
        self.producer.flush(10)


class LogTailer:
    """Follows the whole log from the beginning in a thread, keeping what the parts need:

    * ``ended``: saga id -> ``SagaEnded.timestamp_ms``
    * ``begun``: saga id -> ``SagaBegun.timestamp_ms`` (when the manager admitted it)
    * ``counts``: records seen per event type
    * ``claims``: the newest ``PartitionClaim`` of each partition, and ``after_claim``: the first
      saga record (timestamp, epoch) written on a partition after its newest claim
    """

    def __init__(self, bootstrap: str, topics: Topics, partitions: int, codec: Codec) -> None:
        self.topics = topics
        self.partitions = partitions
        self.codec = codec
        self.peek = LogPeek(codec)
        self.ended: dict[bytes, int] = {}
        self.begun: dict[bytes, int] = {}
        self.counts: Counter[str] = Counter()
        self.claims: dict[int, PartitionClaim] = {}
        self.claim_seen_ms: dict[int, float] = {}
        self.after_claim: dict[int, tuple[int, int] | None] = {}
        self.records = 0
        self.per_partition: Counter[int] = Counter()  # data records (not transaction markers) seen
        self.last_offset: dict[int, int] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        config = reader_config(
            bootstrap,
            overrides={
                "group.id": f"bench-tailer-{uuid.uuid4().hex[:8]}",
                "enable.partition.eof": False,
                "fetch.wait.max.ms": 50,
                "client.id": "bench-tailer",
            },
        )
        self.consumer = Consumer(config)
        self.thread = threading.Thread(target=self._run, name="bench-log-tailer", daemon=True)

    def start(self) -> LogTailer:
        self.consumer.assign([TopicPartition(self.topics.log, p, OFFSET_BEGINNING) for p in range(self.partitions)])
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(10)
        with contextlib.suppress(Exception):
            self.consumer.close()

    def check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the log tailer failed: {self._error}") from self._error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for msg in self.consumer.consume(10000, 0.1):
                    if msg.error() is None:
                        p = msg.partition()
                        self.per_partition[p] += 1
                        self.last_offset[p] = msg.offset()
                        self._take(p, msg.key(), msg.value())
        except BaseException as err:  # reported to the main thread by check()
            self._error = err

    def _take(self, p: int, key: bytes | None, value: bytes | None) -> None:
        self.records += 1
        if value is None:
            self.counts["tombstone"] += 1
            return
        if key is not None and key.startswith(DEFINITION_KEY_PREFIX):  # once per definition and partition
            self.counts["SagaDefinitionRecord"] += 1
            return
        peeked = self.peek.peek(value)
        if peeked is None:
            self._take_slow(p, key, value)
            return
        self.counts.update(peeked.events)
        if key is not None:
            if peeked.event == "SagaEnded":  # always a record's last event
                self.ended[key] = peeked.timestamp_ms
            elif peeked.events[0] == "SagaBegun":  # always a record's first
                self.begun[key] = peeked.timestamp_ms
        if self.after_claim.get(p, 0) is None:
            claim = self.claims.get(p)
            if claim is not None and peeked.epoch >= claim.epoch:
                with self.lock:
                    self.after_claim[p] = (peeked.timestamp_ms, peeked.epoch)

    def _take_slow(self, p: int, key: bytes | None, value: bytes) -> None:
        try:
            item = self.codec.decode(value)
        except DecodeError:
            self.counts["undecodable"] += 1
            return
        if isinstance(item, PartitionClaim):
            self.counts["PartitionClaim"] += 1
            with self.lock:
                current = self.claims.get(p)
                if current is None or item.epoch >= current.epoch:
                    self.claims[p] = item
                    self.claim_seen_ms[p] = now_ms()
                    self.after_claim[p] = None
        elif isinstance(item, SagaLogRecord):  # written by an older schema version
            events = [type(e).__name__ for e in item.events]
            self.counts.update(events)
            if events[-1] == "SagaEnded":
                self.ended[item.saga_id.encode()] = item.timestamp_ms
            elif events[0] == "SagaBegun":
                self.begun[item.saga_id.encode()] = item.timestamp_ms
        else:
            self.counts[type(item).__name__] += 1

    # --- queries from the main thread -------------------------------------------------------

    def owners(self) -> dict[int, str]:
        with self.lock:
            return {p: c.owner for p, c in self.claims.items()}

    def markers(self) -> int:
        """Transaction markers seen so far: each committed transaction that wrote to a log partition
        leaves one there, taking an offset but delivering no record. (Up to one trailing marker per
        partition is not counted yet.)"""
        return sum(last + 1 - self.per_partition[p] for p, last in list(self.last_offset.items()))

    def done(self, ids: Sequence[bytes]) -> int:
        ended = self.ended
        return sum(1 for k in ids if k in ended)


class HopTracer:
    """Follows the log, the inbox and the command topic for a few traced sagas, to split their
    latency into hops (all times are the same machine's wall clock, in ms):

    * ``start_to_begun``: the generator's produce -> the manager's SagaBegun decision;
    * ``decision_to_command``: a StepBegun decision -> its command produced (the command's
      CreateTime: the manager reaches that partition's transaction);
    * ``command_to_reply``: command produced -> the participant's reply (``replied_ms``): commit,
      visibility to read_committed consumers, the participant's fetch and handling;
    * ``reply_to_decision``: reply -> the manager's StepEnded decision: relay, inbox fetch, loop.
    """

    def __init__(self, bootstrap: str, topics: Topics, partitions: int, participant: str, codec: Codec) -> None:
        self.codec = codec
        self.traced: set[bytes] = set()
        self.log: dict[tuple[bytes, int], int] = {}  # (saga, seq) -> timestamp_ms
        self.commands: dict[tuple[bytes, str], int] = {}  # (saga, step) -> CreateTime
        self.replies: dict[tuple[bytes, str], int] = {}  # (saga, step) -> replied_ms
        self._stop = threading.Event()
        self.consumer = Consumer(
            reader_config(
                bootstrap,
                overrides={"group.id": f"bench-tracer-{uuid.uuid4().hex[:8]}", "enable.partition.eof": False, "fetch.wait.max.ms": 50},
            )
        )
        self.consumer.assign(
            [
                TopicPartition(topic, p, OFFSET_BEGINNING)
                for topic in (topics.log, topics.inbox, topics.commands(participant))
                for p in range(partitions)
            ]
        )
        self.log_topic, self.inbox = topics.log, topics.inbox
        self.thread = threading.Thread(target=self._run, name="bench-hop-tracer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from sagalog.records import ParticipantCommand, ParticipantReply

        while not self._stop.is_set():
            for msg in self.consumer.consume(5000, 0.1):
                if msg.error() is not None or msg.key() not in self.traced or msg.value() is None:
                    continue
                try:
                    item = self.codec.decode(msg.value())
                except DecodeError:
                    continue
                key = msg.key()
                if isinstance(item, SagaLogRecord):
                    for seq in range(item.first_seq, item.seq + 1):  # a record holds a decision's events
                        self.log[(key, seq)] = item.timestamp_ms
                elif isinstance(item, ParticipantReply):
                    self.replies[(key, item.step)] = item.replied_ms
                elif isinstance(item, ParticipantCommand):
                    self.commands[(key, item.step)] = msg.timestamp()[1]

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        with contextlib.suppress(Exception):
            self.consumer.close()

    def breakdown(self, sent: dict[bytes, float], steps: list[str]) -> dict[str, float | int]:
        """Median of each hop over the traced sagas that completed (per step for the step hops)."""
        from sagacli.bench.common import percentile

        hops: dict[str, list[float]] = {"start_to_begun": [], "decision_to_command": [], "command_to_reply": [], "reply_to_decision": []}
        complete = 0
        for key in self.traced:
            try:
                row = {"start_to_begun": [self.log[(key, 1)] - sent[key]]}
                row["decision_to_command"], row["command_to_reply"], row["reply_to_decision"] = [], [], []
                for i, step in enumerate(steps):
                    decided = self.log[(key, 2 + 2 * i)]  # StepBegun of step i (seq 2, 4, 6)
                    command = self.commands[(key, step)]
                    reply = self.replies[(key, step)]
                    row["decision_to_command"].append(command - decided)
                    row["command_to_reply"].append(reply - command)
                    row["reply_to_decision"].append(self.log[(key, 3 + 2 * i)] - reply)  # StepEnded of step i
            except KeyError:
                continue
            complete += 1
            for hop, values in row.items():
                hops[hop].extend(values)
        out: dict[str, float | int] = {"traced_sagas": complete}
        for hop, values in hops.items():
            out[f"{hop}_p50_ms"] = round(percentile(sorted(values), 50), 1)
        return out
