"""2. Throughput and 3. latency, end to end: real manager and no-op participant processes.

A :class:`Rig` is one deployment under test (its own topic prefix, managers started with
``python -m sagacli manager``, no-op participants with ``... participant run noop``), plus the
bench's generator and log tailer. It is ready when the log's partition claims show every
partition owned by one of its managers and a few warm-up sagas have completed.

Throughput (per replica count):

1. a closed-loop probe keeps ``probe_in_flight`` sagas in flight for ``probe_seconds``: its
   completion rate is a first estimate of capacity that builds no backlog;
2. the open-loop generator then offers 0.8 times that, and ``saturation_step`` (1.15) times more
   at each step of ``saturation_seconds``, until a step is not sustained (its completions fall
   below 95 % of the offer, or not all of its sagas end). A step's rate is the sagas whose
   ``SagaEnded`` falls in its steady window (the last 70 % of the step) per second; the figure is
   the highest of any step, i.e. the saturation point. Offering far more than that measures
   something else: starts and replies share the inbox, so a deep backlog of starts delays every
   reply behind it (completions collapse until the offer stops, then arrive in a burst) and step
   timeouts fire. ``saturated`` says whether the last step exceeded capacity (if not, capacity is
   at least the figure).

Latency: offered loads in increasing order on a fresh 1-manager deployment, each for
``latency_seconds``; once a load is not sustained (not every saga ended, or completions fell below 95 % of the offer), higher loads are
reported as skipped.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from participants.examples import EXAMPLE_DEFINITIONS_DIR
from sagacli.bench import profile as profiling
from sagacli.bench.cluster import Deployment, wait_until
from sagacli.bench.common import Context, CpuMeter, messages_per_saga, summary
from sagacli.bench.load import Generator, HopTracer, LogTailer, Sent, now_ms, saga_ids
from sagacli.bench.wire import StartEncoder
from sagacli.process import Child
from sagalog.definition import DefinitionSet, SagaDefinition

BENCH_DEFINITIONS = EXAMPLE_DEFINITIONS_DIR / "bench.yaml"


def bench_definition(path: Path = BENCH_DEFINITIONS) -> SagaDefinition:
    names = DefinitionSet.load([path])
    return names.get(names.names()[0])  # type: ignore[return-value]


class Rig:
    """One deployment under test with its generator and tailer; a context manager that cleans up."""

    def __init__(
        self,
        ctx: Context,
        name: str,
        *,
        managers: int,
        participants: int,
        definitions: Path = BENCH_DEFINITIONS,
        participant_names: tuple[str, ...] = ("noop",),
        session_timeout_ms: int | None = None,
        manager_log_level: str = "WARNING",
        manager_args: tuple[str, ...] = (),
        participant_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.definition = bench_definition(definitions)
        self.deployment = Deployment(
            ctx.procs,
            ctx.bootstrap,
            ctx.prefix(name),
            definitions,
            ctx.config.partitions,
            session_timeout_ms or ctx.config.session_timeout_ms,
            participants=participant_names,
            manager_log_level=manager_log_level,
            manager_args=manager_args,
            participant_args=participant_args,
            env=dict(env or {}),
        )
        self.n_managers = managers
        self.n_participants = participants
        self.tailer: LogTailer | None = None
        self.generator: Generator | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Rig:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        d = self.deployment
        d.create_topics()
        for _ in range(self.n_managers):
            d.start_manager()
        for _ in range(self.n_participants):
            d.start_participant(d.participants[0])
        self.tailer = LogTailer(self.ctx.bootstrap, d.topics, d.partitions, self.ctx.codec).start()
        self.generator = Generator(self.ctx.bootstrap, d.topics, StartEncoder(self.ctx.codec, self.definition.name))
        self.wait_owned()

    def wait_owned(self, managers: list[Child] | None = None, timeout_s: float = 90.0) -> None:
        """Until every partition is claimed by one of ``managers`` (default: all started) and each has some."""
        wanted = {m.instance_id for m in (managers or self.deployment.managers)}
        tailer = self.tail

        def ready() -> bool:
            owners = tailer.owners()
            return len(owners) == self.deployment.partitions and set(owners.values()) == wanted

        self.ctx.progress.status(f"{self.deployment.prefix}: waiting for {len(wanted)} manager(s) to claim the partitions")
        wait_until(ready, timeout_s, "the managers to claim every partition", check=self.check)

    def warm(self, count: int) -> None:
        ids = saga_ids("warm", count)
        self.gen.burst(ids)
        self.wait_done(ids, 60.0, "warm-up sagas")

    def close(self) -> None:
        if self.tailer is not None:
            self.tailer.stop()
        if self.generator is not None:
            self.generator.close()
        self.deployment.stop()
        self.deployment.delete_topics()

    # --- helpers -----------------------------------------------------------------------------

    @property
    def tail(self) -> LogTailer:
        assert self.tailer is not None
        return self.tailer

    @property
    def gen(self) -> Generator:
        assert self.generator is not None
        return self.generator

    def check(self) -> None:
        self.deployment.check_alive()
        self.tail.check()

    def wait_done(self, ids: list[bytes], timeout_s: float, what: str, *, strict: bool = True) -> bool:
        ended = self.tail.ended
        deadline = time.monotonic() + timeout_s
        remaining = [k for k in ids if k not in ended]
        while remaining:
            self.check()
            if time.monotonic() > deadline:
                if strict:
                    raise TimeoutError(f"{len(remaining)} of {len(ids)} {what} did not end within {timeout_s:g}s")
                return False
            time.sleep(0.05)  # polling the tailer's results
            remaining = [k for k in remaining if k not in ended]
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Until every saga this rig started has ended (False if some are still running at the timeout)."""
        pending = [k for k in self.gen.sent if k not in self.tail.ended]
        self.ctx.progress.status(f"{self.deployment.prefix}: waiting for {len(pending):,} sagas still running")
        return self.wait_done(pending, timeout_s, "sagas still running", strict=False)

    def meter(self, *, bench: bool = True) -> CpuMeter:
        """CPU of each process kind: managers, participants, broker (when its pid is known) and,
        unless ``bench`` is False, this process (the load generator and the log tailer)."""
        d = self.deployment
        groups = {
            "managers": [m.pid for m in d.managers if m.alive],
            "participants": [w.pid for w in d.workers if w.alive],
            "broker": [self.ctx.broker_pid] if self.ctx.broker_pid else [],
        }
        if bench:
            groups["bench"] = [os.getpid()]
        return CpuMeter(groups)

    def quiesce(self) -> None:
        """Stop the bench's own clients (tailer, generator): only the deployment talks to the broker."""
        if self.tailer is not None:
            self.tailer.stop()
            self.tailer = None
        if self.generator is not None:
            self.generator.close()
            self.generator = None

    def run_paced(self, ids: list[bytes], rate: float, label: str) -> Sent:
        """The open-loop generator in a thread; the main thread shows progress and watches the children."""
        result: list[Sent] = []
        failure: list[BaseException] = []
        stop = threading.Event()

        def target() -> None:
            try:
                result.append(self.gen.paced(ids, rate, stop))
            except BaseException as err:  # re-raised below
                failure.append(err)

        thread = threading.Thread(target=target, name="bench-generator", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                self.check()
                done = self.tail.done(ids) if len(ids) < 20000 else len(self.tail.ended)
                self.ctx.progress.status(f"{label}: {rate:,.0f} sagas/s offered, {done:,} ended")
                thread.join(0.25)
        finally:
            stop.set()
            thread.join()
        if failure:
            raise failure[0]
        return result[0]

    def background(self, ids: list[bytes], rate: float) -> tuple[threading.Thread, threading.Event, list[Sent]]:
        """The open-loop generator in a thread that runs until ``ids`` are sent or the event is set."""
        stop = threading.Event()
        result: list[Sent] = []
        thread = threading.Thread(target=lambda: result.append(self.gen.paced(ids, rate, stop)), name="bench-generator", daemon=True)
        thread.start()
        return thread, stop, result

    def closed_loop(self, tag: str, in_flight: int, seconds: float, label: str) -> dict[str, Any]:
        """Keep ``in_flight`` sagas running for ``seconds``; completions per second in the last 70 %."""
        ended = self.tail.ended
        sent: list[bytes] = []
        started = now_ms()
        end_at = time.monotonic() + seconds
        i = 0
        outstanding: set[bytes] = set()
        while time.monotonic() < end_at:
            self.check()
            outstanding = {k for k in outstanding if k not in ended}
            room = in_flight - len(outstanding)
            if room > 0:
                batch = saga_ids(tag, room, start=i)
                i += room
                for key in batch:
                    self.gen._send(key)
                self.gen.producer.poll(0)
                sent.extend(batch)
                outstanding.update(batch)
            self.ctx.progress.status(f"{label}: closed loop, {in_flight} in flight, {len(sent) - len(outstanding):,} ended")
            time.sleep(0.005)  # the loop's tick: completions arrive through the tailer
        self.gen.producer.flush(10)
        window_from = started + 0.3 * seconds * 1000
        window_to = started + seconds * 1000
        count = sum(1 for k in sent if window_from <= ended.get(k, -1) <= window_to)
        rate = count / (0.7 * seconds)
        self.wait_done(sent, self.ctx.config.drain_timeout_s + 30, "probe sagas", strict=False)
        latencies = [ended[k] - self.gen.sent[k] for k in sent if k in ended]
        return {
            "in_flight": in_flight,
            "seconds": seconds,
            "sagas_per_s": round(rate, 1),
            "latency": summary(latencies),
        }


# --- throughput ------------------------------------------------------------------------------


def measure_throughput(ctx: Context, rig: Rig, replicas: int) -> dict[str, Any]:
    """A closed-loop probe, then open-loop steps from 0.8x the probe up by ``saturation_step`` each,
    until a step is not sustained; the figure is the highest completion rate of any step."""
    cfg = ctx.config
    label = f"throughput, {replicas} manager(s)"
    probe = rig.closed_loop(f"p{replicas}", cfg.probe_in_flight, cfg.probe_seconds, label)
    ctx.progress.note(f"{label}: closed-loop probe {probe['sagas_per_s']:,.0f} sagas/s")
    rate = max(20.0, probe["sagas_per_s"] * 0.8)
    steps: list[dict[str, Any]] = []
    for k in range(max(1, cfg.saturation_steps)):
        run = _open_loop(ctx, rig, f"t{replicas}s{k}", rate, f"{label}, step {k + 1}")
        steps.append(run)
        if not run["sustained"]:
            break
        rate *= cfg.saturation_step
    best = max(steps, key=lambda a: a["sagas_per_s"])
    result: dict[str, Any] = {
        "replicas": replicas,
        "participant_processes": rig.n_participants,
        "partitions": cfg.partitions,
        "probe": probe,
        **best,
        "saturated": not steps[-1]["sustained"],
        "steps": [
            {k: a[k] for k in ("offered_per_s", "sagas_per_s", "sustained", "completed", "sent", "step_retries")}
            | {"p50_ms": a["latency"].get("p50_ms"), "p99_ms": a["latency"].get("p99_ms")}
            for a in steps
        ],
    }
    ceiling = ctx.ceiling.get("produce_msgs_per_s")
    if ceiling:
        result["broker_produce_share"] = round(result["sagas_per_s"] * messages_per_saga(len(rig.definition.steps)) / ceiling, 3)
    ctx.progress.note(
        f"{label}: {result['sagas_per_s']:,.0f} sagas/s (offered {result['offered_per_s']:,.0f}; "
        f"{'saturated at ' + format(steps[-1]['offered_per_s'], ',.0f') + '/s' if result['saturated'] else 'NOT saturated: capacity is higher'}); "
        f"CPU per saga {result['cpu_us_per_saga'].get('total', 0):,.0f} µs"
    )
    return result


def _open_loop(ctx: Context, rig: Rig, tag: str, rate: float, label: str) -> dict[str, Any]:
    cfg = ctx.config
    n = int(rate * cfg.saturation_seconds)
    ids = saga_ids(tag, n)
    meter = rig.meter().start()
    markers_before = rig.tail.markers()
    ended_before = len(rig.tail.ended)
    counts_before = Counter(rig.tail.counts)
    sent = rig.run_paced(ids, rate, label)
    drained = rig.wait_done(ids, cfg.drain_timeout_s, "saturation sagas", strict=False)
    meter.stop()
    ended = rig.tail.ended
    completed = sum(1 for k in ids if k in ended)
    window_from = sent.first_ms + 0.3 * (sent.last_ms - sent.first_ms)
    in_window = sum(1 for k in ids if window_from <= ended.get(k, -1) <= sent.last_ms)
    window_s = (sent.last_ms - window_from) / 1000
    throughput = in_window / window_s if window_s > 0 else 0.0
    markers = rig.tail.markers() - markers_before
    finished = len(rig.tail.ended) - ended_before
    steps = len(rig.definition.steps)
    return {
        "offered_per_s": round(rate, 1),
        "sent": sent.count,
        "generator_max_lag_ms": round(sent.max_lag_ms, 1),
        "seconds": round(sent.seconds, 2),
        "window_s": round(window_s, 2),
        "sagas_per_s": round(throughput, 1),
        "sustained": drained and throughput >= 0.95 * rate,
        "completed": completed,
        "drained": drained,
        "cpu_us_per_saga": meter.per_saga_us(finished),
        "transactions_per_saga": round(markers / finished, 3) if finished else None,
        "log_records_per_transaction": round(finished * (2 * steps + 2) / markers, 2) if markers else None,
        "step_retries": _retries(rig.tail.counts - counts_before, steps),
        "timeline": _timeline(ids, ended, sent.first_ms),
        "latency": summary([ended[k] - rig.gen.sent[k] for k in ids if k in ended]),
    }


def _retries(counts: Counter[str], steps: int) -> int:
    """StepBegun records beyond one per step and saga: retries after timeouts or retryable errors."""
    return max(0, counts["StepBegun"] - steps * counts["SagaBegun"])


def _timeline(ids: list[bytes], ended: dict[bytes, int], first_ms: float) -> list[list[float]]:
    """Completions per second since the first start: shows whether a steady state was reached."""
    buckets: Counter[int] = Counter()
    for k in ids:
        ts = ended.get(k)
        if ts is not None:
            buckets[int((ts - first_ms) // 1000)] += 1
    if not buckets:
        return []
    return [[float(s), float(buckets.get(s, 0))] for s in range(0, max(buckets) + 1)]


def _profile_run(ctx: Context, rig: Rig, rate: float, replicas: int) -> dict[str, Any]:
    cfg = ctx.config
    seconds = cfg.profile_seconds
    targets = {"manager": rig.deployment.managers[0], "participant": rig.deployment.workers[0]}
    ids = saga_ids(f"f{replicas}", int(rate * (seconds + 2)))
    with profiling.Recorder(ctx, targets, seconds) as recorder:
        rig.run_paced(ids, rate, f"profiling at {rate:,.0f} sagas/s")
    return recorder.results


def summarize_throughput(ctx: Context, runs: list[dict[str, Any]]) -> dict[str, Any]:
    definition = bench_definition()
    steps = len(definition.steps)
    best = max((r["sagas_per_s"] for r in runs), default=None)
    out: dict[str, Any] = {
        "saga_type": definition.name,
        "steps": steps,
        "messages_per_saga": messages_per_saga(steps),
        "runs": runs,
        "best_sagas_per_s": best,
    }
    if best is not None and ctx.ceiling.get("produce_msgs_per_s"):
        out["best_broker_produce_share"] = round(best * messages_per_saga(steps) / ctx.ceiling["produce_msgs_per_s"], 3)
    return out


# --- latency ---------------------------------------------------------------------------------


def run_latency(ctx: Context, rig: Rig) -> dict[str, Any]:
    cfg = ctx.config
    levels: list[dict[str, Any]] = []
    out_hops: dict[str, Any] | None = None
    give_up = False
    steps = len(rig.definition.steps)
    for rate in cfg.latency_rates:
        if give_up:
            levels.append({"offered_per_s": rate, "skipped": "a lower load was not sustained"})
            continue
        n = max(10, int(rate * cfg.latency_seconds))
        ids = saga_ids(f"l{rate}", n)
        tracer = None
        if not levels:  # the lowest load: split the latency of every 10th saga into hops
            d = rig.deployment
            tracer = HopTracer(ctx.bootstrap, d.topics, d.partitions, d.participants[0], ctx.codec)
            tracer.traced.update(ids[::10])
        meter = rig.meter().start()
        try:
            sent = rig.run_paced(ids, rate, f"latency at {rate}/s")
            complete = rig.wait_done(ids, cfg.drain_timeout_s, f"sagas at {rate}/s", strict=False)
            meter.stop()
            if tracer is not None:
                time.sleep(0.3)  # the tracer reads three topics: let it see the last records
        finally:
            if tracer is not None:
                tracer.stop()
        ended = rig.tail.ended
        latencies = [ended[k] - rig.gen.sent[k] for k in ids if k in ended]
        window_from = sent.first_ms + 0.2 * (sent.last_ms - sent.first_ms)
        in_window = sum(1 for k in ids if window_from <= ended.get(k, -1) <= sent.last_ms)
        window_s = (sent.last_ms - window_from) / 1000
        achieved = in_window / window_s if window_s > 0 else 0.0
        sustained = complete and achieved >= 0.95 * rate
        level = {
            "offered_per_s": rate,
            "seconds": round(sent.seconds, 2),
            "sent": sent.count,
            "generator_rate": round(sent.rate, 1),
            "generator_max_lag_ms": round(sent.max_lag_ms, 1),
            "completed": len(latencies),
            "completed_share": round(len(latencies) / n, 4),
            "achieved_per_s": round(achieved, 1),
            "sustained": sustained,
            "cpu_us_per_saga": meter.per_saga_us(len(latencies)),
            **summary(latencies),
        }
        if tracer is not None:
            level["hops"] = tracer.breakdown(rig.gen.sent, [s.name for s in rig.definition.steps])
            out_hops = level["hops"]
        ceiling = ctx.ceiling.get("produce_msgs_per_s")
        if ceiling:
            level["broker_produce_share"] = round(rate * messages_per_saga(steps) / ceiling, 4)
        levels.append(level)
        ctx.progress.note(
            f"latency at {rate}/s: p50 {level.get('p50_ms', float('nan')):.0f} ms, p99 {level.get('p99_ms', float('nan')):.0f} ms, "
            f"{'sustained' if sustained else 'NOT sustained'}"
        )
        give_up = not sustained
    out: dict[str, Any] = {"levels": levels, "managers": 1, "participant_processes": rig.n_participants}
    if out_hops is not None:
        out["hops_at_lowest_load"] = {"offered_per_s": cfg.latency_rates[0], **out_hops}
    for level in levels:
        out[f"at_{level['offered_per_s']}"] = level
    return out


def run_sagas(ctx: Context, throughput: bool, latency: bool) -> dict[str, Any]:
    """Latency on a fresh 1-manager deployment, then throughput on a fresh deployment per replica count.

    Fresh topics for each, because the embedded broker gets slower as a log's history grows
    (measured: its CPU per saga at 100 sagas/s doubles after some 12,000 sagas), so a measurement
    made after another would be charged for the one before. The py-spy profile (``--profile``)
    comes last on the first throughput deployment, since it overloads the system.
    """
    cfg = ctx.config
    out: dict[str, Any] = {}
    if latency:
        with Rig(ctx, "latency", managers=1, participants=cfg.participant_processes) as rig:
            rig.warm(cfg.warmup_sagas)
            out["latency"] = run_latency(ctx, rig)
    if throughput:
        runs: list[dict[str, Any]] = []
        for replicas in cfg.replicas:
            with Rig(ctx, f"tput{replicas}", managers=replicas, participants=cfg.participant_processes) as rig:
                rig.warm(cfg.warmup_sagas)
                run = measure_throughput(ctx, rig, replicas)
                if cfg.profile and not runs:
                    rig.wait_idle(cfg.drain_timeout_s * 2)
                    run["profile"] = _profile_run(ctx, rig, run["offered_per_s"], replicas)
                runs.append(run)
                if replicas == 1:
                    ctx.capacity_per_s = run["sagas_per_s"]
        out["throughput"] = summarize_throughput(ctx, runs)
    return out
