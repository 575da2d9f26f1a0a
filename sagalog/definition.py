"""Saga definitions: the steps of a saga type, who does each, timeouts, retries, dependencies.

Definitions are loaded from YAML/JSON files (or built in Python) and validated by pydantic;
an error names the file, line and field. A saga is pinned to the definition it began with:
by its id (:func:`definition_id`, a hash of the canonical JSON) in every snapshot on the log, the
JSON itself once per log partition in a ``SagaDefinitionRecord`` (before schema version 6 the JSON
was in every snapshot). :func:`pin` and :func:`pinned_definition` are the process's registry of the
definitions read or begun so far, by id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sagalog.errors import ConfigError

NAME = r"^[A-Za-z0-9_.-]+$"

#: Compensation attempts before a compensation that keeps failing becomes an incident for an
#: operator, when ``compensation_retry`` does not say (a definition written before compensations
#: had a budget does not). Ten attempts with the default backoff (0.2 s doubling to 30 s) are
#: about 80 s of backoff plus each attempt's timeout: long enough to ride out a participant that
#: restarts or is redeployed, short enough that a compensation that cannot succeed reaches a human
#: within minutes instead of retrying unseen for ever. (A participant that says it cannot undo the
#: step, BUSINESS_FAILURE, opens the incident at once: no budget is spent on it.)
COMPENSATION_ATTEMPTS = 10


class RetryPolicy(BaseModel):
    """Exponential backoff with deterministic jitter (a pure function of saga, step and attempt)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    attempts: int = Field(
        default=3,
        ge=1,
        description="Tries in all. In compensation_retry: attempts before an incident (default 10), "
        "counted again from an operator's retry.",
    )
    backoff_initial_s: float = Field(default=0.1, ge=0)
    backoff_max_s: float = Field(default=5.0, ge=0)
    backoff_multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.2, ge=0, le=1, description="Up to this fraction of the delay is randomised.")

    def delay_ms(self, attempt: int, seed: str) -> int:
        """Delay before ``attempt`` (2, 3, ...). Deterministic so that decisions stay pure."""
        base = min(self.backoff_max_s, self.backoff_initial_s * self.backoff_multiplier ** max(0, attempt - 2))
        digest = hashlib.blake2b(f"{seed}/{attempt}".encode(), digest_size=8).digest()
        fraction = int.from_bytes(digest, "big") / 2**64
        return int(1000 * base * (1 - self.jitter * fraction))


class StepDefinition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=NAME)
    participant: str = Field(pattern=NAME, description="Commands go to <prefix>.commands.<participant>.")
    compensable: bool = True
    timeout_s: float = Field(default=5.0, gt=0, description="Per attempt, execute and compensate alike.")
    retry: RetryPolicy = RetryPolicy()
    depends_on: tuple[str, ...] | None = Field(
        default=None, description="Steps that must succeed first; omitted = the previous step (sequential)."
    )


