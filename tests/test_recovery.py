"""Crash recovery and zombies with real manager processes and real signals.

Every test ends with the reliability bar's checks: every saga terminal, no step ended twice,
no compensation where none was due, no record of a stale owner accepted into the log.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import ManagerProcess, ScriptedParticipant, start_sagas, wait_for, wait_terminal

from sagalog.reader import fold_log, scan
from sagalog.records import PartitionClaim, SagaLogRecord, StepEnded

pytestmark = pytest.mark.slow

DEFINITIONS = """
name: trip
steps:
  - {name: flight, participant: flights, timeout_s: 5.0, retry: {attempts: 1}}
  - {name: hotel, participant: hotels, timeout_s: 5.0, retry: {attempts: 1}}
  - {name: car, participant: cars, timeout_s: 5.0, retry: {attempts: 1}}
"""
PARTICIPANTS = ["flights", "hotels", "cars"]
SESSION_MS = 6000


@pytest.fixture
def cluster(bootstrap: str, make_topics, tmp_path: Path):
    topics = make_topics(partitions=6, participants=PARTICIPANTS)
    defs = tmp_path / "trip.yaml"
    defs.write_text(DEFINITIONS)
    managers: list[ManagerProcess] = []

    def spawn(name: str) -> ManagerProcess:
        m = ManagerProcess(bootstrap, topics, defs, tmp_path, name, partitions=6, session_timeout_ms=SESSION_MS).start()
        managers.append(m)
        return m

    yield bootstrap, topics, spawn
    for m in managers:
        m.stop()


def assert_all_completed_once(bootstrap, topics, ids, participant) -> None:
    states = wait_terminal(bootstrap, topics, ids, 120)
    statuses = Counter(states[i].status.value for i in ids)
    assert statuses == {"COMPLETED": len(ids)}, statuses
    wanted = set(ids)
    ended = Counter((r.saga_id, ev.step) for e in scan(bootstrap, topics) if isinstance(r := e.item, SagaLogRecord) and r.saga_id in wanted for ev in r.events if isinstance(ev, StepEnded))
    assert all(n == 1 for n in ended.values()), [k for k, n in ended.items() if n > 1][:5]
    assert len(ended) == 3 * len(ids)
    assert not [c for c in participant.received if c.action.value == "COMPENSATE"]
    rejected = [r for f in fold_log(bootstrap, topics).values() for r in f.rejected]
    assert rejected == [], rejected[:5]


def owners(bootstrap, topics) -> dict[int, str]:
    """partition -> owner of the newest claim on it."""
    out: dict[int, tuple[int, str]] = {}
    for e in scan(bootstrap, topics):
        if isinstance(e.item, PartitionClaim):
            out[e.partition] = (e.item.epoch, e.item.owner)
    return {p: owner for p, (_, owner) in out.items()}


def test_kill_one_of_three_managers_every_saga_finishes(cluster) -> None:
    bootstrap, topics, spawn = cluster
    managers = [spawn(f"m{i}") for i in range(3)]
    ids = [f"k-{i}" for i in range(300)]
    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, delay_s=0.3) as p:
        start_sagas(bootstrap, topics, "trip", ["warmup"])
        wait_terminal(bootstrap, topics, ["warmup"], 60)
        wait_for(lambda: len(set(owners(bootstrap, topics).values())) == 3, 60, "all three managers to own partitions")
        start_sagas(bootstrap, topics, "trip", ids)
        wait_for(lambda: len(p.received) > 200, 60, "sagas to be in flight")
        victim = managers[0]
        victim.kill()  # SIGKILL: no goodbye, its partitions move after the session timeout
        killed_at = time.monotonic()
        assert_all_completed_once(bootstrap, topics, ids, p)
        took = time.monotonic() - killed_at
    assert all(m.alive for m in managers[1:])
    assert took < 60, f"takeover and completion took {took:.1f}s"


def test_kill_all_managers_and_restart_every_saga_resumes(cluster) -> None:
    bootstrap, topics, spawn = cluster
    first = [spawn(f"a{i}") for i in range(3)]
    ids = [f"r-{i}" for i in range(200)]
    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, delay_s=0.3) as p:
        start_sagas(bootstrap, topics, "trip", ids)
        wait_for(lambda: len(p.received) > 100, 60, "sagas to be in flight")
        for m in first:
            m.kill()
        states_while_down = {s.saga_id: s.status.value for f in fold_log(bootstrap, topics).values() for s in f.sagas.values()}
        assert Counter(states_while_down.values())["RUNNING"] > 0  # work really was interrupted
        [spawn(f"b{i}") for i in range(3)]
        assert_all_completed_once(bootstrap, topics, ids, p)


def test_zombie_manager_causes_no_contradicting_effect(cluster) -> None:
    """SIGSTOP a manager past its session timeout, let the other take over, then SIGCONT it.

    While frozen, the zombie's step deadlines (5 s) pass: on waking it would time the steps out
    and compensate them, contradicting the new owner, which completed them. Its writes must fail
    (fenced by transactional.id) and no compensation may ever reach a participant.
    """
    bootstrap, topics, spawn = cluster
    zombie, survivor = spawn("zombie"), spawn("survivor")
    ids = [f"z-{i}" for i in range(120)]
    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, delay_s=0.5) as p:
        start_sagas(bootstrap, topics, "trip", ["warmup"])
        wait_terminal(bootstrap, topics, ["warmup"], 60)
        wait_for(lambda: len(set(owners(bootstrap, topics).values())) == 2, 60, "both managers to own partitions")
        start_sagas(bootstrap, topics, "trip", ids)
        wait_for(lambda: len(p.received) > 60, 60, "sagas to be in flight")
        zombie.signal(signal.SIGSTOP)
        frozen_owner_count = len(owners(bootstrap, topics))
        wait_for(lambda: len(set(owners(bootstrap, topics).values())) == 1, 60, "the survivor to claim every partition")
        time.sleep(5)  # deliberately frozen past the 5 s step deadlines: this is the zombie scenario, not a wait
        zombie.signal(signal.SIGCONT)
        assert_all_completed_once(bootstrap, topics, ids, p)
        # The zombie woke, met the new epoch, and keeps running (it rejoins the group).
        wait_for(lambda: "fenced" in zombie.output().lower() or "released partition" in zombie.output(), 30, "the zombie to notice it lost its partitions")
    assert frozen_owner_count == 6
    assert zombie.alive and survivor.alive
