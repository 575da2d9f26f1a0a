"""Sagas pin their definition by reference (SagaLogRecord v6), with real manager processes.

A manager writes a definition's record once per log partition, in the transaction of (and
before) the first record there that pins it; a new owner learns from its replay which
definitions its partitions hold, resumes their sagas by reference and never writes them again;
a fresh ``saga status`` process shows the definition from the log alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from harness import ManagerProcess, ScriptedParticipant, start_sagas, wait_for, wait_terminal

from sagalog.config import Topics
from sagalog.definition import DefinitionSet
from sagalog.reader import saga_states, scan
from sagalog.records import PartitionClaim, SagaDefinitionRecord, SagaLogRecord

DEFINITIONS = """
sagas:
  - name: two
    steps:
      - {name: a, participant: pa, timeout_s: 60}
      - {name: b, participant: pb, timeout_s: 60}
  - name: one
    steps:
      - {name: a, participant: pa, timeout_s: 60}
"""
PARTICIPANTS = ["pa", "pb"]
PARTITIONS = 4
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def deployment(bootstrap: str, make_topics, tmp_path: Path):
    topics = make_topics(partitions=PARTITIONS, participants=PARTICIPANTS)
    defs = tmp_path / "defs.yaml"
    defs.write_text(DEFINITIONS)
    ids = {d.name: d.definition_id for d in (DefinitionSet.load([defs]).get(n) for n in ("two", "one")) if d}
    managers: list[ManagerProcess] = []

    def spawn(name: str) -> ManagerProcess:
        manager = ManagerProcess(bootstrap, topics, defs, tmp_path, name, partitions=PARTITIONS).start()
        managers.append(manager)
        return manager

    yield bootstrap, topics, ids, spawn
    for manager in managers:
        manager.stop()


class LogView:
    """The log read once: definition records and saga records by partition, with offsets."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.definitions: dict[int, list[tuple[int, SagaDefinitionRecord]]] = defaultdict(list)
        self.first_offset: dict[str, tuple[int, int]] = {}  # saga id -> (partition, offset of its first record)
        self.records: list[SagaLogRecord] = []
        self.claims: dict[int, PartitionClaim] = {}
        for entry in scan(bootstrap, topics):
            item = entry.item
            if isinstance(item, SagaDefinitionRecord):
                assert entry.key == SagaDefinitionRecord.key(item.definition_id)
                self.definitions[entry.partition].append((entry.offset, item))
            elif isinstance(item, SagaLogRecord):
                self.records.append(item)
                self.first_offset.setdefault(item.saga_id, (entry.partition, entry.offset))
            elif isinstance(item, PartitionClaim):
                self.claims[entry.partition] = item

    def check_one_record_per_definition_and_partition(self, ids: dict[str, str]) -> None:
        """Each partition holds exactly the definitions its sagas pin, each once, before them."""
        pinned = {r.saga_id: r.snapshot.definition_id for r in self.records}
        assert all(r.snapshot.definition == "" and r.snapshot.definition_id in ids.values() for r in self.records)
        for p in range(PARTITIONS):
            on_partition = Counter(record.definition_id for _, record in self.definitions[p])
            assert all(n == 1 for n in on_partition.values()), (p, on_partition)
            used = {pinned[s] for s, (q, _) in self.first_offset.items() if q == p}
            assert set(on_partition) == used, (p, on_partition, used)
            at = {record.definition_id: offset for offset, record in self.definitions[p]}
            for saga_id, (q, offset) in self.first_offset.items():
                if q == p:
                    assert at[pinned[saga_id]] < offset, saga_id
        for _, record in (d for p in self.definitions for d in self.definitions[p]):
            assert ids[record.saga_type] == record.definition_id and record.version == 1


