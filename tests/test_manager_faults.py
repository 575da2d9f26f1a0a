"""A transaction that fails (not fenced) makes the manager rebuild the partition from the log and
re-read the inbox from the committed offset: nothing decided in the failed transaction is lost."""

from __future__ import annotations

import threading

from harness import ScriptedParticipant, start_sagas, wait_terminal

from manager.runtime import Manager, ManagerSettings
from sagalog.definition import DefinitionSet, SagaDefinition
from sagalog.errors import BrokerError
from sagalog.reader import fold_log, scan
from sagalog.records import PartitionClaim

DEFINITION = SagaDefinition(name="pair", steps=[{"name": "a", "participant": "pa"}, {"name": "b", "participant": "pb"}])


def test_a_failed_transaction_is_recovered_from_the_log(bootstrap: str, make_topics) -> None:
    topics = make_topics(partitions=1, participants=["pa", "pb"])
    manager = Manager(ManagerSettings(bootstrap=bootstrap, definitions=DefinitionSet([DEFINITION]), topics=topics, group_id=f"{topics.prefix}-g"))
    real_write = manager._write
    failures: list[int] = []

    def write_failing_once(p, producer, out, metadata):
        if not failures and out.next_inbox_offset is not None:
            failures.append(p)  # the batch is lost, as when the broker aborts it
            return BrokerError("injected: transaction failed", retryable=True)
        return real_write(p, producer, out, metadata)

    manager._write = write_failing_once  # type: ignore[method-assign]
    thread = threading.Thread(target=manager.run, daemon=True)
    thread.start()
    try:
        with ScriptedParticipant(bootstrap, topics, ["pa", "pb"]):
            start_sagas(bootstrap, topics, "pair", ["f-1", "f-2"])
            states = wait_terminal(bootstrap, topics, ["f-1", "f-2"], 60)
    finally:
        manager.stop()
        thread.join(30)
    assert failures == [0]
    assert {states["f-1"].status, states["f-2"].status} == {"COMPLETED"}
    claims = [e.item.epoch for e in scan(bootstrap, topics) if isinstance(e.item, PartitionClaim)]
    assert claims == [1, 2]  # taken over again after the failure
    assert fold_log(bootstrap, topics)[0].rejected_count == 0
