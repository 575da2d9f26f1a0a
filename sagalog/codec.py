"""Avro single-object encoding of our records, with schema evolution.

Wire format (the Avro spec's single-object encoding, no registry needed)::

    0xC3 0x01 | 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema | Avro body

Every ``.avsc`` in ``schemas/`` is the current (reader) version of its record; older
versions live in ``schemas/history/``. A reader decodes bytes written with any version it
knows: the fingerprint picks the writer schema, Avro resolution maps it onto the current one
(new fields take their defaults). A fingerprint we do not know is :class:`UnknownSchema`;
bytes that do not decode are :class:`MalformedRecord`. Both are dead-letter material.
"""

from __future__ import annotations

import io
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from sagalog import hotcodec
from sagalog.errors import ConfigError, DecodeError, MalformedRecord, UnknownSchema
from sagalog.records import (
    AVRO_ENUMS,
    AVRO_MODELS,
    EVENT_TYPES,
    TOP_LEVEL,
    Frozen,
    SagaDefinitionRecord,
    SagaLogRecord,
)

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
#: Larger messages are refused both ways: Kafka's default max.message.bytes is about 1 MB.
DEFAULT_MAX_BYTES = 1_000_000
SCHEMAS_ENV = "SAGA_SCHEMAS_DIR"


def schemas_dir() -> Path:
    """The Avro schemas, shipped inside the package as ``sagalog/schemas`` (in a checkout, a link
    to the top-level ``schemas/``: the contract's one source of truth). ``$SAGA_SCHEMAS_DIR``
    points elsewhere, for example at a newer contract's schemas."""
    override = os.environ.get(SCHEMAS_ENV)
    return Path(override) if override else Path(__file__).resolve().parent / "schemas"


def schema_fingerprint(parsed: dict[str, Any]) -> bytes:
    """The 8 header bytes for a parsed schema: CRC-64-AVRO of its canonical form, little-endian."""
    # fastavro returns the fingerprint's bytes already in the spec's (little-endian) order.
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


