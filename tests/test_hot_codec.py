"""The hot codec (:mod:`sagalog.hotcodec`) against fastavro, the reference: the same bytes for
every record of the contract, the same models back, and the same refusals of broken input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import RECORDS, records, saga_histories

from sagalog import hotcodec
from sagalog.codec import HEADER_LEN, Codec
from sagalog.errors import MalformedRecord
from sagalog.records import AVRO_ENUMS, AVRO_MODELS, TOP_LEVEL, SagaDefinitionRecord, SagaLogRecord

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def _same(a: Any, b: Any) -> bool:
    """Equal, field by field, and of the same types (a str where an enum member belongs, or a list
    where a tuple does, would compare equal and still break identity checks like ``is SUCCEEDED``)."""
    if type(a) is not type(b):
        return False
    if hasattr(a, "__pydantic_fields__"):
        return all(_same(getattr(a, f), getattr(b, f)) for f in type(a).model_fields)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@given(records())
@SETTINGS
def test_writes_the_bytes_fastavro_writes(codec: Codec, record: Any) -> None:
    assert codec.encode(record) == codec.encode_with_fastavro(record)


@given(records())
@SETTINGS
def test_reads_back_what_fastavro_reads(codec: Codec, record: Any) -> None:
    data = codec.encode_with_fastavro(record)
    hot = codec.decode(data)
    assert _same(hot, codec.decode_with_fastavro(data))
    assert _same(hot, record)


@given(records(), st.data())
@SETTINGS
def test_a_truncated_or_extended_message_is_malformed_never_another_error(codec: Codec, record: Any, data: st.DataObject) -> None:
    encoded = codec.encode(record)
    cut = data.draw(st.integers(HEADER_LEN, len(encoded) - 1), label="cut at")
    with pytest.raises(MalformedRecord):
        codec.decode(encoded[:cut])
    with pytest.raises(MalformedRecord, match="trailing bytes"):
        codec.decode(encoded + b"\x00")


@given(records(), st.data())
@SETTINGS
def test_a_flipped_byte_decodes_or_is_malformed(codec: Codec, record: Any, data: st.DataObject) -> None:
    """Garbage in the body never escapes as anything but MalformedRecord (or decodes to a record)."""
    encoded = bytearray(codec.encode(record))
    at = data.draw(st.integers(HEADER_LEN, len(encoded) - 1), label="at")
    encoded[at] ^= data.draw(st.integers(1, 255), label="xor")
    try:
        decoded = codec.decode(bytes(encoded))
    except MalformedRecord:
        return
    assert type(decoded) is type(record)


@given(RECORDS[SagaDefinitionRecord])
@SETTINGS
def test_a_definition_record_is_written_and_read_as_fastavro_does(codec: Codec, record: SagaDefinitionRecord) -> None:
    data = codec.encode(record)
    assert data == codec.encode_with_fastavro(record)
    assert _same(codec.decode(data), record) and _same(codec.decode_with_fastavro(data), record)


@given(saga_histories())
@SETTINGS
def test_a_snapshot_by_reference_is_written_as_fastavro_writes_it(codec: Codec, history: list[SagaLogRecord]) -> None:
    for record in history:
        assert record.snapshot.definition == "" and record.snapshot.definition_id
        assert codec.encode(record) == codec.encode_with_fastavro(record)
        assert _same(codec.decode(codec.encode(record)), record)


def test_every_top_level_record_and_nested_model_has_generated_functions() -> None:
    codec = Codec()
    for cls in TOP_LEVEL:
        _, schema = codec._current[cls.AVRO_NAME]
        writer, _ = hotcodec.writer_source(schema, AVRO_MODELS, AVRO_ENUMS)
        reader, _ = hotcodec.reader_source(schema, AVRO_MODELS, AVRO_ENUMS)
        assert f"def w_{cls.AVRO_NAME.replace('.', '_')}(" in writer
        assert f"def r_{cls.AVRO_NAME.replace('.', '_')}(" in reader
    _, log_schema = codec._current[SagaLogRecord.AVRO_NAME]
    writer, _ = hotcodec.writer_source(log_schema, AVRO_MODELS, AVRO_ENUMS)
    for nested in ("sagalog.SagaSnapshot", "sagalog.StepSnapshot", "sagalog.Incident", "sagalog.StepBegun"):
        assert f"def w_{nested.replace('.', '_')}(" in writer


@pytest.mark.parametrize(
    "schema,error",
    [
        ({"type": "record", "name": "x.M", "fields": [{"name": "f", "type": "double"}]}, "no writer for Avro type 'double'"),
        ({"type": "record", "name": "x.M", "fields": [{"name": "f", "type": ["string", "long"]}]}, "no writer for the union"),
    ],
)
def test_a_schema_beyond_what_it_supports_is_refused_at_compile_time(schema: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        hotcodec.writer_source(schema, {}, {})


@pytest.mark.parametrize(
    "n,encoded",
    [(0, b"\x00"), (-1, b"\x01"), (1, b"\x02"), (63, b"\x7e"), (-64, b"\x7f"), (64, b"\x80\x01"), (2**63 - 1, b"\xfe" + b"\xff" * 8 + b"\x01")],
)
def test_varints_as_the_avro_spec_gives_them(n: int, encoded: bytes) -> None:
    out = bytearray()
    hotcodec.write_long(out, n)
    assert bytes(out) == encoded
    assert hotcodec.read_long(encoded, 0) == (n, len(encoded))
