"""Cheap wire work for the bench process, so that it steals as little CPU as possible from the
system it measures (2 cores, shared with the broker, managers and participants).

* :class:`StartEncoder` writes ``StartSaga`` messages by hand (single-object Avro header plus four
  fields), checked at construction against the project's codec byte for byte.
* :class:`LogPeek` reads only the fixed prefix of a ``SagaLogRecord`` (saga id, seq, epoch,
  timestamp, event branch) instead of decoding the whole snapshot; also checked against the codec.
* :class:`Template` turns one encoded record into many by swapping a fixed-length saga id.
* :func:`saga_history` builds the real records of a 3-step saga with ``manager.decide``, so the
  synthetic logs of the replay and query benchmarks are exactly what a manager would write; and
  :func:`definition_message` the definition record a manager writes on a partition before them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from manager import decide
from sagalog.codec import MAGIC, Codec, schema_fingerprint, schemas_dir
from sagalog.definition import SagaDefinition
from sagalog.fold import SagaState, definition_record
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


def encode_long(n: int) -> bytes:
    """Avro ``long``: zig-zag, then base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def encode_string(s: str) -> bytes:
    data = s.encode()
    return encode_long(len(data)) + data


def read_long(buf: bytes, pos: int) -> tuple[int, int]:
    shift = 0
    z = 0
    while True:
        b = buf[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    return (z >> 1) ^ -(z & 1), pos


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
        return b"".join((self._header, encode_string(saga_id), self._middle, encode_long(requested_ms)))


@dataclass(frozen=True, slots=True)
class Peeked:
    seq: int
    epoch: int
    timestamp_ms: int
    events: tuple[str, ...]  # short Avro names, oldest first: ("StepEnded", "StepBegun"), ...

    @property
    def event(self) -> str:
        """The record's last event."""
        return self.events[-1]


#: How to step over an event's fields: a number (int, long, enum), a string, an optional string.
NUMBER, STRING, OPTIONAL_STRING = 0, 1, 2


def _field_kind(avro_type: object) -> int:
    if avro_type in ("int", "long") or (isinstance(avro_type, dict) and avro_type.get("type") == "enum"):
        return NUMBER
    if avro_type == "string":
        return STRING
    if avro_type == ["null", "string"]:
        return OPTIONAL_STRING
    raise RuntimeError(f"an event field of type {avro_type!r}: update sagacli/bench/wire.py")


def _skip(data: bytes, pos: int, kinds: tuple[int, ...]) -> int:
    for kind in kinds:
        if kind == OPTIONAL_STRING:
            present, pos = read_long(data, pos)
            if not present:
                continue
        n, pos = read_long(data, pos)
        if kind != NUMBER:
            pos += n
    return pos


class LogPeek:
    """Reads seq, epoch, timestamp and the event types from the front of a log record, skipping
    the event fields and never touching the snapshot.

    Only records written with the current ``SagaLogRecord`` schema are peeked; anything else
    (older writer versions, claims, definition records, garbage) returns None: the caller skips
    it or decodes it fully.
    """

    def __init__(self, codec: Codec) -> None:
        raw = _schema_json(SAGA_LOG_RECORD)
        fields = raw["fields"]
        names = [f["name"] for f in fields[:6]]
        if names != ["saga_id", "seq", "epoch", "timestamp_ms", "event", "events_before"]:
            raise RuntimeError(f"SagaLogRecord field order changed ({names}): update sagacli/bench/wire.py")
        self.events = [t["name"] for t in fields[4]["type"]]
        self._skips = [tuple(_field_kind(f["type"]) for f in t["fields"]) for t in fields[4]["type"]]
        self._header = MAGIC + schema_fingerprint(raw)
        if self._header[2:] != codec.fingerprints[SAGA_LOG_RECORD]:
            raise RuntimeError("schemas/ changed under the codec: restart the bench")

    def peek(self, data: bytes) -> Peeked | None:
        if data[:10] != self._header:
            return None
        n, pos = read_long(data, 10)
        pos += n  # skip the saga id: the message key carries it
        seq, pos = read_long(data, pos)
        epoch, pos = read_long(data, pos)
        ts, pos = read_long(data, pos)
        last, pos = read_long(data, pos)
        pos = _skip(data, pos, self._skips[last])
        events = []
        while True:  # events_before: Avro array blocks, a zero count ends them
            count, pos = read_long(data, pos)
            if count == 0:
                break
            if count < 0:
                count = -count
                _, pos = read_long(data, pos)
            for _ in range(count):
                branch, pos = read_long(data, pos)
                pos = _skip(data, pos, self._skips[branch])
                events.append(self.events[branch])
        events.append(self.events[last])
        return Peeked(seq, epoch, ts, tuple(events))

    def check(self, codec: Codec, record: SagaLogRecord) -> None:
        """Raise if peeking an encoded ``record`` does not give back its fields."""
        got = self.peek(codec.encode(record))
        want = Peeked(record.seq, record.epoch, record.timestamp_ms, tuple(type(e).__name__ for e in record.events))
        if got != want:
            raise RuntimeError(f"LogPeek read {got}, the codec wrote {want}: update sagacli/bench/wire.py")


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
