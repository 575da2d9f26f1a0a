"""Overload: ``overload_factor`` (2) times capacity offered for ``overload_seconds`` (30).

Capacity is what one manager completed in the throughput part (its saturation figure); when the
throughput part did not run, a closed-loop probe on this deployment estimates it. A fresh
1-manager deployment is then offered twice that, open loop. Measured:

* ``completed_per_s``: sagas whose ``SagaEnded`` falls in the steady window of the offer (its
  last 70 %), per second, and ``completion_share``: that over capacity (the target: >= 0.9);
* ``step_retries`` (StepBegun beyond one per step and saga: with no-op participants that never
  fail, each is a step timeout that fired) and ``aborted`` (SagaAborting records);
* ``admitted``: latency from the manager's ``SagaBegun`` to ``SagaEnded`` of the sagas that
  ended (the target: bounded, below the step timeout); ``latency``: start-to-end, which includes
  the time a start waited in the inbox;
* CPU µs per saga per process kind over the offer and the drain.

The manager runs with admission control sized to the capacity (``--max-live-sagas`` = capacity x
``overload_admission_s`` / partitions): starts beyond it wait in the inbox order while the admitted
sagas' replies are handled (docs/ARCHITECTURE.md).

Then it waits (at most ``drain_timeout_s`` + twice the offer) for the backlog to drain.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from sagacli.bench.common import Context, summary
from sagacli.bench.load import saga_ids
from sagacli.bench.sagas import Rig, _retries, _timeline


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    # Admission control sized for the capacity measured: about overload_admission_s of work live.
    limit = max(10, math.ceil(ctx.capacity_per_s * cfg.overload_admission_s / cfg.partitions)) if ctx.capacity_per_s else None
    manager_args = ("--max-live-sagas", str(limit)) if limit else ()
    with Rig(ctx, "overload", managers=1, participants=cfg.participant_processes, manager_args=manager_args) as rig:
        rig.warm(cfg.warmup_sagas)
        capacity = ctx.capacity_per_s
        source = "throughput part, 1 manager"
        if not capacity:
            probe = rig.closed_loop("ovp", cfg.probe_in_flight, cfg.probe_seconds, "overload: capacity probe")
            rig.wait_idle(cfg.drain_timeout_s)
            capacity, source = probe["sagas_per_s"], "closed-loop probe on this deployment"
        rate = max(10.0, capacity * cfg.overload_factor)
        ids = saga_ids("ov", int(rate * cfg.overload_seconds))
        counts_before = Counter(rig.tail.counts)
        ended_before = len(rig.tail.ended)
        meter = rig.meter().start()
        sent = rig.run_paced(ids, rate, f"overload ({cfg.overload_factor:g}x capacity)")
        ended, begun = rig.tail.ended, rig.tail.begun
        window_from = sent.first_ms + 0.3 * (sent.last_ms - sent.first_ms)
        window_s = (sent.last_ms - window_from) / 1000
        in_window = sum(1 for k in ids if window_from <= ended.get(k, -1) <= sent.last_ms)
        completed_per_s = in_window / window_s if window_s > 0 else 0.0
        ended_during_offer = sum(1 for k in ids if k in ended and ended[k] <= sent.last_ms)
        drained = rig.wait_done(ids, cfg.drain_timeout_s + 2 * cfg.overload_seconds, "overload sagas", strict=False)
        meter.stop()
        counts = rig.tail.counts - counts_before
        finished = len(rig.tail.ended) - ended_before
        steps = len(rig.definition.steps)
        timeouts_s = sorted(step.timeout_s for step in rig.definition.steps)
        result: dict[str, Any] = {
            "capacity_per_s": capacity,
            "max_live_sagas_per_partition": limit,  # None: the manager's default
            "capacity_from": source,
            "factor": cfg.overload_factor,
            "offered_per_s": round(rate, 1),
            "seconds": round(sent.seconds, 2),
            "sent": sent.count,
            "generator_max_lag_ms": round(sent.max_lag_ms, 1),
            "completed_per_s": round(completed_per_s, 1),
            "completion_share": round(completed_per_s / capacity, 3) if capacity else None,
            "ended_during_offer": ended_during_offer,
            "completed": sum(1 for k in ids if k in ended),
            "drained": drained,
            "step_retries": _retries(counts, steps),
            "aborted": counts["SagaAborting"],
            "step_timeout_s": timeouts_s[0] if timeouts_s else None,
            "admitted": summary([ended[k] - begun[k] for k in ids if k in ended and k in begun]),
            "latency": summary([ended[k] - rig.gen.sent[k] for k in ids if k in ended]),
            "cpu_us_per_saga": meter.per_saga_us(finished),
            "timeline": _timeline(ids, ended, sent.first_ms),
        }
    ctx.progress.note(
        f"overload: {rate:,.0f} sagas/s offered ({cfg.overload_factor:g}x {capacity:,.0f}/s) -> "
        f"{completed_per_s:,.0f}/s completed ({result['completion_share'] or 0:.0%} of capacity), "
        f"{result['step_retries']} step retries, {result['aborted']} aborted, "
        f"admitted p99 {result['admitted'].get('p99_ms', float('nan')):,.0f} ms"
    )
    return result
