"""The log on a real broker: records appended by a producer replay, from a fresh consumer, to
exactly the state the pure fold computes from the same records."""

from __future__ import annotations

from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import partition_logs

from sagalog.codec import Codec
from sagalog.fold import PartitionFold
from sagalog.kafka import producer_config
from sagalog.reader import fold_log

CODEC = Codec()


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(logs=st.lists(partition_logs(max_sagas=3), min_size=2, max_size=2))
def test_appended_records_replay_to_the_pure_fold(bootstrap: str, make_topics, logs) -> None:
    topics = make_topics(partitions=2)
    producer = Producer(producer_config(bootstrap))
    expected: dict[int, PartitionFold] = {}
    for partition, messages in enumerate(logs):
        fold = expected.setdefault(partition, PartitionFold(partition=partition))
        for offset, (key, record) in enumerate(messages):
            value = None if record is None else CODEC.encode(record)
            producer.produce(topics.log, value=value, key=key, partition=partition)
            fold.apply(key, record, offset)
    producer.flush(10)

    replayed = fold_log(bootstrap, topics)
    for partition, fold in expected.items():
        got = replayed.get(partition, PartitionFold(partition=partition))
        assert got.sagas == fold.sagas
        assert got.epoch == fold.epoch
        assert got.rejected_count == fold.rejected_count


def test_empty_log_replays_to_nothing(bootstrap: str, make_topics) -> None:
    topics = make_topics(partitions=3)
    assert all(not f.sagas for f in fold_log(bootstrap, topics).values())


def test_undecodable_log_records_are_counted_not_fatal(bootstrap: str, make_topics) -> None:
    topics = make_topics(partitions=1)
    producer = Producer(producer_config(bootstrap))
    producer.produce(topics.log, value=b"junk", key=b"s", partition=0)
    producer.flush(10)
    fold = fold_log(bootstrap, topics)[0]
    assert fold.sagas == {} and fold.rejected_count == 1 and "header" in fold.rejected[0][1]
