"""6. Memory: resident memory a manager spends per live (unfinished) saga.

One manager, and sagas whose participant never answers (a saga type of its own, ``bench-hold``:
three steps on a participant nobody runs, with a one-day step timeout, so nothing retries or
aborts while we look). The manager's VmRSS (``/proc/<pid>/status``) is read once it holds
``memory_warmup`` live sagas (so imports, caches and client buffers are already paid for) and
again once it holds ``memory_sagas`` more; the difference divided by that number is the figure.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sagacli.bench.common import Context
from sagacli.bench.load import saga_ids
from sagacli.bench.sagas import Rig
from sagacli.process import Child

HOLD_DEFINITION = """\
# Written by saga bench (memory part): the participant never runs, so sagas stay live.
name: bench-hold
version: 1
steps:
  - name: first
    participant: bench-void
    timeout_s: 86400
  - name: second
    participant: bench-void
    timeout_s: 86400
  - name: third
    participant: bench-void
    timeout_s: 86400
"""


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    path = ctx.work / "bench-hold.yaml"
    path.write_text(HOLD_DEFINITION)
    warm = cfg.memory_warmup
    # Every saga is held live on purpose: admission control must not hold any back (its default
    # of 1,000 live sagas per partition is below the measured count).
    manager_args = ("--max-live-sagas", str(warm + cfg.memory_sagas))
    with Rig(ctx, "memory", managers=1, participants=0, definitions=path, participant_names=("bench-void",), manager_args=manager_args) as rig:
        manager = rig.deployment.managers[0]
        _hold(rig, saga_ids("hold-w", warm), warm, "warm-up")
        before = _stable_rss(rig, manager)
        n = cfg.memory_sagas
        _hold(rig, saga_ids("hold", n), warm + n, "measured")
        after = _stable_rss(rig, manager)
    per = (after - before) / n
    result = {
        "live_sagas": n,
        "warmup_sagas": warm,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_live_saga": round(per),
        "definition": str(Path(path).name),
    }
    ctx.progress.note(f"memory: {per:,.0f} bytes of RSS per live saga ({n:,} sagas, RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB)")
    return result


def _hold(rig: Rig, ids: list[bytes], total: int, what: str) -> None:
    rig.gen.burst(ids)
    deadline = time.monotonic() + 120 + total / 200
    while rig.tail.counts["SagaBegun"] < total:
        rig.check()
        rig.ctx.progress.status(f"memory: {rig.tail.counts['SagaBegun']:,}/{total:,} sagas live ({what})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the manager began {rig.tail.counts['SagaBegun']:,} of {total:,} sagas")
        time.sleep(0.1)  # polling the tailer's count


def _stable_rss(rig: Rig, manager: Child, timeout_s: float = 10.0) -> int:
    """RSS once it stops moving (three readings 0.3 s apart within 0.2 %), or after ``timeout_s``."""
    readings = [manager.rss_bytes()]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.3)  # sampling interval
        rig.check()
        readings.append(manager.rss_bytes())
        last = readings[-3:]
        if len(last) == 3 and max(last) - min(last) <= 0.002 * max(last):
            break
    return readings[-1]