class Codec:
    """Encodes our pydantic records to single-object Avro and back.

    Build one per process and share it: schemas are parsed once. The current version of each
    record is written and read by :mod:`sagalog.hotcodec` (generated for the schema on first
    use); older writer versions are read by fastavro, which resolves them onto the current one.
    """

    def __init__(self, directory: Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory or schemas_dir()
        self.max_bytes = max_bytes
        self._current: dict[str, tuple[bytes, Any]] = {}  # avro name -> (fingerprint, schema)
        self._writers: dict[bytes, tuple[str, Any]] = {}  # fingerprint -> (avro name, writer schema)
        if not self.directory.is_dir():
            raise ConfigError(
                f"schema directory {self.directory} not found: the installation is incomplete (reinstall "
                f"sagalog) or ${SCHEMAS_ENV} names a missing directory"
            )
        for path in sorted(self.directory.glob("*.avsc")):
            name, fp, parsed = self._load(path)
            self._current[name] = (fp, parsed)
            self._writers[fp] = (name, parsed)
        for path in sorted(self.directory.glob("history/*.avsc")):
            name, fp, parsed = self._load(path)
            self._writers.setdefault(fp, (name, parsed))
        missing = {cls.AVRO_NAME for cls in TOP_LEVEL} - set(self._current)
        if missing:
            raise ConfigError(f"schemas missing from {self.directory}: {sorted(missing)}")
        self._models = {cls.AVRO_NAME: cls for cls in TOP_LEVEL}
        self._hot_writers: dict[str, hotcodec.Writer] = {}
        self._hot_readers: dict[bytes, hotcodec.Reader] = {}  # by the current version's fingerprint

    @staticmethod
    def _load(path: Path) -> tuple[str, bytes, Any]:
        try:
            raw = json.loads(path.read_text())
            parsed = fastavro.parse_schema(raw, _force=True)
        except (ValueError, fastavro.schema.SchemaParseException) as err:
            raise ConfigError(f"{path}: not a valid Avro schema: {err}") from err
        assert isinstance(parsed, dict)  # a record schema, never a union or a primitive
        return parsed["name"], schema_fingerprint(raw), parsed

    @cached_property
    def fingerprints(self) -> dict[str, bytes]:
        """Current fingerprint of each record, by Avro name (for tests and other languages)."""
        return {name: fp for name, (fp, _) in self._current.items()}

    def current_schema(self, name: str) -> tuple[bytes, dict[str, Any]]:
        """The current version of a record's schema, parsed, with its fingerprint."""
        fp, schema = self._current[name]
        return fp, schema

    def known_writer_versions(self, name: str) -> int:
        return sum(1 for n, _ in self._writers.values() if n == name)

    # --- encode ---------------------------------------------------------------------------

    def encode(self, record: Frozen) -> bytes:
        name = record.AVRO_NAME
        writer = self._hot_writers.get(name) or self._hot_writer(name)
        try:
            data = writer(record)
        except (ValueError, OverflowError, TypeError, KeyError, AttributeError) as err:  # UnicodeEncodeError is a ValueError
            raise MalformedRecord(f"cannot encode {name}: {type(err).__name__}: {err}") from err
        return self._checked_size(name, data)

    def encode_with_fastavro(self, record: Frozen) -> bytes:
        """The reference encoding the hot codec is checked against (tests), by fastavro."""
        fp, schema = self._current[record.AVRO_NAME]
        out = io.BytesIO()
        out.write(MAGIC)
        out.write(fp)
        try:
            fastavro.schemaless_writer(out, schema, _to_avro(record))
        except (ValueError, OverflowError, TypeError) as err:  # UnicodeEncodeError is a ValueError
            raise MalformedRecord(f"cannot encode {record.AVRO_NAME}: {type(err).__name__}: {err}") from err
        return self._checked_size(record.AVRO_NAME, out.getvalue())

    def _checked_size(self, name: str, data: bytes) -> bytes:
        if len(data) > self.max_bytes:
            raise MalformedRecord(
                f"{name} of {len(data)} bytes exceeds the {self.max_bytes}-byte limit; "
                "keep saga payloads and step outputs small (store large data elsewhere, pass a reference)"
            )
        return data

    def _hot_writer(self, name: str) -> hotcodec.Writer:
        fp, schema = self._current[name]
        writer = self._hot_writers[name] = hotcodec.compile_writer(schema, MAGIC + fp, AVRO_MODELS, AVRO_ENUMS)
        return writer

    def _hot_reader(self, fp: bytes, name: str) -> hotcodec.Reader:
        reader = self._hot_readers[fp] = hotcodec.compile_reader(self._current[name][1], AVRO_MODELS, AVRO_ENUMS)
        return reader

    # --- decode ---------------------------------------------------------------------------

    def decode(self, data: bytes | None) -> Frozen:
        """Decode any of our records; raises :class:`DecodeError` subclasses, never anything else."""
        if data is None:
            raise MalformedRecord("empty message (tombstone) where a record was expected")
        if len(data) > self.max_bytes:
            raise MalformedRecord(f"message of {len(data)} bytes exceeds the {self.max_bytes}-byte limit")
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise MalformedRecord("not Avro single-object encoded (missing 0xC3 0x01 header)")
        fp = bytes(data[2:HEADER_LEN])
        known = self._writers.get(fp)
        if known is None:
            raise UnknownSchema(f"unknown schema fingerprint {fp.hex()} (written by a newer or foreign schema?)")
        name, writer = known
        try:
            if self._current[name][0] == fp:  # the current version: the hot codec
                hot = self._hot_readers.get(fp) or self._hot_reader(fp, name)
                record = hot(data, HEADER_LEN)
                if name == SagaLogRecord.AVRO_NAME:
                    _share_definition(record.snapshot.__dict__)  # type: ignore[attr-defined]
            else:
                record = self._decode_older(data, name, writer)
        except DecodeError:
            raise
        except Exception as err:  # truncated (IndexError), invalid UTF-8, a corrupt union branch, ...
            raise MalformedRecord(f"corrupt {name}: {type(err).__name__}: {err}") from err
        if name == SagaDefinitionRecord.AVRO_NAME:
            _pin_definition(record)  # type: ignore[arg-type]
        return record

    def decode_with_fastavro(self, data: bytes) -> Frozen:
        """The reference decoding the hot codec is checked against (tests), by fastavro."""
        known = self._writers[bytes(data[2:HEADER_LEN])]
        return self._decode_older(data, *known)

    def _decode_older(self, data: bytes, name: str, writer: Any) -> Frozen:
        """Bytes of an older version (or any, for the reference): fastavro resolves them onto the
        current schema, pydantic validates the result."""
        reader = self._current[name][1]
        body = io.BytesIO(data)
        body.seek(HEADER_LEN)
        datum = fastavro.schemaless_reader(body, writer, reader, return_record_name=True)
        if body.tell() != len(data):
            raise MalformedRecord(f"{len(data) - body.tell()} trailing bytes after a {name}")
        assert isinstance(datum, dict)  # every schema of ours is a record
        return _from_avro(self._models[name], datum)


def _to_avro(record: Frozen) -> dict[str, Any]:
    """The Avro datum of a record. Built from ``__dict__`` (not ``model_dump``): this runs for
    every message, and the fields already hold Avro-compatible values (StrEnum members are str)."""
    if isinstance(record, SagaLogRecord):
        snapshot = record.snapshot
        datum = dict(record.__dict__)
        # Unions of records are written as (name, datum) so fastavro need not guess the branch.
        datum["event"] = (record.event.AVRO_NAME, record.event.__dict__)
        datum["events_before"] = [(event.AVRO_NAME, event.__dict__) for event in record.events_before]
        datum["snapshot"] = {
            **snapshot.__dict__,
            "steps": [step.__dict__ for step in snapshot.steps],
            "incidents": [incident.__dict__ for incident in snapshot.incidents],
        }
        return datum
    return record.__dict__


#: Pinned definitions seen in snapshots, so that every live saga of a type shares one string
#: (a definition is ~1 KB of JSON; a manager holds one snapshot per live saga).
_DEFINITIONS: dict[str, str] = {}


def _share_definition(snapshot: dict[str, Any]) -> None:
    definition = snapshot["definition"]
    if not definition:  # pinned by reference (schema version 6 on): nothing to share
        return
    shared = _DEFINITIONS.get(definition)
    if shared is None and len(_DEFINITIONS) < 10_000:
        _DEFINITIONS[definition] = shared = definition
    snapshot["definition"] = shared or definition


def _pin_definition(record: SagaDefinitionRecord) -> None:
    """Every reader of the log learns a definition record's definition as it decodes it, so that
    the sagas pinning it resolve whichever way the log is read (folded, scanned, peeked). A record
    whose id is not its content's hash is refused: an id must only ever name one definition."""
    from sagalog.definition import pin  # only readers of the log get here (participants never)

    try:
        pin(record.definition, record.definition_id)
    except ValueError as err:
        raise MalformedRecord(f"corrupt {SagaDefinitionRecord.AVRO_NAME}: {err}") from err


def _from_avro(model: type[Frozen], datum: dict[str, Any]) -> Frozen:
    if model is SagaLogRecord:
        name, event = datum["event"]
        datum["event"] = EVENT_TYPES[name].model_validate(event)
        datum["events_before"] = tuple(EVENT_TYPES[n].model_validate(e) for n, e in datum.get("events_before", ()))
        _share_definition(datum["snapshot"])
    return model.model_validate(datum)
