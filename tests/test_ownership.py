"""Ownership follows the group, under the interleavings that broke it (issue 11).

Each test drives one interleaving deterministically, with real managers (in this process, so the
test can hold one at an exact point) in a real consumer group on the test broker:

* a manager frozen in the middle of a takeover while the group gives the partition to another
  must not finish that takeover (it would fence the rightful owner);
* a manager fenced by a takeover the group did not ask for takes its partition back;
* a manager killed with a transaction open does not stall its successor, nor queries;
* a manager slow to take over holds up neither the group's rebalances nor another manager.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from harness import ScriptedParticipant, start_sagas, wait_for, wait_terminal

from manager.runtime import Manager, ManagerSettings
from sagalog.config import Topics
from sagalog.definition import DefinitionSet, SagaDefinition
from sagalog.reader import scan
from sagalog.readmodel import ReadModel
from sagalog.records import PartitionClaim

DEFINITION = SagaDefinition(name="pair", steps=[{"name": "a", "participant": "pa"}, {"name": "b", "participant": "pb"}])
SESSION_MS = 6000  # Apache Kafka's default group.min.session.timeout.ms


def settings(bootstrap: str, topics: Topics, name: str, **overrides: object) -> ManagerSettings:
    return ManagerSettings(
        bootstrap=bootstrap,
        definitions=DefinitionSet([DEFINITION]),
        topics=topics,
        group_id=f"{topics.prefix}-g",
        instance_id=name,
        session_timeout_ms=SESSION_MS,
        **overrides,  # type: ignore[arg-type]
    )


@contextmanager
def running(manager: Manager) -> Iterator[Manager]:
    """Run the manager in a thread; fail if its loop died of an exception (it never may)."""
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            manager.run()
        except BaseException as err:
            crashed.append(err)
            raise

    thread = threading.Thread(target=run, daemon=True, name=f"manager-{manager.settings.instance_id}")
    thread.start()
    try:
        yield manager
        assert thread.is_alive() and not crashed, f"manager {manager.settings.instance_id} died: {crashed!r}"
    finally:
        manager.stop()
        thread.join(30)
    assert not crashed, f"manager {manager.settings.instance_id} died: {crashed!r}"


def claims(bootstrap: str, topics: Topics) -> list[tuple[int, str]]:
    return [(e.item.epoch, e.item.owner) for e in scan(bootstrap, topics) if isinstance(e.item, PartitionClaim)]


def test_a_manager_frozen_mid_takeover_does_not_fence_the_rightful_owner(bootstrap: str, make_topics) -> None:
    topics = make_topics(partitions=1, participants=["pa", "pb"])
    # C freezes in the middle of its replay, its main loop too (as SIGSTOP freezes a process), for
    # longer than max.poll.interval.ms: librdkafka takes it out of the group, exactly as a session
    # timeout does to a SIGSTOPped process.
    frozen = Manager(settings(bootstrap, topics, "C", client_overrides={"max.poll.interval.ms": SESSION_MS + 1000}))
    in_replay, thaw = threading.Event(), threading.Event()
    real_replay, real_step = frozen._replay_many, frozen.step

    def replay_then_freeze(*args):  # type: ignore[no-untyped-def]
        if not in_replay.is_set():
            in_replay.set()
            thaw.wait(90)
        return real_replay(*args)

    def step_unless_frozen() -> None:
        if in_replay.is_set():
            thaw.wait(90)
        real_step()

    frozen._replay_many = replay_then_freeze  # type: ignore[method-assign]
    frozen.step = step_unless_frozen  # type: ignore[method-assign]
    rightful = Manager(settings(bootstrap, topics, "A"))
    with running(frozen), ScriptedParticipant(bootstrap, topics, ["pa", "pb"]):
        wait_for(in_replay.is_set, 60, "C to start its takeover")
        with running(rightful):
            wait_for(lambda: 0 in rightful.owned, 60, "A to take partition 0 over while C is frozen")
            thaw.set()  # C wakes up with its takeover half done
            wait_for(lambda: not frozen._pending and 0 not in frozen.owned, 30, "C to give up its stale takeover")
            start_sagas(bootstrap, topics, "pair", ["after-thaw"])
            states = wait_terminal(bootstrap, topics, ["after-thaw"], 60)
            assert states["after-thaw"].status == "COMPLETED"
            assert 0 in rightful.owned and 0 not in frozen.owned
    assert [owner for _, owner in claims(bootstrap, topics)] == ["A"]  # C never claimed, never fenced A


def test_a_manager_fenced_by_an_unasked_takeover_takes_its_partition_back(bootstrap: str, make_topics) -> None:
    topics = make_topics(partitions=1, participants=["pa", "pb"])
    owner = Manager(settings(bootstrap, topics, "B"))
    intruder = Manager(settings(bootstrap, topics, "Z"))  # never joins the group: a zombie's takeover
    try:
        with running(owner), ScriptedParticipant(bootstrap, topics, ["pa", "pb"]):
            wait_for(lambda: 0 in owner.owned, 60, "B to own partition 0")
            start_sagas(bootstrap, topics, "pair", ["before"])
            wait_terminal(bootstrap, topics, ["before"], 60)
            intruder._take_over(0)  # fences B's producer although the group still assigns 0 to B
            start_sagas(bootstrap, topics, "pair", ["after"])  # B's next write is fenced ...
            states = wait_terminal(bootstrap, topics, ["after"], 60)  # ... and B takes 0 back
            assert states["after"].status == "COMPLETED"
            wait_for(lambda: 0 in owner.owned, 30, "B to serve partition 0 again")
            # The intruder's next write is fenced in turn, and it does not fight back: not assigned.
            intruder.owned[0].outbox.log.append((b"intruder", None))
            intruder._commit(0, intruder.owned[0])
            assert 0 not in intruder.owned and not intruder._pending
    finally:
        intruder.close()
    assert [owner for _, owner in claims(bootstrap, topics)] == ["B", "Z", "B"]


def test_a_slow_takeover_holds_up_neither_the_group_nor_another_manager(bootstrap: str, make_topics) -> None:
    """Seed 101 of the long chaos run (docs/RELIABILITY.md): takeovers that blocked the main loop
    held up every rebalance around them (a revocation is served by the loop's poll), so a
    restarted manager waited 10-16 s for partitions. Fencing and replay now run on a worker thread."""
    topics = make_topics(partitions=2, participants=["pa", "pb"])
    slow = Manager(settings(bootstrap, topics, "S"))
    in_replay, release = threading.Event(), threading.Event()
    real_replay = slow._replay_many

    def held_replay(*args):  # type: ignore[no-untyped-def]
        in_replay.set()
        release.wait(90)
        return real_replay(*args)

    slow._replay_many = held_replay  # type: ignore[method-assign]
    other = Manager(settings(bootstrap, topics, "B"))
    try:
        with running(slow), ScriptedParticipant(bootstrap, topics, ["pa", "pb"]):
            wait_for(in_replay.is_set, 60, "S to start taking both partitions over")
            with running(other):
                # S's replay is still held: the rebalance B's arrival starts completes anyway, and B
                # takes its partition over. A loop blocked in the replay would hold B off for good.
                wait_for(lambda: len(other.owned) == 1, 45, "B to serve a partition while S is still replaying")
                assert not slow.owned and not release.is_set()
                release.set()
                wait_for(lambda: len(slow.owned) == 1, 45, "S to claim the partition the group left it")
                assert set(slow.owned) | set(other.owned) == {0, 1}
                ids = [f"slow-{i}" for i in range(8)]  # spread over both partitions
                start_sagas(bootstrap, topics, "pair", ids)
                assert {s.status for s in wait_terminal(bootstrap, topics, ids, 60).values()} == {"COMPLETED"}
    finally:
        release.set()
    # S's takeover of B's partition was void once the group revoked it: S never claimed it.
    by_owner = {owner: epoch for epoch, owner in claims(bootstrap, topics)}
    assert set(by_owner) == {"S", "B"} and len(claims(bootstrap, topics)) == 2


OPEN_TRANSACTION = """
import os, sys
from confluent_kafka import Producer
from sagalog.kafka import producer_config
bootstrap, transactional_id, topic = sys.argv[1:4]
producer = Producer(producer_config(bootstrap, transactional_id=transactional_id))
producer.init_transactions(30)
producer.begin_transaction()
producer.produce(topic, key=b"half-done", value=None, partition=0)
producer.flush(10)
os._exit(9)  # killed with the transaction open: no commit, no abort
"""


def test_a_manager_killed_with_an_open_transaction_stalls_neither_takeover_nor_queries(bootstrap: str, make_topics, tmp_path) -> None:
    topics = make_topics(partitions=1, participants=["pa", "pb"])
    group = f"{topics.prefix}-g"
    dead = subprocess.run(
        [sys.executable, "-c", OPEN_TRANSACTION, bootstrap, f"{group}.{topics.log}.0", topics.log], timeout=60
    )
    assert dead.returncode == 9
    began = time.monotonic()
    with ReadModel(bootstrap, topics, state_dir=tmp_path, timeout_s=5.0) as model:
        model.catch_up()  # answers (perhaps stale), never raises, while the transaction is open
        assert time.monotonic() - began < 15
    manager = Manager(settings(bootstrap, topics, "successor"))
    with running(manager), ScriptedParticipant(bootstrap, topics, ["pa", "pb"]):
        assigned_at = time.monotonic()
        wait_for(lambda: 0 in manager.owned, 30, "the successor to take over despite the open transaction")
        takeover_s = time.monotonic() - assigned_at
        start_sagas(bootstrap, topics, "pair", ["s"])
        assert wait_terminal(bootstrap, topics, ["s"], 60)["s"].status == "COMPLETED"
    assert takeover_s < 20, f"takeover took {takeover_s:.1f}s"
    began = time.monotonic()
    with ReadModel(bootstrap, topics, state_dir=tmp_path, timeout_s=5.0) as model:
        assert model.find("s") is not None and model.staleness is None
    assert time.monotonic() - began < 10
