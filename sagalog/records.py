"""The records of the saga log and the messages around it, as frozen pydantic models.

One model per Avro record in ``schemas/``; :mod:`sagalog.codec` maps between the two. Events
are small immutable values; :class:`SagaLogRecord` is the stored envelope: the event plus the
saga snapshot after it (what compaction must leave to resume the saga), the per-saga sequence
number and the writer's epoch.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self, TypeGuard, TypeVar

from pydantic import BaseModel, ConfigDict, Field

#: Avro ``int`` and ``long``: readers in other languages refuse values outside these ranges.
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class Frozen(BaseModel):
    # defer_build: a model's validator is built on its first use, not at import (a fresh `saga
    # status` process uses a few of these models; building all of them cost ~0.1 s).
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    #: Full Avro name of the record this model maps to.
    AVRO_NAME: ClassVar[str] = ""

    def model_post_init(self, context: Any, /) -> None:
        # pydantic keeps a per-instance set of "explicitly set" field names (~700 bytes each); a
        # manager holds several models per live saga. Frozen models never add to it, so every
        # instance of a class shares one (we never use exclude_unset).
        object.__setattr__(self, "__pydantic_fields_set__", _field_names(type(self)))

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed, unvalidated (like ``model_copy(update=...)``) but
        sharing the field-name set instead of copying it: the fold calls this for every event."""
        new = object.__new__(type(self))
        object.__setattr__(new, "__dict__", {**self.__dict__, **changes})
        object.__setattr__(new, "__pydantic_fields_set__", self.__pydantic_fields_set__)
        object.__setattr__(new, "__pydantic_extra__", None)
        object.__setattr__(new, "__pydantic_private__", None)
        return new


_FIELD_NAMES: dict[type, set[str]] = {}

M = TypeVar("M", bound=BaseModel)


def trusted(cls: type[M], fields: dict[str, Any]) -> M:
    """A model from values already of the model's types, without validating them again: for the
    hot codec's decoder (the Avro types are the model's types) and for records built from models
    that were validated. ``fields`` must name every field (no defaults are filled in)."""
    new = object.__new__(cls)
    object.__setattr__(new, "__dict__", fields)
    object.__setattr__(new, "__pydantic_fields_set__", _field_names(cls))
    object.__setattr__(new, "__pydantic_extra__", None)
    object.__setattr__(new, "__pydantic_private__", None)
    return new


def _field_names(cls: type[BaseModel]) -> set[str]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = set(cls.model_fields)
    return names


class SagaStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"

    @property
    def terminal(self) -> bool:
        return self in (SagaStatus.COMPLETED, SagaStatus.ABORTED)


class StepStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"


class StepOutcome(StrEnum):
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"


class Action(StrEnum):
    EXECUTE = "EXECUTE"
    COMPENSATE = "COMPENSATE"


class ReplyOutcome(StrEnum):
    SUCCESS = "SUCCESS"
    BUSINESS_FAILURE = "BUSINESS_FAILURE"
    RETRYABLE_ERROR = "RETRYABLE_ERROR"
    REFUSED = "REFUSED"


class IncidentAction(StrEnum):
    """What an operator asks of a compensation in incident (:class:`OperatorAction`)."""

    RETRY = "RETRY"  # try it again now, with a new retry budget
    RESOLVE_COMPENSATED = "RESOLVE_COMPENSATED"  # it was undone by hand: the step is COMPENSATED


# --- events: the state changes of one saga ---------------------------------------------------


