"""The read model: Kafka's partitioner, incremental catch-up, tombstones, bad records, resets.

Log records are produced here directly (built with the fold's own ``begin``/``apply``), so
these tests need a broker but no manager.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from strategies import a_fresh_process

from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.definition import SagaDefinition
from sagalog.fold import SagaState, apply, begin, definition_record
from sagalog.kafka import producer_config
from sagalog.readmodel import ReadModel, SagaNotFound, SagaRemoved, murmur2, partition_for
from sagalog.records import (
    Event,
    PartitionClaim,
    SagaDefinitionRecord,
    SagaEnded,
    SagaLogRecord,
    SagaStatus,
    StepBegun,
    StepEnded,
    StepOutcome,
)

CODEC = Codec()
DEFINITION = SagaDefinition.model_validate(
    {"name": "two", "steps": [{"name": "a", "participant": "pa"}, {"name": "b", "participant": "pb"}]}
)
NOW = 1_700_000_000_000


# --- murmur2 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        # The values of Kafka's own test (clients/.../common/utils/UtilsTest.java, testMurmur2).
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (bytes([ord("a"), ord("b"), ord("c")]), 479470107),
    ],
)
def test_murmur2_matches_the_kafka_java_client(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected


def test_partition_for_matches_librdkafka_murmur2_random(bootstrap: str, make_topics) -> None:
    """Produce keys of every length class with our producer config; the broker-side partition of
    each must be the one we compute without asking."""
    partitions = 7
    topics = make_topics(partitions=partitions)
    keys = [os.urandom(n) for n in range(1, 40) for _ in range(3)]
    keys += [f"trip-{i:04d}".encode() for i in range(100)] + ["ünïcødé-saga".encode()]
    delivered: dict[bytes, int] = {}
    producer = Producer(producer_config(bootstrap))
    for key in keys:
        producer.produce(
            topics.inbox, b"x", key=key, on_delivery=lambda err, msg: delivered.__setitem__(msg.key(), msg.partition())
        )
    assert producer.flush(10) == 0
    assert len(delivered) == len(set(keys))
    mismatches = {k: (p, partition_for(k, partitions)) for k, p in delivered.items() if p != partition_for(k, partitions)}
    assert not mismatches
    assert len(set(delivered.values())) == partitions  # the keys did spread over every partition


# --- building logs ----------------------------------------------------------------------------


def saga_records(saga_id: str, events: Iterable[Event] = (), *, epoch: int = 1, start_ms: int = NOW) -> list[SagaLogRecord]:
    """The log records of a saga: SagaBegun, then ``events``, each with its snapshot."""
    first, state = begin(saga_id, DEFINITION, '{"n": 1}', start_ms, epoch)
    out = [_record(state, first)]
    for i, event in enumerate(events, start=1):
        state = apply(state, event, start_ms + i, epoch)
        out.append(_record(state, event))
    return out


def _record(state: SagaState, event: Event) -> SagaLogRecord:
    return SagaLogRecord(
        saga_id=state.saga_id,
        seq=state.seq,
        epoch=state.epoch,
        timestamp_ms=state.updated_ms,
        event=event,
        snapshot=state.snapshot(),
        writer="test",
    )


def completed(saga_id: str) -> list[SagaLogRecord]:
    return saga_records(
        saga_id,
        [
            StepBegun(step="a", attempt=1, dispatch_at_ms=NOW, deadline_ms=NOW + 5000),
            StepEnded(step="a", outcome=StepOutcome.SUCCEEDED, output='{"ok": 1}'),
            StepBegun(step="b", attempt=1, dispatch_at_ms=NOW, deadline_ms=NOW + 5000),
            StepEnded(step="b", outcome=StepOutcome.SUCCEEDED, output="{}"),
            SagaEnded(),
        ],
    )


def running(saga_id: str) -> list[SagaLogRecord]:
    return saga_records(saga_id, [StepBegun(step="a", attempt=1, dispatch_at_ms=NOW, deadline_ms=NOW + 5000)])


class Log:
    """Appends to a test log exactly as managers would: keyed by saga id, murmur2-partitioned."""

    def __init__(self, bootstrap: str, topics: Topics, partitions: int) -> None:
        self.topics = topics
        self.partitions = partitions
        self.producer = Producer(producer_config(bootstrap))

    def append(self, records: Iterable[SagaLogRecord]) -> None:
        for r in records:
            self.producer.produce(self.topics.log, CODEC.encode(r), key=r.saga_id.encode())
        assert self.producer.flush(10) == 0

    def raw(self, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        kwargs = {} if partition is None else {"partition": partition}
        self.producer.produce(self.topics.log, value, key=key, **kwargs)
        assert self.producer.flush(10) == 0

    def claim(self, partition: int, epoch: int, owner: str = "host-1") -> None:
        claim = PartitionClaim(partition=partition, epoch=epoch, owner=owner, timestamp_ms=NOW)
        self.raw(PartitionClaim.key(partition), CODEC.encode(claim), partition)


@pytest.fixture
def log(bootstrap: str, make_topics) -> Log:
    return Log(bootstrap, make_topics(partitions=4), 4)


@pytest.fixture
def model_for(bootstrap: str, tmp_path: Path):
    opened: list[ReadModel] = []

    def make(topics: Topics) -> ReadModel:
        model = ReadModel(bootstrap, topics, state_dir=tmp_path / "state")
        opened.append(model)
        return model

    yield make
    for model in opened:
        model.close()


# --- catching up ------------------------------------------------------------------------------


def test_catch_up_is_incremental(log: Log, model_for) -> None:
    model = model_for(log.topics)
    log.append(completed("s-1") + running("s-2"))
    first = model.catch_up()
    assert first.records == 8
    assert model.get("s-1", catch_up=False).status is SagaStatus.COMPLETED
    assert model.get("s-2", catch_up=False).status is SagaStatus.RUNNING

    # Nothing new: nothing read.
    assert model.catch_up().records == 0
    # Two more records of s-2 (continuing its sequence) and a new saga: only those are read.
    more = saga_records(
        "s-2",
        [
            StepBegun(step="a", attempt=1, dispatch_at_ms=NOW, deadline_ms=NOW + 5000),
            StepEnded(step="a", outcome=StepOutcome.FAILED, error="declined"),
        ],
    )[2:]
    assert [r.seq for r in more] == [3]
    log.append(more + running("s-3"))
    again = model.catch_up()
    assert again.records == 3
    assert model.get("s-2", catch_up=False).step("a").status == "FAILED"
    assert model.count() == 3

    # A new ReadModel on the same file continues from the stored offsets.
    model.close()
    reopened = model_for(log.topics)
    assert reopened.catch_up().records == 0
    assert [s.saga_id for s in reopened.list_sagas(catch_up=False, status=SagaStatus.RUNNING)] == ["s-2", "s-3"] or {
        s.saga_id for s in reopened.list_sagas(catch_up=False, status=SagaStatus.RUNNING)
    } == {"s-2", "s-3"}


def test_status_of_one_saga_reads_only_its_partition(log: Log, model_for) -> None:
    model = model_for(log.topics)
    ids = [f"order-{i}" for i in range(40)]
    log.append(r for sid in ids for r in running(sid))
    model.catch_up()
    before = model.partition_stats()
    log.append(r for sid in ids for r in completed(f"{sid}-x"))  # new records on every partition
    target = ids[0]
    mine = partition_for(target.encode(), log.partitions)

    stats = model.catch_up([model.partition_of(target)])
    assert stats.partitions == (mine,)
    after = model.partition_stats()
    for p in range(log.partitions):
        if p == mine:
            assert after[p]["next_offset"] > before[p]["next_offset"]
        else:
            assert after[p]["next_offset"] == before[p]["next_offset"]  # untouched
    view = model.view(target)
    assert view.partition == mine
    assert [h.event_type for h in view.history] == ["SagaBegun", "StepBegun"]


def test_warm_status_query_is_fast(log: Log, model_for) -> None:
    """Many sagas in the log; once the model is warm a status answer costs one partition's tail."""
    model = model_for(log.topics)
    producer = log.producer
    for i in range(20_000):
        record = saga_records(f"bulk-{i}")[0]
        producer.produce(log.topics.log, CODEC.encode(record), key=record.saga_id.encode())
        if i % 5000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    assert model.catch_up().records == 20_000
    model.close()

    fresh = model_for(log.topics)  # as a new `saga status` process would
    started = time.monotonic()
    state = fresh.get("bulk-12345")
    elapsed = time.monotonic() - started
    assert state.status is SagaStatus.RUNNING
    assert elapsed < 0.5, f"warm status query took {elapsed:.3f}s"