def test_one_definition_record_per_partition_however_many_sagas(deployment) -> None:
    bootstrap, topics, ids, spawn = deployment
    spawn("m1")
    many = [f"two-{i}" for i in range(40)]
    few = [f"one-{i}" for i in range(6)]
    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS):
        start_sagas(bootstrap, topics, "two", many)
        start_sagas(bootstrap, topics, "one", few)
        states = wait_terminal(bootstrap, topics, many + few, 60)
        start_sagas(bootstrap, topics, "two", ["two-later"])  # its partition has the definition already
        states = wait_terminal(bootstrap, topics, ["two-later"], 60)
    assert {states[s].status.value for s in [*many, *few, "two-later"]} == {"COMPLETED"}
    log = LogView(bootstrap, topics)
    log.check_one_record_per_definition_and_partition(ids)
    partitions_used = {p for p, _ in log.first_offset.values()}
    assert sum(len(log.definitions[p]) for p in range(PARTITIONS)) <= 2 * len(partitions_used) < len(many) + len(few)
    assert {r.definition_id for p in log.definitions for _, r in log.definitions[p]} == set(ids.values())


def test_a_new_manager_resumes_sagas_by_reference_and_status_shows_the_definition(deployment, tmp_path: Path) -> None:
    bootstrap, topics, ids, spawn = deployment
    first = spawn("m1")
    waiting = [f"held-{i}" for i in range(8)]
    start_sagas(bootstrap, topics, "two", waiting)  # no participant yet: step a stays in flight
    wait_for(lambda: set(waiting) <= set(saga_states(bootstrap, topics)), 60, "the sagas to begin")
    before = LogView(bootstrap, topics)
    assert {r.writer for p in before.definitions for _, r in before.definitions[p]} == {first.instance_id}
    first.kill()

    second = spawn("m2")
    with ScriptedParticipant(bootstrap, topics, PARTICIPANTS):
        states = wait_terminal(bootstrap, topics, waiting, 90)
        start_sagas(bootstrap, topics, "two", ["after-1", "after-2"])
        start_sagas(bootstrap, topics, "one", ["one-after"])
        states.update(wait_terminal(bootstrap, topics, ["after-1", "after-2", "one-after"], 60))
    assert {states[s].status.value for s in [*waiting, "after-1", "after-2", "one-after"]} == {"COMPLETED"}

    log = LogView(bootstrap, topics)
    assert {c.owner for c in log.claims.values()} == {second.instance_id}
    resumed = sum(int(n) for n in re.findall(r"(\d+) live resumed", second.output()))
    assert resumed >= len(waiting)  # rebuilt from the replay, by reference
    new_epoch = {p: c.epoch for p, c in log.claims.items()}
    for saga_id in waiting:
        finished = [r for r in log.records if r.saga_id == saga_id]
        partition = log.first_offset[saga_id][0]
        assert finished[0].epoch < new_epoch[partition] == finished[-1].epoch  # begun by m1, ended by m2
        assert finished[-1].snapshot.definition_id == ids["two"]
    # m2 learnt from its replay which definitions were there: it wrote only "one"'s, where missing.
    log.check_one_record_per_definition_and_partition(ids)
    written = {(r.definition_id, r.writer) for p in log.definitions for _, r in log.definitions[p]}
    assert (ids["two"], second.instance_id) not in written
    assert (ids["one"], second.instance_id) in written

    # A fresh process with an empty read model shows the saga with its definition, from the log alone.
    args = ["-b", bootstrap, "--topic-prefix", topics.prefix, "--state-dir", str(tmp_path / "fresh-state")]
    done = subprocess.run([sys.executable, "-m", "sagacli", "status", waiting[0], "--json", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["definition_id"], shown["definition_version"], shown["status"]) == (ids["two"], 1, "COMPLETED")
    assert [(s["name"], s["participant"]) for s in shown["steps"]] == [("a", "pa"), ("b", "pb")]
    text = subprocess.run([sys.executable, "-m", "sagacli", "status", waiting[0], *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert f"definition {ids['two']} (two v1" in text.stdout