class SagaBegun(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.SagaBegun"
    saga_type: str
    definition_version: Int32


class StepBegun(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.StepBegun"
    step: str
    attempt: Int32
    dispatch_at_ms: Int64
    deadline_ms: Int64
    last_error: str | None = None


class StepEnded(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.StepEnded"
    step: str
    outcome: StepOutcome
    output: str | None = None
    error: str | None = None


class SagaAborting(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.SagaAborting"
    reason: str
    failed_step: str | None = None


class CompensationBegun(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.CompensationBegun"
    step: str
    attempt: Int32
    dispatch_at_ms: Int64
    deadline_ms: Int64
    last_error: str | None = None


class CompensationEnded(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.CompensationEnded"
    step: str
    output: str | None = None


class SagaAborted(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.SagaAborted"
    reason: str


class SagaEnded(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.SagaEnded"


class IncidentOpened(Frozen):
    """A compensation stopped retrying and waits for an operator: its retry budget is spent, or
    the participant answered BUSINESS_FAILURE (it cannot undo the step)."""

    AVRO_NAME: ClassVar[str] = "sagalog.IncidentOpened"
    step: str
    reason: str
    attempts: Int32  # the step's comp_attempt when it opened


class IncidentRetried(Frozen):
    """An operator asked to try the compensation again: the incident closes and a new retry
    budget starts (a ``CompensationBegun`` with the next attempt follows)."""

    AVRO_NAME: ClassVar[str] = "sagalog.IncidentRetried"
    step: str
    operator: str
    reason: str


class IncidentResolved(Frozen):
    """An operator says the step's effect was undone by hand: the step is COMPENSATED."""

    AVRO_NAME: ClassVar[str] = "sagalog.IncidentResolved"
    step: str
    operator: str
    reason: str


Event = (
    SagaBegun
    | StepBegun
    | StepEnded
    | SagaAborting
    | CompensationBegun
    | CompensationEnded
    | SagaAborted
    | SagaEnded
    | IncidentOpened
    | IncidentRetried
    | IncidentResolved
)
EVENT_TYPES: dict[str, type[Frozen]] = {
    cls.AVRO_NAME: cls
    for cls in (
        SagaBegun,
        StepBegun,
        StepEnded,
        SagaAborting,
        CompensationBegun,
        CompensationEnded,
        SagaAborted,
        SagaEnded,
        IncidentOpened,
        IncidentRetried,
        IncidentResolved,
    )
}


# --- the snapshot: the whole saga after an event ----------------------------------------------


class StepSnapshot(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.StepSnapshot"
    name: str
    status: StepStatus = StepStatus.PENDING
    attempt: Int32 = 0
    comp_attempt: Int32 = 0
    #: The compensation attempt the current retry budget counts from: 0, then the attempt after
    #: which an operator's retry started a new budget (attempts spent = comp_attempt - this).
    comp_budget_from: Int32 = 0
    dispatch_at_ms: Int64 = 0
    deadline_ms: Int64 = 0
    output: str | None = None
    error: str | None = None


class Incident(Frozen):
    """An open incident: a compensation that waits for an operator (``saga retry`` / ``saga resolve``)."""

    AVRO_NAME: ClassVar[str] = "sagalog.Incident"
    step: str
    reason: str
    opened_ms: Int64
    attempts: Int32  # compensation attempts made when it opened


class SagaSnapshot(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.SagaSnapshot"
    saga_type: str
    #: The pinned definition's canonical JSON, inline: how records before schema version 6 pin it
    #: (and later records of a saga that began before). Empty when ``definition_id`` names it.
    definition: str
    #: The pinned definition by reference (schema version 6): the id (content hash) of a
    #: :class:`SagaDefinitionRecord` on the saga's log partition. Empty: ``definition`` is inline.
    #: :meth:`sagalog.fold.SagaState.definition_model` resolves either.
    definition_id: str = ""
    payload: str
    status: SagaStatus
    steps: tuple[StepSnapshot, ...]
    reason: str | None = None
    #: Open incidents, oldest first, at most one per step. In the snapshot (not only in the
    #: events) so that compaction, which keeps only the newest record, keeps them too.
    incidents: tuple[Incident, ...] = ()
    started_ms: Int64
    updated_ms: Int64
    #: The W3C ``traceparent`` of the client span that started the saga (from the StartSaga
    #: message's header, kept by a manager that traces): the saga's trace joins that one. None:
    #: the trace id derives from the saga id and ``started_ms`` (see :mod:`sagalog.tracing`).
    trace_parent: str | None = None


# --- top-level records ------------------------------------------------------------------------


class SagaLogRecord(Frozen):
    """One manager decision about a saga on the log: its events and the snapshot after them.

    A decision often has several events (a step ends and the next begins; the last step ends and
    the saga ends): they share one record, so one encoding of the snapshot and one message. The
    last event is ``event`` (where records before schema version 5 kept their only one), the
    earlier ones ``events_before``; ``events`` gives them all, in order. ``seq`` is the sequence
    number of the last event: a record of n events covers ``seq - n + 1 .. seq``.
    """

    AVRO_NAME: ClassVar[str] = "sagalog.SagaLogRecord"
    saga_id: str
    seq: Int64
    epoch: Int64
    timestamp_ms: Int64
    event: Event
    snapshot: SagaSnapshot
    writer: str | None = None
    events_before: tuple[Event, ...] = ()

    @property
    def events(self) -> tuple[Event, ...]:
        return (*self.events_before, self.event)

    @property
    def first_seq(self) -> int:
        """The sequence number of the record's first event."""
        return self.seq - len(self.events_before)


#: Log keys of partition claims start with this; a saga id never does (claims share the partitions).
CLAIM_KEY_PREFIX = b"__claim__/"


class PartitionClaim(Frozen):
    """A manager took over a log partition with this epoch; older epochs are zombies from then on."""

    AVRO_NAME: ClassVar[str] = "sagalog.PartitionClaim"
    partition: Int32
    epoch: Int64
    owner: str
    timestamp_ms: Int64

    @staticmethod
    def key(partition: int) -> bytes:
        return CLAIM_KEY_PREFIX + str(partition).encode()


#: Log keys of definition records start with this; a saga id never does (they share the partitions).
DEFINITION_KEY_PREFIX = b"__definition__/"


class SagaDefinitionRecord(Frozen):
    """One version of a saga definition, stored once per log partition (never tombstoned) and
    pinned by sagas through its ``definition_id``, the hash of ``definition`` (canonical JSON)."""

    AVRO_NAME: ClassVar[str] = "sagalog.SagaDefinitionRecord"
    definition_id: str
    saga_type: str
    version: Int32
    definition: str
    timestamp_ms: Int64
    writer: str | None = None

    @staticmethod
    def key(definition_id: str) -> bytes:
        return DEFINITION_KEY_PREFIX + definition_id.encode()


def is_saga_key(key: bytes | None) -> TypeGuard[bytes]:
    """Whether a log key names a saga (not a partition claim nor a definition record)."""
    return key is not None and not key.startswith((CLAIM_KEY_PREFIX, DEFINITION_KEY_PREFIX))


class StartSaga(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.StartSaga"
    saga_id: str
    saga_type: str
    payload: str
    requested_ms: Int64


class CancelSaga(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.CancelSaga"
    saga_id: str
    reason: str
    requested_ms: Int64


class OperatorAction(Frozen):
    """An operator's answer to an open incident, sent to the inbox like a cancel (``saga retry``,
    ``saga resolve``); the manager records it on the log with who and why."""

    AVRO_NAME: ClassVar[str] = "sagalog.OperatorAction"
    saga_id: str
    action: IncidentAction
    step: str
    operator: str
    reason: str
    requested_ms: Int64


class ParticipantCommand(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.ParticipantCommand"
    command_id: str
    saga_id: str
    saga_type: str
    step: str
    action: Action
    attempt: Int32
    epoch: Int64
    payload: str
    outputs: str
    reply_topic: str
    reply_partition: Int32
    deadline_ms: Int64
    issued_ms: Int64

    @staticmethod
    def make_id(saga_id: str, step: str, action: Action) -> str:
        """Deterministic and attempt-free: every retry of a step carries the same id."""
        return f"{saga_id}/{step}/{action.value.lower()}"


class ParticipantReply(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.ParticipantReply"
    command_id: str
    saga_id: str
    step: str
    action: Action
    attempt: Int32
    epoch: Int64
    outcome: ReplyOutcome
    output: str | None = None
    error: str | None = None
    participant: str
    replied_ms: Int64


class DeadLetter(Frozen):
    AVRO_NAME: ClassVar[str] = "sagalog.DeadLetter"
    source_topic: str
    source_partition: Int32
    source_offset: Int64
    key: bytes | None = None
    value: bytes | None = None
    reason: str
    error_type: str
    component: str
    dead_lettered_ms: Int64


TOP_LEVEL: tuple[type[Frozen], ...] = (
    SagaLogRecord,
    PartitionClaim,
    SagaDefinitionRecord,
    StartSaga,
    CancelSaga,
    OperatorAction,
    ParticipantCommand,
    ParticipantReply,
    DeadLetter,
)
InboxMessage = StartSaga | CancelSaga | OperatorAction | ParticipantReply


#: Every model of an Avro record, by full Avro name (the hot codec builds them by this name).
_NESTED: tuple[type[Frozen], ...] = (StepSnapshot, Incident, SagaSnapshot)
AVRO_MODELS: dict[str, type[Frozen]] = {cls.AVRO_NAME: cls for cls in (*TOP_LEVEL, *EVENT_TYPES.values(), *_NESTED)}
#: Every enum of the schemas, by full Avro name.
AVRO_ENUMS: dict[str, type[StrEnum]] = {
    f"sagalog.{cls.__name__}": cls for cls in (SagaStatus, StepStatus, StepOutcome, Action, ReplyOutcome, IncidentAction)
}
