"""7. Query: ``saga status`` for one saga with many sagas in the log.

The log is synthesized directly: ``query_sagas`` finished sagas, one record each (their
``SagaEnded`` record with the full snapshot, what compaction leaves of a finished saga), keyed
by saga id so each lands on the partition Kafka's partitioner picks, as a manager's would.

``saga status`` answers from the read model (:mod:`sagalog.readmodel`, a SQLite cache of the log
caught up incrementally). It is warmed once, partition by partition (the first partition's time
is what the very first query of a cold cache costs), then single-saga queries are timed:

* ``status``: what one ``saga status ID`` does minus the interpreter start: open the read model,
  catch up the saga's partition (metadata, watermarks, nothing new), look the saga up;
* ``status_reused_model``: the same lookup on a read model kept open (a service answering queries);
* ``cli``: ``saga status ID`` itself as a fresh process, interpreter start, imports and the printed
  tables included: what a person typing it waits for (the issue's bound: 250 ms);
  ``cli_json``: the same with ``--json``, what a script waits for.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from typing import Any

from confluent_kafka import Producer

from sagacli.bench.cluster import delete_topics
from sagacli.bench.common import Context, summary
from sagacli.bench.sagas import bench_definition
from sagacli.bench.wire import Template, definition_message, saga_history
from sagalog.config import Topics
from sagalog.kafka import producer_config
from sagalog.topics import ensure_topics

ID_WIDTH = 12


def run(ctx: Context) -> dict[str, Any]:
    prefix = ctx.prefix("query")
    topics = Topics(prefix=prefix)
    ensure_topics(ctx.bootstrap, topics, partitions=ctx.config.partitions, participants=["noop"], timeout_s=30)
    try:
        return _run(ctx, topics)
    finally:
        delete_topics(ctx.bootstrap, prefix)


def _id(i: int) -> str:
    return f"q{i:0{ID_WIDTH - 1}d}"


def _write_log(ctx: Context, topics: Topics, n: int) -> float:
    definition = bench_definition()
    placeholder = "#" * ID_WIDTH
    history = saga_history(definition, placeholder, now_ms=int(time.time() * 1000), epoch=1, reply_topic=topics.inbox, reply_partition=0)
    template = Template(ctx.codec.encode(history[-1]), placeholder)
    producer = Producer(
        producer_config(ctx.bootstrap, overrides={"linger.ms": 20, "queue.buffering.max.messages": 2_000_000, "queue.buffering.max.kbytes": 2_097_151})
    )
    started = time.perf_counter()
    # The sagas pin their definition by reference: its record goes on every partition first, as
    # the managers would have written it.
    definition_key, definition_value = definition_message(ctx.codec, history)
    for p in range(ctx.config.partitions):
        producer.produce(topics.log, value=definition_value, key=definition_key, partition=p)
    for i in range(n):
        key = _id(i).encode()
        value = template.render(key)
        while True:
            try:
                producer.produce(topics.log, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.01)
        if i % 20000 == 0:
            producer.poll(0)
            ctx.progress.status(f"query: writing {n:,} finished sagas to the log, {i:,} so far")
    if producer.flush(120):
        raise RuntimeError("the synthetic log was not written within 120 s")
    return time.perf_counter() - started


def _run(ctx: Context, topics: Topics) -> dict[str, Any]:
    cfg = ctx.config
    n = cfg.query_sagas
    write_s = _write_log(ctx, topics, n)
    state_dir = ctx.work / f"readmodel-{topics.prefix}"
    rng = random.Random(42)
    sample = [_id(i) for i in rng.sample(range(n), min(n, cfg.query_samples))]
    result: dict[str, Any] = {"sagas": n, "write_s": round(write_s, 2)}
    try:
        from sagalog.readmodel import ReadModel
    except ImportError:  # the read model is not there yet: only the CLI can be timed
        ReadModel = None  # type: ignore[assignment,misc]  # noqa: N806
    if ReadModel is not None:
        with ReadModel(ctx.bootstrap, topics, state_dir=state_dir) as model:
            partitions = model.partition_count()
            per_partition = []
            started = time.perf_counter()
            for p in range(partitions):
                ctx.progress.status(f"query: warming the read model, partition {p + 1}/{partitions}")
                t0 = time.perf_counter()
                model.catch_up([p])
                per_partition.append(time.perf_counter() - t0)
            warm_s = time.perf_counter() - started
        result["warmup"] = {
            "seconds": round(warm_s, 2),
            "records_per_s": round(n / warm_s),
            "cold_first_query_s": round(per_partition[0], 2),
            "partitions": partitions,
        }
        fresh = []
        for i, saga_id in enumerate(sample):
            if i % 10 == 0:
                ctx.progress.status(f"query: saga status, {i}/{len(sample)}")
            t0 = time.perf_counter()
            with ReadModel(ctx.bootstrap, topics, state_dir=state_dir) as model:
                view = model.view(saga_id)
            fresh.append((time.perf_counter() - t0) * 1000)
            if view.state.status.value != "COMPLETED":
                raise RuntimeError(f"saga {saga_id} is {view.state.status.value}, expected COMPLETED")
        reused = []
        with ReadModel(ctx.bootstrap, topics, state_dir=state_dir) as model:
            for saga_id in sample:
                t0 = time.perf_counter()
                model.view(saga_id)
                reused.append((time.perf_counter() - t0) * 1000)
        result["status"] = summary(fresh)
        result["status_reused_model"] = summary(reused)
        result["status_p50_ms"] = result["status"]["p50_ms"]
        result["status_p99_ms"] = result["status"]["p99_ms"]
        result["measured"] = "ReadModel(...).view(id) in process, a fresh read model per query, as 'saga status' does"
    cli: list[float] = []
    cli_json: list[float] = []
    for saga_id in sample[: cfg.query_cli_samples]:
        ctx.progress.status(f"query: 'saga status {saga_id}' as a fresh process")
        for as_json, times in ((False, cli), (True, cli_json)):
            t0 = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable, "-m", "sagacli", "status", saga_id, *(["--json"] if as_json else []),
                    "-b", ctx.bootstrap, "--topic-prefix", topics.prefix, "--state-dir", str(state_dir),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )  # fmt: skip
            times.append((time.perf_counter() - t0) * 1000)
            if done.returncode != 0:
                failed = done.stderr.strip()[-500:]
                raise RuntimeError(f"saga status {saga_id} failed ({done.returncode}): {failed}")
            if as_json:
                _check_cli_json(done.stdout, saga_id)
            elif saga_id not in done.stdout or "COMPLETED" not in done.stdout:
                raise RuntimeError(f"saga status {saga_id} does not show it COMPLETED: {done.stdout[:300]!r}")
    result["cli"] = summary(cli)
    result["cli_json"] = summary(cli_json)
    result["cli_p50_ms"] = result["cli"].get("p50_ms")
    result["cli_measured"] = "'saga status ID' (and --json) as a fresh process: interpreter, imports, output"
    if "status_p99_ms" not in result:  # no read model module: the CLI is all there is to time
        result["status_p50_ms"] = result["cli"]["p50_ms"]
        result["status_p99_ms"] = result["cli"]["p99_ms"]
        result["measured"] = "'saga status ID' as a subprocess (interpreter start included)"
    ctx.progress.note(
        f"query: saga status p50 {result['status_p50_ms']:.1f} ms, p99 {result['status_p99_ms']:.1f} ms with {n:,} sagas "
        f"in the log; 'saga status' as a fresh process: p50 {result['cli'].get('p50_ms', float('nan')):.0f} ms "
        f"(--json {result['cli_json'].get('p50_ms', float('nan')):.0f} ms)"
    )
    return result


def _check_cli_json(stdout: str, saga_id: str) -> None:
    try:
        data = json.loads(stdout)
    except ValueError as err:
        raise RuntimeError(f"saga status {saga_id} --json printed no JSON: {stdout[:200]!r}") from err
    text = json.dumps(data)
    if saga_id not in text or "COMPLETED" not in text:
        raise RuntimeError(f"saga status {saga_id} --json does not show it COMPLETED: {text[:300]}")

