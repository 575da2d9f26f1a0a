"""4. Replay: how fast a manager rebuilds a partition it is assigned, and how soon it resumes work.

A log partition is filled directly with the records a manager would have written (built with
``manager.decide``, see :func:`sagacli.bench.wire.saga_history`): a claim by a previous owner, then
sagas whose records interleave as concurrent sagas do, most of them complete (8 records each)
and ``replay_live_share`` of them unfinished (4 records: their second step is in flight).

Then, in this process, a real :class:`manager.runtime.Manager` runs ``_take_over`` on that
partition, exactly what it does on assignment: fence (init_transactions), replay to the end,
claim, re-send the outstanding command of every unfinished saga in one transaction. Measured:

* ``records_per_s``: records folded per second of the replay itself (``Manager._replay``);
* ``assignment_to_first_command_ms``: from the start of the takeover to its transaction being
  committed, which is when the resumed commands become visible to participants;
* the split of the replay's cost, in this process: decoding alone, folding alone.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from manager.runtime import Manager, ManagerSettings
from sagacli.bench.cluster import delete_topics
from sagacli.bench.common import Context
from sagacli.bench.sagas import BENCH_DEFINITIONS, bench_definition
from sagacli.bench.wire import Template, definition_message, saga_history
from sagalog.config import Topics
from sagalog.definition import DefinitionSet
from sagalog.errors import DecodeError
from sagalog.fold import PartitionFold
from sagalog.kafka import producer_config, reader_config
from sagalog.records import ParticipantCommand, PartitionClaim
from sagalog.topics import ensure_topics

PARTITION = 0
#: A live saga's records: [SagaBegun, StepBegun(1)], [StepEnded(1), StepBegun(2)]: its second step is in flight.
LIVE_RECORDS = 2


def synthesize(ctx: Context, topics: Topics, records: int, live_share: float) -> tuple[list[tuple[bytes, bytes]], int]:
    """The (key, value) list written to the partition, and how many sagas are unfinished."""
    definition = bench_definition()
    now = int(time.time() * 1000)
    placeholder = "#" * 12
    history = saga_history(definition, placeholder, now_ms=now, epoch=1, reply_topic=topics.inbox, reply_partition=PARTITION)
    templates = [Template(ctx.codec.encode(r), placeholder) for r in history]
    full = len(templates)
    per_saga = full * (1 - live_share) + LIVE_RECORDS * live_share
    sagas = max(1, int(records / per_saga))
    every = max(1, round(1 / live_share)) if live_share > 0 else 0
    claim = ctx.codec.encode(PartitionClaim(partition=PARTITION, epoch=1, owner="bench-previous-owner", timestamp_ms=now))
    out: list[tuple[bytes, bytes]] = [(PartitionClaim.key(PARTITION), claim), definition_message(ctx.codec, history)]
    live = 0
    window = 200  # sagas in flight together: their records interleave
    for first in range(0, sagas, window):
        group = range(first, min(sagas, first + window))
        lengths = {}
        for i in group:
            is_live = every and i % every == 0
            lengths[i] = LIVE_RECORDS if is_live else full
            live += bool(is_live)
        for k in range(full):
            for i in group:
                if k < lengths[i]:
                    key = f"r{i:011d}".encode()
                    out.append((key, templates[k].render(key)))
    return out, live


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    prefix = ctx.prefix("replay")
    topics = Topics(prefix=prefix)
    definitions = DefinitionSet.load([BENCH_DEFINITIONS])
    ensure_topics(ctx.bootstrap, topics, partitions=cfg.partitions, participants=definitions.participants(), timeout_s=30)
    try:
        return _run(ctx, topics, definitions)
    finally:
        delete_topics(ctx.bootstrap, prefix)


def _run(ctx: Context, topics: Topics, definitions: DefinitionSet) -> dict[str, Any]:
    cfg = ctx.config
    ctx.progress.status(f"replay: synthesizing {cfg.replay_records:,} log records")
    messages, live = synthesize(ctx, topics, cfg.replay_records, cfg.replay_live_share)
    producer = Producer(producer_config(ctx.bootstrap, overrides={"linger.ms": 20, "queue.buffering.max.messages": 2_000_000}))
    for i, (key, value) in enumerate(messages):
        while True:
            try:
                producer.produce(topics.log, value=value, key=key, partition=PARTITION)
                break
            except BufferError:
                producer.poll(0.01)
        if i % 20000 == 0:
            producer.poll(0)
            ctx.progress.status(f"replay: writing the log, {i:,}/{len(messages):,}")
    if producer.flush(60):
        raise RuntimeError("the synthetic log was not written within 60 s")

    # the split of the cost, in this process, on a sample
    sample = messages[: min(len(messages), 20000)]
    started = time.perf_counter()
    decoded = [(k, ctx.codec.decode(v)) for k, v in sample]
    decode_s = time.perf_counter() - started
    fold = PartitionFold(partition=PARTITION)
    started = time.perf_counter()
    for offset, (key, item) in enumerate(decoded):
        fold.apply(key, item, offset)  # type: ignore[arg-type]
    fold_s = time.perf_counter() - started

    ctx.progress.status(f"replay: a manager takes over a partition of {len(messages):,} records")
    settings = ManagerSettings(
        bootstrap=ctx.bootstrap,
        definitions=definitions,
        topics=topics,
        group_id=f"{topics.prefix}-managers",
        instance_id="bench-replay",
    )
    manager = Manager(settings, codec=ctx.codec)
    timing: dict[str, float] = {}
    replay = manager._replay_many

    def timed_replay(partitions: list[int], reader: Consumer) -> dict[int, PartitionFold]:
        t0 = time.perf_counter()
        result = replay(partitions, reader)
        timing["replay_s"] = time.perf_counter() - t0
        timing["applied"] = result[PARTITION].applied
        timing["rejected"] = result[PARTITION].rejected_count
        return result

    manager._replay_many = timed_replay  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        manager._take_over(PARTITION)
        takeover_s = time.perf_counter() - started
        resumed = len(manager.owned[PARTITION].live) if PARTITION in manager.owned else 0
    finally:
        manager.close()
    commands = _count_commands(ctx, topics, "noop")
    replayed = len(messages)  # every record of the partition is read; only the newest per saga is decoded
    result = {
        "records": len(messages),
        "sagas": len({k for k, _ in messages}) - 1,
        "unfinished_sagas": live,
        "records_replayed": replayed,
        "rejected": int(timing["rejected"]),
        "replay_s": round(timing["replay_s"], 3),
        "records_per_s": round(replayed / timing["replay_s"]),
        "takeover_s": round(takeover_s, 3),
        "assignment_to_first_command_ms": round(takeover_s * 1000, 1),
        "resumed_sagas": resumed,
        "resumed_commands_seen": commands,
        "in_process_split": {
            "sample_records": len(sample),
            "decode_records_per_s": round(len(sample) / decode_s),
            "fold_records_per_s": round(len(sample) / fold_s),
            "decode_us_per_record": round(decode_s / len(sample) * 1e6, 1),
            "fold_us_per_record": round(fold_s / len(sample) * 1e6, 1),
        },
        "record_bytes_mean": round(sum(len(v) for _, v in messages) / len(messages)),
    }
    ceiling = ctx.ceiling.get("consume_msgs_per_s")
    if ceiling:
        result["consume_ceiling_share"] = round(result["records_per_s"] / ceiling, 4)
    ctx.progress.note(
        f"replay: {result['records_per_s']:,} records/s ({replayed:,} records), first resumed command after "
        f"{result['assignment_to_first_command_ms']:,.0f} ms, {resumed:,} sagas resumed"
    )
    return result


def _count_commands(ctx: Context, topics: Topics, participant: str) -> int:
    """Resumed commands on the participant's topic (read_committed: only the committed takeover's)."""
    consumer = Consumer(reader_config(ctx.bootstrap, overrides={"group.id": f"{topics.prefix}-check"}))
    topic = topics.commands(participant)
    try:
        meta = consumer.list_topics(timeout=10)  # all topics: never ask for one by name
        partitions = list(meta.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        seen, eof = 0, set()
        deadline = time.monotonic() + 30
        while len(eof) < len(partitions) and time.monotonic() < deadline:
            for msg in consumer.consume(10000, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        eof.add(msg.partition())
                    continue
                try:
                    if isinstance(ctx.codec.decode(msg.value()), ParticipantCommand):
                        seen += 1
                except DecodeError:
                    pass
        return seen
    finally:
        consumer.close()