class SagaDefinition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=NAME)
    version: int = Field(default=1, ge=1)
    steps: tuple[StepDefinition, ...] = Field(min_length=1)
    compensation_retry: RetryPolicy = RetryPolicy(
        attempts=COMPENSATION_ATTEMPTS, backoff_initial_s=0.2, backoff_max_s=30.0
    )
    payload_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema the saga's payload must satisfy (checked at start)."
    )

    @field_validator("compensation_retry", mode="before")
    @classmethod
    def _compensation_budget(cls, value: Any) -> Any:
        """A ``compensation_retry`` that leaves out ``attempts`` gets the compensation budget
        (:data:`COMPENSATION_ATTEMPTS`), not a step's 3 tries: a file's mapping or a policy built
        in Python alike. A pinned definition keeps what it pinned."""
        if isinstance(value, dict) and "attempts" not in value:
            return {**value, "attempts": COMPENSATION_ATTEMPTS}
        if isinstance(value, RetryPolicy) and "attempts" not in value.model_fields_set:
            return value.model_copy(update={"attempts": COMPENSATION_ATTEMPTS})
        return value

    @model_validator(mode="after")
    def _check_graph(self, info: ValidationInfo) -> SagaDefinition:
        names = [s.name for s in self.steps]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"step names must be unique, repeated: {sorted(dupes)}")
        for step in self.steps:
            for dep in step.depends_on or ():
                if dep not in names:
                    raise ValueError(f"step {step.name!r} depends on unknown step {dep!r}")
                if dep == step.name:
                    raise ValueError(f"step {step.name!r} depends on itself")
        self._topological_order()  # raises on a cycle
        # A pinned definition (read back from the log) was checked when its saga began; skipping
        # the check keeps jsonschema (0.25 s to import) out of every query.
        if self.payload_schema is not None and not (info.context or {}).get("pinned"):
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(self.payload_schema)
            except jsonschema.SchemaError as err:
                raise ValueError(f"payload_schema is not a valid JSON Schema: {err.message}") from err
        return self

    def validate_payload(self, payload: Any) -> None:
        """Raise :class:`ConfigError` naming the first problem if ``payload`` breaks ``payload_schema``."""
        if self.payload_schema is None:
            return
        import jsonschema

        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(self.payload_schema).iter_errors(payload))
        if error is not None:
            where = "/".join(map(str, error.absolute_path)) or "(payload)"
            raise ConfigError(f"payload for saga type {self.name!r} is invalid at {where}: {error.message}")

    def dependencies(self, step: str) -> tuple[str, ...]:
        return self._deps[step]

    @cached_property
    def _deps(self) -> dict[str, tuple[str, ...]]:
        deps: dict[str, tuple[str, ...]] = {}
        previous: str | None = None
        for step in self.steps:
            deps[step.name] = step.depends_on if step.depends_on is not None else ((previous,) if previous else ())
            previous = step.name
        return deps

    @cached_property
    def dependents(self) -> dict[str, tuple[str, ...]]:
        """step -> the steps that depend on it (compensation waits for those)."""
        out: dict[str, list[str]] = {s.name: [] for s in self.steps}
        for name, deps in self._deps.items():
            for dep in deps:
                out[dep].append(name)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def by_name(self) -> dict[str, StepDefinition]:
        return {s.name: s for s in self.steps}

    def _topological_order(self) -> list[str]:
        deps = {s.name: list(self._deps[s.name]) for s in self.steps}
        order: list[str] = []
        while deps:
            ready = [n for n, d in deps.items() if all(x in order for x in d)]
            if not ready:
                raise ValueError(f"steps form a cycle: {sorted(deps)}")
            order.extend(ready)
            for n in ready:
                del deps[n]
        return order

    @cached_property
    def canonical_json(self) -> str:
        """The pinned form written to the log: stable key order, no whitespace."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @cached_property
    def definition_id(self) -> str:
        """What sagas pin: the hash of :attr:`canonical_json` (:func:`definition_id`)."""
        return definition_id(self.canonical_json)


@lru_cache(maxsize=1024)
def definition_from_json(text: str) -> SagaDefinition:
    """Parse a pinned definition from a snapshot (cached: many sagas share one definition)."""
    return SagaDefinition.model_validate_json(text, context={"pinned": True})


def definition_id(canonical_json: str) -> str:
    """The id a definition is pinned by: a content hash of its canonical JSON (blake2b, 10 bytes,
    hex). Equal definitions get equal ids everywhere, so an id means the same on every partition
    and in every process, and a definition record can be checked against its own id."""
    return hashlib.blake2b(canonical_json.encode(), digest_size=10).hexdigest()


# --- the registry of pinned definitions, by id ------------------------------------------------
#
# Filled with every definition a saga begins with (sagalog.fold.begin) and every definition record
# read from the log (the codec and the fold); asked by whoever needs a saga's definition. Shared
# by every partition and thread of the process, which is safe because it is content-addressed: an
# id can only ever name one JSON (pin checks it), so nothing here is ever replaced or wrong. It
# holds what the process has read, a handful of definitions per saga type and version.

_PINNED: dict[str, str] = {}  # definition id -> canonical JSON
_MODELS: dict[str, SagaDefinition] = {}  # definition id -> parsed, on first use


def pin(canonical_json: str, expected_id: str | None = None) -> str:
    """Remember a definition by its id and return the id. ``expected_id`` (what a definition
    record claims) must be the JSON's hash, else ``ValueError`` (hashing ~1 KB costs about a
    microsecond, and definition records are rare: always checked)."""
    actual = definition_id(canonical_json)
    if expected_id is not None and actual != expected_id:
        raise ValueError(f"definition id {expected_id!r} is not the hash of its definition ({actual})")
    _PINNED.setdefault(actual, canonical_json)
    return actual


def pin_definition(definition: SagaDefinition) -> str:
    """Remember a definition a saga begins with (cheap: its id is computed once per model)."""
    key = definition.definition_id
    if key not in _PINNED:
        _PINNED[key] = definition.canonical_json
    return key


def pinned_json(definition_id: str) -> str | None:
    """The canonical JSON pinned by this id, or None if this process has not seen it."""
    return _PINNED.get(definition_id)


def pinned_definition(definition_id: str) -> SagaDefinition | None:
    """The definition pinned by this id, or None if this process has not seen it."""
    model = _MODELS.get(definition_id)
    if model is None:
        text = _PINNED.get(definition_id)
        if text is None:
            return None
        model = _MODELS[definition_id] = definition_from_json(text)
    return model


class DefinitionSet:
    """The saga types a manager can start, by name (the newest version of each)."""

    def __init__(self, definitions: Iterable[SagaDefinition] = ()) -> None:
        self._by_name: dict[str, SagaDefinition] = {}
        for d in definitions:
            self.add(d)

    def add(self, definition: SagaDefinition) -> None:
        current = self._by_name.get(definition.name)
        if current is not None and current.version == definition.version and current != definition:
            raise ConfigError(
                f"saga type {definition.name!r} version {definition.version} is defined twice, differently; "
                "bump 'version' when you change a definition"
            )
        if current is None or definition.version >= current.version:
            self._by_name[definition.name] = definition

    def get(self, name: str) -> SagaDefinition | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def participants(self) -> list[str]:
        return sorted({s.participant for d in self._by_name.values() for s in d.steps})

    def __len__(self) -> int:
        return len(self._by_name)

    @classmethod
    def load(cls, paths: Sequence[str | Path]) -> DefinitionSet:
        """Load every ``.yaml``/``.yml``/``.json`` file named, or found in named directories."""
        out = cls()
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files.extend(sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json")))
            elif p.is_file():
                files.append(p)
            else:
                raise ConfigError(f"definitions path {p} does not exist; pass a file or a directory")
        for f in files:
            for d in load_file(f):
                out.add(d)
        if not out:
            raise ConfigError(f"no saga definitions found in {', '.join(map(str, paths))}")
        return out


def load_file(path: Path) -> list[SagaDefinition]:
    """A file holds one definition, a list of them, or ``{sagas: [...]}``."""
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML/JSON: {err}") from err
    items, base = (data["sagas"], ("sagas",)) if isinstance(data, dict) and "sagas" in data else (data, ())
    if isinstance(items, dict):
        items, single = [items], True
    else:
        single = False
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a saga definition (a mapping) or a list of them")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(SagaDefinition.model_validate(item))
        except ValidationError as err:
            first = err.errors()[0]
            loc = base + (() if single else (i,)) + tuple(first["loc"])
            line = _line_of(node, loc)
            field = ".".join(map(str, first["loc"])) or "(definition)"
            where = f"{path}:{line}" if line else str(path)
            raise ConfigError(f"{where}: {field}: {first['msg']}") from err
    return out


def _line_of(node: Any, loc: tuple[Any, ...]) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a 1-based line number."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            match = node.value[part]
        else:
            match = None
        if match is None:
            break
        node, line = match, match.start_mark.line + 1
    return line