def test_claims_name_the_owner_and_stale_writers_are_rejected(log: Log, model_for) -> None:
    model = model_for(log.topics)
    sid = "zombie-target"
    p = partition_for(sid.encode(), log.partitions)
    log.claim(p, 1, "host-100")
    log.append(running(sid))
    log.claim(p, 2, "host-200")
    # A zombie at epoch 1 writes after epoch 2 took over: the fold must refuse it.
    zombie = saga_records(
        sid,
        [
            StepBegun(step="a", attempt=1, dispatch_at_ms=NOW, deadline_ms=NOW + 5000),
            StepEnded(step="a", outcome=StepOutcome.SUCCEEDED, output="{}"),
        ],
    )[2]
    log.append([zombie])

    view = model.view(sid)
    assert view.claim is not None and view.claim.owner == "host-200" and view.claim.epoch == 2
    assert view.state.step("a").status == "RUNNING"  # unchanged by the zombie
    assert view.history[-1].rejected and "epoch" in view.history[-1].rejected
    assert model.partition_stats()[p]["rejected"] == 1


def test_tombstone_removes_the_saga(log: Log, model_for) -> None:
    model = model_for(log.topics)
    log.append(completed("gone") + completed("kept"))
    assert model.get("gone").status is SagaStatus.COMPLETED
    log.raw(b"gone", None)

    with pytest.raises(SagaRemoved, match="removed"):
        model.get("gone")
    with pytest.raises(SagaRemoved):
        model.history("gone", catch_up=False)
    assert [s.saga_id for s in model.list_sagas()] == ["kept"]

    # The same id may begin again after its tombstone (a new saga).
    log.append(running("gone"))
    assert model.get("gone").status is SagaStatus.RUNNING
    assert len(model.history("gone")) == 2


