"""Reading the front of a saga log record without decoding it: seq, epoch, timestamp, events.

A takeover's replay needs the whole state only of the sagas still running; for the others (most
of a busy partition's sagas) the newest record's last event says that the saga ended, and its
timestamp when. Peeking reads the record's leading fields and steps over the event bodies; the
snapshot, the bulk of the record, is never touched. The benchmark's log tailer reads the same.

Only records of the current ``SagaLogRecord`` schema are peeked: anything else (older writer
versions, claims, bytes that do not parse) peeks as None, and the caller decodes it fully
(:meth:`sagalog.codec.Codec.decode`), which says what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sagalog.codec import HEADER_LEN, MAGIC, Codec
from sagalog.errors import MalformedRecord
from sagalog.hotcodec import read_long
from sagalog.records import SagaLogRecord

#: The leading fields a peek reads, in schema order; the schema must start with them.
PEEKED_FIELDS = ["saga_id", "seq", "epoch", "timestamp_ms", "event", "events_before"]
#: Events after which a saga is over (its status is terminal).
ENDING_EVENTS = frozenset({"SagaEnded", "SagaAborted"})


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

    @property
    def ends_saga(self) -> bool:
        return self.events[-1] in ENDING_EVENTS


#: How to step over an event's fields: a number (int, long, enum), a string, an optional string.
NUMBER, STRING, OPTIONAL_STRING = 0, 1, 2


def _field_kind(avro_type: Any, enums: set[str]) -> int:
    if avro_type in ("int", "long") or (isinstance(avro_type, str) and avro_type in enums) or (isinstance(avro_type, dict) and avro_type.get("type") == "enum"):
        return NUMBER
    if avro_type == "string":
        return STRING
    if avro_type == ["null", "string"]:
        return OPTIONAL_STRING
    raise ValueError(f"an event field of type {avro_type!r}: teach sagalog/peek.py to step over it")


def _enum_names(schema: Any) -> list[str]:
    if isinstance(schema, list):
        return [name for item in schema for name in _enum_names(item)]
    if not isinstance(schema, dict):
        return []
    if schema.get("type") == "enum":
        return [schema["name"]]
    return [name for f in schema.get("fields", ()) for name in _enum_names(f["type"])] + _enum_names(schema.get("items"))


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
    """Peeks records of the codec's current ``SagaLogRecord`` schema (see the module's doc)."""

    def __init__(self, codec: Codec) -> None:
        fingerprint, schema = codec.current_schema(SagaLogRecord.AVRO_NAME)
        fields = schema["fields"]
        names = [f["name"] for f in fields[: len(PEEKED_FIELDS)]]
        if names != PEEKED_FIELDS:
            raise ValueError(f"SagaLogRecord starts with {names}, not {PEEKED_FIELDS}: update sagalog/peek.py")
        branches = fields[4]["type"]
        self.events = [branch["name"].rpartition(".")[2] for branch in branches]
        enums = set(_enum_names(schema))  # an enum defined earlier is referred to by its name
        self._skips = [tuple(_field_kind(f["type"], enums) for f in branch["fields"]) for branch in branches]
        self._header = MAGIC + fingerprint

    def peek(self, data: bytes | None) -> Peeked | None:
        if data is None or data[:HEADER_LEN] != self._header:
            return None
        try:
            return self._peek(data)
        except (IndexError, MalformedRecord):  # truncated or corrupt: the full decode says why
            return None

    def _peek(self, data: bytes) -> Peeked | None:
        n, pos = read_long(data, HEADER_LEN)
        pos += n  # skip the saga id: the message key carries it
        seq, pos = read_long(data, pos)
        epoch, pos = read_long(data, pos)
        ts, pos = read_long(data, pos)
        last, pos = read_long(data, pos)
        if not 0 <= last < len(self.events):
            return None
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
                if not 0 <= branch < len(self.events):
                    return None
                pos = _skip(data, pos, self._skips[branch])
                events.append(self.events[branch])
        if pos > len(data):
            return None
        events.append(self.events[last])
        return Peeked(seq, epoch, ts, tuple(events))
