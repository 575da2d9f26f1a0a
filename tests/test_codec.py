"""The codec: round trips, schema evolution, pinned fingerprints, and hostile input.

The one promise checked hardest: ``Codec.decode`` raises a :class:`DecodeError` subclass on
bad bytes, never anything else, because the manager dead-letters exactly those and would
crash on any other exception.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import fastavro
import pydantic
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import EVENTS, RECORDS, records, saga_histories

from sagalog.codec import HEADER_LEN, MAGIC, Codec, schema_fingerprint, schemas_dir
from sagalog.definition import SagaDefinition, StepDefinition, pinned_json
from sagalog.errors import ConfigError, DecodeError, MalformedRecord, UnknownSchema
from sagalog.fold import begin, replay
from sagalog.records import (
    EVENT_TYPES,
    TOP_LEVEL,
    CancelSaga,
    IncidentOpened,
    IncidentResolved,
    IncidentRetried,
    ParticipantCommand,
    SagaDefinitionRecord,
    SagaLogRecord,
    StartSaga,
)

SCHEMAS = schemas_dir()
V1_PATH = SCHEMAS / "history" / "saga_log_record.v1.avsc"
V2_PATH = SCHEMAS / "history" / "saga_log_record.v2.avsc"
V3_PATH = SCHEMAS / "history" / "saga_log_record.v3.avsc"
V4_PATH = SCHEMAS / "history" / "saga_log_record.v4.avsc"
V5_PATH = SCHEMAS / "history" / "saga_log_record.v5.avsc"

#: CRC-64-AVRO fingerprints (little-endian, as on the wire) of the current schemas. A change
#: here is a change of the wire contract: keep the old .avsc in schemas/history/, add its
#: fingerprint to PREVIOUS_FINGERPRINTS, and only then update this table.
CURRENT_FINGERPRINTS = {
    "sagalog.CancelSaga": "497478e474e8bb4e",
    "sagalog.DeadLetter": "4c3598c4e6c8ce73",
    "sagalog.OperatorAction": "24593b9779d5d4a4",
    "sagalog.ParticipantCommand": "da661df0938322d4",
    "sagalog.ParticipantReply": "047a0322f549234e",
    "sagalog.PartitionClaim": "08de3b78be047fe9",
    "sagalog.SagaDefinitionRecord": "b59fbb381bf201c6",
    "sagalog.SagaLogRecord": "98c7874693f636f8",
    "sagalog.StartSaga": "7b88424c4fbf8099",
}
#: Fingerprints of superseded versions: bytes written with them are on logs out there and
#: must keep decoding for ever.
PREVIOUS_FINGERPRINTS = {
    "sagalog.SagaLogRecord": [
        "cabbdbbc60c5b026",  # v1, before `writer`
        "62e5c87f8dfdb370",  # v2, before incidents (their events, `incidents`, `comp_budget_from`)
        "3fb3c3f121266f8c",  # v3, before the snapshot's `trace_parent`
        "b38785ccd7bdae59",  # v4, before `events_before` (one event per record)
        "bfb0c7b1aa30b2c1",  # v5, before the snapshot's `definition_id` (the definition inline)
    ],
}

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def _fingerprint_spec(canonical: str) -> bytes:
    """CRC-64-AVRO as the Avro specification writes it out (independent of fastavro)."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in canonical.encode():
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def test_fingerprint_oracle_matches_the_published_vectors() -> None:
    """Vectors from apache/avro share/test/data/schema-tests.txt (signed 64-bit in the file)."""
    vectors = {'"null"': 7195948357588979594, '"int"': 8247732601305521295, '"string"': -8142146995180207161}
    for canonical, value in vectors.items():
        assert _fingerprint_spec(canonical) == value.to_bytes(8, "little", signed=True)


#: Events a version-2 (and version-1) writer could not write: they came with version 3.
INCIDENT_EVENTS = (IncidentOpened, IncidentRetried, IncidentResolved)


