"""Idle: what a deployment costs with no traffic at all.

The smallest deployment (the broker, one manager, one participant process) is started on fresh
topics and runs a few warm-up sagas, so every client has joined its group, fetched its metadata
and reached its steady loop. Then the bench closes its own clients (the log tailer and the
generator: nothing but the deployment talks to the broker), waits until its CPU is steady (two
1 s windows alike, at most ``STEADY_MAX_S``), and reads the CPU
time (``utime + stime`` in ``/proc/<pid>/stat``, all threads) of each process over
``idle_seconds``. The figure is in cores: CPU seconds per second of wall clock, per process kind
and in total. Without the broker's pid (a broker on another machine or in a container) the
total covers the manager and the participant only, and ``broker_measured`` is false.

Before the deployment starts, the bench waits (at most ``QUIET_MAX_S``) until the broker alone is
quiet, under ``QUIET_CORES`` for two 1 s windows: a JVM broker collects garbage and flushes for a
while after the ceiling's traffic. ``broker_baseline_cores`` is its CPU in the last two windows,
with none of this bench's clients (background work, other users' clients): reported beside the
figure, not subtracted from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sagacli.bench.common import Context, CpuMeter
from sagacli.bench.sagas import Rig

#: Windows of this length decide when the broker is quiet and when the deployment is steady.
WINDOW_S = 1.0
#: Before the deployment starts, the broker alone must stay under this for two windows in a row
#: (a JVM broker collects garbage and flushes for a while after the ceiling's traffic) ...
QUIET_CORES = 0.05
#: ... or this long has passed.
QUIET_MAX_S = 20.0
#: After the bench's clients are closed, the deployment is steady when two windows in a row differ
#: by under 0.01 core or 20 %; or after this long.
STEADY_MAX_S = 10.0


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    baseline: float | None = None
    quiet_wait_s = 0.0
    if ctx.broker_pid is not None:
        started = time.monotonic()
        windows = _windows(
            ctx, {"broker": [ctx.broker_pid]}, "idle: waiting for the broker alone to be quiet", lambda: None,
            lambda w: w[-1] < QUIET_CORES and w[-2] < QUIET_CORES, QUIET_MAX_S,
        )  # fmt: skip
        baseline, quiet_wait_s = round(sum(windows[-2:]) / 2, 4), round(time.monotonic() - started, 1)
    with Rig(ctx, "idle", managers=1, participants=1) as rig:
        rig.warm(cfg.warmup_sagas)
        rig.quiesce()
        check = rig.deployment.check_alive
        started = time.monotonic()
        _windows(
            ctx, rig.meter(bench=False).groups, "idle: waiting for the deployment to settle", check,
            lambda w: abs(w[-1] - w[-2]) < max(0.01, 0.2 * w[-2]), STEADY_MAX_S,
        )  # fmt: skip
        settle_s = round(time.monotonic() - started, 1)
        meter = rig.meter(bench=False).start()
        started = time.monotonic()
        _wait(ctx, cfg.idle_seconds, f"idle: measuring the deployment's CPU for {cfg.idle_seconds:g} s", check)
        used = meter.stop()
        wall = time.monotonic() - started
    cores = {kind: round(seconds / wall, 4) for kind, seconds in used.items()}
    result: dict[str, Any] = {
        "seconds": round(wall, 2),
        "managers": 1,
        "participant_processes": 1,
        "broker_measured": "broker" in used,
        "cpu_seconds": {kind: round(seconds, 3) for kind, seconds in used.items()},
        "cores": cores,
        "total_cores": round(sum(used.values()) / wall, 4),
        "broker_baseline_cores": baseline,
        "broker_quiet_wait_s": quiet_wait_s,
        "settle_s": settle_s,
    }
    ctx.progress.note(
        f"idle: {result['total_cores']:.3f} core in total ("
        + ", ".join(f"{kind} {value:.3f}" for kind, value in cores.items())
        + ("" if result["broker_measured"] else "; broker not measured")
        + ("" if baseline is None else f"; the broker alone before: {baseline:.3f}")
        + ")"
    )
    return result


def _wait(ctx: Context, seconds: float, status: str, check: Any) -> None:
    ctx.progress.status(status)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        check()
        time.sleep(min(0.25, max(0.0, end - time.monotonic())))  # waiting while nothing happens


def _windows(
    ctx: Context, groups: dict[str, list[int]], status: str, check: Any, done: Callable[[list[float]], bool], max_s: float
) -> list[float]:
    """CPU of ``groups`` (cores, all together) in consecutive windows, until ``done(windows)`` (at
    least two windows) or ``max_s``."""
    windows: list[float] = []
    deadline = time.monotonic() + max_s
    while True:
        meter = CpuMeter(groups).start()
        started = time.monotonic()
        _wait(ctx, WINDOW_S, status, check)
        windows.append(sum(meter.stop().values()) / (time.monotonic() - started))
        if (len(windows) >= 2 and done(windows)) or time.monotonic() > deadline:
            return windows
