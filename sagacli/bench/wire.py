"""Cheap wire work for the bench process, so that it steals as little CPU as possible from the
system it measures (2 cores, shared with the broker, managers and participants).

* :class:`StartEncoder` writes ``StartSaga`` messages by hand (single-object Avro header plus four
  fields), checked at construction against the project's codec byte for byte.
* :func:`check_peek` checks the core's :class:`sagalog.peek.LogPeek` (which the log tailer uses
  to read the front of a ``SagaLogRecord`` instead of decoding its snapshot) against the codec.
* :class:`Template` turns one encoded record into many by swapping a fixed-length saga id.
* :func:`saga_history` builds the real records of a 3-step saga with ``manager.decide``, so the
  synthetic logs of the replay and query benchmarks are exactly what a manager would write; and
  :func:`definition_message` the definition record a manager writes on a partition before them.
"""

from __future__ import annotations

import json

from manager import decide
from sagalog.codec import MAGIC, Codec, schemas_dir
from sagalog.definition import SagaDefinition
from sagalog.fold import SagaState, definition_record
from sagalog.hotcodec import varint
from sagalog.peek import LogPeek, Peeked
from sagalog.records import (
    Action,
    ParticipantCommand,
    ParticipantReply,
    ReplyOutcome,
    SagaDefinitionRecord,
    SagaLogRecord,
    StartSaga,
)

SAGA_LOG_RECORD = "sagalog.SagaLogRecord"
START_SAGA = "sagalog.StartSaga"


def encode_string(s: str) -> bytes:
    data = s.encode()
    return varint(len(data)) + data


def _schema_json(avro_name: str) -> dict:
    """The current ``.avsc`` of a record, by full Avro name."""
    namespace, _, name = avro_name.rpartition(".")
    for path in sorted(schemas_dir().glob("*.avsc")):
        raw = json.loads(path.read_text())
        if raw.get("name") == name and raw.get("namespace", "") == namespace:
            return raw
    raise LookupError(f"no schema for {avro_name} in {schemas_dir()}")


class StartEncoder:
    """Encodes ``StartSaga(saga_id, saga_type, payload, requested_ms)`` without pydantic or fastavro."""

    def __init__(self, codec: Codec, saga_type: str, payload: str = "{}") -> None:
        raw = _schema_json(START_SAGA)
        fields = [f["name"] for f in raw["fields"]]
        if fields != ["saga_id", "saga_type", "payload", "requested_ms"]:
            raise RuntimeError(f"StartSaga fields changed ({fields}): update sagacli/bench/wire.py")
        self._header = MAGIC + codec.fingerprints[START_SAGA]
        self._middle = encode_string(saga_type) + encode_string(payload)
        probe = StartSaga(saga_id="probe-1", saga_type=saga_type, payload=payload, requested_ms=1_700_000_000_123)
        if self.encode("probe-1", probe.requested_ms) != codec.encode(probe):
            raise RuntimeError("the hand-written StartSaga encoding differs from the codec's: update sagacli/bench/wire.py")

    def encode(self, saga_id: str, requested_ms: int) -> bytes:
        return b"".join((self._header, encode_string(saga_id), self._middle, varint(requested_ms)))


def check_peek(peek: LogPeek, codec: Codec, record: SagaLogRecord) -> None:
    """Raise if peeking an encoded ``record`` does not give back its fields."""
    got = peek.peek(codec.encode(record))
    want = Peeked(record.seq, record.epoch, record.timestamp_ms, tuple(type(e).__name__ for e in record.events))
    if got != want:
        raise RuntimeError(f"LogPeek read {got}, the codec wrote {want}: update sagalog/peek.py")


class Template:
    """An encoded record whose saga id is swapped in: ``render(id)`` for ids of the template's length."""

    def __init__(self, encoded: bytes, placeholder: str) -> None:
        ph = placeholder.encode()
        if encoded.count(ph) != 1:
            raise ValueError(f"placeholder {placeholder!r} occurs {encoded.count(ph)} times in the record")
        self.prefix, self.suffix = encoded.split(ph)
        self.id_len = len(ph)

    def render(self, saga_id: bytes) -> bytes:
        assert len(saga_id) == self.id_len, (saga_id, self.id_len)
        return self.prefix + saga_id + self.suffix


def saga_history(
    definition: SagaDefinition,
    saga_id: str,
    *,
    now_ms: int,
    epoch: int,
    reply_topic: str,
    reply_partition: int,
    writer: str = "bench-synthetic",
) -> list[SagaLogRecord]:
    """Every record of one saga that completes, as ``manager.decide`` writes them (seq 1..n)."""
    ctx = decide.Context(now_ms=now_ms, epoch=epoch, reply_topic=reply_topic, reply_partition=reply_partition, writer=writer)
    start = StartSaga(saga_id=saga_id, saga_type=definition.name, payload="{}", requested_ms=now_ms)
    decision = decide.on_start(None, False, start, definition, ctx)
    records = list(decision.records)
    pending = list(decision.commands)
    while pending:
        _, command = pending.pop(0)
        reply = _success(command)
        assert decision.state is not None
        decision = decide.on_reply(decision.state, reply, ctx)
        records.extend(decision.records)
        pending.extend(decision.commands)
    assert decision.state is not None and decision.state.status.terminal, "the synthetic saga did not finish"
    return records


def definition_message(codec: Codec, records: list[SagaLogRecord], writer: str = "bench-synthetic") -> tuple[bytes, bytes]:
    """(key, value) of the definition record the sagas of ``records`` (from :func:`saga_history`)
    pin: a manager writes it on a partition before the first of them, and readers need it there."""
    pinned = definition_record(SagaState.from_record(records[0]), records[0].timestamp_ms, writer)
    return SagaDefinitionRecord.key(pinned.definition_id), codec.encode(pinned)


def _success(command: ParticipantCommand) -> ParticipantReply:
    return ParticipantReply(
        command_id=ParticipantCommand.make_id(command.saga_id, command.step, Action.EXECUTE),
        saga_id=command.saga_id,
        step=command.step,
        action=command.action,
        attempt=command.attempt,
        epoch=command.epoch,
        outcome=ReplyOutcome.SUCCESS,
        output="{}",
        participant="bench-synthetic",
        replied_ms=command.issued_ms,
    )
