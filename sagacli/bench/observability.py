"""8. What watching costs: CPU per saga with metrics and tracing off, metrics on, both on.

Each mode gets a fresh 1-manager deployment (fresh topics: the embedded broker slows down as a
log's history grows, so a mode measured after another would be charged for it), the same offered
load (``observability_rate`` sagas/s for ``observability_seconds``), and the same CPU meter as the
throughput part, per process kind. Metrics on: managers and participants serve ``/metrics``
(nobody scrapes: the cost of keeping them). Tracing on: the OTEL_* variables below, with spans
exported to the console exporter, whose output goes to the processes' log files (the formatting
and export are paid as they would be with a collector, the network is not).
"""

from __future__ import annotations

from typing import Any

from sagacli.bench.common import Context
from sagacli.bench.load import saga_ids
from sagacli.bench.sagas import Rig

#: (mode, manager flags, participant flags, environment)
MODES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], dict[str, str]], ...] = (
    ("off", (), (), {}),
    ("metrics", ("--metrics-port", "0"), ("--metrics-port", "0"), {}),
    (
        "metrics+tracing",
        ("--metrics-port", "0"),
        ("--metrics-port", "0"),
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "saga-bench"},
    ),
)


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    out: dict[str, Any] = {"rate_per_s": cfg.observability_rate, "seconds": cfg.observability_seconds, "modes": {}}
    for mode, manager_args, participant_args, env in MODES:
        with Rig(
            ctx, f"obs-{mode.replace('+', '-')}", managers=1, participants=cfg.participant_processes,
            manager_args=manager_args, participant_args=participant_args, env=env,
        ) as rig:  # fmt: skip
            rig.warm(cfg.warmup_sagas)
            ids = saga_ids(f"obs-{mode}", int(cfg.observability_rate * cfg.observability_seconds))
            meter = rig.meter().start()
            sent = rig.run_paced(ids, cfg.observability_rate, f"observability ({mode})")
            drained = rig.wait_done(ids, cfg.drain_timeout_s, f"{mode} sagas", strict=False)
            meter.stop()
            ended = sum(1 for k in ids if k in rig.tail.ended)
            out["modes"][mode] = {
                "sent": sent.count,
                "completed": ended,
                "drained": drained,
                "cpu_us_per_saga": meter.per_saga_us(ended),
            }
    base = out["modes"].get("off", {}).get("cpu_us_per_saga", {}).get("total")
    for result in out["modes"].values():
        total = result["cpu_us_per_saga"].get("total")
        if base and total:
            result["overhead_vs_off"] = round(total / base - 1, 3)
    ctx.progress.note(
        "observability: CPU per saga "
        + ", ".join(f"{m} {r['cpu_us_per_saga'].get('total', 0):,.0f} µs" for m, r in out["modes"].items())
    )
    return out
