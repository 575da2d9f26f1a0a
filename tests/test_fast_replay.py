"""The takeover replay (each saga's newest acceptable record) equals the full fold."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from strategies import partition_logs

from sagalog.codec import Codec
from sagalog.fold import PartitionFold, fold_newest
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
