"""The hot codec: Avro encoders and decoders generated from our schemas, for the current version.

Every message a manager or participant handles goes through the codec, and fastavro's generic
writer walks the schema for each of them: 58 µs to encode one saga log record, 88 µs to decode
it, most of a manager's CPU per saga (docs/BENCHMARKS.md). This module compiles each current
schema once into a Python function specialised to it (field order, union branches and enum
symbols resolved at compile time) that reads the model's attributes straight into a bytearray,
and a decoder that builds the model without validating it again: the Avro types already are the
model's types, and the only check they leave to pydantic (an ``int`` within 32 bits) is made here.

Scope: exactly the Avro the ``schemas/`` use (record, string, bytes, int, long, null, enum, array,
and unions of null and one type or of records). fastavro stays the reference and the path for
older writer versions (schema resolution); ``tests/test_hot_codec.py`` checks, with hypothesis,
that both write the same bytes and read the same models for every record of the contract.

The generated source of a schema can be read with :func:`writer_source` / :func:`reader_source`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sagalog.errors import MalformedRecord
from sagalog.records import Frozen, trusted

Writer = Callable[[Frozen], bytes]
Reader = Callable[[bytes, int], Frozen]

INT32 = (-(2**31), 2**31 - 1)


# --- the primitives the generated code calls ---------------------------------------------------


#: Recent large numbers and their varints. A saga's snapshot repeats the same few timestamps
#: (start, each step's dispatch time and deadline) in every record: a lookup instead of a loop.
_VARINTS: dict[int, bytes] = {}
_VARINTS_MAX = 1 << 16


def write_long(out: bytearray, n: int) -> None:
    """Avro ``long``: zig-zag, then base-128 varint, least significant group first."""
    encoded = _VARINTS.get(n)
    if encoded is None:
        encoded = varint(n)
        if len(_VARINTS) >= _VARINTS_MAX:
            _VARINTS.clear()
        _VARINTS[n] = encoded
    out += encoded


def varint(n: int) -> bytes:
    if not -0x8000_0000_0000_0000 <= n <= 0x7FFF_FFFF_FFFF_FFFF:  # models check it; unvalidated ones too
        raise OverflowError(f"{n} does not fit an Avro long (64 bits)")
    z = (n << 1) ^ (n >> 63)
    encoded = bytearray()
    while z > 0x7F:
        encoded.append((z & 0x7F) | 0x80)
        z >>= 7
    encoded.append(z)
    return bytes(encoded)


def write_int(out: bytearray, n: int) -> None:
    """Avro ``int``: a ``long`` that readers in other languages refuse beyond 32 bits."""
    if not INT32[0] <= n <= INT32[1]:
        raise OverflowError(f"{n} does not fit an Avro int (32 bits)")
    write_long(out, n)


def write_string(out: bytearray, s: str) -> None:
    data = s.encode()  # strict UTF-8: a lone surrogate raises UnicodeEncodeError, as fastavro does
    write_long(out, len(data))
    out += data


def write_bytes(out: bytearray, data: bytes) -> None:
    write_long(out, len(data))
    out += data


def read_long(buf: bytes, pos: int) -> tuple[int, int]:
    b = buf[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    n = b & 0x7F
    shift = 7
    while True:
        pos += 1
        b = buf[pos]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:  # more than 10 bytes: not a 64-bit varint
            raise MalformedRecord("varint longer than 10 bytes")
    if n >> 64:
        raise MalformedRecord("varint above 64 bits")
    return (n >> 1) ^ -(n & 1), pos + 1


def read_int(buf: bytes, pos: int) -> tuple[int, int]:
    n, pos = read_long(buf, pos)
    if not INT32[0] <= n <= INT32[1]:
        raise MalformedRecord(f"Avro int {n} outside 32 bits")
    return n, pos


def read_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = read_long(buf, pos)
    end = pos + n
    if n < 0 or end > len(buf):
        raise MalformedRecord(f"length {n} runs past the end of the message")
    return buf[pos:end], end


def read_string(buf: bytes, pos: int) -> tuple[str, int]:
    n, pos = read_long(buf, pos)
    end = pos + n
    if n < 0 or end > len(buf):
        raise MalformedRecord(f"length {n} runs past the end of the message")
    return buf[pos:end].decode(), end  # invalid UTF-8 raises UnicodeDecodeError: the caller's MalformedRecord


def read_branch(buf: bytes, pos: int, branches: int) -> tuple[int, int]:
    """The index of a union branch or an enum symbol: one of ``branches``."""
    index, pos = read_long(buf, pos)
    if not 0 <= index < branches:
        raise MalformedRecord(f"union branch or enum symbol {index} of {branches}")
    return index, pos


# --- compiling ---------------------------------------------------------------------------------


class _Compiler:
    """Turns a parsed schema (fastavro's ``parse_schema`` output) into the source of one writer
    and one reader function per named record, plus the constants they use."""

    def __init__(self, models: Mapping[str, type[Frozen]], enums: Mapping[str, type]) -> None:
        self.models = models  # full Avro record name -> pydantic model class
        self.enums = enums  # full Avro enum name -> StrEnum class
        self.constants: dict[str, Any] = {}
        self.records: dict[str, dict[str, Any]] = {}  # full name -> record schema, in definition order
        self.union_tables: list[str] = []  # constants naming a union of records' branches
        self._temp = 0

    def temp(self, prefix: str) -> str:
        self._temp += 1
        return f"{prefix}{self._temp}"

    def constant(self, prefix: str, value: Any) -> str:
        name = self.temp(prefix)
        self.constants[name] = value
        return name

    def collect(self, schema: Any) -> None:
        """Find every named record (nested ones too), so that each gets its own functions."""
        if isinstance(schema, list):
            for branch in schema:
                self.collect(branch)
        elif isinstance(schema, dict):
            kind = schema["type"]
            if kind == "record":
                self.records.setdefault(schema["name"], schema)
                for f in schema["fields"]:
                    self.collect(f["type"])
            elif kind == "array":
                self.collect(schema["items"])
            elif isinstance(kind, dict | list):
                self.collect(kind)

    # -- writers: statements that append ``value`` (an expression) to ``out`` --

    def write(self, schema: Any, value: str, indent: str) -> list[str]:
        if isinstance(schema, str):
            # Inline the common case (a small number, a short string): a byte, no function call.
            if schema in ("long", "int"):
                n = self.temp("n")
                return [
                    f"{indent}{n} = {value}",
                    f"{indent}if 0 <= {n} < 64:",
                    f"{indent}    out.append({n} << 1)",
                    f"{indent}else:",
                    f"{indent}    write_{schema}(out, {n})",
                ]
            if schema == "string":
                data = self.temp("data")
                return [
                    f"{indent}{data} = {value}.encode()",
                    f"{indent}if len({data}) < 64:",
                    f"{indent}    out.append(len({data}) << 1)",
                    f"{indent}else:",
                    f"{indent}    write_long(out, len({data}))",
                    f"{indent}out += {data}",
                ]
            if schema == "bytes":
                return [f"{indent}write_bytes(out, {value})"]
            if schema == "null":
                return []
            if schema in self.records:
                return [f"{indent}w_{_ident(schema)}(out, {value})"]
            raise ValueError(f"the hot codec has no writer for Avro type {schema!r}")
        if isinstance(schema, list):
            return self.write_union(schema, value, indent)
        kind = schema["type"]
        if kind == "record":
            return [f"{indent}w_{_ident(schema['name'])}(out, {value})"]
        if kind == "enum":
            _one_byte(len(schema["symbols"]), f"enum {schema['name']}")
            table = self.constant("ENUM", {symbol: i << 1 for i, symbol in enumerate(schema["symbols"])})
            return [f"{indent}out.append({table}[{value}])"]
        if kind == "array":
            items, item = self.temp("items"), self.temp("item")
            return [
                f"{indent}{items} = {value}",
                f"{indent}if {items}:",
                f"{indent}    write_long(out, len({items}))",
                f"{indent}    for {item} in {items}:",
                *self.write(schema["items"], item, indent + "        "),
                f"{indent}out.append(0)",
            ]
        if isinstance(kind, str | list | dict):
            return self.write(kind, value, indent)
        raise ValueError(f"the hot codec has no writer for Avro type {kind!r}")

    def write_union(self, branches: list[Any], value: str, indent: str) -> list[str]:
        names = [b if isinstance(b, str) else b.get("name", b["type"]) for b in branches]
        if len(branches) == 2 and "null" in names:
            other = 1 - names.index("null")
            v = self.temp("v")
            return [
                f"{indent}{v} = {value}",
                f"{indent}if {v} is None:",
                f"{indent}    out.append({names.index('null') << 1})",
                f"{indent}else:",
                f"{indent}    out.append({other << 1})",
                *(self.write(branches[other], v, indent + "    ") or [f"{indent}    pass"]),
            ]
        if all(name in self.records for name in names):  # a union of records: by the model's Avro name
            _one_byte(len(names), f"union {names}")
            # Filled in with (branch byte, writer function) once the functions exist: compile_writer.
            table = self.constant("BRANCH", {name: i << 1 for i, name in enumerate(names)})
            self.union_tables.append(table)
            v, branch, fn = self.temp("v"), self.temp("branch"), self.temp("fn")
            return [
                f"{indent}{v} = {value}",
                f"{indent}{branch}, {fn} = {table}[{v}.AVRO_NAME]",
                f"{indent}out.append({branch})",
                f"{indent}{fn}(out, {v})",
            ]
        raise ValueError(f"the hot codec has no writer for the union {names}")

    def writer_module(self, top: str) -> str:
        lines = []
        for name, schema in self.records.items():
            lines.append(f"def w_{_ident(name)}(out, r):")
            body = []
            for f in schema["fields"]:
                body += self.write(f["type"], f"r.{f['name']}", "    ")
            lines += body or ["    pass"]
            lines.append("")
        lines += [
            "def encode(record):",
            "    out = bytearray(HEADER)",
            f"    w_{_ident(top)}(out, record)",
            "    return bytes(out)",
        ]
        return "\n".join(lines)

    # -- readers: statements that set ``target`` to the value read at ``pos`` --

    def read(self, schema: Any, target: str, indent: str) -> list[str]:
        if isinstance(schema, str):
            simple = {"long": "read_long", "int": "read_int", "string": "read_string", "bytes": "read_bytes"}
            if schema in simple:
                return [f"{indent}{target}, pos = {simple[schema]}(buf, pos)"]
            if schema == "null":
                return [f"{indent}{target} = None"]
            if schema in self.records:
                return [f"{indent}{target}, pos = r_{_ident(schema)}(buf, pos)"]
            raise ValueError(f"the hot codec has no reader for Avro type {schema!r}")
        if isinstance(schema, list):
            return self.read_union(schema, target, indent)
        kind = schema["type"]
        if kind == "record":
            return [f"{indent}{target}, pos = r_{_ident(schema['name'])}(buf, pos)"]
        if kind == "enum":
            enum = self.enums.get(schema["name"])
            members = tuple(enum(s) if enum is not None else s for s in schema["symbols"])
            table = self.constant("SYMBOLS", members)
            i = self.temp("i")
            return [
                f"{indent}{i}, pos = read_branch(buf, pos, {len(members)})",
                f"{indent}{target} = {table}[{i}]",
            ]
        if kind == "array":
            items, count, v = self.temp("items"), self.temp("count"), self.temp("v")
            return [
                f"{indent}{items} = []",
                f"{indent}while True:",
                f"{indent}    {count}, pos = read_long(buf, pos)",
                f"{indent}    if {count} == 0:",
                f"{indent}        break",
                f"{indent}    if {count} < 0:  # a block with its size in bytes",
                f"{indent}        {count} = -{count}",
                f"{indent}        _, pos = read_long(buf, pos)",
                f"{indent}    if {count} > len(buf) - pos:",
                f"{indent}        raise MalformedRecord(f'array of {{{count}}} items in {{len(buf) - pos}} bytes')",
                f"{indent}    for _ in range({count}):",
                *self.read(schema["items"], v, indent + "        "),
                f"{indent}        {items}.append({v})",
                f"{indent}{target} = tuple({items})",
            ]
        if isinstance(kind, str | list | dict):
            return self.read(kind, target, indent)
        raise ValueError(f"the hot codec has no reader for Avro type {kind!r}")

    def read_union(self, branches: list[Any], target: str, indent: str) -> list[str]:
        i = self.temp("i")
        lines = [f"{indent}{i}, pos = read_branch(buf, pos, {len(branches)})"]
        for n, branch in enumerate(branches):
            lines.append(f"{indent}{'if' if n == 0 else 'elif'} {i} == {n}:")
            lines += self.read(branch, target, indent + "    ")
        return lines

    def reader_module(self, top: str) -> str:
        lines = []
        for name, schema in self.records.items():
            model = self.models.get(name)
            lines.append(f"def r_{_ident(name)}(buf, pos):")
            fields = []
            for f in schema["fields"]:
                var = f"f_{f['name']}"
                lines += self.read(f["type"], var, "    ")
                fields.append(f"{f['name']!r}: {var}")
            if model is None:
                raise ValueError(f"no model for the Avro record {name}")
            cls = self.constant("MODEL", model)
            lines.append(f"    return trusted({cls}, {{{', '.join(fields)}}}), pos")
            lines.append("")
        lines += [
            "def decode(buf, pos):",
            f"    record, pos = r_{_ident(top)}(buf, pos)",
            "    if pos != len(buf):",
            f"        raise MalformedRecord(f'{{len(buf) - pos}} trailing bytes after a {top}')",
            "    return record",
        ]
        return "\n".join(lines)


def _one_byte(count: int, what: str) -> None:
    """Enum symbols and record-union branches are written as one byte (index << 1): below 64."""
    if count > 64:
        raise ValueError(f"the hot codec writes the index of {what} as one byte: at most 64, not {count}")


def _ident(avro_name: str) -> str:
    return avro_name.replace(".", "_")


def _namespace(compiler: _Compiler) -> dict[str, Any]:
    return {
        "write_long": write_long,
        "write_int": write_int,
        "write_string": write_string,
        "write_bytes": write_bytes,
        "read_long": read_long,
        "read_int": read_int,
        "read_string": read_string,
        "read_bytes": read_bytes,
        "read_branch": read_branch,
        "MalformedRecord": MalformedRecord,
        "trusted": trusted,
        **compiler.constants,
    }


def writer_source(schema: dict[str, Any], models: Mapping[str, type[Frozen]], enums: Mapping[str, type]) -> tuple[str, _Compiler]:
    compiler = _Compiler(models, enums)
    compiler.collect(schema)
    return compiler.writer_module(schema["name"]), compiler


def reader_source(schema: dict[str, Any], models: Mapping[str, type[Frozen]], enums: Mapping[str, type]) -> tuple[str, _Compiler]:
    compiler = _Compiler(models, enums)
    compiler.collect(schema)
    return compiler.reader_module(schema["name"]), compiler


def compile_writer(schema: dict[str, Any], header: bytes, models: Mapping[str, type[Frozen]], enums: Mapping[str, type]) -> Writer:
    """``encode(record) -> bytes``: the single-object ``header``, then the record's Avro body."""
    source, compiler = writer_source(schema, models, enums)
    namespace = _namespace(compiler)
    namespace["HEADER"] = header
    exec(compile(source, f"<hot writer {schema['name']}>", "exec"), namespace)  # noqa: S102 - our own schemas
    for table in compiler.union_tables:  # a union of records dispatches to the functions just defined
        namespace[table] = {name: (branch, namespace[f"w_{_ident(name)}"]) for name, branch in namespace[table].items()}
    return namespace["encode"]  # type: ignore[no-any-return,unused-ignore]


def compile_reader(schema: dict[str, Any], models: Mapping[str, type[Frozen]], enums: Mapping[str, type]) -> Reader:
    """``decode(buf, pos) -> model``: reads the Avro body at ``pos`` to the end of ``buf``."""
    source, compiler = reader_source(schema, models, enums)
    namespace = _namespace(compiler)
    exec(compile(source, f"<hot reader {schema['name']}>", "exec"), namespace)  # noqa: S102 - our own schemas
    return namespace["decode"]  # type: ignore[no-any-return,unused-ignore]