def test_undecodable_records_are_skipped_and_counted(log: Log, model_for) -> None:
    model = model_for(log.topics)
    log.append(running("bad-neighbour")[:1])
    log.raw(b"bad-neighbour", b"\xc3\x01garbage-not-avro")
    log.raw(b"bad-neighbour", b"plain text")
    log.append(running("bad-neighbour")[1:])

    state = model.get("bad-neighbour")
    assert state.seq == 2 and state.step("a").status == "RUNNING"  # the fold went on past them
    p = model.partition_of("bad-neighbour")
    assert model.partition_stats()[p]["decode_errors"] == 2
    undecodable = [h for h in model.history("bad-neighbour") if h.event_type == "(undecodable)"]
    assert len(undecodable) == 2 and all(h.rejected for h in undecodable)


def test_unknown_saga_is_a_clear_error(log: Log, model_for) -> None:
    model = model_for(log.topics)
    log.append(running("exists"))
    with pytest.raises(SagaNotFound, match="no saga 'nope'"):
        model.get("nope")
    assert model.find("nope") is None


def test_a_recreated_log_resets_what_was_read(log: Log, model_for) -> None:
    """A log topic deleted and created again (e.g. the memory-only embedded broker restarted) has a
    new topic id: everything read from the old one is dropped and the new one is read from the start."""
    model = model_for(log.topics)
    log.append(running("old"))
    assert model.get("old").status is SagaStatus.RUNNING
    model.db.execute("UPDATE meta SET value = 'AAAAAAAAAAAAAAAAAAAAAA' WHERE key = 'topic_id'")  # as if recreated
    model.db.execute("UPDATE partitions SET next_offset = next_offset + 1000")
    model.close()

    reopened = model_for(log.topics)
    stats = reopened.catch_up()
    assert stats.records == 2  # both records of "old", read again from the beginning
    assert reopened.get("old", catch_up=False).status is SagaStatus.RUNNING
    assert max(s["next_offset"] for s in reopened.partition_stats().values()) < 1000


