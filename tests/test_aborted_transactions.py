"""A manager's transaction aborted after its records and commands reached the broker is harmless.

Apache Kafka hides aborted records from ``read_committed`` readers. The embedded broker (Tansu
0.6) delivers them once the abort is done, when they were flushed before it (measured: issue 9).
Either way the outcome must be the same: the manager takes the partition over again from the
log, re-reads the inbox from the committed offset, and the saga goes on with no record the fold
rejects (no two records with one sequence number) and no step whose effect a participant could
apply twice (every copy of a command carries the same command id, which participants de-duplicate).
"""

from __future__ import annotations

import threading

from harness import ScriptedParticipant, start_sagas, wait_terminal

from manager.runtime import Manager, ManagerSettings
from sagalog.definition import DefinitionSet, SagaDefinition
from sagalog.errors import BrokerError
from sagalog.reader import fold_log, scan
from sagalog.records import SagaLogRecord

DEFINITION = SagaDefinition(name="pair", steps=[{"name": "a", "participant": "pa"}, {"name": "b", "participant": "pb"}])


def test_a_transaction_aborted_after_its_commands_were_flushed_is_harmless(bootstrap: str, make_topics) -> None:
    topics = make_topics(partitions=1, participants=["pa", "pb"])
    manager = Manager(
        ManagerSettings(bootstrap=bootstrap, definitions=DefinitionSet([DEFINITION]), topics=topics, group_id=f"{topics.prefix}-g")
    )
    real_write = manager._write
    aborted: list[int] = []

    def flush_then_abort_once(p, producer, out, metadata):  # type: ignore[no-untyped-def]
        # The transaction that ends step a and sends step b's command: abort it once, after flushing.
        if aborted or not any(topic == topics.commands("pb") for topic, _, _ in out.commands):
            return real_write(p, producer, out, metadata)
        producer.begin_transaction()
        for key, value in out.log:
            producer.produce(topics.log, value=value, key=key, partition=p)
        for topic, key, value in out.commands:
            producer.produce(topic, value=value, key=key)
        assert producer.flush(10) == 0  # the broker has every record of the transaction
        producer.abort_transaction(10)
        aborted.append(len(out.log))
        return BrokerError("injected: transaction aborted after its records were flushed", retryable=True)

    manager._write = flush_then_abort_once  # type: ignore[method-assign]
    thread = threading.Thread(target=manager.run, daemon=True)
    thread.start()
    try:
        with ScriptedParticipant(bootstrap, topics, ["pa", "pb"]) as participant:
            start_sagas(bootstrap, topics, "pair", ["s"])
            states = wait_terminal(bootstrap, topics, ["s"], 60)
    finally:
        manager.stop()
        thread.join(30)
    assert aborted, "the injected abort never happened"
    assert states["s"].status == "COMPLETED"
    fold = fold_log(bootstrap, topics)[0]
    assert fold.rejected_count == 0, fold.rejected  # one consistent history, whatever the broker showed
    sequence = [e.item.seq for e in scan(bootstrap, topics) if isinstance(e.item, SagaLogRecord)]
    assert len(sequence) == len(set(sequence)), f"two records with one seq: {sequence}"
    b_commands = [c for c in participant.received if c.step == "b"]
    assert {c.command_id for c in b_commands} == {"s/b/execute"}  # copies share the id: applied once
    # 1 copy on Apache Kafka (aborted records hidden); 2 on the embedded broker (the aborted one too).
    assert 1 <= len(b_commands) <= 2