def _old_bytes(record: SagaLogRecord, path: Path) -> bytes:
    """What a manager on an older schema wrote: its fingerprint and a body without what that
    version did not have (v1: `writer`; v1 and v2: incidents, `comp_budget_from`; v1 to v3:
    the snapshot's `trace_parent`; v1 to v4: `events_before`; v1 to v5: the snapshot's
    `definition_id`, so ``record`` must pin its definition inline: :func:`_inline`)."""
    raw = json.loads(path.read_text())
    schema = fastavro.parse_schema(raw, _force=True)
    datum = record.model_dump()
    assert datum["snapshot"].pop("definition_id") == "", "before version 6 a definition is inline"
    if path != V5_PATH:
        del datum["events_before"]
    else:
        datum["events_before"] = [(e.AVRO_NAME, d) for e, d in zip(record.events_before, datum["events_before"], strict=True)]
    if path == V1_PATH:
        del datum["writer"]
    if path not in (V4_PATH, V5_PATH):
        del datum["snapshot"]["trace_parent"]
    if path not in (V3_PATH, V4_PATH, V5_PATH):
        del datum["snapshot"]["incidents"]
        for step in datum["snapshot"]["steps"]:
            del step["comp_budget_from"]
    datum["event"] = (record.event.AVRO_NAME, datum["event"])
    out = io.BytesIO()
    out.write(MAGIC + schema_fingerprint(raw))
    fastavro.schemaless_writer(out, schema, datum)
    return out.getvalue()


def _inline(record: SagaLogRecord) -> SagaLogRecord:
    """The record as a writer before version 6 wrote it: the definition's JSON in the snapshot."""
    snapshot = record.snapshot
    text = snapshot.definition or pinned_json(snapshot.definition_id) or ""
    return record.model_copy(update={"snapshot": snapshot.model_copy(update={"definition": text, "definition_id": ""})})


def _v1_bytes(record: SagaLogRecord) -> bytes:
    return _old_bytes(record, V1_PATH)


def _before_incidents(record: SagaLogRecord) -> SagaLogRecord:
    """The record as a writer before version 3 could have written it (new fields at their defaults)."""
    snapshot = record.snapshot.model_copy(
        update={
            "incidents": (),
            "steps": tuple(s.model_copy(update={"comp_budget_from": 0}) for s in record.snapshot.steps),
        }
    )
    return record.model_copy(update={"snapshot": snapshot})


# --- fingerprints -----------------------------------------------------------------------------


def test_current_fingerprints_are_pinned(codec: Codec) -> None:
    assert {name: fp.hex() for name, fp in codec.fingerprints.items()} == CURRENT_FINGERPRINTS


def test_every_schema_file_is_pinned_and_every_pinned_version_is_on_disk() -> None:
    on_disk = {
        schema_fingerprint(json.loads(p.read_text())).hex()
        for p in [*SCHEMAS.glob("*.avsc"), *SCHEMAS.glob("history/*.avsc")]
    }
    pinned = set(CURRENT_FINGERPRINTS.values()) | {fp for fps in PREVIOUS_FINGERPRINTS.values() for fp in fps}
    assert on_disk == pinned


def test_fingerprints_follow_the_avro_specification() -> None:
    """Other languages compute the header from the spec: ours must be the same bytes.

    The spec's header is the CRC-64-AVRO value little-endian (Java: BinaryMessageEncoder). The
    oracle is checked against the spec's published test vectors below. Fixing the bug changes
    every fingerprint: update the pins above and regenerate tests/golden/ (make_golden.py).
    """
    for path in [*SCHEMAS.glob("*.avsc"), *SCHEMAS.glob("history/*.avsc")]:
        raw = json.loads(path.read_text())
        canonical = fastavro.schema.to_parsing_canonical_form(raw)
        assert schema_fingerprint(raw) == _fingerprint_spec(canonical), path.name


@pytest.mark.parametrize(
    "name,fp",
    [(n, fp) for n, fp in CURRENT_FINGERPRINTS.items()]
    + [(n, fp) for n, fps in PREVIOUS_FINGERPRINTS.items() for fp in fps],
)
def test_every_pinned_fingerprint_is_readable(codec: Codec, name: str, fp: str) -> None:
    # The header is accepted (the body is empty, so the body is what fails).
    with pytest.raises(MalformedRecord, match=name):
        codec.decode(MAGIC + bytes.fromhex(fp))