def test_missing_log_topic_is_a_clear_error(bootstrap: str, model_for) -> None:
    from sagalog.errors import ConfigError

    model = model_for(Topics(prefix=f"never-created-{os.urandom(3).hex()}"))
    with pytest.raises(ConfigError, match="does not exist"):
        model.catch_up()


def test_an_unreadable_model_file_is_rebuilt(tmp_path: Path) -> None:
    """It is a cache: a corrupt file (or one of another layout) is replaced, not an error."""
    from sagalog.readmodel import model_path

    path = model_path(tmp_path, "host:1", "saga")
    path.write_bytes(b"this is not a SQLite database" * 100)
    with ReadModel("host:1", Topics(prefix="saga"), state_dir=tmp_path) as model:
        assert model.count() == 0
    assert path.read_bytes().startswith(b"SQLite format 3")


# --- definitions by reference -------------------------------------------------------------------

OTHER = SagaDefinition.model_validate({"name": "other", "steps": [{"name": "x", "participant": "px"}]})


def _on(partition: int, prefix: str, partitions: int = 4) -> str:
    """A saga id that lands on ``partition``."""
    return next(f"{prefix}-{i}" for i in range(10_000) if partition_for(f"{prefix}-{i}".encode(), partitions) == partition)


def test_definitions_come_from_the_log_and_are_stored_once(log: Log, model_for) -> None:
    """Each query process starts knowing no definition: the first catch-up learns it from the
    partition's definition record; a later one (another process) from the file, where it is once."""
    first, second = _on(1, "ref"), _on(1, "ref-later")
    records, later = completed(first), running(second)  # built (and pinned) in this process
    pinned = definition_record(SagaState.from_record(records[0]), NOW, "m1")
    assert pinned.definition_id == DEFINITION.definition_id
    log.raw(SagaDefinitionRecord.key(pinned.definition_id), CODEC.encode(pinned), 1)
    log.append(records)
    with a_fresh_process():
        model = model_for(log.topics)
        view = model.view(first)
        assert (view.definition_id, view.definition_json) == (DEFINITION.definition_id, DEFINITION.canonical_json)
        assert view.state.definition == "" and view.state.definition_id == DEFINITION.definition_id
        assert view.state.status is SagaStatus.COMPLETED and view.definition.name == "two"
        assert model.partition_stats()[1]["records"] == 1 + len(records) and model.partition_stats()[1]["rejected"] == 0
        model.close()
    log.append(later)  # no definition record of its own: the partition has it already
    with a_fresh_process():
        model = model_for(log.topics)
        assert model.catch_up([1]).records == len(later)  # the definition record is not read again
        state = model.get(second, catch_up=False)
        assert state.status is SagaStatus.RUNNING and state.definition_model.name == "two"
        assert model.db.execute("SELECT count(*) FROM definitions").fetchone()[0] == 1
        assert model.states()[first].definition_json == DEFINITION.canonical_json


def test_a_saga_whose_definition_record_is_missing_is_reported_not_shown(log: Log, model_for) -> None:
    orphan = _on(2, "orphan")
    first, state = begin(orphan, OTHER, "{}", NOW, 1)  # its definition record is never written
    log.append([_record(state, first)])
    with a_fresh_process():
        model = model_for(log.topics)
        with pytest.raises(SagaNotFound):
            model.get(orphan)
        (entry,) = model.history(orphan, catch_up=False)
        assert entry.rejected is not None and f"definition {OTHER.definition_id} is unknown" in entry.rejected
        assert model.partition_stats()[2]["rejected"] == 1
