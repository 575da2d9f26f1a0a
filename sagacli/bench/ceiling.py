"""1. The broker ceiling: raw produce and consume rates of 200-byte messages, batched.

This is the physical limit every saga figure is compared with (MISSION.md measured about 225k
produced and 750k consumed per second with the embedded broker on this machine). The producer
uses the project's producer settings (idempotent, acks=all) with a longer linger, so the
comparison is with the best the same client configuration gets out of the broker.
"""

from __future__ import annotations

import os
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from sagacli.bench.cluster import delete_topics
from sagacli.bench.common import Context
from sagalog.kafka import admin_client, producer_config, reader_config
from sagalog.topics import quiet_client


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    prefix = ctx.prefix("ceiling")
    topic = f"{prefix}.raw"
    n, size = cfg.ceiling_messages, cfg.ceiling_message_bytes
    admin = admin_client(ctx.bootstrap, quiet_client())
    for future in admin.create_topics([NewTopic(topic, num_partitions=cfg.partitions, replication_factor=1)]).values():
        future.result()
    _wait_topic(admin, topic)
    try:
        produce_s = _produce(ctx, topic, n, size)
        consume_s, got = _consume(ctx, topic, n, cfg.partitions)
    finally:
        delete_topics(ctx.bootstrap, prefix)
    result = {
        "message_bytes": size,
        "messages": n,
        "partitions": cfg.partitions,
        "produce_msgs_per_s": round(n / produce_s),
        "produce_mb_per_s": round(n * size / produce_s / 1e6, 1),
        "consume_msgs_per_s": round(got / consume_s),
        "consume_mb_per_s": round(got * size / consume_s / 1e6, 1),
        "producer": "idempotent, acks=all, linger.ms=5, batches of up to 10,000",
    }
    ctx.progress.note(
        f"broker ceiling: produce {result['produce_msgs_per_s']:,} msg/s, consume {result['consume_msgs_per_s']:,} msg/s "
        f"({size}-byte messages)"
    )
    return result


def _wait_topic(admin: Any, topic: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(timeout=timeout_s)  # all topics: never ask for one by name
        if topic in meta.topics and meta.topics[topic].partitions:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic} not visible after {timeout_s:g}s")
        time.sleep(0.05)  # metadata has no change notification


def _produce(ctx: Context, topic: str, n: int, size: int) -> float:
    producer = Producer(
        producer_config(
            ctx.bootstrap,
            overrides={"linger.ms": 5, "queue.buffering.max.messages": 1_000_000, "queue.buffering.max.kbytes": 1_048_576},
        )
    )
    payload = os.urandom(size)
    produce = producer.produce
    started = time.perf_counter()
    for i in range(n):
        try:
            produce(topic, payload)
        except BufferError:
            producer.poll(0.01)
            produce(topic, payload)
        if i & 0x3FFF == 0:
            producer.poll(0)
            ctx.progress.status(f"broker ceiling: produced {i:,}/{n:,}")
    left = producer.flush(60)
    elapsed = time.perf_counter() - started
    if left:
        raise RuntimeError(f"{left} raw messages not delivered within 60 s")
    return elapsed


def _consume(ctx: Context, topic: str, n: int, partitions: int) -> tuple[float, int]:
    consumer = Consumer(
        reader_config(
            ctx.bootstrap,
            overrides={
                "group.id": f"{topic}-reader",
                "fetch.wait.max.ms": 10,
                "fetch.max.bytes": 52_428_800,
                "max.partition.fetch.bytes": 10_485_760,
            },
        )
    )
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        got = 0
        eof: set[int] = set()
        started = time.perf_counter()
        deadline = started + 120
        while got < n and len(eof) < partitions and time.perf_counter() < deadline:
            for msg in consumer.consume(10000, 0.5):
                err = msg.error()
                if err is None:
                    got += 1
                elif err.code() == KafkaError._PARTITION_EOF:
                    eof.add(msg.partition())
            ctx.progress.status(f"broker ceiling: consumed {got:,}/{n:,}")
        return time.perf_counter() - started, got
    finally:
        consumer.close()
