"""The takeover replay (each saga's newest acceptable record) equals the full fold."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from strategies import partition_logs

from sagacli.bench.sagas import bench_definition
from sagacli.bench.wire import saga_history
from sagalog.codec import Codec
from sagalog.fold import PartitionFold, fold_newest
from sagalog.peek import LogPeek, Peeked
from sagalog.records import PartitionClaim, SagaEnded, SagaLogRecord

CODEC = Codec()


def encoded(messages):
    return [(key, None if item is None else CODEC.encode(item), offset) for offset, (key, item) in enumerate(messages)]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(partition_logs(max_sagas=4))
def test_newest_record_replay_equals_the_full_fold(messages) -> None:
    full = PartitionFold(partition=0)
    for offset, (key, item) in enumerate(messages):
        full.apply(key, item, offset)
    fast = fold_newest(encoded(messages), CODEC.decode, 0)
    assert fast.sagas == full.sagas
    assert fast.epoch == full.epoch
    assert fast.definitions == full.definitions  # what a new owner need not write again


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(partition_logs(max_sagas=2))
def test_a_zombie_write_after_a_claim_and_garbage_are_skipped(messages) -> None:
    raw = encoded(messages)
    records = [CODEC.decode(v) for _, v, _ in raw if v is not None]
    sagas = [r for r in records if isinstance(r, SagaLogRecord)]
    epoch = max([r.epoch for r in records if isinstance(r, PartitionClaim)] + [r.epoch for r in sagas] + [0])
    victim = sagas[-1] if sagas else None
    claim = PartitionClaim(partition=0, epoch=epoch + 1, owner="new", timestamp_ms=0)
    raw.append((PartitionClaim.key(0), CODEC.encode(claim), len(raw)))
    expected = fold_newest(list(raw), CODEC.decode, 0).sagas
    if victim is not None:  # the old owner writes after the claim: rejected, state unchanged
        zombie = victim.model_copy(update={"seq": victim.seq + 1, "event": SagaEnded()})
        raw.append((victim.saga_id.encode(), CODEC.encode(zombie), len(raw)))
    raw.append((b"garbage", b"not avro", len(raw)))
    fast = fold_newest(raw, CODEC.decode, 0)
    assert fast.sagas == expected
    assert fast.rejected_count == (2 if victim is not None else 1)


PEEK = LogPeek(CODEC)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(partition_logs(max_sagas=4))
def test_peeking_replay_builds_only_running_sagas_and_finds_the_same_ended_ones(messages) -> None:
    full = PartitionFold(partition=0)
    for offset, (key, item) in enumerate(messages):
        full.apply(key, item, offset)
    peeked = fold_newest(encoded(messages), CODEC.decode, 0, PEEK.peek)
    assert peeked.sagas == {i: s for i, s in full.sagas.items() if not s.status.terminal}
    assert peeked.finished == {i: s.updated_ms for i, s in full.sagas.items() if s.status.terminal}
    ended_epochs = [s.epoch for s in full.sagas.values() if s.status.terminal]
    assert peeked.finished_epoch == max(ended_epochs, default=0)
    assert peeked.epoch == full.epoch


def test_peeking_replay_rejects_a_zombies_ending_written_after_a_claim() -> None:
    history = saga_history(bench_definition(), "z-1", now_ms=1_700_000_000_000, epoch=1, reply_topic="t.inbox", reply_partition=0)
    running = history[:-1]
    zombie_end = history[-1]  # the old owner ends the saga after the new owner claimed the partition
    raw = [(b"z-1", CODEC.encode(r), i) for i, r in enumerate(running)]
    raw.append((PartitionClaim.key(0), CODEC.encode(PartitionClaim(partition=0, epoch=2, owner="new", timestamp_ms=0)), len(raw)))
    raw.append((b"z-1", CODEC.encode(zombie_end), len(raw)))
    fold = fold_newest(raw, CODEC.decode, 0, PEEK.peek)
    assert fold.finished == {}
    assert fold.sagas["z-1"].seq == running[-1].seq  # the last write before the claim
    assert fold.rejected_count == 1


def test_peek_reads_every_record_of_a_saga_and_refuses_what_it_cannot_read() -> None:
    history = saga_history(bench_definition(), "p-1", now_ms=1_700_000_000_000, epoch=3, reply_topic="t.inbox", reply_partition=0)
    for record in history:
        got = PEEK.peek(CODEC.encode(record))
        assert got == Peeked(record.seq, record.epoch, record.timestamp_ms, tuple(type(e).__name__ for e in record.events))
    assert got is not None and got.ends_saga
    assert PEEK.peek(None) is None
    assert PEEK.peek(b"not avro") is None
    encoded_end = CODEC.encode(history[-1])
    assert PEEK.peek(encoded_end[:14]) is None  # truncated inside the leading fields
    claim = CODEC.encode(PartitionClaim(partition=0, epoch=2, owner="x", timestamp_ms=0))
    assert PEEK.peek(claim) is None