def test_encoding_starts_with_the_single_object_header(codec: Codec) -> None:
    data = codec.encode(CancelSaga(saga_id="s", reason="r", requested_ms=1))
    assert data[:2] == b"\xc3\x01"
    assert data[2:HEADER_LEN].hex() == CURRENT_FINGERPRINTS["sagalog.CancelSaga"]
    # The body is plain Avro binary: string "s", string "r", long 1 (zigzag 2).
    assert data[HEADER_LEN:] == b"\x02s\x02r\x02"


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", TOP_LEVEL, ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_round_trip_every_record_type(codec: Codec, cls: type, data: st.DataObject) -> None:
    record = data.draw(RECORDS[cls])
    decoded = codec.decode(codec.encode(record))
    assert type(decoded) is cls
    assert decoded == record


@pytest.mark.parametrize("event_type", list(EVENT_TYPES.values()), ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_round_trip_every_event_type(codec: Codec, event_type: type, data: st.DataObject) -> None:
    record = data.draw(RECORDS[SagaLogRecord]).model_copy(update={"event": data.draw(EVENTS[event_type])})
    decoded = codec.decode(codec.encode(record))
    assert type(decoded.event) is event_type  # StepBegun and CompensationBegun have the same fields
    assert decoded == record


@settings(max_examples=40, deadline=None)
@given(saga_histories())
def test_round_trip_legal_histories(codec: Codec, history: list[SagaLogRecord]) -> None:
    assert [codec.decode(codec.encode(r)) for r in history] == history


# --- evolution --------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.one_of(RECORDS[SagaLogRecord], saga_histories().flatmap(st.sampled_from)))
def test_v2_bytes_decode_with_the_current_reader(codec: Codec, record: SagaLogRecord) -> None:
    assume(not isinstance(record.event, INCIDENT_EVENTS))
    old = _single(_before_incidents(_inline(record)))
    data = _old_bytes(old, V2_PATH)
    assert data[2:HEADER_LEN].hex() == PREVIOUS_FINGERPRINTS["sagalog.SagaLogRecord"][1]
    decoded = codec.decode(data)
    assert decoded.snapshot.incidents == () and {s.comp_budget_from for s in decoded.snapshot.steps} <= {0}
    assert decoded == old


@settings(max_examples=80, deadline=None)
@given(st.one_of(RECORDS[SagaLogRecord], saga_histories().flatmap(st.sampled_from)))
def test_v1_bytes_decode_with_the_current_reader(codec: Codec, record: SagaLogRecord) -> None:
    assume(not isinstance(record.event, INCIDENT_EVENTS))
    old = _single(_before_incidents(_inline(record))).model_copy(update={"writer": None})
    data = _v1_bytes(old)
    assert data[2:HEADER_LEN].hex() == PREVIOUS_FINGERPRINTS["sagalog.SagaLogRecord"][0]
    decoded = codec.decode(data)
    assert decoded.writer is None
    assert decoded == old


@settings(max_examples=80, deadline=None)
@given(st.one_of(RECORDS[SagaLogRecord], saga_histories().flatmap(st.sampled_from)))
def test_v3_bytes_decode_with_the_current_reader(codec: Codec, record: SagaLogRecord) -> None:
    record = _inline(record)
    old = _single(record).model_copy(update={"snapshot": record.snapshot.model_copy(update={"trace_parent": None})})
    data = _old_bytes(old, V3_PATH)
    assert data[2:HEADER_LEN].hex() == PREVIOUS_FINGERPRINTS["sagalog.SagaLogRecord"][2]
    decoded = codec.decode(data)
    assert decoded.snapshot.trace_parent is None
    assert decoded == old


@settings(max_examples=80, deadline=None)
@given(st.one_of(RECORDS[SagaLogRecord], saga_histories().flatmap(st.sampled_from)))
def test_v4_bytes_decode_with_the_current_reader(codec: Codec, record: SagaLogRecord) -> None:
    """Before version 5 a record held one event: it reads as a record of that one event."""
    old = _single(_inline(record))
    data = _old_bytes(old, V4_PATH)
    assert data[2:HEADER_LEN].hex() == PREVIOUS_FINGERPRINTS["sagalog.SagaLogRecord"][3]
    decoded = codec.decode(data)
    assert decoded.events_before == () and decoded.events == (record.event,) and decoded.first_seq == decoded.seq
    assert decoded == old


@settings(max_examples=80, deadline=None)
@given(st.one_of(RECORDS[SagaLogRecord], saga_histories().flatmap(st.sampled_from)))
def test_v5_bytes_decode_with_the_current_reader(codec: Codec, record: SagaLogRecord) -> None:
    """Before version 6 the snapshot held the definition's JSON: it reads as an inline definition."""
    old = _inline(record)
    data = _old_bytes(old, V5_PATH)
    assert data[2:HEADER_LEN].hex() == PREVIOUS_FINGERPRINTS["sagalog.SagaLogRecord"][4]
    decoded = codec.decode(data)
    assert decoded.snapshot.definition_id == "" and decoded.snapshot.definition == old.snapshot.definition
    assert decoded == old


@settings(max_examples=40, deadline=None)
@given(saga_histories())
def test_a_v5_history_folds_to_the_state_of_the_same_history_by_reference(codec: Codec, history: list[SagaLogRecord]) -> None:
    """A saga written before version 6 (inline) and the same saga written now (by reference) fold
    to the same state but for how it pins its definition, and both resolve the same definition."""
    by_reference = replay(history)
    inline = replay([codec.decode(_old_bytes(_inline(r), V5_PATH)) for r in history])
    assert by_reference is not None and inline is not None
    assert by_reference.definition == "" and by_reference.definition_id
    assert inline.definition == by_reference.definition_json and inline.definition_id == ""
    assert inline.definition_model == by_reference.definition_model
    assert inline.model_copy(update={"definition": "", "definition_id": by_reference.definition_id}) == by_reference


def test_a_definition_record_whose_id_is_not_its_hash_is_malformed(codec: Codec) -> None:
    definition = SagaDefinition(name="order", steps=(StepDefinition(name="pay", participant="payments"),))
    good = SagaDefinitionRecord(
        definition_id=definition.definition_id, saga_type="order", version=1, definition=definition.canonical_json, timestamp_ms=1
    )
    assert codec.decode(codec.encode(good)) == good
    forged = good.model_copy(update={"definition": definition.canonical_json.replace("payments", "thieves")})
    with pytest.raises(MalformedRecord, match="not the hash of its definition"):
        codec.decode(codec.encode(forged))
    assert pinned_json(definition.definition_id) == definition.canonical_json  # the forgery changed nothing


def _single(record: SagaLogRecord) -> SagaLogRecord:
    """The record with its last event only: what a version before 5 could hold."""
    return record.model_copy(update={"events_before": ()})


def test_a_trace_parent_round_trips(codec: Codec) -> None:
    record = _sample_log_record()
    traced = record.model_copy(update={"snapshot": record.snapshot.model_copy(
        update={"trace_parent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})})
    assert codec.decode(codec.encode(traced)) == traced


def test_old_versions_need_the_history_directory(tmp_path: Path) -> None:
    """Decoding old bytes works because of schemas/history/, not by accident."""
    for p in SCHEMAS.glob("*.avsc"):
        shutil.copy(p, tmp_path / p.name)
    record = _inline(_sample_log_record())
    for path in (V1_PATH, V2_PATH, V3_PATH, V4_PATH, V5_PATH):
        data = _old_bytes(record, path)
        with pytest.raises(UnknownSchema):
            Codec(tmp_path).decode(data)
        assert Codec().decode(data) == record


def _sample_log_record() -> SagaLogRecord:
    definition = SagaDefinition(name="order", steps=(StepDefinition(name="pay", participant="payments"),))
    event, state = begin("saga-1", definition, "{}", 1_700_000_000_000, 1)
    return SagaLogRecord(
        saga_id="saga-1",
        seq=1,
        epoch=1,
        timestamp_ms=1_700_000_000_000,
        event=event,
        snapshot=state.snapshot(),
    )


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        Codec(tmp_path / "nope")
    shutil.copy(SCHEMAS / "cancel_saga.avsc", tmp_path / "cancel_saga.avsc")
    with pytest.raises(ConfigError, match="missing"):
        Codec(tmp_path)
    (tmp_path / "broken.avsc").write_text('{"type": "record"')
    with pytest.raises(ConfigError, match="broken.avsc"):
        Codec(tmp_path)


# --- hostile input: only DecodeError subclasses come out --------------------------------------


#: Every fingerprint the codec must accept -> the record it names.
KNOWN = {bytes.fromhex(fp): name for name, fp in CURRENT_FINGERPRINTS.items()} | {
    bytes.fromhex(fp): name for name, fps in PREVIOUS_FINGERPRINTS.items() for fp in fps
}


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(codec: Codec, data: bytes) -> None:
    assume(data[2:HEADER_LEN] not in KNOWN)
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    expected = UnknownSchema if len(data) >= HEADER_LEN and data[:2] == MAGIC else MalformedRecord
    assert type(info.value) is expected


@settings(max_examples=500, deadline=None)
@given(st.data(), st.binary(max_size=300))
def test_random_body_after_a_known_header(codec: Codec, data: st.DataObject, body: bytes) -> None:
    fp = data.draw(st.sampled_from(sorted(KNOWN)))
    try:
        decoded = codec.decode(MAGIC + fp + body)
    except DecodeError as err:
        assert isinstance(err, MalformedRecord)
    else:  # a few bodies are valid Avro by chance: then it must be the record the header names
        assert KNOWN[fp] == decoded.AVRO_NAME


@FAST
@given(records())
def test_every_truncation_is_malformed(codec: Codec, record: object) -> None:
    data = codec.encode(record)
    for cut in range(len(data)):
        with pytest.raises(MalformedRecord):
            codec.decode(data[:cut])


@FAST
@given(records(), st.integers(2, HEADER_LEN - 1), st.integers(1, 255))
def test_flipped_fingerprint_is_unknown_schema(codec: Codec, record: object, index: int, mask: int) -> None:
    data = bytearray(codec.encode(record))
    data[index] ^= mask
    assume(bytes(data[2:HEADER_LEN]) not in KNOWN)
    with pytest.raises(UnknownSchema):
        codec.decode(bytes(data))


@FAST
@given(records(), st.integers(0, 1), st.integers(1, 255))
def test_flipped_magic_is_malformed(codec: Codec, record: object, index: int, mask: int) -> None:
    data = bytearray(codec.encode(record))
    data[index] ^= mask
    with pytest.raises(MalformedRecord, match="header"):
        codec.decode(bytes(data))


@FAST
@given(records(), st.binary(min_size=1, max_size=50))
def test_trailing_garbage_is_malformed(codec: Codec, record: object, garbage: bytes) -> None:
    with pytest.raises(MalformedRecord, match="trailing"):
        codec.decode(codec.encode(record) + garbage)


@FAST
@given(records(), st.data())
def test_corrupted_body_decodes_or_is_malformed(codec: Codec, record: object, data: st.DataObject) -> None:
    encoded = bytearray(codec.encode(record))
    assume(len(encoded) > HEADER_LEN)
    index = data.draw(st.integers(HEADER_LEN, len(encoded) - 1))
    encoded[index] ^= data.draw(st.integers(1, 255))
    try:
        decoded = codec.decode(bytes(encoded))
    except DecodeError as err:
        assert isinstance(err, MalformedRecord)
    else:
        assert type(decoded) is type(record)


def test_none_is_malformed(codec: Codec) -> None:
    with pytest.raises(MalformedRecord, match="tombstone"):
        codec.decode(None)


def test_error_position_keeps_the_type(codec: Codec) -> None:
    try:
        codec.decode(MAGIC + b"\x00" * 8)
    except DecodeError as err:
        placed = err.at("log", 3, 42)
    assert type(placed) is UnknownSchema
    assert (placed.topic, placed.partition, placed.offset) == ("log", 3, 42)
    assert "log[3]@42" in str(placed)


# --- oversized payloads -----------------------------------------------------------------------


@FAST
@given(records())
def test_size_limit_is_inclusive_both_ways(record: object) -> None:
    size = len(Codec().encode(record))
    exact = Codec(max_bytes=size)
    assert exact.decode(exact.encode(record)) == record
    small = Codec(max_bytes=size - 1)
    with pytest.raises(MalformedRecord, match="exceeds"):
        small.encode(record)
    with pytest.raises(MalformedRecord, match="exceeds"):
        small.decode(exact.encode(record))


def test_default_limit_refuses_a_megabyte_payload(codec: Codec) -> None:
    big = StartSaga(saga_id="s", saga_type="t", payload="x" * 1_000_000, requested_ms=0)
    with pytest.raises(MalformedRecord, match="exceeds"):
        codec.encode(big)
    encoded = Codec(max_bytes=2_000_000).encode(big)
    with pytest.raises(MalformedRecord, match="exceeds"):
        codec.decode(encoded)
    # Checked before the header: oversized garbage is refused for its size alone.
    with pytest.raises(MalformedRecord, match="exceeds"):
        codec.decode(b"\x00" * 1_000_001)


# --- found by review (fixed, except where marked) ---


_unencodable = [
    # model_construct: pydantic now refuses it at construction; the codec must still be safe.
    ("long above 2**63", StartSaga.model_construct(saga_id="s", saga_type="t", payload="{}", requested_ms=2**63)),
    ("lone surrogate", CancelSaga(saga_id="s", reason="bad argv \udcff", requested_ms=0)),
]


@pytest.mark.parametrize("record", [r for _, r in _unencodable], ids=[n for n, _ in _unencodable])
def test_unencodable_values_raise_a_typed_error(codec: Codec, record: object) -> None:
    with pytest.raises((MalformedRecord, pydantic.ValidationError)):
        codec.encode(record)


@given(st.integers(2**31, 2**62) | st.integers(-(2**62), -(2**31) - 1))
@settings(max_examples=20, deadline=None)
def test_int_fields_are_32_bit(codec: Codec, attempt: int) -> None:
    """Another language's reader refuses an `int` wider than 32 bits: we must not write one."""
    with pytest.raises((MalformedRecord, pydantic.ValidationError)):
        codec.encode(
            ParticipantCommand(
                command_id="c",
                saga_id="s",
                saga_type="t",
                step="a",
                action="EXECUTE",
                attempt=attempt,
                epoch=1,
                payload="{}",
                outputs="{}",
                reply_topic="r",
                reply_partition=0,
                deadline_ms=0,
                issued_ms=0,
            )
        )


_bad_varints = {
    # CancelSaga("", "", requested_ms=<13-byte varint>): an Avro long has at most 10 bytes.
    "overlong long": ("sagalog.CancelSaga", b"\x00\x00" + b"\x80" * 12 + b"\x01"),
    # PartitionClaim(partition=2**40, ...): an Avro int is 32-bit.
    "int above 32 bits": ("sagalog.PartitionClaim", b"\x80\x80\x80\x80\x80\x40" + b"\x00\x00\x00"),
}


@pytest.mark.parametrize("name,body", list(_bad_varints.values()), ids=list(_bad_varints))
def test_out_of_range_varints_are_malformed(codec: Codec, name: str, body: bytes) -> None:
    """The current schemas are read by the hot codec, which refuses both (fastavro, still used for
    older writer versions, decodes an overlong varint by wrapping it)."""
    with pytest.raises(MalformedRecord):
        codec.decode(MAGIC + bytes.fromhex(CURRENT_FINGERPRINTS[name]) + body)
