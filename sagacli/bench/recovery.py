"""5. Recovery: three managers under load, one is killed with SIGKILL; how soon do its sagas move again?

The killed manager cannot leave the consumer group, so the group notices only when its session
times out (``session.timeout.ms``); the survivors are then assigned its partitions, fence its
transactional producers, replay, claim and resume. Measured from the moment of the kill, per
partition the victim owned:

* ``claim_ms``: the new owner's ``PartitionClaim`` (its ``timestamp_ms``, stamped after the replay);
* ``progress_ms``: the first saga record the new owner writes there (the sagas progress again).

The target is ``progress_after_kill_ms`` (the slowest of the victim's partitions) within the
session timeout plus one second. Load keeps running throughout; afterwards every saga started
must end (``lost`` counts those that did not).
"""

from __future__ import annotations

import time
from typing import Any

from sagacli.bench.common import Context
from sagacli.bench.load import now_ms, saga_ids
from sagacli.bench.sagas import Rig


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    session = cfg.recovery_session_timeout_ms
    # INFO: the managers' takeovers, with their timings, go to the logs (a few lines each)
    rig = Rig(ctx, "recovery", managers=3, participants=cfg.participant_processes, session_timeout_ms=session, manager_log_level="INFO")
    with rig:
        rig.warm(cfg.warmup_sagas)
        rate = cfg.recovery_rate
        budget_s = session / 1000 + 40
        ids = saga_ids("rec", int(rate * (budget_s + 10)))
        thread, stop, sent = rig.background(ids, rate)
        try:
            _sleep(rig, 2.0, "recovery: load running on 3 managers")
            owners = rig.tail.owners()
            by_owner: dict[str, list[int]] = {}
            for p, owner in owners.items():
                by_owner.setdefault(owner, []).append(p)
            victim = max(rig.deployment.managers, key=lambda m: len(by_owner.get(m.instance_id, [])))
            parts = sorted(by_owner.get(victim.instance_id, []))
            if not parts:
                raise RuntimeError(f"no partition is claimed by any manager: {owners}")
            kill_ms = now_ms()
            victim.kill()
            ctx.progress.status(f"recovery: killed {victim.name} (partitions {parts}); waiting for them to move")

            def moved() -> bool:
                claims, after = rig.tail.claims, rig.tail.after_claim
                return all(
                    p in claims and claims[p].owner != victim.instance_id and after.get(p) is not None for p in parts
                )

            deadline = time.monotonic() + budget_s
            while not moved():
                rig.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"partitions {parts} of the killed manager did not progress within {budget_s:g}s")
                time.sleep(0.02)  # polling the tailer's results
            _sleep(rig, 1.0, "recovery: load continues")
        finally:
            stop.set()
            thread.join()
        started = sent[0].count if sent else 0
        started_ids = ids[:started]
        drained = rig.wait_done(started_ids, cfg.drain_timeout_s + session / 1000 * 2, "sagas after the kill", strict=False)
        claims, after = rig.tail.claims, rig.tail.after_claim
        per_partition = {
            p: {
                "new_owner": claims[p].owner,
                "epoch": claims[p].epoch,
                "claim_ms": round(claims[p].timestamp_ms - kill_ms, 1),
                "progress_ms": round(after[p][0] - kill_ms, 1),  # type: ignore[index]
            }
            for p in parts
        }
        ended = rig.tail.ended
        ends = sorted(ended[k] for k in started_ids if k in ended)
        gaps = [b - a for a, b in zip(ends, ends[1:], strict=False) if a >= kill_ms - 1000]
        result = {
            "managers": 3,
            "session_timeout_ms": session,
            "target_ms": session + 1000,
            "offered_per_s": rate,
            "killed": victim.instance_id,
            "killed_partitions": parts,
            "partitions": per_partition,
            "claim_after_kill_ms": max(v["claim_ms"] for v in per_partition.values()),
            "progress_after_kill_ms": max(v["progress_ms"] for v in per_partition.values()),
            "longest_pause_in_completions_ms": round(max(gaps), 1) if gaps else None,
            "sagas_started": started,
            "lost": started - len(ends),
            "drained": drained,
        }
        ctx.progress.note(
            f"recovery: partitions {parts} progress again {result['progress_after_kill_ms']:,.0f} ms after kill -9 "
            f"(session timeout {session} ms); {result['lost']} of {started:,} sagas did not end"
        )
        return result


def _sleep(rig: Rig, seconds: float, status: str) -> None:
    rig.ctx.progress.status(status)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rig.check()
        time.sleep(0.05)  # waiting while the load runs
