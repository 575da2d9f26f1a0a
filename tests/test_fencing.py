"""Zombie safety at the write path, deterministically: two managers claim the same partition.

The SIGSTOP test in test_recovery.py shows the whole scenario, but there librdkafka usually
notices the lost session and revokes before the zombie writes. Here the zombie is made to
write after the new owner's takeover, so the fencing itself is what is tested.
"""

from __future__ import annotations

from manager import decide
from manager.runtime import Manager, ManagerSettings, now_ms
from sagalog.config import Topics
from sagalog.definition import DefinitionSet, SagaDefinition
from sagalog.reader import fold_log, scan
from sagalog.records import ParticipantCommand, PartitionClaim, SagaLogRecord, StartSaga

DEFINITION = SagaDefinition(
    name="pair",
    steps=[{"name": "a", "participant": "pa", "timeout_s": 60}, {"name": "b", "participant": "pb", "timeout_s": 60}],
)


def make_manager(bootstrap: str, topics: Topics, name: str) -> Manager:
    settings = ManagerSettings(
        bootstrap=bootstrap, definitions=DefinitionSet([DEFINITION]), topics=topics, group_id=f"{topics.prefix}-g", instance_id=name
    )
    return Manager(settings)


def test_a_fenced_zombie_cannot_write_to_the_log_or_send_commands(bootstrap: str, make_topics) -> None:
    topics = make_topics(partitions=1, participants=["pa", "pb"])
    zombie, successor = make_manager(bootstrap, topics, "zombie"), make_manager(bootstrap, topics, "successor")
    try:
        zombie._take_over(0)
        owned = zombie.owned[0]
        start = StartSaga(saga_id="s1", saga_type="pair", payload="{}", requested_ms=0)
        decision = decide.on_start(None, False, start, DEFINITION, zombie._ctx(owned, now_ms()))
        zombie._apply(owned, decision, now_ms())
        zombie._commit(0, owned)
        assert 0 in zombie.owned  # its first write went through

        successor._take_over(0)  # the group gave partition 0 to someone else; the zombie does not know yet
        assert successor.owned[0].epoch == owned.epoch + 1
        assert "s1" in successor.owned[0].live

        # The zombie decides something the new owner never would (cancel) and tries to write it.
        state = owned.live["s1"]
        zombie._apply(owned, decide.on_cancel(state, "zombie", zombie._ctx(owned, now_ms())), now_ms())
        zombie._commit(0, owned)
        assert 0 not in zombie.owned  # fenced: it dropped the partition instead of retrying
    finally:
        zombie.close()
        successor.close()

    records = [e.item for e in scan(bootstrap, topics)]
    events = [type(e).__name__ for r in records if isinstance(r, SagaLogRecord) for e in r.events]
    assert events == ["SagaBegun", "StepBegun"]  # nothing of the zombie's cancel reached the log
    claims = [r.epoch for r in records if isinstance(r, PartitionClaim)]
    assert claims == [1, 2]
    fold = fold_log(bootstrap, topics)[0]
    assert fold.rejected == [] and fold.sagas["s1"].status == "RUNNING"

    # read_committed consumers (participants) never see the zombie's compensation command.
    from confluent_kafka import Consumer, TopicPartition

    from sagalog.codec import Codec
    from sagalog.kafka import reader_config

    consumer = Consumer(reader_config(bootstrap))
    consumer.assign([TopicPartition(topics.commands("pa"), 0, 0)])
    seen: list[ParticipantCommand] = []
    eof = False
    while not eof:
        for msg in consumer.consume(100, 1.0):
            if msg.error():
                eof = True
                continue
            seen.append(Codec().decode(msg.value()))
    consumer.close()
    # The zombie's first command, and the successor's re-send of the same in-flight command.
    assert {(c.action.value, c.command_id) for c in seen} == {("EXECUTE", "s1/a/execute")}
    assert sorted(c.epoch for c in seen) == [1, 2]


def test_librdkafka_reports_expected_fencing_at_info_not_critical(caplog) -> None:
    import logging

    from sagalog.kafka import _RDKAFKA_LOG

    caplog.set_level(logging.DEBUG, logger=_RDKAFKA_LOG.name)
    _RDKAFKA_LOG.critical("FATAL [rdkafka#producer-6] Fatal error: Local: This instance has been fenced by a newer instance")
    _RDKAFKA_LOG.error("ADDPARTS Failed to add partition: Broker: There is a newer producer with the same transactionalId")
    _RDKAFKA_LOG.error("FAIL [rdkafka#producer-1] Connection refused")
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO", "ERROR"]
